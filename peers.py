"""transformers' DeepseekV4ForCausalLM as a peer: the oracle the tests compare our model with
(hf_model, from a state dict in the release layout) and the implementation bench.py times beside
ours (hf_twin, sharing a built model's GPU tensors). hf_twin_v3 is the same for DeepSeek-R1 / V3:
transformers' DeepseekV3ForCausalLM on a built model_v3.Transformer's tensors."""
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


def hf_twin(model):
    """transformers' DeepseekV4ForCausalLM on the same GPU tensors (experts shared, not copied)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

    a = model.args
    ratio_type = {0: "sliding_attention", 4: "compressed_sparse_attention"}
    cfg = DeepseekV4Config(
        vocab_size=a.vocab_size, hidden_size=a.dim, moe_intermediate_size=a.moe_inter_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, head_dim=a.head_dim, qk_rope_head_dim=a.rope_head_dim, q_lora_rank=a.q_lora_rank,
        o_groups=a.o_groups, o_lora_rank=a.o_lora_rank, sliding_window=a.window_size,
        layer_types=[ratio_type.get(r, "heavily_compressed_attention") for r in a.compress_ratios[:a.n_layers]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        num_hash_layers=a.n_hash_layers, n_routed_experts=a.n_routed_experts, num_experts_per_tok=a.n_activated_experts,
        routed_scaling_factor=a.route_scale, swiglu_limit=a.swiglu_limit, index_n_heads=a.index_n_heads,
        index_head_dim=a.index_head_dim, index_topk=a.index_topk, hc_mult=a.hc_mult, rope_theta=a.rope_theta,
        compress_rope_theta=a.compress_rope_theta, max_position_embeddings=a.max_seq_len,
        rope_scaling={"type": "yarn", "factor": a.rope_factor, "original_max_position_embeddings": a.original_seq_len,
                      "beta_fast": a.beta_fast, "beta_slow": a.beta_slow}, num_nextn_predict_layers=0)
    with torch.device("meta"):
        hf = DeepseekV4ForCausalLM(cfg).to(torch.bfloat16)
    shapes = {k: v for k, v in hf.state_dict().items()}
    ours = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    state = {k: v.to(shapes[k].dtype) for k, v in hf_state_dict(ours).items()}
    for i, layer in enumerate(model.layers):
        w13, w2, _, _ = layer.ffn.stacked_weights()
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = w13
        state[f"model.layers.{i}.mlp.experts.down_proj"] = w2
    with torch.inference_mode():            # our stacked experts are inference tensors
        hf.load_state_dict(state, strict=False, assign=True)
    for name, module in hf.named_modules():
        if isinstance(module, hf_mod.DeepseekV4RotaryEmbedding):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            setattr(parent, name.rsplit(".", 1)[-1], hf_mod.DeepseekV4RotaryEmbedding(cfg, device="cuda"))
    leftovers = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"transformers twin: tensors left on meta: {leftovers[:5]}")
    return hf.eval()


def hf_twin_v3(model):
    """transformers' DeepseekV3ForCausalLM (in eval mode, on the model's device) holding a built
    model_v3.Transformer's tensors: the weights shared, the routed experts as the model's stacked
    copies (model.MoE.stacked_weights, which the Triton path decodes from), the norms cast to the
    model dtype (ours are float32) and the router's correction bias kept in float32. One rank only."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model_v3 import release_name

    a = model.args
    if model.tp.world_size != 1:
        raise ValueError("transformers twin: one rank only")
    if (a.score_func, a.topk_method) != ("sigmoid", "noaux_tc"):
        raise ValueError(f"transformers' DeepseekV3 routes by sigmoid scores with noaux_tc, not "
                         f"{a.score_func} with {a.topk_method}")
    yarn = {"type": "yarn", "factor": a.rope_factor, "original_max_position_embeddings": a.original_seq_len,
            "beta_fast": a.beta_fast, "beta_slow": a.beta_slow, "mscale": a.mscale, "mscale_all_dim": a.mscale}
    cfg = DeepseekV3Config(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.inter_dim,
        moe_intermediate_size=a.moe_inter_dim, num_hidden_layers=a.n_layers, first_k_dense_replace=a.n_dense_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_heads, n_routed_experts=a.n_routed_experts, n_shared_experts=a.n_shared_experts,
        num_experts_per_tok=a.n_activated_experts, n_group=a.n_expert_groups, topk_group=a.n_limited_groups,
        routed_scaling_factor=a.route_scale, norm_topk_prob=a.norm_topk_prob, q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        rope_scaling=yarn if a.original_seq_len > 0 else None, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False)
    device = model.embed.weight.device
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(cfg).to(model.embed.weight.dtype).requires_grad_(False)
    ours = model.state_dict()
    state = {}
    for name, meta in hf.state_dict().items():
        experts = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if experts:
            w13, w2 = model.layers[int(experts.group(1))].ffn.stacked_weights()[:2]
            state[name] = w13 if experts.group(2) == "gate_up_proj" else w2
        elif name.endswith(".e_score_correction_bias"):
            state[name] = ours[release_name(name, a.n_layers)]
        else:
            state[name] = ours[release_name(name, a.n_layers)].to(meta.dtype)
    with torch.inference_mode():            # our stacked experts are inference tensors
        hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(device)
    leftovers = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"transformers twin: tensors left on meta: {leftovers[:5]}")
    return hf.eval()
