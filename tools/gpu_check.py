"""GPU correctness, run on a CUDA machine (not by pytest): Triton kernels against the torch
references, then the fixture model on the GPU (Triton path, CUDA-graph decode) against the CPU
torch path: logits within bf16 tolerance and greedy tokens identical. Exits non-zero on a failure."""
import subprocess
import sys
import tempfile

import torch

from generate import generate
from random_release import write_release
from runtime import GraphedDecoder, greedy
from testkit.models import fixture_model


def build(path, weights, dtype, backend, device):
    return fixture_model(path, weights, dtype, backend, device, max_seq_len=256, max_batch_size=4)


class Reference:
    """A fixture release (seed), three prompts, and the CPU torch path's float32 greedy tokens and logits."""
    def __init__(self, seed: int, steps: int = 40):
        self.path = tempfile.mkdtemp()
        self.weights = write_release(self.path, seed=seed, n_files=2)
        self.prompt = torch.randint(0, 129280, (3, 21), generator=torch.Generator().manual_seed(seed + 1))
        self.steps = steps
        self.cpu = build(self.path, self.weights, "fp32", "torch", "cpu")
        self.logits, self.tokens = greedy(self.cpu, self.prompt, steps + 1)     # [3, steps + 1, vocab], [3, steps]

    def forced_rel_err(self, dtype, backend):
        """Logits along the CPU's token path (teacher-forced) on the GPU, relative error against the CPU's."""
        model = build(self.path, self.weights, dtype, backend, "cuda")
        step = GraphedDecoder(model) if model.ops.graphs else model.decode
        forced, _ = greedy(model, self.prompt.cuda(), self.steps + 1, self.tokens.cuda(), step)
        return ((forced - self.logits).norm() / self.logits.norm()).item()


def main() -> int:
    failures = subprocess.run([sys.executable, "-m", "testkit.cases"]).returncode != 0
    with torch.no_grad():
        ref = first = Reference(seed=0)
        gpu = build(ref.path, ref.weights, "fp32", "triton", "cuda")
        _, tokens = greedy(gpu, ref.prompt.cuda(), ref.steps + 1, step=GraphedDecoder(gpu))
        rel = ref.forced_rel_err("fp32", "triton")
        same = torch.equal(tokens.cpu(), ref.tokens)
        first_diff = (tokens.cpu() != ref.tokens).any(0).nonzero()
        print(f"fixture GPU triton fp32 vs CPU torch fp32: logits rel err {rel:.2e}; greedy {ref.steps} tokens x 3 "
              f"{'identical' if same else f'differ from step {first_diff[0].item()}'}")
        failures |= rel > 1e-3 or not same
        # bf16 drifts from float32 on a random tiny model whatever the kernels: rounding flips top-k
        # and routing choices, differently from one seed to the next (one seed has shown the Triton
        # path 1.6x the torch path's drift, the next 0.8x). Over three fixture seeds the Triton path's
        # mean drift must stay within 1.3x of the torch path's on the same GPU.
        drift = {"torch": [], "triton": []}
        for seed in (0, 1, 2):
            ref = first if seed == 0 else Reference(seed)
            for backend in drift:
                drift[backend].append(ref.forced_rel_err("bf16", backend))
            print(f"fixture seed {seed}, bf16 on the GPU vs CPU torch fp32: logits rel err torch path "
                  f"{drift['torch'][-1]:.3f}, Triton path {drift['triton'][-1]:.3f}")
        mean = {backend: sum(v) / len(v) for backend, v in drift.items()}
        ok = mean["triton"] <= 1.3 * mean["torch"]
        print(f"bf16 mean drift over 3 seeds: torch path {mean['torch']:.3f}, Triton path {mean['triton']:.3f} "
              f"({'ok' if ok else 'FAILED'}: at most 1.3x)")
        failures |= not ok
        # generate.py's loop (shared positions, prompts of different lengths, graphed decode steps)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 129280, (n,), generator=gen).tolist() for n in (5, 17, 30)]
        want = generate(first.cpu, prompts, 24, eos_id=1)
        gpu = build(first.path, first.weights, "fp32", "triton", "cuda")
        got = generate(gpu, prompts, 24, eos_id=1, decoder=GraphedDecoder(gpu))
        print(f"generate.py loop, GPU fp32 with CUDA-graph decode vs CPU torch fp32: "
              f"{'identical' if got == want else 'DIFFERENT'} completions")
        failures |= got != want
    print("GPU CHECK", "FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
