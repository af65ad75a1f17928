"""DeepSeek-V3 / R1 multi-head latent attention for one new token per row (decode), on the absorbed
path: every head's query meets the cached latents directly.

  mla_decode_torch    the reference: whole cache, keys after each row's position masked
  mla_decode_triton   one kernel over the latent cache; each program takes one row, BLOCK_H heads
                      (they share the keys) and one share of the positions (split over the cache so
                      that a few rows still fill the GPU); the shares' partial softmax sums are merged
                      after. Positions are read on the device: no host sync, static shapes (CUDA graphs)
  mla_decode          the choice between them (kernel.use_triton)

Shapes: b rows, h heads, c kv_lora_rank, r qk_rope_head_dim, B >= b cache rows, S cache positions.
"""
import torch

from kernel import _precision, triton, use_triton

if triton is not None:
    import triton.language as tl


def mla_decode_torch(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                     pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q_lat [b, h, c] (q_nope through wkv_b's key part), q_pe [b, h, r] (rotated), kv_cache [B, S, c]
    (normalised latents), pe_cache [B, S, r] (rotated shared keys), pos [b] (row i sees positions
    0 .. pos[i]) -> the attention-weighted latents [b, h, c], float32.

    Products are summed in float32 (as tl.dot does); the probabilities, a float32 softmax, are rounded
    to the cache dtype before they weigh the latents, as DeepSeek's code rounds them to the model's."""
    b = q_lat.size(0)
    kv, pe = kv_cache[:b].float(), pe_cache[:b].float()
    scores = torch.einsum("bhc,btc->bht", q_lat.float(), kv) + torch.einsum("bhr,btr->bht", q_pe.float(), pe)
    scores = scores * scale
    unseen = torch.arange(kv.size(1), device=kv.device) > pos.view(b, 1, 1)
    probs = scores.masked_fill(unseen, float("-inf")).softmax(dim=-1).to(kv_cache.dtype).float()
    return torch.einsum("bht,btc->bhc", probs, kv)


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
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
            m = m_new
        row = (b * n_splits + sp) * H + heads
        tl.store(part_ptr + row[:, None] * C + ch[None, :], acc, mask=live[:, None] & (ch[None, :] < C))
        tl.store(stat_ptr + row * 2, m, mask=live)
        tl.store(stat_ptr + row * 2 + 1, den, mask=live)


MLA_BLOCK_H = 16
MLA_TILES = (64, 8, 3)        # BLOCK_N positions a step, warps, pipeline stages (best of 4 on an H100)


def mla_splits(b: int, h: int, positions: int, device: torch.device, block_n: int) -> int:
    """How many shares the cache positions are cut into: enough programs for about two per
    multiprocessor, no share under 4 blocks of positions. Shapes only, so a captured graph keeps it."""
    programs = b * triton.cdiv(h, MLA_BLOCK_H)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(positions, 4 * block_n)))


def mla_decode_triton(q_lat, q_pe, kv_cache, pe_cache, pos, scale: float, splits=None, tiles=None) -> torch.Tensor:
    """mla_decode_torch in one launch plus a merge of the shares (torch, no host sync)."""
    b, h, c = q_lat.shape
    r, positions = q_pe.size(-1), kv_cache.size(1)
    if kv_cache.stride(-1) != 1 or pe_cache.stride(-1) != 1:
        raise ValueError("mla_decode_triton: caches need unit stride in their last dim")
    block_n, warps, stages = tiles or MLA_TILES
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


def mla_decode(q_lat, q_pe, kv_cache, pe_cache, pos, scale: float, backend: str = "auto") -> torch.Tensor:
    """The attention-weighted latents [b, h, c] float32 of one token per row (mla_decode_torch)."""
    if use_triton(q_lat, backend):
        return mla_decode_triton(q_lat, q_pe, kv_cache, pe_cache, pos, scale)
    return mla_decode_torch(q_lat, q_pe, kv_cache, pe_cache, pos, scale)
