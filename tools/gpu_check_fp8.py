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
   the float32 torch path on the CPU (the rounding a bf16 run carries). Where humming-kernels can run
   (USE_HUMMING=1, kernel_humming.py), the V4 FP8 shards once more with the MXFP4 experts on it.
One line a check, then GPU CHECK PASSED or FAILED (exit status 1).
"""
import functools
import os
import subprocess
import sys
import tempfile

import torch

import kernel_humming
from runtime import GraphedDecoder, greedy
from testkit.fp8 import convert_to, rel_err, shard_model, write_r1, write_v4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def forced(model, prompt: torch.Tensor, tokens: torch.Tensor, step) -> torch.Tensor:
    """Logits [b, steps + 1, vocab] on the CPU: the prompt's, then one a decode step along tokens [b, steps]."""
    device = next(model.parameters()).device
    return greedy(model, prompt.to(device), tokens.size(1) + 1, tokens.to(device), step)[0]


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
    rounding = rel_err(along["bf16"], forced(cpu, prompt, tokens, cpu.decode))
    apart = rel_err(along["fp8"], along["bf16"])
    ok = same and apart <= 2 * rounding
    where = "identical" if same else f"differ from step {(runs['fp8'][2].cpu() != tokens).any(0).nonzero()[0].item()}"
    parted = [] if same else (along["fp8"].argmax(-1)[:, :-1] != tokens).nonzero()
    if len(parted):     # how close the call was where they part: the BF16 shards' two best logits there
        row, step = parted[0].tolist()
        best = along["bf16"][row, step].float().topk(2).values
        gap = (along["fp8"][row, step].float() - along["bf16"][row, step].float()).abs().max()
        where += (f" (row {row}: BF16 shards' top-2 logits {best[0]:.4f} / {best[1]:.4f}, FP8 shards' logits up to "
                  f"{gap:.4f} from BF16's there)")
    print(f"{name:26s} bf16 GPU, FP8 vs BF16 shards: greedy {STEPS} tokens x {prompt.size(0)} {where}; logits rel diff "
          f"{apart:.2e} (BF16 shards vs CPU fp32: {rounding:.2e}) {'ok' if ok else 'FAILED'}", flush=True)
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
