r"""Fréchet distance and KID in the feature space of a small network (offline image quality, no Inception).

For digit images the usual practice when Inception-v3 does not apply (16 px grey digits, no weights offline) is
to measure FID/KID in the feature space of a classifier trained on the data itself. Here the features are the
penultimate layer of the project's digit CNN (:class:`~scones.metrics.classifier.DigitClassifier`, the input of
its linear head), computed by torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with that
module as a custom ``feature`` extractor:

    FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2}),
    KID = unbiased MMD² with the kernel k(a, b) = (aᵀb / F + 1)³, averaged over random subsets.

Protocol (:func:`feature_distances`): the reference images (held out from everything the compared sets were
trained on) are split by a seeded permutation into two disjoint halves A and B. Every compared set is scored
against A with as many of its images as B has, so all FIDs share the same sample sizes and hence the same
finite-sample bias; FID(A, B) is the *floor*, the value images of the reference distribution itself get. Values
are averaged over several random splits. FID values are only comparable with the same feature network and the
same sample sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class PenultimateFeatures(nn.Module):
    """``(n, C, H, W)`` images in [0, 1] → the classifier's penultimate features ``(n, F)`` (``num_features`` F).

    Wraps a :class:`~scones.metrics.classifier.DigitClassifier` (its :meth:`embed`); the features do not depend
    on train/eval mode (the classifier's only dropout sits in the head, after them).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.num_features)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        dev = next(self.classifier.parameters()).device
        return self.classifier.embed(x.float().to(dev)).double()


def _fid(features: nn.Module, real: Tensor, fake: Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def _kid(features: nn.Module, real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int) -> dict:
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "KID will save all extracted features" (a few hundred small vectors here)
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from torch's global RNG: seed it, leave it
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std)}


def reference_halves(reference: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The two disjoint halves (A, B) of ``reference`` (seeded permutation; A has ``m // 2`` images)."""
    m = int(reference.shape[0])
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    return reference[perm[: m // 2]].float(), reference[perm[m // 2 :]].float()


def feature_distances(
    features: nn.Module,
    reference: Tensor,
    sets: Mapping[str, Tensor],
    n_splits: int = 10,
    kid_subsets: int = 50,
    seed: int = 0,
) -> dict:
    """FID and KID of each image set in ``sets`` against held-out ``reference`` images, plus the floor.

    For each of ``n_splits`` random splits of ``reference`` into halves A (``m // 2`` images, the reference
    statistics) and B (:func:`reference_halves`), every set is scored against A with a random subset of as many of
    its images as B has (all of them if it has fewer), and B itself gives the floor; the values are averaged over
    the splits (with a few hundred reference images one split is noisy).

    Args:
        features: module ``(n, C, H, W) -> (n, F)`` with a ``num_features`` attribute (e.g.
            :class:`PenultimateFeatures`).
        reference: ``(m, C, H, W)`` images of the target distribution none of the compared sets was trained on.
        sets: name → images ``(n, C, H, W)`` in [0, 1] (values are clamped to [0, 1], as the classifier
            scores them).
        n_splits: number of random half splits averaged over.
        kid_subsets: random subsets (each half the smaller set) KID averages over, per split.
        seed: seeds the splits, the subsets of each set and KID's subsets.

    Returns:
        ``{"fid": {name: mean FID, "target_floor": mean FID(A, B)}, "kid": {name: {"mean", "std"}, ...},
        "n_reference": len(A), "n_per_set": len(B), "n_splits", "features": F}``; a KID ``std`` is the mean over
        splits of the spread over KID's subsets.
    """
    m = int(reference.shape[0])
    if m < 4:
        raise ValueError(f"feature FID needs at least 4 held-out reference images, got {m}")
    if n_splits < 1:
        raise ValueError(f"feature FID: n_splits must be >= 1, got {n_splits}")
    for name, images in sets.items():
        if images.shape[0] < 2:
            raise ValueError(f"feature FID: set {name!r} has {images.shape[0]} images; at least 2 are needed")
    names = [*sets, "target_floor"]
    fid_runs: dict[str, list[float]] = {k: [] for k in names}
    kid_runs: dict[str, list[dict]] = {k: [] for k in names}
    g = torch.Generator().manual_seed(seed)
    for r in range(n_splits):
        half_a, half_b = reference_halves(reference, seed + r)
        n_b = int(half_b.shape[0])
        for name in names:
            if name == "target_floor":
                images = half_b
            else:
                images = sets[name]
                keep = torch.randperm(images.shape[0], generator=g)[:n_b]
                images = images[keep].float().clamp(0.0, 1.0)
            fid_runs[name].append(_fid(features, half_a, images))
            size = max(2, min(half_a.shape[0], images.shape[0]) // 2)
            kid_runs[name].append(_kid(features, half_a, images, kid_subsets, size, seed + r))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {
        "fid": {k: mean(v) for k, v in fid_runs.items()},
        "kid": {k: {"mean": mean([d["mean"] for d in v]), "std": mean([d["std"] for d in v])}
                for k, v in kid_runs.items()},
        "n_reference": m // 2, "n_per_set": m - m // 2, "n_splits": int(n_splits),
        "features": int(features.num_features),
    }


__all__ = ["PenultimateFeatures", "feature_distances", "reference_halves"]
