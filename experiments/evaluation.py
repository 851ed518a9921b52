"""Metrics and plots the evaluators call (:mod:`experiments.evaluators`; ``metrics.json`` keys are in the README).

Every function takes the typed ``eval`` settings (:class:`experiments.schema.Eval`) and the pieces it needs, never
the config."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ot  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from scones.metrics.sample_distances import (  # noqa: E402
    energy_distance,
    paired_energy_distance,
    sliced_w2_sorted,
    sorted_projections,
)
from scones.ot.regularizers import KL  # noqa: E402

log = logging.getLogger(__name__)


def gaussian_truth(source, target, regularizer, cost) -> dict | None:
    """Closed-form plan when both sides are Gaussian, the cost is ‖x−y‖² (summed or mean) and the regulariser KL.

    ``lam`` is the λ of the equivalent summed-cost problem: with the mean cost ‖x−y‖²/D, λ·KL is the summed
    cost with (D·λ)·KL. Non-zero means are returned as ``source_mean``/``target_mean`` (absent when zero).
    """
    if not (hasattr(source, "cov_np") and hasattr(target, "cov_np")):
        return None
    reduction = getattr(cost, "reduction", None)
    if not isinstance(regularizer, KL) or reduction not in ("sum", "mean"):
        return None
    dim = source.cov_np.shape[0]
    truth = {
        "source_cov": source.cov_np,
        "target_cov": target.cov_np,
        "lam": float(regularizer.lam) * (dim if reduction == "mean" else 1),
    }
    means = [np.asarray(getattr(d, "mean_np", np.zeros(dim)), dtype=np.float64) for d in (source, target)]
    if any(np.any(m != 0) for m in means):
        truth["source_mean"], truth["target_mean"] = means
    return truth


def pot_plan_reference(settings, problem, g) -> torch.Tensor | None:
    """Joint samples (x, y) ~ POT's discrete entropic plan (:func:`entropic_plan`) between ``eval.pot_reference_n``
    fixed samples.

    Only for KL and flat vectors of dimension ≤ ``eval.pot_reference_max_dim`` (an O(n²) plan); else None.
    """
    source, target, cost, regularizer = problem
    n_ref = int(settings.pot_reference_n)
    if n_ref <= 0 or not isinstance(regularizer, KL) or len(source.shape) != 1:
        return None
    if source.shape[0] > int(settings.pot_reference_max_dim):
        return None
    xr, yr = source.sample(n_ref, generator=g), target.sample(n_ref, generator=g)
    plan = entropic_plan(xr, yr, regularizer.lam, cost)
    idx = torch.multinomial(plan.flatten().float(), n_ref, replacement=True, generator=g)
    return torch.cat([xr[idx // n_ref], yr[idx % n_ref]], dim=1)


def _source_atoms(source, n: int, g) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Atoms and weights standing for the source in the reference's Sinkhorn: for a Gaussian of dim ≤ 2 a
    tensor grid (step 0.4, ±6 in whitened units) with Gaussian weights (a quadrature, no sampling noise:
    the conditional's potential ψ is a soft c-transform over the source, whose tail sets ψ at the target's
    far end); otherwise ``n`` samples with uniform weights."""
    if hasattr(source, "cov64") and source.dim <= 2:
        u = torch.arange(-6.0, 6.0 + 1e-9, 0.4, dtype=torch.float64)
        grid = torch.cartesian_prod(*[u] * source.dim).reshape(-1, source.dim)
        w = torch.exp(-0.5 * grid.pow(2).sum(1))
        return source.mean64 + grid @ source._chol.T, w / w.sum()
    return source.sample(n, generator=g), None


def exact_conditional_samples(source, target, cost, lam: float, x: torch.Tensor, k: int, g,
                              n_pot: int = 1000, n_atoms: int = 20000) -> torch.Tensor:
    r"""``k`` draws y ~ π(· | x_i) ∝ q(y)·exp((ψ(y) − c(x_i, y))/λ) for every row x_i, shape ``(n, k, d)``.

    ψ is POT's entropic potential between the source (:func:`_source_atoms`: a quadrature grid for 1-D/2-D
    Gaussians, else ``n_pot`` samples) and ``n_pot`` fresh target samples, extended out of sample by its soft
    c-transform (:meth:`scones.ot.discrete.DiscreteSinkhorn.potentials`); the draws are self-normalised
    importance samples over ``n_atoms`` fresh target samples (weights ∝ exp((ψ − c(x_i, ·))/λ)). Any pair with
    target samples gets a near-exact conditional reference this way (KL regulariser).
    """
    from scones.ot.discrete import sinkhorn

    xs, a = _source_atoms(source, n_pot, g)
    pot = sinkhorn(xs, target.sample(n_pot, generator=g), lam, a=a, cost=cost, max_iter=5000, tol=1e-6,
                   method="kernel").potentials()
    atoms = target.sample(n_atoms, generator=g)
    psi = pot.psi(atoms.double())
    out = []
    for xb in x.split(250):
        logits = (psi[None] - cost.pairwise(xb.double(), atoms.double())) / lam
        idx = torch.multinomial(torch.softmax(logits, 1).float(), k, replacement=True, generator=g)
        out.append(atoms[idx])
    return torch.cat(out)


def conditional_plan_energy(n_pot: int, problem, x: torch.Tensor, ys: dict, g) -> dict:
    """``methods.<m>.conditional_energy_to_plan``: the paired energy distance of each method against 4 draws per
    source of :func:`exact_conditional_samples` (ψ from POT on ``n_pot`` = ``eval.pot_joint_n`` target samples:
    with 1000 the reference was off by ~0.016 on the Swiss roll, docs/results.md). Its floor
    (``pot_reference.conditional_energy_floor``) is the same metric for one draw per source of a second,
    independent reference (other POT samples, atoms and draws): exact-plan samples up to the reference's own
    error. Scored by :func:`~scones.metrics.sample_distances.paired_energy_distance` (the sources are shared, so only
    the conditionals differ; pairs of one source left out: unbiased).
    Returns ``{"per_method": {m: value}, "floor": value, "exact": the second reference's draws (n, d)}``.
    """
    source, target, cost, regularizer = problem
    lam = float(regularizer.lam)
    ref = exact_conditional_samples(source, target, cost, lam, x, 4, g, n_pot=n_pot)
    second = exact_conditional_samples(source, target, cost, lam, x, 1, g, n_pot=n_pot)[:, 0]
    return {
        "per_method": {m: paired_energy_distance(x, y, ref) for m, y in ys.items()},
        "floor": paired_energy_distance(x, second, ref),
        "exact": second,
    }


def entropic_plan(x: torch.Tensor, y: torch.Tensor, lam: float, cost) -> torch.Tensor:
    """POT's entropic plan (KL, uniform weights) between two point clouds, float64, rows = ``x``: the kernel-form
    Sinkhorn (``scones.ot.discrete.sinkhorn(method="kernel")``, 1.3 s of CPU at n = 4000 on the Swiss roll where the
    log-domain solver takes 40 s; log domain only if the kernel underflows)."""
    from scones.ot.discrete import sinkhorn

    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    return sinkhorn(x, y, lam, cost=cost, max_iter=5000, tol=1e-7, method="kernel").plan


def pot_plan_draws(source, target, cost, lam: float, x: torch.Tensor, n_plan: int, n_refs: int, g) -> torch.Tensor:
    """``n_refs`` draws y' per row x_i, each from the conditional (row i) of an independent POT entropic plan
    (:func:`entropic_plan`) between the sources {x_1 … x_n} ∪ {max(0, n_plan − n) fresh source samples} and
    max(n_plan, n) fresh target samples; shape ``(n, n_refs, *shape)``.

    The method's own sources take part in every plan, so its pairs and these share their x (scored with
    :func:`scones.metrics.sample_distances.paired_energy_distance`: no source-sampling noise, no same-source
    pairs); pooling ``n_refs`` plans averages their finite-sample errors.
    """
    n = x.shape[0]
    xf = x.reshape(n, -1)
    big = max(int(n_plan), n)
    draws = []
    for _ in range(int(n_refs)):
        xs = xf if big == n else torch.cat([xf, source.sample(big - n, generator=g).reshape(big - n, -1).to(xf)])
        yt = target.sample(big, generator=g)
        rows = entropic_plan(xs, yt, lam, cost)[:n]
        idx = torch.multinomial(rows / rows.sum(1, keepdim=True), 1, generator=g)[:, 0]
        draws.append(yt[idx])
    return torch.stack(draws, 1)


def refs_spread(x: torch.Tensor, ref: torch.Tensor) -> float | None:
    """Mean :func:`~scones.metrics.sample_distances.paired_energy_distance` between the draws of the pooled plans of
    :func:`pot_plan_draws` (``ref`` ``(n, k, …)``), one plan against another; None for a single plan."""
    k = ref.shape[1]
    between = [paired_energy_distance(x, ref[:, i], ref[:, j : j + 1]) for i in range(k) for j in range(i)]
    return float(np.mean(between)) if between else None


def joint_raw_energy(n_plan: int, n_refs: int, problem, x: torch.Tensor, ys: dict, exact: torch.Tensor, g) -> dict:
    """``methods.<m>.joint_raw_energy_to_pot_plan``: energy distance on raw coordinates between each method's pairs
    (x_i, y_i) and joint samples (x_i, y'_i) of POT's entropic plan between ``n_plan`` (``eval.pot_joint_n``) fresh
    samples per side (the method's x_i among the sources; ``n_refs`` (``eval.pot_joint_refs``) independent plans
    pooled, one draw per x_i from each; :func:`pot_plan_draws`), as the paired U-statistic
    :func:`~scones.metrics.sample_distances.paired_energy_distance`.

    Floor ``pot_reference.joint_raw_energy_floor``: the same metric for ``exact`` (one exact-conditional draw
    per x_i, :func:`exact_conditional_samples`), i.e. exact-plan samples scored the same way;
    ``pot_reference.joint_raw_refs_spread``: the mean of the metric between the plans' draws, one plan against
    another (the reference's own finite-sample error, before pooling).
    """
    source, target, cost, regularizer = problem
    ref = pot_plan_draws(source, target, cost, float(regularizer.lam), x, n_plan, n_refs, g)
    spread = refs_spread(x, ref)
    return {
        "per_method": {m: paired_energy_distance(x, y, ref) for m, y in ys.items()},
        "floor": paired_energy_distance(x, exact, ref),
        "refs_spread": spread,
        "n_plan": max(int(n_plan), x.shape[0]),
        "n_refs": int(n_refs),
    }


def marginal_sliced_w2(settings, seed: int, target, ys: dict, g) -> dict:
    """``methods.<m>.target_sliced_w2`` and its fresh-sample level ``marginal_reference``: sliced-W2 of each method's
    n samples of the y-marginal to ``eval.marginal_refs`` fresh target sets of the same size n, averaged over the
    sets, on ``eval.marginal_projections`` random directions (fixed by ``seed``, shared by every comparison).

    The fresh-sample level ``target_sliced_w2_fresh`` is the same reading for ``eval.marginal_fresh_sets`` further
    fresh n-sets, averaged (``target_sliced_w2_fresh_sd``: their spread, i.e. the reading's own noise for a sampler
    that is exact). One n = 1000 reading against one fresh set (the protocol before) scatters by ±30 % (fresh sets
    on the Swiss roll: 0.24–0.73, docs/results.md); the reference sets remove the reference side of that noise and
    the fresh level is an average, not one lucky or unlucky draw. Each set is projected and sorted once."""
    n = next(iter(ys.values())).shape[0]
    dim = int(np.prod(next(iter(ys.values())).shape[1:]))
    n_refs, n_fresh = int(settings.marginal_refs), int(settings.marginal_fresh_sets)
    proj = ot.sliced.get_random_projections(dim, int(settings.marginal_projections), seed=int(seed))
    refs = [sorted_projections(target.sample(n, generator=g), proj) for _ in range(n_refs)]

    def reading(z) -> float:
        zs = sorted_projections(z, proj)
        return float(np.mean([sliced_w2_sorted(zs, r) for r in refs]))

    per_method = {name: reading(y) for name, y in ys.items()}
    fresh = [reading(target.sample(n, generator=g)) for _ in range(n_fresh)]
    return {"per_method": per_method, "reference": {
        "target_sliced_w2_fresh": float(np.mean(fresh)), "target_sliced_w2_fresh_sd": float(np.std(fresh, ddof=1)),
        "n": int(n), "refs": n_refs, "fresh_sets": n_fresh, "projections": int(settings.marginal_projections),
    }}


def coupling_metrics(settings, seed: int, problem, x: torch.Tensor, ys: dict, g, reference: bool = True) -> dict:
    """``methods``: per method, mean transport cost and sliced-W2 of the y-marginal to fresh target samples with its
    fresh-sample level (``marginal_reference``, :func:`marginal_sliced_w2`); with ``reference`` (no closed form), the
    energy distances to POT's discrete entropic plan (``pot_reference``)."""
    source, target, cost, regularizer = problem
    n = x.shape[0]
    marginal = marginal_sliced_w2(settings, seed, target, ys, g)
    out: dict = {"methods": {}, "marginal_reference": marginal["reference"]}
    for name, y in ys.items():
        out["methods"][name] = {
            "mean_cost": float(cost(x, y).mean()),
            "target_sliced_w2": marginal["per_method"][name],
            "target_sliced_w2_vs_fresh": marginal["per_method"][name] / marginal["reference"]["target_sliced_w2_fresh"],
        }
    ref = pot_plan_reference(settings, problem, g) if reference else None
    if ref is not None:  # no closed form: compare joint samples with POT's discrete entropic plan
        scale = ref.std(0)  # per-coordinate standardisation, so that x (scale 1) and y (scale ~10) weigh alike
        for name, y in ys.items():
            joint = torch.cat([x.reshape(n, -1), y.reshape(n, -1)], dim=1)
            out["methods"][name]["joint_energy_to_pot_plan"] = energy_distance(joint / scale, ref / scale)
        out["pot_reference"] = {"n": int(ref.shape[0]), "lam": float(regularizer.lam)}
        if not hasattr(getattr(target, "benchmark", None), "conditional_moments"):  # else cBW-UVP is exact
            cond = conditional_plan_energy(int(settings.pot_joint_n), problem, x, ys, g)
            for name, value in cond["per_method"].items():
                out["methods"][name]["conditional_energy_to_plan"] = value
            out["pot_reference"]["conditional_energy_floor"] = cond["floor"]
            if int(settings.pot_joint_refs) > 0:
                joint = joint_raw_energy(int(settings.pot_joint_n), int(settings.pot_joint_refs), problem, x, ys,
                                         cond["exact"], g)
                for name, value in joint["per_method"].items():
                    out["methods"][name]["joint_raw_energy_to_pot_plan"] = value
                out["pot_reference"].update(
                    joint_n=joint["n_plan"], joint_refs=joint["n_refs"], joint_raw_energy_floor=joint["floor"],
                    joint_raw_refs_spread=joint["refs_spread"],
                )
    return out


def _read_curves(stage_dir: Path) -> dict[str, tuple[list, list]]:
    f = stage_dir / "logs" / "version_0" / "metrics.csv"
    if not f.exists():
        return {}
    curves: dict[str, tuple[list, list]] = {}
    with open(f) as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                steps, vals = curves.setdefault(k, ([], []))
                steps.append(int(float(row["step"])))
                vals.append(float(v))
    return curves


def plot_training_curves(run_dir: Path, stages: dict) -> None:
    panels = []
    for name, st in stages.items():
        if st is None:
            continue
        for metric, (steps, vals) in _read_curves(st.dir).items():
            panels.append((f"{name}: {metric}", steps, vals))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, steps, vals) in zip(axes[0], panels, strict=True):
        ax.plot(steps, vals, lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if "mean_H" in title:
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(run_dir / "training_curves.png", dpi=110)
    plt.close(fig)


def plot_couplings(run_dir: Path, x, y, y_bp, y_target, n_lines: int = 60) -> None:
    """Source, target, SCONES and BP couplings (first two coordinates; lines join x to y)."""
    x, y, y_bp, y_target = (t.reshape(t.shape[0], -1)[:, :2].numpy() for t in (x, y, y_bp, y_target))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharex=True, sharey=True)
    axes[0].scatter(x[:, 0], x[:, 1], s=2, c="tab:blue")
    axes[0].set_title("source p")
    axes[1].scatter(y_target[:, 0], y_target[:, 1], s=2, c="tab:orange")
    axes[1].set_title("target q")
    for ax, yy, title in ((axes[2], y, "SCONES coupling"), (axes[3], y_bp, "BP coupling")):
        ax.scatter(y_target[:, 0], y_target[:, 1], s=1, c="0.85")
        ax.scatter(yy[:, 0], yy[:, 1], s=2, c="tab:red")
        k = min(n_lines, len(x))
        ax.add_collection(LineCollection(np.stack([x[:k], yy[:k]], axis=1), colors="tab:green", lw=0.4, alpha=0.6))
        ax.scatter(x[:k, 0], x[:k, 1], s=6, c="tab:blue")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(run_dir / "couplings.png", dpi=110)
    plt.close(fig)


def save_plots(run_dir: Path, x, y, y_bp, y_target, stages: dict) -> None:
    try:
        plot_training_curves(run_dir, stages)
        if x.dim() == 2:
            plot_couplings(run_dir, x, y, y_bp, y_target)
    except Exception as e:  # plots must never lose finished metrics
        log.warning("plotting failed: %s", e)


def conditional_protocol(settings, dim: int) -> tuple[int, int]:
    """(test inputs, samples per input) of the conditional protocol: ``eval.conditional_n_x`` /
    ``eval.conditional_n_per_x``, each ``null`` = the rule below.

    The exact-sample floor of cBW-UVP is a finite-sample bias ≈ c(D, ε) / n_per_x that does not depend on the number
    of test inputs; on our seeded instances c ≈ 40–140 (D = 2), 130–270 (D = 16), 500–1 170 (D = 64) in %
    (docs/eot_benchmark.md §6). The rule n_per_x = max(500, 20 D) keeps the floor at or below a third of the issue-13
    targets (≤ 0.3 % at D = 2, ≤ 0.6 % at D = 16, ≤ 0.9 % at D = 64); 50 test inputs keep the standard error over
    inputs small at a chain budget of n_x · n_per_x Langevin chains.
    """
    n_x, k = settings.conditional_n_x, settings.conditional_n_per_x
    n_x = 50 if n_x is None else int(n_x)
    k = max(500, 20 * int(dim)) if k is None else int(k)
    return n_x, k


def conditional_benchmark_metrics(settings, bench, scones_sampler, bp_net, g) -> dict:
    """cBW-UVP (%) of SCONES, BP, the independent coupling and exact samples against the exact π*(·|x).

    The protocol (test inputs × samples per input) is :func:`conditional_protocol`; the paper's is 1000 × 1000.
    ``cbw_uvp_se_percent`` is the standard error of each mean over the test inputs; ``exact`` is the protocol's
    floor (the same metric on exact conditional samples).
    """
    from scones.metrics.cbw_uvp import cbw_uvp

    n_x, k = conditional_protocol(settings, int(bench.dim))
    x = bench.test_inputs(n_x).float()
    mean, cov = bench.conditional_moments(x)
    var = bench.target_variance
    xr = x.repeat_interleave(k, dim=0)
    with torch.no_grad():
        y_bp = bp_net(x).reshape(x.shape)
    samples = {
        "scones": scones_sampler(xr).reshape(n_x, k, -1),
        "bp": y_bp[:, None, :].expand(n_x, k, -1),  # a deterministic map: a point mass per x
        "independent": bench.sample_target(n_x * k, generator=g).reshape(n_x, k, -1),
        "exact": bench.sample_conditional(x, k, generator=g),
    }
    out = {"n_x": n_x, "n_per_x": k, "eps": float(getattr(bench, "eps", float("nan"))), "cbw_uvp_percent": {},
           "cbw_uvp_se_percent": {}}
    for name, s in samples.items():
        per_x = 100.0 * cbw_uvp(s, mean, cov, var, per_x=True)
        out["cbw_uvp_percent"][name] = float(per_x.mean())
        out["cbw_uvp_se_percent"][name] = float(per_x.std(ddof=1) / np.sqrt(n_x)) if n_x > 1 else float("nan")
    return out
