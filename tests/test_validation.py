"""Start-up validation and numerical faults: every bad input ends in one line naming the key, file or step."""

from __future__ import annotations

import copy
import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments import pipeline
from experiments.run import register_resolvers
from experiments.startup import Problem, read_run
from experiments.validation import (
    CONFIG_DIR,
    ConfigError,
    check_group_choices,
    preflight,
    validate_config,
)
from scones.data import StandardGaussian
from scones.models.base import NonFiniteLossError
from scones.ot import KL, SquaredEuclidean
from scones.sampling.langevin import NonFiniteSampleError

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAINING = [  # a few Lightning steps of very small nets
    "dual.net.hidden=[16]",
    "dual.batch_size=32",
    "dual.steps=12",
    "score.net.hidden=[16]",
    "score.batch_size=32",
    "score.steps=12",
    "checkpoint_every=4",
    "trainer.log_every_n_steps=1",
]


@functools.cache
def _composed(groups: tuple[str, ...]) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(groups))


def compose_cfg(tmp_path: Path, overrides=()) -> DictConfig:
    """The job config with outputs under ``tmp_path`` (explicitly allowed as a root).

    Group choices (``sampler=ula``, ``+experiment=gaussian``) go through Hydra, once per distinct set; value
    overrides (``a.b=v``, ``+a.b=v``, ``~a.b``) are applied to a copy with Hydra's override parser, which keeps
    the many small cases below fast.
    """
    groups = tuple(o for o in overrides if "." not in o.split("=")[0])
    values = [f"paths.output_root={tmp_path}", f"paths.allowed_roots=[{tmp_path}]"]
    values += [o for o in overrides if o not in groups]
    cfg = copy.deepcopy(_composed(groups))
    with open_dict(cfg):
        for o in OverridesParser.create().parse_overrides(values):
            if o.is_delete():
                parent, _, leaf = o.key_or_group.rpartition(".")
                del OmegaConf.select(cfg, parent)[leaf]
            else:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False, force_add=True)
    return cfg


def experiments():
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


# --------------------------------------------------------------------------------------------- good configs


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_validates(tmp_path, name):
    validate_config(compose_cfg(tmp_path, [f"+experiment={name}"]))


@pytest.mark.parametrize(
    "overrides",
    [["dual=online_sinkhorn"], ["sampler=ula"], ["regularizer=chi2"], ["cost=mean_squared"], ["model=paper"],
     ["+experiment=gaussian", "score=exact", "data.dim=16"], ["trainer.devices=auto", "trainer.precision=bf16-mixed"]],
)  # fmt: skip
def test_shipped_options_validate(tmp_path, overrides):
    validate_config(compose_cfg(tmp_path, overrides))


# --------------------------------------------------------------------------------------------- bad configs

BAD = [
    # wrong type
    (["dual.lr=abc"], "dual.lr='abc' has type str"),
    (["dual.skip_nonfinite=1"], "dual.skip_nonfinite=1 has type int; expected true or false"),
    (["eval.n_samples=2.5"], "eval.n_samples=2.5 has type float; expected an integer"),
    (["seed=true"], "seed=True has type bool"),
    # missing field
    (["~dual.lr"], "dual.lr is missing; expected a number > 0"),
    (["~sampler.init"], "sampler.init is missing; expected one of source, bp, bp_noise, noise"),
    (["~data.target"], "data.target is missing"),
    # lambda <= 0, negative step size / lr / steps
    (["regularizer.lam=0"], "regularizer.lam=0 must be a number > 0"),
    (["regularizer.lam=-2"], "regularizer.lam=-2 must be a number > 0"),
    (["regularizer=chi2", "regularizer.beta=0"], "regularizer.beta=0 must be a number > 0"),
    (["sampler.step_lr=-1e-5"], "sampler.step_lr=-1e-05 must be a number > 0"),
    (["sampler=ula", "sampler.step_size=0"], "sampler.step_size=0 must be a number > 0"),
    (["bp.lr=-0.1"], "bp.lr=-0.1 must be a number > 0"),
    (["dual.steps=-5"], "dual.steps=-5 must be an integer >= 1"),
    (["score.n_levels=0"], "score.n_levels=0 must be an integer >= 1"),
    (["score.sigma_min=5"], "score.sigma_max=3.0 must be >= score.sigma_min=5"),
    (["sampler.skip_levels=10"], "sampler.skip_levels=10 must be < sampler.n_levels=10"),
    # dimension mismatch when both dims are given
    (["+experiment=gaussian", "data.source.dim=3"], "dimension mismatch: data.source.dim=3 but data.target.dim=2"),
    # unknown option values
    (["sampler.init=foo"], "sampler.init='foo' is not one of source, bp, bp_noise, noise"),
    (["sampler.kind=mala"], "sampler.kind='mala' is not one of ula, annealed"),
    (["dual.pairs=some"], "dual.pairs='some' is not one of all, diagonal"),
    (["dual.kind=sinkhorn"], "dual.kind='sinkhorn' is not one of neural, online_sinkhorn"),
    (["score.kind=magic"], "score.kind='magic' is not one of auto, exact, learned"),
    (["cost.reduction=max"], "cost.reduction='max' is not one of sum, mean"),
    (["trainer.precision=8"], "trainer.precision=8 is not one of"),
    (["trainer.devices=0"], "trainer.devices=0 must be an integer >= 1"),
    (["regularizer=chi2", "dual.objective=logmeanexp"], "dual.objective=logmeanexp is the KL dual's shift-invariant"),
    (["regularizer=chi2", "dual.pairs=rows"], "dual.pairs=rows is the KL dual's batch semi-dual"),
    (["dual.objective=lme"], "dual.objective='lme' is not one of dual, logmeanexp, auto"),
    (["eval.device=tpu9"], "eval.device='tpu9' is not a torch device"),
    (["eval.device=mps"], "eval.device='mps' is not supported; use null"),
    # _target_ nodes: open, but importable (a typo in bp.net fails before the dual stage trains)
    (["bp.net._target_=scones.nets.mlp.Nope"], "bp.net._target_='scones.nets.mlp.Nope' cannot be imported"),
    (["data.target._target_=nowhere.Missing"], "data.target._target_='nowhere.Missing' cannot be imported"),
    # output folder name
    (["name=../../elsewhere"], "name='../../elsewhere' must be a relative directory name"),
    # a bad value that reaches other keys by interpolation names the key the user set
    (["+experiment=eot_benchmark", "data.eps=-1"],
     "data.eps=-1 makes regularizer.lam=-2 (regularizer.lam: ${mul:2,${data.eps}}), which must be a number > 0; "
     "change data.eps"),
    (["+experiment=gaussian", "data.pair=abc"],
     "data.pair='abc' makes data.source.pair='abc' (data.source.pair: ${data.pair}), which has type str; expected an "
     "integer; change data.pair"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, overrides, message):
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_several_problems_are_summarised_in_the_same_line(tmp_path):
    cfg = compose_cfg(tmp_path, ["dual.lr=-1", "eval.batch_size=0", "sampler.init=x"])
    with pytest.raises(ConfigError, match=r"^dual\.lr=-1 .*\(and 2 more: .*sampler\.init.*eval\.batch_size") as e:
        validate_config(cfg)
    assert "\n" not in str(e.value)


def test_target_nodes_stay_open(tmp_path):
    """Arbitrary kwargs of a plugged-in class are not the schema's business."""
    cfg = compose_cfg(tmp_path, ["+data.target.anything=[1, 2]", "+dual.net.my_option=xyz"])
    validate_config(cfg)


def test_gpu_trainer_without_gpu_fails_before_anything_is_built(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match=r"trainer\.accelerator='gpu' but no CUDA device is visible"):
        validate_config(compose_cfg(tmp_path, ["trainer=gpu"]))


def test_evaluation_device_follows_the_trainer_or_eval_device(tmp_path):
    from experiments.distributed import evaluation_device

    assert read_run(compose_cfg(tmp_path, [])).eval.device() == torch.device("cpu")  # trainer=cpu
    assert read_run(compose_cfg(tmp_path, ["eval.device=cpu"])).eval.device() == torch.device("cpu")
    assert evaluation_device(None, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"eval\.device='cuda' but no CUDA device is visible; use eval"):
            validate_config(compose_cfg(tmp_path, ["eval.device=cuda"]))


def test_validation_runs_before_any_directory_is_created(tmp_path):
    cfg = compose_cfg(tmp_path, ["sampler.init=foo"])
    with pytest.raises(ConfigError, match="sampler.init"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------- CLI preflight


@pytest.mark.parametrize(
    "argv, message",
    [
        (["+experiment=nope"], f"experiment='nope' is not one of {', '.join(experiments())} (no configs/experiment/"),
        (["sampler=foo"], "sampler='foo' is not one of annealed, ula (no configs/sampler/foo.yaml)"),
        (["-m", "sampler=ula,foo"], "sampler='foo' is not one of annealed, ula"),
        (["dual.net.hiddn=[8]"], "Could not override 'dual.net.hiddn'"),
        (["sampler.init=foo"], "sampler.init='foo' is not one of source, bp, bp_noise, noise"),
    ],
)
def test_preflight_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        preflight(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_preflight_accepts_good_command_lines(tmp_path):
    preflight(["+experiment=gaussian", "data.dim=4", f"paths.output_root={tmp_path}"])
    preflight(["--cfg", "job", "sampler=whatever"])  # other Hydra flags: left to Hydra
    check_group_choices(["sampler=ula,annealed", "~score", "logger=null", "hydra.run.dir=x"])


def test_schema_vocabularies_are_the_library_s():
    from typing import get_args

    from experiments import schema
    from scones.sampling import settings

    assert settings.INITS == get_args(settings.SamplerSettings.model_fields["init"].annotation)
    assert schema.RunConfig.model_fields["sampler"].annotation == get_args(settings.Sampler)[0]


def test_cli_bad_value_is_one_line_and_creates_no_run_dir(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "experiments.run", "sampler.init=foo", f"paths.output_root={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    expected = "error: sampler.init='foo' is not one of source, bp, bp_noise, noise, resample"
    assert r.stderr.strip().splitlines() == [expected]
    assert not list(tmp_path.iterdir())  # Hydra never got to create the run directory


# --------------------------------------------------------------------------------------------- missing data


def test_missing_dataset_file_names_the_file(tmp_path):
    cfg = compose_cfg(tmp_path, ["data.source._target_=scones.data.MNISTImages", f"+data.source.root={tmp_path}",
                                 "~data.source.dim"])  # fmt: skip
    with pytest.raises(ConfigError) as e:
        pipeline.build_problem(cfg)
    msg = str(e.value)
    assert msg.startswith("data.source") and "MNIST/raw/train-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "prepare_data.py" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------- numerical faults


class NaNWindow(StandardGaussian):
    """N(0, I) whose ``sample`` returns NaN on calls ``start+1 .. stop`` (a transient numerical fault)."""

    def __init__(self, dim: int = 2, start: int = 5, stop: int | None = None) -> None:
        super().__init__(dim)
        self.start, self.stop, self.calls = start, stop, 0

    def sample(self, n, generator=None):
        self.calls += 1
        out = super().sample(n, generator)
        bad = self.calls > self.start and (self.stop is None or self.calls <= self.stop)
        return torch.full_like(out, float("nan")) if bad else out


def _skipped_steps(stage_dir: Path) -> tuple[int, list[str]]:
    """Final running count of skipped steps and the per-step losses from the stage's CSV log."""
    with open(stage_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    counts = [float(r["train/skipped_nonfinite"]) for r in rows if r.get("train/skipped_nonfinite")]
    return int(max(counts, default=0)), [r["train/loss"] for r in rows]


def test_nan_loss_stops_naming_stage_and_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = compose_cfg(tmp_path, TINY_TRAINING)
    target = NaNWindow(start=9)  # batches 1..9 are fine, the 10th (step index 9) is NaN
    with pytest.raises(NonFiniteLossError, match=r"stage 'dual': loss is nan at step 9\b.*dual\.skip_nonfinite=true"):
        pipeline.dual_stage(read_run(cfg), Problem(StandardGaussian(2), target, SquaredEuclidean(), KL(2.0)))
    (stage_dir,) = (tmp_path / "cache").glob("dual-*")
    assert not (stage_dir / "done.json").exists() and not (stage_dir / "final.pt").exists()
    ckpt = torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8  # the last multiple of checkpoint_every=4 before the fault
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_skip_nonfinite_really_continues_the_dual_stage(tmp_path):
    cfg = compose_cfg(tmp_path, [*TINY_TRAINING, "dual.skip_nonfinite=true"])
    target = NaNWindow(start=3, stop=6)  # three NaN batches in the middle of the run
    pot, stage = pipeline.dual_stage(read_run(cfg), Problem(StandardGaussian(2), target, SquaredEuclidean(), KL(2.0)))
    meta = json.loads(stage.done_file.read_text())
    assert meta["info"]["steps"] == 12 and target.calls >= 12
    skipped, losses = _skipped_steps(stage.dir)
    assert skipped == 3 and len(losses) == 12
    # steps 3-5 were skipped (no new loss), then training went on with fresh, finite, changing losses
    assert losses[3] == losses[4] == losses[5] == losses[2]
    assert len({losses[2], *losses[6:]}) == 7 and all(float(v) == float(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in pot.parameters())


@pytest.mark.parametrize("skip", [False, True])
def test_score_stage_nan_stop_or_skip(tmp_path, skip):
    cfg = compose_cfg(tmp_path, [*TINY_TRAINING, "score.kind=learned", f"score.skip_nonfinite={str(skip).lower()}"])
    target = NaNWindow(start=2, stop=4)
    if not skip:
        with pytest.raises(NonFiniteLossError, match=r"stage 'score': loss is nan at step 2\b"):
            pipeline.score_stage(read_run(cfg), target)
        return
    prior, stage = pipeline.score_stage(read_run(cfg), target)
    assert stage.done_file.exists() and _skipped_steps(stage.dir)[0] == 2
    assert torch.isfinite(prior(torch.randn(5, 2), 0)).all()


def test_langevin_divergence_names_stage_sampler_and_step(tmp_path):
    cfg = compose_cfg(tmp_path, ["sampler=ula", "sampler.n_steps=200", "eval.batch_size=8"])
    calls = {"n": 0}

    def exploding_prior(y, level):
        calls["n"] += 1
        return -y if calls["n"] < 120 else torch.full_like(y, float("inf"))

    class Zero:  # potentials with ψ ≡ 0: the compatibility term is −∇c/λ only
        cost, regularizer = SquaredEuclidean(), KL(2.0)

        def phi(self, x):
            return x.sum(1) * 0

        def psi(self, y):
            return y.sum(1) * 0

    x = torch.randn(8, 2)
    with pytest.raises(NonFiniteSampleError, match=r"stage 'evaluate' \(sampler\.kind=ula\).*step 150/200"):
        with pipeline.evaluation_coupling(read_run(cfg), StandardGaussian(2), StandardGaussian(2), Zero(),
                                          exploding_prior, None) as coupling:
            pipeline.sample_sharded(coupling, x, x.clone(), torch.Generator().manual_seed(0))
