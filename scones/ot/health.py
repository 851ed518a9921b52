r"""Health of learned dual potentials: how far the plan they define is from having the right marginals.

``E_{p⊗q}[H]`` on independent pairs (``dual.mean_H``) is the classic check, but at a small λ (or a high
dimension) H is so heavy-tailed that its batch mean says nothing: with λ = 1 at d = 16 one pair in ~10⁶
carries the mass, and the same holds for any estimator that re-weights independent samples by H (the
self-normalised marginals of the plan on fresh samples included; :func:`self_normalised_marginals` reports
their effective sample size so that this can be seen).

**Moment marginals (KL, squared cost) — the primary signal.** For the KL plan with c(x, y) = s‖x − y‖²,
differentiating φ(x) = −λ log E_q[exp((ψ(y) − c(x, y))/λ)] gives, for every x (no sampling of the plan):

    E[y | x] = T_φ(x) := x − ∇φ(x)/(2s),        Cov[y | x] = (λ/2s) ∇T_φ(x),

and symmetrically E[x | y] = T_ψ(y) = y − ∇ψ(y)/(2s), Cov[x | y] = (λ/2s) ∇T_ψ(y). By the law of total
covariance the plan's marginals therefore have the moments

    mean_y = E_p[T_φ],   Cov_y = Cov_p(T_φ) + (λ/2s) E_p[∇T_φ]      (must be those of q)
    mean_x = E_q[T_ψ],   Cov_x = Cov_q(T_ψ) + (λ/2s) E_q[∇T_ψ]      (must be those of p)

computed from fresh samples of one side only, at any λ and d. :func:`moment_marginal_violation` compares
them with the empirical moments of fresh samples of the other side in BW-UVP units (Bures–Wasserstein
distance of the Gaussians with those moments over half the total variance — the unit of the Gaussian
benchmark), and returns the sampling noise of that comparison (two independent halves of the fresh samples
compared the same way), so that "converged" can be read as "violation within a few noise levels".
ψ's side is the one the SCONES sampler uses (∇ψ); φ's side checks the pair's consistency.

The identities need φ (ψ) to be the soft c-transform of its partner, which holds at the optimum; a pair that is
not optimal fails them. They are moment checks: a plan with the right first two marginal moments but wrong
higher ones passes (for Gaussian pairs the moments are the whole story).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from scones.ot.gaussian import sqrtm_psd


def _flat(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1)


def potential_map_moments(
    potential: Callable[[Tensor], Tensor], z: Tensor, lam: float, cost_scale: float = 1.0, jacobian: bool = True,
    block: int = 1024,
) -> tuple[np.ndarray, np.ndarray | float]:
    """Mean and covariance of the other marginal implied by one KL potential u (φ or ψ), from samples ``z`` of its side.

    T(z) = z − ∇u(z)/(2s), Cov = Cov(T) + (λ/2s)·mean sym ∇T (``jacobian=True``, d autograd passes per block);
    with ``jacobian=False`` only the trace of the covariance is returned (a float; Hutchinson estimate of
    tr ∇T with one Rademacher probe per sample), for large images.
    """
    d = _flat(z).shape[1]
    ts, jac_sum, tr_sum = [], np.zeros((d, d)), 0.0
    for zb in z.split(block):
        with torch.enable_grad():
            zg = zb.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(potential(zg).sum(), zg, create_graph=True)
            t = _flat(zg) - _flat(grad) / (2.0 * cost_scale)
            if jacobian:
                rows = []
                for k in range(d):  # row k of ∇T summed over the block: Σ_i ∂T_k(z_i)/∂z_i
                    (gk,) = torch.autograd.grad(t[:, k].sum(), zg, retain_graph=k < d - 1)
                    rows.append(_flat(gk).sum(0))
                jac_sum += torch.stack(rows).double().numpy()
            else:
                probe = torch.randint(0, 2, zg.shape, dtype=zg.dtype).mul_(2).sub_(1)
                (gp,) = torch.autograd.grad((t * _flat(probe)).sum(), zg)
                tr_sum += float((_flat(gp) * _flat(probe)).sum())
        ts.append(t.detach().double())
    t = torch.cat(ts).numpy()
    n = t.shape[0]
    mean = t.mean(0)
    factor = lam / (2.0 * cost_scale)
    if jacobian:
        j = jac_sum / n
        cov = np.cov(t, rowvar=False).reshape(d, d) + factor * 0.5 * (j + j.T)
        return mean, cov
    return mean, float(np.sum(t.var(0, ddof=1)) + factor * tr_sum / n)


def _moment_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """BW-UVP-style distance of (mean_a, cov_a) to the reference (mean_b, cov_b): [½‖Δm‖² + BW²] / (½ tr cov_b).

    With traces only (floats) the Bures term becomes ½(√tr_a − √tr_b)²·… its 1-d analogue per unit of variance.
    """
    dm = 0.5 * float(np.sum((np.asarray(mean_a) - np.asarray(mean_b)) ** 2))
    if np.ndim(cov_a) == 0:
        ta, tb = max(float(cov_a), 0.0), float(cov_b)
        return (dm + 0.5 * (math.sqrt(ta) - math.sqrt(tb)) ** 2) / (0.5 * tb)
    cov_a = 0.5 * (cov_a + cov_a.T)
    w, v = np.linalg.eigh(cov_a)
    cov_a = (v * np.clip(w, 0.0, None)) @ v.T  # an unconverged pair can give an indefinite estimate
    root = sqrtm_psd(cov_b)
    bw = 0.5 * (np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(sqrtm_psd(root @ cov_a @ root)))
    return (dm + max(float(bw), 0.0)) / (0.5 * float(np.trace(cov_b)))


def _moments(z: np.ndarray, full: bool):
    d = z.shape[1]
    return z.mean(0), (np.cov(z, rowvar=False).reshape(d, d) if full else float(z.var(0, ddof=1).sum()))


def moment_marginal_violation(
    pot, x: Tensor, y: Tensor, jacobian: bool | None = None
) -> dict:
    """Marginal violation of the KL plan of ``pot`` (``phi``, ``psi``, ``cost``, ``regularizer``) from fresh samples.

    Returns ``{"y_from_phi", "x_from_psi", "violation", "noise"}``: the two BW-UVP-unit distances of the implied
    marginal moments to those of the fresh samples (module docstring), their maximum, and the noise level of the
    comparison (the same distance between the empirical moments of the two halves of each fresh sample; the
    larger of the two sides). ``jacobian=None``: full covariances up to dimension 128, traces above.
    """
    if getattr(pot.regularizer, "name", None) != "kl":
        raise ValueError(f"moment marginals need the KL regulariser; got {pot.regularizer!r}")
    lam = float(pot.regularizer.lam)
    d = _flat(x).shape[1]
    full = d <= 128 if jacobian is None else bool(jacobian)
    s = float(pot.cost.scale(x))
    xs, ys = _flat(x).double().numpy(), _flat(y).double().numpy()
    out = {}
    for key, fn, z, ref in (("y_from_phi", pot.phi, x, ys), ("x_from_psi", pot.psi, y, xs)):
        m, c = potential_map_moments(fn, z, lam, s, jacobian=full)
        out[key] = _moment_distance(m, c, *_moments(ref, full))
    noise = 0.0
    for ref in (xs, ys):
        h = ref.shape[0] // 2
        noise = max(noise, _moment_distance(*_moments(ref[:h], full), *_moments(ref[h : 2 * h], full)))
    out["violation"] = max(out["y_from_phi"], out["x_from_psi"])
    out["noise"] = noise
    return out


@torch.no_grad()
def self_normalised_marginals(pot, x: Tensor, y: Tensor) -> dict:
    """Marginals of the self-normalised plan on fresh samples, any regulariser.

    Row-normalised plan w_ij = H_ij / Σ_k H_ik (each x_i's conditional over the fresh y's): its column masses
    m·mean_i w_ij must be 1 (the y-marginal is q); likewise for the column-normalised plan and the x-marginal.
    Returns ``{"tv", "ess"}``: the mean of the two total-variation distances of these masses to uniform, and the
    median effective sample size 1/Σ_j w_ij² of the rows. The TV is meaningful only when ``ess`` ≫ 1; with
    ess ≈ 1 (sharp plan, e.g. KL λ = 1 at d = 16) it is ≈ 1 even for the exact potentials.
    """
    from scones.ot.dual import violation_matrix

    v = violation_matrix(pot, x, y).double()
    log_h = pot.regularizer.log_density(v) if pot.regularizer.name == "kl" else torch.log(pot.regularizer.density(v))
    n, m = log_h.shape
    w_row = torch.softmax(log_h, 1)
    w_col = torch.softmax(log_h, 0)
    tv_y = 0.5 * float((w_row.sum(0) * m / n - 1).abs().mean())
    tv_x = 0.5 * float((w_col.sum(1) * n / m - 1).abs().mean())
    ess = 1.0 / w_row.pow(2).sum(1)
    ess = ess[torch.isfinite(ess)]
    return {"tv": 0.5 * (tv_x + tv_y), "ess": float(ess.median()) if ess.numel() else 0.0}


HEALTH_FACTOR = 2.0  # KL: converged when the violation is within this many noise levels


def dual_health(pot, x: Tensor, y: Tensor, factor: float = HEALTH_FACTOR) -> dict:
    """The dual's convergence diagnostic on fresh samples ``x`` ~ p, ``y`` ~ q (``metrics.json`` ``dual.*``).

    - KL (neural or Online Sinkhorn potentials): ``health`` = :func:`moment_marginal_violation` (BW-UVP units),
      ``converged`` = health ≤ ``factor`` × ``noise``; ``method="moments"``.
    - other regularisers (χ²): ``health`` = the self-normalised marginal TV of :func:`self_normalised_marginals`,
      ``converged`` = tv ≤ 2/√ess + 0.05 (the level exact potentials reach) when ess ≥ 10, else ``None`` (the plan is
      too sharp for a sample check); ``method="self_normalised"``.

    Both report ``ess`` and ``tv`` of the self-normalised check (how sharp the plan is on these samples).
    """
    sn = self_normalised_marginals(pot, x, y)
    if getattr(pot.regularizer, "name", None) == "kl" and hasattr(pot.cost, "scale"):
        m = moment_marginal_violation(pot, x, y)
        return {
            "method": "moments", "health": m["violation"], "noise": m["noise"], "threshold": factor * m["noise"],
            "converged": bool(m["violation"] <= factor * m["noise"]), "y_from_phi": m["y_from_phi"],
            "x_from_psi": m["x_from_psi"], "tv": sn["tv"], "ess": sn["ess"], "n": int(x.shape[0]),
        }
    threshold = 2.0 / math.sqrt(max(sn["ess"], 1e-12)) + 0.05
    return {
        "method": "self_normalised", "health": sn["tv"], "threshold": threshold,
        "converged": None if sn["ess"] < 10 else bool(sn["tv"] <= threshold), "tv": sn["tv"], "ess": sn["ess"],
        "n": int(x.shape[0]),
    }
