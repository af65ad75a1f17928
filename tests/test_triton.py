"""The Triton kernels, run on the CPU by Triton's interpreter, against their torch references; and
built for the H100 (sm_90) by Triton's compiler, which the interpreter skips."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernels_match_torch_references_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "testkit.cases"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    total, failed = map(int, re.search(r"^(\d+) checks, (\d+) failed$", run.stdout, re.M).groups())
    assert failed == 0 and total >= 40 and run.stdout.count(" ok\n") == total, run.stdout


def sm90_builds():
    """(kernel, argument types, constexprs, warps, stages) of kernel.py's attention and grouped-MoE
    kernels at the tiles their launchers choose on an H100, for V4's shapes (64 heads of 512, experts
    4096 -> 2048) and R1's absorbed MLA (latent 512, rope 64), bf16 inputs; and of the few-row linear
    (both its tiles), the few-token MoE's sum (two slices of 6 assignments and the shared row), and the HC
    mixes and sublayer entry at V4's hc = 4."""
    import kernel

    def types(fn, floats=(), **pointers):
        """Every *_ptr argument of fn its given type (default bf16), floats fp32, the rest i32."""
        return {name: pointers.get(name, "*bf16") if name.endswith("_ptr") else "fp32" if name in floats else "i32"
                for name in fn.arg_names}

    builds = []
    for block_h, block_k, warps in ((64, 16, 8), (16, 32, 4)):                 # prefill, decode
        for split in (False, True):
            attn = types(kernel._sparse_attn_kernel, ["scale"], sink_ptr="*fp32", idx_ptr="*i64",
                         part_ptr="*fp32" if split else "*bf16")
            builds.append((kernel._sparse_attn_kernel, attn, dict(D=512, BLOCK_H=block_h, BLOCK_K=block_k, SPLIT=split,
                                                                 PRECISION="tf32"), warps, 3))
    builds.append((kernel._sparse_attn_merge_kernel, types(kernel._sparse_attn_merge_kernel, part_ptr="*fp32",
                                                           sink_ptr="*fp32"), dict(D=512, BLOCK_P=8), 4, 3))
    tile_ptrs = dict(tile_expert_ptr="*i64", tile_start_ptr="*i64", tile_end_ptr="*i64")
    for bm, bn, bk, warps, stages in (kernel.MOE_TILES_SMALL, kernel.MOE_TILES_LARGE, kernel.MOE_TILES_MODEST):
        builds += [(kernel._moe_up_kernel, types(kernel._moe_up_kernel, ["limit"], token_ptr="*i64",
                                                 weight_ptr="*fp32", **tile_ptrs),
                    dict(BM=bm, BN=bn, BK=bk, CLAMP=True, PRECISION="tf32"), warps, stages),
                   (kernel._moe_down_kernel, types(kernel._moe_down_kernel, out_ptr="*fp32", assign_ptr="*i64",
                                                   **tile_ptrs), dict(BM=bm, BN=bn, BK=bk, PRECISION="tf32"), warps, stages)]
    for bn, bk, warps, stages in kernel.LINEAR_ROWS_TILES:
        builds.append((kernel._linear_rows_kernel, types(kernel._linear_rows_kernel, o_ptr="*fp32"),
                       dict(BN=bn, BK=bk), warps, stages))
    builds.append((kernel._moe_gemv_sum_kernel, types(kernel._moe_gemv_sum_kernel, part_ptr="*fp32"),
                   dict(RP=16, BLOCK=kernel.MOE_GEMV_SUM_BLOCK, SHARED=True), 4, 3))
    for post in (False, True):          # the HC mixes of few tokens, with and without the streams made first
        builds.append((kernel._hc_mix_few_kernel, types(kernel._hc_mix_few_kernel, post_ptr="*fp32", comb_ptr="*fp32",
                                                        fn_ptr="*fp32", part_ptr="*fp32"),
                       dict(HC=4, MP=32, BLOCK_D=kernel.HC_FEW_BLOCK_D, POST=post), 4, 3))
    builds.append((kernel._hc_pre_kernel, types(kernel._hc_pre_kernel, ["norm_eps", "eps"], part_ptr="*fp32",
                                                scale_ptr="*fp32", base_ptr="*fp32", w_ptr="*fp32", pre_ptr="*fp32",
                                                post_ptr="*fp32", comb_ptr="*fp32"),       # a decode sublayer's entry
                   dict(HC=4, M=24, BLOCK_S=64, BLOCK_D=4096, NORM=True, MIX=True, HEAD=False, OUT_NORM=True,
                        ALONE=True), 2, 3))
    block_n, warps, stages = kernel.MLA_TILES
    builds.append((kernel._mla_decode_kernel, types(kernel._mla_decode_kernel, ["scale"], pos_ptr="*i64",
                                                    part_ptr="*fp32", stat_ptr="*fp32"),
                   dict(C=512, R=64, BC=512, BR=64, BLOCK_H=kernel.MLA_BLOCK_H, BLOCK_N=block_n, PRECISION="tf32"),
                   warps, stages))
    return builds


def test_attention_and_moe_kernels_compile_for_hopper():
    """The compiler's path, which the interpreter skips, for the kernels built on the shared online
    softmax and expert-tile helpers, the decode step's few-row linear and MoE sum, and the HC kernels: each builds for
    sm_90 (no GPU needed), without register spills
    except in the prefill attention tile, whose 64 heads of 512 spill by design (measured faster than
    smaller tiles: kernel.sparse_attn_triton)."""
    from testkit.sm90 import build_sm90, spills
    for fn, types, consts, warps, stages in sm90_builds():
        usage = build_sm90(fn, types, consts, warps, stages, unhinted={"S", "H", "K", "NSPLIT", "positions_per_split"})
        prefill_tile = fn.__name__ == "_sparse_attn_kernel" and consts["BLOCK_H"] == 64 and not consts["SPLIT"]
        assert prefill_tile or not spills(usage), f"{fn.__name__} {consts}: {usage}"
