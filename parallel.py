"""Tensor parallelism over torch.distributed, and what the models share: the layers, and reading
their config files (ConfigFile).

  Parallel                                  this process's place in the world (and the o-groups layout)
  Linear, ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, ParallelHead
                                            weights split over ranks by rows, columns or vocabulary
  RMSNorm, precompute_freqs_cis             the norm and the rotary table (with YaRN)

Which tensor of a checkpoint is split along which dim is each model's SPLITS table (model.py,
model_v3.py); convert.py cuts the release by it and these layers hold the pieces.
"""
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ops import Ops


class ConfigFile:
    """What a model's ModelArgs shares: from_file reads a JSON config and hands it to the class's
    from_config(raw, path, **overrides)."""

    @classmethod
    def from_file(cls, path: str, **overrides):
        """The ModelArgs a config file describes; overrides set fields (runtime keys first of all)."""
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_config(raw, path, **overrides)


@dataclass
class Parallel:
    """Where this process sits in the tensor-parallel world.

    In the o-groups layout (world size N > o_groups G), the N // G consecutive ranks of a pair group
    share one output group: they gather their heads before wo_a, and wo_b is reduced over the
    projection group, one rank of each pair group.
    """
    world_size: int = 1
    rank: int = 0
    pair_group: Optional[dist.ProcessGroup] = None
    proj_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def current(cls, o_groups: Optional[int] = None) -> "Parallel":
        """This process's place in the initialised process group (a world of one without it); with
        o_groups, the o-groups layout's pair and projection groups too."""
        if not dist.is_initialized():
            return cls()
        ws, rank = dist.get_world_size(), dist.get_rank()
        p = cls(ws, rank)
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
        if self.world_size > 1:
            dist.all_reduce(x, group=group)
        return x


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name, 'bf16' or 'fp32'."""
    return torch.float32 if name == "fp32" else torch.bfloat16


class Linear(nn.Module):
    """y = x W^T without bias; W [out, in]."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] W^T as float32 sums of products of the values in the weight's dtype (as the reference,
    which upcasts both); on CUDA without a float32 copy of the weight."""
    if x.is_cuda:
        return torch.mm(x.to(weight.dtype), weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


class ColumnParallelLinear(Linear):
    """Output features split over `parts` ranks; no communication."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, parts: int):
        super().__init__(in_features, out_features // parts, dtype)


class RowParallelLinear(Linear):
    """Input features split over `parts` ranks; returns this rank's partial sum (the caller reduces)."""
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, parts: int):
        super().__init__(in_features // parts, out_features, dtype)


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
        logits = linear_fp32(x, self.weight)
        if self.tp.world_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp.world_size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)
