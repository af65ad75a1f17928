"""The routed experts' MXFP4 GEMMs through humming-kernels, an opt-in alternative to kernel_lowp's.

humming-kernels (`pip install humming-kernels`, from the vLLM project) builds W4A16 (and, with FP8
activations, W4A8) CUDA GEMMs at first use with the system's nvcc. On an H100 its grouped MXFP4
GEMMs ran the routed experts of a V4-Flash layer about 1.9x faster than kernel_lowp's at 32 tokens
and 1.3x at 4096 (BENCHMARKS.md). ModelArgs.expert_kernels = "humming" (USE_HUMMING=1) chooses it;
ops.Ops packs the stacked experts through `PackedExperts` once, after loading, and the model then
drops its own copy of them.

ModelArgs.expert_kernels = "humming-fp8" (USE_HUMMING=fp8) feeds the GEMMs FP8 activations instead:
each row quantised per 128 channels with a power-of-two scale (quant.act_quant_fp8, DeepSeek's own
numerics for these GEMMs), which humming multiplies on FP8 tensor cores; faster for prefill, and
about 2.6% RMS per activation away from the bf16 numbers.

The MoE here: the (token, expert) assignments sorted by local expert on the device and the tokens'
rows gathered in that order (no host sync; one Triton launch for up to SORT_ROWS_MAX assignments;
assignments of experts this rank does not hold sort last and count for nothing), w13 as one GEMM
over the contiguous runs of each expert, SwiGLU times the routing weight (_swiglu_rows_kernel, bf16
as the other paths round it), w2 likewise, and each token's k outputs found in that order and
summed in float32 (_combine_kernel). It computes what ops.moe_lowp_torch does, except that
humming's GEMMs round each expert's gate/up and output to bf16 (as DeepSeek's own code does);
the order of the float32 sums inside a GEMM is humming's.

Shapes: T tokens, k experts a token, A = T k assignments, E local experts, D model dim, I expert
width (w3 starts at row UP of the stacked w13).
"""
import importlib.util
import json
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernel import local_experts, sort_by_expert, triton
from quant import FP8_BLOCK

# The activations humming's GEMMs take, by kind (ops.EXPERT_KERNELS maps ModelArgs.expert_kernels to
# one): its input_config for each (bf16: as they are; fp8: e4m3 rows with one float32 scale per 128
# channels, quantised here beforehand).
INPUTS = {"bf16": None,
          "fp8": {"quant_method": "humming", "a_dtype": "float8e4m3", "input_scale_group_size": FP8_BLOCK,
                  "input_quant_mode": "dynamic_group"}}

if triton is not None:
    import triton.language as tl
    from kernel import _expert_place
    from kernel_lowp import _rounded

    @triton.jit
    def _e4m3(v):
        # float32 v (|v| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, still float32:
        # 3 mantissa bits from 2^-6 up (bit arithmetic), multiples of 2^-9 below (adding and taking away
        # 1.5 * 2^14, whose float32 spacing is 2^-9, to |v|; the sign kept, -0 too). The cast after it is
        # then exact, in Triton's interpreter too (whose own conversion does not round to nearest).
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = (((tl.abs(v) + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (bits & -2147483648))
        return tl.where(tl.abs(v) >= 0.015625, normal, small.to(tl.float32, bitcast=True))

    @triton.jit
    def _store_fp8_groups(v, cols, q_row, s_row, n_cols, G: tl.constexpr, N: tl.constexpr):
        # v [N G] float32 at columns cols [N G] of a row -> q_row[cols] float8 e4m3 and s_row[cols // G]
        # float32, as quant.act_quant_fp8: per G columns, the power of two at or above amax / 448.
        groups = tl.reshape(v, (N, G))
        at = tl.reshape(cols, (N, G))
        amax = tl.maximum(tl.max(tl.abs(groups), 1), 1e-4) * (1.0 / 448.0)
        bits = amax.to(tl.int32, bitcast=True)
        scale = (((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)) << 23).to(tl.float32, bitcast=True)
        q = _e4m3(tl.minimum(tl.maximum(groups / scale[:, None], -448.0), 448.0))
        tl.store(q_row + at, q.to(q_row.dtype.element_ty), mask=at < n_cols)
        first = tl.min(cols, 0) // G
        tl.store(s_row + first + tl.arange(0, N), scale, mask=(first + tl.arange(0, N)) * G < n_cols)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, D, sx, sq, ss, BLOCK: tl.constexpr, G: tl.constexpr):
        # Row r, columns cb BLOCK ..: x quantised to FP8 with a scale per G columns (_store_fp8_groups).
        r, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
        c = cb * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + r * sx + c, mask=c < D, other=0.0).to(tl.float32)
        _store_fp8_groups(v, c, q_ptr + r * sq, s_ptr + r * ss, D, G, BLOCK // G)

    @triton.jit
    def _swiglu_rows_kernel(gu_ptr, w_ptr, n_ptr, h_ptr, hs_ptr, I, UP, limit, sg, sh, shs,
                            BLOCK: tl.constexpr, CLAMP: tl.constexpr, FP8: tl.constexpr, G: tl.constexpr):
        # Row r < n (read on the device): h[r] = w[r] * silu(min(g, limit)) * clamp(u, -limit, limit) with
        # g = gu[r, :I], u = gu[r, UP:UP+I]; rows from n on (assignments of no local expert) are zero.
        # FP8: h rounded to gu's dtype, then quantised (h FP8, hs its scales per G columns).
        r, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
        c = cb * BLOCK + tl.arange(0, BLOCK)
        live = (r + tl.zeros_like(c)) < tl.load(n_ptr)
        mask = (c < I) & live
        g = tl.load(gu_ptr + r * sg + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + r * sg + UP + c, mask=mask, other=0.0).to(tl.float32)
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        h = g / (1.0 + tl.exp(-g)) * u * tl.load(w_ptr + r)
        if FP8:
            h = _rounded(h, gu_ptr.dtype.element_ty).to(tl.float32)
            _store_fp8_groups(h, c, h_ptr + r * sh, hs_ptr + r * shs, I, G, BLOCK // G)
        else:
            tl.store(h_ptr + r * sh + c, _rounded(h, h_ptr.dtype.element_ty), mask=c < I)


    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, n_ptr, out_ptr, D, sy, so, K: tl.constexpr, BLOCK: tl.constexpr):
        # out[t] = sum over its k assignments a = t k + j of y[pos[a]] (float32), those at or past row n
        # of y (no local expert) left out: the grouped outputs back in token order, summed.
        t, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
        c = cb * BLOCK + tl.arange(0, BLOCK)
        n = tl.load(n_ptr)
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j)
            acc += tl.load(y_ptr + row * sy + c, mask=(c < D) & (row + tl.zeros_like(c) < n), other=0.0).to(tl.float32)
        tl.store(out_ptr + t * so + c, acc, mask=c < D)


    @triton.jit
    def _sort_rows_kernel(x_ptr, w_ptr, e_ptr, rows_ptr, ws_ptr, pos_ptr, layout_ptr, A, first, n_local, D, sx, sr,
                          K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # Assignment a (of A <= BLOCK_A, token a // K): its place p in the order by local expert (experts
        # outside first .. first + n_local count as n_local, last; ties keep the assignments' order)
        # from comparing all keys; pos[a] = p, its token's row of x to rows[p], its weight to ws[p].
        # Program 0 also writes layout[e] = how many keys are below e, for e = 0 .. n_local.
        a = tl.program_id(0)
        keys, p = _expert_place(e_ptr, a, A, first, n_local, BLOCK_A)
        p = p.to(tl.int64)
        tl.store(pos_ptr + a, p)
        tl.store(ws_ptr + p, tl.load(w_ptr + a).to(tl.float32))
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            tl.store(rows_ptr + p * sr + d, tl.load(x_ptr + (a // K) * sx + d, mask=d < D), mask=d < D)
        if a == 0:
            for e0 in range(0, n_local + 1, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                below = tl.sum((keys[None, :] < e[:, None]).to(tl.int64), 1)
                tl.store(layout_ptr + e, below, mask=e <= n_local)


def unavailable(device: torch.device, backend: str = "auto") -> Optional[str]:
    """Why humming-kernels cannot run the experts on device with backend (ModelArgs.backend), or None
    when it can."""
    if backend == "torch":
        return "backend torch runs the references"
    if device.type != "cuda":
        return "it runs on CUDA GPUs only"
    if importlib.util.find_spec("humming") is None:
        return "the package is not installed: pip install humming-kernels (it compiles with nvcc at first use)"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "this project has run it on Hopper GPUs (sm_90) and newer only"
    return None


def quant_rows_triton(x: torch.Tensor):
    """x [R, K] (K a multiple of 128) -> (float8_e4m3fn [R, K], float32 scales [R, K/128]) as
    quant.act_quant_fp8 gives them."""
    x = x.contiguous()
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, k // FP8_BLOCK, dtype=torch.float32, device=x.device)
    if rows:
        block = 1024
        _quant_rows_kernel[(rows, triton.cdiv(k, block))](x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0),
                                                          BLOCK=block, G=FP8_BLOCK, num_warps=4)
    return q, scale


def swiglu_rows_triton(gu: torch.Tensor, weights: torch.Tensor, n_live: torch.Tensor, inter: int, up: int,
                       limit: float, fp8: bool = False):
    """gu [A, >= UP + I] (gate in columns 0 .. I-1, up from column UP), weights [A] float32, n_live a
    one-element int64 tensor -> h [A, I] in gu's dtype: weight * silu(gate) * up (clamped with limit > 0)
    for rows below n_live, zero from there on. fp8: h as quant_rows_triton(h) gives it, (FP8 [A, I],
    scales [A, I/128])."""
    rows = gu.size(0)
    h = torch.empty(rows, inter, dtype=torch.float8_e4m3fn if fp8 else gu.dtype, device=gu.device)
    scale = torch.empty(rows, inter // FP8_BLOCK if fp8 else 0, dtype=torch.float32, device=gu.device)
    if rows:
        block = 1024
        _swiglu_rows_kernel[(rows, triton.cdiv(inter, block))](
            gu, weights, n_live, h, scale, inter, up, limit, gu.stride(0), h.stride(0), max(1, scale.stride(0)),
            BLOCK=block, CLAMP=limit > 0, FP8=fp8, G=FP8_BLOCK, num_warps=4)
    return (h, scale) if fp8 else h


def combine_triton(y: torch.Tensor, pos: torch.Tensor, n_live: torch.Tensor, k: int) -> torch.Tensor:
    """y [A, D] (assignments in sorted order), pos [A] int64 (where assignment a sits in y), n_live a
    one-element int64 tensor -> float32 [A / k, D]: each token's k rows of y summed, the rows at or past
    n_live left out."""
    rows, dim = pos.numel() // k, y.size(1)
    out = torch.empty(rows, dim, dtype=torch.float32, device=y.device)
    if rows:
        block = 1024
        _combine_kernel[(rows, triton.cdiv(dim, block))](y, pos, n_live, out, dim, y.stride(0), out.stride(0), K=k,
                                                        BLOCK=block, num_warps=4)
    return out


SORT_ROWS_MAX = 1024     # up to this many assignments are sorted and gathered in one launch (_sort_rows_kernel)


def sorted_rows(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, first_expert: int, n_local: int,
                one_launch_max: int = SORT_ROWS_MAX):
    """The assignments of experts [T, k] sorted by local expert (expert_runs' order), no host sync:
    (rows [A, D]: their tokens' rows of x; their weights [A] float32; pos [A] int64: where each
    assignment went; layout [E + 1] int64 as expert_runs gives it). Up to one_launch_max assignments
    in one Triton launch, more through torch's sort and gathers."""
    t, k = experts.shape
    a = t * k
    if a > one_launch_max:
        order, layout = expert_runs(experts, first_expert, n_local)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(a, device=x.device))
        return x[order // k], weights.flatten()[order].float(), pos, layout
    x = x.contiguous()
    rows = torch.empty(a, x.size(1), dtype=x.dtype, device=x.device)
    ws = torch.empty(a, dtype=torch.float32, device=x.device)
    pos = torch.empty(a, dtype=torch.long, device=x.device)
    layout = torch.empty(n_local + 1, dtype=torch.long, device=x.device)
    _sort_rows_kernel[(a,)](x, weights.contiguous(), experts.contiguous(), rows, ws, pos, layout, a, first_expert,
                            n_local, x.size(1), x.stride(0), rows.stride(0), K=k,
                            BLOCK_A=triton.next_power_of_2(a), BLOCK_E=16, BLOCK_D=1024, num_warps=4)
    return rows, ws, pos, layout


def expert_runs(experts: torch.Tensor, first_expert: int, n_local: int):
    """experts [T, k] global ids -> (order [A]: the assignments sorted by local expert, those of no
    local expert last; layout [E + 1] int64: where each local expert's run starts in that order, and
    after the last one, the number of local assignments). No host sync."""
    order, _, ends = sort_by_expert(local_experts(experts, first_expert, n_local), n_local)
    return order, F.pad(ends, (1, 0))


def humming_layer(weight_config: dict, n: int, k: int, tensors: dict, num_experts: Optional[int] = None,
                  input_config: Optional[dict] = None):
    """A humming-kernels layer for a weight [n, k] (or [num_experts, n, k]) in the format weight_config
    names, holding tensors (under its schema's names), repacked into its layout, producing bf16; its
    activations bf16, or as input_config says."""
    from humming.layer import HummingLayer
    device = next(iter(tensors.values())).device
    layer = HummingLayer(shape_n=n, shape_k=k, weight_config=weight_config, input_config=input_config,
                         num_experts=num_experts, torch_dtype=torch.bfloat16).to(device)
    layer.load_from_tensors(tensors)
    layer.transform()
    return layer


def humming_grouped(packed: torch.Tensor, scale: torch.Tensor, activations: str = "bf16") -> Callable:
    """A humming-kernels grouped GEMM over MXFP4 experts packed [E, N, K/2] (int8, two e2m1 codes a
    byte, the low nibble first) with ue8m0 scales [E, N, K/32] (any strides), repacked into its layout:
    fn(rows, layout [E + 1]) -> [R, N] bf16, rows layout[e] .. layout[e+1]-1 through expert e (rows from
    layout[E] on are left unwritten). rows: [R, K] bf16, or with activations 'fp8' the pair (FP8 [R, K],
    float32 scales [R, K/128]) of quant_rows_triton."""
    from humming.tune import get_heuristics_config
    e, n, half_k = packed.shape
    layer = humming_layer({"quant_method": "mxfp4"}, n, 2 * half_k,
                          {"weight": packed.view(torch.uint8), "weight_scale": scale.contiguous().view(torch.uint8)}, e,
                          INPUTS[activations])
    config = json.dumps({"gemm_type": "grouped_contiguous"})        # as strings: no JSON work a call
    # humming's own tiles for each row count, without stream-K: its stream-K adds partial sums rounded
    # to bf16, up to 2.4x the error of one rounding (H100, BENCHMARKS.md); without it each output is
    # one rounding of a float32 sum, as DeepSeek's GEMMs give.
    choices = get_heuristics_config(layer.humming_metas[""], gemm_type="grouped_contiguous")
    tiles = json.dumps([(lo, hi, dict(tile, use_stream_k=False)) for lo, hi, tile in choices])
    if activations == "fp8":
        return lambda rows, layout: layer(rows[0], input_scale=rows[1], expert_layout=layout, compute_config=config,
                                          tuning_config=tiles)
    return lambda rows, layout: layer(rows, expert_layout=layout, compute_config=config, tuning_config=tiles)


class PackedExperts:
    """A rank's routed experts, MXFP4 w13 = (weight [E, 2 UP, D/2], scale [E, 2 UP, D/32]) and w2 =
    (weight [E, D, I/2], scale [E, D, I/32]), as grouped GEMMs of `grouped` (humming_grouped; the
    tests pass a torch stand-in) taking activations 'bf16' or 'fp8' (INPUTS). Called as the grouped
    MoE path: (x [T, D] bf16, weights [T, k], experts [T, k] global ids, first_expert, swiglu_limit)
    -> float32 [T, D], the sum over the local experts of weight * expert(x)."""
    def __init__(self, w13, w2, grouped: Callable = humming_grouped, activations: str = "bf16"):
        (w13p, w13s), (w2p, w2s) = w13, w2
        if w13p.dtype != torch.int8 or w2p.dtype != torch.int8:
            raise TypeError(f"PackedExperts takes MXFP4 experts (int8), got {w13p.dtype} and {w2p.dtype}")
        if activations not in INPUTS:
            raise ValueError(f"activations must be one of {', '.join(INPUTS)}, got {activations!r}")
        self.n_local, self.dim = w13p.size(0), 2 * w13p.size(2)
        self.inter, self.up = 2 * w2p.size(2), w13p.size(1) // 2
        self.fp8 = activations == "fp8"
        self.w13, self.w2 = grouped(w13p, w13s, activations), grouped(w2p, w2s, activations)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, first_expert: int,
                 swiglu_limit: float) -> torch.Tensor:
        k = experts.size(1)
        if self.fp8:        # each token quantised once; its FP8 row (as bytes) and its scales go to its k places
            q, scale = quant_rows_triton(x)
            rows, ws, pos, layout = sorted_rows(q.view(torch.uint8), weights, experts, first_expert, self.n_local)
            placed = scale.new_empty(pos.numel(), scale.size(1)).index_copy_(0, pos, scale.repeat_interleave(k, 0))
            rows = (rows.view(torch.float8_e4m3fn), placed)
        else:
            rows, ws, pos, layout = sorted_rows(x, weights, experts, first_expert, self.n_local)
        n_live = layout[-1:]
        gu = self.w13(rows, layout)                                                            # [A, 2 UP] bf16
        h = swiglu_rows_triton(gu, ws, n_live, self.inter, self.up, swiglu_limit, self.fp8)   # [A, I]
        return combine_triton(self.w2(h, layout), pos, n_live, k)                  # y [A, D] bf16 -> [T, D]
