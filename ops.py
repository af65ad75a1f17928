"""The operators of the models beyond plain torch, and the one place that picks how each one runs.

Every operator has a pure-PyTorch version here (`<op>_torch`, or the plain name where there is no
other version), which runs on CPU and GPU and is the reference the faster versions are tested
against: our Triton kernels (kernel.py; kernel_lowp.py for weights kept as the release stores them,
FP8 or MXFP4; kernel_humming.py for MXFP4 experts through humming-kernels, opt-in) and FlagGems'
fused kernels (flaggems.py). An `Ops` object
is that choice, made once for a model from the backend name and the device; every module of the
model holds the same object, so switching a built model to another backend is one call,
`model.ops.use(name, device)`.

Shapes use: b batch, s query tokens, h heads, d head dim, n key slots, k selected keys per query.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

import flaggems
import kernel
import kernel_humming
import kernel_lowp
from quant import act_quant_fp8, dequant_act_fp8, dequant_fp4, dequant_fp8

BACKENDS = ("auto", "torch", "triton", "flaggems")
# MXFP4 routed experts on a GPU: kernel_lowp's (None), or humming-kernels' taking bf16 activations
# (USE_HUMMING=1) or FP8 ones (USE_HUMMING=fp8, DeepSeek's numerics): name -> kernel_humming.INPUTS key.
EXPERT_KERNELS = {"triton": None, "humming": "bf16", "humming-fp8": "fp8"}
LOWP_ACTIVATIONS = (torch.bfloat16, torch.float32)    # what kernel_lowp's kernels take with their weights


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


def rms_norm_torch(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
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


def norm_rope_torch(x: torch.Tensor, freqs: torch.Tensor, rope_dim: int, eps=None, weight=None,
                    inverse: bool = False) -> torch.Tensor:
    """RMSNorm over x's last dim when eps is given (weight None: unweighted), then RoPE on its last
    rope_dim channels, the others kept. x [b, s, (h,) d]; freqs as for apply_rotary."""
    if eps is not None:
        x = rms_norm_torch(x, weight, eps)
    return torch.cat([x[..., :-rope_dim], apply_rotary(x[..., -rope_dim:], freqs, inverse)], dim=-1)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Hyper-connection mixes: the flattened streams x [.., hc, D], RMS-normalised, times fn^T [mix, hc*D]."""
    flat = x.flatten(-2).float()
    return F.linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def hc_pre_torch(x, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float, hc_eps: float,
                 norm_weight=None, split=hc_split_sinkhorn):
    """Enter a sublayer: x [.., hc, D] streams -> (input [.., D] in x's dtype, post [.., hc], comb [.., hc, hc]),
    the input being the streams weighted by `pre`, then RMS-normalised with norm_weight when it is given
    (the sublayer's input norm). split: hc_split_sinkhorn or a version of it.

    fn [hc, hc * D] (hc_mult rows) is the HC head instead: y = sum_k (sigmoid(mix_k * scale[0] + base_k)
    + hc_eps) x_k, the same pre gate with no post and comb (returned as None)."""
    mixes = hc_mixes(x, fn, norm_eps)
    if fn.size(0) == hc_mult:
        pre, post, comb = torch.sigmoid(mixes * hc_scale[0] + hc_base) + hc_eps, None, None
    else:
        pre, post, comb = split(mixes, hc_scale, hc_base, hc_mult, iters, hc_eps)
    y = (pre.unsqueeze(-1) * x.to(pre.dtype)).sum(dim=-2).to(x.dtype)
    return (y if norm_weight is None else rms_norm_torch(y, norm_weight, norm_eps)), post, comb


def hc_post_torch(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Leave a sublayer: stream k of the result = post[k] * f + sum_j comb[j, k] * residual[j].
    f [.., D], residual [.., hc, D] -> [.., hc, D] in f's dtype."""
    y = post.unsqueeze(-1) * f.to(comb.dtype).unsqueeze(-2) + torch.einsum("...jk,...jd->...kd", comb,
                                                                            residual.to(comb.dtype))
    return y.to(f.dtype)


def index_scores_torch(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, limit: torch.Tensor,
                       scale: float = 1.0) -> torch.Tensor:
    """Lightning Indexer scores sum_h (scale * weights[h]) * relu(q[h] . key) in float32, -inf for the
    entries a query may not see yet (index >= limit).

    q [b, s, h, d], keys [b, n, d], weights [b, s, h], limit [b or 1, s] -> [b, s, n]. Eight heads
    at a time bound the [b, s, 8, n] temporary."""
    b, s, h, _ = q.shape
    weights = weights.float() * scale
    scores = torch.zeros(b, s, keys.size(1), device=q.device)
    for h0 in range(0, h, 8):
        part = torch.einsum("bshd,bnd->bshn", q[:, :, h0:h0 + 8].float(), keys.float()).relu_()
        scores += (part * weights[:, :, h0:h0 + 8].float().unsqueeze(-1)).sum(dim=2)
    entry = torch.arange(keys.size(1), device=q.device)
    return scores.masked_fill(entry >= limit.unsqueeze(-1), float("-inf"))


def route_torch(scores: torch.Tensor, bias, tid2eid, ids: torch.Tensor, k: int, score_func: str,
                route_scale: float):
    """MoE routing from the gate's float32 logits scores [T, E]: the experts' scores (softmax, sigmoid
    or sqrt(softplus)); the k experts of each token, fixed by tid2eid[ids] [T, k] on hash layers (bias
    None), else the top k of score + bias; their scores as weights, normalised to sum 1 (not after a
    softmax), times route_scale. -> weights [T, k] float32, experts [T, k] int64."""
    if score_func == "softmax":
        scores = scores.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = scores.sigmoid()
    else:
        scores = F.softplus(scores).sqrt()
    if tid2eid is not None:
        experts = tid2eid[ids].long()
    else:
        experts = (scores + bias).topk(k, dim=-1).indices
    weights = scores.gather(1, experts)
    if score_func != "softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, experts


def topk_torch(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [.., k] of the k largest scores [.., n] along the last dim, in no particular order
    (all n of them when n <= k).

    torch.topk gives a row to one thread block: an H100 took 85 us for one row of 16640 (the indexer's
    scores at a 64K context). A long row (n >= 8k) goes in two rounds instead: the top k of each chunk
    of about sqrt(n k) entries, many blocks at once, then the top k of those candidates. Both rounds
    keep the same set (ties aside); padding entries are -inf, so they come back only when fewer than
    k entries are finite, as -inf entries do from a single round."""
    n = scores.size(-1)
    if n < 8 * k:
        return scores.topk(min(k, n), dim=-1, sorted=False).indices
    chunk = max(2 * k, 1 << math.ceil(math.log2(math.sqrt(n * k))))
    n_chunks = -(-n // chunk)
    if n_chunks * chunk != n:
        scores = F.pad(scores, (0, n_chunks * chunk - n), value=float("-inf"))
    values, idx = scores.unflatten(-1, (n_chunks, chunk)).topk(k, dim=-1, sorted=False)       # [.., chunks, k]
    idx = idx + torch.arange(0, n_chunks * chunk, chunk, device=scores.device).unsqueeze(-1)
    best = values.flatten(-2).topk(k, dim=-1, sorted=False).indices
    return idx.flatten(-2).gather(-1, best)


def decode_indices_torch(pos: torch.Tensor, window: int, n_entries: int, ratio: int, picks=None) -> torch.Tensor:
    """The key slots each decode query attends in a layer's cache [window ring, compressed entries]:
    pos [b] -> [b, window + n_entries] (n_entries = picks' width when picks is given).

    Slot c < window holds position pos - (pos - c) % window, -1 while that is negative. Then the
    compressed entries, window + j: the indexer's picks [b, k] (CSA), or every entry (HCA); -1 for
    one the query may not see yet (j >= (pos + 1) // ratio) or a pick of -1."""
    slot = torch.arange(window, device=pos.device)
    ring = torch.where(pos.unsqueeze(1) - (pos.unsqueeze(1) - slot) % window >= 0, slot, -1)
    if not ratio:
        return ring
    entry = picks if picks is not None else torch.arange(n_entries, device=pos.device).expand(pos.size(0), -1)
    seen = (entry >= 0) & (entry < ((pos + 1) // ratio).unsqueeze(1))
    return torch.cat([ring, torch.where(seen, entry + window, -1)], dim=1)


def compressed_entries(kv: torch.Tensor, score: torch.Tensor, freqs: torch.Tensor, rope_dim: int, norm_weight,
                       eps: float, rotate_scale, dtype: torch.dtype, ops: "Ops") -> torch.Tensor:
    """Compressed KV entries: kv [.., slots, hd] pooled with softmax(score) over the slots, rounded to
    dtype, RMSNorm-ed, RoPE at the window's start (freqs), then, when rotate_scale is given, the
    Hadamard rotation of the indexer's keys."""
    entries = (kv * score.softmax(dim=-2)).sum(dim=-2).to(dtype)
    entries = ops.norm_rope(entries, freqs, rope_dim, eps, norm_weight)
    return entries if rotate_scale is None else ops.hadamard(entries, rotate_scale)


def compressor_decode_torch(kv_new, score_new, ape, pos, kv_state, score_state, prev_kv, prev_score,
                            norm_weight, eps: float, freqs_cis, rope_dim: int, rotate_scale, cache) -> None:
    """One token per row of a compressor (model.Compressor) with static shapes.

    kv_new, score_new [b, width] are this token's projections (score before the ape bias). They go
    to slot pos % ratio of kv_state / score_state [B, ratio, width]. A row whose token completes its
    window (pos % ratio == ratio - 1) writes that window's entry pos // ratio to cache [B, n_max, hd];
    the others leave the cache as it is (an entry is attended only once its window is complete).
    With prev_kv / prev_score [B, ratio, hd] (ratio 4, overlapping windows) the entry pools the
    previous window's first series with this window's second one, and a completed window becomes
    the previous one."""
    bsz, ratio = kv_new.size(0), kv_state.size(1)
    hd = cache.size(-1)
    rows, slot = torch.arange(bsz, device=kv_new.device), pos % ratio
    kv_state[rows, slot] = kv_new
    score_state[rows, slot] = score_new + ape[slot]
    kv, score = kv_state[:bsz], score_state[:bsz]                                  # [b, ratio, width]
    done = (slot == ratio - 1).view(-1, 1, 1)
    if prev_kv is not None:
        pooled_kv = torch.cat([prev_kv[:bsz], kv[..., hd:]], dim=1)                # [b, 2 * ratio, hd]
        pooled_score = torch.cat([prev_score[:bsz], score[..., hd:]], dim=1)
        prev_kv[:bsz] = torch.where(done, kv[..., :hd], prev_kv[:bsz])
        prev_score[:bsz] = torch.where(done, score[..., :hd], prev_score[:bsz])
        kv, score = pooled_kv, pooled_score
    entries = compressed_entries(kv.unsqueeze(1), score.unsqueeze(1), freqs_cis[(pos - slot).unsqueeze(1)],
                                 rope_dim, norm_weight, eps, rotate_scale, cache.dtype, Ops("torch"))   # [b, 1, hd]
    cache[rows, pos // ratio] = torch.where(done[:, 0], entries[:, 0], cache[rows, pos // ratio])


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


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] W^T as float32 sums of products of the values in the weight's dtype (as the reference,
    which upcasts both); on CUDA without a float32 copy of the weight."""
    if x.is_cuda:
        return torch.mm(x.to(weight.dtype), weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


def dequantised(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight as the release stores it -> [out, in] dtype: MXFP4 (int8 [out, in/2] with ue8m0 scales
    [out, in/32]) exactly; FP8 (float8_e4m3fn with block scales) as the product in float32 rounded to
    bf16 first, which is exact with a ue8m0 scale and, with R1's float32 scales, the value a BF16
    shard holds (quant.dequant_fp8)."""
    if weight.dtype == torch.int8:
        return dequant_fp4(weight, scale, dtype)
    return dequant_fp8(weight, scale, torch.bfloat16).to(dtype)


def linear_lowp_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x [..., K] W^T for a low-precision weight (FP8 [N, K] or MXFP4 [N, K/2], with its scale) ->
    [..., N] out_dtype (default x's): W dequantised to x's dtype, then the plain matmul; a float32
    result sums the products in float32."""
    w = dequantised(weight, scale, x.dtype)
    out_dtype = out_dtype or x.dtype
    if out_dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x, w).to(out_dtype)


def grouped_linear_lowp_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [b, s, g, d], weight [g * r, d] FP8 with its block scale -> [b, s, g, r] in x's dtype: group j
    of x times rows j*r .. (j+1)*r - 1 of W^T (V4's wo_a), as the BF16 weight's einsum."""
    g = x.size(2)
    return torch.einsum("bsgd,grd->bsgr", x, dequantised(weight, scale, x.dtype).view(g, -1, x.size(-1)))


def moe_lowp_torch(x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu=None,
                   shared_w2=None, out_dtype=torch.float32, fp8_activations: bool = False):
    """The routed experts of low-precision weights, one expert at a time (host syncs): x [T, D]; w13 =
    (weight, scale) of the stacked [w1; w3] (w1 in rows 0 .. I-1, w3 from row UP = rows / 2: MXFP4 int8
    [E, 2 UP, D/2] with ue8m0 [E, 2 UP, D/32], or FP8 [E, 2 UP, D] with block scales), w2 = (weight,
    scale) [E, D, I] alike (kernel_lowp.expert_weights); weights, experts [T, k] (global ids; those
    outside first_expert .. +E are skipped); shared_gu [T, 2 Is] and shared_w2 = (FP8 [D, Is], block
    scale) add the shared expert. As the BF16 kernels: gate and up in float32, h = weight * swiglu
    rounded to x's dtype, down in float32. Returns out_dtype [T, D].

    fp8_activations (USE_HUMMING=fp8, DeepSeek's numerics): each GEMM's input through
    quant.act_quant_fp8, and gate, up and each expert's output rounded to x's dtype."""
    (w13p, w13s), (w2p, w2s) = w13, w2
    n_local, up = w13p.size(0), w13p.size(1) // 2

    def gemm(a, w):                       # a [R, K] in x's dtype times w^T [K, N] in float32
        if fp8_activations:
            return (dequant_act_fp8(*act_quant_fp8(a), x.dtype).float() @ w.T).to(x.dtype).float()
        return a.float() @ w.T

    out = torch.zeros(x.size(0), w2p.size(1), dtype=torch.float32, device=x.device)
    for e in range(n_local):
        token, slot = torch.where(experts == first_expert + e)
        if token.numel():
            down = dequantised(w2p[e], w2s[e], x.dtype).float()
            inter = down.size(1)
            gu = gemm(x[token], dequantised(w13p[e], w13s[e], x.dtype).float())
            h = swiglu(gu[:, :inter], gu[:, up:up + inter], swiglu_limit) * weights[token, slot, None].float()
            out.index_add_(0, token, gemm(h.to(x.dtype), down))
    if shared_gu is not None:
        inter_s = shared_gu.size(1) // 2
        hs = swiglu(shared_gu[:, :inter_s], shared_gu[:, inter_s:], 0.0).to(x.dtype)
        out += linear_lowp_torch(hs, *shared_w2, out_dtype=torch.float32)
    return out.to(out_dtype)


# ---------------------------------------------------------------- the choice

def backend_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why backend (one of BACKENDS) cannot run on device, or None: triton and flaggems need CUDA and
    the triton package (triton also runs in Triton's CPU interpreter); auto picks what can run."""
    if backend in ("auto", "torch") or (kernel.triton is not None and (
            device.type == "cuda" or (kernel.INTERPRETED and backend == "triton"))):
        return None
    return f"backend {backend!r} needs a CUDA device and the triton package"


class Ops:
    """The operators as one backend runs them.

    'torch': the references above. 'triton': our Triton kernels where there is one (CUDA, or CPU
    tensors under TRITON_INTERPRET=1). 'flaggems': FlagGems' fused kernels where it has one, our
    Triton kernels for the rest (CUDA). 'auto': Triton on CUDA when it is installed, else torch.
    Weights kept as the release stores them (FP8, MXFP4) go through kernel_lowp's Triton kernels
    with 'triton' and 'flaggems' alike (FlagGems has none for them), through their references with
    'torch'. expert_kernels 'humming' or 'humming-fp8' puts MXFP4 routed experts on humming-kernels
    instead (kernel_humming.PackedExperts, CUDA only)."""

    # Few-token MoE (decode): up to this many (token, expert) assignments, by the routed experts' format,
    # go through one program per assignment (kernel.moe_gemv_triton, kernel_lowp.moe_gemv_lowp_triton);
    # more through grouped GEMMs over tokens sorted by expert, which read each expert once however many
    # tokens chose it. H100 (BENCHMARKS.md): BF16 and FP8 experts' few-token kernels ahead up to 16 tokens
    # of 6 experts; MXFP4's, since the eighth session's grouped kernels, up to about 8.
    MOE_GEMV_MAX_ASSIGNMENTS = {"bf16": 96, "fp8": 96, "fp4": 48}
    # Low-precision linears of at least this many bf16 rows dequantise the weight, then cuBLAS.
    LOWP_DEQUANT_MIN_ROWS = 1024
    # Float32-sum linears (the router, a decode step's input projections kept in the model dtype) of up
    # to this many rows go through kernel.linear_rows_triton, more through cuBLAS (linear_fp32).
    LINEAR_ROWS_MAX_M = 2

    def __init__(self, backend: str = "auto", device=None, expert_kernels: str = "triton"):
        if expert_kernels not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {expert_kernels!r}")
        self.expert_kernels = expert_kernels
        self.use(backend, device)

    def use(self, backend: str, device=None) -> None:
        """Choose the backend for tensors on device (default: torch's default device). Raises
        ValueError for an unknown name, RuntimeError for one the device cannot run (or, with
        expert_kernels on humming, a device or install humming-kernels cannot run on)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        device = torch.device(device if device is not None else torch.get_default_device())
        if backend == "auto":
            backend = "triton" if device.type == "cuda" and kernel.triton is not None else "torch"
        why = backend_unavailable(backend, device)
        if why:
            raise RuntimeError(why)
        if EXPERT_KERNELS[self.expert_kernels]:
            why = kernel_humming.unavailable(device, backend)
            if why:
                raise RuntimeError(f"expert kernels {self.expert_kernels!r} (USE_HUMMING): {why}")
        self.backend = backend
        self.triton = backend != "torch"
        self.flaggems = backend == "flaggems"

    @property
    def graphs(self) -> bool:
        """Whether decode steps should be replayed from CUDA graphs: where the kernels are ours or FlagGems'."""
        return self.triton and not kernel.INTERPRETED

    def moe_path(self, assignments: int, routed=None) -> str:
        """How the routed experts run for this many (token, expert) assignments: 'gemv' (few tokens,
        with the shared expert, moe_gemv), 'grouped' (moe_grouped) or 'loop' (the torch reference:
        each expert on its tokens), by the format of the stacked routed w13 (a tensor, or (weight, scale)
        as the release stores it); experts that pack_experts packed always take 'grouped'."""
        if not self.triton:
            return "loop"
        if isinstance(routed, kernel_humming.PackedExperts):
            return "grouped"
        weight = routed[0] if isinstance(routed, tuple) else routed
        fmt = {torch.int8: "fp4", torch.float8_e4m3fn: "fp8"}.get(getattr(weight, "dtype", None), "bf16")
        return "gemv" if assignments <= self.MOE_GEMV_MAX_ASSIGNMENTS[fmt] else "grouped"

    def pack_experts(self, w13, w2):
        """The stacked routed experts (tensors, or (weight, scale) pairs) in a form of their own where
        the expert kernels take one: kernel_humming.PackedExperts for MXFP4 experts with expert_kernels
        on humming (it holds a copy in humming's layout: the caller drops its own). None otherwise."""
        activations = EXPERT_KERNELS[self.expert_kernels]
        if self.triton and activations and isinstance(w13, tuple) and w13[0].dtype == torch.int8:
            return kernel_humming.PackedExperts(w13, w2, activations=activations)
        return None

    def dequantise_first(self, x: torch.Tensor) -> bool:
        """Whether an FP8 linear of x [..., K] on the GPU takes its weight dequantised to bf16 first
        (kernel_lowp.dequant_fp8_triton), then cuBLAS (the BF16 shards' own matmul): bf16 rows, at
        least LOWP_DEQUANT_MIN_ROWS of them (a prefill), where that beats kernel_lowp's FP8 GEMM (2.7x
        on an H100 at 4096 rows)."""
        return self.triton and not kernel.INTERPRETED and x.dtype == torch.bfloat16 \
            and x.numel() >= self.LOWP_DEQUANT_MIN_ROWS * x.size(-1)

    def linear_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """linear_fp32: x [..., K] W^T in float32 sums of exact products -> float32 [..., N]."""
        if self.triton and x.numel() <= self.LINEAR_ROWS_MAX_M * x.size(-1):
            return kernel.linear_rows_triton(x, weight)
        return linear_fp32(x, weight)

    def linear_lowp(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
        """x [..., K] W^T for a weight kept as the release stores it (FP8 or MXFP4, with its scale) ->
        [..., N] out_dtype (default x's): kernel_lowp.linear_fp8_triton for FP8 (but see
        dequantise_first), else linear_lowp_torch (MXFP4 dense layers run only as the experts' torch
        reference; their kernels take them stacked)."""
        out_dtype = out_dtype or x.dtype
        if self.triton and weight.dtype == torch.float8_e4m3fn and x.dtype in LOWP_ACTIVATIONS \
                and out_dtype in LOWP_ACTIVATIONS:
            if self.dequantise_first(x) and out_dtype == x.dtype:
                return F.linear(x, kernel_lowp.dequant_fp8_triton(weight, scale))
            return kernel_lowp.linear_fp8_triton(x, weight, scale, out_dtype)
        return linear_lowp_torch(x, weight, scale, out_dtype)

    def grouped_linear_lowp(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """grouped_linear_lowp_torch: x [b, s, g, d] through group j's rows of the FP8 weight [g * r, d]
        -> [b, s, g, r]; one launch of kernel_lowp.linear_fp8_triton (r a multiple of 16), or, see
        dequantise_first, the weight widened by kernel_lowp.dequant_fp8_triton and a batched matmul."""
        g = x.size(2)
        if self.dequantise_first(x):
            w = kernel_lowp.dequant_fp8_triton(weight, scale)
            return torch.einsum("bsgd,grd->bsgr", x, w.view(g, -1, x.size(-1)))
        if self.triton and x.dtype in LOWP_ACTIVATIONS and (weight.size(0) // g) % 16 == 0:
            return kernel_lowp.linear_fp8_triton(x.flatten(-2), weight, scale, x.dtype, groups=g).unflatten(-1, (g, -1))
        return grouped_linear_lowp_torch(x, weight, scale)

    def moe_gemv(self, x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float, shared_gu,
                 shared_w2, out_dtype):
        """moe_path 'gemv': the routed experts and the shared expert for few tokens, no host sync.
        w13, w2 and shared_w2 are tensors (kernel.moe_gemv_triton) or, kept as the release stores
        them, (weight, scale) pairs (kernel_lowp.moe_gemv_lowp_triton)."""
        fn = kernel_lowp.moe_gemv_lowp_triton if isinstance(w13, tuple) else kernel.moe_gemv_triton
        return fn(x, w13, w2, weights, experts, first_expert, swiglu_limit, shared_gu, shared_w2, out_dtype)

    def moe_grouped(self, x, w13, w2, weights, experts, first_expert: int, swiglu_limit: float) -> torch.Tensor:
        """moe_path 'grouped': the routed experts as grouped GEMMs over the assignments sorted by expert
        (kernel.moe_experts_triton, kernel_lowp.moe_experts_lowp_triton for (weight, scale) pairs, or the
        experts pack_experts packed: w13 the PackedExperts, w2 None)."""
        if isinstance(w13, kernel_humming.PackedExperts):
            return w13(x, weights, experts, first_expert, swiglu_limit)
        fn = kernel_lowp.moe_experts_lowp_triton if isinstance(w13, tuple) else kernel.moe_experts_triton
        return fn(x, w13, w2, weights, experts, first_expert, swiglu_limit)

    def sparse_attn(self, q, kv, attn_sink, topk_idxs, softmax_scale):
        """Attention of each query over its selected keys with a per-head sink: q [b, s, h, d],
        kv [b, n, d], attn_sink [h], topk_idxs [b, s, k] (-1 = empty slot) -> [b, s, h, d]."""
        if self.flaggems:
            return flaggems.sparse_attn_flaggems(q, kv, attn_sink, topk_idxs, softmax_scale)
        if self.triton:
            return kernel.sparse_attn_triton(q, kv, attn_sink, topk_idxs, softmax_scale)
        return sparse_attn_torch(q, kv, attn_sink, topk_idxs, softmax_scale)

    def hadamard(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """hadamard_transform: FlagGems' kernel with backend 'flaggems', ours for sizes 16 .. 256."""
        n = x.size(-1)
        if self.flaggems:
            return flaggems.hadamard_flaggems(x, scale)
        if self.triton and 16 <= n <= 256 and n & (n - 1) == 0:
            return kernel.hadamard_triton(x, scale)
        return hadamard_transform(x, scale)

    def hc_split(self, mixes, hc_scale, hc_base, hc_mult: int, iters: int, eps: float):
        """hc_split_sinkhorn: our Triton kernel, or FlagGems' fused one with backend 'flaggems'."""
        if self.flaggems:
            return flaggems.hc_split_flaggems(mixes, hc_scale, hc_base, hc_mult, iters, eps)
        if self.triton:
            return kernel.hc_split_sinkhorn_triton(mixes, hc_scale, hc_base, hc_mult, iters, eps)
        return hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, iters, eps)

    def hc_pre(self, x, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float, hc_eps: float,
               norm_weight=None):
        """hc_pre_torch; fused into two Triton launches, or around FlagGems' split + Sinkhorn."""
        if self.flaggems and fn.size(0) != hc_mult:
            return hc_pre_torch(x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps, norm_weight,
                                split=self.hc_split)
        if self.triton:
            return kernel.hc_pre_triton(x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps, norm_weight)
        return hc_pre_torch(x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps, norm_weight)

    def hc_post(self, f, residual, post, comb):
        if self.triton:
            return kernel.hc_post_triton(f, residual, post, comb)
        return hc_post_torch(f, residual, post, comb)

    def hc_post_pre(self, f, residual, post, comb, fn, hc_scale, hc_base, hc_mult: int, iters: int, norm_eps: float,
                    hc_eps: float, norm_weight=None):
        """Leave one sublayer and enter the next: hc_post(f, residual, post, comb), then hc_pre of those
        streams with the next one's fn, ... -> (the streams, its input, post, comb). On our Triton
        kernels a decode step's streams and the next mixes come from one launch."""
        if self.triton and not self.flaggems:
            return kernel.hc_post_pre_triton(f, residual, post, comb, fn, hc_scale, hc_base, hc_mult, iters, norm_eps,
                                             hc_eps, norm_weight)
        x = self.hc_post(f, residual, post, comb)
        return (x, *self.hc_pre(x, fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps, norm_weight))

    def norm_rope(self, x, freqs, rope_dim: int, eps=None, weight=None, inverse: bool = False):
        if self.triton:
            return kernel.norm_rope_triton(x, freqs, rope_dim, eps, weight, inverse)
        return norm_rope_torch(x, freqs, rope_dim, eps, weight, inverse)

    def norm_rope_into(self, x, freqs, rope_dim: int, eps: float, weight, cache, slots) -> None:
        """norm_rope of one token per row, x [b, 1, d], written to cache[i, slots[i]] (cache [B, n, d],
        slots [b]): the decode step's new key/value to its window ring slot."""
        if self.triton:
            kernel.norm_rope_triton(x, freqs, rope_dim, eps, weight, cache=cache, slots=slots)
        else:
            cache[torch.arange(x.size(0), device=x.device), slots] = norm_rope_torch(x, freqs, rope_dim, eps,
                                                                                     weight)[:, 0]

    def index_scores(self, q, keys, weights, limit, scale: float = 1.0):
        if self.triton:
            return kernel.index_scores_triton(q, keys, weights, limit, scale)
        return index_scores_torch(q, keys, weights, limit, scale)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """topk_torch; rows longer than k through kernel.topk_triton."""
        if self.triton and scores.size(-1) > k:
            return kernel.topk_triton(scores, k)
        return topk_torch(scores, k)

    def rms_norm(self, x, weight, eps: float):
        if self.triton:
            return kernel.rms_norm_triton(x, weight, eps)
        return rms_norm_torch(x, weight, eps)

    def route(self, scores, bias, tid2eid, ids, k: int, score_func: str, route_scale: float):
        if self.triton:
            return kernel.route_triton(scores, bias, tid2eid, ids, k, score_func, route_scale)
        return route_torch(scores, bias, tid2eid, ids, k, score_func, route_scale)

    def decode_indices(self, pos, window: int, n_entries: int, ratio: int, picks=None):
        if self.triton:
            return kernel.decode_indices_triton(pos, window, n_entries, ratio, picks)
        return decode_indices_torch(pos, window, n_entries, ratio, picks)

    def mla_decode(self, q_lat, q_pe, kv_cache, pe_cache, pos, scale: float) -> torch.Tensor:
        """The attention-weighted latents [b, h, c] float32 of one token per row (mla_decode_torch)."""
        if self.triton:
            return kernel.mla_decode_triton(q_lat, q_pe, kv_cache, pe_cache, pos, scale)
        return mla_decode_torch(q_lat, q_pe, kv_cache, pe_cache, pos, scale)

    def compressor_decode(self, kv_new, score_new, ape, pos, kv_state, score_state, prev_kv, prev_score,
                          norm_weight, eps: float, freqs_cis, rope_dim: int, rotate_scale, cache) -> None:
        """compressor_decode_torch; one Triton launch for head dims that are powers of two."""
        hd = cache.size(-1)
        fn = kernel.compressor_decode_triton if self.triton and hd & (hd - 1) == 0 else compressor_decode_torch
        fn(kv_new, score_new, ape, pos, kv_state, score_state, prev_kv, prev_score, norm_weight, eps, freqs_cis,
           rope_dim, rotate_scale, cache)
