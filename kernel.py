"""Operators of the DeepSeek-V4 model beyond plain torch.

Every op here has a pure-PyTorch version that runs on CPU and GPU; it is the
reference that faster (Triton) versions are tested against.

Shapes use: b batch, s query tokens, h heads, d head dim, n key slots,
k selected keys per query.
"""
import functools

import torch
import torch.nn.functional as F

FP8_BLOCK = 128  # FP8 e4m3 weights: one ue8m0 scale per 128x128 block
FP4_BLOCK = 32   # MXFP4 experts: one ue8m0 scale per 32 inputs of a row

# The 16 values of an e2m1 code: bit 3 is the sign, bits 0-2 index the magnitude.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight [out, in] float8_e4m3fn, scale [ceil(out/128), ceil(in/128)] ue8m0 -> [out, in] dtype.

    An e4m3 value times a power of two is exact in float32 and in bf16, so the result is exact.
    """
    out_f, in_f = weight.shape
    rows, cols = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    if tuple(scale.shape) != (rows, cols):
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}, expected {(rows, cols)} "
                         f"for a weight of shape {(out_f, in_f)}")
    w = weight.to(dtype)                                   # exact: e4m3 fits in bf16 and float32
    s = scale.to(dtype).repeat_interleave(FP8_BLOCK, 0)[:out_f]                    # [out, cols]
    if in_f % FP8_BLOCK:
        return w * s.repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (w.view(out_f, cols, FP8_BLOCK) * s.unsqueeze(-1)).view(out_f, in_f)


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight [out, in/2] int8 (two e2m1 codes a byte, low nibble = even column),
    scale [out, in/32] ue8m0 -> [out, in] dtype, exactly."""
    out_f, half = weight.shape
    in_f = 2 * half
    if in_f % FP4_BLOCK or tuple(scale.shape) != (out_f, in_f // FP4_BLOCK):
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}, expected {(out_f, in_f // FP4_BLOCK)} "
                         f"for a packed weight of shape {(out_f, half)}")
    values = torch.tensor(E2M1_VALUES, dtype=dtype, device=weight.device)
    byte = torch.arange(256, device=weight.device)
    pairs = torch.stack([values[byte & 0xF], values[byte >> 4]], dim=-1)          # [256, 2]: a byte's two values
    w = pairs[weight.view(torch.uint8).int()]                                      # [out, in/2, 2]
    return (w.view(out_f, -1, FP4_BLOCK) * scale.to(dtype).unsqueeze(-1)).view(out_f, in_f)


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x @ H * scale along the last dim, H the Sylvester Hadamard matrix; size a power of two."""
    n = x.size(-1)
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    shape, dtype = x.shape, x.dtype
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.reshape(shape) * scale).to(dtype)


def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                      hc_mult: int, iters: int, eps: float):
    """Split the hyper-connection mixes into pre [.., hc], post [.., hc] and comb [.., hc, hc].

    pre and post are sigmoid gates; comb is projected towards a doubly stochastic matrix by
    Sinkhorn-Knopp: a row softmax, then alternating column and row normalisation.
    """
    hc = hc_mult
    m = mixes.float()
    base = hc_base.float()
    pre = torch.sigmoid(m[..., :hc] * hc_scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(m[..., hc:2 * hc] * hc_scale[1] + base[hc:2 * hc])
    logits = m[..., 2 * hc:].unflatten(-1, (hc, hc)) * hc_scale[2] + base[2 * hc:].view(hc, hc)
    comb = logits.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def sparse_attn_torch(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor,
                      topk_idxs: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Attention of each query over its own selected keys, with a per-head sink.

    q [b, s, h, d]; kv [b, n, d] (one shared head, keys equal values); attn_sink [h];
    topk_idxs [b, s, k] indices into n, -1 for an empty slot. Returns [b, s, h, d] in q's dtype.
    The sink adds exp(sink) to each softmax denominator and contributes no value.
    """
    valid = topk_idxs >= 0                                          # [b, s, k]
    idx = topk_idxs.clamp(min=0).long()
    b, s, k = idx.shape
    keys = torch.gather(kv.float(), 1, idx.view(b, s * k, 1).expand(-1, -1, kv.size(-1)))
    keys = keys.view(b, s, k, -1)                                   # [b, s, k, d]
    scores = torch.einsum("bshd,bskd->bshk", q.float(), keys) * softmax_scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    sink = attn_sink.float().view(1, 1, -1, 1).expand(b, s, -1, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("bshk,bskd->bshd", probs, keys).to(q.dtype)


def rms_norm(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, returned in x's dtype; weight None means unweighted."""
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.size(-1),), w, eps).to(x.dtype)   # one fused kernel on CUDA


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last dim of x: each pair (2i, 2i+1) turned by its angle.

    x [b, s, (h,) r]; freqs [s, r/2] complex, or its view_as_real [s, r/2, 2] (cos, sin) (or with a
    leading b). Real arithmetic only, so that operator libraries without complex kernels run it.
    Returns a new tensor in x's dtype.
    """
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)
    if freqs.dim() == 3:
        freqs = freqs.unsqueeze(0)
    if x.dim() == 4:
        freqs = freqs.unsqueeze(2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    if inverse:
        sin = -sin
    pair = x.float().unflatten(-1, (-1, 2))
    a, b = pair[..., 0], pair[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up in float32, with the V4 clamp when limit > 0 (gate from above, up both ways)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


# ---------------------------------------------------------------- Triton versions (CUDA)

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: the torch versions above serve
    triton = None


BACKENDS = ("auto", "torch", "triton", "flaggems")


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """backend 'torch' | 'triton' | 'auto' (Triton on CUDA when it is installed) | 'flaggems'
    (FlagGems' fused kernels where they fit, our Triton kernels for the rest)."""
    if backend in ("triton", "flaggems"):
        if triton is None or not x.is_cuda:
            raise RuntimeError(f"backend {backend!r} needs a CUDA device and the triton package")
        return True
    return backend == "auto" and triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, S, H, K, scale,
                            sq_b, sq_s, sq_h, skv_b, skv_n, si_b, si_s, so_b, so_s, so_h,
                            D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
        # One program: one query token, BLOCK_H heads (they share the keys), online softmax over the
        # selected keys in blocks of BLOCK_K; the sink starts the running max and denominator.
        pid, hb = tl.program_id(0), tl.program_id(1)
        b, s = pid // S, pid % S
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + dims[None, :], mask=hmask[:, None], other=0.0)
        m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
        denom = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            slots = k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + b * si_b + s * si_s + slots, mask=slots < K, other=-1)
            valid = idx >= 0
            kv = tl.load(kv_ptr + b * skv_b + idx[:, None].to(tl.int64) * skv_n + dims[None, :],
                         mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
            m = m_new
        out = acc / denom[:, None]
        tl.store(o_ptr + b * so_b + s * so_s + heads[:, None] * so_h + dims[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])

    @triton.jit
    def _moe_up_kernel(x_ptr, w_ptr, h_ptr, token_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                       D, I, limit, sx, sw_e, sw_n, sh,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CLAMP: tl.constexpr,
                       PRECISION: tl.constexpr):
        # h[r] = weight[r] * silu(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T) for the rows r of one tile,
        # all routed to expert e; W13[e] = [W1; W3] is [2I, D].
        tile, nb = tl.program_id(0), tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= 0:
            start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
            rows = start + tl.arange(0, BM)
            rmask = rows < end
            tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
            cols = nb * BN + tl.arange(0, BN)
            cmask = cols < I
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
        tile, nb = tl.program_id(0), tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= 0:
            start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
            rows = start + tl.arange(0, BM)
            rmask = rows < end
            cols = nb * BN + tl.arange(0, BN)
            cmask = cols < D
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
    def _hc_split_kernel(m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, N, iters, eps,
                         HC: tl.constexpr, BLOCK: tl.constexpr):
        # BLOCK tokens a program; a row of mixes is [pre: HC | post: HC | comb: HC x HC]. The HC x HC
        # Sinkhorn iterations stay in registers: one launch instead of ~4 small ones per iteration.
        W: tl.constexpr = (2 + HC) * HC
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        j = tl.arange(0, HC)
        s_pre, s_post, s_comb = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
        m = tl.load(m_ptr + rows[:, None] * W + j[None, :], mask=rmask[:, None], other=0.0)
        pre = tl.sigmoid(m * s_pre + tl.load(base_ptr + j)[None, :]) + eps
        tl.store(pre_ptr + rows[:, None] * HC + j[None, :], pre, mask=rmask[:, None])
        m = tl.load(m_ptr + rows[:, None] * W + HC + j[None, :], mask=rmask[:, None], other=0.0)
        post = 2.0 * tl.sigmoid(m * s_post + tl.load(base_ptr + HC + j)[None, :])
        tl.store(post_ptr + rows[:, None] * HC + j[None, :], post, mask=rmask[:, None])
        cell = j[:, None] * HC + j[None, :]                                      # [HC, HC]
        logits = tl.load(m_ptr + rows[:, None, None] * W + 2 * HC + cell[None, :, :], mask=rmask[:, None, None],
                         other=0.0) * s_comb + tl.load(base_ptr + 2 * HC + cell)[None, :, :]
        e = tl.exp(logits - tl.max(logits, 2)[:, :, None])
        comb = e / tl.sum(e, 2)[:, :, None] + eps
        comb = comb / (tl.sum(comb, 1)[:, None, :] + eps)
        for _ in range(iters - 1):
            comb = comb / (tl.sum(comb, 2)[:, :, None] + eps)
            comb = comb / (tl.sum(comb, 1)[:, None, :] + eps)
        tl.store(comb_ptr + rows[:, None, None] * (HC * HC) + cell[None, :, :], comb, mask=rmask[:, None, None])


def hc_split_sinkhorn_triton(mixes, hc_scale, hc_base, hc_mult: int, iters: int, eps: float):
    """Triton version of hc_split_sinkhorn (same arguments and results, float32)."""
    lead = mixes.shape[:-1]
    m = mixes.reshape(-1, mixes.size(-1)).float().contiguous()
    n = m.size(0)
    pre = torch.empty(n, hc_mult, dtype=torch.float32, device=m.device)
    post = torch.empty_like(pre)
    comb = torch.empty(n, hc_mult, hc_mult, dtype=torch.float32, device=m.device)
    block = 32
    _hc_split_kernel[(triton.cdiv(n, block),)](
        m, hc_scale.float().contiguous(), hc_base.float().contiguous(), pre, post, comb, n, iters, eps,
        HC=hc_mult, BLOCK=block, num_warps=4)
    return pre.view(*lead, hc_mult), post.view(*lead, hc_mult), comb.view(*lead, hc_mult, hc_mult)


def sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale):
    """Triton version of sparse_attn (same arguments and result)."""
    b, s, h, d = q.shape
    q, kv, topk_idxs = q.contiguous(), kv.contiguous(), topk_idxs.contiguous()
    o = torch.empty_like(q)
    block_h = 16
    grid = (b * s, triton.cdiv(h, block_h))
    _sparse_attn_kernel[grid](
        q, kv, attn_sink.float().contiguous(), topk_idxs, o, s, h, topk_idxs.size(-1), softmax_scale,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), topk_idxs.stride(0), topk_idxs.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        D=d, BLOCK_H=block_h, BLOCK_K=32 if d <= 128 else 16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return o


def moe_schedule(experts: torch.Tensor, n_experts: int, block_m: int):
    """Sort routing assignments by expert on the device, with no host sync.

    experts [A] local expert of each assignment (n_experts for one this rank does not hold).
    Returns order [A] (assignments sorted by expert) and, for a fixed number of tiles
    (ceil(A / block_m) + n_experts), each tile's expert (-1 when unused) and its row range in order.
    """
    order = torch.argsort(experts, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    counts = counts[:n_experts]
    seg_end = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end_cum = torch.cumsum(tiles, 0)
    n_tiles = -(-experts.numel() // block_m) + n_experts
    tile = torch.arange(n_tiles, device=experts.device)
    expert = torch.searchsorted(tile_end_cum, tile, right=True)
    used = expert < n_experts
    e = expert.clamp(max=n_experts - 1)
    start = seg_end[e] - counts[e] + (tile - (tile_end_cum[e] - tiles[e])) * block_m
    return order, torch.where(used, e, -1), start, seg_end[e]


def moe_experts_triton(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float):
    """Routed experts as two grouped GEMMs over assignments sorted by expert.

    x [T, D]; w13 [E, 2I, D] (w1 rows then w3 rows of each local expert); w2 [E, D, I];
    weights, experts [T, k] (global expert ids; those outside first_expert .. +E are skipped).
    Returns float32 [T, D]: sum over the local experts of weight * expert(x).
    """
    n_local, two_i, dim = w13.shape
    inter = two_i // 2
    t, k = experts.shape
    local = experts.flatten() - first_expert
    local = torch.where((local >= 0) & (local < n_local), local, n_local)
    block_m = 16 if t * k <= 512 else 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    order, tile_expert, tile_start, tile_end = moe_schedule(local, n_local, block_m)
    token = order // k
    w_sorted = weights.flatten()[order].float()
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    n_tiles = tile_expert.numel()
    x = x.contiguous()
    _moe_up_kernel[(n_tiles, triton.cdiv(inter, 64))](
        x, w13, h, token, w_sorted, tile_expert, tile_start, tile_end, dim, inter, swiglu_limit,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BM=block_m, BN=64, BK=64, CLAMP=swiglu_limit > 0, PRECISION=precision, num_warps=4, num_stages=3)
    out = torch.zeros(t * k, dim, dtype=torch.float32, device=x.device)
    _moe_down_kernel[(n_tiles, triton.cdiv(dim, 64))](
        h, w2, out, order, tile_expert, tile_start, tile_end, dim, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BM=block_m, BN=64, BK=64, PRECISION=precision, num_warps=4, num_stages=3)
    return out.view(t, k, dim).sum(1)


# ---------------------------------------------------------------- FlagGems versions (CUDA)
#
# FlagGems (the flag-gems package, FlagOS' Triton operator library) has fused kernels for three of
# our operators. Importing flag_gems raises without a visible GPU, so it is imported on first use.
# What differs from ours, and how the adapters below handle it:
#   flag_gems.sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale): same arguments and
#     layout as sparse_attn, but it is written for bf16 (P is cast to bf16 for the P.V product and
#     the output is rounded to bf16), the head count is a tl.arange bound (a power of two, and at
#     least 16 for tl.dot), and the sink is added after the keys (the same softmax as ours, but a
#     query with no valid key at all would give NaN where ours gives 0; our model always has the
#     query's own window slot). Adapter: bf16 only (fp32 goes to our Triton kernel), heads padded
#     with zero queries to a power of two >= 16 and cut off again, indices passed as int32 (its
#     documented type; ours are int64).
#   flag_gems.hadamard_transform(x, scale): F.linear(x, H) * scale with H the Sylvester matrix,
#     result in x's dtype: the same as hadamard_transform here.
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
        raise RuntimeError("backend 'flaggems' needs the flag_gems package: "
                           "pip install --no-deps flag-gems==5.0.2 && pip install PyYAML sqlalchemy packaging "
                           "typing_extensions (see README)") from None
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
    o = flag_gems_module().sparse_attn_triton(q.contiguous(), kv, sink.contiguous(),
                                              topk_idxs.to(torch.int32).contiguous(), softmax_scale)
    return o[:, :, :h] if heads != h else o


def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale, backend: str = "auto"):
    """Attention of each query over its selected keys with a per-head sink: q [b, s, h, d],
    kv [b, n, d], attn_sink [h], topk_idxs [b, s, k] (-1 = empty slot) -> [b, s, h, d]."""
    if use_triton(q, backend):
        if backend == "flaggems":
            return sparse_attn_flaggems(q, kv, attn_sink, topk_idxs, softmax_scale)
        return sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale)
    return sparse_attn_torch(q, kv, attn_sink, topk_idxs, softmax_scale)


def hadamard(x: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """hadamard_transform, through FlagGems' kernel with backend 'flaggems' (on CUDA)."""
    if backend == "flaggems" and use_triton(x, backend):
        return flag_gems_module().hadamard_transform(x, scale)
    return hadamard_transform(x, scale)


def hc_split(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int, iters: int,
             eps: float, backend: str = "auto"):
    """hc_split_sinkhorn: our Triton kernel on CUDA, FlagGems' fused kernel with backend 'flaggems'."""
    if use_triton(mixes, backend):
        if backend == "flaggems":
            fused = flag_gems_module().fused.mhc.hc_split_sinkhorn
            return fused(mixes.float(), hc_scale.float().contiguous(), hc_base.float().contiguous(), hc_mult,
                         iters, eps)
        return hc_split_sinkhorn_triton(mixes, hc_scale, hc_base, hc_mult, iters, eps)
    return hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, iters, eps)
