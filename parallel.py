"""Tensor parallelism over torch.distributed, and what the models share: the layers, and reading
their config files (ConfigFile).

  Parallel                                  this process's place in the world (and the o-groups layout)
  OneShotAllReduce, one_shot_unusable       small all-reduces through torch's symmetric memory
  Quantised, quantised_formats              a weight kept as the release stores it (FP8 or MXFP4, with
                                            its scale), as the shards' config.json says
  Linear, ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, ParallelHead
                                            weights split over ranks by rows, columns or vocabulary
  stack_rows                                layers of one input stacked into one matrix
  RMSNorm, precompute_freqs_cis             the norm and the rotary table (with YaRN)

Which tensor of a checkpoint is split along which dim is each model's SPLITS table (model.py,
model_v3.py); convert.py cuts the release by it and these layers hold the pieces.
"""
import json
import math
import os
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ops import BACKENDS, Ops, dequantised, linear_fp32
from quant import FP8_BLOCK, fp4_scale_shape, fp8_scale_shape


class ConfigFile:
    """What a model's ModelArgs shares: from_file reads a JSON config and hands it to the class's
    from_config(raw, path, **overrides); check_fields refuses values of the wrong kind."""
    MAY_BE_ZERO: Tuple[str, ...] = ()   # the integer fields that may be 0 (the others count from 1)

    @classmethod
    def from_file(cls, path: str, **overrides):
        """The ModelArgs a config file describes; overrides set fields (runtime keys first of all)."""
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls.from_config(raw, path, **overrides)

    def check_fields(self) -> None:
        """ValueError naming the first field whose value is not of its annotated kind: an integer (not a
        bool; at least 1, or 0 for MAY_BE_ZERO), a finite number, a bool, a string, a list of integers
        at least 0. Config files are JSON: "64" or 64.0 for a width is a mistake to name, not to run."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is int:
                least = 0 if f.name in self.MAY_BE_ZERO else 1
                ok, want = type(value) is int and value >= least, f"an integer >= {least}"
            elif f.type is float:
                ok, want = type(value) in (int, float) and math.isfinite(value), "a finite number"
            elif f.type is bool:
                ok, want = type(value) is bool, "true or false"
            elif f.type is str:
                ok, want = type(value) is str, "a string"
            elif f.type == List[int]:
                ok, want = type(value) in (list, tuple) and all(type(v) is int and v >= 0 for v in value), \
                    "a list of integers >= 0"
            else:
                continue
            if not ok:
                raise ValueError(f"{f.name} must be {want}, got {value!r}")

    @staticmethod
    def reader(raw: dict, path: str):
        """get(key, default=None) of the config raw read from path: its value, the default where the key
        is absent or null, and a ValueError naming the key where there is no default."""
        def get(key, default=None):
            if raw.get(key) is not None:
                return raw[key]
            if default is None:
                raise ValueError(f"{path}: missing config key '{key}'")
            return default
        return get

    def check_runtime(self) -> None:
        """ValueError naming dtype or backend, the runtime fields both families share, when unknown."""
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def check_step(self, bsz: int, seqlen: int, start_pos: int) -> None:
        """ValueError when a forward of bsz rows at positions start_pos .. start_pos+seqlen-1 passes
        max_batch_size or max_seq_len (the sizes the caches were built for)."""
        if bsz > self.max_batch_size or start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"batch {bsz} x positions up to {start_pos + seqlen} exceed max_batch_size="
                             f"{self.max_batch_size} / max_seq_len={self.max_seq_len}")


# All-reduces over the world of up to this many bytes (a decode step's: a few KB to 1 MB) take the
# one-shot kernel of torch's symmetric memory where one_shot_unusable allows it, larger ones NCCL.
ONE_SHOT_BYTES = 1 << 20


def one_shot_unusable(world_size: int) -> Optional[str]:
    """Why the world's all-reduces cannot take OneShotAllReduce, or None when they can: it needs CUDA
    with NCCL, every rank on this node (torchrun's LOCAL_WORLD_SIZE) with peer access to the others'
    GPUs, and torch's one_shot_all_reduce_copy_out."""
    if not torch.cuda.is_available() or dist.get_backend() != "nccl":
        return "not CUDA with NCCL"
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != world_size:
        return "the ranks span nodes"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} lacks symm_mem.one_shot_all_reduce_copy_out"
    here = torch.cuda.current_device()
    if torch.cuda.device_count() < world_size or not all(
            torch.cuda.can_device_access_peer(here, d) for d in range(world_size) if d != here):
        return "no peer access between the GPUs"
    return None


class OneShotAllReduce:
    """The sum over the world's ranks of small tensors, for latency: each rank copies its tensor into a
    buffer the others map (torch's symmetric memory, over NVLink), then reads all ranks' copies and adds
    them up, in one kernel (torch.ops.symm_mem.one_shot_all_reduce_copy_out): about 7 us against NCCL's
    10.6 for a decode step's few KB (two H200s). tools/all_reduce_check.py checks that every rank gets
    NCCL's sums bit for bit. One buffer of ONE_SHOT_BYTES per dtype the models reduce (bf16, float32),
    exchanged with the ranks once."""
    def __init__(self):
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD
        self.group_name = group.group_name
        device = torch.device("cuda", torch.cuda.current_device())
        self.buffers = {}
        for dtype in (torch.bfloat16, torch.float32):
            self.buffers[dtype] = symm_mem.empty(ONE_SHOT_BYTES // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(self.buffers[dtype], group)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether x goes this way: contiguous, of a buffer's dtype, at most ONE_SHOT_BYTES in whole 16-byte
        words (a probe of 255 bf16 values failed in torch's kernel)."""
        size = x.numel() * x.element_size()
        return x.dtype in self.buffers and x.is_contiguous() and size <= ONE_SHOT_BYTES and size % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers[x.dtype][:x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer, x, "sum", self.group_name, torch.empty_like(x))


@dataclass
class Parallel:
    """Where this process sits in the tensor-parallel world.

    In the o-groups layout (world size N > o_groups G), the N // G consecutive ranks of a pair group
    share one output group: they gather their heads before wo_a, and wo_b is reduced over the
    projection group, one rank of each pair group. one_shot: the world's small all-reduces, where
    one_shot_unusable allows them (else NCCL's).
    """
    world_size: int = 1
    rank: int = 0
    pair_group: Optional[dist.ProcessGroup] = None
    proj_group: Optional[dist.ProcessGroup] = None
    one_shot: Optional[OneShotAllReduce] = None

    @classmethod
    def current(cls, o_groups: Optional[int] = None) -> "Parallel":
        """This process's place in the initialised process group (a world of one without it); with
        o_groups, the o-groups layout's pair and projection groups too."""
        if not dist.is_initialized():
            return cls()
        ws, rank = dist.get_world_size(), dist.get_rank()
        p = cls(ws, rank)
        if ws > 1 and dist.get_backend() == "nccl":
            # every rank must take the same way (setting it up is a collective): one rank's reason is all's
            usable = torch.tensor([one_shot_unusable(ws) is None], dtype=torch.int32, device="cuda")
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
            p.one_shot = OneShotAllReduce() if usable.item() else None
        if o_groups and ws > 1:
            per_group = ws // o_groups
            for g in range(o_groups):               # every rank takes part in every new_group call
                grp = dist.new_group(list(range(g * per_group, (g + 1) * per_group)))
                if rank // per_group == g:
                    p.pair_group = grp
            for j in range(per_group):
                grp = dist.new_group(list(range(j, ws, per_group)))
                if rank % per_group == j:
                    p.proj_group = grp
        return p

    @property
    def out_group_split(self) -> int:
        """How many ways the output groups (wo_a rows, wo_b columns) are split."""
        return dist.get_world_size(self.proj_group) if self.proj_group is not None else self.world_size

    def all_reduce(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """The sum of x over the ranks of group (default: the world); x itself, summed in place, or a new tensor."""
        if self.world_size > 1:
            if group is None and self.one_shot is not None and self.one_shot.takes(x):
                return self.one_shot(x)
            dist.all_reduce(x, group=group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., n] of every rank -> [.., world_size * n], the ranks' parts in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)


LOWP_DTYPES = {torch.float8_e4m3fn, torch.int8}    # weights kept as the release stores them: FP8, MXFP4 packed


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name, 'bf16' or 'fp32'."""
    return torch.float32 if name == "fp32" else torch.bfloat16


@dataclass(frozen=True)
class Quantised:
    """How a layer holds a weight the release quantises, kept as it is (convert.py --dtype fp8): fmt
    'fp8' (float8_e4m3fn [out, in], `scale` [ceil(out/128), ceil(in/128)] of scale_dtype: ue8m0 in
    V4, float32 in R1 / V3) or 'fp4' (MXFP4: int8 [out, in/2], ue8m0 `scale` [out, in/32]); ops
    computes with it."""
    fmt: str
    scale_dtype: torch.dtype
    ops: Ops

    def shapes(self, out_features: int, in_features: int):
        """(weight shape, weight dtype, scale shape) of an [out, in] weight."""
        if self.fmt == "fp4":
            return (out_features, in_features // 2), torch.int8, fp4_scale_shape(out_features, in_features)
        return (out_features, in_features), torch.float8_e4m3fn, fp8_scale_shape(out_features, in_features)


def quantised_formats(args, ops: Ops) -> Tuple[Optional[Quantised], Optional[Quantised]]:
    """(dense, experts): how a model's layers hold the weights the release quantises, from its
    ModelArgs' weights and expert_weights (quant.shard_weights) and its release's FP8 scale dtype
    (ModelArgs.SCALE_DTYPE); None for the model dtype."""
    def one(fmt: str) -> Optional[Quantised]:
        if fmt == "bf16":
            return None
        return Quantised(fmt, torch.float8_e8m0fnu if fmt == "fp4" else args.SCALE_DTYPE, ops)
    return one(args.weights), one(args.expert_weights)


class Linear(nn.Module):
    """y = x W^T without bias; W [out, in] in the model dtype, or as quant says (with its `scale`),
    computed in the model dtype all the same: the activations keep their dtype, the weight is
    dequantised on the fly (ops.Ops.linear_lowp)."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, quant: Optional[Quantised] = None):
        super().__init__()
        self.dtype, self.quant = dtype, quant
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            self.register_parameter("scale", None)
        else:
            shape, weight_dtype, scale_shape = quant.shapes(out_features, in_features)
            self.weight = nn.Parameter(torch.empty(shape, dtype=weight_dtype), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(scale_shape, dtype=quant.scale_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x.to(self.weight.dtype), self.weight)
        return self.quant.ops.linear_lowp(x.to(self.dtype), self.weight, self.scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading: a weight quantised in the checkpoint and not in the model (or the other way round)
        is refused by name, before torch's shape checks would report it as sizes that differ."""
        stored = state_dict.get(prefix + "weight")
        if stored is not None and stored.dtype != self.weight.dtype and LOWP_DTYPES & {stored.dtype, self.weight.dtype}:
            error_msgs.append(f"{prefix}weight is {stored.dtype} in the checkpoint and {self.weight.dtype} in the "
                              f"model: config.json's weights / expert_weights say how the shards hold the release's "
                              f"quantised weights (convert.py writes them), and this config does not describe them")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantised(self) -> torch.Tensor:
        """The weight [out, in] in the model dtype (the parameter itself when it is not quantised)."""
        return self.weight if self.quant is None else dequantised(self.weight, self.scale, self.dtype)

    def stored(self):
        """The weight as the kernels take it: the tensor in the model dtype, or (weight, scale) as stored."""
        return stored(self.weight, self.scale)


class ColumnParallelLinear(Linear):
    """Output features split over `parts` ranks; no communication."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, parts: int,
                 quant: Optional[Quantised] = None):
        super().__init__(in_features, out_features // parts, dtype, quant)


class RowParallelLinear(Linear):
    """Input features split over `parts` ranks; returns this rank's partial sum (the caller reduces)."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, parts: int,
                 quant: Optional[Quantised] = None):
        super().__init__(in_features // parts, out_features, dtype, quant)


def stored(weight: torch.Tensor, scale: Optional[torch.Tensor]):
    """A weight as the kernels take it: the tensor alone, or (weight, scale) when it has a scale."""
    return weight if scale is None else (weight, scale)


def row_block(layer: Linear) -> int:
    """The rows one row of the layer's scale covers: 128 for FP8, else 1 (MXFP4, or no scale)."""
    return FP8_BLOCK if layer.weight.dtype == torch.float8_e4m3fn else 1


def row_starts(layers: List[Linear]) -> Tuple[List[int], int]:
    """Where each layer's rows start when stack_rows stacks them, and the rows in all: FP8 layers
    start at multiples of 128, so that their block scales stack too."""
    pad = row_block(layers[0])
    starts, rows = [], 0
    for layer in layers:
        starts.append(rows)
        rows += -(-layer.weight.size(0) // pad) * pad
    return starts, rows


def group_major(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Stacked experts' scale [E, rows, groups] as the MoE kernels read it fastest: for MXFP4 weights
    (int8) stored group after group, a group's scales of all rows side by side, so that a kernel's tile of
    rows loads its scales of a group as one vector rather than a byte a row (an H100's few-token MoE
    10% faster, BENCHMARKS.md, eighth session); the same values, other strides. Other scales as they are."""
    if scale is None or weight.dtype != torch.int8:
        return scale
    return scale.transpose(1, 2).contiguous().transpose(1, 2)


def stack_rows(layers: List[Linear], out=None):
    """The weights of layers that read the same input stacked by rows into one matrix, so that one
    matmul computes all of them; each layer's parameters become views into it (its memory is shared,
    not copied). Layers in the model dtype stack as they are; FP8 ones stack with their block scales,
    each layer's rows padded with zeros to a multiple of 128 so that its blocks stay whole (no padding
    when the rows are multiples of 128 already, as at V4's and R1's real sizes); MXFP4 ones with their
    per-row scales. out: (weight, scale or None) to fill, zeros of the stacked shapes (default: new).
    Returns (weight [rows, ..], scale or None, the row where each layer starts)."""
    starts, rows = row_starts(layers)
    first, pad = layers[0], row_block(layers[0])
    if out is None:
        out = (first.weight.new_zeros(rows, *first.weight.shape[1:]),
               None if first.scale is None else first.scale.new_zeros(rows // pad, *first.scale.shape[1:]))
    weight, scale = out
    for layer, start in zip(layers, starts):
        n = layer.weight.size(0)
        weight[start:start + n] = layer.weight
        layer.weight.data = weight[start:start + n]
        if scale is not None:
            m = layer.scale.size(0)
            scale[start // pad:start // pad + m] = layer.scale
            layer.scale.data = scale[start // pad:start // pad + m]
    return weight, scale, starts


class ParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary; each rank looks up its rows, then one all-reduce."""
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: Parallel):
        super().__init__()
        self.tp = tp
        self.part = vocab_size // tp.world_size
        self.start = tp.rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class RMSNorm(nn.Module):
    """RMSNorm with a float32 weight (the release stores it in bf16)."""
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def precompute_freqs_cis(dim: int, seqlen: int, original_seq_len: int, base: float, factor: float,
                         beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Rotary frequencies [seqlen, dim/2] as complex64, with YaRN interpolation when original_seq_len > 0."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if original_seq_len > 0:
        def correction_dim(rotations):
            return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


class ParallelHead(nn.Module):
    """Output projection split along the vocabulary; logits gathered from all ranks.

    The weight stays in the model dtype; logits are float32 sums of products of its values, as in
    the reference (which upcasts a bf16 weight), without a float32 copy of the 129280 x D matrix."""
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: Parallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(vocab_size // tp.world_size, dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, D] -> float32 logits [b, vocab]."""
        return self.tp.all_gather(linear_fp32(x, self.weight))
