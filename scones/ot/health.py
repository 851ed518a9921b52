r"""Health of learned dual potentials: is the plan they define the entropic OT plan between p and q?

``E_{p⊗q}[H]`` on independent pairs (``dual.mean_H``) says nothing at a small λ (H is heavy-tailed). Two checks
on fresh samples x_i ~ p (n), y_j ~ q (m) replace it; :func:`dual_health` combines them.

**Marginal check (primary; any regulariser; ψ only).** The plan's conditional, as a re-weighting of the
fresh target samples, has row-normalised weights w_ij ∝ H(x_i, y_j) over j: for KL
w_ij = softmax_j((ψ(y_j) − c(x_i, y_j))/λ), for χ² w_ij ∝ relu(φ̃_i + ψ(y_j) − c(x_i, y_j)) with φ̃_i the
normalising constant (found by sorting). φ is *implied* (its soft c-transform of ψ), never evaluated: the
check sees exactly what the SCONES sampler uses, ∇_y log H = function of ψ. The x-marginal of this plan is p
by construction; its y-marginal, as a re-weighting of the y_j, is b_j = (1/n) Σ_i w_ij, which must be
uniform (m·b_j = 1: the density ratio of the plan's y-marginal to q) if ψ is optimal. The statistic is

    V = (1/m) Σ_j (m·b_j − 1)²   = χ²(b ‖ uniform),

the squared relative error of the plan's y-marginal (√V = its rms; −λ·log(m·b_j) is the Sinkhorn update
that ψ still needs at y_j). Even the exact ψ gives V > 0 on finite samples; its noise level is N = N_x + N_y:

- N_x = (1/m) Σ_j Var_i(m·w_ij)/n, the sources: given the y's, m·b_j is a mean over iid rows, and N_x is the
  exact (unbiased) variance of that mean, averaged over j;
- N_y, the finite pool of y's in each row's normaliser. With u_ij = exp(…)/Z(x_i) (population normaliser) and
  ε_i = Ẑ_i/Z_i − 1 = (1/m) Σ_k (u_ik − 1), to first order m·b_j = (1/n) Σ_i u_ij − (1/m) Σ_k (K_jk − c_j) with
  K_jk = (1/n) Σ_i u_ij u_ik and c_j = (1/n) Σ_i u_ij. The terms k ≠ j have mean 0 over the pool (E_y u = 1)
  and variance Var_k(K_jk)/m; the term k = j is y_j's own share of the normalisers, a bias −(K_jj − c_j)/m.
  N_y = (1/m) Σ_j [Var_{k≠j}(K_jk)/m + ((K_jj − c_j)/m)²], with K estimated from the weights (an m × m
  product, on at most ``pool_columns`` columns j). At ESS ≈ 1 the bias term dominates and ≈ (1 + V)/ESS.

Calibration with the closed-form Gaussian potentials (d ∈ {2, 16, 64} × λ ∈ {1, d/4, 2d} and d = 2, λ = ½;
5 draws each of n = m = 2000): V/N ∈ [0.37, 1.32], ≈ 1 where the plan is broad and 0.5–0.75 where it is sharp
(the first-order bias term over-counts there). The exact ψ* of the mixture benchmark (ψ* = λ(log g − log p1),
p1 by Monte Carlo; D ∈ {2, 16, 64}, 6 cells) gives V/N ∈ [0.35, 1.42], a POT reference ψ on the Swiss roll 1.2
(docs/results.md, "Dual health"). **Verdict:** ``passes`` = V ≤ 2·N + τ: 2N is 1.4× the largest null ratio
measured; τ = 0.01 is the size below which a violation cannot matter — for any statistic f,
(E_π f − E_q f)² ≤ χ²(π_Y ‖ q)·Var_q f (Cauchy–Schwarz), so χ² ≤ 0.01 puts every mean of the plan's
y-marginal within 0.1 standard deviation of q's, an error ≤ 1 % in the variance units of (c)BW-UVP, below the
benchmark floors. Without τ the check flags
duals whose marginals are off by 2 % rms (mixture D = 2: SCONES at its floor). The noise grows with the
violation on a sharp plan (N_y ≈ (1 + V)/ESS), so there a violation cannot fail: ``detectable`` is the smallest
one the check would flag, V_min = (2(N_x + a) + τ)/(1 − 2a) with a = N_y/(1 + V) (none when 2a ≥ 1); when a
violation of χ² = 1 (the plan's y-marginal off by 100 % rms) would still pass, V_min > 1 and the check
**cannot judge** (``passes = None``), not "unconverged". That happens when the rows' ESS is ≲ 4 on the fresh
samples (e.g. Gaussian d = 16, λ ≤ 4 at n = 2000), where the moment check takes over.

**Moment marginals (fallback; KL, squared cost).** For the KL plan with c(x, y) = s‖x − y‖², differentiating
φ(x) = −λ log E_q[exp((ψ(y) − c(x, y))/λ)] gives, for every x (no sampling of the plan):

    E[y | x] = T_φ(x) := x − ∇φ(x)/(2s),        Cov[y | x] = (λ/2s) ∇T_φ(x),

and symmetrically E[x | y] = T_ψ(y) = y − ∇ψ(y)/(2s), Cov[x | y] = (λ/2s) ∇T_ψ(y). By the law of total
covariance the plan's marginals therefore have the moments

    mean_y = E_p[T_φ],   Cov_y = Cov_p(T_φ) + (λ/2s) E_p[∇T_φ]      (must be those of q)
    mean_x = E_q[T_ψ],   Cov_x = Cov_q(T_ψ) + (λ/2s) E_q[∇T_ψ]      (must be those of p)

computed from fresh samples of one side only, at any λ and d — so it still works where the marginal check
cannot judge (sharp plans). :func:`moment_marginal_violation` compares them with the empirical moments of
fresh samples of the other side in BW-UVP units (Bures–Wasserstein distance of the Gaussians with those
moments over half the total variance) and returns the sampling noise of that comparison (two independent
halves of the fresh samples compared the same way). The identities need φ (ψ) to be the soft c-transform of
its partner, which holds at the optimum; they multiply curvature errors of the potentials by λ/(2s), so at a
large λ they flag errors that do not matter for the plan (mixture benchmark, ε = 10: moment violation 0.84 at
D = 2 and 3.4 at D = 16 for duals whose plan's y-marginal is within 2 % rms of q) — hence only the fallback,
where the plan is sharp (λ small against the data's scale) and that factor is small. They are moment checks:
a plan with the right first two moments but wrong higher ones passes.
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




def _chi2_row_weights(t: Tensor, lam: float) -> Tensor:
    """Row-normalised χ² plan weights w_ij ∝ relu(φ̃_i + t_ij), t_ij = ψ(y_j) − c(x_i, y_j), with φ̃_i the
    normaliser mean_j H = 1, i.e. Σ_j relu(φ̃_i + t_ij) = 2λm (the largest k with t_(k) > (S_k − 2λm)/k is
    the number of active y's, S_k the sum of the k largest t's)."""
    m = t.shape[1]
    ts, _ = torch.sort(t, dim=1, descending=True)
    k = torch.arange(1, m + 1, dtype=t.dtype, device=t.device)
    cand = (2.0 * lam * m - torch.cumsum(ts, 1)) / k
    active = (ts + cand > 0).sum(1, keepdim=True).clamp_min(1)
    phi = cand.gather(1, active - 1)
    h = torch.relu(phi + t)
    return h / h.sum(1, keepdim=True)


def row_weights(pot, x: Tensor, psi_y: Tensor, y: Tensor) -> Tensor:
    """The plan's conditionals of the sources ``x`` (b) as weights over the fresh targets ``y`` (m), shape (b, m),
    rows summing to 1 (float64): KL softmax_j((ψ_j − c_ij)/λ), χ² the relu weights with the implied φ."""
    t = psi_y[None, :] - pot.cost.pairwise(x, y).double()
    name = getattr(pot.regularizer, "name", None)
    lam = float(pot.regularizer.lam)
    if name == "kl":
        return torch.softmax(t / lam, 1)
    if name == "chi2":
        return _chi2_row_weights(t, lam)
    raise ValueError(f"the marginal check knows the kl and chi2 regularisers; got {pot.regularizer!r}")


MARGINAL_FACTOR = 2.0  # passes when V ≤ this × its noise + MARGINAL_TOLERANCE (module docstring)
MARGINAL_TOLERANCE = 0.01  # χ² below which a violation is harmless: every mean within 0.1 std of q's
MAX_DETECTABLE = 1.0  # cannot judge when a violation V = χ² of this size would still pass


@torch.no_grad()
def marginal_violation(
    pot, x: Tensor, y: Tensor, factor: float = MARGINAL_FACTOR, tolerance: float = MARGINAL_TOLERANCE,
    max_detectable: float = MAX_DETECTABLE, block: int = 256, pool_columns: int = 2048,
) -> dict:
    """The y-marginal check of the plan implied by ψ on fresh samples ``x`` ~ p (n) and ``y`` ~ q (m) (module
    docstring). Rows are processed in blocks of ``block`` sources (memory ``block × m``).

    Returns ``violation`` (V = χ² of the plan's y-marginal against q on the y's), ``noise`` (N = N_x + N_y) with
    its parts ``noise_sources``/``noise_pool``, ``threshold`` (factor·N + tolerance), ``detectable`` (the smallest
    V that would fail; ``None`` when none would), ``excess_rms`` (√max(V − N, 0): the rms relative error of the plan's
    y-marginal beyond the noise), ``passes`` (True / False / None = cannot judge), and the rows' effective
    sample sizes ``ess`` (median), ``ess_hm`` (harmonic mean), ``ess_p10`` (10 % quantile); ``n``, ``m``.
    """
    n, m = int(x.shape[0]), int(y.shape[0])
    if n < 2 or m < 2:
        raise ValueError(f"the marginal check needs at least 2 samples per side, got n={n}, m={m}")
    psi_y = pot.psi(y).double().reshape(m)
    cols = torch.arange(m, device=psi_y.device)
    if m > pool_columns:  # the pool term on a fixed subset of columns (memory pool_columns × m)
        cols = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:pool_columns].to(psi_y.device)
    col = torch.zeros(m, dtype=torch.float64, device=psi_y.device)
    col_sq, ess = torch.zeros_like(col), []
    kernel = torch.zeros(len(cols), m, dtype=torch.float64, device=psi_y.device)
    for xb in x.split(block):
        w = row_weights(pot, xb, psi_y, y)
        col += w.sum(0)
        col_sq += w.pow(2).sum(0)
        kernel += w[:, cols].T @ w
        ess.append(1.0 / w.pow(2).sum(1))
    ess = torch.cat(ess)
    mb = m * col / n
    v = float((mb - 1).pow(2).mean())
    n_x = float((m**2 / (n * (n - 1)) * (col_sq - col.pow(2) / n)).clamp_min(0).mean())
    # K_jk = (1/n) Σ_i (m w_ij)(m w_ik): column j's share of the rows' normalisers (module docstring)
    kernel *= m**2 / n
    diag = kernel[torch.arange(len(cols)), cols]
    off_sum = kernel.sum(1) - diag
    off_var = (kernel.pow(2).sum(1) - diag.pow(2)) / (m - 1) - (off_sum / (m - 1)).pow(2)
    n_y = float((off_var.clamp_min(0) / m).mean() + ((diag - mb[cols]) / m).pow(2).mean())
    noise = n_x + n_y
    threshold = factor * noise + tolerance
    a = n_y / (1.0 + v)  # the pool term grows like (1 + V): the smallest V that fails solves V = 2(N_x + a(1 + V)) + τ
    detectable = (factor * (n_x + a) + tolerance) / (1.0 - factor * a) if factor * a < 1 else None
    if v > threshold:
        passes = False
    elif detectable is None or detectable > max_detectable:
        passes = None
    else:
        passes = True
    return {
        "violation": v, "noise": noise, "noise_sources": n_x, "noise_pool": n_y, "threshold": threshold,
        "detectable": detectable, "excess_rms": math.sqrt(max(v - noise, 0.0)), "passes": passes,
        "ess": float(ess.median()), "ess_hm": float(1.0 / (1.0 / ess).mean()),
        "ess_p10": float(torch.quantile(ess, 0.1)), "n": n, "m": m,
    }


HEALTH_FACTOR = 2.0  # moments (fallback): converged when the violation is within this many noise levels


def dual_health(pot, x: Tensor, y: Tensor, factor: float = HEALTH_FACTOR, moments: bool | None = None) -> dict:
    """The dual's convergence diagnostic on fresh samples ``x`` ~ p, ``y`` ~ q (``metrics.json`` ``dual.*``).

    ``health`` is the marginal check's V (:func:`marginal_violation`, any regulariser) and ``converged`` its
    verdict; where it cannot judge (a plan too sharp for n, m fresh samples) the moment check
    (:func:`moment_marginal_violation`, KL with a squared cost) decides: converged = its violation ≤ ``factor``
    × its noise; with neither, ``converged`` is ``None``. ``method`` names the deciding check (``marginal``,
    ``moments`` or ``none``); ``health``/``noise``/``threshold`` are the deciding check's (the marginal check's
    when none decides), ``ess`` the median ESS of the marginal check's rows; ``marginal`` and ``moments`` hold both
    checks' full results. ``moments=None`` computes the moment check
    whenever it applies (KL, squared cost), ``False`` only when the marginal check cannot judge.
    """
    mg = marginal_violation(pot, x, y)
    out = {
        "method": "marginal", "health": mg["violation"], "noise": mg["noise"], "threshold": mg["threshold"],
        "converged": mg["passes"], "ess": mg["ess"], "n": int(x.shape[0]), "marginal": mg,
    }
    applies = getattr(pot.regularizer, "name", None) == "kl" and hasattr(pot.cost, "scale")
    if applies and (moments or (moments is None) or mg["passes"] is None):
        try:
            mo = moment_marginal_violation(pot, x, y)
        except Exception as e:  # noqa: BLE001 - an extra number must not cost the marginal verdict
            if mg["passes"] is None:
                raise
            out["moments"] = {"error": f"{type(e).__name__}: {e}"}
            return out
        mo["threshold"] = factor * mo["noise"]
        mo["passes"] = bool(mo["violation"] <= mo["threshold"])
        out["moments"] = mo
        if mg["passes"] is None:
            out["method"], out["converged"] = "moments", mo["passes"]
            out["health"], out["noise"], out["threshold"] = mo["violation"], mo["noise"], mo["threshold"]
    elif mg["passes"] is None:
        out["method"] = "none"
    return out
