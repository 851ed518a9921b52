"""The sweep summary (a Hydra callback) and metric helpers.

Pure Python: Hydra imports this module at start-up, so nothing heavy here.

:class:`SweepSummary` (registered in ``configs/hydra/default.yaml``) writes, at the end of every multirun —
basic sweeper, Optuna, any launcher — a table of all cells into the sweep directory:

- ``summary.csv``: one row per job: ``job``, ``status`` (``ok`` | ``failed`` | ``missing``), the job's
  overrides (one column per key), ``error`` (for failed jobs), and every numeric leaf of its ``metrics.json``
  as a dotted column (``methods.scones.bw_uvp``, ``dual.mean_H``, ``timings_s.dual``, ...);
- ``summary.md``: the same rows as a Markdown table, restricted to the overrides that vary across jobs, the
  optimised metric (if any) and the headline metrics (``methods.{scones,bp}.*``, ``dual.mean_H``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"  # written by experiments/run.py when a sweep cell fails with a known error


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a.b.c": value}`` (bools and strings are skipped)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_metrics(v, f"{prefix}{k}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


class MetricError(ValueError):
    """``optimized_metric`` names no number in metrics.json; the message lists the available keys."""


def select_metric(metrics: dict, key: str) -> float:
    """``metrics[a][b][c]`` for ``key = "a.b.c"`` as a float; :class:`MetricError` naming the available keys."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            available = ", ".join(sorted(flatten_metrics(metrics))) or "none"
            raise MetricError(f"optimized_metric={key!r} is not in metrics.json (numeric keys: {available})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise MetricError(f"optimized_metric={key!r} is not a number in metrics.json (got {node!r})")
    return float(node)


def _override_pairs(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _job_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job directory of ``sweep_dir`` (directories holding ``.hydra/`` or ``metrics.json``)."""
    rows = []
    jobs = {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}
    jobs |= {p.parent for p in sweep_dir.glob("*/metrics.json")}
    for job in sorted(jobs, key=_job_key):
        row: dict[str, Any] = {"job": job.name}
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides = _override_pairs(list(OmegaConf.load(ov_file))) if ov_file.is_file() else {}
        metrics_file, error_file = job / "metrics.json", job / ERROR_FILE
        metrics: dict = {}
        if metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text())
                row["status"] = "ok"
            except json.JSONDecodeError:
                row["status"] = "failed"
                row["error"] = "unreadable metrics.json"
        elif error_file.is_file():
            row["status"] = "failed"
            row["error"] = error_file.read_text().strip().splitlines()[0][:300] if error_file.read_text() else ""
        else:
            row["status"] = "missing"
        row["overrides"] = overrides
        row["metrics"] = flatten_metrics(metrics)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        try:  # long numeric override values (Optuna's floats) are shortened like metrics
            f = float(v)
            v = f if len(v) > 8 and "." in v else v
        except ValueError:
            pass
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_summary(sweep_dir: Path, optimized_metric: str | None = None, stem: str = "summary") -> Path | None:
    """Write ``<stem>.csv`` and ``<stem>.md`` into ``sweep_dir``; returns the CSV path (None: no jobs)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_sweep(sweep_dir)
    if not rows:
        return None
    ov_keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    has_error = any(r.get("error") for r in rows)

    columns = ["job", "status", *ov_keys, *(["error"] if has_error else []), *metric_keys]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(
            [r["job"], r["status"], *(r["overrides"].get(k, "") for k in ov_keys),
             *([r.get("error", "")] if has_error else []), *(r["metrics"].get(k, "") for k in metric_keys)]
        )
    csv_path = sweep_dir / f"{stem}.csv"
    atomic_write_bytes(csv_path, buf.getvalue().encode())

    varying = [k for k in ov_keys if len({r["overrides"].get(k) for r in rows}) > 1] or ov_keys
    headline = [k for k in metric_keys if k.startswith(("methods.scones.", "methods.bp.")) or k == "dual.mean_H"]
    if optimized_metric:
        headline = [optimized_metric] + [k for k in headline if k != optimized_metric]
    md_cols = ["job", "status", *varying, *headline, *(["error"] if has_error else [])]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for r in rows:
        cells = [r["job"], r["status"], *(r["overrides"].get(k, "") for k in varying),
                 *(r["metrics"].get(k) for k in headline), *([r.get("error", "")] if has_error else [])]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    title = f"# Sweep {sweep_dir.name}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} jobs finished\n\n"
    atomic_write_bytes(sweep_dir / f"{stem}.md", (title + "\n".join(lines) + "\n").encode())
    return csv_path


class SweepSummary(Callback):
    """Hydra callback: :func:`write_summary` into the sweep directory when a multirun ends."""

    def __init__(self, stem: str = "summary") -> None:
        self.stem = stem

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            log.warning("sweep summary: %s does not exist; nothing to summarise", sweep_dir)
            return
        try:
            path = write_summary(sweep_dir, OmegaConf.select(config, "optimized_metric"), self.stem)
        except Exception as e:  # a summary must never turn a finished sweep into a failure
            log.warning("sweep summary failed: %s: %s", type(e).__name__, e)
            return
        if path is None:
            return
        log.info("sweep summary: %s (and %s)", path, path.with_suffix(".md"))
        rows = collect_sweep(sweep_dir)
        bad = [r["job"] for r in rows if r["status"] != "ok"]
        if bad:
            log.warning("%d of %d sweep cells did not finish (jobs %s); see %s", len(bad), len(rows),
                        ", ".join(bad), path.with_suffix(".md"))
