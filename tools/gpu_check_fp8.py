"""GPU checks of the shards that keep the release's FP8 / MXFP4 weights (convert.py --dtype fp8), run
on a CUDA machine (not by pytest); about 3 minutes on an H100:

    python -m tools.gpu_check_fp8

1. kernel_lowp's kernels against their torch references, natively (tests/test_kernel_lowp.py's cases);
2. float32: the Triton path on FP8 shards against the torch path on BF16 shards on the CPU, the
   tiny fixtures prefilled and decoded (python -m testkit.fp8 on CUDA);
3. bf16 on the GPU, Triton path with CUDA-graph decode, for V4 (MXFP4 experts, and FP8 experts) and
   R1 fixtures converted both ways: from three prompts, STEPS greedy tokens from the FP8 shards must
   equal those from the BF16 shards, and the logits along those tokens must lie within bf16 rounding
   of the BF16 shards': their relative difference at most twice the BF16 shards' own distance from
   the float32 torch path on the CPU (the rounding a bf16 run carries). Greedy tokens may part only at
   a tie within that rounding (parted_at_ties): wherever the FP8 shards' logits, fed the BF16 shards'
   tokens, pick another token, the BF16 shards' two best logits there lie within twice the BF16 shards'
   own largest distance from float32 at that step, so bf16 arithmetic cannot tell them apart (the
   two shard kinds sum in other orders; R1's fixture parts at such a tie). Where humming-kernels can run
   (USE_HUMMING=1, kernel_humming.py), the V4 FP8 shards once more with the MXFP4 experts on it.
4. USE_HUMMING=fp8 (FP8 activations, DeepSeek's numerics): kernel_humming's quantisation kernels,
   compiled, bit for bit against quant.act_quant_fp8; where humming-kernels can run, its grouped
   GEMM on those FP8 rows against float32 (within FP8_GEMM_TOL), and its MoE at V4-Flash's expert
   shapes against ops.moe_lowp_torch(fp8_activations=True): nearer than a third of the weight-only
   path's distance (a different summation order flips some of the intermediate's FP8 roundings, each
   a 6% step, so the two FP8 paths do not agree to bf16 rounding).
One line a check, then GPU CHECK PASSED or FAILED (exit status 1).
"""
import functools
import os
import subprocess
import sys
import tempfile

import torch

import kernel_humming
import ops
from quant import act_quant_fp8, dequant_act_fp8, dequant_fp4
from runtime import GraphedDecoder, greedy
from testkit.fp8 import awkward_rows, convert_to, rel_err, shard_model, write_r1, write_v4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
FP8_GEMM_TOL = 5e-3  # humming's FP8-activation GEMM against float32 on the same inputs: its bf16 output


def forced(model, prompt: torch.Tensor, tokens: torch.Tensor, step) -> torch.Tensor:
    """Logits [b, steps + 1, vocab] on the CPU: the prompt's, then one a decode step along tokens [b, steps]."""
    device = next(model.parameters()).device
    return greedy(model, prompt.to(device), tokens.size(1) + 1, tokens.to(device), step)[0]


def parted_at_ties(fp8: torch.Tensor, bf16: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor):
    """Where logits fp8 [b, steps + 1, vocab] (forced along tokens [b, steps], the greedy tokens of the
    bf16 logits) pick another token than tokens: (row, step, the bf16 logits' top-2 gap there, twice
    the largest distance of bf16 from the float32 reference logits there, a tie: gap within that)
    for each such place, in order."""
    places = []
    for row, step in (fp8.argmax(-1)[:, :-1] != tokens).nonzero().tolist():
        best = bf16[row, step].float().topk(2).values
        gap = (best[0] - best[1]).item()
        bound = 2 * (bf16[row, step].float() - reference[row, step].float()).abs().max().item()
        places.append((row, step, gap, bound, gap <= bound))
    return places


def compare(name: str, fp8: str, bf16: str, prompt: torch.Tensor, **fp8_overrides) -> bool:
    """Check 3 for one fixture (fp8_overrides: runtime fields of the FP8 shards' model): one line, True
    when it passed."""
    runs = {}
    for shards, folder, overrides in (("bf16", bf16, {}), ("fp8", fp8, fp8_overrides)):
        model = shard_model(folder, "bf16", "triton", "cuda", max_seq_len=128, max_batch_size=4, **overrides)
        decoder = GraphedDecoder(model)
        logits, tokens = greedy(model, prompt.cuda(), STEPS + 1, step=decoder)
        runs[shards] = (model, decoder, tokens, logits)
    tokens = runs["bf16"][2].cpu()
    same = torch.equal(runs["fp8"][2].cpu(), tokens)
    along = {shards: forced(model, prompt, tokens, decoder) for shards, (model, decoder, _, _) in runs.items()}
    cpu = shard_model(bf16, "fp32", "torch", "cpu", max_seq_len=128, max_batch_size=4)
    reference = forced(cpu, prompt, tokens, cpu.decode)
    rounding = rel_err(along["bf16"], reference)
    apart = rel_err(along["fp8"], along["bf16"])
    places = parted_at_ties(along["fp8"], along["bf16"], reference, tokens)
    ok = all(tie for *_, tie in places) and apart <= 2 * rounding
    where = "identical" if same else f"differ from step {(runs['fp8'][2].cpu() != tokens).any(0).nonzero()[0].item()}"
    if places:          # how close each call was where they part
        ties = sum(tie for *_, tie in places)
        row, step, gap, bound, _ = max(places, key=lambda p: p[2] / max(p[3], 1e-30))
        where += (f"; the FP8 shards pick another token at {len(places)} forced step(s), {ties} of them ties (the "
                  f"BF16 shards' top-2 gap within twice their distance from fp32 there); the widest: row {row} step "
                  f"{step}, gap {gap:.4f}, bound {bound:.4f}")
    print(f"{name:26s} bf16 GPU, FP8 vs BF16 shards: greedy {STEPS} tokens x {prompt.size(0)} {where}; logits rel diff "
          f"{apart:.2e} (BF16 shards vs CPU fp32: {rounding:.2e}) {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def check_fp8_activations(humming: bool) -> bool:
    """Check 4: one line each, True when all passed."""
    g = torch.Generator().manual_seed(2)
    x = awkward_rows(64, 4096, g).cuda()
    q, scale = kernel_humming.quant_rows_triton(x)
    want_q, want_scale = act_quant_fp8(x)
    ok = torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
    gu = (torch.randn(300, 4096, generator=g) * 3).bfloat16().cuda()
    weights, live = torch.rand(300, generator=g).cuda(), torch.tensor([250]).cuda()
    hq, hs = kernel_humming.swiglu_rows_triton(gu, weights, live, 2048, 2048, 10.0, fp8=True)
    want_hq, want_hs = act_quant_fp8(kernel_humming.swiglu_rows_triton(gu, weights, live, 2048, 2048, 10.0))
    ok &= torch.equal(hq.view(torch.uint8), want_hq.view(torch.uint8)) and torch.equal(hs, want_hs)
    print(f"FP8 activations, quantisation kernels vs quant.act_quant_fp8: {'bit for bit' if ok else 'FAILED'}",
          flush=True)
    if not humming:
        print("FP8 activations, humming's GEMM and MoE: not run, humming-kernels cannot run here", flush=True)
        return ok
    n_local, dim, inter, k = 8, 4096, 2048, 6
    w13 = (torch.randint(-128, 128, (n_local, 2 * inter, dim // 2), generator=g, dtype=torch.int8),
           (torch.randint(-1, 2, (n_local, 2 * inter, dim // 32), generator=g) + 121).to(torch.uint8))
    w2 = (torch.randint(-128, 128, (n_local, dim, inter // 2), generator=g, dtype=torch.int8),
          (torch.randint(-1, 2, (n_local, dim, inter // 32), generator=g) + 122).to(torch.uint8))
    w13, w2 = [(w.cuda(), e.view(torch.float8_e8m0fnu).cuda()) for w, e in (w13, w2)]
    gemm = kernel_humming.humming_grouped(*w13, "fp8")
    w0 = dequant_fp4(w13[0][1], w13[1][1], torch.float32)
    for m in (1, 40, 2400):                 # expert 1's run of m rows, the GEMM alone against float32
        rows = kernel_humming.quant_rows_triton(torch.randn(m, dim, generator=g).bfloat16().cuda())
        layout = torch.tensor([0, 0] + [m] * (n_local - 1)).cuda()
        err = rel_err(gemm(rows, layout), dequant_act_fp8(*rows, torch.float32) @ w0.T)
        good = err < FP8_GEMM_TOL
        ok &= good
        print(f"FP8 activations, humming's grouped w13 GEMM, {m} rows: rel diff {err:.2e} from float32 on the "
              f"same FP8 rows {'ok' if good else 'FAILED'}", flush=True)
    packed = kernel_humming.PackedExperts(w13, w2, activations="fp8")
    for t in (1, 40, 400):                  # 400 x 6 assignments: more than one sorting launch takes
        x = torch.randn(t, dim, generator=g).bfloat16().cuda()
        experts = torch.randint(0, 2 * n_local, (t, k), generator=g).cuda()       # half of them on this rank
        weights = torch.rand(t, k, generator=g).cuda()
        got = packed(x, weights, experts, 4, 10.0)
        want = ops.moe_lowp_torch(x, w13, w2, weights, experts, 4, 10.0, fp8_activations=True)
        bf16 = ops.moe_lowp_torch(x, w13, w2, weights, experts, 4, 10.0)
        err, apart = rel_err(got, want), rel_err(bf16, want)
        good = err < apart / 3
        ok &= good
        print(f"FP8 activations, humming MoE at V4-Flash's expert shapes, {t} tokens: rel diff {err:.2e} from "
              f"DeepSeek's numerics, under a third of the weight-only path's {apart:.2e} "
              f"{'ok' if good else 'FAILED'}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("tools/gpu_check_fp8.py needs a CUDA GPU")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    kernels = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "test_kernel_lowp.py")], env=env).returncode
    print(f"kernel cases: {'FAILED' if kernels else 'ok'}", flush=True)
    models = subprocess.run([sys.executable, "-m", "testkit.fp8"], cwd=ROOT, env=env).returncode
    print(f"Triton path on FP8 shards vs torch path on BF16 shards, fp32: {'FAILED' if models else 'ok'}", flush=True)
    failed = kernels != 0 or models != 0
    root = tempfile.mkdtemp()
    prompt = torch.randint(0, 129280, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cases = [("V4, MXFP4 experts", write_v4, None, {}), ("V4, FP8 experts", write_v4, "fp8", {}),
                 ("R1", write_r1, None, {})]
        why = kernel_humming.unavailable(torch.device("cuda"))
        failed |= not check_fp8_activations(why is None)
        if why:
            print(f"V4, MXFP4 experts on humming-kernels: not run, {why}", flush=True)
        else:
            wide = functools.partial(write_v4, hidden_size=128)      # outputs humming builds GEMMs for: 128+
            cases.append(("V4, MXFP4 on humming", wide, None, {"expert_kernels": "humming"}))
        for name, write, experts, overrides in cases:
            release = os.path.join(root, name.replace(" ", "").replace(",", "_"))
            write(release)
            failed |= not compare(name, convert_to(release, release, 1, "fp8", experts),
                                  convert_to(release, release, 1, "bf16"), prompt, **overrides)
    print("GPU CHECK", "FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
