"""Image-specific parts of the pipeline: sample grids, FID and label consistency (hooks called by pipeline.py).

Images are float tensors ``(n, C, H, W)`` in [0, 1]; a pair is an *image pair* when its ``shape`` has 3 entries.

* Score training: :func:`score_callbacks` gives the score stage a :class:`ScoreSampleGrid` callback that draws a
  few *unconditional* samples from the current (EMA) score network by annealed Langevin and saves them as
  ``<score stage dir>/samples/step<NNNNNN>.png`` (settings ``eval.score_grid``, outside the stage's cache key).
* Evaluation (:func:`evaluate_images`), settings under ``eval``:

  - ``samples_grid.png``: one row per source, columns ``source | k SCONES samples | BP`` (``eval.grid``);
  - FID (:mod:`scones.metrics.fid`) of every method's samples against fresh target samples (``eval.fid``): the
    Inception-v3 weights come from ``eval.fid.weights_path``, ``$FID_INCEPTION_WEIGHTS`` or the torch hub cache;
    when they (or ``torch-fidelity``) are missing FID is skipped with a warning and recorded as ``null``;
    ``eval.fid.feature_extractor`` (a ``_target_`` node) swaps in any feature network (tests: a tiny one);
  - label consistency (:mod:`scones.metrics.classifier`) when source and target carry digit labels: a small
    CNN is trained on the target image set (``eval.label_consistency``) and the share of each method's samples
    classified as their source's digit is reported;
  - feature FID / KID (:mod:`scones.metrics.feature_distance`, ``eval.feature_fid``) in that CNN's penultimate
    feature space, of every method's samples and the sources against the CNN's held-out target images, with the
    target-vs-target floor (two disjoint held-out halves); written into the grid's caption.

Config keys ``eval.grid``, ``eval.fid``, ``eval.label_consistency``, ``eval.feature_fid``, ``eval.score_grid``,
defaults in ``configs/eval/default.yaml`` (``fid.n_real: null`` = ``eval.n_samples``; ``fid.device: null`` = CUDA
when available, else CPU; ``label_consistency.max_train`` caps the classifier's training images;
``score_grid.every_n_steps: 0`` = only at the end of training.)
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


def is_image(dist) -> bool:
    """True for distributions of images ``(C, H, W)``."""
    return len(tuple(getattr(dist, "shape", ()))) == 3


def sample_with_labels(dist, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """``n`` samples and, when ``dist`` has labels (digit image sets), the label of each drawn image."""
    if getattr(dist, "labels", None) is not None:
        return dist.sample(n, generator=generator, return_labels=True)
    return dist.sample(n, generator=generator), None


# --------------------------------------------------------------------------------------------- grids


def grid_png(images: Tensor, nrow: int, min_cell: int = 48) -> bytes:
    """PNG bytes of a grid of ``images (N, C, H, W)`` (clamped to [0, 1]; small images enlarged, nearest)."""
    from torchvision.utils import make_grid, save_image

    images = images.detach().float().cpu().clamp(0.0, 1.0)
    scale = max(1, math.ceil(min_cell / images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    buf = io.BytesIO()
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), buf, format="png")
    return buf.getvalue()


def captioned_png(png: bytes, caption: str) -> bytes:
    """``png`` with ``caption`` (one or more lines) written above it (matplotlib, pixel size kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    dpi, font = 100, 9
    width = max(w, 620)
    chars = int(width / (0.61 * font * dpi / 72))  # monospace glyph width ≈ 0.6 em
    caption = "\n".join(textwrap.fill(line, chars, subsequent_indent="  ") for line in caption.split("\n"))
    n_lines = caption.count("\n") + 1
    head = int(n_lines * font * 1.3 * dpi / 72) + 10  # text rows in pixels
    fig = plt.figure(figsize=(width / dpi, (h + head) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, w / width, h / (h + head)))
    ax.imshow(img, interpolation="nearest")
    ax.axis("off")
    fig.text(0.005, 1 - 4 / (h + head), caption, ha="left", va="top", fontsize=font, family="monospace")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_comparison_grid(path: Path, x: Tensor, y: Tensor, y_bp: Tensor, caption: str | None = None) -> None:
    """Rows = sources; columns ``x_i | y_i1 … y_ik | T(x_i)``; ``caption`` (e.g. the metrics) written on top.

    ``x``, ``y_bp``: ``(r, C, H, W)``; ``y``: ``(r, k, C, H, W)``.
    """
    r, k = y.shape[:2]
    rows = torch.cat([x[:, None], y, y_bp[:, None]], dim=1)  # (r, k + 2, C, H, W)
    png = grid_png(rows.reshape(r * (k + 2), *x.shape[1:]), nrow=k + 2)
    atomic_write_bytes(path, captioned_png(png, caption) if caption else png)


class ScoreSampleGrid(pl.Callback):
    """Unconditional samples of the score model during training, saved as ``out_dir/step<NNNNNN>.png``.

    Annealed Langevin (:func:`scones.sampling.langevin.annealed_langevin`) over the model's training schedule
    from y₀ ~ U[0, 1]^D (NCSN's ``data_init: false``), with the same noise at every save so grids are
    comparable across steps; uses :meth:`ScoreModule.score` (the EMA weights when EMA is on). Runs on rank 0
    every ``every_n_steps`` optimizer steps (0: never during training) and at the end of training. A diverging
    chain is reported as a warning; it never stops training.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shape: tuple[int, ...],
        every_n_steps: int = 0,
        n_samples: int = 36,
        step_lr: float = 1e-5,
        n_steps_each: int = 5,
        skip_levels: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.out_dir, self.shape = Path(out_dir), tuple(int(s) for s in shape)
        self.every, self.n, self.seed = int(every_n_steps), int(n_samples), int(seed)
        self.step_lr, self.n_steps_each, self.skip = float(step_lr), int(n_steps_each), int(skip_levels)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.save(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, trainer.global_step)

    @torch.no_grad()
    def sample(self, pl_module) -> Tensor:
        from scones.sampling.langevin import annealed_langevin

        device = pl_module.sigmas.device
        g = torch.Generator(device=device).manual_seed(self.seed)
        y0 = torch.rand((self.n, *self.shape), generator=g, device=device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            return annealed_langevin(
                pl_module.score, y0, pl_module.sigmas, self.step_lr, self.n_steps_each, denoise=True,
                skip_levels=self.skip, disable=True, generator=g,
            )
        finally:
            pl_module.train(was_training)

    def save(self, trainer, pl_module, step: int) -> None:
        if not trainer.is_global_zero or self.n < 1:
            return
        from scones.sampling.langevin import NonFiniteSampleError

        try:
            y = self.sample(pl_module)
        except NonFiniteSampleError as e:
            log.warning("score sample grid at step %d skipped: %s", step, e)
            return
        atomic_write_bytes(self.out_dir / f"step{step:06d}.png", grid_png(y, nrow=max(1, int(math.sqrt(self.n)))))


def score_callbacks(s, seed: int, stage_dir: Path, target) -> list[pl.Callback]:
    """Callbacks of the score stage: a :class:`ScoreSampleGrid` (settings ``s`` = ``eval.score_grid``) for image
    targets, nothing otherwise."""
    if not is_image(target):
        return []
    return [
        ScoreSampleGrid(
            Path(stage_dir) / "samples", tuple(target.shape), s.every_n_steps, s.n_samples, s.step_lr,
            s.n_steps_each, s.skip_levels, seed=int(seed),
        )
    ]


# --------------------------------------------------------------------------------------------- metrics


def fid_scores(s, target, ys: Mapping[str, Tensor], x: Tensor, g: torch.Generator) -> dict:
    """FID of each method's samples and of the sources against ``fid.n_real`` fresh target samples (``s`` =
    ``eval.fid``).

    Returns ``{"methods": {m: fid | None}, "source": fid | None, "extractor", "n_real", "n_fake", "skipped"}``;
    ``skipped`` holds the reason when FID could not be computed (missing Inception weights, no torch-fidelity).
    """
    from experiments.startup import Node
    from scones.metrics.fid import FID, FIDWeightsNotFoundError

    n_fake = int(x.shape[0])
    n_real = int(s.n_real or n_fake)
    out: dict[str, Any] = {
        "methods": dict.fromkeys(ys), "source": None, "n_real": n_real, "n_fake": n_fake, "skipped": None,
        "extractor": "custom" if s.feature_extractor else "inception-v3",
    }
    if not s.enabled:
        out["skipped"] = "eval.fid.enabled=false"
        return out
    if n_real < 2 or n_fake < 2:
        out["skipped"] = "FID needs at least 2 real and 2 generated images"
        return out
    extractor = None
    if s.feature_extractor is not None:
        extractor = Node("eval.fid.feature_extractor", s.feature_extractor.model_dump(by_alias=True)).build()
    try:
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        metric = FID(
            extractor, s.weights_path, input_size=(3, *x.shape[-2:]), device=device, batch_size=int(s.batch_size)
        )
    except (FIDWeightsNotFoundError, ModuleNotFoundError) as e:
        reason = " ".join(str(e).split())
        log.warning("FID skipped (recorded as null): %s", reason)
        out["skipped"] = reason
        return out
    metric.update(target.sample(n_real, generator=g), real=True)
    for name, images in [*ys.items(), ("source", x)]:
        metric.reset(real=False)
        metric.update(images, real=False)
        value = metric.compute()
        if name == "source":
            out["source"] = value
        else:
            out["methods"][name] = value
    return out


def heldout_split(s, seed: int, n: int) -> tuple[Tensor, Tensor]:
    """Indices ``(held_out, rest)`` of the ``n`` target images (seeded permutation, ``eval.label_consistency.holdout``
    of them held out): the held-out ones are the classifier's test set and the feature-FID reference."""
    perm = torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed) + 300))
    n_hold = int(round(float(s.holdout) * int(n)))
    return perm[:n_hold], perm[n_hold:]


def without_reference(s, seed: int, target):
    """The target image set without its held-out images (:func:`heldout_split`), for everything the evaluation
    draws target images from (the independent coupling, the pool of ``sampler.init: resample``): no compared sample
    is then a copy of a feature-FID reference image. ``target`` itself when it has no labels or
    ``eval.label_consistency`` is off (no reference is held out then)."""
    from scones.data.images import ImageTensorDistribution

    images, labels = getattr(target, "images", None), getattr(target, "labels", None)
    if not s.enabled or images is None or labels is None:
        return target
    _, rest = heldout_split(s, seed, len(labels))
    return ImageTensorDistribution(images[rest], labels[rest], random_flip=bool(getattr(target, "random_flip", False)))


def train_label_classifier(s, seed: int, target) -> dict | None:
    """The digit CNN of the label-consistency and feature-FID metrics, trained on ``1 − holdout`` of the target
    image set (seeded), or None when the target has no labels or ``s.enabled`` (``eval.label_consistency``) is
    false.

    Returns ``{"classifier", "heldout_images", "heldout_labels", "n_train"}``.
    """
    from scones.metrics.classifier import train_digit_classifier

    images, labels = getattr(target, "images", None), getattr(target, "labels", None)
    if not s.enabled or images is None or labels is None:
        return None
    hold, train = heldout_split(s, seed, len(labels))
    train = train[: int(s.max_train)]
    clf = train_digit_classifier(images[train], labels[train], epochs=int(s.epochs), width=int(s.width), seed=int(seed))
    return {"classifier": clf, "heldout_images": images[hold], "heldout_labels": labels[hold], "n_train": len(train)}


def label_consistency_scores(
    s, seed: int, target, x: Tensor, x_labels: Tensor | None, ys: Mapping[str, Tensor],
    trained: dict | None = None,
) -> dict | None:
    """Share of each method's samples classified as the source's digit, or None without labels.

    A :class:`~scones.metrics.classifier.DigitClassifier` is trained on ``1 − holdout`` of the target image set
    (:func:`train_label_classifier`, or ``trained``, its result); ``heldout_accuracy`` is its accuracy on the rest,
    ``source_accuracy`` its accuracy on the sources themselves (how recognisable the inputs already are),
    chance ≈ 0.1.
    """
    from scones.metrics.classifier import label_consistency

    if x_labels is None:
        return None
    trained = trained if trained is not None else train_label_classifier(s, seed, target)
    if trained is None:
        return None
    clf, hold_x, hold_y = trained["classifier"], trained["heldout_images"], trained["heldout_labels"]
    return {
        "methods": {name: label_consistency(clf, y.float().clamp(0, 1), x_labels) for name, y in ys.items()},
        "source_accuracy": label_consistency(clf, x, x_labels),
        "heldout_accuracy": label_consistency(clf, hold_x, hold_y) if len(hold_y) else None,
        "n_train": int(trained["n_train"]),
    }


def feature_fid_scores(s, seed: int, trained: dict, x: Tensor, ys: Mapping[str, Tensor]) -> dict | None:
    """FID / KID in the digit classifier's penultimate feature space (:mod:`scones.metrics.feature_distance`).

    Every method's samples and the sources are scored against the classifier's held-out target images (not used
    to train the classifier; split into two halves, the second giving the target-vs-target floor; averaged over
    ``n_splits`` random splits).
    None when ``s.enabled`` (``eval.feature_fid``) is false or fewer than 4 images are held out.
    """
    from scones.metrics.feature_distance import PenultimateFeatures, feature_distances

    reference = trained["heldout_images"]
    if not s.enabled or reference.shape[0] < 4:
        return None
    out = feature_distances(
        PenultimateFeatures(trained["classifier"]), reference, {**ys, "source": x},
        n_splits=int(s.n_splits), kid_subsets=int(s.kid_subsets), seed=int(seed) + 400,
    )
    out["extractor"] = "digit classifier, penultimate layer"
    return out


def background_mask(target_images: Tensor, threshold: float = 0.01) -> Tensor:
    """Pixels ``(H, W)`` where the target set's mean image (over images and channels) is below ``threshold``:
    the background the target images (almost) never use (sklearn digits at 16 px: 30 of 256 pixels)."""
    return target_images.float().mean(dim=(0, 1)) < float(threshold)


def background_stats(y: Tensor, mask: Tensor) -> dict[str, float]:
    """``bg`` statistics of images ``y (n, C, H, W)`` on the background ``mask`` (:func:`background_mask`):
    ``abs`` = mean |y| (the `bg` of docs/images.md; target images: ~0.002), ``rms`` and ``signed`` (mean y: an
    offset rather than noise when it is close to ``abs``). Raw values, not clamped to [0, 1]."""
    v = y.float()[:, :, mask]
    return {"abs": float(v.abs().mean()), "rms": float(v.pow(2).mean().sqrt()), "signed": float(v.mean())}


METHOD_NAMES = {"scones": "SCONES", "bp": "BP"}


def grid_caption(fid: Mapping[str, Any] | None, lc: Mapping[str, float] | None) -> str | None:
    """One- or two-line caption of the samples grid: feature FID (and label consistency) per column."""
    lines = []
    if fid is not None:
        f = fid["fid"]
        lines.append(
            f"feature-FID vs held-out targets ({fid['n_per_set']} images each): SCONES {f['scones']:.2f}, "
            f"BP {f['bp']:.2f}, independent {f['independent']:.2f}, source {f['source']:.2f}; "
            f"target floor {f['target_floor']:.2f}"
        )
    if lc is not None:
        lines.append("label consistency: " + ", ".join(f"{METHOD_NAMES.get(k, k)} {v:.3f}" for k, v in lc.items()))
    return "\n".join(lines) or None


def evaluate_images(
    settings,
    seed: int,
    run_dir: Path,
    target,
    x: Tensor,
    x_labels: Tensor | None,
    ys: Mapping[str, Tensor],
    resample: Callable[[Tensor], Tensor],
    g: torch.Generator,
) -> dict:
    """Grid, FID and label consistency of an image run (``settings`` = the typed ``eval`` settings); returns the
    metrics.json additions.

    ``ys`` maps method → samples ``(n, C, H, W)`` paired with ``x`` (``scones``, ``bp``, ``independent``);
    ``resample(x_r)`` draws fresh SCONES samples for the sources ``x_r`` (extra samples of the grid).

    Returns ``{"per_method": {m: {"label_consistency"?, "background"?}}, "fid": {m: value | None, "source",
    "n_real", "n_fake", "extractor", "skipped"}, "label_classifier": {...}?, "feature_fid": {...}?,
    "background"?: {"pixels", "target"}, "timings_s": seconds}``
    (``per_method`` entries are merged into ``metrics["methods"]``; FID stays in its own block because it may be
    null; ``feature_fid`` (digit pairs) is :func:`feature_fid_scores`; ``background`` (image sets with pixels the
    target set's mean image leaves below 0.01): mean |y| there per method, :func:`background_stats`, and the same of
    the target images). The grid is drawn last, captioned with the feature FID and label consistency.
    """
    t0 = time.perf_counter()
    fid = fid_scores(settings.fid, target, ys, x, g)
    per_method: dict[str, dict] = {name: {} for name in ys}
    out: dict[str, Any] = {"per_method": per_method, "fid": {**fid.pop("methods"), **fid}}
    lcs = settings.label_consistency
    trained = train_label_classifier(lcs, seed, target) if x_labels is not None else None
    lc = label_consistency_scores(lcs, seed, target, x, x_labels, ys, trained) if trained is not None else None
    if lc is not None:
        for name, value in lc["methods"].items():
            per_method[name]["label_consistency"] = value
        out["label_classifier"] = {k: v for k, v in lc.items() if k != "methods"}
    feature_fid = feature_fid_scores(settings.feature_fid, seed, trained, x, ys) if trained is not None else None
    if feature_fid is not None:
        out["feature_fid"] = feature_fid
    images_ = getattr(target, "images", None)
    if images_ is not None:  # image sets: the background statistic `bg` (docs/images.md)
        mask = background_mask(images_)
        if bool(mask.any()):
            for name, y in ys.items():
                per_method[name]["background"] = background_stats(y, mask)["abs"]
            out["background"] = {"pixels": int(mask.sum()), "target": background_stats(images_, mask)["abs"]}
    grid = settings.grid
    r, k = min(int(grid.n_sources), x.shape[0]), max(1, int(grid.samples_per_source))
    if r > 0:
        xr = x[:r]
        extra = ys["scones"][:r, None] if k == 1 else resample(xr.repeat_interleave(k, 0)).reshape(r, k, *x.shape[1:])
        caption = grid_caption(feature_fid, lc["methods"] if lc is not None else None)
        save_comparison_grid(run_dir / "samples_grid.png", xr, extra, ys["bp"][:r], caption)
    out["timings_s"] = round(time.perf_counter() - t0, 2)
    return out


__all__ = [
    "ScoreSampleGrid",
    "background_mask",
    "background_stats",
    "evaluate_images",
    "feature_fid_scores",
    "fid_scores",
    "grid_png",
    "heldout_split",
    "is_image",
    "label_consistency_scores",
    "sample_with_labels",
    "save_comparison_grid",
    "score_callbacks",
    "train_label_classifier",
    "without_reference",
]
