"""GPU correctness, run on a CUDA machine (not by pytest): Triton kernels against the torch
references, then the fixture model on the GPU (Triton path, CUDA-graph decode) against the CPU
torch path: logits within bf16 tolerance and greedy tokens identical. Exits non-zero on a failure."""
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from fixtures import fixture_model, write_release  # noqa: E402
from generate import generate  # noqa: E402
from model import GraphedDecoder  # noqa: E402


def build(path, weights, dtype, backend, device):
    return fixture_model(path, weights, dtype, backend, device, max_seq_len=256, max_batch_size=4)


def greedy(model, prompt, steps, step_fn):
    """Prefill the prompt [b, s], then `steps` greedy tokens; returns tokens [b, steps] and logits."""
    logits = model(prompt, 0)
    tokens, all_logits = [], [logits]
    pos = prompt.size(1)
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = step_fn(nxt, torch.full((prompt.size(0),), pos, device=prompt.device))
        all_logits.append(logits)
        pos += 1
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def main() -> int:
    failures = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py")]).returncode != 0
    path = tempfile.mkdtemp()
    weights = write_release(path, seed=0, n_files=2)
    prompt = torch.randint(0, 129280, (3, 21), generator=torch.Generator().manual_seed(1))
    steps = 40
    with torch.no_grad():
        cpu = build(path, weights, "fp32", "torch", "cpu")
        ref_tokens, ref_logits = greedy(cpu, prompt, steps, lambda ids, pos: cpu(ids, pos))
        def forced_rel_err(dtype, backend):
            """Logits along the CPU's token path (teacher-forced), relative error against the CPU's."""
            model = build(path, weights, dtype, backend, "cuda")
            step = GraphedDecoder(model) if backend != "torch" else model
            forced = [model(prompt.cuda(), 0)]
            for i in range(steps):
                pos = torch.full((3,), prompt.size(1) + i, device="cuda")
                forced.append(step(ref_tokens[:, i:i + 1].cuda(), pos))
            forced = torch.stack(forced, 1).cpu()
            return ((forced - ref_logits).norm() / ref_logits.norm()).item()

        # bf16 drifts from float32 on this random model whatever the kernels (rounding flips top-k
        # and routing choices): the Triton path must stay within 1.5x of the torch path's drift.
        bf16_torch = forced_rel_err("bf16", "torch")
        for dtype in ("fp32", "bf16"):
            gpu = build(path, weights, dtype, "triton", "cuda")
            tokens, _ = greedy(gpu, prompt.cuda(), steps, GraphedDecoder(gpu))
            rel = forced_rel_err(dtype, "triton")
            same = torch.equal(tokens.cpu(), ref_tokens)
            first_diff = (tokens.cpu() != ref_tokens).any(0).nonzero()
            print(f"fixture GPU triton {dtype} vs CPU torch fp32: logits rel err {rel:.2e}"
                  + (f" (GPU torch bf16: {bf16_torch:.2e})" if dtype == "bf16" else "")
                  + f"; greedy {steps} tokens x 3 {'identical' if same else f'differ from step {first_diff[0].item()}'}")
            failures |= (rel > 1e-3 or not same) if dtype == "fp32" else rel > 1.5 * bf16_torch
        # generate.py's loop (shared positions, prompts of different lengths, graphed decode steps)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 129280, (n,), generator=gen).tolist() for n in (5, 17, 30)]
        want = generate(cpu, prompts, 24, eos_id=1)
        gpu = build(path, weights, "fp32", "triton", "cuda")
        got = generate(gpu, prompts, 24, eos_id=1, decoder=GraphedDecoder(gpu))
        print(f"generate.py loop, GPU fp32 with CUDA-graph decode vs CPU torch fp32: "
              f"{'identical' if got == want else 'DIFFERENT'} completions")
        failures |= got != want
    print("GPU CHECK", "FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
