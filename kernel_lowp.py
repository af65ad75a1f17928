"""Triton kernels that compute with the release's low-precision weights as they are stored, and their launchers.

Weight-only dequantisation in registers: activations in bf16 (or float32), weights read as FP8 e4m3
(128x128 block scales, ue8m0 or float32) or MXFP4 (packed e2m1, one ue8m0 scale per 32 inputs, see
quant.py), float32 sums. A dequantised weight is exact in bf16 (an e4m3 or e2m1 value times a power of
two; with a float32 scale the kernels round the product to bf16 as ops.dequantised does), so each
launcher gives its torch reference in ops.py (linear_lowp_torch, grouped_linear_lowp_torch,
moe_lowp_torch: dequantise, then the plain op) up to the order of the float32 sums. ops.Ops picks
between them.

- linear_fp8_triton: x [M, K] W^T. Few rows (decode) stream W once, split over output columns: one
  row at a time on CUDA cores, or all rows padded to a tl.dot tile; many rows (prefill) take a tiled
  GEMM that turns each [BK, BN] weight tile into the activations' dtype before tl.dot. With groups
  > 1, output group g reads its own slice of the input row (V4's grouped output projection wo_a).
- dequant_fp8_triton: an FP8 weight widened to bf16 in one pass (for a prefill's cuBLAS matmul).
- moe_gemv_lowp_triton / moe_experts_lowp_triton: the routed experts, MXFP4 or FP8, with the FP8
  shared expert's down projection, the twins of kernel.moe_gemv_triton (few tokens: each assignment's
  expert read by its own programs, no sorting, no host sync; here w1 and w3 apart and each dot product
  split in input slices, which spreads the codes' conversion over more of the GPU) and
  kernel.moe_experts_triton (many tokens: grouped GEMMs over the assignments sorted by expert). With bf16
  activations their MXFP4 tiles go to the tensor cores widened by _e2m1_pairs (inline PTX: the codes'
  bits placed in bf16 halves, one bf16x2 multiply by the scale; exact), and the stacked experts' scales
  may be laid out group after group (parallel.group_major; every kernel takes the group stride).

Shapes: M rows (tokens), K inputs, N outputs; T tokens, k experts a token, E local experts,
D model dim, I expert width, Is the shared expert's width.
"""
import torch

from kernel import INTERPRETED, moe_gemv_sum, moe_schedule, rows_view, sm_count, triton
from quant import FP4_BLOCK, FP8_BLOCK

if triton is not None:
    import triton.language as tl
    from kernel import INTERP, _expert_tile, _rounded


# ---------------------------------------------------------------- Triton kernels

if triton is not None:
    B8 = tl.constexpr(FP8_BLOCK)      # FP8 weights: one scale per B8 x B8 block
    FP4_G = tl.constexpr(FP4_BLOCK)   # MXFP4 weights: one scale per FP4_G inputs (FP4_G / 2 bytes) of a row
    # Triton 3.9's interpreter multiplies bf16 tl.dot operands as their bit patterns and truncates
    # float32 -> bf16 casts: interpreted (INTERP), the kernels take float32 operands (the same exact
    # products) and round to bf16 on the bits (kernel._rounded).
    # NVIDIA's PTX in inline assembly (compiled kernels on CUDA builds of torch; ROCm's take the portable ops).
    PTX = tl.constexpr(not INTERPRETED and torch.version.hip is None)

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
    def _e2m1(code):
        # e2m1 codes (the low 4 bits of int32 values) -> their values times 2^-14, exactly: the magnitude
        # bits become a float16's exponent and mantissa (0.5 a float16 subnormal), bit 3 its sign.
        h = ((code & 7) << 9) | ((code & 8) << 12)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _dot(a, b, acc):
        # acc + a b in float32, a and b in the same dtype (bf16, or float32 multiplied in full precision).
        if INTERP:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
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
    def _fp8_gemv_row_kernel(x_ptr, w_ptr, s_ptr, o_ptr, N, K, R, sx, sxg, sw, ss, so,
                             BN: tl.constexpr, BK: tl.constexpr, UE8M0: tl.constexpr):
        # Row m of x, BN output columns (inside one 128-row scale block and one group of R outputs, whose
        # inputs start sxg * group into the row). The rows are the fastest grid axis, so the programs
        # reading one weight block run together and share it through L2.
        m, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < N
        x_row = x_ptr + m * sx + (nb * BN // R) * sxg
        out = _fp8_row(x_row, w_ptr, s_ptr + (nb * BN // B8) * ss, sw, K, cols, cmask, BN, BK, UE8M0)
        tl.store(o_ptr + m * so + cols, _rounded(out, o_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _fp8_dot(a, acc, w_ptr, s_ptr, n0, k0, N, K, sw, ss, BN: tl.constexpr, BK: tl.constexpr, UE8M0: tl.constexpr):
        # acc + a [BM, BK] W[n0:n0+BN, k0:k0+BK]^T for an FP8 W whose tile shares one block scale (BN and BK
        # divide 128). bf16 a with a ue8m0 scale: the e4m3 codes as bf16 on the tensor cores, the product
        # times the scale (a power of two: exact). Otherwise the tile dequantised as the reference does (the
        # product with the scale in float32, rounded to bf16) in a's dtype.
        cols = n0 + tl.arange(0, BN)
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + cols[None, :] * sw + ks[:, None], mask=(cols < N)[None, :] & (ks < K)[:, None], other=0.0)
        s = _fp8_scale(tl.load(s_ptr + (n0 // B8) * ss + k0 // B8), UE8M0)
        if UE8M0 and a.dtype == tl.bfloat16:
            acc += _dot(a, w.to(tl.bfloat16), tl.zeros_like(acc)) * s
        else:
            acc = _dot(a, _rounded(w.to(tl.float32) * s, tl.bfloat16).to(a.dtype), acc)
        return acc

    @triton.jit
    def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, M, N, K, R, sx, sxg, sw, ss, so,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                         UE8M0: tl.constexpr):
        # One [BM, BN] tile of x W^T (BN inside one group of R outputs, whose inputs start sxg * group into
        # x's rows); programs walk GROUP row tiles down a column of tiles before moving right, so a weight
        # tile is read from L2 by GROUP programs running together. With BM = 16..64 and one row tile
        # (decode) it is a GEMV that reads W once, split over column tiles.
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        first = (pid // (GROUP * n_n)) * GROUP
        rows_in = tl.minimum(n_m - first, GROUP)
        mb = first + (pid % (GROUP * n_n)) % rows_in
        nb = (pid % (GROUP * n_n)) // rows_in
        rows = mb * BM + tl.arange(0, BM)
        rmask = rows < M
        x_base = x_ptr + (nb * BN // R) * sxg
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_base + rows.to(tl.int64)[:, None] * sx + ks[None, :],
                        mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
            acc = _fp8_dot(x, acc, w_ptr, s_ptr, nb * BN, k0, N, K, sw, ss, BN, BK, UE8M0)
        cols = nb * BN + tl.arange(0, BN)
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * so + cols[None, :], _rounded(acc, o_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < N)[None, :])

    @triton.jit
    def _fp8_dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, sw, ss, so, UE8M0: tl.constexpr):
        # One 128x128 block (one scale) of an FP8 W [N, K] as bf16: the product in float32, rounded
        # (quant.dequant_fp8).
        nb, kb = tl.program_id(0), tl.program_id(1)
        rows = nb * B8 + tl.arange(0, B8)
        cols = kb * B8 + tl.arange(0, B8)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * sw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _fp8_scale(tl.load(s_ptr + nb * ss + kb), UE8M0)
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * so + cols[None, :], _rounded(w * s, tl.bfloat16), mask=mask)

    @triton.jit
    def _fp4_part(w_base, s_base, sw_n, ss_n, ss_g, cols, cmask, grp, gmask, xe, xo):
        # [BN, G] float32: for rows `cols` of an MXFP4 matrix (bytes sw_n apart; scale bytes ss_n apart from
        # row to row, ss_g from group to group), each scale group's dot product with the inputs, xe [G, 16]
        # at its even columns, xo at its odd.
        # The sum over a group's 16 bytes times its scale equals the dequantised weights' (a power of two).
        byte = grp[:, None] * (FP4_G // 2) + tl.arange(0, FP4_G // 2)[None, :]
        b = tl.load(w_base + cols[:, None, None] * sw_n + byte[None, :, :],
                    mask=cmask[:, None, None] & gmask[None, :, None], other=0).to(tl.int32)
        e = tl.load(s_base + cols[:, None] * ss_n + grp[None, :] * ss_g, mask=cmask[:, None] & gmask[None, :],
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
    def _expert_row(x_row, w_base, s_base, sw_n, ss_n, ss_g, K, n0, BN: tl.constexpr, N, G: tl.constexpr,
                    FP4: tl.constexpr, UE8M0: tl.constexpr):
        # [BN] float32: x_row[:K] . W[n0:n0+BN, :K] on CUDA cores for one expert's weight of N rows, MXFP4
        # (G scale groups a step) or FP8 (32 G inputs a step; BN divides 128, so the columns share one row
        # of block scales, rows ss_n apart).
        cols = n0 + tl.arange(0, BN)
        cmask = cols < N
        if FP4 and x_row.dtype.element_ty == tl.bfloat16:
            # the row as the first of 16 (tl.dot's least), the others zero, through _fp4_dot
            r = tl.arange(0, 16)
            acc = tl.zeros([16, BN], tl.float32)
            for k0 in range(0, K, G * FP4_G):
                ks = k0 + tl.arange(0, G * FP4_G)
                a = tl.load(x_row + r[:, None] * 0 + ks[None, :], mask=(r == 0)[:, None] & (ks < K)[None, :], other=0.0)
                acc = _fp4_dot(a, acc, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, N, K, BN, G * FP4_G)
            out = tl.sum(acc, 0)
        elif FP4:
            acc = tl.zeros([BN, G], tl.float32)
            for k0 in range(0, K, G * FP4_G):
                grp, gmask, xe, xo = _fp4_inputs(x_row, k0, K, G)
                acc += _fp4_part(w_base, s_base, sw_n, ss_n, ss_g, cols, cmask, grp, gmask, xe, xo)
            out = tl.sum(acc, 1)
        else:
            out = _fp8_row(x_row, w_base, s_base + (n0 // B8) * ss_n, sw_n, K, cols, cmask, BN, G * FP4_G, UE8M0)
        return out

    @triton.jit
    def _up_scale_row(UP, FP4: tl.constexpr):
        # The first scale row of w3 in a stacked W13 whose w3 rows start at UP: MXFP4 scales are per row,
        # FP8 ones per 128 rows (UP a multiple of 128).
        if FP4:
            row = UP
        else:
            row = UP // B8
        return row

    @triton.jit
    def _k_slice(w_base, s_base, ss_g, k0, FP4: tl.constexpr):
        # A low-precision weight's rows from input k0 on (k0 a multiple of 128): their bytes and scales (MXFP4
        # group scales ss_g apart; FP8 block scales next to each other).
        if FP4:
            w_base += k0 // 2
            s_base += (k0 // FP4_G) * ss_g
        else:
            w_base += k0
            s_base += k0 // B8
        return w_base, s_base

    @triton.jit
    def _moe_lowp_gemv_up_kernel(x_ptr, w_ptr, s_ptr, p_ptr, experts_ptr, first, n_local, K, D, I, UP, KS,
                                 sx, sw_e, sw_n, ss_e, ss_n, ss_g, sp_s, sp_a, BN: tl.constexpr, G: tl.constexpr,
                                 FP4: tl.constexpr, UE8M0: tl.constexpr):
        # The few-token MoE's up projection with low-precision W13 [E, 2 UP, ..] (w1 in rows 0 .. I-1, w3 in
        # rows UP .. UP+I-1; MXFP4 packed with scales [E, 2 UP, D/32], or FP8 with block scales [E, 2 UP/128,
        # ceil(D/128)]) on CUDA cores, split three ways so that the programs fill the GPU: assignment a
        # (token a // K, local expert e), BN columns of w1 (blocks nb < cdiv(I, BN)) or of w3 (the next
        # ones), inputs s KS .. (s+1) KS. p[s, a] = [x W1[e]^T, x W3[e]^T] over those inputs, float32.
        a, nb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        e = tl.load(experts_ptr + a) - first
        if (e >= 0) & (e < n_local):
            half = nb // tl.cdiv(I, BN)
            n0 = (nb - half * tl.cdiv(I, BN)) * BN
            w_base, s_base = _k_slice(w_ptr + e.to(tl.int64) * sw_e + half * UP * sw_n,
                                      s_ptr + e.to(tl.int64) * ss_e + half * _up_scale_row(UP, FP4) * ss_n,
                                      ss_g, s * KS, FP4)
            out = _expert_row(x_ptr + (a // K) * sx + s * KS, w_base, s_base, sw_n, ss_n, ss_g, KS, n0, BN, I, G, FP4,
                              UE8M0)
            cols = n0 + tl.arange(0, BN)
            tl.store(p_ptr + s * sp_s + a * sp_a + half * I + cols, out, mask=cols < I)

    @triton.jit
    def _moe_lowp_swiglu_kernel(p_ptr, gu_ptr, h_ptr, experts_ptr, weights_ptr, first, n_local, A, I, IS, limit,
                                sp_s, sp_a, sgu, sh, S: tl.constexpr, BLOCK: tl.constexpr, CLAMP: tl.constexpr):
        # Row a of h, BLOCK columns: for an assignment a < A with a local expert, its S partial sums of
        # the up kernel added, then weight * silu(g) * u (clamped); rows A + t: the shared expert's
        # silu(g) * u of token t from gu[t] = [x W1s^T, x W3s^T]. Rounded to h's dtype as the reference does.
        a, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BLOCK + tl.arange(0, BLOCK)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                cmask = cols < I
                g = tl.zeros([BLOCK], tl.float32)
                u = tl.zeros([BLOCK], tl.float32)
                for s in tl.static_range(S):
                    g += tl.load(p_ptr + s * sp_s + a * sp_a + cols, mask=cmask, other=0.0)
                    u += tl.load(p_ptr + s * sp_s + a * sp_a + I + cols, mask=cmask, other=0.0)
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
    def _moe_lowp_gemv_down_kernel(h_ptr, w_ptr, s_ptr, ws_ptr, wss_ptr, part_ptr, experts_ptr, first, n_local,
                                   A, D, KS, KSS, sh, sw_e, sw_n, ss_e, ss_n, ss_g, sws_n, swss_n, sp_s, sp,
                                   BN: tl.constexpr, G: tl.constexpr, BK8: tl.constexpr, FP4: tl.constexpr,
                                   UE8M0: tl.constexpr):
        # kernel._moe_gemv_down_kernel with low-precision W2 [E, D, ..] (MXFP4 with scales [E, D, I/32], or
        # FP8 with block scales [E, ceil(D/128), ceil(I/128)]) and the shared expert's FP8 W2s [D, Is] (+
        # block scale rows swss_n apart), its inputs split in slices s of KS (KSS for W2s): part[s, a] =
        # h[a] W2[e]^T over slice s for an assignment with a local expert (zero without), h[a] W2s^T for
        # rows a >= A. Float32.
        a, nb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < D
        out = tl.zeros([BN], tl.float32)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                w_base, s_base = _k_slice(w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e, ss_g, s * KS,
                                          FP4)
                out = _expert_row(h_ptr + a * sh + s * KS, w_base, s_base, sw_n, ss_n, ss_g, KS, nb * BN, BN, D, G,
                                  FP4, UE8M0)
        else:
            out = _fp8_row(h_ptr + a * sh + s * KSS, ws_ptr + s * KSS,
                           wss_ptr + (nb * BN // B8) * swss_n + s * KSS // B8, sws_n, KSS, cols, cmask, BN, BK8, UE8M0)
        tl.store(part_ptr + s * sp_s + a * sp + cols, out, mask=cmask)

    @triton.jit
    def _fp4_tile(w_base, s_base, sw_n, ss_n, ss_g, cols, cmask, k0, K, BN: tl.constexpr, BK: tl.constexpr,
                  DT: tl.constexpr):
        # W[cols, k0:k0+BK]^T dequantised to DT (bf16 or float32) [BK, BN] for tl.dot, from MXFP4 rows (bytes
        # sw_n apart; scales as _fp4_part's): each byte's low nibble is the even column, its high nibble
        # the odd one.
        G: tl.constexpr = BK // FP4_G
        grp = k0 // FP4_G + tl.arange(0, G)
        gmask = grp < K // FP4_G
        byte = grp[:, None] * (FP4_G // 2) + tl.arange(0, FP4_G // 2)[None, :]
        b = tl.load(w_base + cols[:, None, None] * sw_n + byte[None, :, :],
                    mask=cmask[:, None, None] & gmask[None, :, None], other=0).to(tl.int32)
        e = tl.load(s_base + cols[:, None] * ss_n + grp[None, :] * ss_g, mask=cmask[:, None] & gmask[None, :],
                    other=0).to(tl.int32)
        s = _pow2(e, 14)[:, :, None]
        lo = (_e2m1(b) * s).to(DT)
        hi = (_e2m1(b >> 4) * s).to(DT)
        return tl.trans(tl.join(lo, hi).reshape(BN, BK))

    # PTX of _e2m1_pairs. $4 holds four code bytes, $5 / $6 the scale of bytes 0-1 / 2-3 (twice, bf16x2);
    # u is $4 a nibble up. A byte permute of ($4, u) brings one nibble of two bytes to bits 12..15 of the
    # two 16-bit halves of t (selectors: the low nibbles of bytes 0-1 from u, of 2-3 from u; the high
    # nibbles from $4), the masks keep its sign on bit 15 and move its magnitude bits to 8..6, and the
    # fma with -0 scales both halves: outputs $0 / $1 the low nibbles, $2 / $3 the high ones.
    _PAIR_PTX = """
            prmt.b32 t, $4, u, {select};
            shr.b32 v, t, 6;
            and.b32 v, v, 0x01C001C0;
            and.b32 t, t, 0x80008000;
            or.b32 t, t, v;
            fma.rn.bf16x2 ${out}, t, ${scale}, z;"""
    E2M1_PAIRS_PTX = tl.constexpr("{ .reg .b32 u, t, v, z; mov.b32 z, 0x80008000; shl.b32 u, $4, 4;" + "".join(
        _PAIR_PTX.format(out=out, select=select, scale=scale)
        for out, select, scale in ((0, "0x5040", 5), (1, "0x7060", 6), (2, "0x1000", 5), (3, "0x3020", 6))) + "}")

    @triton.jit
    def _e2m1_pairs(b, s):
        # (lo, hi) bf16, b's shape: the low and the high e2m1 code of each byte of b times s (bf16 2^(E-1) for
        # a ue8m0 exponent E <= FP4_SCALE_EXPONENT_MAX), exactly, four bytes an instance. In each 16-bit half
        # of a register the code's sign lands on bit 15 and its magnitude bits on 8..6, which is the code's
        # value times 2^-126 as a bf16 (0.5 a subnormal), and one bf16x2 multiply (an fma with -0, for sm_80)
        # scales two values (E2M1_PAIRS_PTX).
        return tl.inline_asm_elementwise(asm=E2M1_PAIRS_PTX, constraints="=r,=r,=r,=r,r,r,r", args=[b, s],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)

    @triton.jit
    def _fp4_dot(a, acc, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, N, K, BN: tl.constexpr, BK: tl.constexpr):
        # acc + a [BM, BK] W[n0:n0+BN, k0:k0+BK]^T for MXFP4 rows of W (bytes sw_n apart; scales as _fp4_part's).
        # bf16 a: the codes times their scales widened to bf16 by _e2m1_pairs (exact), the low nibbles (even
        # inputs) and the high ones (odd inputs) in two tl.dot (about 30% fewer instructions a weight than
        # Triton's scaled dot on sm_90, which compilers without NVIDIA's PTX take). float32 a: the tile
        # dequantised by _fp4_tile.
        cols = n0 + tl.arange(0, BN)
        cmask = cols < N
        if a.dtype == tl.bfloat16:
            G: tl.constexpr = BK // FP4_G
            byte = k0 // 2 + tl.arange(0, BK // 2)
            b = tl.load(w_base + cols[:, None] * sw_n + byte[None, :], mask=cmask[:, None] & (byte < K // 2)[None, :],
                        other=0)
            grp = k0 // FP4_G + tl.arange(0, G)
            e = tl.load(s_base + cols[:, None] * ss_n + grp[None, :] * ss_g,
                        mask=cmask[:, None] & (grp < K // FP4_G)[None, :], other=0)
            if PTX:
                s = ((e.to(tl.int32) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
                lo, hi = _e2m1_pairs(b, tl.reshape(tl.broadcast_to(s[:, :, None], (BN, G, FP4_G // 2)), (BN, BK // 2)))
                even, odd = tl.split(tl.reshape(a, (a.shape[0], BK // 2, 2)))
                acc = tl.dot(odd, tl.trans(hi), tl.dot(even, tl.trans(lo), acc))
            else:
                acc = tl.dot_scaled(a, None, "bf16", tl.trans(b.to(tl.uint8, bitcast=True)), e, "e2m1", acc,
                                    fast_math=True)
        else:
            acc = _dot(a, _fp4_tile(w_base, s_base, sw_n, ss_n, ss_g, cols, cmask, k0, K, BN, BK, a.dtype), acc)
        return acc

    @triton.jit
    def _expert_dot(a, acc, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, N, K, BN: tl.constexpr, BK: tl.constexpr,
                    FP4: tl.constexpr, UE8M0: tl.constexpr):
        # acc + a [BM, BK] W[n0:n0+BN, k0:k0+BK]^T of one expert's weight (N rows of K inputs), MXFP4 or FP8.
        if FP4:
            acc = _fp4_dot(a, acc, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, N, K, BN, BK)
        else:
            acc = _fp8_dot(a, acc, w_base, s_base, n0, k0, N, K, sw_n, ss_n, BN, BK, UE8M0)
        return acc

    @triton.jit
    def _moe_lowp_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, token_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr,
                            tile_end_ptr, D, I, UP, limit, sx, sw_e, sw_n, ss_e, ss_n, ss_g, sh,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CLAMP: tl.constexpr,
                            FP4: tl.constexpr, UE8M0: tl.constexpr):
        # kernel._moe_up_kernel with low-precision W13 (as _moe_lowp_gemv_up_kernel): for the rows r of one
        # tile, all routed to expert e, h[r] = weight[r] * silu(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T).
        e, rows, rmask, cols, cmask = _expert_tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, I, BM, BN)
        n0 = tl.program_id(1) * BN                                       # the tile's first column
        if e >= 0:
            tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
            w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
            up_s = _up_scale_row(UP, FP4)
            gate = tl.zeros([BM, BN], tl.float32)
            up = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                a = tl.load(x_ptr + tok[:, None] * sx + ks[None, :], mask=rmask[:, None] & (ks < D)[None, :],
                            other=0.0)
                gate = _expert_dot(a, gate, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, I, D, BN, BK, FP4, UE8M0)
                up = _expert_dot(a, up, w_base + UP * sw_n, s_base + up_s * ss_n, sw_n, ss_n, ss_g, n0, k0, I, D,
                                 BN, BK, FP4, UE8M0)
            if CLAMP:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            w = tl.load(weight_ptr + rows, mask=rmask, other=0.0)
            h = gate / (1.0 + tl.exp(-gate)) * up * w[:, None]
            tl.store(h_ptr + rows[:, None] * sh + cols[None, :], _rounded(h, h_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _moe_lowp_down_kernel(h_ptr, w_ptr, s_ptr, out_ptr, assign_ptr, tile_expert_ptr, tile_start_ptr,
                              tile_end_ptr, D, I, sh, sw_e, sw_n, ss_e, ss_n, ss_g, so,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP4: tl.constexpr,
                              UE8M0: tl.constexpr):
        # kernel._moe_down_kernel with low-precision W2 (as _moe_lowp_gemv_down_kernel):
        # out[assign[r]] = h[r] W2[e]^T for the rows r of one tile.
        e, rows, rmask, cols, cmask = _expert_tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, D, BM, BN)
        n0 = tl.program_id(1) * BN                                       # the tile's first column
        if e >= 0:
            w_base, s_base = w_ptr + e.to(tl.int64) * sw_e, s_ptr + e.to(tl.int64) * ss_e
            acc = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, I, BK):
                ks = k0 + tl.arange(0, BK)
                a = tl.load(h_ptr + rows[:, None] * sh + ks[None, :], mask=rmask[:, None] & (ks < I)[None, :],
                            other=0.0)
                acc = _expert_dot(a, acc, w_base, s_base, sw_n, ss_n, ss_g, n0, k0, D, I, BN, BK, FP4, UE8M0)
            dest = tl.load(assign_ptr + rows, mask=rmask, other=0).to(tl.int64)
            tl.store(out_ptr + dest[:, None] * so + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------- launchers

# _e2m1_pairs multiplies by a bf16 2^(E-1): MXFP4 scales of ue8m0 exponent E up to this one (scales up to 2;
# DeepSeek's are far below) widen exactly. runtime.build_model refuses shards with larger ones.
FP4_SCALE_EXPONENT_MAX = 128

# FP8 linear: up to FP8_ROW_MAX_M rows one row a program on CUDA cores, up to FP8_GEMV_MAX_M rows all
# in one tl.dot tile of 16-64 rows, more in GEMM tiles (BM, BN, BK, GROUP, warps, stages). The GEMV
# kernels' columns a program shrink (to 4, or 16 for tl.dot) while that leaves fewer than two
# programs an SM; BN and BK of the tl.dot kernels divide 128 (one scale a tile).
FP8_ROW_MAX_M = 4
# (BN, BK, warps, stages), BN x BK kept as BN shrinks. 8192 codes a step rather than 4096: with V4-Flash's
# decode weights read cold on an H100 (2026-11-26), one row's wo_b 17.2 -> 14.5 us, wo_a 16.6 -> 14.3,
# wq_b 15.1 -> 14.4, the shared expert's w1/w3 9.9 -> 8.5, wq_a + wkv 5.5 -> about 4.9; two rows 21-35% less.
FP8_ROW_TILES = (16, 512, 4, 3)
FP8_GEMV_MAX_M = 64
FP8_GEMV_TILES = (32, 128, 4, 4)         # (BN, BK, warps, stages)
FP8_GEMM_TILES = (128, 128, 64, 8, 8, 3)
FP8_GEMM_TILES_F32 = (64, 64, 32, 8, 8, 2)   # float32 activations (the fp32 model on a GPU): no spills

# Low-precision MoE: the few-token kernels' (BN, G scale groups of 32 inputs a step, warps, stages, split
# of each dot product's inputs) for MXFP4 and for FP8 experts (an FP8 row takes 32 G inputs a step: 64
# columns of them would spill), timed on an H100 at one token (BENCHMARKS.md, 2026-11-26, fifth
# session: V4-Flash's 6 experts 88 -> 72-79 us; one or two local ones at a rank's share 42-46 us, 61
# without the split; R1's FP8 experts 201 us, 212 at 32 columns); the FP8 shared down projection's
# step; the grouped GEMMs' (BM, BN, BK, warps, stages) by the assignments they take at most, for each
# expert format: the fastest of sweeps on an H100 with _e2m1_pairs and group-major scales, among tiles
# that, compiled for sm_90, spill no registers (tests/test_kernel_lowp.py checks), except MXFP4's two
# larger ones, whose up kernel spills a little and still beats the best that do not by 12-13%
# (BENCHMARKS.md, eighth session: V4-Flash's routed experts at batch 32 1.25 -> 1.04 ms, 256 tokens
# 3.70 -> 2.49 ms, 4096 tokens 7.69 -> 7.02 ms; FP8 experts 1.70 -> 1.26, 4.47 -> 2.88, 8.90 -> 7.04 ms).
# Which of the two kinds runs is ops.Ops.moe_path's choice.
MOE_LOWP_GEMV_TILES = {"fp4": (64, 8, 4, 3, 2), "fp8": (16, 8, 4, 3, 2)}
MOE_LOWP_SHARED_BK = 256
MOE_LOWP_TILES = {"fp4": ((512, (16, 128, 128, 4, 3)), (8192, (32, 128, 128, 4, 3)), (None, (64, 128, 128, 4, 3))),
                  "fp8": ((512, (16, 128, 128, 4, 3)), (8192, (32, 64, 128, 4, 3)), (None, (64, 128, 64, 4, 3)))}
MOE_LOWP_TILES_SPILLING = {(32, 128, 128, 4, 3), (64, 128, 128, 4, 3)}    # MXFP4's up kernel, measured faster
MOE_LOWP_TILES_F32 = (16, 64, 32, 4, 2)      # float32 activations (the fp32 model on a GPU): no spills


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


def fp8_tiles(m: int, n: int, device: torch.device, group_rows: int = 0, fp32: bool = False) -> tuple:
    """Tiles for m rows of an FP8 linear with n outputs: (BN, BK, warps, stages) of the row kernel, or
    (BM, BN, BK, GROUP, warps, stages) of the tl.dot kernel (one row tile of 16-64 rows: a GEMV). With
    group_rows, BN also divides the rows of a group (a power of two of at least 16 for tl.dot). Float32
    activations (fp32) take FP8_GEMM_TILES_F32 beyond the row kernel."""
    sms = sm_count(device)
    fit = group_rows & -group_rows if group_rows else 1 << 30           # the largest power of two dividing it
    if m <= FP8_ROW_MAX_M:
        bn, bk, warps, stages = FP8_ROW_TILES
        while bn > 4 and (m * triton.cdiv(n, bn) < 2 * sms or bn > fit):
            bn, bk = bn // 2, bk * 2
        return bn, bk, warps, stages
    if m <= FP8_GEMV_MAX_M and not fp32:
        bn, bk, warps, stages = FP8_GEMV_TILES
        if triton.cdiv(n, bn) < 2 * sms or bn > fit:
            bn = 16
        return max(16, triton.next_power_of_2(m)), bn, bk, 1, warps, stages
    bm, bn, bk, group, warps, stages = FP8_GEMM_TILES_F32 if fp32 else FP8_GEMM_TILES
    return bm, min(bn, max(16, fit)), bk, group, warps, stages


def linear_fp8_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=torch.bfloat16,
                      tiles=None, groups: int = 1) -> torch.Tensor:
    """x [..., groups * K] bf16 or float32 (rows may lie apart), weight [N, K] float8_e4m3fn (unit column
    stride), scale [ceil(N/128), ceil(K/128)] ue8m0 or float32 -> [..., N] out_dtype (bf16 or float32).
    Output column c takes the inputs of group c // (N / groups) (V4's wo_a: groups of o_lora_rank
    outputs over their own heads). tiles: 4 numbers run the row kernel with them, 6 the tl.dot kernel;
    by default fp8_tiles."""
    n, k = weight.shape
    group_rows = n // groups
    if weight.stride(1) != 1 or x.size(-1) != groups * k or group_rows * groups != n:
        raise ValueError(f"linear_fp8: weight {tuple(weight.shape)} (strides {weight.stride()}) in {groups} "
                         f"group(s) and x {tuple(x.shape)}")
    if groups > 1 and group_rows % 16:
        raise ValueError(f"linear_fp8: {group_rows} rows a group; the kernels take multiples of 16")
    rows = rows_view(x)
    m = rows.size(0)
    s, ue8m0 = fp8_scale_arg(scale)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    tiles = tiles or fp8_tiles(m, n, x.device, group_rows if groups > 1 else 0, x.dtype == torch.float32)
    if len(tiles) == 4:
        bn, bk, warps, stages = tiles
        _fp8_gemv_row_kernel[(m, triton.cdiv(n, bn))](
            rows, weight, s, out, n, k, group_rows, rows.stride(0), k, weight.stride(0), s.stride(0), out.stride(0),
            BN=bn, BK=bk, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    else:
        bm, bn, bk, group, warps, stages = tiles
        _fp8_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            rows, weight, s, out, m, n, k, group_rows, rows.stride(0), k, weight.stride(0), s.stride(0),
            out.stride(0), BM=bm, BN=bn, BK=bk, GROUP=group, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


def dequant_fp8_triton(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quant.dequant_fp8 to bf16 in one pass: weight [N, K] float8_e4m3fn (unit column stride), scale
    [ceil(N/128), ceil(K/128)] ue8m0 or float32 -> bf16 [N, K]."""
    n, k = weight.shape
    if weight.stride(1) != 1:
        raise ValueError(f"dequant_fp8: weight strides {weight.stride()}, expected unit column stride")
    s, ue8m0 = fp8_scale_arg(scale)
    out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    if out.numel():
        _fp8_dequant_kernel[(triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))](
            weight, s, out, n, k, weight.stride(0), s.stride(0), out.stride(0), UE8M0=ue8m0, num_warps=8)
    return out


def expert_weights(w13, w2):
    """The stacked experts' format as the MoE kernels take it: (FP4, UE8M0, scale args of w13 and w2,
    D, I, UP). w13 = (weight, scale): MXFP4 int8 [E, 2 UP, D/2] with [E, 2 UP, D/32] ue8m0 scales, or
    float8_e4m3fn [E, 2 UP, D] with [E, 2 UP/128, ceil(D/128)] block scales (UP a multiple of 128);
    w1 in rows 0 .. I-1, w3 in rows UP .. UP+I-1. w2 = (weight, scale) [E, D, I] alike (I/2 bytes)."""
    (w13p, w13s), (w2p, w2s) = w13, w2
    if w13p.dtype == torch.int8 and w2p.dtype == torch.int8:
        return True, True, fp4_scale_arg(w13s), fp4_scale_arg(w2s), 2 * w13p.size(2), 2 * w2p.size(2), w13p.size(1) // 2
    if w13p.dtype == torch.float8_e4m3fn and w2p.dtype == torch.float8_e4m3fn and w13s.dtype == w2s.dtype:
        up = w13p.size(1) // 2
        if up % FP8_BLOCK:
            raise ValueError(f"stacked FP8 experts: w3 starts at row {up}, not at a multiple of {FP8_BLOCK}")
        (s13, ue8m0), (s2, _) = fp8_scale_arg(w13s), fp8_scale_arg(w2s)
        return False, ue8m0, s13, s2, w13p.size(2), w2p.size(2), up
    raise TypeError(f"experts as MXFP4 (int8) or FP8 (float8_e4m3fn) with one scale dtype, got w13 {w13p.dtype} "
                    f"/ {w13s.dtype} and w2 {w2p.dtype} / {w2s.dtype}")


def _k_split(split: int, *widths: int) -> int:
    """The input slices the few-token MoE kernels split each dot product into: `split` where every
    width divides into slices of whole 128-blocks (FP8 block scales, MXFP4 groups), else 1."""
    return split if all(w % (split * FP8_BLOCK) == 0 for w in widths) else 1


def moe_gemv_up_lowp(x, w13p, s13, experts, first_expert: int, inter: int, fp4: bool, ue8m0: bool, tiles,
                     split: int) -> torch.Tensor:
    """moe_gemv_lowp_triton's up projection alone, one launch: x [T, D] (unit column stride) through the
    W13 (w13p [E, 2 UP, ..] and its scale argument s13, as expert_weights gives them) of each assignment's
    local expert (experts [T, k]; others skipped), over `split` input slices of D -> float32 partial sums
    [split, T k, 2 inter]: w1's columns, then w3's. tiles as MOE_LOWP_GEMV_TILES' (their split unused)."""
    t, k = experts.shape
    dim = x.size(1)
    bn, g, warps, stages, _ = tiles
    p = torch.empty(split, t * k, 2 * inter, dtype=torch.float32, device=x.device)
    _moe_lowp_gemv_up_kernel[(t * k, 2 * triton.cdiv(inter, bn), split)](
        x, w13p, s13, p, experts, first_expert, w13p.size(0), k, dim, inter, w13p.size(1) // 2, dim // split,
        x.stride(0), w13p.stride(0), w13p.stride(1), *s13.stride(), p.stride(0), p.stride(1),
        BN=bn, G=g, FP4=fp4, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    return p


def moe_gemv_lowp_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None,
                         shared_w2=None, out_dtype=torch.float32, tiles=None):
    """kernel.moe_gemv_triton for low-precision experts, four launches, no host sync: x [T, D] bf16 or
    float32; w13, w2 (weight, scale) pairs as expert_weights says; weights, experts [T, k] (global ids;
    those outside first_expert .. +E are skipped); with shared_gu [T, 2 Is] (x times the shared
    expert's [W1; W3]^T, in x's dtype) and shared_w2 = (float8_e4m3fn [D, Is], block scale [ceil(D/128),
    ceil(Is/128)], of the experts' scale dtype when they are FP8) the shared expert is added in; tiles
    (BN, G, warps, stages, split), by default MOE_LOWP_GEMV_TILES' for the format. The up and down
    projections each run over assignments x column blocks x `split` input slices (a token's 6 experts
    alone would leave part of an H100 idle), the SwiGLU adds the up slices, the last kernel the down
    ones and each token's assignments. Returns out_dtype [T, D]."""
    fp4, ue8m0, s13, s2, dim, inter, _ = expert_weights(w13, w2)
    w13p, w2p = w13[0], w2[0]
    n_local = w13p.size(0)
    t, k = experts.shape
    x, experts, weights = x.contiguous(), experts.contiguous(), weights.float().contiguous()
    shared = shared_gu is not None
    gu = shared_gu.contiguous() if shared else x
    ws, wss = w2p, s2
    if shared:
        ws, (wss, shared_ue8m0) = shared_w2[0], fp8_scale_arg(shared_w2[1])
        if fp4:
            ue8m0 = shared_ue8m0
        elif shared_ue8m0 != ue8m0:
            raise TypeError("the shared expert's block scales and the experts' differ in dtype")
    inter_s = gu.size(1) // 2 if shared else 0
    assigned = t * k
    rows = assigned + (t if shared else 0)
    tiles = tiles or MOE_LOWP_GEMV_TILES["fp4" if fp4 else "fp8"]
    bn, g, warps, stages, split = tiles
    split = _k_split(split, dim, inter, *((inter_s,) if shared else ()))
    p = moe_gemv_up_lowp(x, w13p, s13, experts, first_expert, inter, fp4, ue8m0, tiles, split)
    h = torch.empty(rows, max(inter, inter_s), dtype=x.dtype, device=x.device)
    block = 512
    _moe_lowp_swiglu_kernel[(rows, triton.cdiv(max(inter, inter_s), block))](
        p, gu, h, experts, weights, first_expert, n_local, assigned, inter, inter_s, swiglu_limit,
        p.stride(0), p.stride(1), gu.stride(0), h.stride(0), S=split, BLOCK=block, CLAMP=swiglu_limit > 0,
        num_warps=4)
    part = torch.empty(split, rows, dim, dtype=torch.float32, device=x.device)
    _moe_lowp_gemv_down_kernel[(rows, triton.cdiv(dim, bn), split)](
        h, w2p, s2, ws, wss, part, experts, first_expert, n_local, assigned, dim, inter // split,
        inter_s // split, h.stride(0), w2p.stride(0), w2p.stride(1), *s2.stride(), ws.stride(0),
        wss.stride(0), part.stride(0), part.stride(1), BN=bn, G=g, BK8=MOE_LOWP_SHARED_BK, FP4=fp4, UE8M0=ue8m0,
        num_warps=warps, num_stages=stages)
    return moe_gemv_sum(part, k, split, shared, out_dtype)


def moe_lowp_tiles(assignments: int, fp4: bool, fp32: bool = False) -> tuple:
    """Tiles of the grouped low-precision GEMMs for this many routing assignments, MXFP4 (fp4) or FP8
    experts (fp32: float32 activations)."""
    if fp32:
        return MOE_LOWP_TILES_F32
    return next(tiles for most, tiles in MOE_LOWP_TILES["fp4" if fp4 else "fp8"] if most is None or assignments <= most)


def moe_experts_lowp_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, tiles=None):
    """kernel.moe_experts_triton for low-precision experts: two grouped GEMMs over the assignments sorted
    by expert (kernel.moe_schedule, no host sync), each weight tile dequantised to x's dtype for tl.dot.
    x [T, D] bf16 or float32; w13, w2 (weight, scale) pairs as expert_weights says; weights, experts
    [T, k]; tiles (BM, BN, BK, warps, stages), BN and BK dividing 128, BK a multiple of 32. Returns
    float32 [T, D]: the sum over the local experts of weight * expert(x)."""
    fp4, ue8m0, s13, s2, dim, inter, up = expert_weights(w13, w2)
    w13p, w2p = w13[0], w2[0]
    n_local = w13p.size(0)
    t, k = experts.shape
    block_m, block_n, block_k, warps, stages = tiles or moe_lowp_tiles(t * k, fp4, x.dtype == torch.float32)
    order, token, w_sorted, tile_expert, tile_start, tile_end = moe_schedule(experts, weights, first_expert, n_local,
                                                                             block_m)
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    n_tiles = tile_expert.numel()
    x = x.contiguous()
    _moe_lowp_up_kernel[(n_tiles, triton.cdiv(inter, block_n))](
        x, w13p, s13, h, token, w_sorted, tile_expert, tile_start, tile_end, dim, inter, up, swiglu_limit,
        x.stride(0), w13p.stride(0), w13p.stride(1), *s13.stride(), h.stride(0),
        BM=block_m, BN=block_n, BK=block_k, CLAMP=swiglu_limit > 0, FP4=fp4, UE8M0=ue8m0, num_warps=warps,
        num_stages=stages)
    out = torch.zeros(t * k, dim, dtype=torch.float32, device=x.device)
    _moe_lowp_down_kernel[(n_tiles, triton.cdiv(dim, block_n))](
        h, w2p, s2, out, order, tile_expert, tile_start, tile_end, dim, inter,
        h.stride(0), w2p.stride(0), w2p.stride(1), *s2.stride(), out.stride(0),
        BM=block_m, BN=block_n, BK=block_k, FP4=fp4, UE8M0=ue8m0, num_warps=warps, num_stages=stages)
    return out.view(t, k, dim).sum(1)
