"""The evaluate stage as a loop over evaluators: each owns its ``metrics.json`` key(s) (README "metrics.json").

An evaluator is one function ``evaluate(ctx) -> dict`` over a small frozen :class:`EvalContext` (the problem, the
evaluation plan, the run directory, the plan as a :class:`~scones.coupling.Coupling`, the paired samples and the
evaluation's seeded generator), plus the rule that selects it from what the pair provides:

=====================  =======================================  ==================================================
evaluator              metrics.json keys                        selected when
=====================  =======================================  ==================================================
``dual``               ``dual``, ``warnings``                   always (E_{p⊗q}[H], the dual's health diagnostic)
``coupling``           ``methods``, ``pot_reference``           always (cost, sliced-W2; POT plan without a truth)
``ground_truth``       ``methods.*.bw_uvp``, ``ground_truth``   a closed-form plan (Gaussian pair, KL, ‖x−y‖²)
``density``            ``density``                              p and q have ``log_prob``
``conditional``        ``conditional``                          the target knows its exact conditionals (EOT
                                                                benchmark)
``images``             ``fid``, ``label_classifier``,           image pairs
                       ``feature_fid``, ``methods.*``
``run``                ``auto``, ``timings_s``, ``stages``,     always (how the run went)
                       ``experiment``, ``n_samples``
=====================  =======================================  ==================================================

:func:`run_evaluators` calls them in this order (they draw from the same seeded generator, so the order is part of
the numbers) and merges their results: ``methods`` per method, ``timings_s`` by key, ``warnings`` appended; any other
key must be declared by exactly one evaluator. A new metric family is one function and one :data:`EVALUATORS` entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments import density, evaluation, images
from experiments.density import GaussianPlan
from experiments.startup import EvalSpec, Problem
from scones.coupling import Coupling
from scones.metrics.bw_uvp import bw_uvp_samples
from scones.ot.dual import violation

log = logging.getLogger(__name__)

METHODS = ("scones", "bp", "independent")  # the couplings every run compares (``exact`` too with a closed form)


@dataclass(frozen=True)
class EvalContext:
    """What every evaluator sees (built once per run by :func:`experiments.pipeline.evaluate`)."""

    problem: Problem
    plan: EvalSpec  # eval settings, seed, experiment name
    run_dir: Path
    coupling: Coupling  # the learned plan, on the CPU: potentials, prior score, BP map, sampler settings
    x: Tensor  # eval.n_samples sources
    x_labels: Tensor | None  # their digit labels (labelled image sets)
    samples: Mapping[str, Tensor]  # method -> samples paired with x: METHODS, and ``exact`` when truth is known
    generator: torch.Generator  # the evaluation's seeded stream (evaluators draw from it in order)
    resample: Callable[[Tensor], Tensor]  # fresh SCONES samples for other sources, on the evaluation device
    truth: GaussianPlan | None  # the closed-form plan, when there is one
    stages: Mapping[str, Any]  # stage name -> experiments.stages.Stage (None: not run)
    dual_health: Mapping[str, Any]  # experiments.pipeline.assess_dual's entries
    auto: Mapping[str, Any]  # the resolved ``auto`` settings (experiments.pipeline.resolve_auto_settings)
    sampling_seconds: float

    @classmethod
    def build(cls, problem: Problem, plan: EvalSpec, run_dir: Path, x: Tensor, x_labels: Tensor | None,
              samples: Mapping[str, Tensor], coupling: Coupling, generator: torch.Generator,
              resample: Callable[[Tensor], Tensor], stages: Mapping, dual_health: Mapping, auto: Mapping,
              sampling_seconds: float) -> EvalContext:
        """The context, with the closed-form plan and its exact samples (one per source, seeded) when known."""
        truth = density.plan_truth(problem.source, problem.target, problem.regularizer, problem.cost)
        samples = dict(samples)
        if truth is not None:
            flat = x.reshape(x.shape[0], -1).double().numpy()
            exact = truth.conditional.sample(flat, np.random.default_rng(plan.seed))
            samples["exact"] = torch.from_numpy(exact).float()
        return cls(problem, plan, Path(run_dir), coupling, x, x_labels, samples, generator, resample, truth,
                   stages, dual_health, auto, sampling_seconds)


@dataclass(frozen=True)
class Evaluator:
    """``evaluate(ctx) -> dict`` of the ``keys`` it owns, run when ``selected(ctx)``."""

    name: str
    keys: tuple[str, ...]
    selected: Callable[[EvalContext], bool]
    evaluate: Callable[[EvalContext], dict]


def _flat(t: Tensor) -> np.ndarray:
    return t.reshape(t.shape[0], -1).double().numpy()


# --------------------------------------------------------------------------------------------- evaluators


def dual_metrics(ctx: EvalContext) -> dict:
    """``dual``: mean_H = E_{p⊗q}[H] on fresh source samples × the independent target samples, and the dual's
    convergence diagnostic; its warning goes to ``warnings``."""
    source, regularizer = ctx.problem.source, ctx.problem.regularizer
    xs = source.sample(int(ctx.x.shape[0]), generator=ctx.generator)
    with torch.no_grad():
        mean_h = float(regularizer.density(violation(ctx.coupling.potentials, xs, ctx.samples["independent"])).mean())
    health = dict(ctx.dual_health)
    warning = health.pop("warning", None)
    return {"dual": {"mean_H": mean_h, **health}, "warnings": [warning] if warning else []}


def coupling_metrics(ctx: EvalContext) -> dict:
    """``methods``: mean transport cost and target sliced-W2 of every method; without a closed form, the energy
    distances to POT's discrete plan (``pot_reference``; :func:`experiments.evaluation.coupling_metrics`)."""
    return evaluation.coupling_metrics(ctx.plan.settings, ctx.plan.seed, ctx.problem, ctx.x, ctx.samples,
                                       ctx.generator, reference=ctx.truth is None)


def ground_truth_metrics(ctx: EvalContext) -> dict:
    """``methods.<m>.bw_uvp`` of the joint (x, y) samples against the closed-form plan, and ``ground_truth``."""
    truth = ctx.truth
    mean = truth.joint.mean_np if truth.has_mean else None
    methods = {name: {"bw_uvp": bw_uvp_samples(np.hstack([_flat(ctx.x), _flat(y)]), truth.joint.cov_np, mean)}
               for name, y in ctx.samples.items()}
    return {"methods": methods, "ground_truth": {"kind": "gaussian_closed_form", "lam": truth.lam, "dim": truth.dim}}


def density_metrics(ctx: EvalContext) -> dict:
    """``density``: calibration, marginals and (with a closed form) KL to the truth (:mod:`experiments.density`)."""
    return {"density": density.evaluate(ctx.plan.settings.density, ctx.run_dir, ctx.coupling, ctx.truth,
                                        ctx.plan.seed + 200)}


def _benchmark(ctx: EvalContext):
    return getattr(ctx.problem.target, "benchmark", None)


def conditional_metrics(ctx: EvalContext) -> dict:
    """``conditional``: cBW-UVP against the exact conditionals
    (:func:`experiments.evaluation.conditional_benchmark_metrics`)."""
    return {"conditional": evaluation.conditional_benchmark_metrics(
        ctx.plan.settings, _benchmark(ctx), ctx.resample, ctx.coupling.barycentric_map, ctx.generator)}


def image_metrics(ctx: EvalContext) -> dict:
    """Grid, FID, label consistency and feature FID of an image pair (:func:`experiments.images.evaluate_images`)."""
    ys = {name: ctx.samples[name] for name in METHODS}
    out = images.evaluate_images(ctx.plan.settings, ctx.plan.seed, ctx.run_dir, ctx.problem.target, ctx.x,
                                 ctx.x_labels, ys, ctx.resample, ctx.generator)
    out["methods"] = out.pop("per_method")
    out["timings_s"] = {"image_eval": out.pop("timings_s")}
    return out


def run_record(ctx: EvalContext) -> dict:
    """How the run went: resolved ``auto`` settings, stage and sampling times, stage directories, the experiment."""
    stages = ctx.stages
    out: dict[str, Any] = {"auto": dict(ctx.auto)} if ctx.auto else {}
    out["timings_s"] = {name: round(st.seconds, 2) for name, st in stages.items() if st is not None}
    out["timings_s"]["sampling"] = round(ctx.sampling_seconds, 2)
    out["stages"] = {name: {"dir": str(st.dir), "cached": st.cached} if st is not None else None
                     for name, st in stages.items()}
    out["experiment"] = ctx.plan.name
    out["n_samples"] = int(ctx.x.shape[0])
    return out


def _always(ctx: EvalContext) -> bool:
    return True


EVALUATORS: tuple[Evaluator, ...] = (
    Evaluator("dual", ("dual", "warnings"), _always, dual_metrics),
    Evaluator("coupling", ("methods", "pot_reference", "marginal_reference"), _always, coupling_metrics),
    Evaluator("ground_truth", ("methods", "ground_truth"), lambda ctx: ctx.truth is not None, ground_truth_metrics),
    Evaluator("density", ("density",), lambda ctx: ctx.coupling.has_density, density_metrics),
    Evaluator("conditional", ("conditional",), lambda ctx: hasattr(_benchmark(ctx), "conditional_moments"),
              conditional_metrics),
    Evaluator("images", ("methods", "fid", "label_classifier", "feature_fid", "background", "timings_s"),
              lambda ctx: ctx.problem.is_image, image_metrics),
    Evaluator("run", ("auto", "timings_s", "stages", "experiment", "n_samples"), _always, run_record),
)

MERGED = ("methods", "timings_s", "warnings")  # keys several evaluators add to


def run_evaluators(ctx: EvalContext, evaluators: tuple[Evaluator, ...] = EVALUATORS) -> dict:
    """The metrics of every selected evaluator, in order, merged (see the module docstring)."""
    metrics: dict[str, Any] = {}
    for ev in evaluators:
        if not ev.selected(ctx):
            continue
        for key, value in ev.evaluate(ctx).items():
            if key not in ev.keys:
                raise KeyError(f"evaluator '{ev.name}' returned metrics.json key '{key}', not one of its {ev.keys}")
            if key == "methods":
                for name, entries in value.items():
                    metrics.setdefault("methods", {}).setdefault(name, {}).update(entries)
            elif key == "timings_s":
                metrics.setdefault(key, {}).update(value)
            elif key == "warnings":
                metrics.setdefault(key, []).extend(value)
            elif key in metrics:
                raise KeyError(f"metrics.json key '{key}' is written by two evaluators ('{ev.name}' is the second)")
            else:
                metrics[key] = value
    return metrics


def save_plots(ctx: EvalContext) -> None:
    """``training_curves.png`` and (2-D samples) ``couplings.png``; a plot never loses finished metrics."""
    y_target = ctx.problem.target.sample(int(ctx.x.shape[0]), generator=ctx.generator)
    evaluation.save_plots(ctx.run_dir, ctx.x, ctx.samples["scones"], ctx.samples["bp"], y_target, ctx.stages)


__all__ = ["EVALUATORS", "EvalContext", "Evaluator", "run_evaluators", "save_plots"]
