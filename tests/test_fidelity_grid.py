"""scripts/fidelity_grid.py end to end on tiny settings: cell JSONs, table, plot, resume, summary only."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_grid():
    spec = importlib.util.spec_from_file_location("fidelity_grid", ROOT / "scripts" / "fidelity_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lambda_rules():
    grid = load_grid()
    assert [grid.lam_value(s, 16) for s in ("1", "d/4", "2d", "d", "0.5")] == [1.0, 4.0, 32.0, 16.0, 0.5]
    cells = grid.cells(["gaussian", "mixture"], [2, 16], ["1", "d/4", "2d"], [0.1, 1.0])
    names = [c["cell"] for c in cells]
    assert "gaussian_d2_lam0.5" in names and "gaussian_d16_lam32" in names and "mixture_d16_eps0.1" in names
    assert len(names) == 6 + 4


def test_quick_grid_writes_cells_table_plot_and_resumes(tmp_path, capsys):
    grid = load_grid()
    args = ["--quick", "--out", str(tmp_path), "--family", "mixture", "gaussian", "--dims", "2", "--lams", "1",
            "--eps", "1"]
    grid.main(args)
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    assert set(cells) == {"mixture_d2_eps1", "gaussian_d2_lam1"}
    for c in cells.values():
        assert c["status"] == "ok", c.get("error")
        for k in ("scones", "bp", "independent", "floor"):
            assert c[k] >= 0
        assert c["floor"] < c["independent"]  # exact samples beat ignoring x, even at this tiny protocol
        assert c["cpu_s"]["dual"] > 0 and c["cpu_s"]["evaluate"] > 0 and "dual" in c["timings_s"]
        assert c["dual"] and "command" in c and c["command"].startswith("python -m experiments.run")
    assert cells["mixture_d2_eps1"]["cpu_s"]["conditional"] > 0
    assert (tmp_path / "fidelity_grid.md").read_text().count("| mixture_d2_eps1 |") == 1
    assert (tmp_path / "fidelity_grid.png").stat().st_size > 0
    grid.main(args)  # resumable: both cells are skipped
    assert capsys.readouterr().out.count("done (skip") == 2
    (tmp_path / "fidelity_grid.md").unlink()
    grid.main(["--summary", "--out", str(tmp_path)])
    assert (tmp_path / "fidelity_grid.md").exists()
