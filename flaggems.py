"""FlagGems (the flag-gems package, FlagOS' Triton operator library) as the backend 'flaggems'.

Its fused kernels stand in for three of our operators (adapters below; ops.Ops calls them); with
FLAGGEMS_EXCLUDE set, torch's aten operators are routed through it too (enable), except the
functions that FLAGGEMS_BROKEN names with the reason each was measured to fail.
"""
import contextlib
import functools
import os
from typing import List, Optional

import torch

from kernel import sparse_attn_triton

INSTALL = ("pip install --no-deps flag-gems==5.0.2 && pip install PyYAML sqlalchemy packaging typing_extensions "
           "(see README)")

# Importing flag_gems raises without a visible GPU, so it is imported on first use.
# What differs from ours, and how the adapters below handle it:
#   flag_gems.sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale): same arguments and
#     layout as sparse_attn, but it is written for bf16 (P is cast to bf16 for the P.V product and
#     the output is rounded to bf16), the head count is a tl.arange bound (a power of two, and at
#     least 16 for tl.dot), and the sink is added after the keys. Its running maximum starts from
#     the first block of keys, so a query whose first block holds only -1 entries gets NaN (seen on
#     an H100: the window indices of a prompt's first 64 tokens start with -1 slots; and a query with
#     no valid key at all). Adapter: bf16 only (fp32 goes to our Triton kernel), each query's
#     indices sorted in descending order so that valid ones come first (the softmax does not depend
#     on the order; the model always gives a query its own window slot), heads padded with zero
#     queries to a power of two >= 16 and cut off again, indices passed as int32 (its documented
#     type; ours are int64).
#   flag_gems.hadamard_transform(x, scale): F.linear(x, H) * scale with H the Sylvester matrix,
#     result in x's dtype: the same as ops.hadamard_torch.
#   flag_gems.fused.mhc.hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps):
#     the same arguments and maths (sigmoid gates, row softmax + eps, column normalisation, then
#     iters - 1 row/column rounds); its Triton kernel hard-codes eps = 1e-6 and runs only then
#     (other eps: its torch reference). It reads hc_scale [3] and hc_base [mix] as float32 pointers
#     and returns float32, so the adapter passes float32 contiguous tensors.


@functools.lru_cache(maxsize=None)
def flag_gems_module():
    """The flag_gems package, imported on first use (RuntimeError with the install command if it is missing)."""
    try:
        import flag_gems
    except ImportError:
        raise RuntimeError(f"backend 'flaggems' needs the flag_gems package: {INSTALL}") from None
    return flag_gems


def sparse_attn_flaggems(q, kv, attn_sink, topk_idxs, softmax_scale):
    """sparse_attn through flag_gems.sparse_attn_triton where it fits (bf16), else our Triton kernel."""
    if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        return sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale)
    b, s, h, d = q.shape
    if d & (d - 1) or d < 16:
        return sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale)
    heads = max(16, 1 << (h - 1).bit_length())
    sink = attn_sink.float()
    if heads != h:       # padded heads: zero queries with a zero sink, dropped from the result
        q = torch.cat([q, q.new_zeros(b, s, heads - h, d)], dim=2)
        sink = torch.cat([sink, sink.new_zeros(heads - h)])
    valid_first = topk_idxs.to(torch.int32).sort(dim=-1, descending=True).values
    o = flag_gems_module().sparse_attn_triton(q.contiguous(), kv, sink.contiguous(), valid_first, softmax_scale)
    return o[:, :, :h] if heads != h else o


def hadamard_flaggems(x: torch.Tensor, scale: float) -> torch.Tensor:
    return flag_gems_module().hadamard_transform(x, scale)


def hc_split_flaggems(mixes, hc_scale, hc_base, hc_mult: int, iters: int, eps: float):
    fused = flag_gems_module().fused.mhc.hc_split_sinkhorn
    return fused(mixes.float(), hc_scale.float().contiguous(), hc_base.float().contiguous(), hc_mult, iters, eps)


# ---------------------------------------------------------------- routing torch's aten operators

# Backend flaggems runs FlagGems' fused V4 kernels. Routing torch's aten ops through FlagGems too is
# slower on an H100 (flag-gems 5.0.2, 4 real-shape layers, bench.py backends: decode 2.40 against
# 1.61 ms a step, prefill of 512 tokens 102.6 against 26.0 ms), so it is off unless FLAGGEMS_EXCLUDE
# is set. When it is on, these FlagGems functions stay with torch whatever FLAGGEMS_EXCLUDE says,
# each for what tools/flaggems_ops.py measured (BENCHMARKS.md):
FLAGGEMS_BROKEN = {
    "mm": "gave no result within 140 s on the fixture model (slow compilation or a hang)",
    "mul": "returns a wrong shape for the broadcast [b, s, 4, 1] * [b, s, 4, D]",
    "topk": "picks other entries: the fixture model's logits 6.1e-2 off torch's with it routed (float32)",
    "cat": "illegal memory access at real shapes: outputs past 2^31 elements (the stacked experts)",
    "stack": "illegal memory access at real shapes (the stacked experts, as cat)",
    "sum_dim": "logits 5.6e-2 off torch at real shapes with it routed, 0 without it (bf16)",
}


def flaggems_exclude() -> List[str]:
    """FLAGGEMS_EXCLUDE unset: ["*"] (no aten op goes to FlagGems). Set: its comma-separated FlagGems
    function names (possibly none), then those of FLAGGEMS_BROKEN not among them."""
    if "FLAGGEMS_EXCLUDE" not in os.environ:
        return ["*"]
    names = [name.strip() for name in os.environ["FLAGGEMS_EXCLUDE"].split(",") if name.strip()]
    return names + [name for name in FLAGGEMS_BROKEN if name not in names]


class Unavailable(RuntimeError):
    """FlagGems cannot run here; the message says why and what to do."""


def enable(exclude: Optional[List[str]] = None, scoped: bool = False, what: str = "--backend flaggems"):
    """Get FlagGems ready for backend 'flaggems': check for CUDA and the flag_gems package, then route
    torch's aten operators through FlagGems except the op names in exclude (default: flaggems_exclude();
    ["*"] patches none, leaving only the fused kernels that ops.Ops calls).

    The patching lasts for the whole process; with scoped=True it is undone when the returned context
    (flag_gems.use_gems) exits, so one process can also run a configuration without FlagGems.
    `what` names the request in messages. Raises Unavailable."""
    if exclude is None:
        exclude = flaggems_exclude()
    if not torch.cuda.is_available():
        raise Unavailable(f"{what} needs a CUDA GPU and none is visible"
                            + ("; set USE_FLAGGEMS=0 to run without FlagGems" if what.startswith("USE_") else
                               "; use --backend torch or triton"))
    try:
        import flag_gems
    except ImportError:
        raise Unavailable(f"{what} but FlagGems is not installed: {INSTALL}") from None
    except Exception as e:   # flag_gems raises RuntimeError at import when it finds no device it supports
        raise Unavailable(f"{what}: importing flag_gems failed: {e}") from None
    if "*" in exclude:
        return contextlib.nullcontext()
    if scoped:
        return flag_gems.use_gems(exclude=exclude)
    flag_gems.enable(unused=exclude)
    return contextlib.nullcontext()
