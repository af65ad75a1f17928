"""model.py against transformers' DeepseekV4ForCausalLM (the oracle) on a random release-format checkpoint.

The fixture has window 8, compress ratios 0/4/16/4/0 (plus an MTP layer), 16 indexer heads with
top-4, hash routing in the first two layers; prompts of up to 72 tokens cross every window and
compression boundary several times.
"""
import copy
import json
import os

import pytest
import torch

from random_release import hf_config, write_release
from model import ModelArgs, Transformer
from parallel import precompute_freqs_cis
from peers import hf_model

SEQ = 72
TOL = 1e-3
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "config_tiny.json")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    weights = write_release(path, seed=0, n_files=2)
    with open(os.path.join(path, "config.json")) as f:
        return str(path), json.load(f), weights


def build(release, dtype="fp32", **kw):
    path, _, weights = release
    sizes = {"max_seq_len": 128, "max_batch_size": 4, **kw}
    args = ModelArgs.from_file(os.path.join(path, "config.json"), dtype=dtype, **sizes)
    model = Transformer(args)
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def ours(release):
    return build(release)


@pytest.fixture(scope="module")
def prompts(release):
    return torch.randint(0, release[1]["vocab_size"], (3, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def oracle_logits(release, prompts):
    """transformers' full-sequence logits at every position [3, SEQ, vocab]."""
    _, config, weights = release
    with torch.no_grad():
        return hf_model(config, weights)(prompts).logits.float()


def test_prefill_matches_transformers(ours, prompts, oracle_logits):
    worst = 0.0
    for length in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 64, SEQ):
        got = ours(prompts[:, :length])
        worst = max(worst, (got - oracle_logits[:, length - 1]).abs().max().item())
    print(f"prefill: max |logit diff| vs transformers = {worst:.2e}")
    assert worst < TOL


@pytest.mark.parametrize("static", [False, True], ids=["int-positions", "tensor-positions"])
def test_incremental_decode_matches_transformers(ours, prompts, oracle_logits, static):
    """Prefill 5 tokens, then one token at a time; with tensor positions the step runs the
    static-shape decode path (whole-cache masks, no host sync) that CUDA graphs capture."""
    worst = (ours(prompts[:, :5]) - oracle_logits[:, 4]).abs().max().item()
    for pos in range(5, SEQ):
        ids = prompts[:, pos:pos + 1]
        got = ours.decode(ids, torch.full((prompts.size(0),), pos)) if static else ours(ids, pos)
        worst = max(worst, (got - oracle_logits[:, pos]).abs().max().item())
    print(f"decode: max |logit diff| vs transformers over {SEQ - 5} steps = {worst:.2e}")
    assert worst < TOL


def test_decode_to_the_last_position_of_an_uneven_max_seq_len(release, prompts, oracle_logits):
    """max_seq_len 37 is a multiple of neither compression ratio (4, 16): the last positions' windows
    never complete, yet a decode step writes their entries; up to position 36 the logits follow the oracle."""
    model = build(release, max_seq_len=37)
    worst = (model(prompts[:, :30]) - oracle_logits[:, 29]).abs().max().item()
    for pos in range(30, 37):
        got = model.decode(prompts[:, pos:pos + 1], torch.full((prompts.size(0),), pos))
        worst = max(worst, (got - oracle_logits[:, pos]).abs().max().item())
    assert worst < TOL


def test_cache_no_longer_than_index_topk_leaves_the_indexer_out(release, prompts, oracle_logits):
    """max_seq_len 16 with index_topk 4: a ratio-4 cache holds at most 4 entries, all of which the top-k
    keeps, so those layers attend every visible entry without the indexer; prefill, decode steps and
    a second chunk still follow the oracle. (The fixture's other tests, max_seq_len 128, run it.)"""
    model = build(release, max_seq_len=16)
    csa = [layer.attn for layer in model.layers if layer.attn.indexer is not None]
    assert csa and not any(attn.indexed for attn in csa) and all(attn.indexed for attn in
                                                                 (layer.attn for layer in build(release).layers)
                                                                 if attn.indexer is not None)
    worst = (model(prompts[:, :6]) - oracle_logits[:, 5]).abs().max().item()
    for pos in range(6, 11):
        got = model.decode(prompts[:, pos:pos + 1], torch.full((prompts.size(0),), pos))
        worst = max(worst, (got - oracle_logits[:, pos]).abs().max().item())
    worst = max(worst, (model(prompts[:, 11:16], 11) - oracle_logits[:, 15]).abs().max().item())
    assert worst < TOL


def test_decode_floor_counts_the_indexer_only_where_a_step_runs_it():
    """bench.decode_bytes (the bandwidth floor's bytes) leaves out the indexer's weights and cache reads
    where Attention.indexed leaves the indexer out of the step (the tiny config, on the meta device)."""
    import bench
    with torch.device("meta"):
        short, long = (Transformer(ModelArgs.from_file(TINY, max_seq_len=n)) for n in (16, 512))
    csa = [layer.attn for layer in long.layers if layer.attn.indexed]
    assert len(csa) == 2 and not any(layer.attn.indexed for layer in short.layers)
    a, ctx = long.args, 12
    left_out = sum(bench.param_bytes(attn.indexer) for attn in csa) + len(csa) * ctx // 4 * a.index_head_dim * 2
    assert bench.decode_bytes(long, 1, ctx) - bench.decode_bytes(short, 1, ctx) == pytest.approx(left_out)


@pytest.mark.parametrize("assign", [False, True], ids=["copied-in", "parameters-replaced"])
def test_decode_projections_follow_reloaded_weights(release, prompts, tmp_path, assign):
    """A decode step reads the attention-input projections from one stacked matrix whose views are
    the parameters: weights loaded afterwards, copied into the parameters or replacing them, must
    change what the step computes, exactly as a model built with those weights computes it."""
    model = build(release)
    step = torch.full((prompts.size(0),), 9)
    model(prompts[:, :9])
    model.decode(prompts[:, 9:10], step)                        # stacks the projections
    other = write_release(tmp_path, seed=1, n_files=1)
    model.load_state_dict({k: v.clone() for k, v in other.items()}, strict=True, assign=assign)
    fresh = build((str(tmp_path), None, other))
    for m in (model, fresh):
        m(prompts[:, :9])
    torch.testing.assert_close(model.decode(prompts[:, 9:10], step), fresh.decode(prompts[:, 9:10], step),
                               rtol=0, atol=0)


def test_chunked_prefill_matches_transformers(ours, prompts, oracle_logits):
    start, worst = 0, 0.0
    for size in (7, 9, 16, 1, 3, 20, 16):          # chunks straddle windows and compression boundaries
        got = ours(prompts[:, start:start + size], start_pos=start)
        start += size
        worst = max(worst, (got - oracle_logits[:, start - 1]).abs().max().item())
    assert start == SEQ
    assert worst < TOL


def test_batch_rows_equal_single_sequences(ours, prompts):
    batch = ours(prompts[:, :40])
    for i in range(prompts.size(0)):
        torch.testing.assert_close(ours(prompts[i:i + 1, :40]), batch[i:i + 1], rtol=0, atol=1e-5)


def test_bf16_close_to_fp32(release, ours, prompts, oracle_logits):
    """bf16 weights and activations against fp32, next to transformers' own bf16-vs-fp32 error on the
    same weights (random 5-layer fixtures are touchy: a rounding can flip an expert or an index pick)."""
    _, config, weights = release
    ref = ours(prompts)
    got = build(release, dtype="bf16")(prompts)
    with torch.no_grad():
        theirs = hf_model(config, weights, torch.bfloat16)(prompts).logits[:, -1].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    rel_theirs = ((theirs - oracle_logits[:, -1]).norm() / oracle_logits[:, -1].norm()).item()
    print(f"bf16 vs fp32: relative logit error {rel:.3f} (transformers: {rel_theirs:.3f}), "
          f"max |diff| {(got - ref).abs().max().item():.3f}")
    assert got.dtype == torch.float32
    assert rel < 0.15 and rel < 1.25 * rel_theirs
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def moe_by_formula(moe, x, ids, limit):
    """The official MoE: sqrtsoftplus scores, top-k of score + bias (or tid2eid), weights normalised
    and scaled, routed experts clamped by swiglu_limit, the shared expert NOT clamped."""
    gate = moe.gate
    scores = torch.nn.functional.softplus(x @ gate.weight.T).sqrt()
    chosen = gate.tid2eid[ids].long() if gate.hash else (scores + gate.bias).topk(gate.topk).indices
    w = scores.gather(1, chosen)
    w = w / w.sum(-1, keepdim=True) * gate.route_scale

    def ffn(e, v, clamp):
        g, u = v @ e.w1.weight.T, v @ e.w3.weight.T
        if clamp:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return (torch.nn.functional.silu(g) * u) @ e.w2.weight.T
    out = ffn(moe.shared_experts, x, clamp=False)
    for t in range(x.size(0)):
        for j in range(chosen.size(1)):
            out[t] += w[t, j] * ffn(moe.experts[chosen[t, j]], x[t:t + 1], clamp=True)[0]
    return out


def test_reference_wins_shared_expert_is_not_clamped(release):
    """transformers clamps the shared expert with swiglu_limit; DeepSeek's reference does not
    (its shared expert is built without the limit). We follow the reference."""
    path, config, weights = release
    limit = 0.05                      # small enough that the shared expert's activations pass it
    model = build(release, swiglu_limit=limit)
    layer = 3                         # a score-routed layer
    moe = model.layers[layer].ffn
    x = torch.randn(6, config["hidden_size"], generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, config["vocab_size"], (6,))
    got = moe(x.unsqueeze(0), ids.unsqueeze(0))[0]
    torch.testing.assert_close(got, moe_by_formula(moe, x, ids, limit), rtol=1e-4, atol=1e-5)

    hf = hf_model(dict(config, swiglu_limit=limit), weights)
    with torch.no_grad():
        theirs = hf.model.layers[layer].mlp(x.view(1, 6, -1), input_ids=ids.view(1, 6))[0]
        shared_clamped = hf.model.layers[layer].mlp.shared_experts(x)
        shared_free = moe.shared_experts(x)
    assert (theirs - got).abs().max() > 1e-3                        # the two disagree ...
    torch.testing.assert_close(theirs - shared_clamped, got - shared_free, rtol=1e-4, atol=1e-5)  # ... only there


def test_rotary_tables_are_one_of_each_kind(ours):
    """Every layer (MTP included) turns with the model's two tables, window-only layers by rope_theta and
    compressed ones by compress_rope_theta with YaRN, the values precompute_freqs_cis gives."""
    a = ours.args
    window = torch.view_as_real(precompute_freqs_cis(a.rope_head_dim, a.max_seq_len, 0, a.rope_theta, 1.0, 0, 0))
    compressed = torch.view_as_real(precompute_freqs_cis(a.rope_head_dim, a.max_seq_len, a.original_seq_len,
                                                         a.compress_rope_theta, a.rope_factor, a.beta_fast,
                                                         a.beta_slow))
    layers = list(ours.layers) + list(ours.mtp)
    assert {layer.attn.ratio > 0 for layer in layers} == {False, True}
    for layer in layers:
        table = layer.attn.freqs_cis
        assert table is (ours.rope.compressed if layer.attn.ratio else ours.rope.window)
        torch.testing.assert_close(table, compressed if layer.attn.ratio else window, rtol=0, atol=0)
    tables = [b for name, b in ours.named_buffers() if name.startswith("rope.")]
    assert len(tables) == 2 and not any("freqs" in name for name, _ in ours.named_buffers())


def test_mtp_block_loads_and_predicts(release, ours, prompts):
    _, _, weights = release
    assert any(k.startswith("mtp.0.") for k in weights)
    assert torch.equal(ours.mtp[0].e_proj.weight, weights["mtp.0.e_proj.weight"])
    h = torch.randn(2, 6, ours.args.hc_mult, ours.args.dim)
    a = ours.mtp[0].predict(h, 0, prompts[:2, :6], ours.embed, ours.head)
    b = ours.mtp[0].predict(h, 0, prompts[:2, 1:7], ours.embed, ours.head)
    assert a.shape == (2, ours.args.vocab_size) and a.isfinite().all()
    assert (a - b).abs().max() > 1e-3                                # depends on the next tokens


def test_hf_config_and_our_config_agree(release):
    path, _, _ = release
    ours_cfg = ModelArgs.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "config_tiny.json"))
    theirs = ModelArgs.from_file(os.path.join(path, "config.json"))
    for name in ("max_batch_size", "max_seq_len"):
        setattr(theirs, name, getattr(ours_cfg, name))
    assert ours_cfg == theirs


@pytest.mark.parametrize("name", ["config_flash.json", "config_pro.json"])
def test_real_configs_validate_for_8_and_16_ranks(name):
    args = ModelArgs.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    args.validate(8)
    if args.o_groups < 16:
        with pytest.raises(ValueError, match="USE_OGROUPS_COMM"):
            args.validate(16)
        args.ogroups_comm = True
    args.validate(16)


def write_json(tmp_path, data):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_config_errors_name_the_field(tmp_path):
    cfg = hf_config()
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by the world size 3"):
        ModelArgs.from_file(write_json(tmp_path, cfg)).validate(3)
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by the world size 4"):
        ModelArgs.from_file(write_json(tmp_path, dict(cfg, n_routed_experts=6, num_attention_heads=8,
                                                      o_groups=4))).validate(4)
    with pytest.raises(ValueError, match=r"compress_ratios\[1\] = 3 is unknown"):
        ModelArgs.from_file(write_json(tmp_path, dict(cfg, compress_ratios=[0, 3, 16, 4, 0, 4]))).validate()
    with pytest.raises(ValueError, match="o_groups=2 is not divisible by the world size 4; set USE_OGROUPS_COMM"):
        ModelArgs.from_file(write_json(tmp_path, cfg)).validate(4)
    broken = copy.deepcopy(cfg)
    del broken["num_attention_heads"]
    with pytest.raises(ValueError, match="missing config key 'num_attention_heads'"):
        ModelArgs.from_file(write_json(tmp_path, broken))
    with pytest.raises(ValueError, match="missing config key 'head_dim'"):              # null, no default
        ModelArgs.from_file(write_json(tmp_path, dict(cfg, head_dim=None)))
    assert ModelArgs.from_file(write_json(tmp_path, dict(cfg, swiglu_limit=None))).swiglu_limit == 0.0  # the default
    for change, message in (({"hidden_size": "64"}, "dim must be an integer >= 1, got '64'"),
                            ({"o_groups": 0}, "o_groups must be an integer >= 1, got 0"),
                            ({"rms_norm_eps": "1e-6"}, "norm_eps must be a finite number, got '1e-6'"),
                            ({"compress_ratios": [0, -4]}, r"compress_ratios must be a list of integers >= 0"),
                            ({"rope_scaling": "yarn"}, "rope_scaling must be an object, got 'yarn'")):
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_file(write_json(tmp_path, dict(cfg, **change))).validate()
    with pytest.raises(ValueError, match="not a JSON object"):
        ModelArgs.from_file(write_json(tmp_path, [1, 2]))
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "config_tiny.json")) as f:
        tiny = json.load(f)
    with pytest.raises(ValueError, match=r"missing config key\(s\) \['dim'\]"):
        ModelArgs.from_file(write_json(tmp_path, {k: v for k, v in tiny.items() if k != "dim"}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['n_head'\]"):
        ModelArgs.from_file(write_json(tmp_path, dict(tiny, n_head=4)))
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        Transformer(ModelArgs.from_file(write_json(tmp_path, cfg), max_batch_size=1, max_seq_len=16))(
            torch.zeros(2, 4, dtype=torch.long))
