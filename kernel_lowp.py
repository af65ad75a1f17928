"""Kernels that compute with the release's low-precision weights as they are stored.

Weight-only dequantisation in registers: BF16 activations, weights read as FP8 e4m3 (128x128 block
scales, ue8m0 or float32) or MXFP4 (packed e2m1, one ue8m0 scale per 32 inputs, see quant.py),
float32 sums. A dequantised weight is exact in bf16 (an e4m3 or e2m1 value times a power of two;
with a float32 scale the kernels round the product to bf16 as quant.dequant_fp8 does), so each
kernel gives its torch reference (dequantise with quant.py, then the BF16 op) up to the order of
the float32 sums.

- linear_fp8: x [M, K] W^T. Few rows (decode) stream W once, split over output columns: one row at
  a time on CUDA cores, or all rows padded to a tl.dot tile; many rows (prefill) take a tiled GEMM
  that turns each [BK, BN] weight tile into bf16 before tl.dot.
- moe_fp4: the routed MXFP4 experts (and the FP8 shared expert's down projection), the twins of
  kernel.moe_gemv_triton (few tokens: one program per assignment, no sorting, no host sync) and
  kernel.moe_experts_triton (many tokens: grouped GEMMs over the assignments sorted by expert).

Shapes: M rows (tokens), K inputs, N outputs; T tokens, k experts a token, E local experts,
D model dim, I expert width, Is the shared expert's width.
"""
import functools

import torch
import torch.nn.functional as F

from kernel import INTERPRETED, moe_schedule, rows_view, triton
from ops import Ops, swiglu
from quant import FP4_BLOCK, FP8_BLOCK, dequant_fp4, dequant_fp8

if triton is not None:
    import triton.language as tl
    from kernel import _moe_gemv_sum_kernel


# ---------------------------------------------------------------- torch references

def linear_fp8_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x [..., K], weight [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] (ue8m0 or float32)
    -> [..., N] out_dtype (default x's): x W^T with W dequantised to x's dtype; a float32 result
    sums the products of the dequantised values in float32."""
    w = dequant_fp8(weight, scale, x.dtype)
    out_dtype = out_dtype or x.dtype
    if out_dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x, w).to(out_dtype)


def moe_fp4_torch(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None,
                  shared_w2=None, out_dtype=torch.float32):
    """Reference of moe_fp4, one expert at a time (host syncs): x [T, D]; w13 = (packed [E, 2I, D/2],
    scale [E, 2I, D/32]), w2 = (packed [E, D, I/2], scale [E, D, I/32]) MXFP4; weights, experts [T, k]
    (global ids; those outside first_expert .. +E are skipped); shared_gu [T, 2 Is] and shared_w2 =
    (float8_e4m3fn [D, Is], scale [ceil(D/128), ceil(Is/128)]) add the shared expert. As the BF16
    kernels: gate and up in float32, h = weight * swiglu rounded to x's dtype, down in float32.
    Returns out_dtype [T, D]."""
    (w13p, w13s), (w2p, w2s) = w13, w2
    n_local, inter = w13p.size(0), w13p.size(1) // 2
    out = torch.zeros(x.size(0), w2p.size(1), dtype=torch.float32, device=x.device)
    for e in range(n_local):
        token, slot = torch.where(experts == first_expert + e)
        if token.numel():
            gu = x[token].float() @ dequant_fp4(w13p[e], w13s[e], x.dtype).float().T
            h = swiglu(gu[:, :inter], gu[:, inter:], swiglu_limit) * weights[token, slot, None].float()
            out.index_add_(0, token, h.to(x.dtype).float() @ dequant_fp4(w2p[e], w2s[e], x.dtype).float().T)
    if shared_gu is not None:
        inter_s = shared_gu.size(1) // 2
        hs = swiglu(shared_gu[:, :inter_s], shared_gu[:, inter_s:], 0.0).to(x.dtype)
        out += linear_fp8_torch(hs, *shared_w2, out_dtype=torch.float32)
    return out.to(out_dtype)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:
    B8 = tl.constexpr(FP8_BLOCK)      # FP8 weights: one scale per B8 x B8 block
    FP4_G = tl.constexpr(FP4_BLOCK)   # MXFP4 weights: one scale per FP4_G inputs (FP4_G / 2 bytes) of a row
    # Triton 3.9's interpreter multiplies bf16 tl.dot operands as their bit patterns and truncates
    # float32 -> bf16 casts: interpreted, the kernels take float32 operands (the same exact products)
    # and round to bf16 on the bits.
    INTERP = tl.constexpr(INTERPRETED)

    @triton.jit
    def _pow2(e, bias):
        # 2^(e + bias - 127) for ue8m0 exponent bytes e (int32), built as float32 bits (e + bias >= 1).
        return ((e + bias) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp8_scale(raw, UE8M0: tl.constexpr):
        # FP8 block scales as loaded (ue8m0 bytes through a uint8 view, or float32) -> float32.
        if UE8M0:
            s = _pow2(raw.to(tl.int32), 0)
        else:
            s = raw
        return s

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        # float32 v in dtype (float32 or bf16), rounded to nearest even.
        if dtype == tl.bfloat16:
            if INTERP:
                bits = v.to(tl.int32, bitcast=True)
                v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _e2m1(code):
        # e2m1 codes (the low 4 bits of int32 values) -> their values times 2^-14, exactly: the magnitude
        # bits become a float16's exponent and mantissa (0.5 a float16 subnormal), bit 3 its sign.
        h = ((code & 7) << 9) | ((code & 8) << 12)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _dot(a, b, acc):
        # acc + a b (bf16 operands) in float32.
        if INTERP:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _fp8_row(x_row, w_base, s_row, sw_n, K, cols, cmask, BN: tl.constexpr, BK: tl.constexpr,
                 UE8M0: tl.constexpr):
        # [BN] float32: x_row[:K] . W[cols, :K] on CUDA cores for an FP8 W (rows sw_n apart) whose rows
        # `cols` share one row of block scales s_row. A ue8m0 scale multiplies x (exact: a power of two),
        # a float32 one the weight, rounded to bf16 as the reference dequantises.
        acc = tl.zeros([BN, BK], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            x = tl.load(x_row + ks, mask=kmask, other=0.0).to(tl.float32)
            s = _fp8_scale(tl.load(s_row + ks // B8, mask=kmask, other=0), UE8M0)
            w = tl.load(w_base + cols[:, None] * sw_n + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            if UE8M0:
                acc += w * (x * s)[None, :]
            else:
                acc += _rounded(w * s[None, :], tl.bfloat16).to(tl.float32) * x[None, :]
        return tl.sum(acc, 1)

    @triton.jit
    def _fp8_gemv_row_kernel(x_ptr, w_ptr, s_ptr, o_ptr, N, K, sx, sw, ss, so,
                             BN: tl.constexpr, BK: tl.constexpr, UE8M0: tl.constexpr):
        # Row m of x, BN output columns (inside one 128-row scale block). The rows are the fastest grid
        # axis, so the programs reading one weight block run together and share it through L2.
        m, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < N
        out = _fp8_row(x_ptr + m * sx, w_ptr, s_ptr + (nb * BN // B8) * ss, sw, K, cols, cmask, BN, BK, UE8M0)
        tl.store(o_ptr + m * so + cols, _rounded(out, o_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _fp8_tile(w_ptr, s_ptr, n0, k0, N, K, sw, ss, BN: tl.constexpr, BK: tl.constexpr, UE8M0: tl.constexpr):
        # W[n0:n0+BN, k0:k0+BK]^T dequantised to bf16 [BK, BN] for tl.dot: the product with its block scale
        # (BN and BK divide 128, so one covers the tile) in float32, rounded (exact for a ue8m0 scale).
        cols = n0 + tl.arange(0, BN)
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + cols[None, :] * sw + ks[:, None], mask=(cols < N)[None, :] & (ks < K)[:, None], other=0.0)
        s = _fp8_scale(tl.load(s_ptr + (n0 // B8) * ss + k0 // B8), UE8M0)
        return _rounded(w.to(tl.float32) * s, tl.bfloat16)

    @triton.jit
    def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, M, N, K, sx, sw, ss, so,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                         UE8M0: tl.constexpr):
        # One [BM, BN] tile of x W^T; programs walk GROUP row tiles down a column of tiles before moving
        # right, so a weight tile is read from L2 by GROUP programs running together. With BM = 16..64
        # and one row tile (decode) it is a GEMV that reads W once, split over column tiles.
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        first = (pid // (GROUP * n_n)) * GROUP
        rows_in = tl.minimum(n_m - first, GROUP)
        mb = first + (pid % (GROUP * n_n)) % rows_in
        nb = (pid % (GROUP * n_n)) // rows_in
        rows = mb * BM + tl.arange(0, BM)
        rmask = rows < M
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sx + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :],
                        other=0.0)
            acc = _dot(x, _fp8_tile(w_ptr, s_ptr, nb * BN, k0, N, K, sw, ss, BN, BK, UE8M0), acc)
        cols = nb * BN + tl.arange(0, BN)
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * so + cols[None, :], _rounded(acc, o_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < N)[None, :])

    @triton.jit
    def _fp4_part(w_base, s_base, sw_n, ss_n, cols, cmask, grp, gmask, xe, xo):
        # [BN, G] float32: for rows `cols` of an MXFP4 matrix (bytes sw_n apart, scale bytes ss_n apart),
        # each scale group's dot product with the inputs, xe [G, 16] at its even columns, xo at its odd.
        # The sum over a group's 16 bytes times its scale equals the dequantised weights' (a power of two).
        byte = grp[:, None] * (FP4_G // 2) + tl.arange(0, FP4_G // 2)[None, :]
        b = tl.load(w_base + cols[:, None, None] * sw_n + byte[None, :, :],
                    mask=cmask[:, None, None] & gmask[None, :, None], other=0).to(tl.int32)
        e = tl.load(s_base + cols[:, None] * ss_n + grp[None, :], mask=cmask[:, None] & gmask[None, :],
                    other=0).to(tl.int32)
        return tl.sum(_e2m1(b) * xe[None, :, :] + _e2m1(b >> 4) * xo[None, :, :], 2) * _pow2(e, 14)

    @triton.jit
    def _fp4_inputs(x_row, k0, K, G: tl.constexpr):
        # Scale groups k0/32 .. +G of a row of K inputs: their indices [G], mask, and the inputs at even
        # and odd columns [G, 16] (float32), as _fp4_part takes them.
        grp = k0 // FP4_G + tl.arange(0, G)
        gmask = grp < K // FP4_G
        even = grp[:, None] * FP4_G + 2 * tl.arange(0, FP4_G // 2)[None, :]
        xe = tl.load(x_row + even, mask=gmask[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_row + even + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
        return grp, gmask, xe, xo

    @triton.jit
    def _moe_fp4_gemv_up_kernel(x_ptr, w_ptr, s_ptr, gu_ptr, h_ptr, experts_ptr, weights_ptr, first, n_local,
                                A, K, D, I, IS, limit, sx, sw_e, sw_n, ss_e, ss_n, sgu, sh,
                                BN: tl.constexpr, G: tl.constexpr, CLAMP: tl.constexpr):
        # kernel._moe_gemv_up_kernel with MXFP4 W13 [E, 2I, D/2] (+ scale [E, 2I, D/32]) on CUDA cores:
        # row a < A of h (token a // K, local expert e): weight * silu(x W1[e]^T) * (x W3[e]^T), BN
        # columns, G scale groups (32 G inputs) a step; rows A + t: the shared expert's silu(g) * u.
        a, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                x_row = x_ptr + (a // K) * sx
                cmask = cols < I
                w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
                gate = tl.zeros([BN, G], tl.float32)
                up = tl.zeros([BN, G], tl.float32)
                for k0 in range(0, D, G * FP4_G):
                    grp, gmask, xe, xo = _fp4_inputs(x_row, k0, D, G)
                    gate += _fp4_part(w_base, s_base, sw_n, ss_n, cols, cmask, grp, gmask, xe, xo)
                    up += _fp4_part(w_base + I * sw_n, s_base + I * ss_n, sw_n, ss_n, cols, cmask, grp, gmask,
                                    xe, xo)
                g, u = tl.sum(gate, 1), tl.sum(up, 1)
                if CLAMP:
                    g = tl.minimum(g, limit)
                    u = tl.minimum(tl.maximum(u, -limit), limit)
                h = g / (1.0 + tl.exp(-g)) * u * tl.load(weights_ptr + a)
                tl.store(h_ptr + a * sh + cols, _rounded(h, h_ptr.dtype.element_ty), mask=cmask)
        else:
            t = a - A
            cmask = cols < IS
            g = tl.load(gu_ptr + t * sgu + cols, mask=cmask, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + t * sgu + IS + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(h_ptr + a * sh + cols, _rounded(g / (1.0 + tl.exp(-g)) * u, h_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _moe_fp4_gemv_down_kernel(h_ptr, w_ptr, s_ptr, ws_ptr, wss_ptr, part_ptr, experts_ptr, first, n_local,
                                  A, D, I, IS, sh, sw_e, sw_n, ss_e, ss_n, sws_n, swss_n, sp,
                                  BN: tl.constexpr, G: tl.constexpr, BK8: tl.constexpr, UE8M0: tl.constexpr):
        # kernel._moe_gemv_down_kernel with MXFP4 W2 [E, D, I/2] (+ scale [E, D, I/32]) and the shared
        # expert's FP8 W2s [D, Is] (+ block scale rows swss_n apart): part[a] = h[a] W2[e]^T for an
        # assignment with a local expert (zero without), h[a] W2s^T for rows a >= A. Float32.
        a, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < D
        out = tl.zeros([BN], tl.float32)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
                acc = tl.zeros([BN, G], tl.float32)
                for k0 in range(0, I, G * FP4_G):
                    grp, gmask, he, ho = _fp4_inputs(h_ptr + a * sh, k0, I, G)
                    acc += _fp4_part(w_base, s_base, sw_n, ss_n, cols, cmask, grp, gmask, he, ho)
                out = tl.sum(acc, 1)
        else:
            out = _fp8_row(h_ptr + a * sh, ws_ptr, wss_ptr + (nb * BN // B8) * swss_n, sws_n, IS, cols, cmask,
                           BN, BK8, UE8M0)
        tl.store(part_ptr + a * sp + cols, out, mask=cmask)

    @triton.jit
    def _fp4_tile(w_base, s_base, sw_n, ss_n, cols, cmask, k0, K, BN: tl.constexpr, BK: tl.constexpr):
        # W[cols, k0:k0+BK]^T dequantised to bf16 [BK, BN] for tl.dot, from MXFP4 rows (bytes sw_n apart,
        # scale bytes ss_n apart): each byte's low nibble is the even column, its high nibble the odd one.
        G: tl.constexpr = BK // FP4_G
        grp = k0 // FP4_G + tl.arange(0, G)
        gmask = grp < K // FP4_G
        byte = grp[:, None] * (FP4_G // 2) + tl.arange(0, FP4_G // 2)[None, :]
        b = tl.load(w_base + cols[:, None, None] * sw_n + byte[None, :, :],
                    mask=cmask[:, None, None] & gmask[None, :, None], other=0).to(tl.int32)
        e = tl.load(s_base + cols[:, None] * ss_n + grp[None, :], mask=cmask[:, None] & gmask[None, :],
                    other=0).to(tl.int32)
        s = _pow2(e, 14)[:, :, None]
        lo = (_e2m1(b) * s).to(tl.bfloat16)
        hi = (_e2m1(b >> 4) * s).to(tl.bfloat16)
        return tl.trans(tl.join(lo, hi).reshape(BN, BK))

    @triton.jit
    def _moe_fp4_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, token_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr,
                           tile_end_ptr, D, I, limit, sx, sw_e, sw_n, ss_e, ss_n, sh,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CLAMP: tl.constexpr):
        # kernel._moe_up_kernel with MXFP4 W13 [E, 2I, D/2] (+ scale [E, 2I, D/32]): for the rows r of one
        # tile, all routed to expert e, h[r] = weight[r] * silu(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T).
        tile, nb = tl.program_id(0), tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= 0:
            start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
            rows = start + tl.arange(0, BM)
            rmask = rows < end
            tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
            cols = nb * BN + tl.arange(0, BN)
            cmask = cols < I
            w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
            gate = tl.zeros([BM, BN], tl.float32)
            up = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                a = tl.load(x_ptr + tok[:, None] * sx + ks[None, :], mask=rmask[:, None] & (ks < D)[None, :],
                            other=0.0)
                gate = _dot(a, _fp4_tile(w_base, s_base, sw_n, ss_n, cols, cmask, k0, D, BN, BK), gate)
                up = _dot(a, _fp4_tile(w_base + I * sw_n, s_base + I * ss_n, sw_n, ss_n, cols, cmask, k0, D, BN, BK),
                          up)
            if CLAMP:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            w = tl.load(weight_ptr + rows, mask=rmask, other=0.0)
            h = gate / (1.0 + tl.exp(-gate)) * up * w[:, None]
            tl.store(h_ptr + rows[:, None] * sh + cols[None, :], _rounded(h, h_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _moe_fp4_down_kernel(h_ptr, w_ptr, s_ptr, out_ptr, assign_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                             D, I, sh, sw_e, sw_n, ss_e, ss_n, so,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # kernel._moe_down_kernel with MXFP4 W2 [E, D, I/2] (+ scale [E, D, I/32]):
        # out[assign[r]] = h[r] W2[e]^T for the rows r of one tile.
        tile, nb = tl.program_id(0), tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= 0:
            start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
            rows = start + tl.arange(0, BM)
            rmask = rows < end
            cols = nb * BN + tl.arange(0, BN)
            cmask = cols < D
            w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
            acc = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, I, BK):
                ks = k0 + tl.arange(0, BK)
                a = tl.load(h_ptr + rows[:, None] * sh + ks[None, :], mask=rmask[:, None] & (ks < I)[None, :],
                            other=0.0)
                acc = _dot(a, _fp4_tile(w_base, s_base, sw_n, ss_n, cols, cmask, k0, I, BN, BK), acc)
            dest = tl.load(assign_ptr + rows, mask=rmask, other=0).to(tl.int64)
            tl.store(out_ptr + dest[:, None] * so + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------- launchers and dispatch

# FP8 linear: up to FP8_ROW_MAX_M rows one row a program on CUDA cores, up to FP8_GEMV_MAX_M rows all
# in one tl.dot tile of 16-64 rows, more in GEMM tiles (BM, BN, BK, GROUP, warps, stages). The GEMV
# kernels' columns a program shrink (to 4, or 16 for tl.dot) while that leaves fewer than two
# programs an SM; BN and BK of the tl.dot kernels divide 128 (one scale a tile).
FP8_ROW_MAX_M = 4
FP8_ROW_TILES = (16, 256, 4, 3)          # (BN, BK, warps, stages), BN x BK kept as BN shrinks
FP8_GEMV_MAX_M = 64
FP8_GEMV_TILES = (32, 128, 4, 4)         # (BN, BK, warps, stages)
FP8_GEMM_TILES = (128, 128, 64, 8, 8, 3)

# MXFP4 MoE: the few-token kernels' (BN, G scale groups a step, warps, stages), the FP8 shared down
# projection's step, the most assignments they take; the grouped GEMMs' (BM, BN, BK, warps, stages)
# for few and for many assignments. Not yet timed on a GPU: chosen so that, compiled for sm_90 with
# Triton 3.9, no kernel spills registers (tests/test_kernel_lowp.py checks) and the grouped GEMMs'
# and the FP8 GEMM's loads are pipelined.
MOE_FP4_GEMV_TILES = (32, 8, 4, 3)
MOE_FP4_SHARED_BK = 256
MOE_FP4_GEMV_MAX_ASSIGNMENTS = 96
MOE_FP4_TILES_SMALL = (16, 64, 64, 4, 3)
MOE_FP4_TILES_LARGE = (64, 128, 64, 8, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def fp8_scale_arg(scale: torch.Tensor):
    """An FP8 block scale as the kernels read it: (a uint8 view of ue8m0 bytes, True) or (float32, False)."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.contiguous().view(torch.uint8), True
    if scale.dtype == torch.float32:
        return scale.contiguous(), False
    raise TypeError(f"FP8 block scales are float8_e8m0fnu or float32, got {scale.dtype}")


def fp4_scale_arg(scale: torch.Tensor) -> torch.Tensor:
    """An MXFP4 scale (ue8m0) as the kernels read it: its bytes."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise TypeError(f"MXFP4 scales are float8_e8m0fnu, got {scale.dtype}")
    return scale.view(torch.uint8)


def fp8_tiles(m: int, n: int, device: torch.device) -> tuple:
    """Tiles for m rows of an FP8 linear with n outputs: (BN, BK, warps, stages) of the row kernel, or
    (BM, BN, BK, GROUP, warps, stages) of the tl.dot kernel (one row tile of 16-64 rows: a GEMV)."""
    sms = _sm_count(device)
    if m <= FP8_ROW_MAX_M:
        bn, bk, warps, stages = FP8_ROW_TILES
        while bn > 4 and m * triton.cdiv(n, bn) < 2 * sms:
            bn, bk = bn // 2, bk * 2
        return bn, bk, warps, stages
    if m <= FP8_GEMV_MAX_M:
        bn, bk, warps, stages = FP8_GEMV_TILES
        if triton.cdiv(n, bn) < 2 * sms:
            bn = 16
        return max(16, triton.next_power_of_2(m)), bn, bk, 1, warps, stages
    return FP8_GEMM_TILES


def linear_fp8_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=torch.bfloat16,
                      tiles=None) -> torch.Tensor:
    """x [..., K] bf16 (rows may lie apart), weight [N, K] float8_e4m3fn (unit column stride), scale
    [ceil(N/128), ceil(K/128)] ue8m0 or float32 -> [..., N] out_dtype (bf16 or float32). tiles: 4 numbers
    run the row kernel with them, 6 the tl.dot kernel; by default fp8_tiles."""
    n, k = weight.shape
    if weight.stride(1) != 1 or x.size(-1) != k:
        raise ValueError(f"linear_fp8: weight {tuple(weight.shape)} (strides {weight.stride()}) and x {tuple(x.shape)}")
    rows = rows_view(x)
    m = rows.size(0)
    s, ue8m0 = fp8_scale_arg(scale)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    tiles = tiles or fp8_tiles(m, n, x.device)
    if len(tiles) == 4:
        bn, bk, warps, stages = tiles
        _fp8_gemv_row_kernel[(m, triton.cdiv(n, bn))](
            rows, weight, s, out, n, k, rows.stride(0), weight.stride(0), s.stride(0), out.stride(0),
            BN=bn, BK=bk, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    else:
        bm, bn, bk, group, warps, stages = tiles
        _fp8_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            rows, weight, s, out, m, n, k, rows.stride(0), weight.stride(0), s.stride(0), out.stride(0),
            BM=bm, BN=bn, BK=bk, GROUP=group, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=None,
               backend: str = "auto") -> torch.Tensor:
    """x [..., K] W^T for an FP8 weight [N, K] with its block scale -> [..., N] out_dtype (default x's):
    the Triton kernels for bf16 x where use_triton says so, else linear_fp8_torch."""
    out_dtype = out_dtype or x.dtype
    if x.dtype == torch.bfloat16 and out_dtype in (torch.bfloat16, torch.float32) and Ops(backend, x.device).triton:
        return linear_fp8_triton(x, weight, scale, out_dtype)
    return linear_fp8_torch(x, weight, scale, out_dtype)


def moe_gemv_fp4_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None,
                        shared_w2=None, out_dtype=torch.float32, tiles=None):
    """kernel.moe_gemv_triton for MXFP4 experts, three launches, no host sync: x [T, D] bf16;
    w13 = (packed int8 [E, 2I, D/2], scale [E, 2I, D/32]), w2 = (packed [E, D, I/2], scale [E, D, I/32]);
    weights, experts [T, k] (global ids; those outside first_expert .. +E are skipped); with shared_gu
    [T, 2 Is] (x times the shared expert's [W1; W3]^T, bf16) and shared_w2 = (float8_e4m3fn [D, Is],
    block scale [ceil(D/128), ceil(Is/128)]) the shared expert is added in; tiles (BN, G, warps, stages),
    by default MOE_FP4_GEMV_TILES. Returns out_dtype [T, D]."""
    (w13p, w13s), (w2p, w2s) = w13, w2
    w13s, w2s = fp4_scale_arg(w13s), fp4_scale_arg(w2s)
    n_local, two_i, half_d = w13p.shape
    inter, dim = two_i // 2, 2 * half_d
    t, k = experts.shape
    x, experts, weights = x.contiguous(), experts.contiguous(), weights.float().contiguous()
    shared = shared_gu is not None
    gu = shared_gu.contiguous() if shared else x
    ws, wss, ue8m0 = (shared_w2[0], *fp8_scale_arg(shared_w2[1])) if shared else (w2p, w2s, True)
    inter_s = gu.size(1) // 2 if shared else 0
    rows = t * k + (t if shared else 0)
    bn, g, warps, stages = tiles or MOE_FP4_GEMV_TILES
    h = torch.empty(rows, max(inter, inter_s), dtype=x.dtype, device=x.device)
    _moe_fp4_gemv_up_kernel[(rows, triton.cdiv(max(inter, inter_s), bn))](
        x, w13p, w13s, gu, h, experts, weights, first_expert, n_local, t * k, k, dim, inter, inter_s, swiglu_limit,
        x.stride(0), w13p.stride(0), w13p.stride(1), w13s.stride(0), w13s.stride(1), gu.stride(0), h.stride(0),
        BN=bn, G=g, CLAMP=swiglu_limit > 0, num_warps=warps, num_stages=stages)
    part = torch.empty(rows, dim, dtype=torch.float32, device=x.device)
    _moe_fp4_gemv_down_kernel[(rows, triton.cdiv(dim, bn))](
        h, w2p, w2s, ws, wss, part, experts, first_expert, n_local, t * k, dim, inter, inter_s,
        h.stride(0), w2p.stride(0), w2p.stride(1), w2s.stride(0), w2s.stride(1), ws.stride(0), wss.stride(0),
        part.stride(0), BN=bn, G=g, BK8=MOE_FP4_SHARED_BK, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    out = torch.empty(t, dim, dtype=out_dtype, device=x.device)
    block = 1024
    _moe_gemv_sum_kernel[(t, triton.cdiv(dim, block))](part, out, t * k, k, dim, part.stride(0), out.stride(0),
                                                       BLOCK=block, SHARED=shared, num_warps=4)
    return out


def moe_fp4_tiles(assignments: int) -> tuple:
    """Tiles of the grouped MXFP4 GEMMs for this many routing assignments."""
    return MOE_FP4_TILES_SMALL if assignments <= 512 else MOE_FP4_TILES_LARGE


def moe_experts_fp4_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, tiles=None):
    """kernel.moe_experts_triton for MXFP4 experts: two grouped GEMMs over the assignments sorted by
    expert (kernel.moe_schedule, no host sync), each FP4 weight tile dequantised to bf16 for tl.dot.
    x [T, D] bf16; w13, w2 (packed, scale) pairs as moe_gemv_fp4_triton; weights, experts [T, k];
    tiles (BM, BN, BK, warps, stages), BK a multiple of 32. Returns float32 [T, D]: the sum over the
    local experts of weight * expert(x)."""
    (w13p, w13s), (w2p, w2s) = w13, w2
    w13s, w2s = fp4_scale_arg(w13s), fp4_scale_arg(w2s)
    n_local, two_i, half_d = w13p.shape
    inter, dim = two_i // 2, 2 * half_d
    t, k = experts.shape
    local = experts.flatten() - first_expert
    local = torch.where((local >= 0) & (local < n_local), local, n_local)
    block_m, block_n, block_k, warps, stages = tiles or moe_fp4_tiles(t * k)
    order, tile_expert, tile_start, tile_end = moe_schedule(local, n_local, block_m)
    token = order // k
    w_sorted = weights.flatten()[order].float()
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    n_tiles = tile_expert.numel()
    x = x.contiguous()
    _moe_fp4_up_kernel[(n_tiles, triton.cdiv(inter, block_n))](
        x, w13p, w13s, h, token, w_sorted, tile_expert, tile_start, tile_end, dim, inter, swiglu_limit,
        x.stride(0), w13p.stride(0), w13p.stride(1), w13s.stride(0), w13s.stride(1), h.stride(0),
        BM=block_m, BN=block_n, BK=block_k, CLAMP=swiglu_limit > 0, num_warps=warps,
        num_stages=stages)
    out = torch.zeros(t * k, dim, dtype=torch.float32, device=x.device)
    _moe_fp4_down_kernel[(n_tiles, triton.cdiv(dim, block_n))](
        h, w2p, w2s, out, order, tile_expert, tile_start, tile_end, dim, inter,
        h.stride(0), w2p.stride(0), w2p.stride(1), w2s.stride(0), w2s.stride(1), out.stride(0),
        BM=block_m, BN=block_n, BK=block_k, num_warps=warps, num_stages=stages)
    return out.view(t, k, dim).sum(1)


def moe_fp4(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None, shared_w2=None,
            out_dtype=torch.float32, backend: str = "auto"):
    """The routed MXFP4 experts plus (with shared_gu, shared_w2) the FP8 shared expert, arguments as
    moe_gemv_fp4_triton: for bf16 x where use_triton says so, up to MOE_FP4_GEMV_MAX_ASSIGNMENTS
    assignments moe_gemv_fp4_triton, more the grouped GEMMs (and linear_fp8 for the shared expert);
    else moe_fp4_torch. Returns out_dtype [T, D]."""
    if x.dtype != torch.bfloat16 or not Ops(backend, x.device).triton:
        return moe_fp4_torch(x, w13, w2, weights, experts, first_expert, swiglu_limit, shared_gu, shared_w2,
                             out_dtype)
    if experts.numel() <= MOE_FP4_GEMV_MAX_ASSIGNMENTS:
        return moe_gemv_fp4_triton(x, w13, w2, weights, experts, first_expert, swiglu_limit, shared_gu, shared_w2,
                                   out_dtype)
    y = moe_experts_fp4_triton(x, w13, w2, weights, experts, first_expert, swiglu_limit)
    if shared_gu is not None:
        inter_s = shared_gu.size(1) // 2
        hs = swiglu(shared_gu[:, :inter_s], shared_gu[:, inter_s:], 0.0).to(x.dtype)
        y += linear_fp8_triton(hs, *shared_w2, out_dtype=torch.float32)
    return y.to(out_dtype)
