"""kernel_humming.py (USE_HUMMING=1): the MoE around humming-kernels' grouped GEMMs, on the CPU.

humming-kernels runs on CUDA only, so here a torch grouped GEMM over the dequantised experts stands in
for it (`stand_in`, which leaves the rows past the last expert's run NaN, as unwritten memory might be);
everything else is the code the GPU runs: the sort by local expert, the gather, the SwiGLU kernel (in
Triton's interpreter, in a child process), the weighted sum back into tokens, the model's packing of
its experts (and dropping its own copy), and the clear refusals. tools/gpu_check_fp8.py compares the
real library with kernel_lowp's kernels on a GPU.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import generate
import kernel_humming
import ops
from model import ModelArgs
from quant import act_quant_fp8, dequant_act_fp8, dequant_fp4
from runtime import SetupError, env_expert_kernels, load_args
from testkit.fp8 import awkward_rows, convert_to, shard_model, write_v4
from testkit.release_v3 import r1_config
from testkit.runs import clean_env  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not INTERPRETED, reason="runs in Triton's interpreter (test_interpreter_cases)")


def fp4_experts(e: int, n: int, k: int, g: torch.Generator):
    packed = torch.randint(-128, 128, (e, n, k // 2), generator=g, dtype=torch.int8)
    exp = torch.randint(-1, 2, (e, n, k // 32), generator=g) + round(-2 - 0.5 * torch.log2(torch.tensor(k)).item())
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def stand_in(packed: torch.Tensor, scale: torch.Tensor, activations: str = "bf16"):
    """kernel_humming.humming_grouped's contract in torch: each expert's run of rows (with activations
    'fp8' the pair (FP8 rows, scales), which give bf16 rows exactly) times its dequantised weight,
    rounded to the rows' dtype; rows past layout[E] NaN."""
    w = torch.stack([dequant_fp4(packed[e], scale[e], torch.float32) for e in range(packed.size(0))])

    def run(rows, layout: torch.Tensor) -> torch.Tensor:
        if activations == "fp8":
            rows = dequant_act_fp8(*rows, torch.bfloat16)
        out = torch.full((rows.size(0), w.size(1)), float("nan"), dtype=rows.dtype)
        bounds = layout.tolist()
        for e in range(w.size(0)):
            out[bounds[e]:bounds[e + 1]] = (rows[bounds[e]:bounds[e + 1]].float() @ w[e].T).to(rows.dtype)
        return out
    return run


@pytest.mark.parametrize("t,k,first,n_local,n_all", [(1, 6, 0, 8, 8), (7, 3, 4, 4, 12), (40, 2, 2, 3, 6)])
def test_expert_runs_sort_by_local_expert(t, k, first, n_local, n_all):
    g = torch.Generator().manual_seed(t)
    experts = torch.stack([torch.randperm(n_all, generator=g)[:k] for _ in range(t)])
    order, layout = kernel_humming.expert_runs(experts, first, n_local)
    flat = experts.flatten()
    local = torch.where((flat >= first) & (flat < first + n_local), flat - first, n_local)
    assert sorted(order.tolist()) == list(range(t * k))
    keys = local[order].tolist()
    assert keys == sorted(keys)                                  # by local expert, non-local last
    for e in range(n_local):                                     # each run in the assignments' order
        run = order[layout[e]:layout[e + 1]].tolist()
        assert run == sorted(run) and all(local[a] == e for a in run)
    assert layout[0] == 0 and layout[-1] == (local < n_local).sum()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_swiglu_rows(dtype, limit):
    g = torch.Generator().manual_seed(int(limit * 10))
    rows, inter, up = 9, 80, 96                                  # w3 from column 96, columns 80 .. 95 unused
    gu = (torch.randn(rows, 2 * up, generator=g) * 2).to(dtype)
    weights = torch.rand(rows, generator=g)
    n_live = torch.tensor([6])
    h = kernel_humming.swiglu_rows_triton(gu, weights, n_live, inter, up, limit)
    want = ops.swiglu(gu[:, :inter].float(), gu[:, up:up + inter].float(), limit) * weights[:, None]
    want[6:] = 0
    assert h.dtype == dtype and h.shape == (rows, inter)
    assert torch.equal(h[6:], torch.zeros(3, inter, dtype=dtype))
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert torch.allclose(h.float(), want.to(dtype).float(), rtol=tol, atol=tol)


@needs_triton
def test_quant_rows_as_deepseek_quantises():
    g = torch.Generator().manual_seed(3)
    x = awkward_rows(6, 384, g)
    q, scale = kernel_humming.quant_rows_triton(x)
    want_q, want_scale = act_quant_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 3)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(want_scale[3, 0], torch.tensor(1.0)) and want_scale[1, 0] == 2.0 ** -22
    err = (dequant_act_fp8(q, scale, torch.float32) - x.float()).norm() / x.float().norm()
    assert 0 < err < 0.04


@needs_triton
@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_swiglu_rows_into_fp8(limit):
    """h rounded to bf16, then quantised per 128 columns (rows from n_live on: zero)."""
    g = torch.Generator().manual_seed(7)
    rows, inter, up = 5, 256, 384
    gu = (torch.randn(rows, 2 * up, generator=g) * 2).bfloat16()
    weights = torch.rand(rows, generator=g)
    q, scale = kernel_humming.swiglu_rows_triton(gu, weights, torch.tensor([4]), inter, up, limit, fp8=True)
    h = kernel_humming.swiglu_rows_triton(gu, weights, torch.tensor([4]), inter, up, limit)
    want_q, want_scale = act_quant_fp8(h)
    assert q.shape == (rows, inter) and scale.shape == (rows, 2)
    assert torch.equal(scale, want_scale) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert not q[4].float().any() and q[:4].float().abs().max() == 448


@needs_triton
@pytest.mark.parametrize("t,k,first,n_local,n_all", [(1, 6, 0, 8, 8), (7, 3, 4, 4, 12), (40, 2, 2, 20, 24)])
def test_sorted_rows_in_one_launch_as_through_torch(t, k, first, n_local, n_all):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, 48, generator=g)
    experts = torch.stack([torch.randperm(n_all, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    one = kernel_humming.sorted_rows(x, weights, experts, first, n_local)
    torch_path = kernel_humming.sorted_rows(x, weights, experts, first, n_local, one_launch_max=0)
    order, layout = kernel_humming.expert_runs(experts, first, n_local)
    assert torch.equal(torch_path[2][order], torch.arange(t * k)) and torch.equal(torch_path[3], layout)
    for got, want in zip(one, torch_path):
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t,first,n_all,limit", [(1, 0, 4, 10.0), (5, 4, 10, 0.0), (12, 2, 10, 0.5)])
def test_packed_experts_match_the_reference(dtype, t, first, n_all, limit):
    """Against ops.moe_lowp_torch: one token on this rank's 4 experts, then more tokens with experts
    outside this rank's (first .. first + 3) among their picks (sorted in one launch)."""
    g = torch.Generator().manual_seed(t)
    n_local, k, dim, inter = 4, 3, 64, 96
    w13, w2 = fp4_experts(n_local, 2 * inter, dim, g), fp4_experts(n_local, dim, inter, g)
    x = torch.randn(t, dim, generator=g).to(dtype)
    experts = torch.stack([torch.randperm(n_all, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    got = kernel_humming.PackedExperts(w13, w2, grouped=stand_in)(x, weights, experts, first, limit)
    want = ops.moe_lowp_torch(x, w13, w2, weights, experts, first, limit)
    err = ((got - want).norm() / want.norm()).item()
    print(f"packed experts {dtype} t {t}: relative error {err:.1e}")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)


@needs_triton
@pytest.mark.parametrize("t,first,n_all", [(1, 0, 4), (12, 2, 10), (350, 2, 10)])
def test_packed_experts_with_fp8_activations_match_the_reference(t, first, n_all):
    """USE_HUMMING=fp8 against ops.moe_lowp_torch(fp8_activations=True), DeepSeek's numerics; the
    weight-only reference is much farther away, so the check tells the two apart. 350 tokens: more
    assignments than one sorting launch takes."""
    g = torch.Generator().manual_seed(40 + t)
    n_local, k, dim, inter = 4, 3, 128, 256
    w13, w2 = fp4_experts(n_local, 2 * inter, dim, g), fp4_experts(n_local, dim, inter, g)
    x = torch.randn(t, dim, generator=g).bfloat16()
    experts = torch.stack([torch.randperm(n_all, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    got = kernel_humming.PackedExperts(w13, w2, grouped=stand_in, activations="fp8")(x, weights, experts, first, 10.0)
    want = ops.moe_lowp_torch(x, w13, w2, weights, experts, first, 10.0, fp8_activations=True)
    bf16 = ops.moe_lowp_torch(x, w13, w2, weights, experts, first, 10.0)
    err, apart = ((got - want).norm() / want.norm()).item(), ((bf16 - want).norm() / want.norm()).item()
    print(f"fp8 activations t {t}: relative error {err:.1e}, weight-only reference {apart:.1e} away")
    assert torch.isfinite(got).all() and err < 2e-3 and apart > max(1e-2, 10 * err)


@pytest.fixture(scope="module")
def fp8_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("humming"))
    release = os.path.join(root, "v4")
    write_v4(release, hidden_size=128)                           # as wide as USE_HUMMING=1 takes
    return {dtype: convert_to(release, root, 1, dtype) for dtype in ("fp8", "bf16")}


@needs_triton
def test_model_packs_its_experts_once_and_drops_its_copy(fp8_shards, monkeypatch):
    """The model on FP8 shards (MXFP4 experts, Triton path, float32) with its experts packed (the
    stand-in's GEMMs) against the same model without: a prefill that takes the grouped path, one
    that would take the few-token one, decode steps; the experts' own parameters emptied."""
    plain = shard_model(fp8_shards["fp8"], "fp32", "triton", "cpu")
    packed = shard_model(fp8_shards["fp8"], "fp32", "triton", "cpu")
    monkeypatch.setattr(ops.Ops, "pack_experts",
                        lambda self, w13, w2: kernel_humming.PackedExperts(w13, w2, grouped=stand_in))
    ids = torch.randint(0, 129280, (2, 24), generator=torch.Generator().manual_seed(5))
    worst = 0.0
    for start, end in ((0, 20), (20, 21)):
        worst = max(worst, (packed(ids[:, start:end], start) - plain(ids[:, start:end], start)).abs().max().item())
    pos = torch.tensor([21, 21])
    for step in range(2):
        tokens = ids[:, 21 + step:22 + step]
        worst = max(worst, (packed.decode(tokens, pos) - plain.decode(tokens, pos)).abs().max().item())
        pos = pos + 1
    moe = packed.layers[0].ffn
    assert isinstance(moe.stacked[0], kernel_humming.PackedExperts) and moe.stacked[1] is None
    assert all(p.numel() == 0 for i in moe.local for p in moe.experts[i].parameters())
    assert moe.shared_experts.w1.weight.numel() > 0
    print(f"packed vs kernel_lowp experts: max |logit diff| {worst:.1e}")
    assert worst < 1e-4


@pytest.mark.skipif(INTERPRETED, reason="already in the interpreter")
def test_interpreter_cases():
    """The @needs_triton tests above, in a child with TRITON_INTERPRET=1 (kernels run on the CPU)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
                          "-k", "swiglu_rows or sorted_rows or packed or packs or quant_rows"],
                         env=dict(os.environ, TRITON_INTERPRET="1"), cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert re.search(r"\b20 passed", run.stdout), run.stdout[-2000:]


def test_humming_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="expert_kernels must be one of triton, humming, humming-fp8, got 'cutlass'"):
        ops.Ops("torch", expert_kernels="cutlass")
    for kernels in ("humming", "humming-fp8"):
        with pytest.raises(RuntimeError, match=rf"'{kernels}' \(USE_HUMMING\): backend torch runs the references"):
            ops.Ops("torch", device="cpu", expert_kernels=kernels)
    assert kernel_humming.unavailable(torch.device("cpu")) == "it runs on CUDA GPUs only"
    assert kernel_humming.unavailable(torch.device("cuda"), "torch") == "backend torch runs the references"
    base = dict(weights="fp8", expert_weights="fp4", dtype="bf16", expert_kernels="humming", compress_ratios=[0])
    ModelArgs(n_layers=1, **base).validate()
    for change in (dict(expert_weights="fp8"), dict(dtype="fp32")):
        with pytest.raises(ValueError, match=r"expert kernels 'humming' \(USE_HUMMING\) run MXFP4 experts in a bf16 "
                                             r"model: they need shards of convert.py --dtype fp8 with MXFP4"):
            ModelArgs(n_layers=1, **dict(base, **change)).validate()
    with pytest.raises(ValueError, match=r"'humming' \(USE_HUMMING\): humming-kernels builds no GEMM for experts "
                                         r"this narrow \(dim 64, moe_inter_dim 2048; it needs at least 128 and 64\)"):
        ModelArgs(n_layers=1, dim=64, **base).validate()
    ModelArgs(n_layers=1, **dict(base, expert_kernels="humming-fp8")).validate()
    ModelArgs(n_layers=1, moe_inter_dim=64, **base).validate()
    with pytest.raises(ValueError, match=r"'humming-fp8' \(USE_HUMMING=fp8\) quantise the experts' inputs per 128 "
                                         r"channels: dim 4096 "
                                         r"and moe_inter_dim 64 must be multiples of 128"):
        ModelArgs(n_layers=1, moe_inter_dim=64, **dict(base, expert_kernels="humming-fp8")).validate()


@pytest.mark.parametrize("value,kernels", [(None, "triton"), ("0", "triton"), ("1", "humming"), (" FP8", "humming-fp8"),
                                           ("2", None), ("bf16", None)])
def test_use_humming_values(value, kernels, monkeypatch):
    if value is None:
        monkeypatch.delenv("USE_HUMMING", raising=False)
    else:
        monkeypatch.setenv("USE_HUMMING", value)
    if kernels:
        assert env_expert_kernels() == kernels
    else:
        with pytest.raises(SetupError, match=f"USE_HUMMING must be 0, 1 or fp8, got '{value}'"):
            env_expert_kernels()


@pytest.mark.parametrize("shards,value,message", [
    ("bf16", "1", r"expert kernels 'humming' \(USE_HUMMING\) run MXFP4 experts .* \(these: experts bf16, "
                  r"dtype bf16\)"),
    ("fp8", "1", r"expert kernels 'humming' \(USE_HUMMING\): humming-kernels cannot run them: it runs on CUDA GPUs "
                 r"only"),
    ("fp8", "fp8", r"expert kernels 'humming-fp8' \(USE_HUMMING\): humming-kernels cannot run them: it runs on CUDA "
                   r"GPUs only"),
    ("fp8", "yes please", r"USE_HUMMING must be 0, 1 or fp8, got 'yes please'"),
])
def test_generate_with_use_humming_says_why_it_cannot(fp8_shards, shards, value, message, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.setenv("USE_HUMMING", value)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    out = tmp_path / "out.jsonl"
    code = generate.main(["--ckpt-path", fp8_shards[shards], "--input-file", str(prompts), "--output-file", str(out),
                          "--max-new-tokens", "2", "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(message, err), err
    assert not out.exists()


def test_use_humming_on_an_r1_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(r1_config()))
    with pytest.raises(SetupError, match=r"expert kernels 'humming-fp8' \(USE_HUMMING\) run DeepSeek-V4's MXFP4 "
                                         r"experts; .*config\.json is "
                                         r"DeepSeek-R1"):
        load_args(str(tmp_path), 1, expert_kernels="humming-fp8")
