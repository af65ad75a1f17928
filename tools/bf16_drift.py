"""How far bf16 logits drift from float32, per kernel (CUDA machine, not collected by pytest).

`python -m tools.bf16_drift [--seeds 0 1 2] [--steps 40]`: for each seed a fixture checkpoint and
three prompts; the CPU torch path in float32 gives the reference logits and greedy tokens; then, on
the GPU in bf16 and teacher-forced along those tokens, the relative logit error of the torch path,
of the Triton path, and (first seed) of the Triton path with each of its kernels put back to the
torch reference one at a time. A kernel whose removal brings the Triton figure down to the torch
one is where the extra drift comes from. Prints one line per seed.
"""
import argparse
import sys
import tempfile

import torch

from ops import Ops
from random_release import write_release
from testkit.models import fixture_model

# The ops that run a Triton kernel on the GPU; each is put back to the torch reference in turn by
# overriding that one method of the model's Ops object (every module holds the same object).
FAST_OPS = ("sparse_attn", "hc_pre", "hc_post", "norm_rope", "norm_rope_into", "index_scores", "compressor_decode",
            "hadamard", "rms_norm", "route", "decode_indices", "topk", "moe_path")


def build(path, weights, dtype, backend, device):
    return fixture_model(path, weights, dtype, backend, device, max_seq_len=256, max_batch_size=4)


def logits_along(m, prompt, steps, tokens=None):
    """Logits [b, steps + 1, vocab] on the CPU, and the tokens fed (greedy when tokens is None)."""
    dev = m.embed.weight.device
    out, fed = [m(prompt.to(dev), 0).cpu()], []
    for i in range(steps):
        nxt = out[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
        fed.append(nxt)
        out.append(m.decode(nxt.to(dev), torch.full((prompt.size(0),), prompt.size(1) + i, device=dev)).cpu())
    return torch.stack(out, 1), torch.cat(fed, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("bf16_drift.py needs a CUDA GPU")
        return 2
    with torch.no_grad():
        for n, seed in enumerate(opts.seeds):
            path = tempfile.mkdtemp()
            weights = write_release(path, seed=seed, n_files=1)
            prompt = torch.randint(0, 129280, (3, 21), generator=torch.Generator().manual_seed(seed + 1))
            ref, tokens = logits_along(build(path, weights, "fp32", "torch", "cpu"), prompt, opts.steps)

            def drift(backend, torch_op=None):
                m = build(path, weights, "bf16", backend, "cuda")
                if torch_op is not None:
                    setattr(m.ops, torch_op, getattr(Ops("torch", "cuda"), torch_op))
                got, _ = logits_along(m, prompt, opts.steps, tokens)
                return ((got - ref).norm() / ref.norm()).item()
            line = f"seed {seed}: bf16 drift from float32, torch path {drift('torch'):.4f}, Triton path {drift('triton'):.4f}"
            if n == 0:
                for name in FAST_OPS:
                    line += f"; without Triton {name} {drift('triton', name):.4f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
