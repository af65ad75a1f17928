"""DeepSeek-V3 / DeepSeek-R1: the transformer, with tensor parallelism over torch.distributed.

Sections, top to bottom:
  release_name, split_dim, expert_index   checkpoint names (Hugging Face -> ours) and the tensor-parallel
                                          layout a converter shards by
  ModelArgs                               hyper-parameters from a release's config.json (deepseek_v3)
  MLA                                     multi-head latent attention, naive and absorbed paths
  MLP, Gate, MoE                          dense layers; grouped sigmoid routing with a bias; experts
  Block, Transformer                      pre-norm residual layers; logits of the last position

Shapes: b batch, s new tokens, t cached positions, h local heads, D model dim, c kv_lora_rank,
r qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim.
"""
import re
from typing import Optional

# ---------------------------------------------------------------- checkpoint names and layout

# One dotted part of a Hugging Face name -> ours; parts not listed are kept as they are.
_HF_PARTS = {
    "embed_tokens": "embed", "lm_head": "head", "self_attn": "attn", "mlp": "ffn",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
    "e_score_correction_bias": "bias", "weight_scale_inv": "scale",
}

# Every name of a converted checkpoint (".scale" only for a quantised weight's block scales, which a
# converter that dequantises never writes).
_OUR_NAME = re.compile(
    r"(embed|head|norm)\.weight"
    r"|layers\.\d+\.(attn_norm|ffn_norm)\.weight"
    r"|layers\.\d+\.attn\.(wq|wq_a|q_norm|wq_b|wkv_a|kv_norm|wkv_b|wo)\.(weight|scale)"
    r"|layers\.\d+\.ffn\.(w[123]|shared_experts\.w[123]|experts\.\d+\.w[123])\.(weight|scale)"
    r"|layers\.\d+\.ffn\.gate\.(weight|bias)")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def release_name(hf_name: str, n_layers: int) -> Optional[str]:
    """Our name of a tensor of a Hugging Face DeepSeek-V3/R1 checkpoint, e.g.
    'model.layers.5.mlp.experts.7.gate_proj.weight' -> 'layers.5.ffn.experts.7.w1.weight'.

    None for the multi-token-prediction module, stored as layers n_layers and up (n_layers is the
    config's num_hidden_layers; R1's MTP layer is 61), which the model does not use. A quantised
    weight's 'weight_scale_inv' becomes '.scale'. Raises ValueError for a name that is neither.
    """
    m = _LAYER.match(hf_name)
    if m and int(m.group(1)) >= n_layers:
        return None
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    name = ".".join(_HF_PARTS.get(part, part) for part in name.split("."))
    if not _OUR_NAME.fullmatch(name):
        raise ValueError(f"{hf_name}: not a DeepSeek-V3 checkpoint tensor (mapped to {name!r})")
    return name


# Tensor-parallel layout: which weights each of N ranks holds a 1/N slice of, and along which dim.
# A rule matches a name that ends with its text (".weight" names; the rest are replicated).
SPLITS = {
    0: ("embed.weight", "head.weight",                       # vocabulary rows
        "attn.wq.weight", "attn.wq_b.weight", "attn.wkv_b.weight",   # heads (rows, head by head)
        "ffn.w1.weight", "ffn.w3.weight",                    # dense MLP width
        "ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight"),
    1: ("attn.wo.weight", "ffn.w2.weight", "ffn.shared_experts.w2.weight"),
}
# Routed experts are not sliced: expert e lives whole on rank e // (n_routed_experts // N).
EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(weight|scale)$")


def split_dim(name: str) -> Optional[int]:
    """The dim along which our tensor `name` is cut into N equal consecutive slices, slice i for
    rank i (0: rows, 1: columns), or None when every rank holds it whole or, for a routed expert
    (see expert_index), when one rank holds it whole and the others not at all.

    Replicated: the norms, attn.wq_a, attn.wkv_a, ffn.gate.weight and ffn.gate.bias.
    'embed.weight' and 'head.weight' are cut by vocabulary rows (ParallelEmbedding, ParallelHead);
    the heads' rows of wq/wq_b/wkv_b are contiguous per head, so a row slice is a slice of heads.
    """
    if EXPERT.search(name):
        return None
    for dim, suffixes in SPLITS.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return dim
    return None


def expert_index(name: str) -> Optional[int]:
    """The routed expert a tensor belongs to, or None: 'layers.3.ffn.experts.17.w2.weight' -> 17."""
    m = EXPERT.search(name)
    return int(m.group(1)) if m else None


def expert_rank(name: str, n_routed_experts: int, world_size: int) -> Optional[int]:
    """The one rank that holds routed expert tensor `name`, or None when it is not a routed expert."""
    e = expert_index(name)
    return None if e is None else e // (n_routed_experts // world_size)
