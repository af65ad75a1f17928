"""Micro-benchmark of kernel_lowp.py on a CUDA GPU at DeepSeek-V4-Flash shapes, against the BF16 path.

    python -m tools.bench_lowp --out $OUT/lowp.json

- FP8 linear: F.linear on the bf16 weight vs linear_fp8_triton on the e4m3 weight with ue8m0 block scales,
  for wq_a (4096 -> 1024), wq_b (1024 -> 64 x 512) and wo_b (8192 -> 4096) at 1, 8, 32, 128, 4096 rows.
- MoE decode (256 experts of 4096 x 2048, top-6, random routing, one shared expert of 2048, clamp 10):
  the shared expert's up projection then kernel.moe_gemv_triton (bf16) vs linear_fp8_triton then
  moe_gemv_lowp_triton (MXFP4 routed, FP8 shared) at batch 1 and 32.
- MoE prefill: kernel.moe_experts_triton vs moe_experts_lowp_triton (routed experts) at 4096 tokens.

The BF16 weights are the low-precision ones dequantised, so both sides compute the same function; each
output's max abs error is against the float32 torch references (ops.linear_lowp_torch,
ops.moe_lowp_torch). Times are CUDA graph replays (median of reps after warm-up), each graph calling
the op once per weight copy where copies are needed to keep the weights out of L2 (as a decode step
meets them: once, after the other layers' weights). GB/s counts the bytes a call must read from
memory (weights and scales of the matrices, or of the distinct experts, it touches, plus its
activations); % BW is that against a large device-to-device copy. Prints a table and writes it, with
the device and settings, as JSON.

With --peer humming it times, instead, the same weights through humming-kernels (vLLM's JIT CUDA W4A16 /
W8A16 GEMMs, `pip install humming-kernels`; it compiles with nvcc at first use) beside ours and cuBLAS
BF16: the FP8 linears, and the 6 experts' MXFP4 w13 of a decode step as one dense [6 x 4096, 4096]
matrix (the bytes our MoE up kernel reads for one token) at 1-4096 rows.

With --sweep it times, instead, each kernel under a list of tile choices (FP8 linear at 1-128 rows,
the MoE decode kernels at batch 1 and 32, both MoE paths) and prints the fastest per shape: the data
behind the launchers' default tiles.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import kernel
import kernel_lowp
from kernel_humming import humming_layer
import ops
from quant import FP8_BLOCK, dequant_fp4, dequant_fp8

DIM, INTER, EXPERTS, TOPK, SHARED_INTER, LIMIT = 4096, 2048, 256, 6, 2048, 10.0
LINEARS = {"wq_a": (1024, 4096), "wq_b": (64 * 512, 1024), "wo_b": (4096, 8192)}    # name: (out, in)
ROWS = (1, 8, 32, 128, 4096)
MOE_DECODE_BATCHES = (1, 32)
MOE_PREFILL_TOKENS = 4096
L2_SPAN = 256 << 20         # weight copies cycled per graph span at least this many bytes


def graph_ms(calls, reps: int = 30, warmup: int = 3) -> float:
    """Median ms of one call: `calls` (one per weight copy) captured in one CUDA graph, replayed."""
    for call in calls:
        call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copy_gbps() -> float:
    """Device-to-device copy of 2 GiB: bytes read plus written per second, in GB/s."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = graph_ms([lambda: b.copy_(a)], reps=20)
    return 2 * a.numel() / ms / 1e6


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fp8_weight(n: int, k: int, g: torch.Generator):
    """Random e4m3 weight [n, k] and ue8m0 block scales [n/128, k/128] giving entries about 1/sqrt(k)."""
    w = (torch.randn(n, k, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    exp = torch.randint(-1, 2, (-(-n // 128), -(-k // 128)), device="cuda", generator=g) - 6 - (k.bit_length() - 1) // 2
    return w, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp4_weight(e: int, n: int, k: int, g: torch.Generator):
    """Random MXFP4 experts: packed [e, n, k/2] int8 and ue8m0 scales [e, n, k/32] (entries about 1/sqrt(k))."""
    packed = torch.randint(-128, 128, (e, n, k // 2), device="cuda", generator=g, dtype=torch.int8)
    exp = torch.randint(-1, 2, (e, n, k // 32), device="cuda", generator=g) - 2 - (k.bit_length() - 1) // 2
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp4_as_bf16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[e, n, k] bf16 of stacked MXFP4 experts, one expert at a time (a whole dequantisation at once
    would need several times the bf16 size)."""
    out = torch.empty(packed.size(0), packed.size(1), 2 * packed.size(2), dtype=torch.bfloat16, device="cuda")
    for e in range(packed.size(0)):
        out[e] = dequant_fp4(packed[e], scale[e])
    return out


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def row(op: str, size: int, bf16_ms: float, lowp_ms: float, bf16_bytes: int, lowp_bytes: int, bw: float,
        bf16_err: float, lowp_err: float, flops: float) -> dict:
    return {"op": op, "rows": size, "bf16_ms": bf16_ms, "lowp_ms": lowp_ms, "speedup": bf16_ms / lowp_ms,
            "bf16_gbps": bf16_bytes / bf16_ms / 1e6, "lowp_gbps": lowp_bytes / lowp_ms / 1e6,
            "bf16_bw_pct": 100 * bf16_bytes / bf16_ms / 1e6 / bw, "lowp_bw_pct": 100 * lowp_bytes / lowp_ms / 1e6 / bw,
            "bf16_tflops": flops / bf16_ms / 1e9, "lowp_tflops": flops / lowp_ms / 1e9,
            "bf16_max_err": bf16_err, "lowp_max_err": lowp_err}


def bench_linears(bw: float, g: torch.Generator, say) -> list:
    rows = []
    for name, (n, k) in LINEARS.items():
        w, s = fp8_weight(n, k, g)
        wb = dequant_fp8(w, s)
        copies = max(1, min(16, L2_SPAN // nbytes(w)))
        fp8 = [(w.clone(), s.clone()) for _ in range(copies)]
        bf16 = [wb.clone() for _ in range(max(1, min(16, L2_SPAN // nbytes(wb))))]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            ref = ops.linear_lowp_torch(x, w, s, torch.float32)
            lowp_err = max_err(kernel_lowp.linear_fp8_triton(x, w, s), ref)
            bf16_err = max_err(F.linear(x, wb), ref)
            reps = 10 if m >= 4096 else 30
            bf16_ms = graph_ms([lambda c=c: F.linear(x, c) for c in bf16], reps)
            lowp_ms = graph_ms([lambda c=c: kernel_lowp.linear_fp8_triton(x, *c) for c in fp8], reps)
            rows.append(row(f"linear {name} {k}->{n}", m, bf16_ms, lowp_ms, nbytes(wb, x), nbytes(w, s, x), bw,
                            bf16_err, lowp_err, 2.0 * m * n * k))
            say(rows[-1])
        del fp8, bf16
    return rows


def bench_moe(bw: float, g: torch.Generator, say) -> list:
    w13, w2 = fp4_weight(EXPERTS, 2 * INTER, DIM, g), fp4_weight(EXPERTS, DIM, INTER, g)
    s13, sw2 = fp8_weight(2 * SHARED_INTER, DIM, g), fp8_weight(DIM, SHARED_INTER, g)
    b13, b2 = fp4_as_bf16(*w13), fp4_as_bf16(*w2)
    bs13, bsw2 = dequant_fp8(*s13), dequant_fp8(*sw2)
    expert_bf16, expert_lowp = nbytes(b13[0], b2[0]), nbytes(w13[0][0], w13[1][0], w2[0][0], w2[1][0])
    rows = []
    for t in MOE_DECODE_BATCHES:
        x = torch.randn(t, DIM, device="cuda", generator=g).bfloat16()
        experts = torch.rand(t, EXPERTS, device="cuda", generator=g).topk(TOPK, dim=-1).indices
        weights = torch.rand(t, TOPK, device="cuda", generator=g)
        distinct = experts.unique().numel()

        def bf16_call():
            return kernel.moe_gemv_triton(x, b13, b2, weights, experts, 0, LIMIT, F.linear(x, bs13), bsw2,
                                          torch.bfloat16)

        def lowp_call():
            return kernel_lowp.moe_gemv_lowp_triton(x, w13, w2, weights, experts, 0, LIMIT,
                                                    kernel_lowp.linear_fp8_triton(x, *s13), sw2, torch.bfloat16)

        ref = ops.moe_lowp_torch(x, w13, w2, weights, experts, 0, LIMIT, ops.linear_lowp_torch(x, *s13), sw2)
        flops = 2.0 * t * (TOPK * 3 * DIM * INTER + 3 * DIM * SHARED_INTER)
        rows.append(row(f"moe decode ({distinct} experts + shared)", t, graph_ms([bf16_call]), graph_ms([lowp_call]),
                        distinct * expert_bf16 + nbytes(bs13, bsw2, x), distinct * expert_lowp + nbytes(*s13, *sw2, x),
                        bw, max_err(bf16_call(), ref), max_err(lowp_call(), ref), flops))
        say(rows[-1])
    t = MOE_PREFILL_TOKENS
    x = torch.randn(t, DIM, device="cuda", generator=g).bfloat16()
    experts = torch.rand(t, EXPERTS, device="cuda", generator=g).topk(TOPK, dim=-1).indices
    weights = torch.rand(t, TOPK, device="cuda", generator=g)
    ref = ops.moe_lowp_torch(x, w13, w2, weights, experts, 0, LIMIT)
    bf16_out = kernel.moe_experts_triton(x, b13, b2, weights, experts, 0, LIMIT)
    lowp_out = kernel_lowp.moe_experts_lowp_triton(x, w13, w2, weights, experts, 0, LIMIT)
    bf16_ms = graph_ms([lambda: kernel.moe_experts_triton(x, b13, b2, weights, experts, 0, LIMIT)], reps=10)
    lowp_ms = graph_ms([lambda: kernel_lowp.moe_experts_lowp_triton(x, w13, w2, weights, experts, 0, LIMIT)], reps=10)
    distinct = experts.unique().numel()
    rows.append(row(f"moe prefill grouped ({distinct} experts)", t, bf16_ms, lowp_ms,
                    distinct * expert_bf16 + nbytes(x), distinct * expert_lowp + nbytes(x), bw,
                    max_err(bf16_out, ref), max_err(lowp_out, ref), 2.0 * t * TOPK * 3 * DIM * INTER))
    say(rows[-1])
    return rows


FP8_SWEEP_ROWS = (1, 8, 32, 128)
FP8_SWEEP = [(bn, bk, 4, st) for bn, bk in ((4, 1024), (8, 512), (16, 256), (32, 128)) for st in (2, 3, 4)] + \
    [(bm, bn, bk, 1, w, st) for bm in (16, 32) for bn in (16, 32, 64, 128) for bk in (64, 128)
     for w in (4, 8) for st in (3, 4) if bn * bk <= 8192]
MOE_GEMV_SWEEP = [(bn, g, 4, st, split) for bn in (32, 64) for g in (4, 8, 16) for st in (2, 3)
                  for split in (1, 2, 4)]
MOE_GROUPED_SWEEP = [(16, bn, bk, w, st) for bn in (32, 64, 128) for bk in (64, 128, 256) for w in (4, 8)
                     for st in (3, 4) if bn * bk <= 16384]


def fastest(label: str, candidates, call, ref, say, reps: int = 20) -> None:
    """Time call(tiles) for each candidate (a failure to build or a wrong result is skipped) and print the
    fastest five."""
    timed = []
    for tiles in candidates:
        try:
            out = call(tiles)
            err = max_err(out, ref)
            if not err < 0.05 * ref.float().abs().max().item() + 1e-3:
                say(f"  {label} {tiles}: wrong (max err {err:.3g})")
                continue
            timed.append((graph_ms([lambda: call(tiles)], reps), tiles))
        except Exception as e:  # noqa: BLE001 - a tile choice the compiler or the device refuses is skipped
            say(f"  {label} {tiles}: {type(e).__name__} {str(e).splitlines()[0][:100]}")
    timed.sort()
    say(f"{label}: " + ", ".join(f"{tiles} {ms * 1e3:.1f} us" for ms, tiles in timed[:5]))


def sweep(g: torch.Generator, say, parts) -> None:
    for name, (n, k) in LINEARS.items() if "fp8" in parts else ():
        w, s = fp8_weight(n, k, g)
        for m in FP8_SWEEP_ROWS:
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            ref = ops.linear_lowp_torch(x, w, s, torch.float32)
            fastest(f"fp8 {name} rows {m}", [t for t in FP8_SWEEP if len(t) == 4 or m <= t[0] or m > 16],
                    lambda t: kernel_lowp.linear_fp8_triton(x, w, s, tiles=t), ref, say)
    if "moe" not in parts:
        return
    w13, w2 = fp4_weight(EXPERTS, 2 * INTER, DIM, g), fp4_weight(EXPERTS, DIM, INTER, g)
    s13, sw2 = fp8_weight(2 * SHARED_INTER, DIM, g), fp8_weight(DIM, SHARED_INTER, g)
    for t in MOE_DECODE_BATCHES:
        x = torch.randn(t, DIM, device="cuda", generator=g).bfloat16()
        experts = torch.rand(t, EXPERTS, device="cuda", generator=g).topk(TOPK, dim=-1).indices
        weights = torch.rand(t, TOPK, device="cuda", generator=g)
        gu = kernel_lowp.linear_fp8_triton(x, *s13)
        ref = ops.moe_lowp_torch(x, w13, w2, weights, experts, 0, LIMIT, gu, sw2)
        fastest(f"moe gemv batch {t}", MOE_GEMV_SWEEP,
                lambda tl_: kernel_lowp.moe_gemv_lowp_triton(x, w13, w2, weights, experts, 0, LIMIT, gu, sw2,
                                                             torch.float32, tl_), ref, say)
        ref = ops.moe_lowp_torch(x, w13, w2, weights, experts, 0, LIMIT)
        fastest(f"moe grouped batch {t}", MOE_GROUPED_SWEEP,
                lambda tl_: kernel_lowp.moe_experts_lowp_triton(x, w13, w2, weights, experts, 0, LIMIT, tl_), ref, say)


def moe_up_alone(x: torch.Tensor, w13) -> torch.Tensor:
    """kernel_lowp's few-token MoE up kernel alone (its default tiles) for one token x [1, D] routed to
    experts 0 .. E-1 of w13 (MXFP4, E of them): its float32 partial sums [split, E, 2 I]."""
    packed, scale = w13[0], kernel_lowp.fp4_scale_arg(w13[1])
    e, inter = packed.size(0), packed.size(1) // 2
    tiles = kernel_lowp.MOE_LOWP_GEMV_TILES["fp4"]
    return kernel_lowp.moe_gemv_up_lowp(x, packed, scale, torch.arange(e, device=x.device).view(1, e), 0, inter,
                                        True, True, tiles, kernel_lowp._k_split(tiles[4], DIM, inter))


def peer_humming(bw: float, g: torch.Generator, say) -> None:
    """Ours, humming-kernels' and cuBLAS BF16 on the same weights: the FP8 linears (block scales as float32
    scale_inv) and the decode step's 6 MXFP4 experts' w13 as one dense matrix."""
    say(f"{'weight':34s} {'rows':>5s} {'ours us':>9s} {'humming us':>10s} {'bf16 us':>9s} {'ours %BW':>8s} "
        f"{'humming %BW':>11s} {'humming err':>11s}")

    def line(label, m, ours_ms, peer_ms, bf16_ms, lowp_bytes, err):
        ours = "" if ours_ms is None else f"{ours_ms * 1e3:9.1f}"
        ours_bw = "" if ours_ms is None else f"{100 * lowp_bytes / ours_ms / 1e6 / bw:7.0f}%"
        say(f"{label:34s} {m:5d} {ours:>9s} {peer_ms * 1e3:10.1f} {bf16_ms * 1e3:9.1f} {ours_bw:>8s} "
            f"{100 * lowp_bytes / peer_ms / 1e6 / bw:10.0f}% {err:11.2e}")

    for name, (n, k) in LINEARS.items():
        w, s = fp8_weight(n, k, g)
        wb = dequant_fp8(w, s)
        layer = humming_layer({"quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}, n, k,
                              {"weight": w, "weight_scale_inv": s.float()})
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            ref = ops.linear_lowp_torch(x, w, s, torch.float32)
            err = max_err(layer(x), ref) / ref.abs().max().item()
            reps = 10 if m >= 4096 else 30
            line(f"fp8 {name} {k}->{n}", m, graph_ms([lambda: kernel_lowp.linear_fp8_triton(x, w, s)], reps),
                 graph_ms([lambda: layer(x)], reps), graph_ms([lambda: F.linear(x, wb)], reps), nbytes(w, s, x), err)
        del layer, wb
    w13 = fp4_weight(TOPK, 2 * INTER, DIM, g)
    n = TOPK * 2 * INTER
    packed, scale = w13[0].view(torch.uint8).reshape(n, DIM // 2), w13[1].view(torch.uint8).reshape(n, DIM // 32)
    layer = humming_layer({"quant_method": "mxfp4"}, n, DIM, {"weight": packed, "weight_scale": scale})
    wb = fp4_as_bf16(*w13).reshape(n, DIM)
    for m in ROWS:
        x = torch.randn(m, DIM, device="cuda", generator=g).bfloat16()
        ref = x.float() @ wb.float().t()
        err = max_err(layer(x), ref) / ref.abs().max().item()
        reps = 10 if m >= 4096 else 30
        ours = None
        if m == 1:      # our MoE decode up kernel alone on the same bytes: one token meeting the 6 experts
            ours = graph_ms([lambda: moe_up_alone(x, w13)], reps)
        line(f"mxfp4 {TOPK} experts' w13 {DIM}->{n}", m, ours, graph_ms([lambda: layer(x)], reps),
             graph_ms([lambda: F.linear(x, wb)], reps), nbytes(packed, scale, x), err)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the results as JSON")
    p.add_argument("--peer", choices=["humming"], help="time humming-kernels beside ours instead (prints only)")
    p.add_argument("--sweep", nargs="*", choices=["fp8", "moe"],
                   help="time the tile choices of these kernels (default both) instead (prints only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or kernel.triton is None:
        raise SystemExit("bench_lowp.py needs a CUDA GPU and triton")
    began = time.time()
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.peer:
        bw = copy_gbps()
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw:.0f} GB/s (read + write)")
        peer_humming(bw, g, lambda line: print(line, flush=True))
        return
    if args.sweep is not None:
        sweep(g, lambda line: print(line, flush=True), args.sweep or ["fp8", "moe"])
        return
    bw = copy_gbps()
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bw:.0f} GB/s (read + write)")
    head = (f"{'op':40s} {'rows':>5s} {'bf16 ms':>9s} {'lowp ms':>9s} {'speedup':>7s} {'bf16 GB/s':>9s} "
            f"{'lowp GB/s':>9s} {'lowp %BW':>8s} {'lowp TF/s':>9s} {'bf16 err':>9s} {'lowp err':>9s}")
    print(head)

    def say(r):
        print(f"{r['op']:40s} {r['rows']:5d} {r['bf16_ms']:9.4f} {r['lowp_ms']:9.4f} {r['speedup']:7.2f} "
              f"{r['bf16_gbps']:9.0f} {r['lowp_gbps']:9.0f} {r['lowp_bw_pct']:7.1f}% {r['lowp_tflops']:9.1f} "
              f"{r['bf16_max_err']:9.2e} {r['lowp_max_err']:9.2e}", flush=True)

    rows = bench_linears(bw, g, say) + bench_moe(bw, g, say)
    result = {"device": device, "copy_gbps": bw, "torch": torch.__version__, "triton": kernel.triton.__version__,
              "settings": {"fp8_row_max_m": kernel_lowp.FP8_ROW_MAX_M, "fp8_row_tiles": kernel_lowp.FP8_ROW_TILES,
                           "fp8_gemv_tiles": kernel_lowp.FP8_GEMV_TILES, "fp8_gemm_tiles": kernel_lowp.FP8_GEMM_TILES,
                           "moe_lowp_gemv_tiles": kernel_lowp.MOE_LOWP_GEMV_TILES,
                           "moe_lowp_tiles": kernel_lowp.MOE_LOWP_TILES},
              "rows": rows, "elapsed_s": time.time() - began}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
