"""check.py on CPU: a fixture release converted for 1 and 2 ranks; A and B compared on a few prompts.

torch mp1 vs mp2 in float32 must agree to float32 rounding; float32 vs bf16 must differ more, within
a bf16 bound; thresholds set below the measured differences must fail the run; bad specs and
backends this machine cannot run are refused with exit status 2 before anything runs. The report's
numbers are checked against the saved logits and against compare() on logits with known differences.
"""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import check
import generate
import runtime
from random_release import write_release
import flaggems
import ops
from ops import Ops
from model import ModelArgs
from testkit.checks import PROMPTS, STEPS, converted_release, run_check
from testkit.runs import clean_env, free_port, one_thread  # noqa: F401  (clean_env, one_thread: fixtures)

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """{N: folder converted for N ranks}, and the prompt file."""
    return converted_release(tmp_path_factory.mktemp("check"), write_release, 3, ogroups_comm=False)


@pytest.fixture(scope="module")
def fp32_mp1_vs_mp2(ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp1_vs_mp2")
    keep = tmp / "keep"
    rc, report = run_check(ckpt, "mp=1,backend=torch,dtype=fp32,device=cpu",
                           f"mp=2,backend=torch,dtype=fp32,device=cpu,ckpt={ckpt[2]}", tmp,
                           "--keep", str(keep), "--max-abs", "1e-4", "--min-top1", "1", "--same-greedy")
    return rc, report, str(keep)


@pytest.mark.slow
def test_mp1_and_mp2_agree_in_fp32(fp32_mp1_vs_mp2, capsys):
    rc, report, _ = fp32_mp1_vs_mp2
    assert rc == 0 and report["ok"] and report["failures"] == []
    assert report["b"]["mp"] == 2 and report["b"]["ckpt"].endswith("mp2")
    assert len(report["prompts"]) == len(PROMPTS)
    for row in report["prompts"]:
        assert row["steps"] == STEPS and len(row["a_tokens"]) == STEPS
        assert row["max_abs"] < 1e-4 and row["max_rel"] < 1e-5
        assert row["top1"] == 1.0 and row["first_divergence"] is None and row["nonfinite"] == 0
        assert row["a_tokens"] == row["b_tokens"]
    assert report["summary"]["max_abs"] == max(r["max_abs"] for r in report["prompts"])


@pytest.mark.slow
def test_report_numbers_match_the_saved_logits(fp32_mp1_vs_mp2):
    _, report, keep = fp32_mp1_vs_mp2
    a = torch.load(os.path.join(keep, "a.pt"), weights_only=False)
    b = torch.load(os.path.join(keep, "b.pt"), weights_only=False)
    la, lb = a["logits"][1], b["logits"][1]
    assert la.shape == lb.shape == (STEPS, 129280) and la.dtype == torch.float32
    row = report["prompts"][1]
    diff = (la - lb).abs()
    assert row["max_abs"] == pytest.approx(float(diff.max()), rel=1e-6)
    assert row["max_rel"] == pytest.approx(max(float(diff[i].max() / la[i].abs().max()) for i in range(STEPS)),
                                           rel=1e-6)
    assert row["top1"] == float((la.argmax(-1) == lb.argmax(-1)).float().mean())
    # A's tokens are the argmax of its logits; B was fed them (its teacher-forced argmax agrees here)
    assert a["tokens"][1] == la.argmax(-1).tolist() == row["a_tokens"]
    assert b["tokens"][1] == lb.argmax(-1).tolist()


@pytest.mark.slow
def test_bf16_differs_more_than_fp32_and_a_tight_threshold_fails(ckpt, fp32_mp1_vs_mp2, tmp_path, capsys):
    _, fp32, _ = fp32_mp1_vs_mp2
    rc, report = run_check(ckpt, "backend=torch,dtype=fp32,device=cpu", "backend=torch,dtype=bf16,device=cpu",
                           tmp_path, "--max-abs", "1e-3")
    out = capsys.readouterr().out
    assert rc == 1 and not report["ok"]
    s = report["summary"]
    assert s["max_abs"] > 100 * fp32["summary"]["max_abs"] and s["max_abs"] > 1e-3
    assert s["max_abs"] < 0.5 and s["max_rel"] < 0.1          # bf16 rounding (measured ~0.06, ~0.014)
    assert all(r["nonfinite"] == 0 for r in report["prompts"])
    assert any(re.match(r"prompt \d: max_abs \S+ > --max-abs 0.001", f) for f in report["failures"])
    assert "FAIL prompt" in out and "FAILED" in out and "max_abs" in out.splitlines()[2]


@pytest.mark.parametrize("a, b, match", [
    ("mp=1,backnd=torch", "mp=1", r"--a: unknown key 'backnd'"),
    ("mp=1", "mp=two", r"--b: mp='two' must be a positive integer"),
    ("mp=1", "dtype=fp16", r"--b: dtype='fp16' must be fp32 or bf16"),
    ("mp=1", "backend=cuda", r"--b: backend='cuda' is unknown \(one of auto, torch, triton, flaggems\)"),
    ("mp=1", "device", r"--b: 'device' in spec 'device' is not key=value"),
    ("mp=1", "mp=1,mp=2", r"--b: key 'mp' given twice"),
    ("mp=1", "mp=2", r"--b: .*model0-mp2\.safetensors not found: .*present in .*: mp1"),
    ("mp=1", "mp=4", r"--b: .*model0-mp4\.safetensors not found: .*present in .*: mp1 \(convert\.py "
                     r"--model-parallel 4 makes them\)"),     # before o_groups=2's own rule for 4 ranks
    ("ckpt=/nonexistent/ckpt", "mp=1", r"--a: checkpoint folder /nonexistent/ckpt not found"),
    ("mp=1", "backend=triton,device=cpu", r"--b: backend 'triton' needs a CUDA device and the triton package "
                                           r"\(device=cpu"),
    ("mp=1", "experts=cutlass", r"--b: experts='cutlass' is unknown \(one of triton, humming, humming-fp8\)"),
    ("mp=1", "experts=humming-fp8,device=cpu", r"--b: config .*: expert kernels 'humming-fp8' \(USE_HUMMING\) run "
                                               r"MXFP4 experts .* \(these: experts bf16, dtype bf16\)"),
])
def test_bad_spec_exits_2_naming_the_key(ckpt, tmp_path, capsys, a, b, match):
    start = time.monotonic()
    rc, report = run_check(ckpt, a, b, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and report is None
    assert err.startswith("check.py: error: ") and re.search(match, err), err
    assert time.monotonic() - start < 10


def test_flaggems_on_cpu_is_refused(ckpt, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _ = run_check(ckpt, "mp=1", "backend=flaggems", tmp_path)
    assert rc == 2
    assert re.search(r"--b: backend 'flaggems' needs a CUDA device and the triton package \(device=cpu; no CUDA GPU "
                     r"is visible\)", capsys.readouterr().err)
    with pytest.raises(runtime.SetupError, match=r"--backend flaggems needs a CUDA GPU and none is visible"):
        runtime.ready_flaggems("--backend flaggems")
    with pytest.raises(RuntimeError, match="backend 'flaggems' needs a CUDA device"):
        Ops("flaggems", "cpu")
    assert generate.main(["--ckpt-path", ckpt[1], "--input-file", ckpt["prompts"], "--backend", "flaggems"]) == 1
    assert "generate.py: error: --backend flaggems needs a CUDA GPU" in capsys.readouterr().err


def test_backend_choice_and_use_flaggems(monkeypatch):
    args = ModelArgs(n_layers=1, compress_ratios=[0], backend="flaggems")
    args.validate(1)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, flaggems, got 'gems'"):
        ModelArgs(n_layers=1, compress_ratios=[0], backend="gems").validate(1)
    assert runtime.requested_backend(None) is None and runtime.requested_backend("torch") == "torch"
    monkeypatch.setenv("USE_FLAGGEMS", "1")
    assert runtime.requested_backend(None) == "flaggems"
    with pytest.raises(runtime.SetupError, match="USE_FLAGGEMS=1 asks for backend flaggems but --backend is torch"):
        runtime.requested_backend("torch")
    broken = list(flaggems.FLAGGEMS_BROKEN)
    assert {"mm", "mul", "topk", "cat", "stack", "sum_dim"} <= set(broken)
    monkeypatch.setenv("FLAGGEMS_EXCLUDE", " mul, ,masked_fill ")
    assert flaggems.flaggems_exclude() == ["mul", "masked_fill"] + [n for n in broken if n != "mul"]
    monkeypatch.setenv("FLAGGEMS_EXCLUDE", "")
    assert flaggems.flaggems_exclude() == broken
    monkeypatch.delenv("FLAGGEMS_EXCLUDE")
    assert flaggems.flaggems_exclude() == ["*"]


def test_a_side_past_its_timeout_is_stopped(ckpt, tmp_path, capsys):
    start = time.monotonic()
    rc, report = run_check(ckpt, "mp=1,dtype=fp32", f"mp=2,ckpt={ckpt[2]}", tmp_path, "--timeout", "0.5")
    assert rc == 3 and report is None
    assert "check.py: error: b: mp=2 run did not finish within --timeout 0.5 s" in capsys.readouterr().err
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_a_worker_ends_promptly_on_every_rank(outcome, ckpt, tmp_path):
    """check.py --worker, the torchrun entry point of an mp=2 side, started as torchrun starts it but
    with no agent to stop a rank left waiting: after success (rank 0 wrote the results) and after a
    failure (rank 1's shard is missing; rank 0 said so) every rank destroys its process group and
    exits within seconds, with its own status. Before, rank 0 went on to decode and waited for rank 1
    in a collective until the timeout."""
    folder = ckpt[2]
    if outcome == "failure":
        folder = str(tmp_path / "rank0_only")
        os.mkdir(folder)
        for name in ("model0-mp2.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            os.symlink(os.path.join(ckpt[2], name), os.path.join(folder, name))
    spec = check.parse_spec(f"mp=2,backend=torch,dtype=fp32,device=cpu,ckpt={folder}", "--b", None)
    job, out = str(tmp_path / "job.pt"), tmp_path / "out.pt"
    torch.save({"spec": spec, "prompts": [[0, 100, 200]], "steps": 2, "max_seq_len": 64, "timeout": 600,
                "teacher": None}, job)
    env = {k: v for k, v in os.environ.items() if k not in ("USE_FLAGGEMS", "USE_OGROUPS_COMM")}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(check.HERE, "check.py"), "--worker", job, str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not out.exists() and not all(p.poll() is not None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        done = time.monotonic()
        errs = [p.communicate(timeout=240)[1] for p in procs]
        seconds = time.monotonic() - done
        assert [p.returncode for p in procs] == ([0, 0] if outcome == "success" else [1, 1]), errs
        assert out.exists() == (outcome == "success")
        assert seconds < 15, errs
        if outcome == "failure":
            assert "check.py worker: error: rank 1: " in errs[0] and errs[1] == "", errs
        assert not any("terminate called" in e for e in errs), errs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_compare_on_known_differences():
    torch.manual_seed(0)
    a = torch.randn(4, 50)
    b = a.clone()
    b[1, 7] += 0.25                                    # the largest difference, at step 1
    b[2, 3] -= 0.125
    b[3, a[3].argmin()] = a[3].max() + 1.0             # step 3: a different argmax, off by 1 + (max - min)
    expected_abs = float(a[3].max() + 1.0 - a[3].min())
    row = check.compare(a, b, [5, 6, 7, 8], [5, 6, 9, 9])
    assert row["max_abs"] == pytest.approx(expected_abs)
    rel = [0.0, 0.25 / float(a[1].abs().max()), 0.125 / float(a[2].abs().max()), expected_abs / float(a[3].abs().max())]
    assert row["max_rel"] == pytest.approx(max(rel))
    assert row["per_step_max_abs"] == pytest.approx([0.0, 0.25, 0.125, expected_abs])
    assert row["top1"] == 0.75 and row["first_divergence"] == 2 and row["nonfinite"] == 0
    assert check.compare(a, a, [1], [1])["max_abs"] == 0.0

    b[0, 0] = float("nan")
    bad = check.compare(a, b, [1], [1])
    assert bad["nonfinite"] == 1 and bad["max_abs"] == float("inf")
    rows = [dict(bad, index=0), dict(row, index=1)]
    failures = check.judge(rows, max_abs=1.0, max_rel=None, min_top1=0.8, same_greedy=True)
    assert failures[0] == "prompt 0: 1 NaN/inf logits"
    assert "prompt 1: top1 0.750 < --min-top1 0.8" in failures
    assert "prompt 1: greedy tokens diverge at step 2" in failures
    assert any(f.startswith("prompt 1: max_abs") for f in failures)
    assert check.sanitize({"x": [float("inf"), 1.0]}) == {"x": [None, 1.0]}


def test_parse_spec_defaults_and_overrides():
    spec = check.parse_spec("mp=2, backend=torch ,ckpt=/x/mp2,ogroups=1", "--b", "/x/mp1")
    assert spec == {"ckpt": "/x/mp2", "mp": 2, "backend": "torch", "device": "cpu" if not torch.cuda.is_available()
                    else "cuda", "dtype": None, "ogroups": True, "experts": "triton"}
    assert check.parse_spec("experts=humming-fp8", "--b", "/x")["experts"] == "humming-fp8"
    assert check.parse_spec("", "--a", "/x")["ckpt"] == "/x"
    with pytest.raises(check.UsageError, match="--a: no checkpoint"):
        check.parse_spec("mp=1", "--a", None)


def test_flaggems_attention_adapter_pads_heads(monkeypatch):
    """The adapter around flag_gems.sparse_attn_triton, with a stand-in that checks what FlagGems
    would be given (a power-of-two head count >= 16, int32 indices, float32 sink) and computes it
    with our reference: the padded heads must not change the real ones."""
    seen = {}

    class FakeFlagGems:
        @staticmethod
        def sparse_attn_triton(q, kv, sink, idx, scale):
            seen.update(heads=q.size(2), idx=idx.dtype, sink=sink.dtype, pad_sink=sink[4:].abs().sum().item())
            return ops.sparse_attn_torch(q, kv, sink, idx, scale)

    monkeypatch.setattr(flaggems, "flag_gems_module", lambda: FakeFlagGems)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 32, generator=g).bfloat16()
    kv = torch.randn(2, 10, 32, generator=g).bfloat16()
    sink = torch.randn(4, generator=g)
    idx = torch.randint(-1, 10, (2, 3, 6), generator=g)
    idx[..., 0] = 0
    out = flaggems.sparse_attn_flaggems(q, kv, sink, idx, 32 ** -0.5)
    assert seen == {"heads": 16, "idx": torch.int32, "sink": torch.float32, "pad_sink": 0.0}
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert torch.equal(out, ops.sparse_attn_torch(q, kv, sink, idx, 32 ** -0.5))
