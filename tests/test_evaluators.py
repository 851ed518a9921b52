"""The evaluate stage's evaluators (experiments/evaluators.py): each owns its metrics.json keys."""

import re
from pathlib import Path

import pytest

from experiments.evaluators import EVALUATORS, MERGED, Evaluator, run_evaluators

ROOT = Path(__file__).resolve().parents[1]


def test_every_documented_metrics_key_has_one_owner():
    """The README's metrics.json table and the evaluators' declared keys name the same top-level keys, and only the
    merged keys (methods, timings_s, warnings) are declared by more than one evaluator."""
    text = ROOT.joinpath("README.md").read_text()
    table = text[text.index("`metrics.json` (each key"):text.index("## Scale and operations")]
    names = [row.split("|")[1].strip() for row in table.splitlines() if row.startswith("| `")]
    documented = {re.match(r"`([a-z_]+)", name).group(1) for name in names}  # first key of each row ...
    documented |= {m for name in names if " for " not in name for m in re.findall(r", `([a-z_]+)", name)}  # + more
    owners: dict[str, list[str]] = {}
    for ev in EVALUATORS:
        for key in ev.keys:
            owners.setdefault(key, []).append(ev.name)
    assert documented == set(owners)
    assert {k for k, names in owners.items() if len(names) > 1} <= set(MERGED)


def _ev(name, keys, out, selected=True):
    return Evaluator(name, keys, lambda ctx: selected, lambda ctx: out)


def test_run_evaluators_merges_methods_and_skips_unselected():
    evs = (
        _ev("a", ("methods", "x", "warnings"), {"methods": {"scones": {"m1": 1.0}}, "x": 1, "warnings": ["w"]}),
        _ev("b", ("methods", "y"), {"methods": {"scones": {"m2": 2.0}, "bp": {"m2": 3.0}}, "y": 2}),
        _ev("c", ("z",), {"z": 3}, selected=False),
    )
    out = run_evaluators(None, evs)
    assert out == {"methods": {"scones": {"m1": 1.0, "m2": 2.0}, "bp": {"m2": 3.0}}, "x": 1, "y": 2, "warnings": ["w"]}


def test_run_evaluators_refuses_undeclared_or_shared_keys():
    with pytest.raises(KeyError, match="evaluator 'a' returned metrics.json key 'y'"):
        run_evaluators(None, (_ev("a", ("x",), {"y": 1}),))
    with pytest.raises(KeyError, match="'x' is written by two evaluators"):
        run_evaluators(None, (_ev("a", ("x",), {"x": 1}), _ev("b", ("x",), {"x": 2})))
