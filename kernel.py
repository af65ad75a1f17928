"""Operators of the DeepSeek-V4 model beyond plain torch.

Every op here has a pure-PyTorch version that runs on CPU and GPU; it is the
reference that faster (Triton) versions are tested against.

Shapes use: b batch, s query tokens, h heads, d head dim, n key slots,
k selected keys per query.
"""
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
    s = scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out_f, :in_f]
    return (weight.float() * s).to(dtype)


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight [out, in/2] int8 (two e2m1 codes a byte, low nibble = even column),
    scale [out, in/32] ue8m0 -> [out, in] dtype, exactly."""
    out_f, half = weight.shape
    in_f = 2 * half
    if in_f % FP4_BLOCK or tuple(scale.shape) != (out_f, in_f // FP4_BLOCK):
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}, expected {(out_f, in_f // FP4_BLOCK)} "
                         f"for a packed weight of shape {(out_f, half)}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
    byte = weight.view(torch.uint8).long()
    codes = torch.stack([byte & 0xF, byte >> 4], dim=-1).flatten(1)  # [out, in]
    return (table[codes] * scale.float().repeat_interleave(FP4_BLOCK, 1)).to(dtype)


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


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor,
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
    y = x.float()
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last dim of x (pairs 2i, 2i+1 as complex numbers).

    x [b, s, (h,) r]; freqs_cis [s, r/2] complex (or [b, s, r/2]). Returns a new tensor.
    """
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    f = freqs_cis.conj() if inverse else freqs_cis
    if f.dim() == 2:
        f = f.unsqueeze(0)
    if z.dim() == 4:
        f = f.unsqueeze(2)
    return torch.view_as_real(z * f).flatten(-2).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up in float32, with the V4 clamp when limit > 0 (gate from above, up both ways)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up
