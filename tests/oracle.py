"""transformers' DeepseekV4ForCausalLM built from a state dict in the release layout: the oracle."""
import re

import torch

# Release name pieces -> transformers name pieces, applied in order to names without the layer prefix.
_RENAMES = [
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_attn_(fn|base|scale)$", r"attn_hc.\1"),
    (r"^hc_ffn_(fn|base|scale)$", r"ffn_hc.\1"),
    (r"^attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"^attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^attn\.", "self_attn."),
    (r"^ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^ffn\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^ffn\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^ffn\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
    (r"^ffn\.", "mlp."),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.attn_sink$", ".sinks"),
    (r"compressor\.(indexer\.)?norm\.", r"compressor.\1kv_norm."),
    (r"\.ape$", ".position_bias"),
]
_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def hf_state_dict(release: dict) -> dict:
    """Map release tensors (float) to transformers names; experts are stacked, MTP is dropped."""
    out, experts = {}, {}
    for name, t in release.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m is None:
            continue  # mtp.*: transformers does not build the MTP block
        layer, rest = int(m.group(1)), m.group(2)
        e = re.match(r"ffn\.experts\.(\d+)\.(w[123])\.weight", rest)
        if e:
            experts.setdefault(layer, {})[(int(e.group(1)), e.group(2))] = t
            continue
        for pattern, repl in _RENAMES:
            rest = re.sub(pattern, repl, rest)
        out[f"model.layers.{layer}.{rest}"] = t
    for layer, ws in experts.items():
        n = 1 + max(i for i, _ in ws)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ws[(i, "w1")], ws[(i, "w3")]], dim=0) for i in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([ws[(i, "w2")] for i in range(n)])
    return out


def hf_model(config: dict, release: dict, dtype=torch.float32):
    """DeepseekV4ForCausalLM with the release's weights, in eval mode."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "expert_dtype")}
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg)).to(dtype).eval()
    state = hf_state_dict(release)
    state = {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise KeyError(f"oracle load: missing {missing}, unexpected {unexpected}")
    return model
