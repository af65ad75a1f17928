"""model_v3.py (DeepSeek-V3 / R1) against transformers' DeepseekV3ForCausalLM (the oracle) with random
weights, both MLA paths (naive: per-head keys and values expanded from the cached latent; absorbed:
wkv_b folded into query and output), with Q-LoRA and with a full-rank query projection.

Prompts of 80 tokens run past YaRN's original 64 positions; the fixture has 2 dense and 2 MoE layers.
"""
import json
import math
import os
import re

import pytest
import torch

import model_v3
from model_v3 import Gate, ModelArgs, Transformer, expert_rank, release_name, split_dim
from ops import Ops
from testkit.oracle_v3 import hf_random_model, our_state_dict, shard, tiny_config, write_config

SEQ = 80
TOL = 1e-3
IMPLS = ("naive", "absorb")


@pytest.fixture(scope="module", params=[48, None], ids=["q-lora", "q-full"])
def release(request, tmp_path_factory):
    """(config path, config, transformers model, our state dict)."""
    config = tiny_config(q_lora_rank=request.param)
    hf = hf_random_model(config, seed=0)
    path = write_config(tmp_path_factory.mktemp("v3"), config)
    return path, config, hf, our_state_dict(hf, config["num_hidden_layers"])


def build(release, impl="absorb", **kw):
    path, _, _, state = release
    kw = {"max_seq_len": 96, "max_batch_size": 4, "dtype": "fp32", "backend": "torch", **kw}
    model = Transformer(ModelArgs.from_file(path, attn_impl=impl, **kw))
    model.load_state_dict(state, strict=True)
    return model


def set_impl(model, impl):
    for layer in model.layers:
        layer.attn.impl = impl


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def oracle_logits(release, prompts):
    """transformers' logits at every position [3, SEQ, vocab]."""
    with torch.no_grad():
        return release[2](prompts).logits.float()


def report(name, worst):
    print(f"{name}: max |logit diff| vs transformers = {worst:.2e}")
    assert worst < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_matches_transformers(release, prompts, oracle_logits, impl):
    model = build(release, impl)
    worst = 0.0
    for length in (1, 2, 7, 16, 33, 63, 64, 65, SEQ):
        got = model(prompts[:, :length])
        worst = max(worst, (got - oracle_logits[:, length - 1]).abs().max().item())
    report(f"prefill {impl}", worst)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_matches_transformers(release, prompts, oracle_logits, impl):
    """Two calls (the second attends over the first's cache), then chunks of several sizes."""
    model = build(release, impl)
    worst = (model(prompts[:, :37]) - oracle_logits[:, 36]).abs().max().item()
    got = model(prompts[:, 37:], start_pos=37)
    worst = max(worst, (got - oracle_logits[:, -1]).abs().max().item())
    start = 0
    for size in (7, 9, 16, 1, 3, 20, 24):
        got = model(prompts[:, start:start + size], start_pos=start)
        start += size
        worst = max(worst, (got - oracle_logits[:, start - 1]).abs().max().item())
    assert start == SEQ
    report(f"chunked prefill {impl}", worst)


@pytest.mark.parametrize("impl", IMPLS + ("naive-then-absorb",))
@pytest.mark.parametrize("static", [False, True], ids=["int-positions", "tensor-positions"])
def test_incremental_decode_matches_transformers(release, prompts, oracle_logits, impl, static):
    """Prefill 5 tokens, then one token at a time; with tensor positions the step runs the static-shape
    path (masks over the whole cache, no host sync) that CUDA graphs capture. naive-then-absorb
    prefills on the naive path and decodes on the absorbed one, over the same cache."""
    model = build(release, "naive" if impl != "absorb" else "absorb")
    worst = (model(prompts[:, :5]) - oracle_logits[:, 4]).abs().max().item()
    if impl == "naive-then-absorb":
        set_impl(model, "absorb")
    for pos in range(5, SEQ):
        ids = prompts[:, pos:pos + 1]
        got = model.decode(ids, torch.full((prompts.size(0),), pos)) if static else model(ids, pos)
        worst = max(worst, (got - oracle_logits[:, pos]).abs().max().item())
    report(f"decode {impl} {'tensor' if static else 'int'}", worst)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_in_query_blocks_equals_one_block(release, prompts, monkeypatch, impl):
    """With SCORE_BLOCK small enough for 11 queries a block at 50 keys (3 rows x 4 heads) and 7 at 80,
    a prefill and a chunk after it give the logits of the queries taken all at once."""
    model = build(release, impl)
    whole = [model(prompts[:, :50]), model(prompts[:, 50:], start_pos=50)]
    monkeypatch.setattr(model_v3, "SCORE_BLOCK", 3 * 4 * 80 * 7)
    blocked = [model(prompts[:, :50]), model(prompts[:, 50:], start_pos=50)]
    worst = max((a - b).abs().max().item() for a, b in zip(whole, blocked))
    print(f"queries in blocks vs at once ({impl}): max |logit diff| = {worst:.2e}")
    assert worst < 1e-5


def test_stacked_experts_hold_the_experts_and_share_their_memory(release, prompts):
    """model.MoE.stacked_weights (the Triton path's expert weights), filled expert by expert: every
    expert's values at its index, its parameters views into the stacks, the logits unchanged."""
    model = build(release)
    want = model(prompts[:, :9])
    moe = model.layers[2].ffn
    before = {name: p.clone() for name, p in moe.named_parameters()}
    w13, w2, shared13 = moe.stacked_weights()[:3]
    inter = moe.experts[0].w1.weight.size(0)
    for i, e in enumerate(moe.experts):
        parts = {"w1": w13[i, :inter], "w3": w13[i, inter:], "w2": w2[i]}
        for name, part in parts.items():
            assert torch.equal(part, before[f"experts.{i}.{name}.weight"])
            assert getattr(e, name).weight.data_ptr() == part.data_ptr()
    assert torch.equal(shared13, torch.cat([before["shared_experts.w1.weight"], before["shared_experts.w3.weight"]]))
    assert all(torch.equal(p, before[name]) for name, p in moe.named_parameters())
    assert moe.stacked_weights()[0] is w13
    assert torch.equal(model(prompts[:, :9]), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_different_lengths_matches_single_sequences(release, impl):
    """Three sequences of 84, 45 and 17 tokens in one batch: a prefill of the shortest length, then
    steps with per-row positions, each row at its own position; a row past its end repeats its last
    position (rewriting the same cache entry). Every row's logits follow transformers run on that
    row alone."""
    hf = release[2]
    lengths = (84, 45, 17)
    rows = torch.randint(0, 256, (3, max(lengths)), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        alone = [hf(rows[i:i + 1, :n]).logits[0].float() for i, n in enumerate(lengths)]
    model = build(release, impl)
    first = min(lengths)
    got = model(rows[:, :first])
    worst = max((got[i] - alone[i][first - 1]).abs().max().item() for i in range(3))
    last = torch.tensor(lengths) - 1
    for step in range(first, max(lengths)):
        pos = torch.minimum(torch.full((3,), step), last)
        got = model.decode(rows.gather(1, pos.unsqueeze(1)), pos)
        worst = max(worst, max((got[i] - alone[i][pos[i]]).abs().max().item() for i in range(3)))
    report(f"batch of different lengths {impl}", worst)


def test_batch_rows_equal_single_sequences(release, prompts):
    model = build(release)
    batch = model(prompts[:, :40])
    for i in range(prompts.size(0)):
        torch.testing.assert_close(model(prompts[i:i + 1, :40]), batch[i:i + 1], rtol=0, atol=1e-5)


def test_bf16_close_to_fp32(release, prompts, oracle_logits):
    """bf16 weights, activations and caches against fp32, next to transformers' own bf16-vs-fp32 error
    on the same weights (a rounding can flip an expert on random weights)."""
    ref = build(release)(prompts)
    got = build(release, dtype="bf16")(prompts)
    with torch.no_grad():       # the fixture's weights again (same seed), in bf16
        theirs = hf_random_model(release[1], seed=0).to(torch.bfloat16)(prompts).logits[:, -1].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    rel_theirs = ((theirs - oracle_logits[:, -1]).norm() / oracle_logits[:, -1].norm()).item()
    print(f"bf16 vs fp32: relative logit error {rel:.3f} (transformers: {rel_theirs:.3f})")
    assert got.dtype == torch.float32
    assert rel < 0.1 and rel < 1.5 * rel_theirs


def test_yarn_applied_whenever_the_config_has_it(release, tmp_path):
    """max_seq_len 48 is below rope_scaling's original 64 positions. DeepSeek's own inference code
    (inference/model.py: precompute_freqs_cis and MLA's softmax_scale) would then skip YaRN, both
    the frequency interpolation and the softmax mscale; transformers applies it always, and so do we
    (the config says yarn). A model built without rope_scaling differs, so YaRN is in effect."""
    path, config, hf, state = release
    model = build(release, max_seq_len=48)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    worst = max((model(ids[:, :n]) - ref[:, n - 1]).abs().max().item() for n in (1, 10, 48))
    report("YaRN with max_seq_len <= original", worst)
    plain = write_config(tmp_path, {k: v for k, v in config.items() if k != "rope_scaling"})
    no_yarn = Transformer(ModelArgs.from_file(plain, dtype="fp32", backend="torch", max_seq_len=48))
    no_yarn.load_state_dict(state, strict=True)
    assert (no_yarn(ids) - ref[:, -1]).abs().max().item() > 1e-2


def test_softmax_scale():
    tiny = ModelArgs(qk_nope_head_dim=32, qk_rope_head_dim=16, rope_factor=4.0, original_seq_len=64, mscale=0.707,
                     max_seq_len=32)
    assert tiny.softmax_scale == pytest.approx(48 ** -0.5 * (0.1 * 0.707 * math.log(4.0) + 1) ** 2, rel=1e-12)
    r1 = ModelArgs()
    assert r1.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40.0) + 1) ** 2, rel=1e-12)
    assert ModelArgs(original_seq_len=0).softmax_scale == 192 ** -0.5


# ---------------------------------------------------------------- router

def route_by_formula(x, weight, bias, n_groups, top_groups, k, norm, scale):
    """DeepSeek-V3's routing for one token at a time in float64 Python, from its description."""
    out_w, out_e = [], []
    for row in x.double():
        scores = torch.sigmoid(weight.double() @ row).tolist()
        choice = [s + (b if bias is not None else 0.0) for s, b in zip(scores, bias.tolist() if bias is not None
                                                                         else [0.0] * len(scores))]
        size = len(scores) // n_groups
        groups = []
        for g in range(n_groups):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            groups.append((members[0] + members[1]) if bias is not None else members[0])
        kept = sorted(range(n_groups), key=lambda g: -groups[g])[:top_groups]
        allowed = [e for e in range(len(scores)) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
        w = [scores[e] for e in chosen]
        total = sum(w) if norm else 1.0
        out_w.append([v / total * scale for v in w])
        out_e.append(chosen)
    return torch.tensor(out_w), torch.tensor(out_e)


@pytest.mark.parametrize("method,norm", [("noaux_tc", True), ("noaux_tc", False), ("greedy", True)])
def test_gate_matches_formula(method, norm):
    args = ModelArgs(dim=32, n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4,
                     route_scale=2.5, topk_method=method, norm_topk_prob=norm, dtype="fp32")
    gate = Gate(args, Ops("torch", "cpu"))
    g = torch.Generator().manual_seed(5)
    gate.weight.copy_(torch.randn(16, 32, generator=g) * 32 ** -0.5)
    if gate.bias is not None:
        gate.bias.copy_(0.1 * torch.randn(16, generator=g))
    x = torch.randn(64, 32, generator=g)
    choice = torch.sigmoid(x.double() @ gate.weight.double().T) + (gate.bias.double() if gate.bias is not None else 0)
    gaps = choice.sort(dim=-1).values.diff(dim=-1)
    assert gaps.min() > 1e-6                                   # no ties that float32 could order otherwise
    weights, experts = gate(x)
    ref_w, ref_e = route_by_formula(x, gate.weight, gate.bias, 4, 2, 4, norm, 2.5)
    order, ref_order = experts.argsort(dim=-1), ref_e.argsort(dim=-1)
    assert torch.equal(experts.gather(1, order), ref_e.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.float().gather(1, ref_order), rtol=1e-5, atol=1e-6)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64


# ---------------------------------------------------------------- tensor parallelism

def _tp_worker(rank, world, folder, path, impl):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        state = torch.load(os.path.join(folder, "state.pt"))
        model = Transformer(ModelArgs.from_file(path, dtype="fp32", backend="torch", attn_impl=impl,
                                                max_seq_len=96, max_batch_size=4))
        model.load_state_dict(shard(state, rank, world, model.args.n_routed_experts), strict=True)
        out = tp_run(model, torch.load(os.path.join(folder, "prompts.pt")))
        if rank == 0:
            torch.save(out, os.path.join(folder, f"out-{impl}.pt"))
    finally:
        dist.destroy_process_group()


def tp_run(model, prompts):
    """Logits of a prefill, a second chunk and tensor-position decode steps [steps, b, vocab]."""
    out = [model(prompts[:, :20]), model(prompts[:, 20:30], start_pos=20)]
    for pos in range(30, 36):
        out.append(model.decode(prompts[:, pos:pos + 1], torch.full((prompts.size(0),), pos)))
    return torch.stack(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_parallel_2_ranks_equal_1(release, prompts, tmp_path, impl):
    """Two processes over gloo, each with its shard cut by split_dim / expert_rank (the converter's
    table), give the logits of one process."""
    import torch.multiprocessing as mp
    path, _, _, state = release
    torch.save(state, tmp_path / "state.pt")
    torch.save(prompts[:2], tmp_path / "prompts.pt")
    mp.spawn(_tp_worker, args=(2, str(tmp_path), path, impl), nprocs=2, join=True)
    got = torch.load(tmp_path / f"out-{impl}.pt")
    ref = tp_run(build(release, impl), prompts[:2])
    worst = (got - ref).abs().max().item()
    print(f"tensor parallel N=2 vs N=1 {impl}: max |logit diff| = {worst:.2e}")
    assert worst < 1e-4


# ---------------------------------------------------------------- config and names

R1_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_r1_config_reads_as_the_release(tmp_path):
    args = ModelArgs.from_file(write_config(tmp_path, R1_CONFIG), max_seq_len=8192)
    assert args == ModelArgs(max_seq_len=8192)            # the defaults are R1's
    for world in (1, 2, 4, 8, 16):
        args.validate(world)


def test_configs_hold_r1_as_released_and_a_tiny_r1():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with open(os.path.join(configs, "config_r1.json")) as f:
        r1 = json.load(f)
    assert {k: r1.get(k) for k in R1_CONFIG} == R1_CONFIG
    assert ModelArgs.from_file(os.path.join(configs, "config_r1.json")) == ModelArgs()
    tiny = ModelArgs.from_file(os.path.join(configs, "config_r1_tiny.json"))
    assert (tiny.n_layers, tiny.n_dense_layers, tiny.n_routed_experts, tiny.n_expert_groups) == (4, 1, 16, 4)
    for world in (1, 2, 4):
        tiny.validate(world)


@pytest.mark.parametrize("change,field", [
    ({"num_attention_heads": 6}, "n_heads"),
    ({"n_routed_experts": 20, "n_group": 4}, "n_routed_experts"),
    ({"n_group": 3}, "n_routed_experts"),
    ({"topk_group": 9}, "n_limited_groups"),
    ({"num_experts_per_tok": 129}, "n_activated_experts"),
    ({"vocab_size": 129281}, "vocab_size"),
    ({"intermediate_size": 18433}, "inter_dim"),
    ({"moe_intermediate_size": 2047}, "moe_inter_dim"),
    ({"scoring_func": "tanh"}, "score_func"),
    ({"first_k_dense_replace": 62}, "n_dense_layers"),
    ({"num_hidden_layers": 61.0}, r"n_layers must be an integer >= 1, got 61\.0"),
    ({"norm_topk_prob": "false"}, r"norm_topk_prob must be true or false, got 'false'"),
    ({"n_group": 0}, r"n_expert_groups must be an integer >= 1, got 0"),
    ({"first_k_dense_replace": 0, "q_lora_rank": 0}, None),
])
def test_config_errors_name_the_field(tmp_path, change, field):
    """field None: a change the checks accept (counts that may be 0)."""
    args = ModelArgs.from_file(write_config(tmp_path, {**R1_CONFIG, **change}))
    if field is None:
        args.validate(8)
        return
    with pytest.raises(ValueError, match=field):
        args.validate(8)


def test_config_file_errors(tmp_path):
    missing = {k: v for k, v in R1_CONFIG.items() if k != "kv_lora_rank"}
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelArgs.from_file(write_config(tmp_path, missing))
    with pytest.raises(ValueError, match="deepseek_v4"):
        ModelArgs.from_file(write_config(tmp_path, {**R1_CONFIG, "model_type": "deepseek_v4"}))
    odd = {**R1_CONFIG, "rope_scaling": {**R1_CONFIG["rope_scaling"], "mscale": 0.5}}
    with pytest.raises(ValueError, match="mscale_all_dim"):
        ModelArgs.from_file(write_config(tmp_path, odd))
    with pytest.raises(ValueError, match="attn_impl"):
        ModelArgs(attn_impl="flash").validate()
    with pytest.raises(ValueError, match="dtype must be 'bf16' or 'fp32', got 'fp16'"):
        ModelArgs(dtype="fp16").validate()
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, flaggems, got 'cuda'"):
        ModelArgs(backend="cuda").validate()
    with pytest.raises(ValueError, match="batch 2 x positions up to 9 exceed max_batch_size=1 / max_seq_len=8"):
        ModelArgs(max_batch_size=1, max_seq_len=8).check_step(2, 4, 5)
    full_q = ModelArgs.from_file(write_config(tmp_path, {**R1_CONFIG, "q_lora_rank": None}))
    assert full_q.q_lora_rank == 0


def test_release_names_and_layout():
    assert release_name("model.layers.0.self_attn.q_proj.weight", 61) == "layers.0.attn.wq.weight"
    assert release_name("model.layers.60.mlp.experts.255.down_proj.weight", 61) == "layers.60.ffn.experts.255.w2.weight"
    assert release_name("model.layers.3.mlp.gate.e_score_correction_bias", 61) == "layers.3.ffn.gate.bias"
    assert release_name("model.layers.9.self_attn.kv_a_proj_with_mqa.weight_scale_inv", 61) == \
        "layers.9.attn.wkv_a.scale"
    assert release_name("model.layers.61.eh_proj.weight", 61) is None          # the MTP module
    assert release_name("model.layers.61.self_attn.q_a_proj.weight", 61) is None
    with pytest.raises(ValueError):
        release_name("model.layers.2.self_attn.rotary_emb.inv_freq", 61)
    assert [split_dim(n) for n in ("embed.weight", "head.weight", "norm.weight", "layers.0.attn.wq_b.weight",
                                   "layers.0.attn.wq_a.weight", "layers.0.attn.wkv_b.weight", "layers.0.attn.wo.weight",
                                   "layers.0.ffn.w2.weight", "layers.5.ffn.shared_experts.w3.weight",
                                   "layers.5.ffn.experts.3.w1.weight", "layers.5.ffn.gate.bias")] == \
        [0, 0, None, 0, None, 0, 1, 1, 0, None, None]
    assert expert_rank("layers.5.ffn.experts.100.w3.weight", 256, 8) == 3
    assert expert_rank("layers.5.ffn.shared_experts.w3.weight", 256, 8) is None


def test_layout_fits_the_model_shapes(release):
    """Every tensor of a whole state dict, cut for rank 1 of 2, has that rank's parameter shape
    (shapes only: no process group, the model is built as rank 1 would build it)."""
    from parallel import Parallel
    path, config, _, state = release
    original = Parallel.current
    Parallel.current = classmethod(lambda cls, o_groups=None: cls(2, 1))
    try:
        model = Transformer(ModelArgs.from_file(path, dtype="fp32", max_seq_len=8, max_batch_size=1))
    finally:
        Parallel.current = original
    ours = {k: v.shape for k, v in model.state_dict().items()}
    cut = {k: v.shape for k, v in shard(state, 1, 2, config["n_routed_experts"]).items()}
    assert cut == ours


# ---------------------------------------------------------------- Triton: absorbed MLA decode (kernel.mla_decode_triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="runs in Triton's interpreter (test_triton_cases_in_the_interpreter) or on CUDA")
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


# bf16 on CUDA only: Triton's interpreter (3.9 here) computes bf16 tl.dot wrongly (model.py's kernels
# too; testkit/cases.py runs float32 in it).
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("b,h,c,r,positions,splits", [
    (3, 4, 32, 16, 70, None),        # few heads (masked to a block of 16), default shares
    (2, 20, 64, 16, 200, 3),         # two head blocks, three shares (the last ones partly empty)
    (1, 16, 96, 32, 50, 1),          # c not a power of two, one share
])
def test_mla_decode_triton_matches_reference(dtype, b, h, c, r, positions, splits):
    from kernel import mla_decode_triton
    from ops import mla_decode_torch
    g = torch.Generator().manual_seed(b * 1000 + h)
    kv = torch.randn(b + 1, positions, c, generator=g).to(DEVICE, dtype)        # a spare cache row
    pe = torch.randn(b + 1, positions, r, generator=g).to(DEVICE, dtype)
    q_lat = torch.randn(b, h, c, generator=g).to(DEVICE, dtype)
    q_pe = torch.randn(b, h, r, generator=g).to(DEVICE, dtype)
    pos = torch.tensor([37, positions - 1, 0][:b]).to(DEVICE)                   # a middle one, last, first
    scale = 0.7 * (c + r) ** -0.5
    got = mla_decode_triton(q_lat, q_pe, kv, pe, pos, scale, splits)
    want = mla_decode_torch(q_lat.double(), q_pe.double(), kv.double(), pe.double(), pos, scale)
    err = ((got.double() - want).norm() / want.norm()).item()
    print(f"mla decode {dtype} b{b} h{h} c{c} splits {splits}: relative error {err:.1e}")
    assert got.dtype == torch.float32 and err < (1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton
def test_model_decode_on_the_triton_path(release, prompts):
    """The model with backend triton (the MLA decode kernel; model.py's Triton RMSNorm and MoE)
    against backend torch: a prefill, then decode steps at per-row positions."""
    ref = build(release, "absorb")
    with torch.device(DEVICE):
        fast = build(release, "absorb", backend="triton")
    worst = (fast(prompts[:, :9].to(DEVICE)).cpu() - ref(prompts[:, :9])).abs().max().item()
    pos = torch.tensor([9, 9, 9])
    for step in range(3):
        want = ref.decode(prompts[:, 9 + step:10 + step], pos)
        got = fast.decode(prompts[:, 9 + step:10 + step].to(DEVICE), pos.to(DEVICE)).cpu()
        worst = max(worst, (got - want).abs().max().item())
        pos = pos + 1
    print(f"triton-path decode vs torch path: max |logit diff| = {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.skipif(INTERPRETED, reason="already in the interpreter")
def test_triton_cases_in_the_interpreter():
    """The @needs_triton tests above, in a child with TRITON_INTERPRET=1 (kernels run on the CPU)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
                          "-k", "mla_decode_triton or triton_path"],
                         env=dict(os.environ, TRITON_INTERPRET="1"), cwd=os.path.dirname(here),
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert re.search(r"\b5 passed", run.stdout)
