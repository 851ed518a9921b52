"""Does the `digits` score model make clean digits on its own? Unconditional samples and denoising, measured.

Loads (or trains, once, through the stage cache) the score stage of ``+experiment=digits`` with the given Hydra
overrides and reports, as one JSON line (appended to ``--json`` with ``--label``):

* ``tweedie``: per noise level σ_i, the Tweedie denoiser D(ỹ) = ỹ + σ_i² s(ỹ, σ_i) on noisy target images
  ỹ = y + σ_i z: mean |D(ỹ) − y| on the background pixels (``bg``: where the target set's mean image is < 0.01,
  :func:`experiments.images.background_mask`; 0 = a perfect denoiser there, since the target images are 0 on them)
  and on the other pixels (``fg``), beside the noise's own mean |σ_i z| (``noise``); and ``offset``: the share of a
  uniform background offset δ = σ_i (ỹ + δ on the background) that D leaves (1 = ignores it, 0 = removes it);
* ``uncond``: ``--n`` unconditional samples of the score model (with ``score.expert`` on, the expert at its levels;
  ``uncond_net`` then has the same chains with the net at every level), annealed Langevin from U[0, 1] over all levels
  with the score grid's sampler (``eval.score_grid``: step_lr, n_steps_each) and the final denoising step, their
  background statistic ``bg`` (mean |y| on the background, :func:`experiments.images.background_stats`; also before
  the denoising step), feature FID / KID against the evaluation's held-out target images
  (:func:`scones.metrics.feature_distance.feature_distances`, as ``metrics.json``'s ``feature_fid``) and the share
  of samples the digit classifier gives each class (``class_share``, a mode-collapse check);
* ``reference``: the same statistics of target images (``bg`` of the target set, the feature-FID floor);
* ``confident`` (in ``uncond``, ``reference`` and ``oracle``): the share of images the digit classifier gives one
  class with probability > 0.9, a readability statistic (held-out target images: ≈ 0.94), and ``nn_median``: the
  median L2 distance of a sample to its nearest image of the score's training set (a memorisation check: 0 = a
  copy; the held-out target images' distance to the other target images, in ``reference``: ≈ 1.5);
* with ``--oracle-levels K1,K2,…``: which noise levels limit the unconditional samples. For each K the same
  chains run the exact score of the score's training images convolved with N(0, σ_i²) (the empirical mixture,
  :class:`scones.data.distributions.GaussianMixture`, i.e. what a perfect fit of the DSM loss on these images
  gives) at levels i < K and the learned score at levels i ≥ K (K = L: the mixture everywhere, which copies
  training images; K = 0: the learned score alone);
* with ``--chains``: SCONES samples of the run's sampler (``scones_default``; the evaluation's sources, chain
  starts and seeds) and of chains from BP(x) + σ z started at the level nearest ``--bp-start-sigma`` (``scones_bp``;
  σ₈ = 0.028 of the default schedule, ``sampler.init=bp_noise sampler.skip_levels=7``), with BP and the
  independent coupling beside: ``bg``, feature FID / KID and label consistency.

CPU times (process time) of each part, incl. training the score when it was not cached, are in ``cpu_s``.

    python scripts/digits_score_ablation.py --chains                      # the cached score of the default run
    python scripts/digits_score_ablation.py --label sigma005 -- score.sigma_min=0.005 score.n_levels=11
    python scripts/digits_score_ablation.py --label levels --oracle-levels 3,4,5,6,10   # which levels limit it

Everything after ``--`` is a Hydra override of the digits experiment (a score setting that is not cached is
trained first, ~5 CPU-min at 800 steps). Grids of the unconditional samples go to ``--out``
(default outputs/score_ablation/<label>.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_sampler_ablation import start_digits_job  # noqa: E402

from experiments import images  # noqa: E402
from experiments import pipeline as P  # noqa: E402
from scones.coupling import Coupling, chunk_seed  # noqa: E402
from scones.metrics.classifier import label_consistency  # noqa: E402
from scones.metrics.feature_distance import PenultimateFeatures, feature_distances  # noqa: E402
from scones.sampling.conditional import LearnedPriorScore  # noqa: E402
from scones.sampling.langevin import annealed_langevin  # noqa: E402
from scones.sampling.settings import validate_sampler  # noqa: E402


@torch.no_grad()
def tweedie_table(module, clean: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> list[dict]:
    """Per level: mean |D(y + σz) − y| on background / foreground pixels, mean |σz|, and the share of a uniform
    background offset δ = σ that D leaves (same noise z with and without the offset)."""
    g = torch.Generator().manual_seed(seed)
    fg = ~mask
    rows = []
    for i, s in enumerate(module.sigmas.tolist()):
        z = torch.randn(clean.shape, generator=g)
        noisy = clean + s * z
        den = noisy + s**2 * module.score(noisy, i)
        res = (den - clean)[:, 0]
        shifted = noisy + s * mask.to(noisy.dtype)
        den_shift = shifted + s**2 * module.score(shifted, i)
        left = float((den_shift - den)[:, 0][:, mask].mean()) / s
        rows.append({
            "sigma": round(s, 5), "bg": float(res[:, mask].abs().mean()), "fg": float(res[:, fg].abs().mean()),
            "noise": float((s * z[:, 0]).abs().mean()), "offset": left,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="unconditional samples (and SCONES sources with --chains)")
    ap.add_argument("--chains", action="store_true", help="also SCONES chains (default sampler and from BP + σz)")
    ap.add_argument("--bp-start-sigma", type=float, default=0.0278, help="σ the BP(x) + σz chains start at")
    ap.add_argument("--label", default="score")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "score_ablation")
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line here")
    ap.add_argument("--oracle-levels", default="", help="K1,K2,…: the empirical-mixture score below level K")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg, problem, spec = start_digits_job(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    target = problem.target
    cpu: dict[str, float] = {}
    t0 = time.process_time()
    prior_score, stage = P.score_stage(spec, target)
    cpu["score_stage"] = round(time.process_time() - t0, 1)
    module = prior_score.module
    module.eval()
    mask = images.background_mask(target.images)
    sigmas = module.sigmas.detach().clone()
    result: dict = {
        "label": args.label, "overrides": args.overrides, "score_stage": str(stage.dir.name),
        "score_wall_s": round(stage.seconds, 1), "sigmas": [round(s, 5) for s in sigmas.tolist()],
        "bg_pixels": int(mask.sum()),
    }
    t0 = time.process_time()
    result["tweedie"] = tweedie_table(module, target.images, mask)
    cpu["tweedie"] = round(time.process_time() - t0, 1)
    print("level sigma   bg-res  fg-res  |sz|   offset-left")
    for i, r in enumerate(result["tweedie"]):
        print(f"{i:5d} {r['sigma']:.4f}  {r['bg']:.4f}  {r['fg']:.4f}  {r['noise']:.4f}  {r['offset']:.3f}")

    t0 = time.process_time()
    lcs = spec.eval.settings.label_consistency
    trained = images.train_label_classifier(lcs, spec.seed, target)
    feats, clf = PenultimateFeatures(trained["classifier"]), trained["classifier"]
    cpu["classifier"] = round(time.process_time() - t0, 1)
    ff = spec.eval.settings.feature_fid

    def fd(sets: dict) -> dict:
        return feature_distances(feats, trained["heldout_images"], sets, n_splits=int(ff.n_splits),
                                 kid_subsets=int(ff.kid_subsets), seed=int(spec.seed) + 400)

    # unconditional samples of the score alone: the score grid's sampler over the whole schedule, from U[0, 1]
    sg = spec.eval.settings.score_grid
    train_flat = target.images.flatten(1)
    t0 = time.process_time()
    y, result["uncond"], d = unconditional(module, target, sigmas, sg, spec, args.n, mask, fd, clf, train_flat)
    cpu["uncond_sampling"] = round(time.process_time() - t0, 1)
    if module.expert is not None:  # the same chains with the net at every level (score.expert off)
        expert, module.expert = module.expert, None
        y_net, result["uncond_net"], _ = unconditional(module, target, sigmas, sg, spec, args.n, mask, fd, clf,
                                                       train_flat)
        module.expert = expert
        result["expert"] = {"components": len(expert.mixture.weights64), "sigma_min": expert.sigma_min}
        (args.out / f"{args.label}_net.png").write_bytes(images.grid_png(y_net[:64], nrow=8))
    heldout = trained["heldout_images"]
    result["reference"] = {
        "target_bg": images.background_stats(target.images, mask), "ffid_floor": d["fid"]["target_floor"],
        "fkid_floor": d["kid"]["target_floor"]["mean"], "n_per_set": d["n_per_set"],
        # nn_median: the held-out images' distance to the nearest of the other target images (a new digit's level)
        **readability(clf, heldout, images.without_reference(lcs, spec.seed, target).images.flatten(1)),
    }
    if args.oracle_levels:
        t0 = time.process_time()
        result["oracle"] = oracle_rows(module, sigmas, target, args, sg, spec, fd, clf, train_flat)
        cpu["oracle"] = round(time.process_time() - t0, 1)
    (args.out / f"{args.label}.png").write_bytes(images.grid_png(y[:64], nrow=8))

    if args.chains:
        t0 = time.process_time()
        chains = conditional_rows(spec, cfg, problem, module, mask, clf, fd, args)
        cpu["chains"] = round(time.process_time() - t0, 1)
        result["chains"] = chains
    result["cpu_s"] = cpu
    print(json.dumps(result), flush=True)
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


def unconditional(module, target, sigmas, sg, spec, n, mask, fd, clf, train_flat) -> tuple[torch.Tensor, dict, dict]:
    """``n`` unconditional samples of ``module.score`` (seeded chains from U[0, 1], the score grid's sampler, then
    the Tweedie denoising step), their statistics and the feature distances (with the floor)."""
    g = torch.Generator().manual_seed(int(spec.seed) + 600)
    y0 = torch.rand((n, *target.shape), generator=g)
    raw = annealed_langevin(module.score, y0, sigmas, float(sg.step_lr), int(sg.n_steps_each), denoise=False,
                            skip_levels=int(sg.skip_levels), disable=True, generator=g)
    with torch.no_grad():
        y = raw + float(sigmas[-1]) ** 2 * module.score(raw, len(sigmas) - 1)
        pred = clf(y.clamp(0, 1)).argmax(1)
    d = fd({"uncond": y})
    return y, {
        "n": n, "step_lr": float(sg.step_lr), "n_steps_each": int(sg.n_steps_each),
        "bg": images.background_stats(y, mask), "bg_before_denoise": images.background_stats(raw, mask)["abs"],
        "ffid": d["fid"]["uncond"], "fkid": d["kid"]["uncond"]["mean"],
        "class_share": [round(float((pred == c).float().mean()), 3) for c in range(10)],
        "out_of_range": float(((y < -0.05) | (y > 1.05)).float().mean()),
        **readability(clf, y, train_flat),
    }, d


@torch.no_grad()
def readability(clf, y: torch.Tensor, train_flat: torch.Tensor) -> dict:
    """``confident``: share of images the classifier gives one class with probability > 0.9; ``nn_median``:
    median L2 distance to the nearest training image."""
    prob = clf(y.float().clamp(0, 1)).softmax(1)
    nn_dist = torch.cdist(y.float().flatten(1), train_flat).min(1).values
    return {"confident": float((prob.max(1).values > 0.9).float().mean()), "nn_median": float(nn_dist.median())}


def oracle_rows(module, sigmas, target, args, sg, spec, fd, clf, train_flat) -> list[dict]:
    """Unconditional chains (the seeds of ``uncond``) with the empirical-mixture score at levels < K and the learned
    score at levels ≥ K, for each K of ``--oracle-levels``."""
    from scones.data.distributions import GaussianMixture

    mixtures = [GaussianMixture(train_flat, stds=float(s)) for s in sigmas.tolist()]

    def mixture_score(y: torch.Tensor, i: int) -> torch.Tensor:
        return mixtures[i].score(y.flatten(1)).view_as(y)

    samples, rows = {}, []
    for k in [int(v) for v in args.oracle_levels.split(",")]:
        def score(y, i, k=k):
            return mixture_score(y, i) if i < k else module.score(y, i)

        g = torch.Generator().manual_seed(int(spec.seed) + 600)
        y0 = torch.rand((args.n, *target.shape), generator=g)
        samples[f"K{k}"] = annealed_langevin(score, y0, sigmas, float(sg.step_lr), int(sg.n_steps_each),
                                             denoise=True, skip_levels=int(sg.skip_levels), disable=True, generator=g)
        rows.append({"K": k, "sigma_K": float(sigmas[k]) if k < len(sigmas) else None})
    d = fd(samples)
    for row in rows:
        y = samples[f"K{row['K']}"]
        row.update(ffid=d["fid"][f"K{row['K']}"], fkid=d["kid"][f"K{row['K']}"]["mean"],
                   **readability(clf, y, train_flat))
        print("oracle below level", json.dumps(row), flush=True)
        (args.out / f"{args.label}_oracle{row['K']}.png").write_bytes(images.grid_png(y[:64], nrow=8))
    return rows


def conditional_rows(spec, cfg, problem, module, mask, clf, fd, args) -> dict:
    """SCONES (the run's sampler, and chains from BP(x) + σz), BP and independent samples on the evaluation's
    sources: bg, feature FID / KID, label consistency."""
    from omegaconf import OmegaConf

    source, target = problem.source, problem.target
    potentials, dual = P.dual_stage(spec, problem)
    bp_net, _ = P.bp_stage(spec, problem, potentials, dual)
    g = torch.Generator().manual_seed(int(spec.seed) + 100)  # as experiments.pipeline.evaluate
    x, x_labels = images.sample_with_labels(source, args.n, g)
    drawn = images.without_reference(spec.eval.settings.label_consistency, spec.seed, target)
    base = OmegaConf.to_container(cfg.sampler, resolve=True)
    nearest = min(range(len(module.sigmas)), key=lambda i: abs(math.log(float(module.sigmas[i]) / args.bp_start_sigma)))
    samplers = {"scones_default": base, "scones_bp": {**base, "init": "bp_noise", "skip_levels": nearest}}
    with torch.no_grad():
        y_bp = bp_net(x).reshape(x.shape)
    ys: dict[str, torch.Tensor] = {}
    for name, s in samplers.items():
        sampler = validate_sampler(s)
        coupling = Coupling(potentials, source, drawn, prior_score=LearnedPriorScore.for_sampler(module, sampler),
                            barycentric_map=bp_net, sampler=sampler, batch_size=int(spec.eval.settings.batch_size))
        gs = torch.Generator().set_state(g.get_state())  # every sampler sees the evaluation's generator state
        y0 = coupling.start_chains(x, y_bp, gs)
        parts = coupling.run_chains(x, y0, chunk_seed(gs))
        ys[name] = torch.cat([parts[c] for c in sorted(parts)])
    ys["bp"] = y_bp
    ys["independent"] = drawn.sample(args.n, generator=torch.Generator().set_state(g.get_state()))
    d = fd(ys)
    rows = {}
    for name, y in ys.items():
        rows[name] = {
            "bg": images.background_stats(y, mask)["abs"], "bg_signed": images.background_stats(y, mask)["signed"],
            "ffid": d["fid"][name], "fkid": d["kid"][name]["mean"],
            "lc": label_consistency(clf, y.float().clamp(0, 1), x_labels),
        }
        if name.startswith("scones"):
            rows[name]["skip_levels"] = samplers[name]["skip_levels"]
            rows[name]["init"] = samplers[name]["init"]
    rows["target_floor"] = {"ffid": d["fid"]["target_floor"], "fkid": d["kid"]["target_floor"]["mean"]}
    for name, r in rows.items():
        print(name, json.dumps(r), flush=True)
    return rows


if __name__ == "__main__":
    main()
