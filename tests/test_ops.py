"""Scale and operations: DDP (global batch, sharded evaluation), resume after SIGKILL, sweeps, W&B, progress.

Fast tier: the pieces in-process (batch-stream sharding, resumable CSV, atomic/corrupt checkpoints, sweep table,
optimised metric, config composition with and without the sweep plugins, W&B offline).
Slow tier (``-m slow``): a 2-process ``ddp_spawn`` run and a ``ddp`` CLI run against a single-process run with
the same global batch, a 2-cell CLI multirun, and kill -9 + rerun.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from torch.utils.data import DataLoader

from experiments.logging_utils import ProgressLine, stage_csv_logger
from experiments.run import objective, register_resolvers
from experiments.stage_runtime import AtomicCheckpointIO
from experiments.stages import Stage, StageError, resume_point
from experiments.sweeps import MetricError, collect_sweep, flatten_metrics, select_metric, write_summary
from scones.data import StandardGaussian
from scones.data.streams import SampleStream
from scones.sampling.settings import ULA, Annealed
from tests.helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]

# Tiny Gaussian job. Diagonal pairs make the dual and BP losses batch means, so DDP's gradient average over
# ranks equals the single-process gradient of the same global batch (the all-pairs estimator does not split).
TINY = [
    "+experiment=gaussian",
    "data.dim=2",
    "num_threads=1",
    "++dual.steps=40",
    "++dual.batch_size=64",
    "++dual.pairs=diagonal",
    "++dual.objective=dual",  # a batch mean (logmeanexp is not: DDP would average per-rank logs)
    "++bp.steps=20",
    "++bp.batch_size=64",
    "++bp.pairs=diagonal",
    "++eval.n_samples=200",
    "++eval.batch_size=50",
    "++sampler.n_steps=60",
    "++eval.density.n_pairs=100",
    "++eval.density.n_kl=400",
    "++eval.density.grid=10",
]

make_cfg_confined = functools.partial(make_cfg, confine=True)  # tmp_path is the only extra allowed root


def cli_env(tmp_path, **extra):
    return dict(
        os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT), SCONES_ALLOWED_ROOTS=str(tmp_path),
        OMP_NUM_THREADS="1", **extra,
    )


def cli(tmp_path, *args, timeout=300, **env):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args, f"paths.output_root={tmp_path}"],
        cwd=ROOT, env=cli_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout,
    )


# --------------------------------------------------------------------------------------------- batch stream


def _take(stream, n, num_workers=0):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_stream_ranks_split_the_single_process_global_batch():
    dists = [StandardGaussian(3), StandardGaussian(2)]
    single = _take(SampleStream(dists, 12, seed=5), 4)
    shards = []
    for rank in range(3):
        s = SampleStream(dists, 12, seed=5)
        s.rank, s.world_size = rank, 3
        shards.append(_take(s, 4))
    for step in range(4):
        for j in range(2):  # every distribution of the tuple
            joined = torch.cat([shards[r][step][j] for r in range(3)])
            assert torch.equal(joined, single[step][j])
            assert shards[0][step][j].shape[0] == 4
    # ranks draw different rows, consecutive steps fresh batches
    assert not torch.equal(shards[0][0][0], shards[1][0][0])
    assert not torch.equal(single[0][0], single[1][0])


def test_stream_resumes_and_workers_keep_step_order():
    dists = [StandardGaussian(2)]
    ref = _take(SampleStream(dists, 8, seed=1), 6)
    resumed = SampleStream(dists, 8, seed=1)
    resumed.start_step = 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_take(resumed, 4), ref[2:], strict=True))
    two_workers = _take(SampleStream(dists, 8, seed=1), 6, num_workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(two_workers, ref, strict=True))


def test_stream_rejects_global_batch_not_divisible_by_world_size():
    s = SampleStream([StandardGaussian(2)], 10, name="dual.batch_size")
    s.rank, s.world_size = 0, 4
    with pytest.raises(ValueError, match=r"dual\.batch_size=10 is the GLOBAL batch size.*multiple of 4"):
        next(iter(s))


# --------------------------------------------------------------------------------------------- resume pieces


def _write_csv(path, steps):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss"])
        for s in steps:
            w.writerow([0, s, float(s)])


def test_stage_csv_keeps_rows_before_the_checkpoint_and_appends(tmp_path):
    f = tmp_path / "logs" / "version_0" / "metrics.csv"
    _write_csv(f, [24, 49, 74, 99])  # killed after step 99, last checkpoint at global_step 50
    logger = stage_csv_logger(tmp_path, resume_step=50)
    logger.log_metrics({"train/loss": 74.5, "epoch": 0}, step=74)
    logger.save()
    rows = list(csv.DictReader(open(f)))
    assert [int(r["step"]) for r in rows] == [24, 49, 74]
    assert float(rows[-1]["train/loss"]) == 74.5
    # a fresh start (no checkpoint) drops the dead attempt's curve
    _write_csv(f, [24, 49])
    fresh = stage_csv_logger(tmp_path, resume_step=None)
    fresh.log_metrics({"train/loss": 1.0}, step=0)
    fresh.save()
    assert [int(r["step"]) for r in csv.DictReader(open(f))] == [0]


def _stage(tmp_path) -> Stage:
    d = tmp_path / "dual-abc"
    (d / "checkpoints").mkdir(parents=True)
    return Stage(name="dual", key="abc", dir=d)


def test_resume_point_skips_a_truncated_checkpoint(tmp_path):
    stage = _stage(tmp_path)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 30, "state_dict": {"w": torch.ones(2)}}, stage.dir / "checkpoints/step30.ckpt")
    io.save_checkpoint({"global_step": 60, "state_dict": {"w": torch.ones(2)}}, stage.last_ckpt)
    assert resume_point(stage) == (stage.last_ckpt, 60)
    assert not list((stage.dir / "checkpoints").glob(".*tmp*"))  # no temporaries left behind
    data = stage.last_ckpt.read_bytes()
    stage.last_ckpt.write_bytes(data[: len(data) // 2])  # what a non-atomic writer leaves after kill -9
    assert resume_point(stage) == (stage.dir / "checkpoints/step30.ckpt", 30)
    (stage.dir / "checkpoints/step30.ckpt").write_bytes(b"garbage")
    with pytest.raises(StageError, match="corrupt"):
        resume_point(stage)


def test_progress_line_reports_eta(caplog):
    line = ProgressLine("dual", total=100, interval_s=1e9)
    with caplog.at_level(logging.INFO, logger="scones"):
        for step in range(1, 101):
            line.update(step)
    err = [m for m in caplog.messages if m.startswith("dual:")]
    assert len(err) == 10 and err[0].startswith("dual: 10/100 steps (10%)") and "ETA" in err[0]
    assert err[-1].startswith("dual: 100/100 steps (100%)")
    annealed = Annealed(init="source", sigma_max=1.0, sigma_min=0.1, n_levels=10, skip_levels=2, n_steps_each=5,
                        step_lr=1e-5, denoise=True)
    assert annealed.steps_per_chain == 8 * 5  # the final denoising step is not a Langevin step
    assert ULA(init="bp", step_size=0.1, n_steps=7).steps_per_chain == 7


# --------------------------------------------------------------------------------------------- sweeps


METRICS = {"methods": {"scones": {"bw_uvp": 0.02, "mean_cost": 4.0}, "bp": {"bw_uvp": 0.1}}, "dual": {"mean_H": 1.01},
           "experiment": "gaussian_d2", "stages": {"dual": {"cached": False}}}


def _job(sweep, num, overrides, metrics=None, error=None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (d / "error.txt").write_text(error + "\n")


def test_sweep_summary_table(tmp_path):
    m2 = json.loads(json.dumps(METRICS))
    m2["methods"]["scones"]["bw_uvp"] = 0.5
    for num, (lam, metrics, err) in enumerate(
        [("0.1", METRICS, None), ("0.01", m2, None), ("0", None, "regularizer.lam=0 must be a number > 0"),
         ("1", None, None)]
    ):
        _job(tmp_path, num, ["+experiment=gaussian", f"regularizer.lam={lam}"], metrics, err)
    path = write_summary(tmp_path, optimized_metric="methods.scones.bw_uvp")
    rows = list(csv.DictReader(open(path)))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "missing"]
    assert [r["regularizer.lam"] for r in rows] == ["0.1", "0.01", "0", "1"]
    assert float(rows[0]["methods.scones.bw_uvp"]) == 0.02 and float(rows[1]["methods.scones.bw_uvp"]) == 0.5
    assert float(rows[0]["dual.mean_H"]) == 1.01 and rows[2]["methods.scones.bw_uvp"] == ""
    assert rows[2]["error"].startswith("regularizer.lam=0")
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == f"# Sweep {tmp_path.name}: 2/4 jobs finished"
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header[:4] == ["job", "status", "regularizer.lam", "methods.scones.bw_uvp"]  # varying override only
    assert "experiment" not in header
    assert len(md) == 4 + 4 and len(collect_sweep(tmp_path)) == 4


def test_optimized_metric_selection(tmp_path):
    assert flatten_metrics(METRICS)["methods.bp.bw_uvp"] == 0.1 and "experiment" not in flatten_metrics(METRICS)
    assert select_metric(METRICS, "dual.mean_H") == 1.01
    with pytest.raises(MetricError, match=r"methods\.scones\.fid.*methods\.scones\.bw_uvp"):
        select_metric(METRICS, "methods.scones.fid")
    cfg = make_cfg_confined(tmp_path, ["optimized_metric=methods.bp.bw_uvp"])
    assert objective(cfg, METRICS) == 0.1
    assert objective(make_cfg_confined(tmp_path, []), METRICS) == 0.02  # default: SCONES' BW-UVP


def test_configs_compose(tmp_path):
    cfg = make_cfg_confined(tmp_path, ["trainer=ddp", "trainer.devices=4", "logger=wandb"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 4
    assert cfg.logger.wandb.offline is False and cfg.logger.wandb.project == "scones"
    sim = make_cfg_confined(tmp_path, ["trainer=ddp_sim"])
    assert (sim.trainer.strategy, sim.trainer.devices, sim.trainer.accelerator) == ("ddp_spawn", 2, "cpu")
    assert make_cfg_confined(tmp_path, []).logger.wandb is None  # CSV only by default


def test_sweep_plugins_are_optional(tmp_path):
    """Without the `.[sweeps]` plugins every default composes; selecting a plugin config fails clearly."""
    code = f"""
try:
    import hydra_plugins
    hydra_plugins.__path__ = []  # hide installed Hydra plugins
except ModuleNotFoundError:  # no plugin installed at all (the CI install)
    pass
from hydra import compose, initialize_config_dir
from experiments.run import register_resolvers
register_resolvers()
with initialize_config_dir(config_dir={str(ROOT / 'configs')!r}, version_base="1.3"):
    for ov in ([], ["trainer=ddp"], ["trainer=ddp_sim", "logger=wandb"], ["+experiment=gaussian"]):
        cfg = compose("config", overrides=ov, return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("BasicLauncher"), ov
        assert list(cfg.hydra.callbacks) == ["sweep_summary"]
    for ov in (["+hparams_search=gaussian_optuna"], ["hydra/launcher=slurm"], ["hydra/launcher=workstation"]):
        try:
            compose("config", overrides=ov, return_hydra_config=True)
        except Exception as e:
            assert "Could not" in str(e) and ("optuna" in str(e) or "submitit" in str(e) or "joblib" in str(e)), e
        else:
            raise AssertionError(ov)
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]


def test_sweep_plugin_configs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    register_resolvers()
    with initialize(version_base="1.3", config_path="../configs"):
        opt = compose("config", overrides=["+experiment=gaussian", "+hparams_search=gaussian_optuna"],
                      return_hydra_config=True)
        slurm = compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"],
                        return_hydra_config=True)
        joblib = compose("config", overrides=["hydra/launcher=workstation"], return_hydra_config=True)
    assert opt.optimized_metric == "methods.scones.bw_uvp" and "MULTIRUN" in str(opt.hydra.mode)
    assert opt.hydra.sweeper._target_.endswith("OptunaSweeper") and opt.hydra.sweeper.direction == "minimize"
    assert set(opt.hydra.sweeper.params) == {"dual.lr", "dual.pairs", "sampler.step_size"}
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (slurm.hydra.launcher.gpus_per_node, slurm.hydra.launcher.tasks_per_node) == (4, 4)
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 2


# --------------------------------------------------------------------------------------------- W&B


def wandb_records(run_dir: Path) -> list:
    """Records of the offline run under ``run_dir/wandb`` (LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):  # full record, or last fragment
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
    return out


def test_wandb_offline_run_has_losses_metrics_images_and_artifacts(tmp_path, monkeypatch):
    from experiments.pipeline import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg_confined(
        tmp_path, [*TINY, "logger=wandb", "++dual.steps=30", "++bp.steps=10", "++sampler.n_steps=20",
                   "trainer.log_every_n_steps=5"],
    )
    run_dir = tmp_path / "run"
    metrics = run(cfg, run_dir)
    deadline = time.time() + 60  # wandb-core may still be appending to the log when finish() returns
    recs = wandb_records(run_dir)
    while not any(r.WhichOneof("record_type") == "exit" for r in recs):
        assert time.time() < deadline, "the offline run log has no exit record"
        time.sleep(0.2)
        recs = wandb_records(run_dir)
    history, rows = {}, []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            rows.append(row)
            for k, v in row.items():
                history.setdefault(k, []).append(v)
    # Lightning's WandbLogger, one prefix per stage, each row with its stage's trainer/global_step
    assert {"dual-train/loss", "dual-train/mean_H", "dual-train/dual", "bp-train/loss"} <= set(history)
    dual_steps = [int(r["trainer/global_step"]) for r in rows if "dual-train/loss" in r]
    assert dual_steps == [4, 9, 14, 19, 24, 29]  # every log_every_n_steps
    assert float(history["eval/methods.scones.bw_uvp"][0]) == pytest.approx(metrics["methods"]["scones"]["bw_uvp"])
    (run_rec,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {c.key: json.loads(c.value_json) for c in run_rec.config.update}
    assert config["data"]["dim"] == 2 and config["regularizer"]["lam"] == 4.0
    artifacts = {r.artifact.type: [m.path for m in r.artifact.manifest.contents]
                 for r in recs if r.WhichOneof("record_type") == "artifact"}
    assert set(artifacts["samples"]) == {"samples.npz", "metrics.json", "config.yaml"}
    assert set(artifacts["checkpoint"]) == {"final.pt", "done.json"}
    images = {p.name.split("_")[0] for p in run_dir.glob("wandb/offline-run-*/files/media/images/plots/*.png")}
    assert {"couplings", "training"} <= images


# --------------------------------------------------------------------------------------------- slow: DDP


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    from experiments.pipeline import run

    tmp = tmp_path_factory.mktemp("single")
    cfg = make_cfg_confined(tmp, TINY)
    run(cfg, tmp / "run")
    return tmp


def _weights(root: Path, stage: str) -> dict:
    (path,) = root.glob(f"cache/{stage}-*/final.pt")
    return torch.load(path, weights_only=True)


def _assert_same_run(a: Path, b: Path, atol: float) -> None:
    for stage in ("dual", "bp"):
        wa, wb = _weights(a, stage), _weights(b, stage)
        assert wa.keys() == wb.keys()
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert diff <= atol, (stage, diff)
    sa = np.load(next(a.rglob("samples.npz")))
    sb = np.load(next(b.rglob("samples.npz")))
    assert np.array_equal(sa["x"], sb["x"])
    assert np.abs(sa["y"] - sb["y"]).max() <= 100 * atol


@pytest.mark.slow
def test_ddp_spawn_two_processes_match_single_device(tmp_path, single_device):
    """2 CPU processes (gloo, ddp_spawn) with the same GLOBAL batch give the single-process run up to rounding."""
    from experiments.pipeline import run

    cfg = make_cfg_confined(tmp_path, [*TINY, "trainer=ddp_sim"])
    t0 = time.perf_counter()
    metrics = run(cfg, tmp_path / "run")
    print(f"ddp_spawn pipeline: {time.perf_counter() - t0:.1f} s")
    for stage in ("dual", "bp"):
        (done,) = tmp_path.glob(f"cache/{stage}-*/done.json")
        assert json.loads(done.read_text())["info"]["world_size"] == 2
    _assert_same_run(single_device, tmp_path, atol=1e-5)
    ref = json.loads(next(single_device.rglob("metrics.json")).read_text())
    assert metrics["methods"]["scones"]["bw_uvp"] == pytest.approx(ref["methods"]["scones"]["bw_uvp"], rel=1e-3)


@pytest.mark.slow
def test_ddp_spawn_trains_the_langevin_estimator_with_a_pool_per_process(tmp_path):
    """``dual.estimator=langevin`` under ddp_spawn (2 CPU processes): each process owns half the chain pool, the
    dual converges (health check) and SCONES is at the closed form (BW-UVP ≤ 1 % of the independent coupling's; one
    process gets 3e-4, the floor of 1000 exact samples is ~1e-4); a resume by another process count is refused."""
    from experiments.pipeline import run
    from experiments.stages import StageError

    overrides = ["+experiment=gaussian", "data.dim=2", "regularizer.lam=0.5", "dual.estimator=langevin",
                 "dual.steps=200", "dual.batch_size=256", "bp.steps=100", "eval.n_samples=1000", "num_threads=1"]
    t0 = time.perf_counter()
    metrics = run(make_cfg_confined(tmp_path, [*overrides, "trainer=ddp_sim"]), tmp_path / "run")
    print(f"ddp_spawn langevin pipeline: {time.perf_counter() - t0:.1f} s")
    (done,) = tmp_path.glob("cache/dual-*/done.json")
    assert json.loads(done.read_text())["info"]["world_size"] == 2
    assert metrics["dual"]["converged"], metrics["dual"]
    bw = {k: v["bw_uvp"] for k, v in metrics["methods"].items()}
    assert bw["scones"] <= 0.01 * bw["independent"], bw
    done.unlink()
    (done.parent / "final.pt").unlink()
    with pytest.raises((ValueError, StageError), match="resume with the same trainer.devices"):
        run(make_cfg_confined(tmp_path, overrides), tmp_path / "run1")


@pytest.mark.slow
def test_ddp_cli_shards_evaluation_and_matches_single_device(tmp_path, single_device):
    """`strategy=ddp` (Lightning relaunches the CLI for rank 1): chains sampled on both ranks, one metrics.json."""
    t0 = time.perf_counter()
    r = cli(tmp_path, *TINY, "trainer=ddp_sim", "trainer.strategy=ddp", timeout=500)
    print(f"ddp CLI: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = tmp_path.glob("gaussian_d2/runs/*")
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran in the same run directory
    log_text = (run_dir / "run.log").read_text()
    assert "sampling (rank 0 of 2): 120/120 steps" in log_text  # rank 0 sampled 2 of the 4 chunks
    assert len(list(tmp_path.rglob("metrics.json"))) == 1
    _assert_same_run(single_device, tmp_path, atol=1e-5)


# --------------------------------------------------------------------------------------------- slow: CLI sweeps


@pytest.mark.slow
def test_cli_multirun_two_cells_writes_summary(tmp_path):
    r = cli(tmp_path, "-m", *TINY, "regularizer.lam=1,4", timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = tmp_path.glob("gaussian_d2/multiruns/*")
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"], r["regularizer.lam"]) for r in rows] == [("0", "ok", "1"), ("1", "ok", "4")]
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["methods.scones.bw_uvp"]) == metrics["methods"]["scones"]["bw_uvp"]
        assert float(row["ground_truth.lam"]) == float(row["regularizer.lam"])
    assert (sweep / "summary.md").read_text().startswith(f"# Sweep {sweep.name}: 2/2 jobs finished")


# --------------------------------------------------------------------------------------------- slow: resume


def _checkpoint_steps(root: Path) -> list[int]:
    return [int(p.stem[4:]) for p in root.glob("cache/dual-*/checkpoints/step*.ckpt")]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = [*TINY, "++dual.steps=1500", "checkpoint_every=250"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args, f"paths.output_root={killed}"],
        cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not any(s >= 250 for s in _checkpoint_steps(killed)):
            assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stage; possibly while the next checkpoint is being written
    finally:
        proc.kill()
        proc.wait()
    assert not list(killed.glob("cache/dual-*/done.json")), "killed too late: the stage had finished"

    r = cli(killed, *args, timeout=500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    resumed_at = [ln for ln in out.splitlines() if "stage dual: resuming from" in ln]
    assert resumed_at, out[-3000:]
    step = int(resumed_at[0].split("(step ")[1].split("/")[0])
    assert 250 <= step < 1500 and step % 250 == 0
    done = json.loads(next(killed.glob("cache/dual-*/done.json")).read_text())
    assert done["info"]["resumed_from_step"] == step
    steps = [int(row["step"]) for row in csv.DictReader(open(next(killed.glob("cache/dual-*/logs/*/metrics.csv"))))]
    # no duplicated rows; none missing, except possibly the row of step `step - 1` when the kill landed between
    # writing the checkpoint and flushing that row (Lightning logs a step's row after its checkpoint callbacks)
    assert steps == sorted(set(steps)) and steps[-1] == 1499
    assert set(range(24, 1500, 25)) - set(steps) <= {step - 1}

    r = cli(clean, *args, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # per-step seeding of the data and of the noise: the resumed run IS the uninterrupted run, bit for bit
    for stage in ("dual", "bp"):
        wa, wb = _weights(killed, stage), _weights(clean, stage)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
    ma = json.loads(next(killed.rglob("runs/*/metrics.json")).read_text())
    mb = json.loads(next(clean.rglob("runs/*/metrics.json")).read_text())
    assert ma["methods"] == mb["methods"]

    r = cli(killed, *args, timeout=500)  # the finished command again: every stage is reused
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "stage dual: reusing" in out and "stage bp: reusing" in out
    assert not [ln for ln in out.splitlines() if "experiments.stages" in ln and ("training" in ln or "resuming" in ln)]
