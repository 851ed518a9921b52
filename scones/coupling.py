r"""The learned entropic plan as a library object: :class:`Coupling`.

SCONES learns dual potentials (φ, ψ) whose compatibility H defines the plan (spec §1)

    π̂(x, y) = H(x, y) · p(x) · q(y),    H = regularizer.density(V),   V = φ(x) + ψ(y) − c(x, y)

(KL: H = exp(V/λ); χ²: H = relu(V)/(2λ)). A :class:`Coupling` bundles the potentials with the source p, the
target q, the target score and the barycentric projection of a run, and answers the questions one asks of
a plan: conditional samples y ~ π̂(· | x) (the run's configured Langevin sampler), the (log-)density, the
barycentric projection T(x) ≈ E_π̂[y | x] and the settings (cost, regulariser, λ).

The one way to load a finished ``python -m experiments.run`` run::

    from scones.coupling import Coupling
    plan = Coupling.from_run_dir("outputs/density_gaussian_d2/runs/<date_time>")
    y = plan.sample(x, n=10)              # (len(x), 10, d)
    log_pi = plan.log_density(x, y[:, 0])  # (len(x),)

Importing this module does not import Hydra; :meth:`Coupling.from_run_dir` imports it (and the pipeline's
builders in :mod:`experiments.pipeline`) when called.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scones.ot.dual import DualPotentials, violation, violation_matrix
from scones.sampling.conditional import ExactPriorScore, initial_chains, sample_conditional

PriorScore = Callable[[Tensor, int], Tensor]


class RunDirError(FileNotFoundError):
    """A run directory (or a stage it points at) is missing or incomplete; the message says what and why."""


class Coupling:
    """The plan π̂ = H·p⊗q of trained dual potentials, with its sampler.

    Args:
        potentials: object with ``phi(x) -> (n,)``, ``psi(y) -> (n,)``, ``cost`` and ``regularizer``
            (e.g. :class:`scones.ot.dual.DualPotentials`).
        source, target: the marginals p and q (:class:`scones.data.Distribution`; ``log_prob`` optional).
        prior_score: ``(y, level) -> ∇_y log q_σ(y)`` used by the sampler (the exact ``target.score`` or a
            learned noise-conditional model); needed only by :meth:`sample`.
        barycentric_map: network T with ``T(x) ≈ E_π[y | x]`` (the BP stage); needed by :meth:`barycentric`
            and by samplers initialised with ``init: bp`` / ``bp_noise``.
        sampler: the ``sampler`` config node as a mapping (``kind``, ``init``, step sizes; see
            :func:`scones.sampling.conditional.sample_conditional`).
        initial_chains: ``(x, T(x) or None, generator) -> y₀``; default
            :func:`scones.sampling.conditional.initial_chains` with ``sampler``.
        batch_size: chains (and network inputs) processed together.
        device: where tensors are evaluated; inputs are moved there.
        n_normalizer: source and target samples used for the Monte-Carlo normaliser Z = E_{p⊗q}[H]
            (all n² pairs).
    """

    def __init__(
        self,
        potentials,
        source,
        target,
        prior_score: PriorScore | None = None,
        barycentric_map: Callable[[Tensor], Tensor] | None = None,
        sampler: Mapping | None = None,
        initial_chains: Callable[[Tensor, Tensor | None, torch.Generator | None], Tensor] | None = None,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        n_normalizer: int = 2000,
        config: Any = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self.potentials, self.source, self.target = potentials, source, target
        self.prior_score, self.barycentric_map = prior_score, barycentric_map
        self.sampler = dict(sampler) if sampler is not None else None
        self.initial_chains = initial_chains
        self.batch_size, self.device, self.n_normalizer = int(batch_size), torch.device(device), int(n_normalizer)
        self.config, self.run_dir = config, None if run_dir is None else Path(run_dir)
        self._log_z: float | None = None

    # ------------------------------------------------------------------------------------------ settings

    @property
    def cost(self):
        """The transport cost c (e.g. ``SquaredEuclidean('sum')`` = ‖x − y‖²)."""
        return self.potentials.cost

    @property
    def regularizer(self):
        """The regulariser λ·D_f(π ‖ p⊗q) (``KL`` or ``ChiSquared``)."""
        return self.potentials.regularizer

    @property
    def lam(self) -> float:
        """λ, the weight of the divergence."""
        return float(self.regularizer.lam)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one target sample y."""
        return tuple(self.target.shape)

    @property
    def has_density(self) -> bool:
        """True when p and q both have ``log_prob``, so that π̂ has a density w.r.t. Lebesgue measure."""
        return callable(getattr(self.source, "log_prob", None)) and callable(getattr(self.target, "log_prob", None))

    def settings(self) -> dict:
        """Cost, regulariser, λ and sampler settings as a plain dict."""
        return {
            "cost": repr(self.cost),
            "regularizer": self.regularizer.name,
            "lam": self.lam,
            "sampler": self.sampler,
        }

    def __repr__(self) -> str:
        where = f", run_dir='{self.run_dir}'" if self.run_dir is not None else ""
        return (
            f"Coupling(source={type(self.source).__name__}, target={type(self.target).__name__}, "
            f"cost={self.cost!r}, regularizer={self.regularizer!r}{where})"
        )

    # ------------------------------------------------------------------------------------------ densities

    def _tensor(self, a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).to(self.device)

    def _log_h(self, v: Tensor) -> Tensor:
        # exact log H: V/λ for KL (no overflow); log(relu(V)/2λ) (−inf off the support) for χ². The χ²
        # regulariser's own log_density is the softplus-smoothed one used by the sampler, not the density.
        if self.regularizer.name == "kl":
            return self.regularizer.log_density(v)
        return torch.log(self.regularizer.density(v))

    @torch.no_grad()
    def log_compatibility(self, x, y, pairwise: bool = False) -> Tensor:
        """log H(x, y) = log dπ̂/d(p⊗q), not normalised (see :meth:`log_normalizer`).

        Diagonal pairs ``(n,)`` for x, y of shape ``(n, *shape)``; with ``pairwise=True`` all pairs,
        shape ``(n, m)``. Float32, on ``self.device``.
        """
        x, y = self._tensor(x), self._tensor(y)
        if pairwise:
            rows = [violation_matrix(self.potentials, x[i : i + self.batch_size], y)
                    for i in range(0, x.shape[0], self.batch_size)]
            return self._log_h(torch.cat(rows))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of points, got {x.shape[0]} and {y.shape[0]}")
        return self._log_h(violation(self.potentials, x, y))

    @torch.no_grad()
    def log_normalizer(self, generator: torch.Generator | None = None, refresh: bool = False) -> float:
        """log Z, Z = E_{p⊗q}[H] ≈ mean of H over all pairs of ``n_normalizer`` samples of p and of q.

        Z = 1 for the optimal potentials (the dual is stationary in an additive constant of φ); learned
        ones give Z ≈ 1 up to optimisation error. Cached after the first call (seed 0 unless ``generator``).
        """
        if self._log_z is None or refresh:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            n = self.n_normalizer
            log_h = self.log_compatibility(self.source.sample(n, generator=g), self.target.sample(n, generator=g),
                                           pairwise=True).double()
            self._log_z = float(torch.logsumexp(log_h.reshape(-1), 0) - math.log(log_h.numel()))
        return self._log_z

    @torch.no_grad()
    def log_density(self, x, y, normalized: bool = True) -> Tensor:
        """Log-density of the learned plan at the pairs (x_i, y_i), shape ``(n,)``, float64.

        If p and q have ``log_prob`` (:attr:`has_density`): log π̂(x, y) = log H + log p(x) + log q(y), a
        density w.r.t. Lebesgue measure on R^d × R^d. Otherwise log H, the density w.r.t. p⊗q (a warning
        says so). ``normalized=True`` subtracts log Z (:meth:`log_normalizer`) so that the density
        integrates to one; ``normalized=False`` is the paper's unnormalised π̂ = H p q.
        """
        x, y = self._tensor(x), self._tensor(y)
        out = self.log_compatibility(x, y).double()
        if self.has_density:
            log_p, log_q = self.source.log_prob(x.double().cpu()), self.target.log_prob(y.double().cpu())
            out = out + log_p.to(out) + log_q.to(out)
        else:
            warnings.warn(
                f"{type(self.source).__name__} or {type(self.target).__name__} has no log_prob: "
                "log_density returns log H, the log-density w.r.t. p⊗q", stacklevel=2,
            )
        return out - self.log_normalizer() if normalized else out

    # ------------------------------------------------------------------------------------------ sampling

    def _check_x(self, x) -> Tensor:
        x = self._tensor(x)
        if tuple(x.shape[1:]) != tuple(self.source.shape):
            raise ValueError(
                f"x must have shape (n, {', '.join(map(str, self.source.shape))}) for this source, "
                f"got {tuple(x.shape)}"
            )
        return x

    @torch.no_grad()
    def barycentric(self, x) -> Tensor:
        """T(x) ≈ E_π̂[y | x] from the barycentric-projection network, shape ``(n, *shape)``."""
        if self.barycentric_map is None:
            raise ValueError("this Coupling has no barycentric_map (the run's BP stage was not given/loaded)")
        x = self._check_x(x)
        out = [self.barycentric_map(x[i : i + self.batch_size]).reshape(-1, *self.shape)
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)

    def sample(self, x, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``n`` conditional samples y ~ π̂(· | x_i) for every row of ``x``: shape ``(len(x), n, *shape)``.

        Runs the configured sampler (:attr:`sampler`) on ∇_y log q + ∇_y log H(x_i, ·), all chains at once
        in batches of ``batch_size``; chains start as ``sampler["init"]`` says. ``generator`` (CPU) makes
        the draw reproducible.
        """
        if self.prior_score is None or self.sampler is None:
            raise ValueError("sampling needs prior_score and sampler settings; build the Coupling with both "
                             "(Coupling.from_run_dir does)")
        if int(n) < 1:
            raise ValueError(f"n (samples per source) must be >= 1, got {n}")
        x = self._check_x(x)
        xs = x.repeat_interleave(int(n), dim=0)
        y_bp = None
        if str(self.sampler.get("init")).startswith("bp"):
            y_bp = self.barycentric(x).repeat_interleave(int(n), dim=0)
        if self.initial_chains is not None:
            y0 = self.initial_chains(xs, y_bp, generator)
        else:
            y0 = initial_chains(self.sampler, xs, y_bp, generator)
        y = sample_conditional(self.prior_score, self.potentials, xs, y0, self.sampler, self.batch_size, generator)
        return y.reshape(x.shape[0], int(n), *self.shape)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> Coupling:
        """Load the plan of a finished ``python -m experiments.run`` run.

        Reads ``<run_dir>/config.yaml`` (the resolved config) and ``<run_dir>/metrics.json``, whose
        ``stages.<name>.dir`` point at the cached stage directories (``final.pt``: weights-only state dicts,
        loaded with ``torch.load(weights_only=True)``). Distributions, cost, regulariser and networks are rebuilt
        with ``hydra.utils.instantiate`` on the saved config nodes through the pipeline's own builders
        (:mod:`experiments.pipeline`, imported here, so ``import scones`` stays Hydra-free), and the sampler
        uses the run's prior score (exact, or the learned one with its EMA weights) and chain initialisation.
        Relative stage directories are looked up from the working directory, the run directory's parents
        (runs live in ``<output_root>/<name>/runs/<time>``, stages in ``<output_root>/cache``) and
        ``paths.cache_dir``. Nothing is trained: a missing stage raises :class:`RunDirError`.
        """
        from omegaconf import OmegaConf

        from experiments import pipeline

        run_dir = Path(run_dir)
        cfg_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.json"
        if not cfg_file.exists():
            raise RunDirError(f"{run_dir} is not a run directory: {cfg_file.name} is missing")
        if not metrics_file.exists():
            raise RunDirError(f"{run_dir} is not a finished run: {metrics_file.name} (written by the evaluate "
                              "stage) is missing; rerun the same command to finish it")
        cfg = OmegaConf.load(cfg_file)
        stages = json.loads(metrics_file.read_text()).get("stages") or {}
        device = torch.device(device)
        try:
            source, target, cost, regularizer = pipeline.build_problem(cfg)
        except pipeline.ConfigError as e:
            raise RunDirError(f"{cfg_file}: {e}") from None
        dim = pipeline.data_dim(source)

        def build(key: str, **kwargs):
            try:
                return pipeline.instantiate_node(cfg, key, **kwargs)
            except pipeline.ConfigError as e:
                raise RunDirError(f"{cfg_file}: {e}") from None

        dual_dir = _stage_dir(run_dir, cfg, stages, "dual")
        if cfg.dual.kind == "online_sinkhorn":
            from scones.ot.online_sinkhorn import EntropicPotentials

            potentials = EntropicPotentials.from_state_dict(_read_state(dual_dir), cost=cost)
            potentials.regularizer = regularizer
            potentials = potentials.to(device)
        else:
            potentials = DualPotentials(build("dual.net", dim=dim), build("dual.net", dim=dim), cost, regularizer)
            _load_module(potentials, dual_dir, "dual")
            pipeline.calibrate_dual(cfg, potentials, source, target)  # the run's E[H] = 1 shift (logmeanexp)
            potentials = potentials.to(device)

        if stages.get("score") is None:  # the run sampled with the target's exact score
            if not getattr(target, "has_score", False):
                raise RunDirError(f"{metrics_file}: no score stage and {type(target).__name__} has no exact score")
            prior_score = ExactPriorScore(target)
        else:
            from scones.models.score import ScoreModule
            from scones.sampling.schedules import geometric_sigmas

            sc = cfg.score
            module = ScoreModule(build("score.net", dim=dim), geometric_sigmas(sc.sigma_max, sc.sigma_min, sc.n_levels),
                                 ema_decay=sc.get("ema_decay"))
            _load_module(module, _stage_dir(run_dir, cfg, stages, "score"), "score")
            prior_score = pipeline.sampler_prior_score(cfg, module.to(device))

        bp_net = None
        if stages.get("bp") is not None:
            bp_net = build("bp.net", in_dim=dim, out_dim=dim)
            _load_module(bp_net, _stage_dir(run_dir, cfg, stages, "bp"), "bp")
            bp_net = bp_net.to(device)

        def chains(x: Tensor, y_bp: Tensor | None, generator: torch.Generator | None) -> Tensor:
            return pipeline.initial_chains(cfg, x, y_bp, generator)  # the run's rule (incl. skipped levels)

        return cls(
            potentials, source, target, prior_score=prior_score, barycentric_map=bp_net,
            sampler=OmegaConf.to_container(cfg.sampler, resolve=True), initial_chains=chains,
            batch_size=int(cfg.eval.batch_size), device=device, config=cfg, run_dir=run_dir,
        )


def _stage_dir(run_dir: Path, cfg, stages: Mapping, name: str) -> Path:
    entry = stages.get(name)
    if not entry or "dir" not in entry:
        raise RunDirError(f"{run_dir / 'metrics.json'} has no stages.{name}.dir")
    recorded = Path(entry["dir"])
    parents = list(run_dir.resolve().parents)
    cache = Path(str(cfg.paths.cache_dir))
    candidates = [recorded] if recorded.is_absolute() else [Path.cwd() / recorded, *(p / recorded for p in parents)]
    candidates += [cache / recorded.name, *(p / cache / recorded.name for p in parents if not cache.is_absolute())]
    for c in candidates:
        if (c / "done.json").exists() and (c / "final.pt").exists():
            return c
    raise RunDirError(
        f"stage '{name}' of {run_dir} not found: no finished stage (done.json, final.pt) at {entry['dir']} (looked "
        f"relative to the working directory, the run directory's parents and paths.cache_dir={cache}); was the "
        "cache deleted? Rerun the run's command to rebuild it"
    )


def _read_state(stage_dir: Path) -> Any:
    return torch.load(stage_dir / "final.pt", map_location="cpu", weights_only=True)


def _load_module(module: nn.Module, stage_dir: Path, name: str) -> None:
    try:
        module.load_state_dict(_read_state(stage_dir), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunDirError(f"{stage_dir / 'final.pt'} does not fit the '{name}' networks of the run's config "
                          f"({first})") from None
    module.requires_grad_(False)
    module.eval()


__all__ = ["Coupling", "RunDirError"]
