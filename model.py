"""DeepSeek-V4: the transformer, tensor parallel over torch.distributed (parallel.py's layers), its
operators from an ops.Ops object that every module shares.

Classes follow the sections of the V4 paper:
  SPLIT_*, ModelArgs               how checkpoints are split over ranks; hyper-parameters (our
                                   configs/*.json or a release's config.json)
  Compressor, Indexer, Attention   hybrid attention: sliding window, compressed sparse attention
                                   (CSA, ratio 4, Lightning Indexer) and heavily compressed attention
                                   (HCA), Q-LoRA with one shared KV head, attention sinks and a grouped
                                   low-rank output projection
  Gate, Expert, MoE                hash-routed and score-routed experts plus one shared expert
  Block                            manifold-constrained hyper-connections (mHC) around both sublayers
  MTPBlock, Transformer            the multi-token prediction block (loaded, unused) and the whole model:
                                   forward() for prompts and chunks, decode() for one token a row

The weights the release quantises are held as the shards hold them (ModelArgs.weights and
expert_weights, from the shards' config.json): in the model dtype, or as released (FP8 projections
with ue8m0 block scales, MXFP4 or FP8 routed experts) and dequantised on the fly by the kernels
(parallel.Quantised). The compressors' projections, the indexer's weights_proj, the gate, the
embedding and the head ship in BF16 and stay so.

Shapes: b batch, s new tokens, hc hyper-connection streams, D model dim.
"""
import itertools
import re
from dataclasses import dataclass, field, fields
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ops import EXPERT_KERNELS, Ops, compressed_entries, linear_fp32, swiglu
from parallel import (ColumnParallelLinear, ConfigFile, Linear, Parallel, ParallelEmbedding, ParallelHead,
                      RMSNorm, RowParallelLinear, dtype_of, group_major, precompute_freqs_cis, quantised_formats,
                      row_block, row_starts, stack_rows, stored)
from quant import FP8_BLOCK, shard_weights


# How the checkpoint's tensors are split over the ranks (convert.py cuts them so; the layers below are
# built for the pieces). A name matches a rule when it ends with the rule's text; what no rule names is
# copied whole to every rank.
SPLIT_ROWS = ("attn.wq_b.weight", "attn.attn_sink", "attn.indexer.wq_b.weight",
              "attn.indexer.weights_proj.weight", "ffn.shared_experts.w1.weight",
              "ffn.shared_experts.w3.weight")
SPLIT_COLS = ("ffn.shared_experts.w2.weight",)
VOCAB = ("embed.weight", "head.weight")                         # whole names, split by rows
OUTPUT_PROJ = {"attn.wo_a.weight": 0, "attn.wo_b.weight": 1}    # by output group: o-groups aware
EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.weight$")   # routed experts: whole, by index


@dataclass
class ModelArgs(ConfigFile):
    """Hyper-parameters. Field names are the keys of our configs/*.json."""
    max_batch_size: int = 4
    max_seq_len: int = 4096
    dtype: str = "bf16"
    ogroups_comm: bool = False          # o-groups layout (USE_OGROUPS_COMM=1): needed when world size > o_groups
    backend: str = "auto"               # kernels: "torch", "triton", "flaggems", or "auto" (Triton on CUDA)
    weights: str = "bf16"               # how the shards hold what the release quantises: "bf16" or "fp8"
    expert_weights: str = "bf16"        # their routed experts: "bf16", or with "fp8": "fp4" (as released) or "fp8"
    expert_kernels: str = "triton"      # MXFP4 experts on a GPU: "triton" (kernel_lowp), "humming" or "humming-fp8"
                                        # (USE_HUMMING=1 or fp8; ops.EXPERT_KERNELS)
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: List[int] = field(default_factory=list)
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6

    # Keys a config file need not give: runtime choices, and the shards' weight format (convert.py
    # writes it into their config.json; quant.shard_weights reads it), with defaults.
    RUNTIME_KEYS = ("max_batch_size", "max_seq_len", "dtype", "ogroups_comm", "backend", "weights", "expert_weights",
                    "expert_kernels")
    MAY_BE_ZERO = ("n_hash_layers", "n_mtp_layers", "n_shared_experts", "original_seq_len")
    SCALE_DTYPE = torch.float8_e8m0fnu  # the release's FP8 block scales: ue8m0

    @classmethod
    def from_config(cls, raw: dict, path: str, **overrides) -> "ModelArgs":
        """The contents of our configs/*.json or a release's Hugging Face config.json (model_type deepseek_v4) (path names it in messages)."""
        if "hidden_size" in raw or raw.get("model_type") == "deepseek_v4":
            values = _from_hf_config(raw, path)
        else:
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ValueError(f"{path}: unknown config key(s) {unknown}")
            missing = sorted(known - set(raw) - set(cls.RUNTIME_KEYS))
            if missing:
                raise ValueError(f"{path}: missing config key(s) {missing}")
            values = dict(raw)
        try:
            values["weights"], values["expert_weights"] = shard_weights(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        values.update(overrides)
        return cls(**values)

    def ratio(self, layer_id: int) -> int:
        """Compression ratio of a layer (MTP layers follow the main ones; 0 when not listed)."""
        return self.compress_ratios[layer_id] if layer_id < len(self.compress_ratios) else 0

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError naming the field for a configuration that cannot run on world_size ranks."""
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        self.check_fields()
        self.check_runtime()
        shard_weights({"weights": self.weights, "expert_weights": self.expert_weights})
        need(self.expert_kernels in EXPERT_KERNELS,
             f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {self.expert_kernels!r}")
        humming = EXPERT_KERNELS[self.expert_kernels] is not None
        need(not humming or (self.expert_weights == "fp4" and self.dtype == "bf16"),
             f"expert kernels {self.expert_kernels!r} (USE_HUMMING) run MXFP4 experts in a bf16 model: they need "
             f"shards of convert.py --dtype fp8 with MXFP4 experts and dtype bf16 (these: experts "
             f"{self.expert_weights}, dtype {self.dtype})")
        need(not humming or (self.dim >= 128 and self.moe_inter_dim >= 64),
             f"expert kernels {self.expert_kernels!r} (USE_HUMMING): humming-kernels builds no GEMM for experts "
             f"this narrow (dim {self.dim}, moe_inter_dim {self.moe_inter_dim}; it needs at least 128 and 64)")
        need(EXPERT_KERNELS[self.expert_kernels] != "fp8" or (self.dim % FP8_BLOCK == 0
                                                              and self.moe_inter_dim % FP8_BLOCK == 0),
             f"expert kernels {self.expert_kernels!r} (USE_HUMMING=fp8) quantise the experts' inputs per {FP8_BLOCK} "
             f"channels: dim {self.dim} and moe_inter_dim {self.moe_inter_dim} must be multiples of {FP8_BLOCK}")
        need(self.score_func in ("softmax", "sigmoid", "sqrtsoftplus"), f"score_func {self.score_func!r} is unknown")
        need(len(self.compress_ratios) >= self.n_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries for n_layers={self.n_layers}")
        for i, r in enumerate(self.compress_ratios):
            need(isinstance(r, int) and (r in (0, 4) or r > 4),
                 f"compress_ratios[{i}] = {r!r} is unknown: 0 (window only), 4 (CSA) or > 4 (HCA)")
        need(self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim < self.head_dim,
             f"rope_head_dim={self.rope_head_dim} must be even and below head_dim={self.head_dim}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim > self.rope_head_dim,
             f"index_head_dim={self.index_head_dim} must be a power of two above rope_head_dim")
        need(0 < self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts={self.n_activated_experts} must be in 1..n_routed_experts")
        need(self.n_shared_experts == 1, f"n_shared_experts={self.n_shared_experts}: V4 has exactly one")
        need(self.n_heads % self.o_groups == 0, f"n_heads={self.n_heads} not divisible by o_groups={self.o_groups}")
        need(self.max_seq_len > 0 and self.max_batch_size > 0, "max_seq_len and max_batch_size must be positive")
        for name in ("n_heads", "index_n_heads", "n_routed_experts", "vocab_size", "moe_inter_dim"):
            need(getattr(self, name) % world_size == 0,
                 f"{name}={getattr(self, name)} is not divisible by the world size {world_size}")
        if self.ogroups_comm:
            need(world_size > self.o_groups and world_size % self.o_groups == 0,
                 f"USE_OGROUPS_COMM=1 needs a world size above o_groups={self.o_groups} and a multiple of it, "
                 f"got {world_size}")
        else:
            need(self.o_groups % world_size == 0,
                 f"o_groups={self.o_groups} is not divisible by the world size {world_size}"
                 + ("; set USE_OGROUPS_COMM=1 (and convert with it)" if world_size > self.o_groups else ""))


def _from_hf_config(raw: dict, path: str) -> dict:
    """Map a Hugging Face DeepSeek-V4 config.json onto ModelArgs fields."""
    get = ConfigFile.reader(raw, path)
    out = dict(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), moe_inter_dim=get("moe_intermediate_size"),
        n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
        n_mtp_layers=get("num_nextn_predict_layers", 0),
        n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts", 1),
        n_activated_experts=get("num_experts_per_tok"), score_func=get("scoring_func", "sqrtsoftplus"),
        route_scale=get("routed_scaling_factor", 1.0), swiglu_limit=get("swiglu_limit", 0.0),
        q_lora_rank=get("q_lora_rank"), head_dim=get("head_dim"), rope_head_dim=get("qk_rope_head_dim"),
        norm_eps=get("rms_norm_eps", 1e-6), o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"),
        window_size=get("sliding_window"), compress_rope_theta=get("compress_rope_theta"),
        rope_theta=get("rope_theta", 10000.0), index_n_heads=get("index_n_heads"),
        index_head_dim=get("index_head_dim"), index_topk=get("index_topk"), hc_mult=get("hc_mult"),
        hc_sinkhorn_iters=get("hc_sinkhorn_iters"), hc_eps=get("hc_eps"),
    )
    if "compress_ratios" in raw:
        out["compress_ratios"] = list(raw["compress_ratios"])
    elif "layer_types" in raw and "compress_rates" in raw:
        out["compress_ratios"] = [raw["compress_rates"].get(t, 0) for t in raw["layer_types"]]
    else:
        raise ValueError(f"{path}: missing config key 'compress_ratios'")
    if "num_hash_layers" in raw:
        out["n_hash_layers"] = raw["num_hash_layers"]
    elif "mlp_layer_types" in raw:
        out["n_hash_layers"] = raw["mlp_layer_types"].count("hash_moe")
    else:
        raise ValueError(f"{path}: missing config key 'num_hash_layers'")
    rope = raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: rope_scaling must be an object, got {rope!r}")
    if rope:
        out.update(rope_factor=rope.get("factor", 1.0),
                   original_seq_len=rope.get("original_max_position_embeddings", 0),
                   beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1))
    else:
        out.update(rope_factor=1.0, original_seq_len=0)
    return out


# ---------------------------------------------------------------- hybrid attention

class Compressor(nn.Module):
    """Gated pooling of every `ratio` consecutive tokens into one compressed KV entry.

    Ratio 4 (CSA) uses overlapping windows: each token projects to two series, and entry w pools
    the first series of window w-1 with the second series of window w (2 * ratio slots). Other
    ratios (HCA) pool one window each. Entry w gets the RoPE of position w * ratio.
    The tokens of the window in progress wait in kv_state/score_state (slot = position % ratio);
    prev_kv/prev_score hold the first series of the last completed window.
    """
    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, rotate: bool, ops: Ops):
        super().__init__()
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.ops = ops
        self.rope_head_dim = args.rope_head_dim
        self.overlap = ratio == 4
        width = (1 + self.overlap) * head_dim
        self.dtype = dtype_of(args.dtype)
        self.wkv = Linear(args.dim, width, self.dtype)            # float32 products and sums: see project()
        self.wgate = Linear(args.dim, width, self.dtype)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(head_dim, args.norm_eps, ops)
        b = args.max_batch_size
        self.register_buffer("kv_state", torch.zeros(b, ratio, width), persistent=False)
        self.register_buffer("score_state", torch.zeros(b, ratio, width), persistent=False)
        if self.overlap:
            self.register_buffer("prev_kv", torch.zeros(b, ratio, head_dim), persistent=False)
            self.register_buffer("prev_score", torch.zeros(b, ratio, head_dim), persistent=False)

    @property
    def rotate_scale(self):
        """Scale of the Hadamard rotation of the entries (the indexer's keys), None for no rotation."""
        return self.head_dim ** -0.5 if self.rotate else None

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, cache: torch.Tensor) -> None:
        """Write to cache [B, n_max, hd] the entries completed by tokens start_pos .. start_pos+s-1
        of x [b, s, D]; freqs_cis is the layer's whole RoPE table."""
        bsz, seqlen, _ = x.shape
        ratio, hd = self.ratio, self.head_dim
        pos = torch.arange(start_pos, start_pos + seqlen, device=x.device)
        kv, score = self.project(x)                                # [b, s, width]
        score = score + self.ape[pos % ratio]
        if start_pos == 0 and self.overlap:
            self.prev_kv[:bsz] = 0
            self.prev_score[:bsz] = float("-inf")
        pending = start_pos % ratio
        kv = torch.cat([self.kv_state[:bsz, :pending], kv], dim=1)
        score = torch.cat([self.score_state[:bsz, :pending], score], dim=1)
        n = kv.size(1) // ratio
        cut = n * ratio
        self.kv_state[:bsz, :kv.size(1) - cut] = kv[:, cut:]
        self.score_state[:bsz, :kv.size(1) - cut] = score[:, cut:]
        if n == 0:
            return
        kv = kv[:, :cut].unflatten(1, (n, ratio))                  # [b, n, ratio, width]
        score = score[:, :cut].unflatten(1, (n, ratio))
        if self.overlap:
            prev_kv = torch.cat([self.prev_kv[:bsz, None], kv[:, :-1, :, :hd]], dim=1)
            prev_score = torch.cat([self.prev_score[:bsz, None], score[:, :-1, :, :hd]], dim=1)
            self.prev_kv[:bsz] = kv[:, -1, :, :hd]
            self.prev_score[:bsz] = score[:, -1, :, :hd]
            kv = torch.cat([prev_kv, kv[..., hd:]], dim=2)         # [b, n, 2 * ratio, hd]
            score = torch.cat([prev_score, score[..., hd:]], dim=2)
        first = start_pos // ratio
        window_start = (first + torch.arange(n, device=x.device)) * ratio
        cache[:bsz, first:first + n] = compressed_entries(kv, score, freqs_cis[window_start], self.rope_head_dim,
                                                          self.norm.weight, self.norm.eps, self.rotate_scale,
                                                          self.dtype, self.ops)

    def project(self, x: torch.Tensor):
        """x [.., D] -> float32 kv and gate scores [.., width]. The release's weights are bf16, as is x; the
        reference upcasts both, so the products are exact and only the float32 sums matter, which a
        bf16 matmul with float32 output gives without a float32 copy of the weights (linear_fp32)."""
        flat = x.reshape(-1, x.size(-1))
        return (linear_fp32(flat, self.wkv.weight).view(*x.shape[:-1], -1),
                linear_fp32(flat, self.wgate.weight).view(*x.shape[:-1], -1))

    def decode(self, kv: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, freqs_cis: torch.Tensor,
               cache: torch.Tensor) -> None:
        """One token per row at positions pos [b], its projections kv and score [b, width] (project()'s
        float32 values, possibly column slices of a wider matrix), with static shapes and no host sync.
        A row's entry is written by the step that completes its window, as in prefill."""
        prev = (self.prev_kv, self.prev_score) if self.overlap else (None, None)
        self.ops.compressor_decode(kv, score, self.ape, pos, self.kv_state, self.score_state, *prev,
                                   self.norm.weight, self.norm.eps, freqs_cis, self.rope_head_dim, self.rotate_scale,
                                   cache)


def cache_entries(max_seq_len: int, ratio: int) -> int:
    """Compressed entries a cache holds: one per window, the last one possibly unfinished (its slot
    stays unwritten, but the static-shape decode step addresses it)."""
    return -(-max_seq_len // ratio)


def visible_entries(pos: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries a query at position pos may see: those of windows it has completed."""
    return (pos + 1) // ratio


class Indexer(nn.Module):
    """Lightning Indexer: scores every visible compressed entry for each query and keeps the top k.

    score(t, j) = sum_h w[t, h] * relu(q[t, h] . k[j]), with its own compressor for k. The heads
    are split over ranks and the scores summed with one all-reduce.
    """
    def __init__(self, args: ModelArgs, tp: Parallel, ops: Ops):
        super().__init__()
        self.tp, self.ops = tp, ops
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.n_local_heads = args.index_n_heads // tp.world_size
        self.rope_head_dim = args.rope_head_dim
        self.ratio = 4
        dtype = dtype_of(args.dtype)
        self.wq_b = ColumnParallelLinear(args.q_lora_rank, self.n_heads * self.head_dim, dtype, tp.world_size,
                                         quantised_formats(args, ops)[0])
        self.weights_proj = ColumnParallelLinear(args.dim, self.n_heads, dtype, tp.world_size)
        self.compressor = Compressor(args, self.ratio, self.head_dim, rotate=True, ops=ops)
        self.register_buffer("kv_cache", torch.zeros(args.max_batch_size, cache_entries(args.max_seq_len, self.ratio),
                                                     self.head_dim, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x [b, s, D], qr [b, s, q_lora_rank] at positions start_pos .. start_pos+s-1 -> indices
        [b, s, k] of the top-k compressed entries, in no particular order. When fewer than k are
        visible the rest are entries the query may not see yet: the caller masks them."""
        bsz, seqlen, _ = x.shape
        pos = torch.arange(start_pos, start_pos + seqlen, device=x.device)
        self.compressor(x, start_pos, freqs_cis, self.kv_cache)
        n = (start_pos + seqlen) // self.ratio
        if n <= self.topk:                        # no more entries than it keeps: all of them, no scores
            return torch.arange(n, device=x.device).expand(bsz, seqlen, n)
        keys = self.kv_cache[:bsz, :n]                                                  # [b, n, d]
        return self.pick(self.queries(qr, freqs_cis[pos]), keys, self.weights_proj(x), visible_entries(pos, 4))

    def decode(self, qr: torch.Tensor, weights: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
               step: "DecodeStep", freqs_cis: torch.Tensor) -> torch.Tensor:
        """One token per row: qr [b, 1, q_lora_rank], this rank's head weights [b, h] and the
        compressor's projections kv, score [b, width] of x -> indices [b, k], as forward()."""
        self.compressor.decode(kv, score, step.pos, freqs_cis, self.kv_cache)
        keys = self.kv_cache[:qr.size(0)]                                                # [b, n_max, d]
        q = self.queries(qr, step.rotary(freqs_cis))
        return self.pick(q, keys, weights.unsqueeze(1), step.visible(4))[:, 0]

    def queries(self, qr: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """qr [b, s, q_lora_rank] -> this rank's rotated queries [b, s, h, d]."""
        q = self.wq_b(qr).unflatten(-1, (self.n_local_heads, self.head_dim))
        q = self.ops.norm_rope(q, freqs, self.rope_head_dim)
        return self.ops.hadamard(q, self.head_dim ** -0.5)

    def pick(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        """Scores of keys [b, n, d] for q [b, s, h, d] with head weights [b, s, h], summed over all
        ranks' heads, entries from limit ([s] or [b]) on unseen -> the top k [b, s, k]."""
        scores = self.ops.index_scores(q, keys, weights, limit.view(-1, q.size(1)),
                                       self.head_dim ** -0.5 * self.n_heads ** -0.5)   # [b, s, n], -inf unseen
        return self.ops.topk(self.tp.all_reduce(scores), self.topk)


@dataclass
class DecodeStep:
    """What the layers of a decode step share, computed once a step rather than once a layer: the
    position of each row's token pos [b], the window ring slot it goes to [b], and,
    kept as the layers ask for them, the entries visible at each compression ratio and the slots
    attended by the layers that attend every visible entry (window-only and HCA layers)."""
    pos: torch.Tensor
    ring_slot: torch.Tensor
    window: int
    ops: Ops
    kept: dict = field(default_factory=dict)

    @classmethod
    def at(cls, pos: torch.Tensor, window: int, ops: Ops) -> "DecodeStep":
        return cls(pos, pos % window, window, ops)

    def rotary(self, table: torch.Tensor) -> torch.Tensor:
        """The rows [b, 1, rd/2, 2] of a rotary table (RotaryTables) at the rows' positions."""
        if ("rotary", id(table)) not in self.kept:
            self.kept["rotary", id(table)] = table[self.pos].unsqueeze(1)
        return self.kept["rotary", id(table)]

    def visible(self, ratio: int) -> torch.Tensor:
        """visible_entries(pos, ratio) [b]."""
        if ("visible", ratio) not in self.kept:
            self.kept["visible", ratio] = visible_entries(self.pos, ratio)
        return self.kept["visible", ratio]

    def attended(self, ratio: int, n_entries: int, picks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slots [b, window + entries] of a layer's cache that each row attends (kernel.decode_indices):
        the indexer's picks [b, k] on CSA layers, every visible entry of n_entries otherwise."""
        if picks is not None:
            return self.ops.decode_indices(self.pos, self.window, n_entries, ratio, picks)
        if ("attended", ratio, n_entries) not in self.kept:
            self.kept["attended", ratio, n_entries] = self.ops.decode_indices(self.pos, self.window, n_entries,
                                                                              ratio)
        return self.kept["attended", ratio, n_entries]


class RotaryTables(nn.Module):
    """The rotary tables [max_seq_len, rope_head_dim / 2, 2] (cos, sin) that the layers share, one copy of
    each kind: window-only layers turn by rope_theta, compressed layers by compress_rope_theta with
    YaRN. (One table a layer would take 256 bytes a position each: 12 GB over V4-Flash's 44 layers at
    a 1M-token context.)"""
    def __init__(self, args: ModelArgs):
        super().__init__()
        window = precompute_freqs_cis(args.rope_head_dim, args.max_seq_len, 0, args.rope_theta, 1.0, 0, 0)
        compressed = precompute_freqs_cis(args.rope_head_dim, args.max_seq_len, args.original_seq_len,
                                          args.compress_rope_theta, args.rope_factor, args.beta_fast, args.beta_slow)
        self.register_buffer("window", torch.view_as_real(window), persistent=False)
        self.register_buffer("compressed", torch.view_as_real(compressed), persistent=False)

    def table(self, ratio: int) -> torch.Tensor:
        """The table of a layer with compression ratio `ratio` (0: window only)."""
        return self.compressed if ratio else self.window


class Attention(nn.Module):
    """Q-LoRA attention with one shared KV head over a sliding window plus compressed entries.

    Keys of a query at position t: the window positions t-window+1 .. t, and, on compressed layers,
    either the Lightning Indexer's top-k compressed entries (ratio 4) or all visible ones (HCA).
    Each head has a learned sink logit. The output's RoPE channels are rotated back to the query
    position, then projected by groups (wo_a per group, wo_b over all groups).
    kv_cache holds the window as a ring (slot = position % window) followed by the compressed entries.
    """
    def __init__(self, layer_id: int, args: ModelArgs, tp: Parallel, ops: Ops, rope: RotaryTables):
        super().__init__()
        self.tp, self.ops, self.rope = tp, ops, rope
        dtype = dtype_of(args.dtype)
        self.n_heads, self.head_dim, self.rope_head_dim = args.n_heads, args.head_dim, args.rope_head_dim
        self.n_local_heads = args.n_heads // tp.world_size
        self.o_lora_rank = args.o_lora_rank
        self.n_local_groups = args.o_groups // tp.out_group_split
        self.window = args.window_size
        self.ratio = args.ratio(layer_id)
        self.eps = args.norm_eps
        self.softmax_scale = self.head_dim ** -0.5

        fp8 = quantised_formats(args, ops)[0]
        self.wq_a = Linear(args.dim, args.q_lora_rank, dtype, fp8)
        self.q_norm = RMSNorm(args.q_lora_rank, self.eps, ops)
        self.wq_b = ColumnParallelLinear(args.q_lora_rank, self.n_heads * self.head_dim, dtype, tp.world_size, fp8)
        self.wkv = Linear(args.dim, self.head_dim, dtype, fp8)
        self.kv_norm = RMSNorm(self.head_dim, self.eps, ops)
        self.wo_a = ColumnParallelLinear(self.n_heads * self.head_dim // args.o_groups,
                                         args.o_groups * args.o_lora_rank, dtype, tp.out_group_split, fp8)
        self.wo_b = RowParallelLinear(args.o_groups * args.o_lora_rank, args.dim, dtype, tp.out_group_split, fp8)
        self.attn_sink = nn.Parameter(torch.empty(self.n_local_heads, dtype=torch.float32), requires_grad=False)

        self.compressor = Compressor(args, self.ratio, self.head_dim, rotate=False, ops=ops) if self.ratio else None
        self.indexer = Indexer(args, tp, ops) if self.ratio == 4 else None
        n_max = cache_entries(args.max_seq_len, self.ratio) if self.ratio else 0
        # Where the cache cannot hold more compressed entries than the indexer keeps (max_seq_len up to
        # 4 index_topk), the layer attends every visible one, as an HCA layer does, and the indexer
        # (its projections, cache, scores and top-k) is left out of the step.
        self.indexed = self.indexer is not None and n_max > args.index_topk
        self.register_buffer("kv_cache", torch.zeros(args.max_batch_size, self.window + n_max, self.head_dim,
                                                     dtype=dtype), persistent=False)
        self.stacked = None

    @property
    def freqs_cis(self) -> torch.Tensor:
        """This layer's rotary table [max_seq_len, rd/2, 2] (cos, sin), shared with the layers of its kind."""
        return self.rope.table(self.ratio)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x [b, s, D] at positions start_pos .. start_pos+s-1 (decode() takes one token per row)."""
        bsz, seqlen, _ = x.shape
        end, win = start_pos + seqlen, self.window
        pos = torch.arange(start_pos, end, device=x.device)
        qr, q, kv = self.project(self.wq_a(x), self.wkv(x), self.freqs_cis[pos])

        # Window keys: the cached positions first .. start_pos-1, then the new tokens.
        first = max(0, start_pos - win + 1)
        keys = torch.cat([self.kv_cache[:bsz, torch.arange(first, start_pos, device=x.device) % win], kv], dim=1)
        keep = min(seqlen, win)
        self.kv_cache[:bsz, torch.arange(end - keep, end, device=x.device) % win] = kv[:, seqlen - keep:]
        key_pos = pos.unsqueeze(1) - win + 1 + torch.arange(win, device=x.device)   # [s, win]
        idx = torch.where(key_pos >= 0, key_pos - first, -1).expand(bsz, -1, -1)

        if self.ratio:
            compressed = self.kv_cache[:, win:]
            self.compressor(x, start_pos, self.freqs_cis, compressed)
            n = end // self.ratio
            visible = visible_entries(pos, self.ratio).unsqueeze(1)                   # [s, 1]
            if self.indexed:
                cidx = self.indexer(x, qr, start_pos, self.freqs_cis)               # [b, s, k]
            else:
                cidx = torch.arange(n, device=x.device).expand(bsz, seqlen, -1)
            cidx = torch.where(cidx < visible, cidx, -1)
            idx = torch.cat([idx, torch.where(cidx >= 0, cidx + keys.size(1), -1)], dim=-1)
            keys = torch.cat([keys, compressed[:bsz, :n]], dim=1)
        o = self.ops.sparse_attn(q, keys, self.attn_sink, idx, self.softmax_scale)   # [b, s, h, d]
        return self.output(o, self.freqs_cis[pos])

    def input_weights(self):
        """Every projection of the attention's input x, in decode()'s order: the ones the reference
        rounds to the model dtype first (wq_a, wkv, the indexer's weights_proj), then the compressors'
        float32 ones (wkv, wgate; the indexer's); stacked by rows into one matrix per weight format
        (parallel.stack_rows: BF16 shards give one matrix, FP8 ones an FP8 matrix of wq_a and wkv and
        a BF16 one of the rest), so that a decode step reads each in one matmul. The parameters become
        views into them (made once, after loading; again whenever they moved), as MoE.stacked_weights
        does. -> [(matrix, its block scale or None, (first row, rows) of each of its projections)]."""
        parts = [self.wq_a, self.wkv] + ([self.indexer.weights_proj] if self.indexed else [])
        parts += [self.compressor.wkv, self.compressor.wgate] if self.compressor is not None else []
        if self.indexed:
            parts += [self.indexer.compressor.wkv, self.indexer.compressor.wgate]
        if self.stacked is None or self.stacked[0][0].data_ptr() != parts[0].weight.data_ptr():
            self.stacked = []
            for _, same in itertools.groupby(parts, key=lambda p: p.quant is None):
                same = list(same)
                weight, scale, starts = stack_rows(same)
                self.stacked.append((weight, scale, [(a, p.weight.size(0)) for a, p in zip(starts, same)]))
        return self.stacked

    def decode(self, x: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """x [b, 1, D] at step.pos: one matmul for every projection of x of a weight format, then
        attention over the whole cache with masks, so shapes never change."""
        bsz, win, pos = x.size(0), self.window, step.pos
        freqs = step.rotary(self.freqs_cis)                                         # [b, 1, rd/2, 2]
        n_rounded, parts = 3 if self.indexed else 2, []
        for weight, scale, rows in self.input_weights():
            rounded = rows[:max(0, n_rounded - len(parts))]                         # its projections rounded
            whole = len(rounded) == len(rows)
            if scale is None:
                out = self.ops.linear_fp32(x[:, 0], weight)                         # [b, rows] float32 sums
            else:
                out = self.ops.linear_lowp(x[:, 0], weight, scale, x.dtype if whole else torch.float32)
            if rounded:                                                             # column slices, no copies
                head = out[:, :sum(rounded[-1])].to(x.dtype)
                parts += [head[:, a:a + n] for a, n in rounded]
            parts += [out[:, a:a + n] for a, n in rows[len(rounded):]]
        qr, q, _ = self.project(parts[0].unsqueeze(1), parts[1].unsqueeze(1), freqs, step.ring_slot)
        n_entries, picks = self.kv_cache.size(1) - win, None
        if self.indexed:
            self.compressor.decode(parts[3], parts[4], pos, self.freqs_cis, self.kv_cache[:, win:])
            picks = self.indexer.decode(qr, parts[2], parts[5], parts[6], step, self.freqs_cis)   # [b, k]
        elif self.ratio:
            self.compressor.decode(parts[2], parts[3], pos, self.freqs_cis, self.kv_cache[:, win:])
        idx = step.attended(self.ratio, n_entries, picks)                          # [b, win + entries]
        o = self.ops.sparse_attn(q, self.kv_cache[:bsz], self.attn_sink, idx.unsqueeze(1), self.softmax_scale)
        return self.output(o, freqs)

    def project(self, qa: torch.Tensor, kva: torch.Tensor, freqs: torch.Tensor, ring_slots=None):
        """From wq_a(x) and wkv(x) [b, s, ..]: the low-rank query qr [b, s, q_lora_rank], queries
        q [b, s, h, d] and the shared key/value kv [b, s, d]. With ring_slots [b] (a decode step,
        s = 1) kv goes straight to those slots of the window ring and None stands in for it."""
        qr = self.q_norm(qa)
        q = self.wq_b(qr).unflatten(-1, (self.n_local_heads, self.head_dim))
        q = self.ops.norm_rope(q, freqs, self.rope_head_dim, self.eps)
        if ring_slots is not None:
            self.ops.norm_rope_into(kva, freqs, self.rope_head_dim, self.eps, self.kv_norm.weight, self.kv_cache,
                                    ring_slots)
            return qr, q, None
        kv = self.ops.norm_rope(kva, freqs, self.rope_head_dim, self.eps, self.kv_norm.weight)
        return qr, q, kv

    def output(self, o: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Rotate the RoPE channels of o [b, s, h, d] back, then the grouped projection -> [b, s, D]."""
        bsz, seqlen = o.shape[:2]
        o = self.ops.norm_rope(o, freqs, self.rope_head_dim, inverse=True)
        if self.tp.pair_group is not None:   # gather the heads of this rank's output group
            parts = [torch.empty_like(o) for _ in range(dist.get_world_size(self.tp.pair_group))]
            dist.all_gather(parts, o.contiguous(), group=self.tp.pair_group)
            o = torch.cat(parts, dim=2)
        o = o.reshape(bsz, seqlen, self.n_local_groups, -1)
        if self.wo_a.quant is not None:
            o = self.ops.grouped_linear_lowp(o, self.wo_a.weight, self.wo_a.scale)  # [b, s, g, o_lora_rank]
        else:
            wo_a = self.wo_a.weight.view(self.n_local_groups, self.o_lora_rank, -1)
            o = torch.einsum("bsgd,grd->bsgr", o, wo_a)
        return self.tp.all_reduce(self.wo_b(o.flatten(2)), group=self.tp.proj_group)


# ---------------------------------------------------------------- mixture of experts

class Gate(nn.Module):
    """Router: hash layers take experts from the fixed tid2eid[token]; the others take the top k of
    score + bias. Weights are the scores of the chosen experts, normalised, times route_scale."""
    def __init__(self, layer_id: int, args: ModelArgs, ops: Ops):
        super().__init__()
        self.topk, self.score_func, self.route_scale = args.n_activated_experts, args.score_func, args.route_scale
        self.ops = ops
        self.hash = layer_id < args.n_hash_layers
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype_of(args.dtype)),
                                   requires_grad=False)
        if self.hash:
            self.tid2eid = nn.Parameter(torch.empty(args.vocab_size, self.topk, dtype=torch.int32),
                                        requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        """x [T, D], ids [T] -> weights [T, k] float32, experts [T, k] int64 (kernel.route_torch)."""
        return self.ops.route(self.ops.linear_fp32(x, self.weight), None if self.hash else self.bias,
                              self.tid2eid if self.hash else None, ids, self.topk, self.score_func, self.route_scale)


class Expert(nn.Module):
    """SwiGLU feed-forward w2(silu(w1 x) * w3 x); the routed experts clamp with swiglu_limit.
    With `parts` > 1 it is split over ranks (w1, w3 by rows, w2 by columns) and returns a partial sum.
    quant: its weights kept as the release stores them (parallel.Quantised), None for the model dtype."""
    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, swiglu_limit: float = 0.0, parts: int = 1,
                 quant=None):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, dtype, parts, quant)
        self.w2 = RowParallelLinear(inter_dim, dim, dtype, parts, quant)
        self.w3 = ColumnParallelLinear(dim, inter_dim, dtype, parts, quant)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = swiglu(self.w1(x), self.w3(x), self.swiglu_limit)
        if weights is not None:
            h = h * weights
        return self.w2(h.to(x.dtype)).float()


class MoE(nn.Module):
    """Routed experts split by index over ranks plus one shared expert split by width; the two
    partial sums are reduced with a single all-reduce.

    On the Triton path the local experts' weights live in two stacked tensors, w13 [E, 2I, D]
    and w2 [E, D, I], and the shared expert's w1 and w3 in one [2Is, D], of which the parameters
    are views (made once, after loading). Few tokens (decode) take the routed and shared experts
    together in three launches (Ops.moe_gemv); more take grouped GEMMs over the tokens sorted by
    expert (Ops.moe_grouped). Weights kept as the release stores them stack with their scales
    (parallel.stack_rows: FP8 ones with w3 from a multiple of 128 rows). Where the expert kernels keep
    the routed experts in a layout of their own (Ops.pack_experts: humming-kernels for MXFP4), they get
    the stacked tensors once and hold the only copy; the experts' parameters are emptied.

    The gate maps (x [T, D], token ids [T]) to (weights [T, k], experts [T, k]); shared_inter is the
    shared expert's width. DeepSeek-V3/R1 (model_v3.py) passes its own gate and width."""
    def __init__(self, args, tp: Parallel, ops: Ops, gate: nn.Module, shared_inter: int):
        super().__init__()
        self.tp, self.ops, self.swiglu_limit = tp, ops, args.swiglu_limit
        dtype = dtype_of(args.dtype)
        dense, routed = quantised_formats(args, ops)
        n_local = args.n_routed_experts // tp.world_size
        self.local = range(tp.rank * n_local, (tp.rank + 1) * n_local)
        self.gate = gate
        self.experts = nn.ModuleList([
            Expert(args.dim, args.moe_inter_dim, dtype, args.swiglu_limit, quant=routed) if i in self.local else None
            for i in range(args.n_routed_experts)])
        self.shared_experts = Expert(args.dim, shared_inter, dtype, parts=tp.world_size, quant=dense)
        self.stacked, self.stacked_from = None, None

    def stacked_weights(self):
        """(w13, w2) of the local experts, the shared expert's [w1; w3] and the row where its w3
        starts; each a tensor, or (weight, scale) for weights kept as the release stores them; or, for
        experts Ops.pack_experts packed, (their packed form, None, ...). Restacked whenever the
        parameters moved (load, .to()), except packed experts: packed once, after loading."""
        experts = [self.experts[i] for i in self.local]
        shared = self.shared_experts
        if self.stacked is None or self.stacked_from != (experts[0].w1.weight.data_ptr(), shared.w1.weight.data_ptr()):
            first = experts[0]
            _, rows = row_starts([first.w1, first.w3])
            w13 = first.w1.weight.new_zeros(len(experts), rows, *first.w1.weight.shape[1:])
            s13 = None if first.w1.scale is None else group_major(w13, first.w1.scale.new_zeros(
                len(experts), rows // row_block(first.w1), *first.w1.scale.shape[1:]))
            for i, e in enumerate(experts):
                stack_rows([e.w1, e.w3], (w13[i], None if s13 is None else s13[i]))
            w2 = torch.stack([e.w2.weight for e in experts])
            s2 = None if first.w2.scale is None else group_major(w2, torch.stack([e.w2.scale for e in experts]))
            for i, e in enumerate(experts):
                e.w2.weight.data = w2[i]
                if s2 is not None:
                    e.w2.scale.data = s2[i]
            shared13, shared_scale, starts = stack_rows([shared.w1, shared.w3])
            routed = (stored(w13, s13), stored(w2, s2))
            packed = self.ops.pack_experts(*routed)
            if packed is not None:
                routed = (packed, None)
                for e in experts:
                    for p in (e.w1.weight, e.w1.scale, e.w2.weight, e.w2.scale, e.w3.weight, e.w3.scale):
                        p.data = p.data.new_empty(0)
            self.stacked = (*routed, stored(shared13, shared_scale), starts[1])
            self.stacked_from = (experts[0].w1.weight.data_ptr(), shared.w1.weight.data_ptr())
        return self.stacked

    def shared_gate_up(self, x: torch.Tensor, shared13, up: int) -> torch.Tensor:
        """x [T, D] through the shared expert's stacked [w1; w3] (w3 from row up) -> [gate, up] [T, 2 Is]
        in x's dtype."""
        if not isinstance(shared13, tuple):
            return F.linear(x, shared13)
        gu = self.ops.linear_lowp(x, *shared13)
        inter = self.shared_experts.w1.weight.size(0)
        return gu if up == inter else torch.cat([gu[:, :inter], gu[:, up:up + inter]], dim=1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.gate(x, ids.reshape(-1))
        stacked = self.stacked_weights() if self.ops.triton else None
        path = self.ops.moe_path(experts.numel(), stacked[0] if stacked else None)
        if path == "gemv":
            w13, w2, shared13, up = stacked
            y = self.ops.moe_gemv(x, w13, w2, weights, experts, self.local.start, self.swiglu_limit,
                                  self.shared_gate_up(x, shared13, up), self.shared_experts.w2.stored(),
                                  torch.float32 if self.tp.world_size > 1 else x.dtype)
            return self.tp.all_reduce(y).to(x.dtype).view(shape)
        y = self.shared_experts(x)                                  # float32 [T, D]
        if path == "grouped":
            w13, w2, _, _ = stacked
            y += self.ops.moe_grouped(x, w13, w2, weights, experts, self.local.start, self.swiglu_limit)
        else:
            counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
            for i in self.local:
                if counts[i]:
                    token, slot = torch.where(experts == i)
                    y.index_add_(0, token, self.experts[i](x[token], weights[token, slot, None]))
        return self.tp.all_reduce(y).to(x.dtype).view(shape)


# ---------------------------------------------------------------- blocks with hyper-connections

class Exit(NamedTuple):
    """A sublayer's output f [b, s, D] not yet written back into the streams residual [b, s, hc, D]: the
    new streams are ops.hc_post(f, residual, post, comb). Blocks hand their MoE's exit on, so that the
    next sublayer's entry makes the streams in the launch that starts it (ops.hc_post_pre)."""
    f: torch.Tensor
    residual: torch.Tensor
    post: torch.Tensor
    comb: torch.Tensor

    def streams(self, ops: Ops) -> torch.Tensor:
        return ops.hc_post(self.f, self.residual, self.post, self.comb)


class Block(nn.Module):
    """One layer: attention and MoE, each entered through hc_pre and left through hc_post.

    The residual is hc streams [b, s, hc, D]. hc_pre collapses them with the `pre` weights into the
    sublayer's input; hc_post writes the output back with `post` and mixes the streams with the
    doubly stochastic `comb`. A block takes the streams or the previous block's Exit, and returns its
    own Exit.
    """
    def __init__(self, layer_id: int, args: ModelArgs, tp: Parallel, ops: Ops, rope: RotaryTables):
        super().__init__()
        self.norm_eps, self.hc_mult = args.norm_eps, args.hc_mult
        self.hc_sinkhorn_iters, self.hc_eps = args.hc_sinkhorn_iters, args.hc_eps
        self.ops = ops
        self.attn = Attention(layer_id, args, tp, ops, rope)
        self.ffn = MoE(args, tp, ops, Gate(layer_id, args, ops), args.moe_inter_dim)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, ops)
        mix, width = (2 + args.hc_mult) * args.hc_mult, args.hc_mult * args.dim
        for site in ("attn", "ffn"):
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.empty(mix, width), requires_grad=False))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.empty(mix), requires_grad=False))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.empty(3), requires_grad=False))

    def enter(self, x, fn, scale, base, norm: RMSNorm):
        """x: the streams [b, s, hc, D], or a sublayer's Exit -> (the streams, the sublayer's input
        [b, s, D] through its norm, post [b, s, hc], comb [b, s, hc, hc]): hc_pre, after hc_post for an Exit."""
        hc = (fn, scale, base, self.hc_mult, self.hc_sinkhorn_iters, self.norm_eps, self.hc_eps, norm.weight)
        if isinstance(x, Exit):
            return self.ops.hc_post_pre(*x, *hc)
        return (x, *self.ops.hc_pre(x, *hc))

    def forward(self, x, start_pos: int, ids: torch.Tensor) -> Exit:
        """x [b, s, hc, D] streams (or the previous block's Exit) at positions start_pos .. start_pos+s-1,
        ids [b, s] their tokens."""
        return self.sublayers(x, lambda h: self.attn(h, start_pos), ids)

    def decode(self, x, step: "DecodeStep", ids: torch.Tensor) -> Exit:
        """x [b, 1, hc, D] (or an Exit): one token per row at step.pos, with static shapes."""
        return self.sublayers(x, lambda h: self.attn.decode(h, step), ids)

    def sublayers(self, x, attend, ids: torch.Tensor) -> Exit:
        x, h, post, comb = self.enter(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.attn_norm)
        x, h, post, comb = self.enter(Exit(attend(h), x, post, comb), self.hc_ffn_fn, self.hc_ffn_scale,
                                      self.hc_ffn_base, self.ffn_norm)
        return Exit(self.ffn(h, ids), x, post, comb)


def hc_head_params(module: nn.Module, args: ModelArgs) -> None:
    """Register the HC head's hc_head_fn [hc, hc*D], hc_head_base [hc] and hc_head_scale [1]."""
    module.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, args.hc_mult * args.dim), requires_grad=False)
    module.hc_head_base = nn.Parameter(torch.empty(args.hc_mult), requires_grad=False)
    module.hc_head_scale = nn.Parameter(torch.empty(1), requires_grad=False)


def hc_head(module: nn.Module, x: torch.Tensor, norm: RMSNorm, args: ModelArgs, ops: Ops) -> torch.Tensor:
    """HC head: collapse the streams [b, s, hc, D] with sigmoid weights (no Sinkhorn), then the final
    norm -> [b, s, D] (ops.hc_pre with the head's hc_mult mixes)."""
    return ops.hc_pre(x, module.hc_head_fn, module.hc_head_scale, module.hc_head_base, args.hc_mult, 0,
                      args.norm_eps, args.hc_eps, norm.weight)[0]


class MTPBlock(Block):
    """Multi-token prediction block: mixes the embedding of the next token with the main model's
    last streams, runs one more layer and predicts with the shared head. Loaded, not used to generate."""
    def __init__(self, layer_id: int, args: ModelArgs, tp: Parallel, ops: Ops, rope: RotaryTables):
        super().__init__(layer_id, args, tp, ops, rope)
        self.args = args
        dtype = dtype_of(args.dtype)
        fp8 = quantised_formats(args, ops)[0]
        self.e_proj = Linear(args.dim, args.dim, dtype, fp8)
        self.h_proj = Linear(args.dim, args.dim, dtype, fp8)
        self.enorm = RMSNorm(args.dim, args.norm_eps, ops)
        self.hnorm = RMSNorm(args.dim, args.norm_eps, ops)
        self.norm = RMSNorm(args.dim, args.norm_eps, ops)
        hc_head_params(self, args)

    def predict(self, h: torch.Tensor, start_pos: int, ids: torch.Tensor, embed: nn.Module, head: ParallelHead):
        """h [b, s, hc, D] streams of the main model, ids [b, s] the next tokens -> logits [b, vocab]."""
        e = self.e_proj(self.enorm(embed(ids))).unsqueeze(2)
        x = self.forward(e + self.h_proj(self.hnorm(h)), start_pos, ids).streams(self.ops)
        return head(hc_head(self, x[:, -1:], self.norm, self.args, self.ops)[:, -1])


class Transformer(nn.Module):
    """embed -> hc streams -> blocks -> HC head -> norm -> logits of the last position. tp: the
    tensor-parallel place it is built for, by default this process's (Parallel.current)."""
    def __init__(self, args: ModelArgs, tp: Optional[Parallel] = None):
        tp = tp or Parallel.current(args.o_groups if args.ogroups_comm else None)
        args.validate(tp.world_size)
        super().__init__()
        self.args, self.tp = args, tp
        self.ops = ops = Ops(args.backend, expert_kernels=args.expert_kernels)   # tensors on the default device
        dtype = dtype_of(args.dtype)
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, dtype, tp)
        self.rope = RotaryTables(args)
        self.layers = nn.ModuleList([Block(i, args, tp, ops, self.rope) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.head = ParallelHead(args.vocab_size, args.dim, dtype, tp)
        self.mtp = nn.ModuleList([MTPBlock(args.n_layers + k, args, tp, ops, self.rope)
                                  for k in range(args.n_mtp_layers)])
        hc_head_params(self, args)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """input_ids [b, s] at positions start_pos .. start_pos+s-1 (caches hold the earlier ones)
        -> float32 logits of the last position [b, vocab]."""
        self.args.check_step(*input_ids.shape, start_pos)
        h = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)   # [b, s, hc, D]
        for layer in self.layers:
            h = layer(h, start_pos, input_ids)
        h = h.streams(self.ops)
        return self.head(hc_head(self, h[:, -1:], self.norm, self.args, self.ops)[:, -1])

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row, input_ids [b, 1] at positions pos [b] -> float32 logits [b, vocab]: the
        decode step, with static shapes and no host sync (CUDA graphs capture it)."""
        if input_ids.size(1) != 1 or pos.shape != (input_ids.size(0),):
            raise ValueError("decode takes one token per row and a position per row")
        step = DecodeStep.at(pos, self.args.window_size, self.ops)
        h = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)   # [b, 1, hc, D]
        for layer in self.layers:
            h = layer.decode(h, step, input_ids)
        h = h.streams(self.ops)
        return self.head(hc_head(self, h, self.norm, self.args, self.ops)[:, -1])
