"""bench.py backends on the CPU: the tiny config, two layers, short prompt and few steps."""
import json
import math
import os
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["backends", "--device", "cpu", "--config", os.path.join(ROOT, "configs", "config_tiny.json"),
        "--layers", "2", "--prompt-len", "7", "--steps", "4"]
HEADER = "| backend | prefill ms (tok/s) | decode ms/step | max_abs vs A | max_rel vs A | top-1 vs A |"


def test_two_identical_backends_agree_exactly(tmp_path):
    report = tmp_path / "backends.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py")] + TINY
                         + ["--backends", "torch", "torch", "--dtype", "fp32", "--report", str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert HEADER in run.stdout
    assert run.stdout.count("\n| torch | ") == 2
    rows = json.loads(report.read_text())["backends"]
    assert [r["backend"] for r in rows] == ["torch", "torch"] and [r["reference"] for r in rows] == [True, False]
    for r in rows:
        assert "error" not in r
        for key in ("prefill_ms", "prefill_tok_s", "decode_ms"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert "vs_reference" not in rows[0]
    vs = rows[1]["vs_reference"]
    assert vs["max_abs"] == 0 and vs["max_rel"] == 0 and vs["top1"] == 1.0
    assert vs["first_divergence"] is None and vs["nonfinite"] == 0
    assert len(vs["rows"]) == 1 and vs["rows"][0]["steps"] == 4


# Backend auto is the torch path on the CPU: a hook on the head's float32 logits, installed when the
# model switches to it, stands for a backend whose results differ from A's in a known way.
def scaled(module, inputs, logits):
    return logits * 1.01


def argmin_boosted(module, inputs, logits):
    return logits.scatter(-1, logits.argmin(-1, keepdim=True), 1e4)


@pytest.mark.parametrize("dtype, hook", [("bf16", scaled), ("fp32", argmin_boosted)])
def test_a_backend_that_differs_is_reported(tmp_path, monkeypatch, capsys, dtype, hook):
    switch = bench.use_backend

    def use_backend(model, backend, device):
        switch(model, backend, device)
        if backend == "auto":
            model.head.register_forward_hook(hook)

    monkeypatch.setattr(bench, "use_backend", use_backend)
    report = tmp_path / "backends.json"
    bench.main(TINY + ["--backends", "torch", "auto", "--batch", "2", "--dtype", dtype, "--report", str(report)])
    out = capsys.readouterr().out
    assert HEADER in out and "\n| torch | " in out and "\n| auto | " in out
    data = json.loads(report.read_text())
    assert data["dtype"] == dtype and data["reference"] == "torch" and data["batch"] == 2
    a, b = data["backends"]
    assert a["reference"] and "vs_reference" not in a and not b["reference"]
    vs = b["vs_reference"]
    assert len(vs["rows"]) == 2 and all(r["steps"] == 4 and len(r["per_step_max_abs"]) == 4 for r in vs["rows"])
    if hook is scaled:          # every logit 1% larger: same tokens, max_rel 0.01
        assert vs["max_abs"] > 0 and vs["max_rel"] == pytest.approx(0.01, rel=1e-4)
        assert vs["top1"] == 1.0 and vs["first_divergence"] is None
    else:                       # A's least likely token first at every step: the greedy paths part at once
        assert vs["max_abs"] > 1e3 and vs["top1"] == 0.0 and vs["first_divergence"] == 0
        assert "| 0.000 | 0 |" in out


def test_triton_on_the_cpu_is_refused():
    with pytest.raises(SystemExit, match="backend triton needs a CUDA GPU"):
        bench.main(TINY + ["--backends", "torch", "triton"])
