"""Triton kernels against their torch references on fresh random inputs.

Run by tests/test_triton.py on the CPU through Triton's interpreter (TRITON_INTERPRET=1), and by
tools/gpu_check.py natively on a GPU, as `python -m testkit.cases`. Prints one line per case and exits non-zero on a mismatch."""
import os
import sys
from contextlib import contextmanager

import torch

import kernel
import ops


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def sparse_attn_case(device, dtype, b, s, h, d, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(device, dtype)
    kv = torch.randn(b, n, d, generator=g).to(device, dtype)
    sink = torch.randn(h, generator=g).to(device)
    idx = torch.randint(-1, n, (b, s, k), generator=g)
    idx[0, 0] = -1                          # a query that sees only the sink
    idx = idx.to(device)
    out = kernel.sparse_attn_triton(q, kv, sink, idx, d ** -0.5)
    ref = ops.sparse_attn_torch(q.double(), kv.double(), sink.double(), idx, d ** -0.5)
    assert not out.isnan().any()
    return rel_err(out, ref)


def moe_case(device, dtype, t, k, dim, inter, n_local, first, n_total, limit, seed):
    g = torch.Generator(device=device).manual_seed(seed)        # made where they are used: V4 shapes are GBs
    x = torch.randn(t, dim, generator=g, device=device).to(dtype)
    w13 = (torch.randn(n_local, 2 * inter, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
    w2 = (torch.randn(n_local, dim, inter, generator=g, device=device) / inter ** 0.5).to(dtype)
    experts = torch.stack([torch.randperm(n_total, generator=g, device=device)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g, device=device)
    out = kernel.moe_experts_triton(x, w13, w2, weights, experts, first, limit)
    return rel_err(out, moe_reference(x, w13, w2, weights, experts, first, limit))


def moe_schedule_case(device, dtype, t, k, n_local, first, n_total, block_m, seed):
    """kernel.moe_schedule's one launch against moe_schedule_torch: the count of entries that differ
    (unused tiles included), after checking that every output has the reference's dtype and shape."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(n_total, generator=g)[:k] for _ in range(t)]).to(device)
    weights = torch.rand(t, k, generator=g).to(device, dtype)
    got = kernel.moe_schedule(experts, weights, first, n_local, block_m)
    ref = kernel.moe_schedule_torch(experts, weights, first, n_local, block_m)
    assert [(a.dtype, a.shape) for a in got] == [(b.dtype, b.shape) for b in ref]
    return float(sum((a != b).sum().item() for a, b in zip(got, ref)))


def moe_torch_schedule_case(device, dtype):
    """"moe prefill" with its assignments scheduled by moe_schedule_torch (the many-token branch)."""
    with kernel_constant("MOE_SCHEDULE_MAX", 0):
        return moe_case(device, dtype, 150, 4, 96, 64, 6, 0, 6, 10.0, 82)


def moe_reference(x, w13, w2, weights, experts, first, limit):
    """The local experts' weighted sum [T, D] in float64, one expert at a time."""
    n_local, inter = w13.size(0), w13.size(1) // 2
    ref = torch.zeros(x.size(0), x.size(1), dtype=torch.float64, device=x.device)
    for e in range(n_local):
        token, slot = torch.where(experts == first + e)
        if token.numel():
            h = ops.swiglu(x[token].double() @ w13[e, :inter].double().T,
                              x[token].double() @ w13[e, inter:].double().T, limit).double()
            ref.index_add_(0, token, (h * weights[token, slot, None].double()) @ w2[e].double().T)
    return ref


@contextmanager
def kernel_constant(name: str, value):
    """kernel.<name> set to value (None: left as it is) for the cases run inside: a launch rule's other branch."""
    kept = getattr(kernel, name)
    setattr(kernel, name, kept if value is None else value)
    try:
        yield
    finally:
        setattr(kernel, name, kept)


def hc_split_case(device, dtype, n, hc, iters, seed):
    g = torch.Generator().manual_seed(seed)
    mixes = torch.randn(n, (2 + hc) * hc, generator=g).to(device)
    scale, base = (torch.rand(3, generator=g) + 0.5).to(device), torch.randn((2 + hc) * hc, generator=g).to(device)
    out = kernel.hc_split_sinkhorn_triton(mixes.view(1, n, -1), scale, base, hc, iters, 1e-6)
    ref = ops.hc_split_sinkhorn(mixes.view(1, n, -1).double(), scale.double(), base.double(), hc, iters, 1e-6)
    return max(rel_err(a, b) for a, b in zip(out, ref))


def hc_pre_case(device, dtype, t, hc, dim, seed, norm=False, head=False):
    """HC pre of a sublayer (with its input norm when norm), or the HC head (its hc mixes, pre gate only)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 1, hc, dim, generator=g).to(device, dtype)
    mix = hc if head else (2 + hc) * hc
    fn = (torch.randn(mix, hc * dim, generator=g) * 0.05).to(device)
    scale = (torch.rand(1 if head else 3, generator=g) + 0.5).to(device)
    base = torch.randn(mix, generator=g).to(device)
    w = (torch.rand(dim, generator=g) + 0.5).to(device) if norm else None
    out = kernel.hc_pre_triton(x, fn, scale, base, hc, 20, 1e-6, 1e-6, w)
    ref = ops.hc_pre_torch(x.double(), fn, scale.double(), base.double(), hc, 20, 1e-6, 1e-6,
                              None if w is None else w.double())
    assert out[0].dtype == dtype and out[0].shape == (t, 1, dim)
    assert (out[1] is None) == head and (ref[1] is None) == head
    return max(rel_err(a, b) for a, b in zip(out, ref) if b is not None)


def hc_mix_case(device, dtype, t, hc, dim, seed, programs=None):
    """HC pre of bf16 streams: post and comb (float32, functions of the mixes alone) as accurate as float32
    arithmetic allows, whatever the tensor-core precision; programs: kernel.HC_MIX_PROGRAMS for this call
    (few make each program sum several K blocks). The streams are bf16 whatever dtype (the case list's)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 1, hc, dim, generator=g).to(device, torch.bfloat16)
    fn = (torch.randn((2 + hc) * hc, hc * dim, generator=g) * 0.05).to(device)
    scale, base = (torch.rand(3, generator=g) + 0.5).to(device), torch.randn((2 + hc) * hc, generator=g).to(device)
    with kernel_constant("HC_MIX_PROGRAMS", programs):
        out = kernel.hc_pre_triton(x, fn, scale, base, hc, 20, 1e-6, 1e-6)
    ref = ops.hc_pre_torch(x.double(), fn, scale.double(), base.double(), hc, 20, 1e-6, 1e-6)
    assert out[0].dtype == torch.bfloat16
    return max(rel_err(out[1], ref[1]), rel_err(out[2], ref[2]), rel_err(out[0], ref[0]) / 100)


def hc_post_case(device, dtype, t, hc, dim, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(t, 1, dim, generator=g).to(device, dtype)
    res = torch.randn(t, 1, hc, dim, generator=g).to(device, dtype)
    post, comb = torch.rand(t, 1, hc, generator=g).to(device), torch.rand(t, 1, hc, hc, generator=g).to(device)
    out = kernel.hc_post_triton(f, res, post, comb)
    assert out.dtype == dtype
    return rel_err(out, ops.hc_post_torch(f.double(), res.double(), post.double(), comb.double()))


def hc_post_pre_case(device, dtype, t, hc, dim, seed):
    """Leaving a sublayer and entering the next with its input norm (kernel.hc_post_pre_triton: for few
    tokens the streams made in the mixes' launch) against hc_post, then hc_pre of its streams in dtype,
    in float64."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(t, 1, dim, generator=g).to(device, dtype)
    res = torch.randn(t, 1, hc, dim, generator=g).to(device, dtype)
    post, comb = torch.rand(t, 1, hc, generator=g).to(device), torch.rand(t, 1, hc, hc, generator=g).to(device)
    fn = (torch.randn((2 + hc) * hc, hc * dim, generator=g) * 0.05).to(device)
    scale, base = (torch.rand(3, generator=g) + 0.5).to(device), torch.randn((2 + hc) * hc, generator=g).to(device)
    w = (torch.rand(dim, generator=g) + 0.5).to(device)
    out = kernel.hc_post_pre_triton(f, res, post, comb, fn, scale, base, hc, 20, 1e-6, 1e-6, w)
    streams = ops.hc_post_torch(f, res, post, comb)      # in dtype, as the kernel rounds them, for hc_pre
    ref = ops.hc_pre_torch(streams.double(), fn, scale.double(), base.double(), hc, 20, 1e-6, 1e-6, w.double())
    assert out[0].dtype == out[1].dtype == dtype and out[0].shape == (t, 1, hc, dim) and out[1].shape == (t, 1, dim)
    first = rel_err(out[0], ops.hc_post_torch(f.double(), res.double(), post.double(), comb.double()))
    return max(first, *(rel_err(a, b) for a, b in zip(out[1:], ref)))


def norm_rope_case(device, dtype, shape, rd, norm, weighted, inverse, per_row, seed, strided=False,
                   many_rows=None):
    """many_rows: kernel.NORM_ROPE_MANY_ROWS for this call (0: the launch for many rows)."""
    g = torch.Generator().manual_seed(seed)
    x = (column_slice(shape, g) if strided else torch.randn(*shape, generator=g)).to(device, dtype)
    b, s, d = shape[0], shape[1], shape[-1]
    angles = torch.rand(b if per_row else 1, s, rd // 2, generator=g) * 6
    freqs = torch.stack([angles.cos(), angles.sin()], -1).to(device)
    freqs = freqs if per_row else freqs[0]
    w = (torch.rand(d, generator=g) + 0.5).to(device) if weighted else None
    eps = 1e-6 if norm else None
    with kernel_constant("NORM_ROPE_MANY_ROWS", many_rows):
        out = kernel.norm_rope_triton(x, freqs, rd, eps, w, inverse)
    ref = ops.norm_rope_torch(x.double(), freqs.double(), rd, eps, None if w is None else w.double(), inverse)
    return rel_err(out, ref)


def norm_rope_into_case(device, dtype, b, n, d, rd, seed):
    """The decode step's new key/value: norm_rope of strided rows x [b, 1, d] written to one slot per
    row of a cache; the whole cache (the other slots untouched) against the torch version."""
    g = torch.Generator().manual_seed(seed)
    x = column_slice((b, 1, d), g).to(device, dtype)
    angles = torch.rand(b, 1, rd // 2, generator=g) * 6
    freqs = torch.stack([angles.cos(), angles.sin()], -1).to(device)
    w = (torch.rand(d, generator=g) + 0.5).to(device)
    cache = torch.randn(b + 1, n, d, generator=g)
    slots = torch.randperm(n, generator=g)[:b]
    mine, ref = cache.to(device, dtype), cache.double()
    kernel.norm_rope_triton(x, freqs, rd, 1e-6, w, cache=mine, slots=slots.to(device))
    ops.Ops("torch", "cpu").norm_rope_into(x.double().cpu(), freqs.double().cpu(), rd, 1e-6, w.double().cpu(), ref, slots)
    return rel_err(mine.cpu(), ref)


def topk_case(device, dtype, rows, n, k, finite, seed):
    """topk_triton against torch.topk on rows with ties and, from column `finite` on, -inf: the same
    values, k distinct indices; a row with fewer than k finite values gets all of them."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, n, generator=g)
    scores[:, ::7] = scores[:, 3:4]                                  # many ties
    scores[:, finite:] = float("-inf")
    idx = kernel.topk_triton(scores.to(device), k).cpu()
    assert idx.shape == (rows, k) and idx.dtype == torch.long
    assert all(len(set(row.tolist())) == k for row in idx), "repeated indices"
    got = scores.gather(-1, idx.clamp(max=n - 1)).where(idx < n, float("-inf"))
    want = scores.topk(k, dim=-1).values
    assert torch.equal(got.sort(-1, descending=True).values, want), "different values"
    return 0.0


def hadamard_case(device, dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    n = shape[-1]
    return rel_err(kernel.hadamard_triton(x, n ** -0.5), ops.hadamard_transform(x.double(), n ** -0.5))


def index_scores_case(device, dtype, b, s, h, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(device, dtype)
    keys = torch.randn(b, n, d, generator=g).to(device, dtype)
    w = column_slice((b, s, h), g).to(device, dtype)                # rows apart, as the decode step gives them
    limit = torch.randint(0, n + 1, (b, s), generator=g).to(device)
    limit[0, 0] = n                                                 # a query that sees every entry
    out = kernel.index_scores_triton(q, keys, w, limit, 0.37).cpu()
    ref = ops.index_scores_torch(q.double(), keys.double(), w.double(), limit, 0.37).cpu()
    seen = ref > float("-inf")
    assert torch.equal(out > float("-inf"), seen), "entries past the limit must be -inf, the others finite"
    return rel_err(out[seen], ref[seen])


def column_slice(shape, generator, offset=3):
    """A tensor of `shape` whose rows lie apart: a column slice of a wider random matrix."""
    return torch.randn(*shape[:-1], shape[-1] + 2 * offset, generator=generator)[..., offset:offset + shape[-1]]


def rms_norm_case(device, dtype, shape, weighted, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = ((column_slice(shape, g) if strided else torch.randn(*shape, generator=g)) * 3).to(device, dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(device) if weighted else None
    out = kernel.rms_norm_triton(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    return rel_err(out, ops.rms_norm_torch(x.double(), None if w is None else w.double(), 1e-6))


def route_case(device, dtype, t, n, k, score_func, hashed, seed):
    """Routing from gate logits: the same experts as the torch reference (as sets: torch's top-k and
    ours may order ties differently, and random logits make ties unlikely) and the same weights."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(t, n, generator=g) * 2).to(device)
    scores[0, :3] = torch.tensor([25.0, -30.0, 21.0])              # softplus's linear branch and its far tail
    bias = (torch.randn(n, generator=g) * 0.1).to(device)
    tid2eid = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(50)]).int().to(device) if hashed else None
    ids = torch.randint(0, 50, (t,), generator=g).to(device)
    w, e = kernel.route_triton(scores, None if hashed else bias, tid2eid, ids, k, score_func, 1.5)
    rw, re = ops.route_torch(scores.double(), None if hashed else bias.double(), tid2eid, ids, k, score_func, 1.5)
    order, ref_order = e.sort(-1), re.sort(-1)
    assert e.dtype == torch.long and torch.equal(order.values.cpu(), ref_order.values.cpu()), "other experts chosen"
    return rel_err(w.gather(1, order.indices), rw.gather(1, ref_order.indices))


def moe_gemv_case(device, dtype, t, k, dim, inter, n_local, first, n_total, limit, shared_inter, seed):
    """The few-token MoE (and the shared expert when shared_inter) against a float64 loop over experts."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, dim, generator=g, device=device).to(dtype)
    w13 = (torch.randn(n_local, 2 * inter, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
    w2 = (torch.randn(n_local, dim, inter, generator=g, device=device) / inter ** 0.5).to(dtype)
    experts = torch.stack([torch.randperm(n_total, generator=g, device=device)[:k] for _ in range(t)])
    if first + n_local - 1 not in experts[0]:
        experts[0, 0] = first + n_local - 1                     # at least one assignment is local
    weights = torch.rand(t, k, generator=g, device=device)
    ref = moe_reference(x, w13, w2, weights, experts, first, limit)
    gu = ws = None
    if shared_inter:
        gu = torch.randn(t, 2 * shared_inter, generator=g, device=device).to(dtype)
        ws = (torch.randn(dim, shared_inter, generator=g, device=device) / shared_inter ** 0.5).to(dtype)
        hs = ops.swiglu(gu[:, :shared_inter], gu[:, shared_inter:], 0.0).to(dtype)
        ref += hs.double() @ ws.double().T
    out = kernel.moe_gemv_triton(x, w13, w2, weights, experts, first, limit, gu, ws, torch.float32)
    assert out.dtype == torch.float32 and not out.isnan().any()
    return rel_err(out, ref)


def decode_indices_case(device, dtype, window, ratio, n_entries, with_picks, seed):
    """Attended slots of decode queries at positions before and after the window fills, and before
    and after compressed entries become visible, with picks of -1 and of entries not visible yet."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor([0, window - 2, window + 3, 5 * max(ratio, 1) + 7, 40 * max(ratio, 1) + 1])
    picks = torch.randint(-1, n_entries, (pos.numel(), 9), generator=g) if with_picks else None
    ref = ops.decode_indices_torch(pos, window, n_entries, ratio, picks)
    out = kernel.decode_indices_triton(pos.to(device), window, n_entries, ratio,
                                       None if picks is None else picks.to(device))
    assert out.dtype == torch.long and torch.equal(out.cpu(), ref), "different slots"
    return 0.0


def compressor_case(device, dtype, ratio, hd, rotate, seed, b=3, steps=11, strided=False):
    """Decode steps of a compressor from random state at different positions per row: the cache
    entries and every state tensor of the Triton update against the torch one."""
    g = torch.Generator().manual_seed(seed)
    overlap = ratio == 4
    width, rd, n_max = (1 + overlap) * hd, 16, 40
    angles = torch.rand(n_max * ratio, rd // 2, generator=g) * 6
    freqs = torch.stack([angles.cos(), angles.sin()], -1).to(device)
    ape, w = torch.randn(ratio, width, generator=g).to(device), (torch.rand(hd, generator=g) + 0.5).to(device)
    states = [torch.randn(b + 1, ratio, width, generator=g), torch.randn(b + 1, ratio, width, generator=g)]
    states += [torch.randn(b + 1, ratio, hd, generator=g), torch.randn(b + 1, ratio, hd, generator=g)] if overlap else [None, None]
    states[3 if overlap else 1][0, :2] = float("-inf")           # a first window: no previous one
    cache = torch.randn(b + 1, n_max, hd, generator=g)
    mine = [None if s is None else s.to(device) for s in states] + [cache.to(device, dtype)]
    ref = [None if s is None else s.double() for s in states] + [cache.double()]
    pos = torch.tensor([0, ratio - 2, 5 * ratio + 1])[:b]
    for _ in range(steps):
        if strided:                    # the decode step's projections are column slices of one matmul's output
            kv_new, score_new = column_slice((b, width), g), column_slice((b, width), g, offset=5)
        else:
            kv_new, score_new = torch.randn(b, width, generator=g), torch.randn(b, width, generator=g)
        scale = hd ** -0.5 if rotate else None
        kernel.compressor_decode_triton(kv_new.to(device), score_new.to(device), ape, pos.to(device), *mine[:4],
                                        w, 1e-6, freqs, rd, scale, mine[4])
        ops.compressor_decode_torch(kv_new.double(), score_new.double(), ape.double().cpu(), pos, *ref[:4],
                                       w.double().cpu(), 1e-6, freqs.double().cpu(), rd, scale, ref[4])
        pos = pos + 1
    finite = [(a, r) for a, r in zip(mine, ref) if a is not None]
    return max(rel_err(a.cpu().nan_to_num(0, 0, 0), r.nan_to_num(0, 0, 0)) for a, r in finite)


def model_case(device, dtype, seed):
    """The fixture model on the Triton path (device) against the torch path (CPU, float32): a batch
    prefilled in two chunks, then decode steps at per-row positions crossing window and compression
    boundaries. Returns the worst relative logit error."""
    import tempfile
    from random_release import write_release
    from testkit.models import fixture_model
    path = tempfile.mkdtemp()
    weights = write_release(path, seed=seed, n_files=1)
    ref = fixture_model(path, weights, "fp32", "torch", "cpu", max_seq_len=64, max_batch_size=3)
    fast = fixture_model(path, weights, "fp32" if dtype == torch.float32 else "bf16", "triton", device,
                         max_seq_len=64, max_batch_size=3)
    ids = torch.randint(0, 129280, (3, 30), generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    for start, end in ((0, 13), (13, 21)):
        want, got = ref(ids[:, start:end], start), fast(ids[:, start:end].to(device), start)
        worst = max(worst, rel_err(got.cpu(), want))
    pos = torch.tensor([21, 22, 27])        # rows 1 and 2 skip ahead (both models see the same unwritten slots)
    for step in range(9):
        want, got = ref.decode(ids[:, 21 + step:22 + step], pos), fast.decode(ids[:, 21 + step:22 + step].to(device),
                                                                          pos.to(device))
        worst = max(worst, rel_err(got.cpu(), want))
        pos = pos + 1
    return worst


def linear_rows_case(device, dtype, m, n, k, seed, tiles=None, strided=False, bf16_weight=False):
    """kernel.linear_rows_triton against ops.linear_fp32's float32 sums of x rounded to the weight's
    dtype: with bf16_weight a float32 x, which the launcher rounds to bf16."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(torch.bfloat16 if bf16_weight else dtype)
    x = torch.randn(m, 2 * k if strided else k, generator=g)
    x = x[:, k // 2:k // 2 + k] if strided else x                 # rows apart, as a column slice
    out = kernel.linear_rows_triton(x.to(device, dtype), w.to(device), tiles)
    ref = x.to(dtype).to(w.dtype).double() @ w.double().T
    return rel_err(out.cpu(), ref.float())


def run(device, dtypes, real_shapes):
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
    cases = [("attn decode", lambda dt: sparse_attn_case(device, dt, 3, 1, 20, 64, 50, 37, 1)),
             ("attn prefill", lambda dt: sparse_attn_case(device, dt, 2, 9, 4, 64, 40, 21, 2)),
             ("attn decode keys split", lambda dt: sparse_attn_case(device, dt, 2, 1, 20, 64, 300, 250, 31)),
             ("attn prefill 40 heads", lambda dt: sparse_attn_case(device, dt, 1, 5, 40, 64, 90, 50, 34)),
             ("attn prefill 64 heads", lambda dt: sparse_attn_case(device, dt, 1, 256, 64, 32, 60, 20, 56)),
             ("moe decode", lambda dt: moe_case(device, dt, 1, 6, 64, 32, 8, 4, 16, 0.5, 3)),
             ("moe prefill", lambda dt: moe_case(device, dt, 150, 4, 96, 64, 6, 0, 6, 10.0, 4)),
             ("moe no local", lambda dt: moe_case(device, dt, 3, 2, 64, 32, 4, 8, 8, 0.0, 5)),
             ("moe prefill, torch's schedule", lambda dt: moe_torch_schedule_case(device, dt)),
             ("moe schedule some local", lambda dt: moe_schedule_case(device, dt, 5, 6, 8, 4, 16, 16, 76)),
             ("moe schedule many, wide tiles", lambda dt: moe_schedule_case(device, dt, 170, 6, 32, 64, 256, 64, 77)),
             ("moe schedule none local", lambda dt: moe_schedule_case(device, dt, 3, 2, 4, 8, 8, 16, 78)),
             ("moe schedule one", lambda dt: moe_schedule_case(device, dt, 1, 1, 3, 0, 3, 16, 79)),
             ("hc split sinkhorn", lambda dt: hc_split_case(device, dt, 37, 4, 20, 10)),
             ("hc pre", lambda dt: hc_pre_case(device, dt, 3, 4, 96, 11)),
             ("hc pre many tokens", lambda dt: hc_pre_case(device, dt, 70, 4, 160, 33)),
             ("hc pre + norm", lambda dt: hc_pre_case(device, dt, 3, 4, 96, 51, norm=True)),
             ("hc pre many + norm", lambda dt: hc_pre_case(device, dt, 40, 4, 160, 52, norm=True)),
             ("hc head + norm", lambda dt: hc_pre_case(device, dt, 2, 4, 96, 53, norm=True, head=True)),
             ("hc mixes bf16 streams", lambda dt: hc_mix_case(device, dt, 150, 4, 160, 69, programs=2),
              [torch.float32]),
             ("hc post", lambda dt: hc_post_case(device, dt, 3, 4, 300, 12)),
             ("hc post + pre, few", lambda dt: hc_post_pre_case(device, dt, 3, 4, 96, 13)),
             ("hc post + pre, many", lambda dt: hc_post_pre_case(device, dt, 20, 4, 96, 14)),
             ("norm+rope q", lambda dt: norm_rope_case(device, dt, (2, 3, 5, 64), 16, True, False, False, True, 13)),
             ("norm+rope kv weighted", lambda dt: norm_rope_case(device, dt, (2, 3, 64), 16, True, True, False,
                                                                   False, 14)),
             ("rope inverse", lambda dt: norm_rope_case(device, dt, (3, 1, 4, 32), 8, False, False, True, True, 15)),
             ("norm+rope q two rows a program", lambda dt: norm_rope_case(device, dt, (1, 7, 5, 64), 16, True, False,
                                                                          False, False, 71, many_rows=0)),
             ("hadamard", lambda dt: hadamard_case(device, dt, (2, 9, 3, 32), 16)),
             ("index scores", lambda dt: index_scores_case(device, dt, 2, 3, 20, 32, 70, 17)),
             ("rms norm", lambda dt: rms_norm_case(device, dt, (3, 5, 96), True, 35)),
             ("rms norm unweighted", lambda dt: rms_norm_case(device, dt, (7, 50), False, 36)),
             ("rms norm strided rows", lambda dt: rms_norm_case(device, dt, (3, 1, 48), True, 58, strided=True)),
             ("norm+rope kv strided", lambda dt: norm_rope_case(device, dt, (3, 1, 64), 16, True, True, False,
                                                                  True, 59, strided=True)),
             ("norm+rope into cache", lambda dt: norm_rope_into_case(device, dt, 3, 10, 64, 16, 61)),
             ("topk two rounds", lambda dt: topk_case(device, dt, 3, 20000, 16, 20000, 62), [torch.float32]),
             ("topk few finite", lambda dt: topk_case(device, dt, 2, 9000, 64, 40, 63), [torch.float32]),
             ("topk one chunk", lambda dt: topk_case(device, dt, 4, 1000, 300, 700, 64), [torch.float32]),
             ("compressor strided in", lambda dt: compressor_case(device, dt, 4, 32, True, 60, strided=True)),
             ("linear rows one column a program, apart", lambda dt: linear_rows_case(device, dt, 1, 37, 300, 73,
                                                                               strided=True)),
             ("linear rows two columns, bf16 weight", lambda dt: linear_rows_case(device, dt, 2, 70, 1000, 74,
                                                                             (2, 256, 4, 2), True, True)),
             ("route sqrtsoftplus", lambda dt: route_case(device, dt, 9, 48, 6, "sqrtsoftplus", False, 37)),
             ("route hash", lambda dt: route_case(device, dt, 9, 48, 6, "sqrtsoftplus", True, 38)),
             ("route sigmoid", lambda dt: route_case(device, dt, 4, 20, 3, "sigmoid", False, 39)),
             ("route softmax", lambda dt: route_case(device, dt, 4, 20, 1, "softmax", False, 40)),
             ("moe gemv b1 + shared", lambda dt: moe_gemv_case(device, dt, 1, 6, 64, 48, 16, 0, 16, 0.5, 24, 41)),
             ("moe gemv some local", lambda dt: moe_gemv_case(device, dt, 3, 2, 96, 32, 4, 4, 12, 10.0, 0, 42)),
             ("moe gemv shared narrower", lambda dt: moe_gemv_case(device, dt, 2, 3, 64, 48, 8, 0, 8, 0.0, 16, 57)),
             ("decode indices csa", lambda dt: decode_indices_case(device, dt, 8, 4, 60, True, 43)),
             ("decode indices hca", lambda dt: decode_indices_case(device, dt, 8, 16, 30, False, 44)),
             ("decode indices window", lambda dt: decode_indices_case(device, dt, 8, 0, 0, False, 45)),
             ("compressor csa rotate", lambda dt: compressor_case(device, dt, 4, 32, True, 26)),
             ("compressor hca", lambda dt: compressor_case(device, dt, 16, 64, False, 27)),
             ("fixture model", lambda dt: model_case(device, dt, 25), [torch.float32])]
    if real_shapes:
        cases += [("attn V4 decode b32", lambda dt: sparse_attn_case(device, dt, 32, 1, 64, 512, 16512, 640, 6)),
                  ("attn V4 decode b1", lambda dt: sparse_attn_case(device, dt, 1, 1, 64, 512, 16512, 640, 32)),
                  ("attn V4 prefill 1K", lambda dt: sparse_attn_case(device, dt, 1, 1024, 64, 512, 1280, 640, 7)),
                  ("moe V4 decode b1", lambda dt: moe_case(device, dt, 1, 6, 4096, 2048, 256, 0, 256, 10.0, 8)),
                  ("moe V4 prefill 2K", lambda dt: moe_case(device, dt, 2048, 6, 4096, 2048, 256, 0, 256, 10.0, 9)),
                  ("moe schedule V4 b32", lambda dt: moe_schedule_case(device, dt, 32, 6, 256, 0, 256, 16, 80)),
                  ("moe schedule V4 b32 mp2", lambda dt: moe_schedule_case(device, dt, 32, 6, 128, 128, 256, 16, 81)),
                  ("moe gemv V4 b1", lambda dt: moe_gemv_case(device, dt, 1, 6, 4096, 2048, 256, 0, 256, 10.0,
                                                              2048, 46)),
                  ("moe gemv V4 b4 mp8", lambda dt: moe_gemv_case(device, dt, 4, 6, 4096, 2048, 32, 64, 256, 10.0,
                                                                  256, 47)),
                  ("linear rows V4 gate b1", lambda dt: linear_rows_case(device, dt, 1, 256, 4096, 75)),
                  ("linear rows V4 csa inputs b2", lambda dt: linear_rows_case(device, dt, 2, 4160, 4096, 76)),
                  ("route V4 b32", lambda dt: route_case(device, dt, 32, 256, 6, "sqrtsoftplus", False, 48)),
                  ("rms norm V4", lambda dt: rms_norm_case(device, dt, (8, 1, 4096), True, 49)),
                  ("decode indices V4", lambda dt: decode_indices_case(device, dt, 128, 4, 16640, True, 50)),
                  ("hc pre V4 b1", lambda dt: hc_pre_case(device, dt, 1, 4, 4096, 18)),
                  ("hc pre V4 b1 + norm", lambda dt: hc_pre_case(device, dt, 1, 4, 4096, 54, norm=True)),
                  ("hc head V4 b8", lambda dt: hc_pre_case(device, dt, 8, 4, 4096, 55, norm=True, head=True)),
                  ("hc pre V4 prefill 1K", lambda dt: hc_pre_case(device, dt, 1024, 4, 4096, 19)),
                  ("hc mixes V4 prefill 4K", lambda dt: hc_mix_case(device, dt, 4096, 4, 4096, 70), [torch.float32]),
                  ("hc post V4 b8", lambda dt: hc_post_case(device, dt, 8, 4, 4096, 20)),
                  ("hc post + pre V4 b1", lambda dt: hc_post_pre_case(device, dt, 1, 4, 4096, 21)),
                  ("hc post + pre V4 b16", lambda dt: hc_post_pre_case(device, dt, 16, 4, 4096, 22)),
                  ("norm+rope V4 q b32", lambda dt: norm_rope_case(device, dt, (32, 1, 64, 512), 64, True, False,
                                                                   False, True, 21)),
                  ("norm+rope V4 q prefill 1K", lambda dt: norm_rope_case(device, dt, (1, 1024, 64, 512), 64, True,
                                                                          False, False, False, 72)),
                  ("hadamard V4 q 1K", lambda dt: hadamard_case(device, dt, (1, 1024, 64, 128), 22)),
                  ("norm+rope into V4 kv b32", lambda dt: norm_rope_into_case(device, dt, 32, 128, 512, 64, 65)),
                  ("topk V4 b1 64K", lambda dt: topk_case(device, dt, 1, 16640, 512, 16384, 66), [torch.float32]),
                  ("topk V4 b1 1K", lambda dt: topk_case(device, dt, 1, 16640, 512, 256, 67), [torch.float32]),
                  ("topk V4 prefill", lambda dt: topk_case(device, dt, 512, 1024, 512, 1024, 68), [torch.float32]),
                  ("index scores V4 b1 64K", lambda dt: index_scores_case(device, dt, 1, 1, 64, 128, 16384, 23)),
                  ("index scores V4 prefill", lambda dt: index_scores_case(device, dt, 1, 512, 64, 128, 1024, 24)),
                  ("compressor V4 csa", lambda dt: compressor_case(device, dt, 4, 512, False, 28)),
                  ("compressor V4 indexer", lambda dt: compressor_case(device, dt, 4, 128, True, 29)),
                  ("compressor V4 hca", lambda dt: compressor_case(device, dt, 128, 512, False, 30, steps=130))]
    bad = total = 0
    # The whole model runs in float32 only: in bf16 its drift from float32 depends on the seed (rounding
    # flips top-k and routing choices), and gpu_check.py judges it against the torch path's over seeds.
    for name, case, *only in cases:
        for dt in [dt for dt in dtypes if not only or dt in only[0]]:
            total += 1
            try:
                err = case(dt)
            except Exception as e:          # noqa: BLE001 - reported as a failure, the other cases still run
                bad += 1
                print(f"{name:22s} {str(dt):15s} FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            ok = err < tol[dt]
            bad += not ok
            print(f"{name:22s} {str(dt):15s} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    print(f"{total} checks, {bad} failed")
    return bad


if __name__ == "__main__":
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if on_gpu:
        failures = run("cuda", [torch.float32, torch.bfloat16], real_shapes=True)
    else:
        failures = run("cpu", [torch.float32], real_shapes=False)
    sys.exit(1 if failures else 0)
