"""How far bf16 logits drift from float32, per kernel (CUDA machine, not collected by pytest).

`python tests/bf16_drift.py [--seeds 0 1 2] [--steps 40]`: for each seed a fixture checkpoint and
three prompts; the CPU torch path in float32 gives the reference logits and greedy tokens; then, on
the GPU in bf16 and teacher-forced along those tokens, the relative logit error of the torch path,
of the Triton path, and (first seed) of the Triton path with each of its kernels put back to the
torch reference one at a time. A kernel whose removal brings the Triton figure down to the torch
one is where the extra drift comes from. Prints one line per seed.
"""
import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import kernel  # noqa: E402
import model  # noqa: E402
from fixtures import fixture_model, write_release  # noqa: E402

# model.py's name for each Triton-dispatched op -> the torch reference taking the same arguments
TORCH_VERSIONS = {
    "sparse_attn": lambda q, kv, sink, idx, scale, backend: kernel.sparse_attn_torch(q, kv, sink, idx, scale),
    "hc_pre": lambda *a: kernel.hc_pre_torch(*a[:-1]),
    "hc_post": lambda *a: kernel.hc_post_torch(*a[:-1]),
    "norm_rope": lambda x, f, rd, eps=None, weight=None, inverse=False, backend=None:
        kernel.norm_rope_torch(x, f, rd, eps, weight, inverse),
    "index_scores": lambda q, keys, w, limit, scale, backend: kernel.index_scores_torch(q, keys, w, limit, scale),
    "compressor_decode": lambda *a: kernel.compressor_decode_torch(*a[:-1]),
    "compressed_entries": lambda *a: kernel.compressed_entries(*a[:-1], "torch"),
    "hadamard": lambda x, scale, backend: kernel.hadamard_transform(x, scale),
    "rms_norm": lambda x, weight, eps, backend: kernel.rms_norm_torch(x, weight, eps),
    "route": lambda *a: kernel.route_torch(*a[:-1]),
    "decode_indices": lambda *a, backend: kernel.decode_indices_torch(*a),
    "use_triton": lambda x, backend: False,           # the MoE's grouped GEMMs and few-token kernels
}


def build(path, weights, dtype, backend, device):
    return fixture_model(path, weights, dtype, backend, device, max_seq_len=256, max_batch_size=4)


def logits_along(m, prompt, steps, tokens=None):
    """Logits [b, steps + 1, vocab] on the CPU, and the tokens fed (greedy when tokens is None)."""
    dev = m.embed.weight.device
    out, fed = [m(prompt.to(dev), 0).cpu()], []
    for i in range(steps):
        nxt = out[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
        fed.append(nxt)
        out.append(m(nxt.to(dev), torch.full((prompt.size(0),), prompt.size(1) + i, device=dev)).cpu())
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

            def drift(backend):
                got, _ = logits_along(build(path, weights, "bf16", backend, "cuda"), prompt, opts.steps, tokens)
                return ((got - ref).norm() / ref.norm()).item()
            line = f"seed {seed}: bf16 drift from float32, torch path {drift('torch'):.4f}, Triton path {drift('triton'):.4f}"
            if n == 0:
                for name, torch_version in TORCH_VERSIONS.items():
                    fast = getattr(model, name)
                    setattr(model, name, torch_version)
                    try:
                        line += f"; without Triton {name} {drift('triton'):.4f}"
                    finally:
                        setattr(model, name, fast)
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
