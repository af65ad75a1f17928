"""The bisection of tools/flaggems_ops.py (a GPU script) with its child runs replaced by a rule:
it must name exactly the functions that fail alone, and a set that fails only as a whole."""
import json
import types

import pytest

from tools import flaggems_ops

FUNCS = ["add", "bmm", "cat", "copy_", "cumsum", "index", "index_put_", "mm", "mul", "silu", "stack", "sub",
         "sum_dim", "topk", "where_self", "zeros"]


def run_bisect(monkeypatch, tmp_path, fails):
    """fails(routed functions) -> whether that trial fails. Returns (exit status, report, trials)."""
    trials = []

    def fake_worker(label, workdir, limit, exclude=(), include=()):
        trials.append(list(include))
        return ({"status": "error", "detail": "illegal memory access", "seconds": 1.0} if fails(set(include))
                else {"status": "ok", "detail": "rel err 0", "seconds": 1.0})
    monkeypatch.setattr(flaggems_ops, "run_worker", fake_worker)
    out = tmp_path / "report.json"
    opts = types.SimpleNamespace(exclude="mm,mul,topk", out=str(out), timeout_all=1.0)
    status = flaggems_ops.bisect(opts, str(tmp_path), FUNCS, {})
    return status, json.loads(out.read_text()), trials


@pytest.mark.parametrize("bad", [{"cat"}, {"cat", "sum_dim"}, {"add", "zeros"}])
def test_bisect_names_the_functions_that_fail_alone(monkeypatch, tmp_path, bad):
    status, report, trials = run_bisect(monkeypatch, tmp_path, lambda routed: bool(routed & bad))
    assert status == 1
    assert sorted(c[0] for c in report["culprits"]) == sorted(bad) and all(len(c) == 1 for c in report["culprits"])
    assert report["excluded"] == ["mm", "mul", "topk"]
    assert all(not {"mm", "mul", "topk"} & set(t) for t in trials), "an excluded function was routed"
    assert trials[0] == [f for f in FUNCS if f not in ("mm", "mul", "topk")]
    assert len(trials) <= 1 + 2 * len(bad) * 4, "more trials than halving needs"


def test_bisect_reports_a_set_that_fails_only_together(monkeypatch, tmp_path):
    status, report, _ = run_bisect(monkeypatch, tmp_path, lambda routed: {"add", "zeros"} <= routed)
    assert status == 1 and report["culprits"] == [[f for f in FUNCS if f not in ("mm", "mul", "topk")]]


def test_bisect_with_nothing_failing(monkeypatch, tmp_path):
    status, report, trials = run_bisect(monkeypatch, tmp_path, lambda routed: False)
    assert status == 0 and report["culprits"] == [] and len(trials) == 1
