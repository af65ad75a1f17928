"""kernel_lowp.py's Triton kernels against their torch references (ops.py), on fresh random inputs.

pytest runs every case on the CPU through Triton's interpreter (TRITON_INTERPRET=1, in one child
process, as tests/test_triton.py does) and, where CUDA is available, natively, one test a case.
`PYTHONPATH=. python tests/test_kernel_lowp.py` runs them all on the device it finds and prints one line a case."""
import os
import subprocess
import sys
import time

import pytest
import torch

import kernel_lowp
import ops
from quant import dequant_fp4, dequant_fp8

if kernel_lowp.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _fp4_dot_probe(x_ptr, w_ptr, s_ptr, o_ptr, N, K, sw_n, ss_n, ss_g, BN: tl.constexpr, BK: tl.constexpr):
        # o [16, N] = x [16, K] W^T for an MXFP4 W through kernel_lowp._fp4_dot, a program a BN-column block.
        nb = tl.program_id(0)
        r = tl.arange(0, 16)
        acc = tl.zeros([16, BN], tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + r[:, None] * K + ks[None, :])
            acc = kernel_lowp._fp4_dot(a, acc, w_ptr, s_ptr, sw_n, ss_n, ss_g, nb * BN, k0, N, K, BN, BK)
        cols = nb * BN + tl.arange(0, BN)
        tl.store(o_ptr + r[:, None] * N + cols[None, :], acc, mask=(cols < N)[None, :])


def fp8_weight(n: int, k: int, scale_dtype, g: torch.Generator, device):
    """Random e4m3 codes [n, k] with block scales [ceil(n/128), ceil(k/128)] around 2^-4 / sqrt(k)."""
    w = (torch.randn(n, k, generator=g) * 8).to(torch.float8_e4m3fn)
    shape = (-(-n // 128), -(-k // 128))
    exp = torch.randint(-1, 2, shape, generator=g) + round(-4 - 0.5 * torch.log2(torch.tensor(k)).item())
    if scale_dtype == torch.float8_e8m0fnu:
        scale = (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    else:
        scale = torch.exp2(exp.float()) * (1 + torch.rand(shape, generator=g))
    return w.to(device), scale.to(device)


def fp8_experts(e: int, inter: int, dim: int, scale_dtype, g: torch.Generator, device):
    """Random FP8 experts stacked as the model stacks them: w13 = (e4m3 [e, 2 up, dim], block scales),
    w1 in rows 0 .. inter-1 and w3 from row up (inter rounded up to 128; zero rows between), and
    w2 = (e4m3 [e, dim, inter], block scales)."""
    up = -(-inter // 128) * 128
    w13 = torch.zeros(e, 2 * up, dim, dtype=torch.float8_e4m3fn)
    s13 = torch.zeros(e, 2 * up // 128, -(-dim // 128), dtype=scale_dtype)
    w2, s2 = [], []
    for i in range(e):
        for half in (0, 1):
            w, s = fp8_weight(inter, dim, scale_dtype, g, "cpu")
            w13[i, half * up:half * up + inter], s13[i, half * up // 128:(half + 1) * up // 128] = w, s
        w, s = fp8_weight(dim, inter, scale_dtype, g, "cpu")
        w2.append(w)
        s2.append(s)
    return (w13.to(device), s13.to(device)), (torch.stack(w2).to(device), torch.stack(s2).to(device))


def fp4_weight(e: int, n: int, k: int, g: torch.Generator, device):
    """Random MXFP4 experts: packed codes [e, n, k/2] int8 and ue8m0 scales [e, n, k/32] around 2^-2 / sqrt(k)."""
    packed = torch.randint(-128, 128, (e, n, k // 2), generator=g, dtype=torch.int8)
    exp = torch.randint(-1, 2, (e, n, k // 32), generator=g) + round(-2 - 0.5 * torch.log2(torch.tensor(k)).item())
    return packed.to(device), (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu).to(device)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def linear_case(device, m, n, k, scale_dtype, out_dtype, seed, tiles=None, lead=(), strided=False, groups=1,
                act=torch.bfloat16):
    """linear_fp8_triton on x [*lead, m, groups * k] of dtype act (rows lying apart when strided) against
    ops.linear_lowp_torch, or with groups > 1 (output group j over input group j) against
    ops.grouped_linear_lowp_torch."""
    g = torch.Generator().manual_seed(seed)
    w, scale = fp8_weight(n, k, scale_dtype, g, device)
    width = groups * k
    x = torch.randn(*lead, m, width + 8 * strided, generator=g).to(device, act)[..., :width]
    out = kernel_lowp.linear_fp8_triton(x, w, scale, out_dtype, tiles, groups)
    if groups == 1:
        ref = ops.linear_lowp_torch(x, w, scale, out_dtype)
    else:
        ref = ops.grouped_linear_lowp_torch(x.reshape(1, -1, groups, k), w, scale).reshape(out.shape)
    assert out.dtype == out_dtype and out.shape == (*lead, m, n)
    tol = 1e-2 if torch.bfloat16 in (out_dtype, ref.dtype) else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    return rel_err(out, ref)


def dequant_case(device, n, k, scale_dtype, seed):
    """dequant_fp8_triton against quant.dequant_fp8: bit for bit."""
    w, scale = fp8_weight(n, k, scale_dtype, torch.Generator().manual_seed(seed), device)
    out = kernel_lowp.dequant_fp8_triton(w, scale)
    assert out.dtype == torch.bfloat16 and torch.equal(out, dequant_fp8(w, scale))
    return 0.0


def fp4_dequant_case(device, n, k, group_major, seed, bn=32, bk=64):
    """kernel_lowp._fp4_dot with one-hot rows of bf16 x, so each output is one weight: equal to
    quant.dequant_fp4 bit for bit, for every code byte (each of the 256 in every column block) and ue8m0
    exponents from 100 to 128 (scales 2^-27 .. 2), the scales row-major or group-major."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(n * k // 2).remainder(256).to(torch.uint8).view(torch.int8).view(n, k // 2)
    codes = codes[torch.randperm(n, generator=g)]
    exp = torch.randint(100, 129, (n, k // 32), generator=g)
    exp[0, 0] = 128
    scale = exp.to(torch.uint8).view(torch.float8_e8m0fnu)
    if group_major:
        scale = scale.T.contiguous().T
    w, scale = codes.to(device), scale.to(device)
    s = kernel_lowp.fp4_scale_arg(scale)
    ref = dequant_fp4(w, scale, torch.float32)
    for c0 in range(0, k, 16):
        x = torch.zeros(16, k)
        x[torch.arange(16), c0 + torch.arange(16)] = 1.0
        out = torch.zeros(16, n, device=device)
        _fp4_dot_probe[(-(-n // bn),)](x.to(device, torch.bfloat16), w, s, out, n, k, w.stride(0), *s.stride(), BN=bn,
                                       BK=bk)
        assert torch.equal(out, ref[:, c0:c0 + 16].T), (out - ref[:, c0:c0 + 16].T).abs().max()
    return 0.0


def moe_case(device, t, k, dim, inter, n_local, first, n_total, limit, shared_inter, out_dtype, seed,
             grouped=False, tiles=None, unused=0, experts_fp8=None, act=torch.bfloat16, group_major=False):
    """The low-precision experts (few-token kernels, or the grouped GEMMs when grouped; Ops' choice for
    the model when grouped is None) against ops.moe_lowp_torch. MXFP4 experts, or FP8 ones with block
    scales of dtype experts_fp8 (the shared expert's too). `unused` local experts get no token; x is
    of dtype act. group_major: the MXFP4 scales laid out group after group (a group's scales of all rows
    together), as the model stacks them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, dim, generator=g).to(device, act)
    if experts_fp8 is None:
        w13, w2 = fp4_weight(n_local, 2 * inter, dim, g, device), fp4_weight(n_local, dim, inter, g, device)
        if group_major:
            w13, w2 = [(w, s.transpose(1, 2).contiguous().transpose(1, 2)) for w, s in (w13, w2)]
    else:
        w13, w2 = fp8_experts(n_local, inter, dim, experts_fp8, g, device)
    chosen = torch.cat([torch.arange(first + unused, first + n_local), torch.arange(first)])
    chosen = torch.cat([chosen, torch.arange(first + n_local, n_total)])
    experts = torch.stack([chosen[torch.randperm(chosen.numel(), generator=g)[:k]] for _ in range(t)])
    experts[0, 0] = first + n_local - 1                                  # at least one local assignment
    experts = experts.to(device)
    weights = torch.rand(t, k, generator=g).to(device)
    gu = ws = None
    if shared_inter:
        gu = (torch.randn(t, 2 * shared_inter, generator=g) * 2).to(device, act)
        ws = fp8_weight(dim, shared_inter, experts_fp8 or torch.float8_e8m0fnu, g, device)
    ref = ops.moe_lowp_torch(x, w13, w2, weights, experts, first, limit, gu, ws, out_dtype)
    if grouped is None:
        model_ops = ops.Ops("triton", device)
        if model_ops.moe_path(experts.numel(), w13) == "gemv":
            out = model_ops.moe_gemv(x, w13, w2, weights, experts, first, limit, gu, ws, out_dtype)
        else:
            out = model_ops.moe_grouped(x, w13, w2, weights, experts, first, limit)
            if shared_inter:
                hs = ops.swiglu(gu[:, :shared_inter], gu[:, shared_inter:], 0.0).to(act)
                out += model_ops.linear_lowp(hs, *ws, out_dtype=torch.float32)
            out = out.to(out_dtype)
    elif grouped:
        out = kernel_lowp.moe_experts_lowp_triton(x, w13, w2, weights, experts, first, limit, tiles).to(out_dtype)
    else:
        out = kernel_lowp.moe_gemv_lowp_triton(x, w13, w2, weights, experts, first, limit, gu, ws, out_dtype, tiles)
    assert out.dtype == out_dtype and out.shape == (t, dim) and not out.isnan().any()
    if limit > 0:      # the clamp bites: token 0's gate or up sum of expert first + n_local - 1 passes the limit
        w = ops.dequantised(w13[0][n_local - 1], w13[1][n_local - 1], torch.float32)
        gate_up = x[:1].float() @ w.T
        up = w.size(0) // 2
        assert max(gate_up[:, :inter].max(), gate_up[:, up:up + inter].abs().max()) > limit
    err = rel_err(out, ref)
    assert err < (1e-2 if out_dtype == torch.bfloat16 else 1e-5), err
    return err


E8, F32, BF = torch.float8_e8m0fnu, torch.float32, torch.bfloat16
CASES = {
    "fp8 row m1": lambda d: linear_case(d, 1, 200, 320, E8, BF, 1),
    "fp8 row m3 f32 scale": lambda d: linear_case(d, 3, 200, 320, F32, BF, 2),
    "fp8 row m3 fp32 out": lambda d: linear_case(d, 3, 200, 320, E8, F32, 3, strided=True),
    "fp8 row tiles 8x128 f32 scale": lambda d: linear_case(d, 2, 200, 320, F32, F32, 10, (8, 128, 4, 1)),
    "fp8 row tiles 16x256": lambda d: linear_case(d, 1, 200, 320, E8, BF, 15, (16, 256, 4, 1)),
    "fp8 row fp32 x": lambda d: linear_case(d, 2, 200, 320, F32, F32, 16, act=F32),
    "fp8 row 3 groups": lambda d: linear_case(d, 2, 96, 160, E8, BF, 17, groups=3),
    "fp8 gemv m17": lambda d: linear_case(d, 17, 200, 320, E8, BF, 4),
    "fp8 gemv m17 f32 scale": lambda d: linear_case(d, 17, 200, 320, F32, F32, 5, lead=(1,)),
    "fp8 gemv m64 fp32 out": lambda d: linear_case(d, 64, 200, 320, E8, F32, 9),
    "fp8 gemv 2 groups fp32 x": lambda d: linear_case(d, 9, 64, 192, E8, F32, 18, groups=2, act=F32),
    "fp8 gemm m150": lambda d: linear_case(d, 150, 200, 320, E8, BF, 6),
    "fp8 gemm grouped tiles": lambda d: linear_case(d, 75, 200, 320, F32, F32, 7, (32, 64, 64, 2, 4, 1), (2,)),
    "fp8 gemm grouped e8 fp32": lambda d: linear_case(d, 150, 130, 192, E8, F32, 8, (32, 64, 64, 3, 4, 1)),
    "fp8 gemm fp32 x 4 groups": lambda d: linear_case(d, 70, 128, 96, F32, F32, 19, groups=4, act=F32),
    "fp8 dequant partial blocks": lambda d: dequant_case(d, 200, 320, E8, 24),
    "fp8 dequant f32 scale": lambda d: dequant_case(d, 256, 130, F32, 25),
    "moe gemv + shared + clamp": lambda d: moe_case(d, 1, 4, 192, 64, 6, 2, 8, 0.5, 96, F32, 11),
    "moe gemv some local bf16": lambda d: moe_case(d, 3, 2, 192, 64, 4, 4, 12, 0.0, 0, BF, 12),
    "moe gemv fp8 + shared": lambda d: moe_case(d, 2, 3, 160, 48, 4, 0, 8, 0.5, 96, F32, 20, experts_fp8=E8),
    "moe gemv fp8 f32 scale fp32 x": lambda d: moe_case(d, 2, 2, 192, 96, 3, 3, 6, 0.0, 64, F32, 21,
                                                        experts_fp8=F32, act=F32),
    "moe gemv split 2 + shared + clamp": lambda d: moe_case(d, 2, 3, 256, 256, 4, 0, 8, 0.5, 256, BF, 26,
                                                            tiles=(32, 4, 4, 2, 2)),
    "moe gemv split 4 some local": lambda d: moe_case(d, 1, 6, 512, 512, 3, 2, 8, 0.0, 0, F32, 27,
                                                      tiles=(64, 8, 4, 2, 4)),
    "moe gemv fp8 split 2 f32 scale": lambda d: moe_case(d, 2, 2, 256, 256, 3, 1, 5, 0.5, 256, F32, 28,
                                                         tiles=(32, 4, 4, 2, 2), experts_fp8=F32),
    "moe gemv split refused 2 shared": lambda d: moe_case(d, 1, 3, 256, 256, 3, 0, 4, 0.0, 192, BF, 29,
                                                          tiles=(32, 4, 4, 2, 2)),
    "moe grouped clamp": lambda d: moe_case(d, 40, 3, 96, 64, 5, 1, 6, 0.5, 0, F32, 13, True,
                                            (16, 32, 64, 4, 1), unused=2),
    "moe grouped fp8 fp32 x": lambda d: moe_case(d, 30, 2, 160, 48, 4, 0, 4, 0.5, 0, F32, 22, True,
                                                 (16, 32, 64, 4, 1), experts_fp8=E8, act=F32),
    "moe grouped fp8 f32 scale": lambda d: moe_case(d, 30, 3, 192, 160, 3, 1, 5, 0.0, 0, F32, 23, True,
                                                    (16, 64, 64, 4, 1), experts_fp8=F32),
    "moe dispatch grouped + shared": lambda d: moe_case(d, 40, 3, 96, 64, 5, 0, 6, 0.5, 96, BF, 14, None,
                                                        unused=1),
    "moe gemv group-major scales": lambda d: moe_case(d, 2, 3, 256, 128, 4, 0, 6, 0.5, 96, BF, 30,
                                                      tiles=(32, 4, 4, 2, 2), group_major=True),
    "moe grouped group-major scales": lambda d: moe_case(d, 40, 3, 96, 64, 5, 1, 6, 0.5, 0, F32, 31, True,
                                                         (16, 32, 64, 4, 1), unused=2, group_major=True),
    "moe dispatch fp8 gemv + shared": lambda d: moe_case(d, 12, 6, 128, 64, 4, 0, 8, 0.5, 96, BF, 34, None,
                                                         experts_fp8=E8),
    "moe dispatch fp4 grouped 72": lambda d: moe_case(d, 12, 6, 128, 64, 4, 0, 8, 0.5, 96, BF, 35, None),
    "fp4 dequant exact": lambda d: fp4_dequant_case(d, 64, 256, False, 32),
    "fp4 exact group-major partial": lambda d: fp4_dequant_case(d, 40, 128, True, 33),
}


def test_moe_path_by_expert_format():
    """Ops.moe_path's switch from the few-token kernels to the grouped GEMMs by the routed experts' format:
    MXFP4 after 48 assignments, BF16 and FP8 after 96."""
    model_ops = ops.Ops("torch")
    model_ops.triton = True                      # the decision alone: moe_path reads only this of the backend
    fp4 = (torch.zeros(2, 4, 2, dtype=torch.int8), torch.zeros(2, 4, 1, dtype=torch.float8_e8m0fnu))
    fp8 = (torch.zeros(2, 4, 4, dtype=torch.float8_e4m3fn), torch.zeros(2, 1, 1))
    for routed, most in ((fp4, 48), (fp8, 96), (torch.zeros(2, 4, 4, dtype=torch.bfloat16), 96)):
        assert model_ops.moe_path(most, routed) == "gemv" and model_ops.moe_path(most + 1, routed) == "grouped"


def run_all(device: str) -> int:
    """Every case on device, one line each; the number of failures."""
    bad = 0
    for name, case in CASES.items():
        start = time.perf_counter()
        try:
            err = case(device)
        except Exception as e:          # noqa: BLE001 - reported as a failure, the other cases still run
            bad += 1
            print(f"{name:32s} FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        print(f"{name:32s} rel err {err:.2e} ok ({time.perf_counter() - start:.1f} s)")
    return bad


def test_lowp_kernels_match_torch_references_in_the_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=root)
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                         timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" ok") == len(CASES)


def sm90_builds():
    """(kernel, argument types, constexprs, warps, stages) of every kernel at its default tiles: the
    FP8 linears with either scale dtype (and the GEMM with float32 activations), the MoE kernels with
    MXFP4 experts (ue8m0 shared scales) and with FP8 experts (float32 scales, as R1's), bf16 activations
    (and the grouped GEMMs with float32 ones)."""
    kl, i32 = kernel_lowp, "i32"
    lin = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", o_ptr="*bf16", N=i32, K=i32, R=i32, sx=i32, sxg=i32, sw=i32, ss=i32,
               so=i32)
    bn, bk, w, st = kl.FP8_ROW_TILES
    builds = [(kl._fp8_gemv_row_kernel, dict(lin, s_ptr="*u8" if ue else "*fp32"), dict(BN=bn, BK=bk, UE8M0=ue), w, st)
              for ue in (True, False)]
    for bm, bn, bk, group, w, st in (kl.fp8_tiles(64, 4096, torch.device("cpu")), kl.FP8_GEMM_TILES):
        builds += [(kl._fp8_gemm_kernel, dict(lin, M=i32, s_ptr="*u8" if ue else "*fp32"),
                    dict(BM=bm, BN=bn, BK=bk, GROUP=group, UE8M0=ue), w, st) for ue in (True, False)]
    bm, bn, bk, group, w, st = kl.FP8_GEMM_TILES_F32
    builds.append((kl._fp8_gemm_kernel, dict(lin, M=i32, x_ptr="*fp32", o_ptr="*fp32", s_ptr="*u8"),   # float32 x
                   dict(BM=bm, BN=bn, BK=bk, GROUP=group, UE8M0=True), w, st))
    for fp4 in (True, False):
        moe = dict(w_ptr="*i8" if fp4 else "*fp8e4nv", s_ptr="*u8" if fp4 else "*fp32", h_ptr="*bf16", D=i32, I=i32,
                   sw_e=i32, sw_n=i32, ss_e=i32, ss_n=i32, ss_g=i32, sh=i32)
        flags = dict(FP4=fp4, UE8M0=fp4)
        gemv = dict(moe, experts_ptr="*i64", first=i32, n_local=i32, KS=i32, sp_s=i32)
        bn, g, w, st, _ = kl.MOE_LOWP_GEMV_TILES["fp4" if fp4 else "fp8"]
        builds += [(kl._moe_lowp_gemv_up_kernel, dict(gemv, x_ptr="*bf16", p_ptr="*fp32", K=i32, UP=i32, sx=i32,
                                                      sp_a=i32), dict(BN=bn, G=g, **flags), w, st),
                   (kl._moe_lowp_gemv_down_kernel, dict(gemv, ws_ptr="*fp8e4nv", wss_ptr="*u8" if fp4 else "*fp32",
                                                        part_ptr="*fp32", A=i32, KSS=i32, sws_n=i32, swss_n=i32,
                                                        sp=i32),
                    dict(BN=bn, G=g, BK8=kl.MOE_LOWP_SHARED_BK, **flags), w, st)]
        if fp4:         # (the SwiGLU between them holds no weights)
            builds.append((kl._moe_lowp_swiglu_kernel, dict(gemv, p_ptr="*fp32", gu_ptr="*bf16", h_ptr="*bf16",
                                                            weights_ptr="*fp32", A=i32, IS=i32, limit="fp32",
                                                            sp_a=i32, sgu=i32), dict(S=2, BLOCK=512, CLAMP=True), 4, 1))
        tiles = dict(moe, tile_expert_ptr="*i64", tile_start_ptr="*i64", tile_end_ptr="*i64")
        for bm, bn, bk, w, st in (t for _, t in kl.MOE_LOWP_TILES["fp4" if fp4 else "fp8"]):
            builds += [(kl._moe_lowp_up_kernel, dict(tiles, x_ptr="*bf16", token_ptr="*i64", weight_ptr="*fp32",
                                                     UP=i32, limit="fp32", sx=i32),
                        dict(BM=bm, BN=bn, BK=bk, CLAMP=True, **flags), w, st),
                       (kl._moe_lowp_down_kernel, dict(tiles, out_ptr="*fp32", assign_ptr="*i64", so=i32),
                        dict(BM=bm, BN=bn, BK=bk, **flags), w, st)]
        for bm, bn, bk, w, st in (kl.MOE_LOWP_TILES_F32,):              # float32 activations
            builds += [(kl._moe_lowp_up_kernel, dict(tiles, x_ptr="*fp32", h_ptr="*fp32", token_ptr="*i64",
                                                     weight_ptr="*fp32", UP=i32, limit="fp32", sx=i32),
                        dict(BM=bm, BN=bn, BK=bk, CLAMP=True, **flags), w, st),
                       (kl._moe_lowp_down_kernel, dict(tiles, h_ptr="*fp32", out_ptr="*fp32", assign_ptr="*i64",
                                                       so=i32), dict(BM=bm, BN=bn, BK=bk, **flags), w, st)]
    return builds


@pytest.mark.skipif(kernel_lowp.triton is None, reason="needs triton")
def test_lowp_kernels_compile_for_hopper_without_spills():
    """The compiler's path, which the interpreter skips: each kernel at its default tiles built for
    sm_90 (no GPU needed), pointers and sizes marked divisible by 16 as Triton specialises V4's
    shapes (top-k, expert ids and row counts not); no register spills, except the MXFP4 up kernel at
    the tiles kernel_lowp chose knowing that they spill (measured faster)."""
    from testkit.sm90 import build_sm90, spills
    unhinted = {"first", "n_local", "A", "M", "limit"}
    for fn, types, consts, warps, stages in sm90_builds():
        if fn is kernel_lowp._moe_lowp_gemv_up_kernel:
            unhinted = unhinted | {"K"}               # there: experts a token
        usage = build_sm90(fn, types, consts, warps, stages, unhinted)
        tiles = (consts.get("BM"), consts.get("BN"), consts.get("BK"), warps, stages)
        by_choice = fn is kernel_lowp._moe_lowp_up_kernel and consts["FP4"] and \
            tiles in kernel_lowp.MOE_LOWP_TILES_SPILLING
        assert by_choice or not spills(usage), f"{fn.__name__} {consts}: {usage}"


@pytest.mark.skipif(not torch.cuda.is_available() or kernel_lowp.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(CASES))
def test_lowp_kernel_on_cuda(name):
    CASES[name]("cuda")


if __name__ == "__main__":
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    sys.exit(1 if run_all("cuda" if on_gpu else "cpu") else 0)
