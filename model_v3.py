"""DeepSeek-V3 / DeepSeek-R1: the transformer, with tensor parallelism over torch.distributed.

Sections, top to bottom:
  release_name, split_dim, expert_index   checkpoint names (Hugging Face -> ours) and the tensor-parallel
                                          layout a converter shards by
  ModelArgs                               hyper-parameters from a release's config.json (deepseek_v3)
  MLA                                     multi-head latent attention, naive and absorbed paths
  MLP, Gate, MoE                          dense layers; grouped sigmoid routing with a bias; experts
  Block, Transformer                      pre-norm residual layers; logits of the last position

The release's FP8 projections (every 2-D weight but the embedding, the head and the gate) are held
as the shards hold them (ModelArgs.weights, from the shards' config.json): in the model dtype, or as
released with their float32 block scales, dequantised on the fly (parallel.Quantised).

Shapes: b batch, s new tokens, t cached positions, h local heads, D model dim, c kv_lora_rank,
r qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim.
"""
import math
import re
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

from model import Expert, MoE as V4MoE         # the expert machinery shared with DeepSeek-V4
from ops import Ops, apply_rotary
from parallel import (ColumnParallelLinear, ConfigFile, Linear, Parallel, ParallelEmbedding, ParallelHead,
                      RMSNorm, RowParallelLinear, dtype_of, precompute_freqs_cis, quantised_formats)
from quant import shard_weights

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


# ---------------------------------------------------------------- hyper-parameters

@dataclass
class ModelArgs(ConfigFile):
    """Hyper-parameters. Field names follow model.py's (and DeepSeek's own inference code); from_file
    reads them from a release's Hugging Face config.json. Defaults are DeepSeek-R1's."""
    max_batch_size: int = 4
    max_seq_len: int = 4096
    dtype: str = "bf16"                 # "bf16" or "fp32"
    backend: str = "auto"               # kernels: "torch", "triton", "flaggems", or "auto" (Triton on CUDA)
    attn_impl: str = "auto"             # MLA path: "naive", "absorb", or "auto" (see MLA)
    weights: str = "bf16"               # how the shards hold what the release quantises: "bf16" or "fp8"
    expert_weights: str = "bf16"        # their routed experts: "bf16", or with "fp8": "fp8" (as released)
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432              # dense layers' MLP width
    moe_inter_dim: int = 2048           # width of one expert
    n_layers: int = 61
    n_dense_layers: int = 3             # the first n_dense_layers layers have a dense MLP, the rest MoE
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    topk_method: str = "noaux_tc"       # "noaux_tc": selection by score + bias (gate.bias)
    norm_topk_prob: bool = True
    route_scale: float = 2.5
    q_lora_rank: int = 1536             # 0: one full-rank query projection wq
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    original_seq_len: int = 4096        # YaRN's pretraining length; 0: no YaRN
    rope_factor: float = 40.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0                 # YaRN softmax scale coefficient (rope_scaling.mscale_all_dim)

    # Read by model.MoE, whose expert machinery the V3 MoE reuses: V3 has no SwiGLU clamp (0 is none).
    swiglu_limit = 0.0
    RUNTIME_KEYS = ("max_batch_size", "max_seq_len", "dtype", "backend", "attn_impl")
    MAY_BE_ZERO = ("n_dense_layers", "n_shared_experts", "q_lora_rank", "original_seq_len")
    SCALE_DTYPE = torch.float32         # the release's FP8 block scales (weight_scale_inv): float32

    @classmethod
    def from_config(cls, raw: dict, path: str, **overrides) -> "ModelArgs":
        """The contents of a release's config.json (model_type deepseek_v3); overrides set runtime keys
        (RUNTIME_KEYS) or any field (path names it in messages)."""
        values = _from_hf_config(raw, path)
        try:
            values["weights"], values["expert_weights"] = shard_weights(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s) {unknown}")
        values.update(overrides)
        return cls(**values)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale^2 whenever the config asks for YaRN with a factor
        above 1 (DeepSeek's own code: only when max_seq_len exceeds original_seq_len)."""
        scale = self.qk_head_dim ** -0.5
        if self.original_seq_len > 0 and self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError naming the field for a configuration that cannot run on world_size ranks."""
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        self.check_fields()
        self.check_runtime()
        need(self.attn_impl in ("auto", "naive", "absorb"),
             f"attn_impl must be 'auto', 'naive' or 'absorb', got {self.attn_impl!r}")
        shard_weights({"weights": self.weights, "expert_weights": self.expert_weights})
        need(self.expert_weights != "fp4", "expert_weights 'fp4': DeepSeek-R1 / V3 releases hold FP8 experts")
        need(self.max_seq_len > 0 and self.max_batch_size > 0, "max_seq_len and max_batch_size must be positive")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"n_dense_layers={self.n_dense_layers} must be in 0..n_layers={self.n_layers}")
        need(self.score_func in ("sigmoid", "softmax"), f"score_func {self.score_func!r} is unknown")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             f"topk_method {self.topk_method!r} is unknown")
        need(self.n_expert_groups > 0 and self.n_routed_experts % self.n_expert_groups == 0,
             f"n_routed_experts={self.n_routed_experts} is not divisible by n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(0 < self.n_limited_groups <= self.n_expert_groups,
             f"n_limited_groups={self.n_limited_groups} must be in 1..n_expert_groups={self.n_expert_groups}")
        need(0 < self.n_activated_experts <= self.n_limited_groups * per_group,
             f"n_activated_experts={self.n_activated_experts} must be in 1..{self.n_limited_groups * per_group} "
             f"(the experts of n_limited_groups groups)")
        need(self.topk_method != "noaux_tc" or self.n_expert_groups == 1 or per_group >= 2,
             f"n_expert_groups={self.n_expert_groups}: a group's score sums its top 2 experts, "
             f"so groups need at least 2")
        need(self.n_shared_experts >= 1, f"n_shared_experts={self.n_shared_experts} must be at least 1")
        need(self.kv_lora_rank > 0 and self.q_lora_rank >= 0, "kv_lora_rank must be positive, q_lora_rank >= 0")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and positive")
        need(self.rope_factor >= 1, f"rope_factor={self.rope_factor} must be at least 1")
        for name, value in (("n_heads", self.n_heads), ("n_routed_experts", self.n_routed_experts),
                            ("vocab_size", self.vocab_size), ("inter_dim", self.inter_dim),
                            ("moe_inter_dim", self.moe_inter_dim)):
            need(value % world_size == 0, f"{name}={value} is not divisible by the world size {world_size}")


def _from_hf_config(raw: dict, path: str) -> dict:
    """Map a Hugging Face DeepSeek-V3 config.json (R1's, V3's) onto ModelArgs fields."""
    if raw.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, not 'deepseek_v3'")
    get = ConfigFile.reader(raw, path)
    out = dict(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), inter_dim=get("intermediate_size"),
        moe_inter_dim=get("moe_intermediate_size"), n_layers=get("num_hidden_layers"),
        n_dense_layers=get("first_k_dense_replace"), n_heads=get("num_attention_heads"),
        n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts"),
        n_activated_experts=get("num_experts_per_tok"), n_expert_groups=get("n_group"),
        n_limited_groups=get("topk_group"), route_scale=float(get("routed_scaling_factor")),
        score_func=get("scoring_func", "sigmoid"), topk_method=get("topk_method", "noaux_tc"),
        norm_topk_prob=get("norm_topk_prob"),
        q_lora_rank=raw.get("q_lora_rank") or 0, kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), norm_eps=float(get("rms_norm_eps", 1e-6)),
    )
    # transformers 5 writes rope_parameters (rope_theta inside), releases rope_scaling.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: rope_scaling must be an object, got {rope!r}")
    out["rope_theta"] = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("type", rope.get("rope_type", "default"))
    if kind == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if key not in rope:
                raise ValueError(f"{path}: rope_scaling of type yarn lacks '{key}'")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale is not None and mscale_all is not None and mscale != mscale_all:
            raise ValueError(f"{path}: rope_scaling mscale={mscale} differs from mscale_all_dim={mscale_all}: "
                             f"DeepSeek's code has one mscale (softmax only), transformers also scales cos/sin "
                             f"by their ratio; no release does this")
        out.update(original_seq_len=int(rope["original_max_position_embeddings"]), rope_factor=float(rope["factor"]),
                   beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                   mscale=float(mscale_all if mscale_all is not None else mscale if mscale is not None else 1.0))
    elif kind == "default":
        out.update(original_seq_len=0, rope_factor=1.0)
    else:
        raise ValueError(f"{path}: rope_scaling type {kind!r} is not supported (yarn or none)")
    return out


# ---------------------------------------------------------------- multi-head latent attention

NAIVE_MIN_TOKENS = 256     # attn_impl "auto": calls with more new tokens per row take the naive path
# attend scores at most this many (row, query, head, key) entries at once: a long prefill goes through
# its queries in blocks, so its float32 softmax takes a few GB whatever the context (R1 at 32K
# positions on one GPU: 64 queries a block).
SCORE_BLOCK = 1 << 28


class MLA(nn.Module):
    """Multi-head latent attention. Keys and values of all heads come from one normalised latent
    kv_norm(wkv_a(x)[:c]) [c] per token, expanded per head by wkv_b into k_nope [n] and v [v]; each
    key also has a rotated part k_pe [r] shared by all heads. The cache holds the latent and k_pe
    (c + r values a token, 576 for R1); two ways to attend over it give the same result:
      naive    expand the cached latents into per-head keys and values, then attend with
               q = [q_nope, q_pe] (work per query-key pair and head ~ n + r + v)
      absorb   fold wkv_b into the query and the output: q_nope wkv_b_k [c] meets the latent
               directly, and the attention-weighted latent goes through wkv_b_v (~ 2c + r per pair)
    attn_impl "auto" takes the absorbed path, except for calls of more than NAIVE_MIN_TOKENS new
    tokens a row, where expanding the keys once costs less than the absorbed products. One token a
    row on the absorbed path goes through ops.mla_decode (a Triton kernel on CUDA).
    Queries are taken in blocks of at most SCORE_BLOCK scores (each query's softmax is its own).
    Since only the latent is cached, the path may change from one call to the next. (DeepSeek's
    naive path caches the expanded k and v instead; those are a function of the cached latent,
    which is already in the model dtype there too, so the results are the same.)

    Heads are split over ranks (wq/wq_b, wkv_b by rows, wo by columns); the latent and k_pe are
    computed whole on every rank.
    """
    def __init__(self, args: ModelArgs, tp: Parallel, ops: Ops):
        super().__init__()
        self.tp, self.impl, self.ops = tp, args.attn_impl, ops
        dtype = dtype_of(args.dtype)
        self.n_local_heads = args.n_heads // tp.world_size
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        q_out = args.n_heads * args.qk_head_dim
        fp8 = quantised_formats(args, ops)[0]
        if self.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(args.dim, q_out, dtype, tp.world_size, fp8)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank, dtype, fp8)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps, ops)
            self.wq_b = ColumnParallelLinear(self.q_lora_rank, q_out, dtype, tp.world_size, fp8)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.rope, dtype, fp8)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps, ops)
        self.wkv_b = ColumnParallelLinear(self.kv_lora_rank, args.n_heads * (self.nope + self.v_dim), dtype,
                                          tp.world_size, fp8)
        self.wo = RowParallelLinear(args.n_heads * self.v_dim, args.dim, dtype, tp.world_size, fp8)
        self.softmax_scale = args.softmax_scale
        self.register_buffer("kv_cache", torch.zeros(args.max_batch_size, args.max_seq_len, self.kv_lora_rank,
                                                     dtype=dtype), persistent=False)
        self.register_buffer("pe_cache", torch.zeros(args.max_batch_size, args.max_seq_len, self.rope, dtype=dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [b, s, D] at positions start_pos .. start_pos+s-1; freqs: (cos, sin) of those positions
        [s, r/2, 2]; mask: added to the scores, [s, start_pos + s], or None (s = 1)."""
        bsz, seqlen, _ = x.shape
        q_nope, q_pe, latent, k_pe = self.project(x, freqs)
        end = start_pos + seqlen
        self.kv_cache[:bsz, start_pos:end] = latent
        self.pe_cache[:bsz, start_pos:end] = k_pe
        if seqlen == 1 and self.impl != "naive":
            return self.decoded(q_nope, q_pe, torch.full((bsz,), start_pos, device=x.device))
        return self.attend(q_nope, q_pe, self.kv_cache[:bsz, :end], self.pe_cache[:bsz, :end],
                           None if mask is None else mask[None, :, None, :])

    def decode(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One token per row, x [b, 1, D] at positions pos [b], with static shapes and no host sync
        (a CUDA graph captures it): the whole cache is attended, mask [b, max_seq_len] hiding the
        positions after each row's; freqs [b, 1, r/2, 2]."""
        q_nope, q_pe, latent, k_pe = self.project(x, freqs)
        rows = torch.arange(x.size(0), device=x.device)
        self.kv_cache[rows, pos] = latent[:, 0]
        self.pe_cache[rows, pos] = k_pe[:, 0]
        if self.impl == "naive":
            return self.attend(q_nope, q_pe, self.kv_cache[:x.size(0)], self.pe_cache[:x.size(0)],
                               mask[:, None, None, :])
        return self.decoded(q_nope, q_pe, pos)

    def project(self, x: torch.Tensor, freqs: torch.Tensor):
        """x [b, s, D] -> q_nope [b, s, h, n], rotated q_pe [b, s, h, r], the normalised latent [b, s, c]
        and the rotated shared key part k_pe [b, s, r]."""
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.unflatten(-1, (self.n_local_heads, -1)).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return q_nope, apply_rotary(q_pe, freqs), self.kv_norm(latent), apply_rotary(k_pe, freqs)

    def wkv_b_heads(self) -> torch.Tensor:
        """wkv_b as [h, n + v, c]: each local head's key (first n rows) and value (last v) maps, in the
        model dtype (an FP8 wkv_b dequantised on each call, as DeepSeek's code does)."""
        return self.wkv_b.dequantised().view(self.n_local_heads, self.nope + self.v_dim, self.kv_lora_rank)

    def decoded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The absorbed path for one token per row at positions pos [b] over the whole cache
        (ops.mla_decode) -> [b, 1, D]."""
        wkv_b = self.wkv_b_heads()
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], wkv_b[:, :self.nope])              # [b, h, c]
        o = self.ops.mla_decode(q_lat, q_pe[:, 0], self.kv_cache, self.pe_cache, pos, self.softmax_scale)
        o = torch.einsum("bhc,hvc->bhv", o.to(q_nope.dtype), wkv_b[:, self.nope:])             # [b, h, v]
        return self.tp.all_reduce(self.wo(o.flatten(1))).unsqueeze(1)

    def attend(self, q_nope, q_pe, kv, pe, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Queries [b, s, h, ..] over cached latents kv [b, t, c] and keys pe [b, t, r], mask added to
        the scores [b, s, h, t] -> [b, s, D]; the naive or the absorbed path (see the class)."""
        bsz, seqlen = q_nope.shape[:2]
        naive = self.impl == "naive" or (self.impl == "auto" and seqlen > NAIVE_MIN_TOKENS)
        wkv_b = self.wkv_b_heads()
        if naive:
            k_nope, v = self.wkv_b(kv).unflatten(-1, (self.n_local_heads, -1)).split([self.nope, self.v_dim], -1)
            q = q_nope
        else:
            q = torch.einsum("bshn,hnc->bshc", q_nope, wkv_b[:, :self.nope])       # [b, s, h, c]
        step = max(1, SCORE_BLOCK // (bsz * self.n_local_heads * kv.size(1)))
        outs = []
        for first in range(0, seqlen, step):
            rows = slice(first, first + step)
            if naive:
                scores = torch.einsum("bshn,bthn->bsht", q[:, rows], k_nope)
            else:
                scores = torch.einsum("bshc,btc->bsht", q[:, rows], kv)
            scores = (scores + torch.einsum("bshr,btr->bsht", q_pe[:, rows], pe)) * self.softmax_scale
            if mask is not None:
                scores = scores + mask[:, rows]
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)      # [b, block, h, t]
            if naive:
                outs.append(torch.einsum("bsht,bthv->bshv", probs, v))
            else:
                lat = torch.einsum("bsht,btc->bshc", probs, kv)
                outs.append(torch.einsum("bshc,hvc->bshv", lat, wkv_b[:, self.nope:]))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)                 # [b, s, h, v]
        return self.tp.all_reduce(self.wo(o.flatten(2)))                          # [b, s, D]


# ---------------------------------------------------------------- feed-forward: dense and mixture of experts

class MLP(Expert):
    """Dense SwiGLU layer w2(silu(w1 x) * w3 x), split by width over ranks (w1, w3 by rows, w2 by
    columns), the partial sums all-reduced; quant as Expert's."""
    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, tp: Parallel, quant=None):
        super().__init__(dim, inter_dim, dtype, parts=tp.world_size, quant=quant)
        self.tp = tp

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x)).to(x.dtype)


class Gate(nn.Module):
    """Router with grouped top-k (DeepSeek-V3's noaux_tc):
      scores = sigmoid(x W^T) in float32                          [T, E]
      choice = scores + bias                                      (bias: topk_method noaux_tc)
      group score = sum of its top 2 choice scores (the max without a bias); keep the best
      n_limited_groups of n_expert_groups groups, take the top k choice scores among their experts
      weights = the chosen experts' scores, divided by their sum when norm_topk_prob, times route_scale
    (DeepSeek's code normalises whenever the scores are sigmoids, transformers when norm_topk_prob;
    the releases have both.) The bias only selects; it never enters the weights."""
    def __init__(self, args: ModelArgs, ops: Ops):
        super().__init__()
        self.ops = ops
        self.topk, self.groups, self.top_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.norm, self.route_scale = args.score_func, args.norm_topk_prob, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype_of(args.dtype)),
                                   requires_grad=False)
        if args.topk_method == "noaux_tc":
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None):
        """x [T, D] (ids: unused, model.MoE passes the token ids) -> weights [T, k] float32,
        experts [T, k] int64."""
        logits = self.ops.linear_fp32(x, self.weight)                            # [T, E]
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if self.groups > 1:
            grouped = choice.unflatten(-1, (self.groups, -1))                     # [T, G, E/G]
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)          # [T, G]
            kept = group_scores.topk(self.top_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        experts = choice.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, experts


class MoE(V4MoE):
    """model.MoE's experts (split by index over ranks; a per-expert loop on the CPU, Triton grouped
    GEMMs / GEMVs over stacked weights on CUDA) behind the V3 Gate, with n_shared_experts *
    moe_inter_dim wide shared experts split by width; one all-reduce of both partial sums."""
    def __init__(self, args: ModelArgs, tp: Parallel, ops: Ops):
        super().__init__(args, tp, ops, Gate(args, ops), args.n_shared_experts * args.moe_inter_dim)


# ---------------------------------------------------------------- layers and the model

class Block(nn.Module):
    """x + attn(attn_norm(x)), then + ffn(ffn_norm(x)); ffn dense in the first n_dense_layers layers."""
    def __init__(self, layer_id: int, args: ModelArgs, tp: Parallel, ops: Ops):
        super().__init__()
        self.attn = MLA(args, tp, ops)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim, dtype_of(args.dtype), tp, quantised_formats(args, ops)[0])
        else:
            self.ffn = MoE(args, tp, ops)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, ops)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor, mask: Optional[torch.Tensor],
                ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, freqs, mask)
        return x + self.ffn(self.ffn_norm(x), ids)

    def decode(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.decode(self.attn_norm(x), pos, freqs, mask)
        return x + self.ffn(self.ffn_norm(x), ids)


class Transformer(nn.Module):
    """embed -> blocks -> norm -> head: float32 logits of the last position. Tensor parallel over the
    default process group (or the place tp says): vocabulary-split embedding and head, heads split
    in attention, experts by index, dense and shared MLPs by width."""
    def __init__(self, args: ModelArgs, tp: Optional[Parallel] = None):
        tp = tp or Parallel.current()
        args.validate(tp.world_size)
        super().__init__()
        self.args, self.tp = args, tp
        self.ops = ops = Ops(args.backend)              # for tensors on torch's default device
        dtype = dtype_of(args.dtype)
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, dtype, tp)
        self.layers = nn.ModuleList([Block(i, args, tp, ops) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.head = ParallelHead(args.vocab_size, args.dim, dtype, tp)
        # YaRN whenever the config has it (DeepSeek's code: only when max_seq_len > original_seq_len).
        freqs = precompute_freqs_cis(args.qk_rope_head_dim, args.max_seq_len, args.original_seq_len,
                                     args.rope_theta, args.rope_factor, args.beta_fast, args.beta_slow)
        self.register_buffer("freqs_cis", torch.view_as_real(freqs), persistent=False)   # [seq, r/2, 2] cos, sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """input_ids [b, s] at positions start_pos .. start_pos+s-1 (caches hold the earlier ones)
        -> float32 logits of the last position [b, vocab]."""
        bsz, seqlen = input_ids.shape
        self.args.check_step(bsz, seqlen, start_pos)
        freqs = self.freqs_cis[start_pos:start_pos + seqlen]                      # [s, r/2, 2]
        mask = None
        if seqlen > 1:                                                            # [s, start_pos + s]
            mask = torch.full((seqlen, start_pos + seqlen), float("-inf"), device=input_ids.device)
            mask = mask.triu_(start_pos + 1)
        h = self.embed(input_ids)                                                 # [b, s, D]
        for layer in self.layers:
            h = layer(h, start_pos, freqs, mask, input_ids)
        return self.head(self.norm(h[:, -1]))

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row, input_ids [b, 1] at positions pos [b] -> float32 logits [b, vocab]: the
        decode step, with static shapes and no host sync (CUDA graphs capture it)."""
        bsz = input_ids.size(0)
        if input_ids.size(1) != 1 or pos.shape != (bsz,):
            raise ValueError("decode takes one token per row and a position per row")
        if bsz > self.args.max_batch_size:
            raise ValueError(f"batch {bsz} exceeds max_batch_size={self.args.max_batch_size}")
        freqs = self.freqs_cis[pos].unsqueeze(1)                                  # [b, 1, r/2, 2]
        slots = torch.arange(self.args.max_seq_len, device=input_ids.device)
        mask = torch.zeros(bsz, slots.numel(), device=input_ids.device).masked_fill(
            slots > pos.unsqueeze(1), float("-inf"))                             # [b, max_seq_len]
        h = self.embed(input_ids)                                                 # [b, 1, D]
        for layer in self.layers:
            h = layer.decode(h, pos, freqs, mask, input_ids)
        return self.head(self.norm(h[:, -1]))
