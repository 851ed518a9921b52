"""Security and bad data: weights-only loading, no code from files, stage dirs of other configs, confined paths."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from experiments import pipeline
from experiments.stages import StageError
from experiments.startup import Problem, read_run
from experiments.validation import ConfigError, allowed_roots, confine, validate_config
from scones.data import StandardGaussian
from scones.ot import KL, SquaredEuclidean
from tests.test_validation import TINY_TRAINING, _composed, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
AUDITED = ("scones", "experiments", "scripts")

# --------------------------------------------------------------------------------------------- code audit

BANNED_CALLS = {
    "eval", "exec", "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "marshal.load",
    "marshal.loads", "yaml.load", "yaml.unsafe_load", "torch.jit.load", "joblib.load", "shelve.open",
}  # fmt: skip


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # x().eval() is not the builtin eval
    return ".".join(reversed(parts))


def _kw_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def audit_source(source: str, where: str) -> list[str]:
    """Unsafe deserialisation / code execution in ``source``: ``where:line: reason`` per offence.

    - ``eval``/``exec``/``pickle``/``marshal``/``yaml.load``/``torch.jit.load``… are banned outright;
    - ``torch.load`` must pass ``weights_only=True`` (tensors and plain containers only);
    - ``np.load`` must not pass ``allow_pickle=True``; no ``shell=True`` subprocesses;
    - a Lightning resume (any call with ``ckpt_path=``) must pass ``weights_only=True``.
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        line = f"{where}:{node.lineno}"
        if name in BANNED_CALLS:
            out.append(f"{line}: {name}() executes or unpickles arbitrary input")
        if (name == "torch.load" or name.endswith(".torch.load")) and not _kw_is_true(node, "weights_only"):
            out.append(f"{line}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and _kw_is_true(node, "allow_pickle"):
            out.append(f"{line}: np.load(allow_pickle=True)")
        if _kw_is_true(node, "shell"):
            out.append(f"{line}: shell=True")
        ckpt = [k for k in node.keywords if k.arg == "ckpt_path"]
        if ckpt and not (isinstance(ckpt[0].value, ast.Constant) and ckpt[0].value.value is None):
            if not _kw_is_true(node, "weights_only"):
                out.append(f"{line}: {name}(ckpt_path=...) without weights_only=True")
    return out


def test_repository_has_no_unsafe_loading_or_eval():
    offences = []
    for package in AUDITED:
        for path in sorted((ROOT / package).rglob("*.py")):
            offences += audit_source(path.read_text(), str(path.relative_to(ROOT)))
    assert offences == []


def test_audit_catches_each_offence():
    bad = """
import pickle, torch, numpy as np, subprocess
net.eval(), make().eval()
eval("1")
pickle.loads(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
subprocess.run("ls", shell=True)
trainer.fit(m, ckpt_path="last.ckpt")
torch.load("ok.pt", weights_only=True)
trainer.fit(m, ckpt_path=None)
"""
    offences = audit_source(bad, "bad.py")
    assert [o.split(":")[1] for o in offences] == ["4", "5", "6", "7", "8", "9", "10"]


# --------------------------------------------------------------------------------------------- stage dirs


class Payload:
    """Unpickling this calls ``Path(marker).touch()``: stands for arbitrary code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def finished_cache(tmp_path_factory) -> Path:
    """A cache directory holding one finished dual stage of the tiny config (trained once per module)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = compose_cfg(tmp, TINY_TRAINING)
    problem = Problem(StandardGaussian(2), StandardGaussian(2), SquaredEuclidean(), KL(2.0))
    _pot, stage = pipeline.dual_stage(read_run(cfg), problem)
    assert stage.done_file.exists()
    return tmp / "cache"


def _setup(tmp_path: Path, finished_cache: Path):
    shutil.copytree(finished_cache, tmp_path / "cache")
    (stage_dir,) = (tmp_path / "cache").glob("dual-*")
    cfg = compose_cfg(tmp_path, TINY_TRAINING)

    def rerun():
        return pipeline.dual_stage(read_run(cfg), Problem(StandardGaussian(2), StandardGaussian(2), SquaredEuclidean(),
                                                          KL(2.0)))

    return stage_dir, rerun


def _snapshot(stage_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(stage_dir)): p.read_bytes() for p in stage_dir.rglob("*") if p.is_file()}


def test_intact_finished_stage_is_reused(tmp_path, finished_cache):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    _pot, stage = rerun()
    assert stage.cached and stage.dir == stage_dir


def test_finished_stage_of_another_config_is_refused(tmp_path, finished_cache):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    meta = json.loads((stage_dir / "done.json").read_text())
    (stage_dir / "done.json").write_text(json.dumps(dict(meta, key="0123456789ab")))
    before = _snapshot(stage_dir)
    with pytest.raises(StageError, match=rf"{stage_dir} holds stage 'dual' of another config \(key 0123456789ab"):
        rerun()
    assert _snapshot(stage_dir) == before  # nothing retrained or overwritten


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"seconds": 3}'])
def test_corrupt_done_json_is_an_error_not_a_retrain(tmp_path, finished_cache, content):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    (stage_dir / "done.json").write_bytes(content)
    before = _snapshot(stage_dir)
    with pytest.raises(StageError, match=rf"{stage_dir / 'done.json'} is corrupt") as e:
        rerun()
    assert "\n" not in str(e.value)
    assert _snapshot(stage_dir) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_state_dict", "wrong_shapes"])
def test_corrupt_final_pt_is_an_error_not_a_retrain(tmp_path, finished_cache, damage):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    final = stage_dir / "final.pt"
    if damage == "garbage":
        final.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    elif damage == "not_a_state_dict":
        torch.save(torch.zeros(3), final)
    else:
        torch.save({k: torch.zeros(1) for k in torch.load(final, weights_only=True)}, final)
    before = _snapshot(stage_dir)
    with pytest.raises(StageError, match=str(final)) as e:
        rerun()
    assert "\n" not in str(e.value) and "retrain" in str(e.value)
    assert _snapshot(stage_dir) == before


@pytest.mark.parametrize("fmt", ["raw_pickle", "torch_zip"])
def test_checkpoint_carrying_code_is_refused_and_never_executed(tmp_path, finished_cache, fmt):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    marker = tmp_path / "pwned"
    evil = Payload(marker)
    # control: the payload really runs under plain unpickling
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    for target in (stage_dir / "final.pt", stage_dir / "checkpoints" / "last.ckpt"):
        if fmt == "raw_pickle":
            target.write_bytes(pickle.dumps(evil, protocol=2))
        else:
            torch.save(evil, target)
    with pytest.raises(StageError, match=r"final\.pt is corrupt or not a weights-only checkpoint"):
        rerun()
    # the resume point (unfinished stage) is checked the same way before Lightning sees it
    (stage_dir / "done.json").unlink()
    (stage_dir / "final.pt").unlink()
    for extra in (stage_dir / "checkpoints").glob("step*.ckpt"):
        extra.unlink()
    with pytest.raises(StageError, match=r"last\.ckpt is corrupt or not a weights-only checkpoint"):
        rerun()
    assert not marker.exists()


def test_resume_point_of_another_config_is_refused(tmp_path, finished_cache):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    (stage_dir / "done.json").unlink()
    (stage_dir / "final.pt").unlink()
    (stage_dir / "stage.json").write_text(json.dumps({"stage": "dual", "key": "fedcba987654"}))
    with pytest.raises(StageError, match=rf"{stage_dir} holds checkpoints of another config"):
        rerun()


def test_unreadable_resume_points_fail_clearly(tmp_path, finished_cache):
    stage_dir, rerun = _setup(tmp_path, finished_cache)
    (stage_dir / "done.json").unlink()
    (stage_dir / "final.pt").unlink()
    for ckpt in (stage_dir / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"\x00" * 64)
    with pytest.raises(StageError, match=r"checkpoints/(last|step\d+)\.ckpt is corrupt") as e:
        rerun()
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("key", ["paths.cache_dir", "paths.output_root", "paths.data_dir"])
def test_path_outside_allowed_roots_is_refused(tmp_path, key):
    cfg = compose_cfg(tmp_path, [f"{key}=/usr/share/scones-test"])
    with pytest.raises(ConfigError, match=rf"^{key}='/usr/share/scones-test' resolves to /usr/share/scones-test, "
                                          r"outside the allowed roots .*paths\.allowed_roots") as e:  # fmt: skip
        validate_config(cfg)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_dotdot_escape_is_resolved_and_refused(tmp_path):
    cfg = compose_cfg(tmp_path, [f"paths.cache_dir={tmp_path}/a/../../.."])
    with pytest.raises(ConfigError, match=r"^paths\.cache_dir=.* resolves to "):
        validate_config(cfg)


def test_symlink_escape_is_resolved_and_refused(tmp_path):
    (tmp_path / "link").symlink_to("/usr")
    cfg = compose_cfg(tmp_path, [f"paths.data_dir={tmp_path}/link/share"])
    with pytest.raises(ConfigError, match=r"^paths\.data_dir=.*/link/share' resolves to /usr/share, outside"):
        validate_config(cfg)


def test_any_user_path_in_a_target_node_is_confined(tmp_path):
    cfg = compose_cfg(tmp_path, ["+data.target.root=/etc"])
    with pytest.raises(ConfigError, match=r"^data\.target\.root='/etc' resolves to /etc, outside"):
        validate_config(cfg)


def test_run_directory_is_confined(tmp_path):
    cfg = compose_cfg(tmp_path)
    validate_config(cfg, run_dir=tmp_path / "runs" / "x")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir='/var/tmp/scones-run' resolves to"):
        validate_config(cfg, run_dir="/var/tmp/scones-run")


def test_allowed_roots_are_configurable(tmp_path, monkeypatch):
    outside = "/usr/share/scones-test"
    cfg = compose_cfg(tmp_path, [f"paths.cache_dir={outside}", f"paths.allowed_roots=[{tmp_path},/usr/share]"])
    validate_config(cfg)
    cfg = compose_cfg(tmp_path, [f"paths.cache_dir={outside}"])
    monkeypatch.setenv("SCONES_ALLOWED_ROOTS", f"/nonexistent:{outside}")
    validate_config(cfg)
    assert Path(outside) in allowed_roots(cfg)


def test_default_roots_are_repo_cwd_and_temp_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SCONES_ALLOWED_ROOTS", raising=False)
    monkeypatch.delenv("SCONES_DATA", raising=False)
    strict = allowed_roots(compose_cfg(tmp_path, ["paths.allowed_roots=null"]))
    assert set(strict) == {ROOT, Path.cwd().resolve()}
    assert confine(ROOT / "outputs" / "x", "k", strict) == ROOT / "outputs" / "x"
    with pytest.raises(ConfigError, match="^k="):
        confine(tmp_path, "k", strict)
    default = allowed_roots(_composed(()))  # configs/paths/default.yaml: the temp dir is scratch space
    assert Path(tempfile.gettempdir()).resolve() in default
