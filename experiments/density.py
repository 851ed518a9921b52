r"""Density estimation with the learned plan: the ``density`` section of ``metrics.json`` and ``density_slice.png``.

The dual potentials define π̂(x, y) = H(x, y)·p(x)·q(y) (spec §1, §5e). When p and q have known densities the
evaluate stage reports (all under ``density``):

- calibration: ``mean_H`` = E_{p⊗q}[H] (= Z, the normaliser of π̂; 1 at the optimum) over all n² pairs of n
  source and n target samples, its standard error, and the marginal errors of the plan: for each x_i the
  Monte-Carlo ∫H(x_i, y) q(dy) ≈ mean_j H(x_i, y_j), which is 1 for a plan with marginal p, summarised by
  the mean / rms / max deviation from 1, and the same per y_j (``x_marginal``, ``y_marginal``).
  ``mc_noise_rms`` is the Monte-Carlo standard error of those means, the order of the deviation an exact plan
  shows (rows share the same y draws, so an exact plan's ``rms_dev`` fluctuates around it by a factor ≲ 2);
- when the plan π* is known (Gaussian pair, KL, squared-Euclidean cost: closed form), the Monte-Carlo
  KL(π* ‖ π̂) = E_{π*}[log π* − log π̂] on exact joint samples: ``kl`` for the normalised π̂/Z, ``kl_unnormalized``
  for the raw π̂ = H p q (can be negative), ``kl_generalized`` = kl_unnormalized + Z − 1 (the divergence between
  unnormalised measures, ≥ 0), ``kl_se`` its standard error, and ``kl_independent`` = KL(π* ‖ p⊗q) (the
  mutual information of π*, what H ≡ 1 would score), plus ``density_slice.png``: exact vs learned log-density
  on 2-D slices.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.evaluation import gaussian_truth
from scones.coupling import Coupling
from scones.data.distributions import Gaussian
from scones.ot.gaussian import GaussianConditional, entropic_conditional, entropic_joint_covariance

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class GaussianPlan:
    """The closed-form entropic plan π* = N((m_a, m_b), [[A, C], [Cᵀ, B]]) on R^d × R^d (float64)."""

    joint: Gaussian
    conditional: GaussianConditional
    source_cov: np.ndarray
    target_cov: np.ndarray
    dim: int
    params: dict  # gaussian_truth's dict: covariances, summed-cost λ, non-zero means

    @classmethod
    def from_truth(cls, truth: dict) -> GaussianPlan:
        """From :func:`experiments.evaluation.gaussian_truth`'s dict (covariances, means, summed-cost λ)."""
        a, b, lam = truth["source_cov"], truth["target_cov"], truth["lam"]
        cond = entropic_conditional(a, b, lam, truth.get("source_mean"), truth.get("target_mean"))
        joint = Gaussian(mean=np.concatenate([cond.mean_a, cond.mean_b]), cov=entropic_joint_covariance(a, b, lam))
        return cls(joint=joint, conditional=cond, source_cov=np.asarray(a), target_cov=np.asarray(b), dim=len(a),
                   params=dict(truth))

    @property
    def lam(self) -> float:
        """λ of the equivalent summed-cost problem."""
        return float(self.params["lam"])

    @property
    def has_mean(self) -> bool:
        """True when a marginal has a non-zero mean (BW-UVP then compares means too)."""
        return "source_mean" in self.params

    def arrays(self) -> dict[str, np.ndarray]:
        """The closed form's parameters as arrays (``samples.npz``: source_cov, target_cov, lam, means)."""
        return {k: np.asarray(v) for k, v in self.params.items()}

    @property
    def mutual_information(self) -> float:
        """KL(π* ‖ p⊗q) = ½ log(det A · det B / det Σ*), closed form."""
        logdet = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
        return 0.5 * float(logdet(self.source_cov) + logdet(self.target_cov) - logdet(self.joint.cov_np))

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log π*(x_i, y_i), float64 ``(n,)``."""
        return self.joint.log_prob(torch.cat([x.double(), y.double()], dim=1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact joint samples (x, y), float32 ``(n, d)`` each."""
        xy = self.joint.sample(n, generator=generator)
        return xy[:, : self.dim], xy[:, self.dim :]


def plan_truth(source, target, regularizer, cost) -> GaussianPlan | None:
    truth = gaussian_truth(source, target, regularizer, cost)
    return None if truth is None else GaussianPlan.from_truth(truth)


# --------------------------------------------------------------------------------------------- metrics


def _marginal_stats(means: torch.Tensor, h: torch.Tensor, dim: int) -> dict:
    dev = means - 1.0
    noise = h.std(dim) / math.sqrt(h.shape[dim])
    return {
        "mean_abs_dev": float(dev.abs().mean()),
        "rms_dev": float(dev.pow(2).mean().sqrt()),
        "max_abs_dev": float(dev.abs().max()),
        "mc_noise_rms": float(noise.pow(2).mean().sqrt()),
    }


@torch.no_grad()
def calibration(coupling: Coupling, n: int, generator: torch.Generator | None = None) -> dict:
    """E_{p⊗q}[H] and the marginal errors of the plan on all pairs of n source × n target samples.

    ``mean_H_se`` is the leading-order standard error of the two-sample U-statistic,
    sqrt(Var_i(r_i)/n + Var_j(c_j)/n) with r_i, c_j the row / column means of H.
    """
    x, y = coupling.source.sample(n, generator=generator), coupling.target.sample(n, generator=generator)
    h = coupling.log_compatibility(x, y, pairwise=True).double().exp().cpu()
    rows, cols = h.mean(1), h.mean(0)
    return {
        "mean_H": float(h.mean()),
        "mean_H_se": float(math.sqrt(rows.var() / n + cols.var() / n)),
        "x_marginal": _marginal_stats(rows, h, 1),
        "y_marginal": _marginal_stats(cols, h, 0),
        "n_pairs": n,
    }


@torch.no_grad()
def kl_to_truth(coupling: Coupling, truth: GaussianPlan, n: int, log_z: float, generator=None) -> dict:
    """Monte-Carlo KL(π* ‖ π̂) on n exact samples of π*; ``log_z`` = log E_{p⊗q}[H] normalises π̂."""
    x, y = truth.sample(n, generator=generator)
    delta = truth.log_prob(x, y) - coupling.log_density(x, y, normalized=False).cpu()
    kl_raw = float(delta.mean())
    return {
        "kl": kl_raw + log_z,
        "kl_unnormalized": kl_raw,
        "kl_generalized": kl_raw + math.exp(log_z) - 1.0,
        "kl_se": float(delta.std() / math.sqrt(n)),
        "kl_independent": truth.mutual_information,
        "n_kl": n,
    }


# --------------------------------------------------------------------------------------------- figure


def _top_directions(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh(cov)
    return v[:, ::-1][:, :k], np.sqrt(w[::-1][:k])


def _canonical_pair(truth: GaussianPlan) -> tuple[np.ndarray, np.ndarray, float]:
    """Directions a = A^{1/2}u, b = B^{1/2}v of the top canonical pair of π* and its correlation ρ.

    With K = A^{-1/2} C B^{-1/2} = U diag(ρ) Vᵀ, the whitened coordinates (s, t) of x = m_a + s·a,
    y = m_b + t·b have unit variances and correlation ρ₁ under π*.
    """
    from scones.ot.gaussian import sqrtm_psd

    d = truth.dim
    c = truth.joint.cov_np[:d, d:]
    a_half, b_half = sqrtm_psd(truth.source_cov), sqrtm_psd(truth.target_cov)
    u, rho, vt = np.linalg.svd(np.linalg.solve(a_half, np.linalg.solve(b_half, c.T).T))
    return a_half @ u[:, 0], b_half @ vt[0], float(rho[0])


def plot_density_slice(path: Path, coupling: Coupling, truth: GaussianPlan, grid: int = 100) -> None:
    """Exact vs learned (normalised) log-density of the plan on two 2-D slices, saved to ``path``.

    Top row, joint slice through the mean along the top canonical pair of π* (:func:`_canonical_pair`):
    x = m_a + s·a, y = m_b + t·b, (s, t) in standard deviations. Bottom row, conditional slice at x₀ = m_a + a:
    y = E[y | x₀] + s·w₁ + t·w₂, w₁, w₂ the top principal directions of π*(y | x₀) scaled by their standard
    deviations. Ranges ±3. Columns: exact, learned (normalised), learned − exact.
    """
    import matplotlib.pyplot as plt

    cond, d = truth.conditional, truth.dim
    a, b, rho = _canonical_pair(truth)
    vc, sc = _top_directions(cond.S, min(2, d))
    x0 = cond.mean_a + a
    s_ax = np.linspace(-3, 3, grid)
    ss, tt = (m.ravel() for m in np.meshgrid(s_ax, s_ax, indexing="xy"))
    slices = []
    x = cond.mean_a + ss[:, None] * a
    y = cond.mean_b + tt[:, None] * b
    slices.append((f"joint slice (ρ = {rho:.2f})", x, y, "x: top canonical direction", "y: top canonical direction"))
    if d >= 2:
        y = cond.mean(x0[None])[0] + (ss * sc[0])[:, None] * vc[:, 0] + (tt * sc[1])[:, None] * vc[:, 1]
        x = np.repeat(x0[None], len(ss), axis=0)
        slices.append(("conditional slice π(· | x₀)", x, y, "y · w₁ (top conditional direction)",
                       "y · w₂ (second conditional direction)"))

    fig, axes = plt.subplots(len(slices), 3, figsize=(13, 4 * len(slices)), squeeze=False)
    for row, (title, x, y, xlabel, ylabel) in zip(axes, slices, strict=True):
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        exact = truth.log_prob(xt, yt).numpy().reshape(grid, grid)
        learned = coupling.log_density(xt, yt, normalized=True).cpu().numpy().reshape(grid, grid)
        top = float(exact.max())
        diff = learned - exact
        lim = max(float(np.abs(diff[exact > top - 12.0]).max()), 1e-3)
        panels = (
            (exact, (top - 12.0, top), "viridis", f"{title}: exact log π*"),
            (learned, (top - 12.0, top), "viridis", "learned log π̂ / Z"),
            (diff, (-lim, lim), "RdBu_r", "learned − exact"),
        )
        for ax, (img, (lo, hi), cmap, name) in zip(row, panels, strict=True):
            im = ax.imshow(img, origin="lower", extent=(-3, 3, -3, 3), vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
            if name.startswith("learned log"):
                ax.contour(s_ax, s_ax, exact, levels=np.linspace(top - 12.0, top, 7)[:-1], colors="w",
                           linewidths=0.6)
            fig.colorbar(im, ax=ax, shrink=0.85)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(f"{xlabel} [sd]", fontsize=8)
            ax.set_ylabel(f"{ylabel} [sd]", fontsize=8)
    fig.suptitle(f"plan log-density, d = {d}, λ = {coupling.lam:g} (white: exact contours)", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.08, top=0.9, wspace=0.3, hspace=0.35)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- stage hook


def evaluate(opts, run_dir: Path, coupling: Coupling, truth: GaussianPlan | None, seed: int) -> dict | None:
    """The ``density`` section (None when p or q has no ``log_prob``); writes ``density_slice.png`` if π* is known.

    ``opts``: the ``eval.density`` settings ``{n_pairs, n_kl, grid}`` (defaults in ``configs/eval/default.yaml``).
    """
    if not coupling.has_density:
        return None
    g = torch.Generator().manual_seed(int(seed))
    t0 = time.perf_counter()
    out = calibration(coupling, int(opts.n_pairs), g)
    if truth is not None:
        z = out["mean_H"]
        log_z = math.log(z) if 0.0 < z < math.inf else math.nan  # degenerate potentials: report NaN, not crash
        out.update(kl_to_truth(coupling, truth, int(opts.n_kl), log_z, g))
        try:
            plot_density_slice(Path(run_dir) / "density_slice.png", coupling, truth, int(opts.grid))
        except Exception as e:  # a plot must never lose finished metrics
            log.warning("density slice plot failed: %s", e)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
