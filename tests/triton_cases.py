"""Triton kernels against their torch references on fresh random inputs.

Run by tests/test_triton.py on the CPU through Triton's interpreter (TRITON_INTERPRET=1), and by
tests/gpu_check.py natively on a GPU. Prints one line per case and exits non-zero on a mismatch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel  # noqa: E402


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
    ref = kernel.sparse_attn_torch(q.double(), kv.double(), sink.double(), idx, d ** -0.5)
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
    ref = torch.zeros(t, dim, dtype=torch.float64, device=device)
    for e in range(n_local):
        token, slot = torch.where(experts == first + e)
        if token.numel():
            h = kernel.swiglu(x[token].double() @ w13[e, :inter].double().T,
                              x[token].double() @ w13[e, inter:].double().T, limit).double()
            ref.index_add_(0, token, (h * weights[token, slot, None].double()) @ w2[e].double().T)
    return rel_err(out, ref)


def hc_split_case(device, dtype, n, hc, iters, seed):
    g = torch.Generator().manual_seed(seed)
    mixes = torch.randn(n, (2 + hc) * hc, generator=g).to(device)
    scale, base = (torch.rand(3, generator=g) + 0.5).to(device), torch.randn((2 + hc) * hc, generator=g).to(device)
    out = kernel.hc_split_sinkhorn_triton(mixes.view(1, n, -1), scale, base, hc, iters, 1e-6)
    ref = kernel.hc_split_sinkhorn(mixes.view(1, n, -1).double(), scale.double(), base.double(), hc, iters, 1e-6)
    return max(rel_err(a, b) for a, b in zip(out, ref))


def run(device, dtypes, real_shapes):
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
    cases = [("attn decode", lambda dt: sparse_attn_case(device, dt, 3, 1, 20, 64, 50, 37, 1)),
             ("attn prefill", lambda dt: sparse_attn_case(device, dt, 2, 9, 4, 64, 40, 21, 2)),
             ("moe decode", lambda dt: moe_case(device, dt, 1, 6, 64, 32, 8, 4, 16, 0.5, 3)),
             ("moe prefill", lambda dt: moe_case(device, dt, 150, 4, 96, 64, 6, 0, 6, 10.0, 4)),
             ("moe no local", lambda dt: moe_case(device, dt, 3, 2, 64, 32, 4, 8, 8, 0.0, 5)),
             ("hc split sinkhorn", lambda dt: hc_split_case(device, dt, 37, 4, 20, 10))]
    if real_shapes:
        cases += [("attn V4 decode b32", lambda dt: sparse_attn_case(device, dt, 32, 1, 64, 512, 16512, 640, 6)),
                  ("attn V4 prefill 1K", lambda dt: sparse_attn_case(device, dt, 1, 1024, 64, 512, 1280, 640, 7)),
                  ("moe V4 decode b1", lambda dt: moe_case(device, dt, 1, 6, 4096, 2048, 256, 0, 256, 10.0, 8)),
                  ("moe V4 prefill 2K", lambda dt: moe_case(device, dt, 2048, 6, 4096, 2048, 256, 0, 256, 10.0, 9))]
    bad = 0
    for name, case in cases:
        for dt in dtypes:
            err = case(dt)
            ok = err < tol[dt]
            bad += not ok
            print(f"{name:22s} {str(dt):15s} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    return bad


if __name__ == "__main__":
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if on_gpu:
        failures = run("cuda", [torch.float32, torch.bfloat16], real_shapes=True)
    else:
        failures = run("cpu", [torch.float32], real_shapes=False)
    sys.exit(1 if failures else 0)
