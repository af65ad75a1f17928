"""Triton kernels and their launchers (CUDA; on CPU tensors under TRITON_INTERPRET=1, slowly).

Each launcher `<op>_triton` computes what ops.<op>_torch does, with the same arguments and results;
ops.Ops picks between them. The kernels fuse what a decode step would otherwise run as dozens of
small kernels: the hyper-connection pre (mixes, Sinkhorn, weighted sum, the sublayer's input norm;
the HC head) and post, RMSNorm, RMSNorm with RoPE (writing a decode step's new key/value into its
cache slot), the Hadamard rotation, the indexer's scores and top-k, the compressor's whole decode
update, the key slots a decode query attends, sparse attention with its sink, MoE routing (scores,
top-k, weights), and the routed experts: grouped GEMMs over tokens sorted by expert (a decode batch's
sort and tiles in one launch, moe_schedule), or for few tokens one program per assignment with the
shared expert added in.

Shapes use: b batch, s query tokens, h heads, d head dim, n key slots, k selected keys per query.
"""
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: ops.py's torch versions serve
    triton = None

# TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slowly): the tests use it for backend 'triton'.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    INTERP = tl.constexpr(INTERPRETED)

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        # float32 v in dtype (float32 or bf16), rounded to nearest even (Triton 3.9's interpreter truncates
        # float32 -> bf16 casts: there the rounding is done on the bits).
        if dtype == tl.bfloat16:
            if INTERP:
                bits = v.to(tl.int32, bitcast=True)
                v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _softmax_block(scores, values, m, denom, acc, PRECISION: tl.constexpr):
        # One block of an online softmax: scores [BH, BN] of the block's values [BN, C] folded into the
        # running max m [BH], denominator [BH] and unnormalised weighted sum acc [BH, C] (returned new).
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        return m_new, denom, acc

    @triton.jit
    def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, part_ptr, S, H, K, keys_per_split, scale,
                            sq_b, sq_s, sq_h, skv_b, skv_n, si_b, si_s, so_b, so_s, so_h,
                            D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        # One program: one query token, BLOCK_H heads (they share the keys), online softmax over its
        # share of the selected keys in blocks of BLOCK_K. Unsplit, the sink starts the running max and
        # denominator and the output is written; split (SPLIT), the program writes its running max,
        # denominator and unnormalised sum to part[token, head, split] for _sparse_attn_merge_kernel.
        pid, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, s = pid // S, pid % S
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :], mask=hmask[:, None], other=0.0)
        if SPLIT:
            m = tl.full([BLOCK_H], -1e30, tl.float32)        # finite: a share may hold no valid key
            denom = tl.zeros([BLOCK_H], tl.float32)
        else:
            m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
            denom = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        first = sp * keys_per_split
        last = tl.minimum(first + keys_per_split, K)
        for k0 in range(first, last, BLOCK_K):
            slots = k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + b * si_b + s * si_s + slots, mask=slots < last, other=-1)
            valid = idx >= 0
            kv = tl.load(kv_ptr + b * skv_b + idx[:, None].to(tl.int64) * skv_n + dims[None, :],
                         mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m, denom, acc = _softmax_block(scores, kv, m, denom, acc, PRECISION)
        if SPLIT:
            row = (pid * H + heads).to(tl.int64) * tl.num_programs(2) + sp                   # [BLOCK_H]
            tl.store(part_ptr + row[:, None] * (D + 2) + dims[None, :], acc, mask=hmask[:, None])
            tl.store(part_ptr + row * (D + 2) + D, m, mask=hmask)
            tl.store(part_ptr + row * (D + 2) + D + 1, denom, mask=hmask)
        else:
            out = acc / denom[:, None]
            tl.store(o_ptr + b * so_b + s * so_s + heads[:, None] * so_h + dims[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])

    @triton.jit
    def _sparse_attn_merge_kernel(part_ptr, sink_ptr, o_ptr, S, H, NSPLIT, so_b, so_s, so_h,
                                  D: tl.constexpr, BLOCK_P: tl.constexpr):
        # One (token, head): merge the NSPLIT partial softmaxes, starting from the sink.
        pid, h = tl.program_id(0), tl.program_id(1)
        b, s = pid // S, pid % S
        sp = tl.arange(0, BLOCK_P)
        spmask = sp < NSPLIT
        dims = tl.arange(0, D)
        rows = (pid * H + h).to(tl.int64) * NSPLIT + sp
        m_part = tl.load(part_ptr + rows * (D + 2) + D, mask=spmask, other=-1e30)
        l_part = tl.load(part_ptr + rows * (D + 2) + D + 1, mask=spmask, other=0.0)
        sink = tl.load(sink_ptr + h).to(tl.float32)
        m = tl.maximum(tl.max(m_part, 0), sink)
        w = tl.exp(m_part - m)
        denom = tl.exp(sink - m) + tl.sum(l_part * w, 0)
        acc = tl.load(part_ptr + rows[:, None] * (D + 2) + dims[None, :], mask=spmask[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / denom
        tl.store(o_ptr + b * so_b + s * so_s + h * so_h + dims, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _expert_tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, BM: tl.constexpr, BN: tl.constexpr):
        # This program's tile of a grouped MoE GEMM (moe_schedule's tiles): its expert (-1: an unused
        # tile), its BM rows of the sorted assignments (rows, rmask) and BN of the N output columns.
        tile, nb = tl.program_id(0), tl.program_id(1)
        start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
        rows = start + tl.arange(0, BM)
        cols = nb * BN + tl.arange(0, BN)
        return tl.load(tile_expert_ptr + tile), rows, rows < end, cols, cols < N

    @triton.jit
    def _moe_up_kernel(x_ptr, w_ptr, h_ptr, token_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                       D, I, limit, sx, sw_e, sw_n, sh,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CLAMP: tl.constexpr,
                       PRECISION: tl.constexpr):
        # h[r] = weight[r] * silu(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T) for the rows r of one tile,
        # all routed to expert e; W13[e] = [W1; W3] is [2I, D].
        e, rows, rmask, cols, cmask = _expert_tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, I, BM, BN)
        if e >= 0:
            tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
            w_base = w_ptr + e.to(tl.int64) * sw_e
            gate = tl.zeros([BM, BN], tl.float32)
            up = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < D
                a = tl.load(x_ptr + tok[:, None] * sx + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                wg = tl.load(w_base + cols[None, :] * sw_n + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
                wu = tl.load(w_base + (I + cols[None, :]) * sw_n + ks[:, None], mask=cmask[None, :] & kmask[:, None],
                             other=0.0)
                gate = tl.dot(a, wg, gate, input_precision=PRECISION)
                up = tl.dot(a, wu, up, input_precision=PRECISION)
            if CLAMP:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            w = tl.load(weight_ptr + rows, mask=rmask, other=0.0)
            h = gate / (1.0 + tl.exp(-gate)) * up * w[:, None]
            tl.store(h_ptr + rows[:, None] * sh + cols[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _moe_down_kernel(h_ptr, w_ptr, out_ptr, assign_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         D, I, sh, sw_e, sw_n, so,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        # out[assign[r]] = h[r] W2[e]^T for the rows r of one tile; W2[e] is [D, I].
        e, rows, rmask, cols, cmask = _expert_tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, D, BM, BN)
        if e >= 0:
            w_base = w_ptr + e.to(tl.int64) * sw_e
            acc = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, I, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < I
                a = tl.load(h_ptr + rows[:, None] * sh + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_base + cols[None, :] * sw_n + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            dest = tl.load(assign_ptr + rows, mask=rmask, other=0).to(tl.int64)
            tl.store(out_ptr + dest[:, None] * so + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _expert_keys(e_ptr, j, A, first, n_local):
        # Sort keys of assignments j: the local expert, n_local for one held elsewhere, n_local + 1 past A.
        g = tl.load(e_ptr + j, mask=j < A, other=0) - first
        keys = tl.where((g >= 0) & (g < n_local), g, n_local)
        return tl.where(j < A, keys, n_local + 1)

    @triton.jit
    def _expert_place(e_ptr, a, A, first, n_local, BLOCK_A: tl.constexpr):
        # The sort keys of all A (<= BLOCK_A) assignments, and assignment a's place in the stable order by
        # key: how many keys are below its own, plus the equal ones before it.
        i = tl.arange(0, BLOCK_A)
        keys = _expert_keys(e_ptr, i, A, first, n_local)
        mine = tl.sum(tl.where(i == a, keys, 0), 0)
        return keys, tl.sum(((keys < mine) | ((keys == mine) & (i < a))).to(tl.int32), 0)

    @triton.jit
    def _moe_schedule_kernel(e_ptr, w_ptr, order_ptr, token_ptr, ws_ptr, texp_ptr, tstart_ptr, tend_ptr,
                             A, first, n_local, n_tiles, K: tl.constexpr, BM: tl.constexpr, BLOCK_A: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
        # moe_schedule_torch in one launch. Program a < A places assignment a (token a // K) in the order by
        # key, ties in assignment order, by counting the keys before it: order, token and its weight
        # (float32) go to that place. Programs A + i give BLOCK_T tiles each, from every expert's count:
        # tile_end_cum = cumsum(ceil(count / BM)), a tile's expert the first whose cumulative count of
        # tiles exceeds it (-1 past the last: unused), its rows BM at a time along that expert's run.
        pid = tl.program_id(0)
        if pid < A:
            _, place = _expert_place(e_ptr, pid, A, first, n_local, BLOCK_A)
            tl.store(order_ptr + place, pid.to(tl.int64))
            tl.store(token_ptr + place, (pid // K).to(tl.int64))
            tl.store(ws_ptr + place, tl.load(w_ptr + pid).to(tl.float32))
        else:
            e = tl.arange(0, BLOCK_E)
            counts = tl.zeros([BLOCK_E], tl.int32)
            for a0 in range(0, A, CHUNK):
                keys = _expert_keys(e_ptr, a0 + tl.arange(0, CHUNK), A, first, n_local)
                counts += tl.sum((keys[None, :] == e[:, None]).to(tl.int32), 1)
            counts = tl.where(e < n_local, counts, 0)
            ends = tl.cumsum(counts, 0)
            tiles = (counts + BM - 1) // BM
            tile_end_cum = tl.cumsum(tiles, 0)
            tile = (pid - A) * BLOCK_T + tl.arange(0, BLOCK_T)
            expert = tl.sum(((tile_end_cum[None, :] <= tile[:, None]) & (e < n_local)[None, :]).to(tl.int32), 1)
            hit = e[None, :] == tl.minimum(expert, n_local - 1)[:, None]                 # [BLOCK_T, BLOCK_E]
            end = tl.sum(tl.where(hit, ends[None, :], 0), 1)
            count = tl.sum(tl.where(hit, counts[None, :], 0), 1)
            first_tile = tl.sum(tl.where(hit, (tile_end_cum - tiles)[None, :], 0), 1)
            tmask = tile < n_tiles
            tl.store(texp_ptr + tile, tl.where(expert < n_local, expert, -1).to(tl.int64), mask=tmask)
            tl.store(tstart_ptr + tile, (end - count + (tile - first_tile) * BM).to(tl.int64), mask=tmask)
            tl.store(tend_ptr + tile, end.to(tl.int64), mask=tmask)


    @triton.jit
    def _sinkhorn(logits, iters, eps):
        # Row softmax + eps, a column normalisation, then iters - 1 row/column rounds on [HC, HC].
        e = tl.exp(logits - tl.max(logits, 1)[:, None])
        comb = e / tl.sum(e, 1)[:, None] + eps
        comb = comb / (tl.sum(comb, 0)[None, :] + eps)
        for _ in range(iters - 1):
            comb = comb / (tl.sum(comb, 1)[:, None] + eps)
            comb = comb / (tl.sum(comb, 0)[None, :] + eps)
        return comb

    @triton.jit
    def _hc_mix_kernel(x_ptr, fn_ptr, part_ptr, T, K, M, SPAN, BT: tl.constexpr, MP: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # Split-K partial sums of the mixes of many tokens: for BT tokens and one SPAN-wide slice of the
        # flattened streams (BLOCK_K at a time), part[t, slice, :M] = fn[:, slice] . x[t, slice] and
        # part[t, slice, M] = |x[t, slice]|^2, with tensor-core products as accurate as float32 FMAs:
        # 16-bit streams are exact in TF32, so fn split into a TF32 head and its remainder takes two TF32
        # products (float32 streams: three, tf32x3).
        tb, kb = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, MP)
        t = tb * BT + tl.arange(0, BT)
        tmask = t < T
        mix = tl.zeros([BT, MP], tl.float32)
        square = tl.zeros([BT], tl.float32)
        for k0 in range(kb * SPAN, tl.minimum(kb * SPAN + SPAN, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            x = tl.load(x_ptr + t.to(tl.int64)[:, None] * K + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                        other=0.0)                                                              # [BT, BLOCK_K]
            xf = x.to(tl.float32)
            fn = tl.load(fn_ptr + m[None, :] * K + ks[:, None], mask=(m < M)[None, :] & kmask[:, None],
                         other=0.0)                                                             # [BLOCK_K, MP]
            if x_ptr.dtype.element_ty == tl.float32:
                mix = tl.dot(xf, fn, mix, input_precision="tf32x3")
            else:
                head = (fn.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)      # top 10 bits
                mix = tl.dot(xf, head, mix, input_precision="tf32")
                mix = tl.dot(xf, fn - head, mix, input_precision="tf32")
            square += tl.sum(xf * xf, 1)
        acc = tl.where(m[None, :] == M, square[:, None], mix)
        nsplit = tl.num_programs(1)
        tl.store(part_ptr + (t.to(tl.int64)[:, None] * nsplit + kb) * MP + m[None, :], acc,
                 mask=tmask[:, None] & (m <= M)[None, :])

    @triton.jit
    def _hc_streams(f_ptr, res, post_ptr, comb_ptr, t, d, dmask, D, HC: tl.constexpr):
        # Token t's streams at columns d after a sublayer, float32 [HC, len(d)]: stream k = post[t, k] * f[t, d]
        # + sum_j comb[t, j, k] * res[j] (res: the residual streams there, float32).
        j = tl.arange(0, HC)
        f = tl.load(f_ptr + t * D + d, mask=dmask, other=0.0).to(tl.float32)
        comb = tl.load(comb_ptr + t * HC * HC + j[:, None] * HC + j[None, :])                      # [j, k]
        return tl.load(post_ptr + t * HC + j)[:, None] * f[None, :] + tl.sum(comb[:, :, None] * res[:, None, :], 0)

    @triton.jit
    def _hc_mix_few_kernel(x_ptr, f_ptr, post_ptr, comb_ptr, o_ptr, fn_ptr, part_ptr, D, M, HC: tl.constexpr,
                           MP: tl.constexpr, BLOCK_D: tl.constexpr, POST: tl.constexpr):
        # _hc_mix_kernel's partial sums for few tokens, on CUDA cores: for token t and columns d of each of
        # its HC streams (BLOCK_D of them), part[t, slice, :M] = fn[:, streams at d] . x and part[t, slice,
        # M] = the streams' squared norm there. POST: the streams are first made as _hc_post_kernel makes
        # them (x the residual, f the sublayer's output), stored to o in o's dtype, and the mixes taken of
        # those rounded values: leaving one sublayer and starting to enter the next in one launch.
        t, db = tl.program_id(0).to(tl.int64), tl.program_id(1)
        d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        j = tl.arange(0, HC)
        streams = t * HC * D + j[:, None] * D + d[None, :]
        xs = tl.load(x_ptr + streams, mask=dmask[None, :], other=0.0).to(tl.float32)           # [HC, BLOCK_D]
        if POST:
            xs = _rounded(_hc_streams(f_ptr, xs, post_ptr, comb_ptr, t, d, dmask, D, HC), o_ptr.dtype.element_ty)
            tl.store(o_ptr + streams, xs, mask=dmask[None, :])
            xs = xs.to(tl.float32)
        m = tl.arange(0, MP)
        fn = tl.load(fn_ptr + m[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :],
                     mask=(m < M)[:, None, None] & dmask[None, None, :], other=0.0)              # [MP, HC, BLOCK_D]
        mix = tl.where(m == M, tl.sum(tl.sum(xs * xs, 1), 0), tl.sum(tl.sum(fn * xs[None, :, :], 2), 1))
        tl.store(part_ptr + (t * tl.num_programs(1) + db) * MP + m, mix, mask=m <= M)

    @triton.jit
    def _hc_pre_kernel(part_ptr, x_ptr, scale_ptr, base_ptr, w_ptr, y_ptr, pre_ptr, post_ptr, comb_ptr,
                       NSPLIT, sp_t, sp_s, K, D, n_slices, norm_eps, iters, eps,
                       HC: tl.constexpr, M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       NORM: tl.constexpr, MIX: tl.constexpr, HEAD: tl.constexpr, OUT_NORM: tl.constexpr,
                       ALONE: tl.constexpr):
        # One token (and with MIX one BLOCK_D slice of D): sum the NSPLIT partial mixes (M of them, the
        # streams' squared norm after them), scale by the streams' RMS (NORM), split them into pre/post
        # sigmoid gates and the Sinkhorn-projected comb (HEAD: the HC head's pre gate alone), and (MIX)
        # y = sum_k pre[k] x[k] on the slice, then (OUT_NORM, the whole of D in one slice) y rounded to
        # its dtype and RMS-normalised with weight w: the sublayer's input norm. With ALONE one more
        # program (slice n_slices) computes post and comb while the others mix, so that the Sinkhorn's
        # latency overlaps the weighted sum; else the first slice stores them.
        t, db = tl.program_id(0).to(tl.int64), tl.program_id(1)
        j = tl.arange(0, HC)
        cell = j[:, None] * HC + j[None, :]
        split = tl.arange(0, BLOCK_S)
        smask = split < NSPLIT
        row = part_ptr + t * sp_t + split * sp_s                                        # [BLOCK_S]
        r = 1.0
        if NORM:
            r = tl.rsqrt(tl.sum(tl.load(row + M, mask=smask, other=0.0), 0) / K + norm_eps)
        m_pre = tl.sum(tl.load(row[:, None] + j[None, :], mask=smask[:, None], other=0.0), 0) * r
        pre = tl.sigmoid(m_pre * tl.load(scale_ptr) + tl.load(base_ptr + j)) + eps
        if ALONE:
            comb_here = db == n_slices
        else:
            comb_here = db == 0
        if not HEAD and comb_here:
            m_post = tl.sum(tl.load(row[:, None] + HC + j[None, :], mask=smask[:, None], other=0.0), 0) * r
            m_comb = tl.sum(tl.load(row[:, None, None] + 2 * HC + cell[None, :, :], mask=smask[:, None, None],
                                    other=0.0), 0) * r
            post = 2.0 * tl.sigmoid(m_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j))
            comb = _sinkhorn(m_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + cell), iters, eps)
            tl.store(post_ptr + t * HC + j, post)
            tl.store(comb_ptr + t * HC * HC + cell, comb)
        if not MIX:
            tl.store(pre_ptr + t * HC + j, pre)
        if MIX and db < n_slices:
            d = db * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = d < D
            xs = tl.load(x_ptr + t * HC * D + j[:, None] * D + d[None, :], mask=dmask[None, :], other=0.0)
            y = tl.sum(pre[:, None] * xs.to(tl.float32), 0)
            if OUT_NORM:
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                y = y * tl.rsqrt(tl.sum(y * y, 0) / D + norm_eps) * tl.load(w_ptr + d, mask=dmask, other=0.0)
            tl.store(y_ptr + t * D + d, y.to(y_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _hc_post_kernel(f_ptr, r_ptr, post_ptr, comb_ptr, o_ptr, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[t, k, d] = post[t, k] * f[t, d] + sum_j comb[t, j, k] * residual[t, j, d]
        t, db = tl.program_id(0).to(tl.int64), tl.program_id(1)
        d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        j = tl.arange(0, HC)
        streams = t * HC * D + j[:, None] * D + d[None, :]
        res = tl.load(r_ptr + streams, mask=dmask[None, :], other=0.0).to(tl.float32)         # [HC, BLOCK_D]
        out = _hc_streams(f_ptr, res, post_ptr, comb_ptr, t, d, dmask, D, HC)
        tl.store(o_ptr + streams, out.to(o_ptr.dtype.element_ty), mask=dmask[None, :])

    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, f_ptr, o_ptr, slot_ptr, R, H, S, d, sx, rope_start, eps, sf_b, sf_s,
                          so_b, so_s, D: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
                          WEIGHT: tl.constexpr, INVERSE: tl.constexpr, SLOTS: tl.constexpr):
        # BLOCK_R rows of width d, sx apart in x (row r is head r % H of token r // H, token = b * S + s):
        # optional RMSNorm, then the pairs (2i, 2i+1) from rope_start on turned by the angles of the
        # token's position. The output is contiguous, or (SLOTS, one row per token) row slot[token]
        # of the token's block of a cache: so_b and so_s apart.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, D)
        partner = cols ^ 1                                 # the other member of a pair (rope_start is even)
        mask = (rows < R)[:, None] & (cols < d)[None, :]
        base = x_ptr + rows.to(tl.int64)[:, None] * sx
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            r = tl.rsqrt(tl.sum(x * x, 1) / d + eps)[:, None]
            x, xp = x * r, xp * r
            if WEIGHT:
                x = x * tl.load(w_ptr + cols, mask=cols < d, other=0.0)[None, :]
                xp = xp * tl.load(w_ptr + partner, mask=partner < d, other=0.0)[None, :]
        token = rows // H
        fbase = (token // S) * sf_b + (token % S) * sf_s
        tail = mask & (cols >= rope_start)[None, :]
        fcol = ((cols - rope_start) // 2) * 2
        cos = tl.load(f_ptr + fbase[:, None] + fcol[None, :], mask=tail, other=1.0)
        sin = tl.load(f_ptr + fbase[:, None] + fcol[None, :] + 1, mask=tail, other=0.0)
        if INVERSE:
            sin = -sin
        out = x * cos + tl.where(cols % 2 == 0, -1.0, 1.0)[None, :] * xp * sin
        if SLOTS:
            slot = tl.load(slot_ptr + rows, mask=rows < R, other=0)
            dest = rows.to(tl.int64) * so_b + slot * so_s
        else:
            dest = rows.to(tl.int64) * d
        tl.store(o_ptr + dest[:, None] + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sylvester(N: tl.constexpr, LOG_N: tl.constexpr):
        # The Sylvester Hadamard matrix [N, N] in registers: H[i, j] = (-1)^popcount(i & j).
        idx = tl.arange(0, N)
        both = idx[:, None] & idx[None, :]
        parity = tl.zeros([N, N], tl.int32)
        for bit in tl.static_range(LOG_N):
            parity = parity ^ ((both >> bit) & 1)
        return 1 - 2 * parity

    @triton.jit
    def _hadamard_kernel(x_ptr, o_ptr, R, scale, N: tl.constexpr, LOG_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr):
        # BLOCK_R rows times the Sylvester matrix H[i, j] = (-1)^popcount(i & j), built in registers.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, N)
        rmask = (rows < R)[:, None]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=rmask, other=0.0)
        h = _sylvester(N, LOG_N).to(x.dtype)
        y = tl.dot(x, h, input_precision=PRECISION) * scale
        tl.store(o_ptr + offs, y.to(o_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _index_scores_kernel(q_ptr, k_ptr, w_ptr, lim_ptr, o_ptr, S, N, H, scale, sq_b, sq_s, sq_h, sk_b, sk_n,
                             sw_b, sw_s, sl_b, sl_s, so_b, so_s, D: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # One query token, BLOCK_N compressed entries: sum over heads of (scale * w[h]) * relu(q[h] . key),
        # -inf from the token's limit on.
        pid, nb = tl.program_id(0), tl.program_id(1)
        b, s = pid // S, pid % S
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        dims = tl.arange(0, D)
        keys = tl.load(k_ptr + b * sk_b + n.to(tl.int64)[:, None] * sk_n + dims[None, :], mask=nmask[:, None],
                       other=0.0)
        limit = tl.load(lim_ptr + b * sl_b + s * sl_s)
        acc = tl.zeros([BLOCK_N], tl.float32)
        if nb * BLOCK_N < limit:                      # blocks the query cannot see yet skip the products
            for h0 in range(0, H, BLOCK_H):
                heads = h0 + tl.arange(0, BLOCK_H)
                hmask = heads < H
                q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :],
                            mask=hmask[:, None], other=0.0)
                w = tl.load(w_ptr + b * sw_b + s * sw_s + heads, mask=hmask, other=0.0).to(tl.float32) * scale
                scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION)                 # [BLOCK_H, BLOCK_N]
                acc += tl.sum(tl.maximum(scores, 0.0) * w[:, None], 0)
        acc = tl.where(n < limit, acc, float("-inf"))
        tl.store(o_ptr + b * so_b + s * so_s + n, acc, mask=nmask)

    @triton.jit
    def _topk_chunk_kernel(v_ptr, i_ptr, ov_ptr, oi_ptr, M, pad_index, sv, si, K, C: tl.constexpr,
                           INDEXED: tl.constexpr, NEG_INF_KEY: tl.constexpr):
        # Row r, chunk c (C entries) of a row of M float32 values (rows sv apart): the K largest of the
        # chunk (K <= C), values and indices, to slots c * K .. c * K + K - 1 of the output row. An
        # entry's index is its column, or (INDEXED) the int64 read at the same place of i_ptr (rows si
        # apart); entries past M are -inf with index pad_index.
        # The K-th largest value is found exactly by a bitwise search on integer keys that order as
        # the floats do (NEG_INF_KEY is the key of -inf); ties at it are taken lowest column first.
        # When at most K values are finite, the search is skipped: they all go, then -inf ones.
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        j = c * C + tl.arange(0, C)
        live = j < M
        v = tl.load(v_ptr + r * sv + j, mask=live, other=float("-inf"))
        if INDEXED:
            idx = tl.load(i_ptr + r * si + j, mask=live, other=pad_index)
        else:
            idx = tl.where(live, j.to(tl.int64), pad_index)
        bits = v.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        threshold = tl.full([], NEG_INF_KEY, tl.int64)
        if tl.sum((key > threshold).to(tl.int32), 0) > K:
            threshold = tl.full([], -(1 << 31), tl.int64)   # the least key; the largest one with K at or above it
            for bit in range(31, -1, -1):
                step = threshold + (tl.full([], 1, tl.int64) << bit)
                if tl.sum((key >= step).to(tl.int32), 0) >= K:
                    threshold = step
        above = key > threshold
        tie = key == threshold
        take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= K - tl.sum(above.to(tl.int32), 0)))
        slot = c * K + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(ov_ptr + r * (tl.num_programs(1) * K) + slot, v, mask=take)
        tl.store(oi_ptr + r * (tl.num_programs(1) * K) + slot, idx, mask=take)


    @triton.jit
    def _pool_tile(kv, score, m, l, acc):
        # One step of a softmax over slots kept per channel: kv, score [rows, HD]; m, l, acc [HD].
        m_new = tl.maximum(m, tl.max(score, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new[None, :])
        return m_new, l * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p * kv, 0)

    @triton.jit
    def _compress_decode_kernel(kvn_ptr, scn_ptr, ape_ptr, pos_ptr, kvs_ptr, scs_ptr, pkv_ptr, psc_ptr,
                                w_ptr, f_ptr, cache_ptr, ratio, width, rope_start, eps, rot_scale,
                                skn, ssn, ss_b, ss_r, sp_b, sp_r, sc_b, sc_n,
                                HD: tl.constexpr, RC: tl.constexpr, OVERLAP: tl.constexpr, ROTATE: tl.constexpr,
                                LOG_HD: tl.constexpr):
        # One row: store the new token (its kv and score rows skn and ssn apart) in its slot; if it
        # completes its window, pool the window (online softmax over slots, per channel), round,
        # RMSNorm, RoPE at the window start, optionally Hadamard, and write the entry.
        b = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        slot = pos % ratio
        c = tl.arange(0, HD)
        second = HD if OVERLAP else 0               # column of the series pooled from this window
        new_kv = tl.load(kvn_ptr + b * skn + second + c)
        new_sc = tl.load(scn_ptr + b * ssn + second + c) + tl.load(ape_ptr + slot * width + second + c)
        state = b * ss_b + slot * ss_r
        tl.store(kvs_ptr + state + second + c, new_kv)
        tl.store(scs_ptr + state + second + c, new_sc)
        if OVERLAP:
            first_kv = tl.load(kvn_ptr + b * skn + c)
            first_sc = tl.load(scn_ptr + b * ssn + c) + tl.load(ape_ptr + slot * width + c)
            tl.store(kvs_ptr + state + c, first_kv)
            tl.store(scs_ptr + state + c, first_sc)
        if slot == ratio - 1:
            m = tl.full([HD], float("-inf"), tl.float32)
            l = tl.zeros([HD], tl.float32)
            acc = tl.zeros([HD], tl.float32)
            for j0 in range(0, ratio, RC):             # this window first: its scores are finite
                j = j0 + tl.arange(0, RC)
                offs = b * ss_b + j[:, None] * ss_r + second + c[None, :]
                live = (j < ratio)[:, None]
                is_new = (j == slot)[:, None]
                kv = tl.where(is_new, new_kv[None, :], tl.load(kvs_ptr + offs, mask=live, other=0.0))
                sc = tl.where(is_new, new_sc[None, :], tl.load(scs_ptr + offs, mask=live, other=float("-inf")))
                m, l, acc = _pool_tile(kv, sc, m, l, acc)
            if OVERLAP:                                  # then the previous window's first series
                j = tl.arange(0, RC)
                offs = b * sp_b + j[:, None] * sp_r + c[None, :]
                live = (j < ratio)[:, None]
                m, l, acc = _pool_tile(tl.load(pkv_ptr + offs, mask=live, other=0.0),
                                       tl.load(psc_ptr + offs, mask=live, other=float("-inf")), m, l, acc)
                tl.debug_barrier()                       # every thread has read prev before it is replaced
                s_offs = b * ss_b + j[:, None] * ss_r + c[None, :]
                is_new = (j == slot)[:, None]
                tl.store(pkv_ptr + offs, tl.where(is_new, first_kv[None, :],
                                                  tl.load(kvs_ptr + s_offs, mask=live, other=0.0)), mask=live)
                tl.store(psc_ptr + offs, tl.where(is_new, first_sc[None, :],
                                                  tl.load(scs_ptr + s_offs, mask=live, other=0.0)), mask=live)
            dtype = cache_ptr.dtype.element_ty
            e = (acc / l).to(dtype).to(tl.float32)
            e = (e * tl.rsqrt(tl.sum(e * e, 0) / HD + eps) * tl.load(w_ptr + c)).to(dtype).to(tl.float32)
            a, bb = tl.split(tl.reshape(e, [HD // 2, 2]))
            pair = tl.arange(0, HD // 2)
            tail = 2 * pair >= rope_start
            fcol = (pos - slot) * (HD - rope_start) + 2 * pair - rope_start
            cos = tl.load(f_ptr + fcol, mask=tail, other=1.0)
            sin = tl.load(f_ptr + fcol + 1, mask=tail, other=0.0)
            e = tl.reshape(tl.join(a * cos - bb * sin, a * sin + bb * cos), [HD])
            if ROTATE:
                e = tl.sum(e.to(dtype).to(tl.float32)[:, None] * _sylvester(HD, LOG_HD).to(tl.float32), 0) * rot_scale
            tl.store(cache_ptr + b * sc_b + (pos // ratio) * sc_n + c, e.to(dtype))

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, D, sx, eps, BLOCK_D: tl.constexpr, WEIGHT: tl.constexpr):
        # One row (sx apart in x): x * rsqrt(mean(x^2) + eps) (* w) in float32, stored in the output's dtype.
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        x = tl.load(x_ptr + row * sx + d, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
        if WEIGHT:
            y = y * tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * D + d, y.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _log1p(u):
        # log(1 + u) to float32 accuracy for small u too (Triton's interpreter has no libdevice log1p).
        w = 1.0 + u
        return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))

    @triton.jit
    def _route_kernel(s_ptr, bias_ptr, tid_ptr, ids_ptr, w_ptr, e_ptr, E, scale, K: tl.constexpr,
                      KP: tl.constexpr, EP: tl.constexpr, FUNC: tl.constexpr, HASH: tl.constexpr):
        # One token: the experts' scores from its gate logits (FUNC 0 softmax, 1 sigmoid, 2 sqrt(softplus)),
        # the K experts (HASH: tid2eid[token id]; else the top K of score + bias, one argmax at a time),
        # their scores as weights, normalised unless FUNC is softmax, times scale.
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, EP)
        emask = e < E
        logit = tl.load(s_ptr + t * E + e, mask=emask, other=0.0)
        if FUNC == 0:
            p = tl.where(emask, tl.exp(logit - tl.max(tl.where(emask, logit, float("-inf")), 0)), 0.0)
            score = p / tl.sum(p, 0)
        elif FUNC == 1:
            score = tl.sigmoid(logit)
        else:         # softplus as torch computes it: x above 20, else log(1 + exp(x)), stably
            soft = tl.maximum(logit, 0.0) + _log1p(tl.exp(-tl.abs(logit)))
            score = tl.sqrt(tl.where(logit > 20.0, logit, soft))
        k = tl.arange(0, KP)
        if HASH:
            chosen = tl.load(tid_ptr + tl.load(ids_ptr + t) * K + k, mask=k < K, other=0).to(tl.int64)
            weight = tl.sum(tl.where(e[None, :] == chosen[:, None], score[None, :], 0.0), 1)
        else:
            pick = tl.where(emask, score + tl.load(bias_ptr + e, mask=emask, other=0.0), float("-inf"))
            chosen = tl.zeros([KP], tl.int64)
            weight = tl.zeros([KP], tl.float32)
            for i in tl.static_range(K):
                best = tl.argmax(pick, 0)
                chosen = tl.where(k == i, best, chosen)
                weight = tl.where(k == i, tl.sum(tl.where(e == best, score, 0.0), 0), weight)
                pick = tl.where(e == best, float("-inf"), pick)
        if FUNC != 0:
            weight = weight / tl.sum(tl.where(k < K, weight, 0.0), 0)
        tl.store(w_ptr + t * K + k, weight * scale, mask=k < K)
        tl.store(e_ptr + t * K + k, chosen, mask=k < K)

    @triton.jit
    def _moe_gemv_up_kernel(x_ptr, w_ptr, gu_ptr, h_ptr, experts_ptr, weights_ptr, first, n_local, A, K, D, I, IS,
                            limit, sx, sw_e, sw_n, sgu, sh, BN: tl.constexpr, BK: tl.constexpr, CLAMP: tl.constexpr,
                            PRECISION: tl.constexpr):
        # Few tokens, no sorting: row a of h, BN columns. For a routing assignment a < A (token a // K)
        # whose expert e is local: h[a] = weight * silu(x W1[e]^T) * (x W3[e]^T), the token as row 0 of
        # a 16-row tile (tl.dot's least), the other rows zero. Row A + t: the shared expert's
        # silu(g) * u of token t from gu[t] = [x W1s^T, x W3s^T], rounded to h's dtype as the reference does.
        a, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                t = a // K
                one = (tl.arange(0, 16) == 0)[:, None]
                cmask = cols < I
                w_base = w_ptr + e.to(tl.int64) * sw_e
                gate = tl.zeros([16, BN], tl.float32)
                up = tl.zeros([16, BN], tl.float32)
                for k0 in range(0, D, BK):
                    ks = k0 + tl.arange(0, BK)
                    kmask = ks < D
                    xa = tl.load(x_ptr + t * sx + ks[None, :] + 0 * one, mask=one & kmask[None, :], other=0.0)
                    wmask = cmask[None, :] & kmask[:, None]
                    wg = tl.load(w_base + cols[None, :] * sw_n + ks[:, None], mask=wmask, other=0.0)
                    wu = tl.load(w_base + (I + cols[None, :]) * sw_n + ks[:, None], mask=wmask, other=0.0)
                    gate = tl.dot(xa, wg, gate, input_precision=PRECISION)
                    up = tl.dot(xa, wu, up, input_precision=PRECISION)
                if CLAMP:
                    gate = tl.minimum(gate, limit)
                    up = tl.minimum(tl.maximum(up, -limit), limit)
                h = tl.sum(gate / (1.0 + tl.exp(-gate)) * up, 0) * tl.load(weights_ptr + a)    # rows > 0 give 0
                tl.store(h_ptr + a * sh + cols, h.to(h_ptr.dtype.element_ty), mask=cmask)
        else:
            t = a - A
            cmask = cols < IS
            g = tl.load(gu_ptr + t * sgu + cols, mask=cmask, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + t * sgu + IS + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(h_ptr + a * sh + cols, (g / (1.0 + tl.exp(-g)) * u).to(h_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _gemv_row(h_row, w_base, sw_n, K, cols, cmask, acc, BK: tl.constexpr, PRECISION: tl.constexpr):
        # acc [16, BN] += h_row[:K] W[cols, :K]^T in its row 0 (rows 1-15 pad tl.dot's minimum of 16);
        # W's rows sw_n apart.
        one = (tl.arange(0, 16) == 0)[:, None]
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            hh = tl.load(h_row + ks[None, :] + 0 * one, mask=one & kmask[None, :], other=0.0)
            w = tl.load(w_base + cols[None, :] * sw_n + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
            acc = tl.dot(hh, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _linear_rows_kernel(x_ptr, w_ptr, o_ptr, N, K, sx, sw, so, BN: tl.constexpr, BK: tl.constexpr):
        # Row m of x, BN output columns: o[m, cols] = x[m] W[cols]^T, x and W of one dtype, the products
        # exact in float32 and summed in float32. CUDA cores: a row or two cannot fill a tensor-core tile.
        # The rows are the fastest grid axis, so the programs reading one weight tile share it in L2.
        m, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < N
        acc = tl.zeros([BN, BK], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            x = tl.load(x_ptr + m * sx + ks, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None] * sw + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(o_ptr + m * so + cols, tl.sum(acc, 1), mask=cmask)

    @triton.jit
    def _moe_gemv_down_kernel(h_ptr, w_ptr, ws_ptr, part_ptr, experts_ptr, first, n_local, A, D, I, IS,
                              sh, sw_e, sw_n, sws_n, sp, BN: tl.constexpr, BK: tl.constexpr,
                              PRECISION: tl.constexpr):
        # Row a of h, BN output columns: part[a] = h[a] W2[e]^T for an assignment with a local expert e
        # (zero for one without), h[a] W2s^T for the shared expert's rows a >= A. Float32.
        a, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BN + tl.arange(0, BN)
        cmask = cols < D
        acc = tl.zeros([16, BN], tl.float32)
        if a < A:
            e = tl.load(experts_ptr + a) - first
            if (e >= 0) & (e < n_local):
                acc = _gemv_row(h_ptr + a * sh, w_ptr + e.to(tl.int64) * sw_e, sw_n, I, cols, cmask, acc,
                                BK, PRECISION)
        else:
            acc = _gemv_row(h_ptr + a * sh, ws_ptr, sws_n, IS, cols, cmask, acc, BK, PRECISION)
        tl.store(part_ptr + a * sp + cols, tl.sum(acc, 0), mask=cmask)

    @triton.jit
    def _moe_gemv_sum_kernel(part_ptr, out_ptr, A, K, D, S, R, sp, so, RP: tl.constexpr, BLOCK: tl.constexpr,
                             SHARED: tl.constexpr):
        # Token t, BLOCK columns: out[t] = the sum of its K assignments' rows of part (+ its shared
        # expert's row A + t) over the S slices of R rows each that part holds; the S (K + SHARED) rows
        # loaded at once (RP >= S (K + SHARED)), so that their reads overlap.
        t, nb = tl.program_id(0), tl.program_id(1)
        cols = nb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < D
        per = K + SHARED
        r = tl.arange(0, RP)
        j = r % per
        row = (r // per) * R + tl.where(j < K, t * K + j, A + t)
        rows = tl.load(part_ptr + row.to(tl.int64)[:, None] * sp + cols[None, :],
                       mask=(r < S * per)[:, None] & cmask[None, :], other=0.0)
        tl.store(out_ptr + t * so + cols, tl.sum(rows, 0).to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _decode_indices_kernel(pos_ptr, pick_ptr, o_ptr, window, n_entries, ratio, sp, so,
                               BLOCK: tl.constexpr, PICKS: tl.constexpr):
        # Row b, BLOCK columns of decode_indices_torch's result: window ring slots, then compressed entries.
        b, cb = tl.program_id(0), tl.program_id(1)
        pos = tl.load(pos_ptr + b)
        c = cb * BLOCK + tl.arange(0, BLOCK)
        back = (pos - c) % window
        back = tl.where(back < 0, back + window, back)               # a floor modulo, as torch's %
        ring = tl.where(pos - back >= 0, c, -1)
        j = c - window
        if PICKS:
            entry = tl.load(pick_ptr + b * sp + j, mask=(j >= 0) & (j < n_entries), other=-1)
        else:
            entry = j
        seen = (entry >= 0) & (entry < (pos + 1) // ratio)
        out = tl.where(c < window, ring, tl.where(seen, entry + window, -1))
        tl.store(o_ptr + b * so + c, out, mask=c < window + n_entries)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SMs the GEMV tiles spread over; 1 in the interpreter, which runs the programs one by one."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x [.., d] as rows [R, d] with unit column stride, a view where x allows (its rows may lie apart,
    as in a column slice of a wider matrix), else a contiguous copy."""
    flat = x.reshape(-1, x.size(-1))
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _precision(x: torch.Tensor) -> str:
    """tl.dot precision: exact float32 products for float32 inputs (TF32 is ~1e-3 off)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def hc_split_sinkhorn_triton(mixes, hc_scale, hc_base, hc_mult: int, iters: int, eps: float):
    """Triton version of hc_split_sinkhorn (same arguments and results, float32)."""
    lead = mixes.shape[:-1]
    m = mixes.reshape(-1, mixes.size(-1)).float().contiguous()
    n = m.size(0)
    pre = torch.empty(n, hc_mult, dtype=torch.float32, device=m.device)
    post = torch.empty_like(pre)
    comb = torch.empty(n, hc_mult, hc_mult, dtype=torch.float32, device=m.device)
    _hc_pre_kernel[(n, 1)](
        m, m, hc_scale.float().contiguous(), hc_base.float().contiguous(), m, m, pre, post, comb,
        1, m.stride(0), 0, 1, 1, 1, 0.0, iters, eps, HC=hc_mult, M=m.size(1), BLOCK_S=1, BLOCK_D=16, NORM=False,
        MIX=False, HEAD=False, OUT_NORM=False, ALONE=False, num_warps=1)
    return pre.view(*lead, hc_mult), post.view(*lead, hc_mult), comb.view(*lead, hc_mult, hc_mult)


HC_MIX_PROGRAMS = 512   # the mixes of many tokens: about this many programs (token blocks x K slices)
HC_FEW_TOKENS = 16      # up to this many, the mixes on CUDA cores (_hc_mix_few_kernel)
HC_FEW_BLOCK_D = 64     # columns of each stream a program of the few tokens' mixes


def _hc_mixes(x, fn, post_from=None):
    """hc_pre_triton's first launch, the partial mixes of streams x [t, hc, D] -> (part [t, slices, MP],
    the streams). post_from = (f [t, D], post, comb): the streams are hc_post(f, x, post, comb), made by
    the same launch for few tokens, by hc_post_triton's before it for more."""
    t, hc, dim = x.shape
    k, m = hc * dim, fn.size(0)
    mp = triton.next_power_of_2(m + 1)
    fn = fn.float().contiguous()
    if t > HC_FEW_TOKENS:
        if post_from is not None:
            x = hc_post_triton(post_from[0], x, *post_from[1:])
        # Many tokens: tensor-core products over slices of several K blocks, about HC_MIX_PROGRAMS programs
        # in all (fewer partial sums to write and add).
        bt, block_k = 64, 128
        span = block_k * triton.cdiv(triton.cdiv(k, block_k), max(1, HC_MIX_PROGRAMS // triton.cdiv(t, bt)))
        part = torch.empty(t, triton.cdiv(k, span), mp, dtype=torch.float32, device=x.device)
        _hc_mix_kernel[(triton.cdiv(t, bt), part.size(1))](x, fn, part, t, k, m, span, BT=bt, MP=mp, BLOCK_K=block_k,
                                                           num_warps=4)
        return part, x
    part = torch.empty(t, triton.cdiv(dim, HC_FEW_BLOCK_D), mp, dtype=torch.float32, device=x.device)
    if post_from is None:
        f, post, comb, streams = x, x, x, x             # (unread)
    else:
        f, post, comb = post_from[0].contiguous(), post_from[1].float().contiguous(), post_from[2].float().contiguous()
        streams = torch.empty(x.shape, dtype=f.dtype, device=x.device)
    _hc_mix_few_kernel[(t, part.size(1))](x, f, post, comb, streams, fn, part, dim, m, HC=hc, MP=mp,
                                          BLOCK_D=HC_FEW_BLOCK_D, POST=post_from is not None, num_warps=4)
    return part, streams


def _hc_enter(part, x, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float, hc_eps: float, norm_weight):
    """hc_pre_triton's second launch, from _hc_mixes' partial mixes part of x [t, hc, D]: norm, Sinkhorn,
    weighted sum and the input norm -> (y [t, D], post, comb; None, None for the HC head)."""
    t, dim = x.size(0), x.size(-1)
    m = fn.size(0)
    head = m == hc_mult
    y = torch.empty(t, dim, dtype=x.dtype, device=x.device)
    post = torch.empty(t, hc_mult, dtype=torch.float32, device=x.device)
    comb = torch.empty(t, hc_mult, hc_mult, dtype=torch.float32, device=x.device)
    whole = norm_weight is not None or t > HC_FEW_TOKENS         # few tokens, no norm: spread D over programs
    block_d = triton.next_power_of_2(dim) if whole else 512
    n_slices = triton.cdiv(dim, block_d)
    alone = not head and t <= HC_FEW_TOKENS                     # few tokens: the Sinkhorn in a program of its own
    # Few tokens, whole D: 2 warps, the Sinkhorn program's reductions then cross fewer warps (an H100, V4's
    # shapes, one token: 6.8 us a call with 8 warps, 6.2 with 4, 4.9 with 2, 5.5 with 1; no spills)
    warps = 2 if alone and whole else 8 if block_d >= 4096 else 4
    _hc_pre_kernel[(t, n_slices + alone)](
        part, x, hc_scale.float().contiguous(), hc_base.float().contiguous(),
        x if norm_weight is None else norm_weight.float().contiguous(), y, post, post, comb,
        part.size(1), part.stride(0), part.stride(1), hc_mult * dim, dim, n_slices, norm_eps, iters, hc_eps,
        HC=hc_mult, M=m, BLOCK_S=triton.next_power_of_2(part.size(1)), BLOCK_D=block_d, NORM=True, MIX=True,
        HEAD=head, OUT_NORM=norm_weight is not None, ALONE=alone, num_warps=warps)
    return y, (None if head else post), (None if head else comb)


def hc_pre_triton(x, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float, hc_eps: float,
                  norm_weight=None):
    """Triton version of hc_pre_torch: two launches (split-K mixes, then norm + Sinkhorn + weighted sum
    and the input norm). fn with hc_mult rows is the HC head: its pre gate alone, post and comb None."""
    lead, dim = x.shape[:-2], x.size(-1)
    x = x.reshape(-1, hc_mult, dim).contiguous()
    y, post, comb = _hc_enter(_hc_mixes(x, fn)[0], x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps,
                              norm_weight)
    if post is None:
        return y.view(*lead, dim), None, None
    return y.view(*lead, dim), post.view(*lead, hc_mult), comb.view(*lead, hc_mult, hc_mult)


def hc_post_triton(f, residual, post, comb):
    """Triton version of hc_post_torch."""
    hc, dim = residual.shape[-2:]
    out = torch.empty(residual.shape, dtype=f.dtype, device=f.device)
    t = out.numel() // (hc * dim)
    block_d = 256
    _hc_post_kernel[(t, triton.cdiv(dim, block_d))](
        f.contiguous(), residual.contiguous(), post.float().contiguous(), comb.float().contiguous(), out, dim,
        HC=hc, BLOCK_D=block_d, num_warps=4)
    return out


def hc_post_pre_triton(f, residual, post, comb, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float,
                       hc_eps: float, norm_weight=None):
    """hc_post_torch, then hc_pre_torch of the streams it makes -> (streams, input, post, comb), on
    Triton: few tokens make the streams in the next mixes' launch (one launch fewer than hc_post_triton
    then hc_pre_triton, which more tokens take: _hc_mixes)."""
    lead, dim = residual.shape[:-2], residual.size(-1)
    t = residual.numel() // (hc_mult * dim)
    part, x = _hc_mixes(residual.reshape(t, hc_mult, dim).contiguous(), fn,
                        (f.reshape(t, dim), post.reshape(t, hc_mult), comb.reshape(t, hc_mult, hc_mult)))
    y, post, comb = _hc_enter(part, x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps, norm_weight)
    return (x.view(*lead, hc_mult, dim), y.view(*lead, dim), post.view(*lead, hc_mult),
            comb.view(*lead, hc_mult, hc_mult))


NORM_ROPE_MANY_ROWS = 16384   # above this many rows (a prefill's query heads), 2 rows a program: 1.4x faster on an H100


def norm_rope_triton(x, freqs, rope_dim: int, eps=None, weight=None, inverse: bool = False, cache=None,
                     slots=None):
    """Triton version of norm_rope_torch: one launch. freqs must be the real (cos, sin) form. With a
    cache [B, n, d] and slots [b] (x [b, 1, d]), the result goes to cache[i, slots[i]] instead."""
    b, s, d = x.size(0), x.size(1), x.size(-1)
    heads = x.size(2) if x.dim() == 4 else 1
    f = freqs if freqs.dim() == 4 else freqs.unsqueeze(0)                     # [b or 1, s or 1, r/2, 2]
    f = f.float().expand(b, s, -1, -1)
    if f.stride(-1) != 1 or f.stride(-2) != 2:
        f = f.contiguous()
    flat = rows_view(x)
    into = cache is not None
    if into and (x.dim() != 3 or s != 1 or cache.stride(-1) != 1):
        raise ValueError("norm_rope into a cache takes x [b, 1, d] and a cache with a contiguous last dim")
    out = cache if into else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = flat.size(0)
    block_r, warps = (2, 2) if rows > NORM_ROPE_MANY_ROWS else (8, 4)
    _norm_rope_kernel[(triton.cdiv(rows, block_r),)](
        flat, x if weight is None else weight.float().contiguous(), f, out, slots if into else flat, rows, heads, s,
        d, flat.stride(0), d - rope_dim, 0.0 if eps is None else eps, f.stride(0), f.stride(1),
        cache.stride(0) if into else 0, cache.stride(1) if into else 0,
        D=triton.next_power_of_2(d), BLOCK_R=block_r, NORM=eps is not None, WEIGHT=weight is not None,
        INVERSE=inverse, SLOTS=into, num_warps=warps)
    return None if into else out


def hadamard_triton(x, scale: float):
    """Triton version of hadamard_transform for sizes 16 .. 256: one matrix product a block of rows."""
    n = x.size(-1)
    flat = x.reshape(-1, n).contiguous()
    out = torch.empty_like(flat)
    block_r = 16
    _hadamard_kernel[(triton.cdiv(flat.size(0), block_r),)](
        flat, out, flat.size(0), scale, N=n, LOG_N=n.bit_length() - 1, BLOCK_R=block_r,
        PRECISION=_precision(x), num_warps=4)
    return out.view(x.shape)


def index_scores_triton(q, keys, weights, limit, scale: float = 1.0):
    """Triton version of index_scores_torch: one launch, float32 [b, s, n]."""
    b, s, h, d = q.shape
    n = keys.size(1)
    q, keys = q.contiguous(), keys.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()     # [b, s, h]: its own row strides
    limit = limit.expand(b, s)
    out = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    block_h = min(64, max(16, triton.next_power_of_2(h)))
    block_n = 64
    _index_scores_kernel[(b * s, triton.cdiv(n, block_n))](
        q, keys, weights, limit, out, s, n, h, scale, q.stride(0), q.stride(1), q.stride(2), keys.stride(0),
        keys.stride(1), weights.stride(0), weights.stride(1), limit.stride(0), limit.stride(1),
        out.stride(0), out.stride(1),
        D=d, BLOCK_H=block_h, BLOCK_N=block_n, PRECISION=_precision(q), num_warps=4)
    return out


def sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale, tiles=None):
    """Triton version of sparse_attn (same arguments and result). With few programs (decode at a small
    batch) the keys are split over more programs and the partial softmaxes merged in a second launch.
    tiles: (heads a program, keys a block, warps); by default 64, 16, 8 for many queries of 64 heads or
    more (a prefill), else 16, 32, 4 (`python bench.py attn-tiles`, H100, V4 shapes: prefill of 4096
    tokens 3.4 ms against 4.5 ms for 16 heads and 16 keys, decode at batch 1 0.09 ms against 0.18)."""
    b, s, h, d = q.shape
    q, kv, topk_idxs = q.contiguous(), kv.contiguous(), topk_idxs.contiguous()
    sink = attn_sink.float().contiguous()
    o = torch.empty_like(q)
    block_h, block_k, warps = tiles or ((64, 16, 8) if b * s >= 256 and h >= 64 else (16, 32, 4))
    k = topk_idxs.size(-1)
    programs = b * s * triton.cdiv(h, block_h)
    n_split = max(1, min(triton.cdiv(k, 2 * block_k), 128 // programs))
    keys_per_split = triton.cdiv(triton.cdiv(k, n_split), block_k) * block_k
    n_split = triton.cdiv(k, keys_per_split)
    part = torch.empty(b * s * h * n_split, d + 2, dtype=torch.float32, device=q.device) if n_split > 1 else o
    _sparse_attn_kernel[(b * s, triton.cdiv(h, block_h), n_split)](
        q, kv, sink, topk_idxs, o, part, s, h, k, keys_per_split, softmax_scale,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), topk_idxs.stride(0), topk_idxs.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        D=d, BLOCK_H=block_h, BLOCK_K=block_k, SPLIT=n_split > 1, PRECISION=_precision(q), num_warps=warps)
    if n_split > 1:
        _sparse_attn_merge_kernel[(b * s, h)](part, sink, o, s, h, n_split, o.stride(0), o.stride(1), o.stride(2),
                                              D=d, BLOCK_P=triton.next_power_of_2(n_split), num_warps=4)
    return o


def local_experts(experts: torch.Tensor, first_expert: int, n_local: int) -> torch.Tensor:
    """experts [T, k] global ids -> [T k] this rank's expert of each assignment (first_expert ..
    first_expert + n_local - 1 as 0 .. n_local - 1), n_local for an expert it does not hold."""
    local = experts.flatten() - first_expert
    return torch.where((local >= 0) & (local < n_local), local, n_local)


def sort_by_expert(experts: torch.Tensor, n_experts: int):
    """experts [A] as local_experts gives them -> (order [A]: the assignments sorted by expert, stable,
    those of no expert here last; counts [n_experts]: each expert's assignments; ends [n_experts]:
    where each expert's run ends in that order). On the device, no host sync."""
    order = torch.argsort(experts, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    counts = counts[:n_experts]
    return order, counts, torch.cumsum(counts, 0)


def moe_schedule_torch(experts: torch.Tensor, weights: torch.Tensor, first_expert: int, n_local: int, block_m: int):
    """The grouped MoE GEMMs' schedule, on the device with no host sync: experts, weights [T, k] (global
    ids; experts outside first_expert .. first_expert + n_local - 1 are held elsewhere) -> order [A]
    (the assignments sorted by local expert, stable, those held elsewhere last), token [A] and weight
    [A] (float32) of each assignment in that order, and for a fixed number of tiles (ceil(A / block_m)
    + n_local) each tile's expert (-1 when unused) and its row range start .. end in the order."""
    local = local_experts(experts, first_expert, n_local)
    order, counts, seg_end = sort_by_expert(local, n_local)
    tiles = (counts + block_m - 1) // block_m
    tile_end_cum = torch.cumsum(tiles, 0)
    tile = torch.arange(-(-local.numel() // block_m) + n_local, device=experts.device)
    expert = torch.searchsorted(tile_end_cum, tile, right=True)
    e = expert.clamp(max=n_local - 1)
    start = seg_end[e] - counts[e] + (tile - (tile_end_cum[e] - tiles[e])) * block_m
    return (order, order // experts.size(1), weights.flatten()[order].float(), torch.where(expert < n_local, e, -1),
            start, seg_end[e])


# Up to this many routing assignments are scheduled in one launch (_moe_schedule_kernel, each program
# holding every key); more (prefill) take torch's sort.
MOE_SCHEDULE_MAX = 1024


def moe_schedule(experts: torch.Tensor, weights: torch.Tensor, first_expert: int, n_local: int, block_m: int):
    """moe_schedule_torch in one launch for up to MOE_SCHEDULE_MAX assignments (decode batches), where
    torch's stable sort and the gathers and scans around it take some twenty launches."""
    t, k = experts.shape
    a = t * k
    if a > MOE_SCHEDULE_MAX:
        return moe_schedule_torch(experts, weights, first_expert, n_local, block_m)
    n_tiles = -(-a // block_m) + n_local
    order, token = (torch.empty(a, dtype=torch.long, device=experts.device) for _ in range(2))
    w_sorted = torch.empty(a, dtype=torch.float32, device=experts.device)
    tile_expert, tile_start, tile_end = (torch.empty(n_tiles, dtype=torch.long, device=experts.device)
                                         for _ in range(3))
    block_t = 8
    _moe_schedule_kernel[(a + triton.cdiv(n_tiles, block_t),)](
        experts.contiguous(), weights.contiguous(), order, token, w_sorted, tile_expert, tile_start, tile_end,
        a, first_expert, n_local, n_tiles, K=k, BM=block_m, BLOCK_A=max(16, triton.next_power_of_2(a)),
        BLOCK_E=max(16, triton.next_power_of_2(n_local)), BLOCK_T=block_t, CHUNK=32, num_warps=4)
    return order, token, w_sorted, tile_expert, tile_start, tile_end


# Tiles of the grouped MoE GEMMs (BM rows, BN columns, BK depth, warps, pipeline stages): small
# batches (decode), and many assignments (prefill: the fastest with `python bench.py moe-tiles` on an
# H100, when the device's shared memory holds it, else the modest one).
MOE_TILES_SMALL = (16, 64, 64, 4, 3)
MOE_TILES_LARGE = (64, 256, 64, 8, 3)
MOE_TILES_MODEST = (64, 64, 64, 4, 3)


def moe_tiles(x: torch.Tensor, assignments: int) -> tuple:
    """Tiles for the grouped MoE GEMMs. The up kernel keeps, per pipeline stage, an x tile [BM, BK]
    and two weight tiles [BK, BN] in shared memory."""
    if assignments <= 512:
        return MOE_TILES_SMALL
    bm, bn, bk, _, stages = MOE_TILES_LARGE
    need = stages * (bm * bk + 2 * bk * bn) * x.element_size()
    have = getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", 0) if x.is_cuda else 0
    return MOE_TILES_LARGE if need <= have else MOE_TILES_MODEST


def moe_experts_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, tiles=None):
    """Routed experts as two grouped GEMMs over assignments sorted by expert.

    x [T, D]; w13 [E, 2I, D] (w1 rows then w3 rows of each local expert); w2 [E, D, I];
    weights, experts [T, k] (global expert ids; those outside first_expert .. +E are skipped);
    tiles (BM, BN, BK, warps, stages), by default by the number of assignments.
    Returns float32 [T, D]: sum over the local experts of weight * expert(x).
    """
    n_local, two_i, dim = w13.shape
    inter = two_i // 2
    t, k = experts.shape
    block_m, block_n, block_k, warps, stages = tiles or moe_tiles(x, t * k)
    precision = _precision(x)
    order, token, w_sorted, tile_expert, tile_start, tile_end = moe_schedule(experts, weights, first_expert, n_local,
                                                                             block_m)
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    n_tiles = tile_expert.numel()
    x = x.contiguous()
    _moe_up_kernel[(n_tiles, triton.cdiv(inter, block_n))](
        x, w13, h, token, w_sorted, tile_expert, tile_start, tile_end, dim, inter, swiglu_limit,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BM=block_m, BN=block_n, BK=block_k, CLAMP=swiglu_limit > 0, PRECISION=precision, num_warps=warps,
        num_stages=stages)
    out = torch.zeros(t * k, dim, dtype=torch.float32, device=x.device)
    _moe_down_kernel[(n_tiles, triton.cdiv(dim, block_n))](
        h, w2, out, order, tile_expert, tile_start, tile_end, dim, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BM=block_m, BN=block_n, BK=block_k, PRECISION=precision, num_warps=warps, num_stages=stages)
    return out.view(t, k, dim).sum(1)


NEG_INF_KEY = -2139095041          # _topk_chunk_kernel's integer key of float32 -inf


def topk_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton version of topk_indices for rows longer than k: each round takes the k largest of
    every chunk of up to 4096 entries (one program each), then the next round those candidates,
    until one chunk is left (a 16K row: two launches). Entries past the row, which can come back
    only when fewer than k values are finite, get index n, as -inf ones the rows' own index."""
    n = scores.size(-1)
    vals, idx = scores.reshape(-1, n).float().contiguous(), None
    rows, m = vals.size(0), n
    while True:
        chunk = min(max(4096, triton.next_power_of_2(2 * k)), triton.next_power_of_2(m))
        chunks = triton.cdiv(m, chunk)
        out_v = torch.empty(rows, chunks * k, dtype=torch.float32, device=scores.device)
        out_i = torch.empty(rows, chunks * k, dtype=torch.int64, device=scores.device)
        _topk_chunk_kernel[(rows, chunks)](vals, vals if idx is None else idx, out_v, out_i, m, n, vals.stride(0),
                                           0 if idx is None else idx.stride(0), k, C=chunk, INDEXED=idx is not None,
                                           NEG_INF_KEY=NEG_INF_KEY, num_warps=8 if chunk >= 2048 else 4)
        if chunks == 1:
            return out_i.view(*scores.shape[:-1], k)
        vals, idx, m = out_v, out_i, chunks * k


def compressor_decode_triton(kv_new, score_new, ape, pos, kv_state, score_state, prev_kv, prev_score,
                             norm_weight, eps: float, freqs_cis, rope_dim: int, rotate_scale, cache) -> None:
    """Triton version of compressor_decode_torch: one launch for the whole update (head dim a power of
    two); the pooling runs only in rows that complete a window. kv_new and score_new may be column
    slices of a wider matrix."""
    bsz, width = kv_new.shape
    ratio, hd = kv_state.size(1), cache.size(-1)
    overlap = prev_kv is not None
    for t in (kv_state, score_state, cache) + ((prev_kv, prev_score) if overlap else ()):
        if t.stride(-1) != 1:
            raise ValueError("compressor state and cache need a contiguous last dim")
    kv_new, score_new = rows_view(kv_new.float()), rows_view(score_new.float())
    _compress_decode_kernel[(bsz,)](
        kv_new, score_new, ape.contiguous(), pos.contiguous(),
        kv_state, score_state, prev_kv if overlap else kv_state, prev_score if overlap else score_state,
        norm_weight.float().contiguous(), freqs_cis.contiguous(), cache, ratio, width, hd - rope_dim, eps,
        1.0 if rotate_scale is None else rotate_scale, kv_new.stride(0), score_new.stride(0),
        kv_state.stride(0), kv_state.stride(1), prev_kv.stride(0) if overlap else 0, prev_kv.stride(1) if overlap else 0, cache.stride(0), cache.stride(1),
        HD=hd, RC=min(16, triton.next_power_of_2(ratio)), OVERLAP=overlap, ROTATE=rotate_scale is not None,
        LOG_HD=hd.bit_length() - 1, num_warps=8)


def rms_norm_triton(x, weight, eps: float):
    """Triton version of rms_norm_torch: one launch, a row a program; rows may lie apart (a column
    slice of a wider matrix)."""
    d = x.size(-1)
    flat = rows_view(x)
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(flat.size(0),)](flat, flat if weight is None else weight.contiguous(), out, d, flat.stride(0),
                                      eps, BLOCK_D=block, WEIGHT=weight is not None, num_warps=8 if block >= 2048 else 4)
    return out.view(x.shape)


# The few-row float32-sum linear's (BN, BK, warps, stages): one column a program while two would leave
# fewer than four programs an SM, else two. On an H100 with weights read cold (2026-11-26), one row of
# V4-Flash's gate (4096 -> 256) took 2.9 us against cuBLAS's 6.1, its compressor and indexer projections
# of a CSA layer (-> 2624) 9.2 against 12.6, and two rows 6.5 against 9.4 at 1536 outputs; with four
# rows cuBLAS led from 1024 outputs on (ops.Ops.LINEAR_ROWS_MAX_M).
LINEAR_ROWS_TILES = ((1, 2048, 8, 3), (2, 1024, 4, 3))


def linear_rows_triton(x: torch.Tensor, weight: torch.Tensor, tiles=None) -> torch.Tensor:
    """ops.linear_fp32 for a few rows (decode): x [..., K] (rows may lie apart; rounded to the weight's
    dtype, as the reference does) times a weight [N, K]^T -> float32 [..., N], one program per row and BN
    columns; tiles (BN, BK, warps, stages), by default one of LINEAR_ROWS_TILES."""
    n, k = weight.shape
    rows = rows_view(x.to(weight.dtype))
    m = rows.size(0)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if tiles is None:
        tiles = LINEAR_ROWS_TILES[m * triton.cdiv(n, 2) >= 4 * sm_count(x.device)]
    bn, bk, warps, stages = tiles
    if m:
        _linear_rows_kernel[(m, triton.cdiv(n, bn))](rows, weight.contiguous(), out, n, k, rows.stride(0), k, n,
                                                     BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


ROUTE_FUNCS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


def route_triton(scores, bias, tid2eid, ids, k: int, score_func: str, route_scale: float):
    """Triton version of route_torch: one launch, a token a program."""
    t, n = scores.shape
    scores = scores.float().contiguous()
    weights = torch.empty(t, k, dtype=torch.float32, device=scores.device)
    experts = torch.empty(t, k, dtype=torch.long, device=scores.device)
    hashed = tid2eid is not None
    _route_kernel[(t,)](scores, scores if hashed else bias.float().contiguous(),
                        tid2eid.contiguous() if hashed else scores, ids.contiguous() if hashed else scores,
                        weights, experts, n, route_scale, K=k, KP=triton.next_power_of_2(k),
                        EP=triton.next_power_of_2(n), FUNC=ROUTE_FUNCS[score_func], HASH=hashed, num_warps=4)
    return weights, experts


# The few-token MoE (decode): (BN, BK, warps, stages) of its up and down kernels (`python bench.py
# moe-tiles`); how many assignments it takes is ops.Ops.MOE_GEMV_MAX_ASSIGNMENTS' choice.
MOE_GEMV_TILES = (32, 128, 4, 3)


def moe_gemv_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None,
                    shared_w2=None, out_dtype=torch.float32):
    """The routed experts for few tokens in three launches, no sorting and no host sync: each
    assignment's expert is read by its own programs (up, then down into one row of partial sums a
    assignment), then each token's rows are summed. Arguments as moe_experts_triton; with shared_gu
    [T, 2 Is] (x times the shared expert's [W1; W3]^T, in x's dtype) and shared_w2 [D, Is] the shared
    expert is added in. Returns out_dtype [T, D]."""
    n_local, two_i, dim = w13.shape
    inter = two_i // 2
    t, k = experts.shape
    x, experts, weights = x.contiguous(), experts.contiguous(), weights.float().contiguous()
    shared = shared_gu is not None
    gu = shared_gu.contiguous() if shared else x
    ws = shared_w2.contiguous() if shared else w2
    inter_s = gu.size(1) // 2 if shared else 0
    rows = t * k + (t if shared else 0)
    precision = _precision(x)
    bn, bk, warps, stages = MOE_GEMV_TILES
    h = torch.empty(rows, max(inter, inter_s), dtype=x.dtype, device=x.device)
    _moe_gemv_up_kernel[(rows, triton.cdiv(max(inter, inter_s), bn))](
        x, w13, gu, h, experts, weights, first_expert, n_local, t * k, k, dim, inter, inter_s, swiglu_limit,
        x.stride(0), w13.stride(0), w13.stride(1), gu.stride(0), h.stride(0),
        BN=bn, BK=bk, CLAMP=swiglu_limit > 0, PRECISION=precision, num_warps=warps, num_stages=stages)
    part = torch.empty(rows, dim, dtype=torch.float32, device=x.device)
    _moe_gemv_down_kernel[(rows, triton.cdiv(dim, bn))](
        h, w2, ws, part, experts, first_expert, n_local, t * k, dim, inter, inter_s,
        h.stride(0), w2.stride(0), w2.stride(1), ws.stride(0), part.stride(0),
        BN=bn, BK=bk, PRECISION=precision, num_warps=warps, num_stages=stages)
    return moe_gemv_sum(part, k, 1, shared, out_dtype)


MOE_GEMV_SUM_BLOCK = 256


def moe_gemv_sum(part: torch.Tensor, k: int, split: int, shared: bool, out_dtype) -> torch.Tensor:
    """The few-token MoE's last launch: part [split, R, D] float32 (or [R, D] when split is 1), rows
    0 .. T k - 1 the assignments of T tokens (k each), then with shared one row a token of the shared
    expert -> out_dtype [T, D], each token's rows summed over the slices."""
    rows, dim = part.shape[-2:]
    t = rows // (k + shared)
    out = torch.empty(t, dim, dtype=out_dtype, device=part.device)
    _moe_gemv_sum_kernel[(t, triton.cdiv(dim, MOE_GEMV_SUM_BLOCK))](
        part, out, t * k, k, dim, split, rows, part.stride(-2), out.stride(0),
        RP=triton.next_power_of_2(split * (k + shared)), BLOCK=MOE_GEMV_SUM_BLOCK, SHARED=shared, num_warps=4)
    return out


def decode_indices_triton(pos, window: int, n_entries: int, ratio: int, picks=None):
    """Triton version of decode_indices_torch: one launch."""
    if picks is not None:
        picks = picks.contiguous()
        n_entries = picks.size(1)
    n_entries = n_entries if ratio else 0
    out = torch.empty(pos.size(0), window + n_entries, dtype=torch.long, device=pos.device)
    block = 256
    _decode_indices_kernel[(pos.size(0), triton.cdiv(out.size(1), block))](
        pos.contiguous(), pos if picks is None else picks, out, window, n_entries, max(ratio, 1),
        0 if picks is None else picks.stride(0), out.stride(0), BLOCK=block, PICKS=picks is not None, num_warps=4)
    return out


# ---------------------------------------------------------------- DeepSeek-V3/R1: absorbed MLA decode

if triton is not None:
    @triton.jit
    def _mla_decode_kernel(q_ptr, qpe_ptr, kv_ptr, pe_ptr, pos_ptr, part_ptr, stat_ptr, H, positions_per_split,
                           scale, sq_b, sq_h, sqp_b, sqp_h, skv_b, skv_t, spe_b, spe_t,
                           C: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # One program: row b, heads hb*BLOCK_H.., positions [sp*positions_per_split, next split) cut at
        # pos[b]. Online softmax over blocks of BLOCK_N positions; writes the unnormalised sum
        # part[b, sp, head, :] and (running max, denominator) to stat[b, sp, head, :]. A share wholly
        # after pos[b] writes max -inf, denominator 0 and a zero sum.
        b, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_splits = tl.num_programs(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        ch, rh = tl.arange(0, BC), tl.arange(0, BR)
        live = heads < H
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + ch[None, :],
                    mask=live[:, None] & (ch[None, :] < C), other=0.0)                  # [BH, BC]
        qp = tl.load(qpe_ptr + b * sqp_b + heads[:, None] * sqp_h + rh[None, :],
                     mask=live[:, None] & (rh[None, :] < R), other=0.0)                 # [BH, BR]
        end = tl.load(pos_ptr + b).to(tl.int32) + 1
        first = sp * positions_per_split
        last = tl.minimum(first + positions_per_split, end)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BC], tl.float32)
        for start in range(first, last, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            seen = t < last
            kv = tl.load(kv_ptr + b * skv_b + t[:, None] * skv_t + ch[None, :],
                         mask=seen[:, None] & (ch[None, :] < C), other=0.0)             # [BN, BC]
            pe = tl.load(pe_ptr + b * spe_b + t[:, None] * spe_t + rh[None, :],
                         mask=seen[:, None] & (rh[None, :] < R), other=0.0)             # [BN, BR]
            s = tl.dot(q, tl.trans(kv), input_precision=PRECISION)
            s = tl.dot(qp, tl.trans(pe), s, input_precision=PRECISION)
            s = tl.where(seen[None, :], s * scale, float("-inf"))                        # [BH, BN]
            m, den, acc = _softmax_block(s, kv, m, den, acc, PRECISION)
        row = (b * n_splits + sp) * H + heads
        tl.store(part_ptr + row[:, None] * C + ch[None, :], acc, mask=live[:, None] & (ch[None, :] < C))
        tl.store(stat_ptr + row * 2, m, mask=live)
        tl.store(stat_ptr + row * 2 + 1, den, mask=live)


MLA_BLOCK_H = 16
MLA_TILES = (64, 8, 3)        # BLOCK_N positions a step, warps, pipeline stages (best of 4 on an H100)
# float32 caches: R1's 512-wide latents in 3 stages of 64 positions need 336 KB of shared memory, more
# than an H100 has (232 KB; seen there), so fewer positions a step and no pipelining.
MLA_TILES_FP32 = (32, 8, 1)


def mla_splits(b: int, h: int, positions: int, device: torch.device, block_n: int) -> int:
    """How many shares the cache positions are cut into: enough programs for about two per
    multiprocessor, no share under 4 blocks of positions. Shapes only, so a captured graph keeps it."""
    programs = b * triton.cdiv(h, MLA_BLOCK_H)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(positions, 4 * block_n)))


def mla_decode_triton(q_lat, q_pe, kv_cache, pe_cache, pos, scale: float, splits=None, tiles=None) -> torch.Tensor:
    """Triton version of ops.mla_decode_torch (DeepSeek-V3/R1's absorbed multi-head latent attention for
    one token per row): one launch, each program one row, BLOCK_H heads and one share of the cache
    positions, then a merge of the shares (torch, no host sync)."""
    b, h, c = q_lat.shape
    r, positions = q_pe.size(-1), kv_cache.size(1)
    if kv_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("mla_decode_triton: caches need unit stride in their last dim")
    block_n, warps, stages = tiles or (MLA_TILES if kv_cache.element_size() == 2 else MLA_TILES_FP32)
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    splits = splits or mla_splits(b, h, positions, q_lat.device, block_n)
    per_split = triton.cdiv(triton.cdiv(positions, splits), block_n) * block_n
    splits = triton.cdiv(positions, per_split)
    part = torch.empty(b, splits, h, c, dtype=torch.float32, device=q_lat.device)
    stat = torch.empty(b, splits, h, 2, dtype=torch.float32, device=q_lat.device)
    grid = (b, triton.cdiv(h, MLA_BLOCK_H), splits)
    _mla_decode_kernel[grid](q_lat, q_pe, kv_cache, pe_cache, pos, part, stat, h, per_split, scale,
                             q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
                             kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
                             C=c, R=r, BC=triton.next_power_of_2(c), BR=triton.next_power_of_2(r),
                             BLOCK_H=MLA_BLOCK_H, BLOCK_N=block_n, PRECISION=_precision(kv_cache),
                             num_warps=warps, num_stages=stages)
    m, den = stat.unbind(-1)                                      # [b, splits, h]; share 0 always sees position 0
    weight = torch.exp(m - m.amax(dim=1, keepdim=True))           # 0 for the empty shares (max -inf)
    return (part * weight.unsqueeze(-1)).sum(dim=1) / (den * weight).sum(dim=1).unsqueeze(-1)
