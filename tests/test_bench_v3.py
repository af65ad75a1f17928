"""bench.py's DeepSeek-R1 / V3 parts on the CPU: the config picks the architecture and its defaults,
the floors' byte and FLOP counts (against the real R1 shapes on the meta device, and against the
matmul FLOPs the torch path actually runs), issue 16's target lines, `bench.py backends` on the tiny
R1 config, and transformers' twin of a built model (peers.hf_twin_v3)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model_v3
from peers import hf_twin_v3
from testkit.oracle_v3 import hf_random_model, our_state_dict, tiny_config, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R1 = os.path.join(ROOT, "configs", "config_r1.json")
R1_TINY = os.path.join(ROOT, "configs", "config_r1_tiny.json")
FLASH = os.path.join(ROOT, "configs", "config_flash.json")
GB = 1e9


def options(config, **given):
    values = dict(config=config, layers=None, batch=None, context=None, dense_layers=None)
    values.update(given)
    return argparse.Namespace(**values)


def test_the_config_picks_the_architecture_and_its_defaults():
    r1 = options(R1)
    bench.resolve(r1, ("layers", "batch", "context", "dense_layers"))
    assert (r1.layers, r1.dense_layers, r1.batch, r1.context) == (3, 1, [1, 32], [1024, 32768])
    given = options(R1, layers=5, dense_layers=3, batch=[4])
    bench.resolve(given, ("layers", "batch", "context", "dense_layers"))
    assert (given.layers, given.dense_layers, given.batch, given.context) == (5, 3, [4], [1024, 32768])
    v4 = options(FLASH)
    bench.resolve(v4, ("layers", "batch", "context", "dense_layers"))
    assert (v4.layers, v4.dense_layers, v4.batch, v4.context) == (4, None, [1, 8, 32, 128], [1024, 16384, 65536])
    with pytest.raises(SystemExit, match="--dense-layers is for DeepSeek-R1 / V3 configs"):
        bench.resolve(options(FLASH, dense_layers=1), ("layers",))
    assert bench.config_architecture(R1) == "deepseek_v3" and bench.config_architecture(FLASH) == "deepseek_v4"


def test_layers_that_cannot_be_built_are_refused():
    with pytest.raises(SystemExit, match="--layers 2 --dense-layers 3: n_dense_layers=3 must be in 0..n_layers=2"):
        bench.build(R1_TINY, 2, 1, 16, "torch", "cpu", "fp32", dense_layers=3)


@pytest.fixture(scope="module")
def r1_on_meta():
    """R1's real shapes, bench's default cut (1 dense + 2 MoE layers), no memory."""
    args = model_v3.ModelArgs.from_file(R1, n_layers=3, n_dense_layers=1, max_batch_size=32, max_seq_len=33792)
    with torch.device("meta"):
        return model_v3.Transformer(args)


def test_real_r1_layers_and_what_a_decode_step_reads(r1_on_meta):
    m = r1_on_meta
    expert = bench.param_bytes(m.layers[1].ffn.experts[0])
    assert expert == 3 * 7168 * 2048 * 2
    assert 22.9 < bench.param_bytes(m.layers[1]) / GB < 23.1                 # a MoE layer, 256 experts
    text = bench.describe_v3(m, R1)
    assert text.startswith(f"3 of the 61 layers of {R1}: 1 dense + 2 MoE (256 experts, top-8)")
    assert "Weights 50.9 GB on this rank, caches 3.7 GB" in text
    rest = bench.param_bytes(m) - bench.param_bytes(m.embed)              # a step reads no whole embedding
    one = bench.decode_bytes(m, 1, 0)
    assert one == pytest.approx(rest - 2 * (256 - 8) * expert)             # 8 experts of each MoE layer
    assert bench.decode_bytes(m, 10 ** 6, 0) == pytest.approx(rest)       # every expert
    assert bench.decode_bytes(m, 1, 1024) - one == pytest.approx(1024 * 576 * 2 * 3)
    assert bench.decode_bytes(m, 32, 32768) - bench.decode_bytes(m, 32, 0) == pytest.approx(32 * 32768 * 576 * 2 * 3)


@pytest.mark.parametrize("impl, shapes", [
    ("absorb", {}),                                                        # tiny shapes: absorbed is cheaper
    ("naive", {"kv_lora_rank": 64, "qk_nope_head_dim": 16, "v_head_dim": 16}),   # a wide latent: naive is
])
def test_prefill_flops_are_the_torch_path_s_matmul_flops(tmp_path, impl, shapes):
    """FlopCounterMode over a chunk of 40 tokens after 24 cached ones (3 rows) on the torch path, in
    the MLA form that prefill_flops_v3 takes as the cheaper one; the head is left out of both."""
    config = write_config(tmp_path, tiny_config(**shapes))
    model = model_v3.Transformer(model_v3.ModelArgs.from_file(config, dtype="fp32", backend="torch", attn_impl=impl,
                                                              max_seq_len=64, max_batch_size=3))
    with torch.no_grad():
        bench.random_weights(model)
    ids = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    model(ids[:, :24], 0)
    with FlopCounterMode(display=False) as counter:
        model(ids[:, 24:], 24)
    head = 2 * 3 * model.args.dim * model.args.vocab_size
    assert counter.get_total_flops() - head == bench.prefill_flops(model, 3 * 40, 64, rows=3)


def test_targets_lines():
    rows = [dict(ctx=1024, batch=1, decode_ms=1.0, decode_floor=0.74), dict(ctx=32768, batch=1, decode_ms=1.2,
                                                                            decode_floor=0.70),
            dict(ctx=1024, batch=32, decode_ms=10.0, decode_floor=0.5), dict(ctx=32768, batch=32, decode_ms=14.0,
                                                                             decode_floor=0.4)]
    assert bench.targets_v3(rows, {1: 12.5, 8: 4.0}) == [
        "decode, batch 1, ctx 1024: 74% of its bandwidth floor (target >= 70%: met)",
        "decode, batch 1, ctx 1024: 12.5x transformers' step (target >= 10x: met)",
        "decode, batch 1: ctx 32768 takes 1.20x ctx 1024 (target <= 1.3x: met)",
        "decode, batch 32: ctx 32768 takes 1.40x ctx 1024 (target <= 1.3x: NOT met)"]
    assert bench.targets_v3(rows[2:3], {}) == []


def test_backends_on_the_cpu_with_the_tiny_r1_config(tmp_path):
    report = tmp_path / "backends.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "backends", "--device", "cpu", "--config",
                          R1_TINY, "--prompt-len", "7", "--steps", "4", "--backends", "torch", "torch", "--dtype", "fp32",
                          "--report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(report.read_text())
    assert data["layers"] == 3 and data["config"] == R1_TINY
    vs = data["backends"][1]["vs_reference"]
    assert vs["max_abs"] == 0 and vs["top1"] == 1.0 and vs["first_divergence"] is None


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(transformers' model with random weights, our fp32 model holding the same values)."""
    config = tiny_config()
    hf = hf_random_model(config, seed=0)
    path = write_config(tmp_path_factory.mktemp("twin"), config)
    model = model_v3.Transformer(model_v3.ModelArgs.from_file(path, dtype="fp32", backend="torch", max_seq_len=96,
                                                              max_batch_size=3))
    model.load_state_dict(our_state_dict(hf, config["num_hidden_layers"]), strict=True)
    return hf, model


def test_the_twin_shares_our_tensors_and_gives_our_logits(tiny_pair):
    hf, model = tiny_pair
    twin = hf_twin_v3(model)
    layer = twin.model.layers[2]
    w13, w2 = model.layers[2].ffn.stacked_weights()[:2]
    assert layer.mlp.experts.gate_up_proj.data_ptr() == w13.data_ptr()
    assert layer.mlp.experts.down_proj.data_ptr() == w2.data_ptr()
    assert layer.self_attn.kv_b_proj.weight.data_ptr() == model.layers[2].attn.wkv_b.weight.data_ptr()
    assert twin.lm_head.weight.data_ptr() == model.head.weight.data_ptr()
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = twin(ids).logits[:, -1].float()
        oracle = hf(ids).logits[:, -1].float()
    ours = model(ids)
    assert (theirs - ours).abs().max() < 1e-4 and (theirs - oracle).abs().max() < 1e-4


def test_a_bf16_twin_decodes_with_its_cache(tiny_pair):
    """In bf16 the norms become bf16 copies and the router's bias stays float32; a prefill and a
    cached decode step, as bench.hf_decode_ms runs them, stay within bf16 drift of the float32
    oracle's logits for the same tokens (as our bf16 model does)."""
    hf, model = tiny_pair
    ours = model_v3.Transformer(model_v3.ModelArgs(**{**model.args.__dict__, "dtype": "bf16"}))
    ours.load_state_dict(model.state_dict())
    twin = hf_twin_v3(ours)
    assert twin.model.norm.weight.dtype == torch.bfloat16
    assert twin.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = twin(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        step = twin(nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1].float()
        oracle = hf(torch.cat([ids, nxt], 1)).logits[:, -1].float()
    ours(ids, 0)
    mine = ours(nxt, 30)
    for got in (step, mine):
        assert ((got - oracle).norm() / oracle.norm()).item() < 0.05
