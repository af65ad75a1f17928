"""GPU correctness, run on a CUDA machine (not by pytest): Triton kernels against the torch
references, then each fixture model on the GPU (Triton path, CUDA-graph decode) against the CPU
torch path: logits within bf16 tolerance and greedy tokens identical. Exits non-zero on a failure.

    python -m tools.gpu_check [--fixtures V4 R1]

Fixtures: V4, model.py on random_release's tiny release; R1, model_v3.py on testkit/release_v3's
tiny release in DeepSeek-R1's format (FP8 weights with block scales, dense and MoE layers, expert
groups), plus the absorbed-MLA decode kernel at R1's real shapes (128 heads, latent 512, rope 64)
against its torch reference."""
import argparse
import subprocess
import sys
import tempfile

import torch

import kernel
from generate import generate
from ops import mla_decode_torch
from random_release import write_release
from runtime import GraphedDecoder, greedy
from testkit.models import fixture_model, fixture_model_v3
from testkit.release_v3 import write_release_v3

# name -> (writes a random release and returns its values, builds our model on them)
FIXTURES = {"V4": (write_release, fixture_model), "R1": (write_release_v3, fixture_model_v3)}


def build(fixture, path, weights, dtype, backend, device):
    return FIXTURES[fixture][1](path, weights, dtype, backend, device, max_seq_len=256, max_batch_size=4)


class Reference:
    """A fixture release (seed), three prompts, and the CPU torch path's float32 greedy tokens and logits."""
    def __init__(self, fixture: str, seed: int, steps: int = 40):
        self.fixture = fixture
        self.path = tempfile.mkdtemp()
        self.weights = FIXTURES[fixture][0](self.path, seed=seed, n_files=2)
        self.prompt = torch.randint(0, 129280, (3, 21), generator=torch.Generator().manual_seed(seed + 1))
        self.steps = steps
        self.cpu = build(fixture, self.path, self.weights, "fp32", "torch", "cpu")
        self.logits, self.tokens = greedy(self.cpu, self.prompt, steps + 1)     # [3, steps + 1, vocab], [3, steps]

    def gpu(self, dtype, backend):
        return build(self.fixture, self.path, self.weights, dtype, backend, "cuda")

    def forced_rel_err(self, dtype, backend):
        """Logits along the CPU's token path (teacher-forced) on the GPU, relative error against the CPU's."""
        model = self.gpu(dtype, backend)
        step = GraphedDecoder(model) if model.ops.graphs else model.decode
        forced, _ = greedy(model, self.prompt.cuda(), self.steps + 1, self.tokens.cuda(), step)
        return ((forced - self.logits).norm() / self.logits.norm()).item()


def check_fixture(fixture: str) -> bool:
    """The fixture's GPU checks; True if one failed."""
    ref = first = Reference(fixture, seed=0)
    gpu = ref.gpu("fp32", "triton")
    _, tokens = greedy(gpu, ref.prompt.cuda(), ref.steps + 1, step=GraphedDecoder(gpu))
    rel = ref.forced_rel_err("fp32", "triton")
    same = torch.equal(tokens.cpu(), ref.tokens)
    first_diff = (tokens.cpu() != ref.tokens).any(0).nonzero()
    print(f"{fixture} fixture GPU triton fp32 vs CPU torch fp32: logits rel err {rel:.2e}; greedy {ref.steps} "
          f"tokens x 3 {'identical' if same else f'differ from step {first_diff[0].item()}'}", flush=True)
    failed = rel > 1e-3 or not same
    # bf16 drifts from float32 on a random tiny model whatever the kernels: rounding flips top-k
    # and routing choices, differently from one seed to the next (one seed has shown the Triton
    # path 1.6x the torch path's drift, the next 0.8x). Over three fixture seeds the Triton path's
    # mean drift must stay within 1.3x of the torch path's on the same GPU.
    drift = {"torch": [], "triton": []}
    for seed in (0, 1, 2):
        ref = first if seed == 0 else Reference(fixture, seed)
        for backend in drift:
            drift[backend].append(ref.forced_rel_err("bf16", backend))
        print(f"{fixture} fixture seed {seed}, bf16 on the GPU vs CPU torch fp32: logits rel err torch path "
              f"{drift['torch'][-1]:.3f}, Triton path {drift['triton'][-1]:.3f}", flush=True)
    mean = {backend: sum(v) / len(v) for backend, v in drift.items()}
    ok = mean["triton"] <= 1.3 * mean["torch"]
    print(f"{fixture} bf16 mean drift over 3 seeds: torch path {mean['torch']:.3f}, Triton path "
          f"{mean['triton']:.3f} ({'ok' if ok else 'FAILED'}: at most 1.3x)", flush=True)
    failed |= not ok
    # generate.py's loop (shared positions, prompts of different lengths, graphed decode steps)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 129280, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    want = generate(first.cpu, prompts, 24, eos_id=1)
    gpu = first.gpu("fp32", "triton")
    got = generate(gpu, prompts, 24, eos_id=1, decoder=GraphedDecoder(gpu))
    print(f"{fixture} generate.py loop, GPU fp32 with CUDA-graph decode vs CPU torch fp32: "
          f"{'identical' if got == want else 'DIFFERENT'} completions", flush=True)
    return failed or got != want


def check_mla_kernel_at_r1_shapes() -> bool:
    """kernel.mla_decode_triton against ops.mla_decode_torch at one GPU's R1 shapes (all 128 heads),
    rows at positions far apart in a cache of 4096; True if one failed."""
    failed = False
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        q_lat = torch.randn(4, 128, 512, device="cuda", generator=g).to(dtype)
        q_pe = torch.randn(4, 128, 64, device="cuda", generator=g).to(dtype)
        kv = torch.randn(4, 4096, 512, device="cuda", generator=g).to(dtype)
        pe = torch.randn(4, 4096, 64, device="cuda", generator=g).to(dtype)
        pos = torch.tensor([0, 17, 1500, 4095], device="cuda")
        want = mla_decode_torch(q_lat, q_pe, kv, pe, pos, 192 ** -0.5)
        got = kernel.mla_decode_triton(q_lat, q_pe, kv, pe, pos, 192 ** -0.5)
        err = ((got - want).norm() / want.norm()).item()
        print(f"R1 MLA decode kernel at real shapes, {dtype}: rel err {err:.2e} (at most {bound:g})", flush=True)
        failed |= not err <= bound
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", nargs="+", choices=list(FIXTURES), default=list(FIXTURES))
    opts = p.parse_args(argv)
    failures = subprocess.run([sys.executable, "-m", "testkit.cases"]).returncode != 0
    with torch.no_grad():
        for fixture in opts.fixtures:
            failures |= check_fixture(fixture)
            if fixture == "R1":
                failures |= check_mla_kernel_at_r1_shapes()
    print("GPU CHECK", "FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
