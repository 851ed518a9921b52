r"""Settings chosen from the problem: λ, the dimension and the data scale (config values ``auto``).

A user who changes only λ or d must get a converged dual and a usable sampler without tuning. Every rule below
is a plain function of a :class:`ProblemScale` (no Hydra); the pipeline resolves the config values that are
``auto`` with :func:`resolve_auto`, logs them, writes them into the run's ``config.yaml`` and ``metrics.json``
(``auto``), and any explicit value overrides its rule.

Notation: s = the cost's scale (c = s‖x − y‖²: 1 for the summed cost, 1/D for the mean cost), v_min, v̄, v_max
the smallest, mean and largest variance of the target q along its principal axes (estimated from samples), d
the dimension. For the KL plan with the squared cost the conditional π(y | x) has precision ≈ Σ_q⁻¹ + (2s/λ)·I
(the ψ term changes it by O(1), exactly so for Gaussian pairs), hence

- stiffness of the conditional score  L = 1/v_min + 2s/λ,
- its largest variance               v_c = 1/(1/v_max + 2s/λ),
- sharpness of the plan              κ = 2s·v̄/λ (target variance over the conditional one; κ ≫ 1: sharp),
- information of the plan            I = (d/2)·log(1 + κ) nats, the scale of the mutual information of x and y
                                     under π (Gaussian benchmark pair 0, I / exact: 80 / 72 at d = 64, λ = 1;
                                     20 / 19 at d = 16, λ = 1; 17 / 8.5 at d = 64, λ = 16).

Rules:

================== ====================================================================================
dual.estimator     ``langevin`` for KL when I > 28 nats (≈ 2·log of the 10⁶ pairs of a batch: no pair of a batch is a
                   plausible plan pair, the weighted-pairs estimate is biased, even the exact potentials are not its
                   fixed point; the semi-dual gradient from conditional Langevin chains instead, scones.ot.dual);
                   ``pairs`` otherwise (measured: converged at I = 17 (d = 64, λ = 16) and 20 (d = 16, λ = 1));
                   mixture benchmark D = 64, ε = 0.1 (I ≈ 48, on the learned DSM score; asked there as ``auto``):
                   moment check 0.151 → 0.048 (threshold 0.069), cBW-UVP 5.90 → 1.30 %
dual.langevin.step_size  the rule of ``sampler.step_size`` (the chains are the sampler's)
dual.langevin.burn_in    ⌈4·v_c/h⌉ rounded up to 10, before a chain (started at the conditional mean) counts;
                   the chains used (ages burn_in … 3·burn_in) lack ≤ 1 % of the widest exact conditional
                   variance at d = 64, λ = 1, where ψ's curvature makes it 2.3× v_c
dual.objective     ``logmeanexp`` for KL (shift-invariant: no vanishing gradient when H ≈ 0 at the start
                   of training at a small λ; then E[H] = 1 by calibration), ``dual`` otherwise
dual.pairs         ``rows`` for KL when d > 16 and I ≤ 28 nats (the batch semi-dual: ψ's gradient from each source's
                   row of batch weights normalised, so an error of the φ network cannot bias it; mixture benchmark
                   D = 64, ε = 1: the plan's y-marginal χ² 8.4 → 0.17 (exact ψ* 0.18 on the same draws), cBW-UVP
                   13.2 → 6.4 %; ε = 10 with the learning rate below: 0.17 → 0.008), ``all`` otherwise (the rows'
                   self-normalisation is biased by O(1/ESS) of a batch row: beyond 28 nats the ``langevin``
                   estimator; d ≤ 16: what the mixture cells were measured with)
dual.lr            3e-3 with ``dual.pairs=rows`` (ε = 10 at D = 64: V 0.028 at 1e-3, 0.008 at 3e-3, same 2000 steps),
                   1e-3 with the paper's ``dual`` objective (the dual group's default, what the mixture cells use),
                   3e-4 otherwise (``logmeanexp``: the Gaussian cells)
dual.batch_size    500 when κ ≤ 4; 1000 when κ > 4 (a sharp plan: the n² pairs of a batch carry little
                   mass, more pairs lower the estimator's bias)
dual.steps         3000·max(1, d/16)^½, rounded up to 500; 2000 with ``dual.estimator=langevin`` (plan samples:
                   no heavy-tailed weights to average out)
dual.lr_schedule   ``cosine`` for d > 16 (the learning rate decays to 0: the late small steps average the
                   heavy-tailed minibatch gradient of a plan whose batch pairs carry almost no mass; mixture
                   benchmark D = 64, ε = 0.1: relative error of ∇log H 0.56 → 0.47, cBW-UVP 12.0 → 6.2 %),
                   ``constant`` for d ≤ 16 (what the mixture cells there were measured with)
sampler.step_size  ULA step h = 0.05/L (stable and with a stationary bias of ~h·L/2 = 2.5 % of the
                   smallest conditional variance)
sampler.n_steps    max(1000, ⌈8·v_c/h⌉): the slowest direction relaxes as exp(−2·n·h/v_c) from the
                   BP initialisation
eval.n_samples     2000 for d ≤ 16, else 10000·d/64 rounded up to 1000 (the BW-UVP floor of n samples
                   grows like d/n: ≈ 0.0037 at d = 16, n = 2000 and ≈ 0.0028 at d = 64, n = 10⁴)
bp.estimator       ``potential`` for KL with a squared cost (regress T(x) on the conditional mean
                   x − ∇φ(x)/(2s) implied by φ), ``seguy`` otherwise
sampler.refine     ``ess`` for d > 16, ``all`` for d ≤ 16 (with ``init: resample``): above d = 16 each chain
                   runs the share min(1, max(k, 100)/ESS) of the Langevin schedule, k its input's
                   chains, ESS the effective sample size of the resampling weights
                   (:func:`scones.sampling.settings.refine_fraction`). Where the pool already gives nearly
                   independent draws of the learned plan the learned score can only move them away; at
                   d = 64 its DSM error is 0.13–0.26 relative (1.0 at σ = 0.01), and the full refinement
                   costs +1.4 points of cBW-UVP at ε = 10 (starts 1.24 %, refined 2.63 %; sharp ε = 0.1:
                   ESS ≈ 1, unchanged). d ≤ 16 keeps the full refinement its mixture cells were measured
                   with (docs/results.md)
================== ====================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

AUTO = "auto"
KEYS = (
    "dual.estimator", "dual.langevin.step_size", "dual.langevin.burn_in", "dual.objective", "dual.pairs", "dual.lr",
    "dual.batch_size", "dual.steps", "dual.lr_schedule", "sampler.step_size", "sampler.n_steps",
    "eval.n_samples", "bp.estimator", "sampler.refine",
)  # fmt: skip


@dataclass(frozen=True)
class ProblemScale:
    """What the rules look at. ``regularizer`` is ``"kl"`` or ``"chi2"``; ``cost_scale`` is s in c = s‖x − y‖²."""

    dim: int
    lam: float
    cost_scale: float
    regularizer: str
    var_min: float
    var_mean: float
    var_max: float

    @property
    def stiffness(self) -> float:
        return 1.0 / self.var_min + 2.0 * self.cost_scale / self.lam

    @property
    def conditional_var_max(self) -> float:
        return 1.0 / (1.0 / self.var_max + 2.0 * self.cost_scale / self.lam)

    @property
    def sharpness(self) -> float:
        return 2.0 * self.cost_scale * self.var_mean / self.lam

    @property
    def information(self) -> float:
        return 0.5 * self.dim * math.log1p(self.sharpness)

    def as_dict(self) -> dict:
        return {**asdict(self), "stiffness": self.stiffness, "conditional_var_max": self.conditional_var_max,
                "sharpness": self.sharpness, "information": self.information}  # fmt: skip


def target_variances(y: np.ndarray, max_eig_dim: int = 512) -> tuple[float, float, float]:
    """(v_min, v̄, v_max) of samples ``y`` (n, ...): eigenvalues of the sample covariance up to ``max_eig_dim``
    coordinates, per-coordinate variances above (images)."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if y.shape[1] <= max_eig_dim:
        w = np.linalg.eigvalsh(np.atleast_2d(np.cov(y, rowvar=False)))
    else:
        w = y.var(0, ddof=1)
    w = np.clip(w, 1e-12, None)
    return float(w.min()), float(w.mean()), float(w.max())


def problem_scale(target_samples, lam: float, cost_scale: float, regularizer: str) -> ProblemScale:
    v_min, v_mean, v_max = target_variances(target_samples)
    d = int(np.prod(np.asarray(target_samples).shape[1:]))
    return ProblemScale(d, float(lam), float(cost_scale), str(regularizer), v_min, v_mean, v_max)


def _round_up(x: float, step: int) -> int:
    return int(step * math.ceil(x / step))


LANGEVIN_INFORMATION = 28.0  # nats: dual.estimator=langevin above (rule table)


def rule(key: str, p: ProblemScale, context: Mapping[str, Any] | None = None) -> Any:
    """The value of ``key`` (one of :data:`KEYS`) for the problem ``p``; ``context`` holds the values already set
    (explicit or resolved) of other keys a rule depends on (``dual.steps`` on ``dual.estimator``, ``dual.lr`` on
    ``dual.pairs`` and ``dual.objective``)."""
    context = {} if context is None else context
    if key == "dual.estimator":
        return "langevin" if p.regularizer == "kl" and p.information > LANGEVIN_INFORMATION else "pairs"
    if key == "dual.langevin.step_size":
        return rule("sampler.step_size", p)
    if key == "dual.langevin.burn_in":
        return _round_up(4.0 * p.conditional_var_max / rule("sampler.step_size", p), 10)
    if key == "dual.objective":
        return "logmeanexp" if p.regularizer == "kl" else "dual"
    if key == "dual.pairs":
        return "rows" if p.regularizer == "kl" and p.dim > 16 and p.information <= LANGEVIN_INFORMATION else "all"
    if key == "dual.lr":
        if context.get("dual.pairs", "all") == "rows":
            return 3e-3
        return 1e-3 if context.get("dual.objective", rule("dual.objective", p)) == "dual" else 3e-4
    if key == "dual.batch_size":
        return 1000 if p.sharpness > 4.0 else 500
    if key == "dual.steps":
        if context.get("dual.estimator", rule("dual.estimator", p)) == "langevin":
            return 2000
        return _round_up(3000 * math.sqrt(max(1.0, p.dim / 16)), 500)
    if key == "dual.lr_schedule":
        return "cosine" if p.dim > 16 else "constant"
    if key == "sampler.step_size":
        return float(f"{0.05 / p.stiffness:.3g}")
    if key == "sampler.n_steps":
        return max(1000, _round_up(8.0 * p.conditional_var_max / rule("sampler.step_size", p), 100))
    if key == "eval.n_samples":
        return 2000 if p.dim <= 16 else _round_up(10000 * p.dim / 64, 1000)
    if key == "bp.estimator":
        return "potential" if p.regularizer == "kl" else "seguy"
    if key == "sampler.refine":
        return "ess" if p.dim > 16 else "all"
    raise KeyError(f"no rule for {key!r}; rules exist for {', '.join(KEYS)}")


def resolve_auto(values: Mapping[str, Any], p: ProblemScale) -> dict[str, Any]:
    """``{key: rule(key, p)}`` for every ``key`` of ``values`` whose value is ``"auto"`` (in :data:`KEYS` order, each
    rule seeing the explicit and already resolved values)."""
    context = {k: v for k, v in values.items() if not (isinstance(v, str) and v == AUTO)}
    out = {}
    for k in sorted(values, key=lambda k: KEYS.index(k) if k in KEYS else len(KEYS)):
        v = values[k]
        if isinstance(v, str) and v == AUTO:
            out[k] = context[k] = rule(k, p, context)
    return out
