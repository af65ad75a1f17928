"""transformers' DeepseekV3ForCausalLM with random weights (the oracle for model_v3.py), and its
state dict under our names."""
import json
import os
import re

import torch

from model_v3 import expert_rank, release_name, split_dim


def tiny_config(**overrides) -> dict:
    """A small DeepSeek-V3 config.json: 4 layers (2 dense), 16 experts in 4 groups (2 kept, top 4),
    two shared experts, Q-LoRA, and YaRN (factor 4 from 64 positions, mscale = mscale_all_dim = 0.707,
    as DeepSeek-V2 had; R1 has 1.0)."""
    cfg = {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "first_k_dense_replace": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def write_config(folder, config: dict) -> str:
    path = os.path.join(str(folder), "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def hf_random_model(config: dict, seed: int = 0):
    """DeepseekV3ForCausalLM (float32, eager attention, eval) with every tensor random: projections
    ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.2^2), the router's correction bias ~ N(0, 0.1^2)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**config)
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if "rotary_emb" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * t.size(-1) ** -0.5)
    return model


def our_state_dict(hf_model, n_layers: int) -> dict:
    """The model's tensors under our names (release_name), stacked experts taken apart:
    gate_up_proj [E, 2I, D] -> experts.e.w1 (first I rows) and w3, down_proj [E, D, I] -> w2."""
    out = {}
    for name, t in hf_model.state_dict().items():
        if "rotary_emb" in name:
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m:
            prefix = f"layers.{m.group(1)}.ffn.experts"
            for e in range(t.size(0)):
                if m.group(2) == "down_proj":
                    out[f"{prefix}.{e}.w2.weight"] = t[e].clone()
                else:
                    w1, w3 = t[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1.clone(), w3.clone()
            continue
        ours = release_name(name, n_layers)
        if ours is not None:
            out[ours] = t.clone()
    return out


def shard(state: dict, rank: int, world_size: int, n_routed_experts: int) -> dict:
    """Rank `rank`'s part of a whole state dict by model_v3's layout (split_dim, expert_rank)."""
    out = {}
    for name, t in state.items():
        owner = expert_rank(name, n_routed_experts, world_size)
        if owner is not None:
            if owner == rank:
                out[name] = t
            continue
        dim = split_dim(name)
        out[name] = t if dim is None else t.chunk(world_size, dim=dim)[rank].clone()
    return out
