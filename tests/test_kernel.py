"""Each reference op of kernel.py against a direct formula, on fresh random inputs."""
import math

import pytest
import torch

import ops
import quant


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_is_matrix_product_and_orthogonal(n):
    x = torch.randn(3, 5, n)
    h = sylvester(n)
    torch.testing.assert_close(h @ h.T, n * torch.eye(n))
    y = ops.hadamard_transform(x, n ** -0.5)
    torch.testing.assert_close(y, x @ h * n ** -0.5, rtol=1e-5, atol=1e-5)
    # the scaled transform is orthogonal: norms kept, applying it twice is the identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.hadamard_transform(y, n ** -0.5), x, rtol=1e-5, atol=1e-5)


def test_hadamard_rejects_other_sizes():
    with pytest.raises(ValueError, match="power-of-two"):
        ops.hadamard_transform(torch.randn(2, 12))


def test_hc_split_sinkhorn():
    hc, iters, eps = 4, 20, 1e-6
    mixes = torch.randn(2, 7, (2 + hc) * hc)
    scale, base = torch.rand(3) + 0.5, torch.randn((2 + hc) * hc)
    pre, post, comb = ops.hc_split_sinkhorn(mixes, scale, base, hc, iters, eps)
    assert pre.shape == (2, 7, hc) and post.shape == (2, 7, hc) and comb.shape == (2, 7, hc, hc)
    torch.testing.assert_close(pre, torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps)
    torch.testing.assert_close(post, 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc]))
    # doubly stochastic: columns sum to 1 (last step) and rows to 1 within the Sinkhorn tolerance
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 7, hc), rtol=0, atol=1e-5)
    assert (comb > 0).all()
    # the row error never grows with more iterations (up to float noise once converged) and vanishes
    row_err = [(ops.hc_split_sinkhorn(mixes, scale, base, hc, n, eps)[2].sum(-1) - 1).abs().max().item()
               for n in (1, 5, 20, 2000)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(row_err, row_err[1:])), row_err
    assert row_err[-1] < 1e-4 < row_err[0], row_err
    # one iteration is a row softmax (+eps) followed by a column normalisation
    _, _, one = ops.hc_split_sinkhorn(mixes, scale, base, hc, 1, eps)
    soft = (mixes[..., 2 * hc:].view(2, 7, hc, hc) * scale[2] + base[2 * hc:].view(hc, hc)).softmax(-1) + eps
    torch.testing.assert_close(one, soft / (soft.sum(-2, keepdim=True) + eps))


def dense_attention(q, kv, sink, idx, scale):
    """Masked dense attention over all n keys, the sink as an extra logit with no value."""
    b, s, h, d = q.shape
    n = kv.size(1)
    mask = torch.zeros(b, s, n, dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            for j in idx[bi, si].tolist():
                if j >= 0:
                    mask[bi, si, j] = True
    logits = torch.einsum("bshd,bnd->bshn", q, kv) * scale
    logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    m = torch.maximum(logits.amax(-1), sink.view(1, 1, h))
    w = torch.exp(logits - m.unsqueeze(-1))
    denom = w.sum(-1) + torch.exp(sink.view(1, 1, h) - m)
    return torch.einsum("bshn,bnd->bshd", w / denom.unsqueeze(-1), kv)


def test_sparse_attn_equals_dense_masked_attention():
    torch.manual_seed(1)
    b, s, h, d, n, k = 2, 5, 3, 16, 11, 6
    q, kv, sink = torch.randn(b, s, h, d), torch.randn(b, n, d), torch.randn(h)
    idx = torch.stack([torch.stack([torch.randperm(n)[:k] for _ in range(s)]) for _ in range(b)])
    idx[0, 1, 2:] = -1          # a query with few keys
    idx[1, 3, :] = -1           # a query with none: only the sink, output 0
    out = ops.sparse_attn_torch(q, kv, sink, idx, d ** -0.5)
    ref = dense_attention(q, kv, sink, idx, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1, 3], torch.zeros(h, d))
    assert not out.isnan().any()


def test_sparse_attn_bf16_close_to_fp32():
    torch.manual_seed(2)
    q, kv, sink = torch.randn(1, 4, 2, 64), torch.randn(1, 9, 64), torch.randn(2)
    idx = torch.randint(-1, 9, (1, 4, 5))
    ref = ops.sparse_attn_torch(q, kv, sink, idx, 0.125)
    out = ops.sparse_attn_torch(q.bfloat16(), kv.bfloat16(), sink, idx, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_dequant_fp8_blocks_with_ragged_edges():
    out_f, in_f = 200, 300                       # 2 x 3 blocks, the last ones partial
    w = (torch.randn(out_f, in_f) * 50).to(torch.float8_e4m3fn)
    exps = torch.randint(-12, 3, (2, 3))
    scale = torch.pow(2.0, exps.float()).to(torch.float8_e8m0fnu)
    got = quant.dequant_fp8(w, scale, torch.float32)
    for i in range(out_f):
        for j in (0, 127, 128, 255, 256, 299):
            assert got[i, j] == w[i, j].float() * 2.0 ** exps[i // 128, j // 128]
    assert torch.equal(quant.dequant_fp8(w, scale, torch.bfloat16).float(), got)   # exact in bf16 too
    with pytest.raises(ValueError, match="scale has shape"):
        quant.dequant_fp8(w, scale[:1], torch.float32)
    # whole blocks (the fast path): every element against the formula
    w = (torch.randn(256, 384) * 50).to(torch.float8_e4m3fn)
    exps = torch.randint(-12, 3, (2, 3))
    got = quant.dequant_fp8(w, torch.pow(2.0, exps.float()).to(torch.float8_e8m0fnu), torch.bfloat16)
    want = w.float() * torch.pow(2.0, exps.float()).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(got.float(), want)


def test_dequant_fp4_nibble_order_and_scale():
    values = torch.tensor(quant.E2M1_VALUES)
    codes = torch.randint(0, 16, (3, 64))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    exps = torch.randint(-8, 4, (3, 2))
    scale = torch.pow(2.0, exps.float()).to(torch.float8_e8m0fnu)
    got = quant.dequant_fp4(packed, scale, torch.float32)
    want = values[codes] * torch.pow(2.0, exps.float()).repeat_interleave(32, 1)
    assert torch.equal(got, want)
    # one byte by hand: low nibble 0b0001 (0.5) is column 0, high nibble 0b1101 (-3) is column 1
    byte = torch.tensor([[0xD1] * 16], dtype=torch.uint8).view(torch.int8)
    one = quant.dequant_fp4(byte, torch.ones(1, 1).to(torch.float8_e8m0fnu), torch.float32)
    assert one[0, 0] == 0.5 and one[0, 1] == -3.0


def test_rms_norm_and_rotary():
    x = torch.randn(2, 3, 8)
    w = torch.randn(8)
    torch.testing.assert_close(ops.rms_norm_torch(x, w, 1e-6), w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))
    angles = torch.rand(3, 4) * 6
    freqs = torch.polar(torch.ones_like(angles), angles)
    y = ops.apply_rotary(x, freqs)
    c, s = torch.cos(angles), torch.sin(angles)
    a, b = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(y[..., 0::2], a * c - b * s)
    torch.testing.assert_close(y[..., 1::2], a * s + b * c)
    torch.testing.assert_close(ops.apply_rotary(y, freqs, inverse=True), x, rtol=1e-5, atol=1e-5)


def test_swiglu_clamps_gate_above_and_up_both_ways():
    gate = torch.tensor([-20.0, 0.5, 20.0])
    up = torch.tensor([-20.0, 0.5, 20.0])
    got = ops.swiglu(gate, up, 10.0)
    want = torch.nn.functional.silu(torch.tensor([-20.0, 0.5, 10.0])) * torch.tensor([-10.0, 0.5, 10.0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ops.swiglu(gate, up, 0.0), torch.nn.functional.silu(gate) * up)
    assert math.isfinite(got.sum().item())


@pytest.mark.parametrize("n, k", [(1000, 17), (4096, 512), (16640, 512), (135, 16)])
def test_topk_indices_picks_the_largest(n, k):
    """The two-round top-k returns the same set as torch.topk, also where fewer than k entries are
    finite (those all come back) and where n is not a multiple of the chunk."""
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(2, 3, n, generator=g)
    scores[0, 1, k // 2:] = float("-inf")                       # fewer than k finite entries
    scores[1, 2, : n // 2] = float("-inf")
    got = ops.topk_torch(scores, k)
    assert got.shape == (2, 3, k)
    want = scores.topk(k, dim=-1).indices
    for row_got, row_want, row in zip(got.view(-1, k), want.view(-1, k), scores.view(-1, n)):
        finite = row.isfinite()
        assert (row_got >= 0).all() and ((row_got < n) | (finite.sum() < k)).all(), "padding only when short"
        value = torch.where(row_got < n, row[row_got.clamp(max=n - 1)], float("-inf"))   # padding is -inf
        assert torch.equal(value.sort().values, row[row_want].sort().values)
        if finite.sum() < k:
            assert set(finite.nonzero().flatten().tolist()) <= set(row_got.tolist())


@pytest.mark.parametrize("ratio, overlap", [(4, True), (8, False)])
def test_compressor_decode_writes_an_entry_only_when_its_window_completes(ratio, overlap):
    """Over two windows of decode steps the cache changes only at each window's last position, and
    then to the direct formula: softmax(score + ape) pooling of the window's projections (with the
    previous window's first series when windows overlap), RMSNorm, RoPE at the window's start."""
    g = torch.Generator().manual_seed(ratio)
    hd, rd, b = 16, 8, 1
    width = (1 + overlap) * hd
    angles = torch.rand(4 * ratio, rd // 2, generator=g) * 6
    freqs = torch.stack([angles.cos(), angles.sin()], -1)
    ape, w = torch.randn(ratio, width, generator=g), torch.rand(hd, generator=g) + 0.5
    kv_state, score_state = torch.zeros(b, ratio, width), torch.zeros(b, ratio, width)
    prev = (torch.zeros(b, ratio, hd), torch.full((b, ratio, hd), float("-inf"))) if overlap else (None, None)
    cache = torch.randn(b, 4, hd, generator=g)
    kvs, scores = torch.randn(2 * ratio, width, generator=g), torch.randn(2 * ratio, width, generator=g)
    for p in range(2 * ratio):
        before = cache.clone()
        ops.compressor_decode_torch(kvs[p:p + 1], scores[p:p + 1], ape, torch.tensor([p]), kv_state, score_state,
                                       *prev, w, 1e-6, freqs, rd, None, cache)
        window = p // ratio
        changed = (cache != before).any(dim=-1)[0]
        if p % ratio != ratio - 1:
            assert not changed.any(), f"position {p} wrote an entry before its window completed"
            continue
        assert changed.tolist() == [e == window for e in range(4)]
        rows = slice(window * ratio, (window + 1) * ratio)
        kv, sc = kvs[rows, -hd:], scores[rows, -hd:] + ape[:, -hd:]
        if overlap and window > 0:
            earlier = slice((window - 1) * ratio, window * ratio)
            kv, sc = torch.cat([kvs[earlier, :hd], kv]), torch.cat([scores[earlier, :hd] + ape[:, :hd], sc])
        pooled = (kv * sc.softmax(dim=0)).sum(dim=0)
        normed = pooled * torch.rsqrt(pooled.pow(2).mean() + 1e-6) * w
        a, c = normed[-rd:].view(-1, 2).unbind(-1)
        cos, sin = freqs[window * ratio].unbind(-1)
        want = torch.cat([normed[:-rd], torch.stack([a * cos - c * sin, a * sin + c * cos], -1).flatten()])
        torch.testing.assert_close(cache[0, window], want, rtol=1e-5, atol=1e-5)
