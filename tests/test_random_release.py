"""The release writer in random_release.py encodes exactly what it claims, in the layout of the V4 release."""
import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import random_release
from random_release import (TINY_HF_CONFIG, dequantize_release, hf_config, quantize_fp4, quantize_fp8,
                      read_release, tokenizer_dir, write_release)
from quant import E2M1_VALUES, dequant_fp4, dequant_fp8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("release"))
    return path, write_release(path, seed=0, n_files=3)


@pytest.fixture(scope="module")
def bf16_release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("release_bf16"))
    return path, write_release(path, seed=0, n_files=2, bf16=True)


@pytest.fixture(scope="module")
def stored(release):
    return read_release(release[0])


def _is_pow2(x: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(x.float())
    return bool(torch.all(mantissa == 0.5))


# ----------------------------------------------------------------------------- FP8

def test_fp8_round_trip_with_edge_blocks():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=gen)
    # a different magnitude in every 128x128 block, so a misplaced scale cannot go unnoticed
    for bi in range(2):
        for bj in range(3):
            w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= 2.0 ** (3 * bi - 2 * bj)
    w[128:, 256:] = 0.0                                   # an all-zero edge block
    q, scale, value = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (2, 3)
    back = dequant_fp8(q, scale, dtype=torch.float32)
    assert torch.equal(back, value)
    s = scale.float()
    assert _is_pow2(s) and s[1, 2] == 1.0
    step = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    # e4m3 keeps 4 significant bits (subnormals below 2**-6 are spaced 2**-9)
    assert torch.all((back - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, step * 2.0 ** -10))
    # the scale is the smallest power of two that fits the block maximum under 448
    for bi in range(2):
        for bj in range(2):
            amax = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].abs().max()
            assert 224.0 < amax / s[bi, bj] <= 448.0


def test_fp8_release_tensors(release, stored):
    _, ref = release
    names = [n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert "layers.0.attn.wq_b.weight" in names and "mtp.0.e_proj.weight" in names
    for name in names:
        w, scale = stored[name], stored[name[:-len("weight")] + "scale"]
        assert scale.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), name
        assert torch.equal(dequant_fp8(w, scale, dtype=torch.float32), ref[name]), name
    # 256 x 48: two row blocks, one partial column block
    assert stored["layers.0.attn.wq_b.scale"].shape == (2, 1)


# ----------------------------------------------------------------------------- FP4

def test_fp4_nibble_order_against_a_hand_packed_byte():
    # e2m1: 0.5 is code 0b0001, -3 is sign 0b1000 | magnitude index 5 -> 0b1101; low nibble first
    byte = 0b1101_0001
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = byte
    one = torch.full((1, 1), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    out = dequant_fp4(packed.view(torch.int8), one, dtype=torch.float32)
    assert out[0, :2].tolist() == [0.5, -3.0] and torch.all(out[0, 2:] == 0)

    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 0.5, -3.0, 6.0             # amax 6 -> scale 2**0
    q, scale, value = quantize_fp4(w)
    assert q.dtype == torch.int8 and q.shape == (1, 16) and scale.shape == (1, 1)
    assert q.view(torch.uint8)[0, 0].item() == byte
    assert q.view(torch.uint8)[0, 1].item() == 0b0000_0111   # 6.0 in the low nibble, 0 above it
    assert scale.view(torch.uint8).item() == 127
    assert torch.equal(value, w)


def test_fp4_rounds_to_nearest_code():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=gen) * 2.0 ** torch.arange(-3, 5).view(8, 1)
    q, scale, value = quantize_fp4(w)
    assert torch.equal(dequant_fp4(q, scale, dtype=torch.float32), value)
    s = scale.float().repeat_interleave(32, 1)
    grid = torch.tensor(sorted(set(E2M1_VALUES)))
    best = ((w / s).unsqueeze(-1) - grid).abs().min(-1).values      # distance to the nearest code
    assert torch.allclose((value / s - w / s).abs(), best)
    amax = w.view(8, 2, 32).abs().amax(-1)
    assert torch.all((amax / scale.float() > 3.0) & (amax / scale.float() <= 6.0))


def test_fp4_release_tensors(release, stored):
    _, ref = release
    cfg = TINY_HF_CONFIG
    D, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert stored["layers.3.ffn.experts.7.w1.weight"].shape == (I, D // 2)
    assert stored["layers.3.ffn.experts.7.w1.scale"].shape == (I, D // 32)
    assert stored["layers.3.ffn.experts.7.w2.weight"].shape == (D, I // 2)
    names = [n for n, t in stored.items() if t.dtype == torch.int8]
    assert len(names) == 3 * cfg["n_routed_experts"] * (cfg["num_hidden_layers"] + 1)
    for name in names:
        assert re.fullmatch(r"(layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]\.weight", name)
        w, scale = stored[name], stored[name[:-len("weight")] + "scale"]
        assert scale.shape == (w.shape[0], 2 * w.shape[1] // 32)
        assert torch.equal(dequant_fp4(w, scale, dtype=torch.float32), ref[name]), name


# ----------------------------------------------------------------------------- whole release

def test_every_scale_is_a_power_of_two(stored):
    scales = {n: t for n, t in stored.items() if n.endswith(".scale")}
    assert scales
    for name, s in scales.items():
        assert s.dtype == torch.float8_e8m0fnu, name
        assert torch.all(s.view(torch.uint8) != 255), name     # 0xFF is NaN in e8m0
        assert _is_pow2(s), name
        assert name[:-len("scale")] + "weight" in stored, name


def test_index_lists_every_tensor(release):
    path, _ = release
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    seen, total = {}, 0
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            assert len(f.keys()) > 0
            for name in f.keys():
                t = f.get_tensor(name)
                seen[name] = fname
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    for name, fname in seen.items():                    # a scale travels with its weight
        if name.endswith(".scale"):
            assert seen[name[:-len("scale")] + "weight"] == fname


def test_dequantize_release_equals_returned_dict(release, stored):
    path, ref = release
    back = dequantize_release(path)
    assert set(back) == set(ref)
    assert not any(n.endswith(".scale") for n in ref)
    for name, t in ref.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
        if name.endswith("tid2eid"):
            assert t.dtype == random_release.TID2EID_DTYPE
        else:
            assert t.dtype == torch.float32, name
        if stored[name].dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(stored[name].float(), t), name


def test_layout_of_the_tiny_release(release, stored):
    _, ref = release
    cfg = TINY_HF_CONFIG
    D, V, E, hc = cfg["hidden_size"], cfg["vocab_size"], cfg["n_routed_experts"], cfg["hc_mult"]
    dt = {n: t.dtype for n, t in stored.items()}
    assert dt["embed.weight"] == dt["head.weight"] == dt["norm.weight"] == torch.bfloat16
    assert stored["embed.weight"].shape == stored["head.weight"].shape == (V, D)
    assert stored["hc_head_fn"].shape == (hc, hc * D) and dt["hc_head_fn"] == torch.float32
    assert stored["layers.0.hc_attn_fn"].shape == ((2 + hc) * hc, hc * D)
    assert stored["layers.0.attn.wo_a.weight"].shape == (2 * 32, 4 * 64 // 2)
    assert not any(n.startswith("layers.0.attn.compressor") for n in stored)     # ratio 0
    assert stored["layers.1.attn.compressor.ape"].shape == (4, 2 * 64)            # ratio 4
    assert stored["layers.1.attn.indexer.compressor.ape"].shape == (4, 2 * 32)
    assert stored["layers.1.attn.indexer.wq_b.weight"].shape == (16 * 32, 48)
    assert stored["layers.2.attn.compressor.wkv.weight"].shape == (64, D)         # ratio 16
    assert stored["layers.2.attn.compressor.ape"].shape == (16, 64)
    assert not any(n.startswith("layers.2.attn.indexer") for n in stored)
    assert stored["mtp.0.attn.indexer.wq_b.weight"].shape == (16 * 32, 48)        # compress_ratios[5] = 4
    for i in (0, 1):
        ids = stored[f"layers.{i}.ffn.gate.tid2eid"]
        assert ids.shape == (V, 2) and ids.dtype == torch.int32
        assert ids.min() >= 0 and ids.max() < E and torch.all(ids[:, 0] != ids[:, 1])
        assert f"layers.{i}.ffn.gate.bias" not in stored
    for prefix in ("layers.2.", "layers.4.", "mtp.0."):
        assert dt[prefix + "ffn.gate.bias"] == torch.float32
        assert prefix + "ffn.gate.tid2eid" not in stored
    for name in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
                 "hc_head_fn", "hc_head_base", "hc_head_scale"):
        assert "mtp.0." + name in stored
    # realistic magnitudes: linear weights have std ~ 1/sqrt(fan_in), norms sit around 1
    assert abs(ref["layers.3.attn.wkv.weight"].std().item() * math.sqrt(D) - 1) < 0.1
    assert abs(ref["head.weight"].std().item() * math.sqrt(D) - 1) < 0.05
    assert abs(ref["layers.3.attn_norm.weight"].mean().item() - 1) < 0.1


def test_bf16_copy_holds_the_dequantised_values(release, bf16_release):
    _, ref = release
    path, ref16 = bf16_release
    assert set(ref16) == set(ref) and all(torch.equal(ref16[n], ref[n]) for n in ref)
    stored = read_release(path)
    assert set(stored) == set(ref)                                 # same names, no scales
    for name, t in stored.items():
        if t.dtype == torch.bfloat16:
            assert torch.equal(t.float(), ref[name]), name
        else:
            assert t.dtype in (torch.float32, torch.int32), name
            assert torch.equal(t, ref[name]), name
    assert stored["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    assert stored["layers.0.ffn.experts.0.w1.weight"].dtype == torch.bfloat16
    back = dequantize_release(path)
    assert all(torch.equal(back[n], ref[n]) for n in ref)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert "quantization_config" not in cfg and cfg["hidden_size"] == TINY_HF_CONFIG["hidden_size"]


def test_seed_changes_values(tmp_path):
    cfg = hf_config(vocab_size=512)
    a = write_release(str(tmp_path / "a"), cfg, seed=1, n_files=1)
    b = write_release(str(tmp_path / "b"), cfg, seed=2, n_files=4)
    c = write_release(str(tmp_path / "c"), cfg, seed=1, n_files=2)
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert not torch.equal(a["layers.0.attn.wq_a.weight"], b["layers.0.attn.wq_a.weight"])
    assert len([p for p in os.listdir(tmp_path / "b") if p.endswith(".safetensors")]) == 4


# ----------------------------------------------------------------------------- config and tokenizer

def test_config_round_trip(release):
    path, _ = release
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f) == TINY_HF_CONFIG
    cfg = TINY_HF_CONFIG
    assert cfg["layer_types"] == ["sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention", "compressed_sparse_attention",
                                  "sliding_attention"]
    assert cfg["compress_rates"] == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}

    other = hf_config(num_hidden_layers=3, compress_ratios=[0, 128, 4, 0])
    assert other["layer_types"] == ["sliding_attention", "heavily_compressed_attention",
                                    "compressed_sparse_attention"]
    assert other["compress_rates"]["heavily_compressed_attention"] == 128
    other["rope_scaling"]["factor"] = 2
    assert TINY_HF_CONFIG["rope_scaling"]["factor"] == 16            # a deep copy
    with pytest.raises(ValueError):
        hf_config(compress_ratios=[0, 16, 128, 4, 0, 0])

    from transformers import DeepseekV4Config
    hf = DeepseekV4Config(**{k: v for k, v in cfg.items() if k != "architectures"})
    assert hf.layer_types == cfg["layer_types"] and hf.compress_rates == cfg["compress_rates"]
    assert hf.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 3


def test_tokenizer_files(release):
    path, _ = release
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert tok.encode("<｜begin▁of▁sentence｜>").ids == [0]
    assert tok.token_to_id("<｜end▁of▁sentence｜>") == TINY_HF_CONFIG["eos_token_id"]
    assert tok.get_vocab_size() == TINY_HF_CONFIG["vocab_size"]
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(path, fname), "rb") as a, open(os.path.join(tokenizer_dir(), fname), "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("name", ["flash", "pro", "tiny"])
def test_configs_dir(name, release):
    from model import ModelArgs
    fname = os.path.join(ROOT, "configs", f"config_{name}.json")
    args = ModelArgs.from_file(fname)
    args.validate()
    assert len(args.compress_ratios) == args.n_layers + args.n_mtp_layers
    if name == "tiny":                        # the demo's config describes the fixture release
        hf = ModelArgs.from_file(os.path.join(release[0], "config.json"))
        with open(fname) as f:
            ours = json.load(f)
        for key, value in ours.items():
            if key not in ModelArgs.RUNTIME_KEYS:
                assert getattr(hf, key) == value, key
