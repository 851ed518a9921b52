"""The config schema: one pydantic model per config group, checked once at start-up (docs/config.md).

Models only: :func:`experiments.schema_errors.check` validates the resolved config against :class:`RunConfig` and
returns the typed settings, or the problems, each formatting to ONE line naming the key and what it must be.
Vocabularies are the library's own: sampler settings and inits from :mod:`scones.sampling.settings`, pairs and
objectives from :mod:`scones.ot.dual`, BP estimators from :mod:`scones.ot.barycentric`, cost reductions from
:mod:`scones.ot.costs`; ``kind`` keys pick the model of their group (:func:`scones.settings.by_kind`). Defaults of
the composed config live in ``configs/``; a default here only covers a key older configs may lack, and is never
written back (the stage cache keys hash the config itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from scones.ot.barycentric import Estimator
from scones.ot.costs import Reduction
from scones.ot.dual import DualEstimator, DualPairs, Objective, Pairs
from scones.sampling.settings import Sampler
from scones.settings import Auto, Count, NonNegativeFloat, NonNegativeInt, PositiveFloat, Settings, by_kind, order_error

# --------------------------------------------------------------------------------------------- vocabularies

ACCELERATORS = Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"]
PRECISIONS = Literal[
    "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
    "transformer-engine", "transformer-engine-float16", 16, 32, 64,
]  # fmt: skip  (Lightning's precision flags)
DualObjective = Literal[Objective, "auto"]  # auto: logmeanexp for KL, dual otherwise


# --------------------------------------------------------------------------------------------- groups


class Target(Settings):
    """A node Hydra instantiates: ``_target_`` (checked importable) and the class's own arguments (open)."""

    target: str = Field(alias="_target_", description="a node with a _target_ class path")


class Data(Settings):
    source: Target
    target: Target
    dim: Count = Field(None, validate_default=False)  # optional, never null


class Cost(Target):
    reduction: Reduction = Field(None, validate_default=False)


class Regularizer(Target):
    lam: PositiveFloat = Field(None, validate_default=False)  # required by the built-in regularisers
    beta: PositiveFloat = Field(None, validate_default=False)


class NetTraining(Settings):
    steps: Count
    batch_size: Count
    lr: PositiveFloat
    skip_nonfinite: bool = False


class LangevinEstimator(Settings):
    """``dual.langevin``: the chains of ``dual.estimator=langevin`` (scones.sampling.chains)."""

    steps_per_update: Count = 10
    step_size: PositiveFloat | Auto = "auto"  # auto: the rule of sampler.step_size
    burn_in: Count | Auto = "auto"  # auto: scones.autoconfig (4 × the widest conditional variance / step)


class NeuralDual(NetTraining):
    kind: Literal["neural"]
    net: Target
    pairs: DualPairs | Auto  # auto: scones.autoconfig (rows: the batch semi-dual, KL)
    objective: DualObjective = "dual"
    calibration_samples: Count = 2000
    steps: Count | Auto  # auto: scones.autoconfig rules, resolved before the stages
    batch_size: Count | Auto
    lr: PositiveFloat | Auto
    lr_schedule: Literal["constant", "cosine"] | Auto = "constant"
    estimator: Literal[DualEstimator, "auto"] = "pairs"  # auto: scones.autoconfig's rule
    langevin: LangevinEstimator = LangevinEstimator()


class OnlineSinkhornDual(Settings):
    kind: Literal["online_sinkhorn"]
    solver: Target
    steps: Count


class MixtureExpertSettings(Settings):
    """``score.expert``: a full-covariance Gaussian mixture fitted to the target by EM replaces the score net at
    the levels σ ≥ ``sigma_min`` (:class:`scones.models.score.MixtureExpert`); ``components: 0`` = off. Fitted in
    seconds when the score stage is built or loaded, so it is not part of the stage's cache key."""

    components: NonNegativeInt = 0
    sigma_min: PositiveFloat = 0.1
    reg_covar: PositiveFloat = 0.01  # added to every covariance's diagonal (pixels the data never changes)


class LearnedScore(NetTraining):
    kind: Literal["auto", "learned"]
    net: Target
    sigma_max: PositiveFloat
    sigma_min: PositiveFloat
    n_levels: Count
    ema_decay: float | None = None
    anneal_power: NonNegativeFloat = 2.0  # DSM weight sigma^p per level (2: NCSN; < 2 weights the small levels more)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    expert: MixtureExpertSettings = MixtureExpertSettings()

    @model_validator(mode="after")
    def _schedule(self) -> LearnedScore:
        if self.sigma_max < self.sigma_min:
            raise order_error("sigma_max", self.sigma_max, ">=", "sigma_min", self.sigma_min)
        return self


class ExactScore(Settings):
    kind: Literal["exact"]


class BarycentricProjection(NetTraining):
    net: Target
    pairs: Pairs
    estimator: Literal[Estimator, "auto"] = "seguy"  # auto: scones.autoconfig's rule


class ImageGrid(Settings):
    n_sources: NonNegativeInt
    samples_per_source: Count


class FIDSettings(Settings):
    enabled: bool
    weights_path: str | None
    feature_extractor: Target | None
    n_real: Count | None
    batch_size: Count
    device: str | None


class LabelConsistency(Settings):
    enabled: bool
    epochs: Count
    width: Count
    holdout: Annotated[float, Ge(0)]
    max_train: Count


class FeatureFID(Settings):
    enabled: bool
    n_splits: Count
    kid_subsets: Count


class ScoreGrid(Settings):
    every_n_steps: NonNegativeInt
    n_samples: Count
    step_lr: PositiveFloat
    n_steps_each: Count
    skip_levels: NonNegativeInt


class DensitySettings(Settings):
    n_pairs: Count
    n_kl: Count
    grid: Count


class Eval(Settings):
    n_samples: Annotated[int, Ge(2)] | Auto
    dual_health_samples: NonNegativeInt = 2000  # 0: no dual health diagnostic
    dual_health_every: NonNegativeInt = 0
    batch_size: Count
    device: str | None = None
    pot_reference_n: NonNegativeInt
    pot_reference_max_dim: Count
    pot_joint_n: Count = 4000  # joint_raw_energy_to_pot_plan: samples per side of each POT plan
    pot_joint_refs: NonNegativeInt = 3  # independent POT plans pooled (0 = metric off)
    marginal_refs: Count = 10  # target_sliced_w2: fresh reference sets it is averaged over
    marginal_fresh_sets: Annotated[int, Ge(2)] = 20  # marginal_reference: fresh sets whose mean is the fresh level
    marginal_projections: Count = 500  # random directions of the sliced-W2
    pot_divergence_lam: PositiveFloat = Field(None, validate_default=False)
    conditional_n_x: Count | None  # null: the protocol rule (experiments/evaluation.conditional_protocol)
    conditional_n_per_x: Count | None
    grid: ImageGrid
    fid: FIDSettings
    label_consistency: LabelConsistency
    feature_fid: FeatureFID
    score_grid: ScoreGrid
    density: DensitySettings


DEVICES = "an integer >= 1, -1 (all), 'auto' or a list of ids"


class Trainer(Settings):
    accelerator: ACCELERATORS
    devices: Any = Field(description=DEVICES)
    strategy: str
    precision: PRECISIONS
    num_nodes: Count = 1
    log_every_n_steps: Count = 25
    gradient_clip_val: NonNegativeFloat | None = None
    deterministic: Literal[True, False, "warn"] = False

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if (is_int(v) and (v >= 1 or v == -1)) or v == "auto" or (isinstance(v, list) and all(map(is_int, v))):
            return v
        raise PydanticCustomError("devices", f"must be {DEVICES}")


class Logger(Settings):
    wandb: dict[str, Any] | None = Field(None, description="null or a mapping of wandb.init arguments")


class Paths(Settings):
    output_root: str
    cache_dir: str
    data_dir: str
    allowed_roots: list[str] | None = Field(None, description="a list of directory paths")


class RunConfig(Settings):
    """The whole job config (``hydra`` excluded); the groups in the order problems are reported in (``GROUPS``)."""

    name: str
    seed: NonNegativeInt
    num_workers: NonNegativeInt = 0
    num_threads: Count | None = None
    checkpoint_every: NonNegativeInt = 0
    optimized_metric: str | None = None
    data: Data
    cost: Cost
    regularizer: Regularizer
    dual: by_kind({"neural": NeuralDual, "online_sinkhorn": OnlineSinkhornDual})
    score: by_kind({"auto": LearnedScore, "exact": ExactScore, "learned": LearnedScore})
    bp: BarycentricProjection
    sampler: Sampler
    eval: Eval
    trainer: Trainer
    logger: Logger
    paths: Paths

    @field_validator("name")
    @classmethod
    def _relative_name(cls, name: str) -> str:
        if not name.strip() or ".." in Path(name).parts or Path(name).is_absolute():
            raise PydanticCustomError("name", "must be a relative directory name without '..' (it names the "
                                              "output folder)")  # fmt: skip
        return name


__all__ = [
    "BarycentricProjection", "Cost", "Data", "DensitySettings", "Eval", "RunConfig", "Target", "Trainer",
]
