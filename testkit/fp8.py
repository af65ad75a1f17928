"""Fixture releases for shards that keep the FP8 / MXFP4 weights (convert.py --dtype fp8), and models
built from converted folders; tests/test_convert_fp8.py, tests/test_generate_fp8.py and
tools/gpu_check_fp8.py use them.

--dtype fp8 refuses to cut a weight where a 128x128 block of its scales would straddle two ranks,
and the tiny fixtures' heads and widths are narrower than a block. These have every cut weight's
rank parts in whole blocks on 1, 2 and 4 ranks (V4, 4 in the o-groups layout) or 1 and 2 (R1).

    python -m testkit.fp8        (TRITON_INTERPRET=1 on a CPU) the Triton path on FP8 shards against the
                                 torch path on BF16 shards, one line a case; exit status 1 on a failure

That check takes the tiny fixtures on one rank: their widths, not multiples of 128, make the stacked
FP8 weights pad to whole blocks, and the interpreter runs their narrow experts in seconds.
"""
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_model

import convert
import model
import model_v3
from random_release import hf_config, write_release
from testkit.release_v3 import r1_config, write_release_v3

# V4: wq_b 8 heads x 64 rows, the indexer's wq_b 16 x 32, the shared expert 512 wide, wo_a 2 groups x 128.
V4_FP8 = dict(num_attention_heads=8, o_lora_rank=128, moe_intermediate_size=512)
# R1: wq_b and wkv_b 8 heads x 64 rows, wo 8 x 32 columns, the dense MLP 512 wide, the shared expert 256.
R1_FP8 = dict(num_attention_heads=8, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, intermediate_size=512,
              moe_intermediate_size=256)


def write_v4(path: str, seed: int = 0, **sizes) -> dict:
    """A V4 release with V4_FP8's sizes (and `sizes`, more config keys); the float32 state dict it encodes."""
    return write_release(path, config=hf_config(**V4_FP8, **sizes), seed=seed, n_files=2)


def write_r1(path: str, seed: int = 0) -> dict:
    """An R1 release with R1_FP8's sizes; what it encodes under Hugging Face names."""
    return write_release_v3(path, config=r1_config(**R1_FP8), seed=seed, n_files=2)


def awkward_rows(rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """bf16 rows [rows, k] whose 128-channel groups meet quantisation's edges: ordinary values, tiny ones
    (amax floored at 1e-4), e4m3 subnormals beside a large value, ties halfway between e4m3 values, an
    amax that is 448 times a power of two, zeros, and both signs."""
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-8, 9, (rows, 1), generator=g).float())
    x[0] = 0.0
    x[1] = torch.randn(k, generator=g) * 1e-7
    x[2, :128] = torch.randn(128, generator=g) * 1e-3
    x[2, 0] = 448.0                                       # scale 1: the rest falls among e4m3's subnormals
    # scale 1 again; after 448 ties between neighbouring e4m3 values, normal and subnormal
    x[3, :128] = torch.tensor([448.0, -13.5, 25.0, -9.5, 7 / 1024, 3 / 1024, 1.0, 0.0] * 16)
    return x.bfloat16()


def convert_to(release: str, root: str, n: int, dtype: str, expert_dtype=None) -> str:
    """release converted for n ranks (the o-groups layout above 2) into a new folder under root."""
    out = os.path.join(root, f"{dtype}{'-' + expert_dtype if expert_dtype else ''}-mp{n}")
    convert.convert(release, out, n, num_workers=1, ogroups_comm=n > 2, dtype=dtype, expert_dtype=expert_dtype)
    return out


def shard_model(folder: str, dtype: str, backend: str, device, max_seq_len: int = 64, max_batch_size: int = 3,
                **overrides):
    """The model of folder's config.json (model.py or model_v3.py), built on device and loaded from
    its single-rank shard; overrides: more runtime fields (V4's expert_kernels)."""
    config = os.path.join(folder, "config.json")
    with open(config) as f:
        family = model_v3 if convert.architecture(json.load(f)) == "deepseek_v3" else model
    args = family.ModelArgs.from_file(config, dtype=dtype, backend=backend, max_seq_len=max_seq_len,
                                      max_batch_size=max_batch_size, **overrides)
    with torch.device(device):
        built = family.Transformer(args)
    load_model(built, os.path.join(folder, "model0-mp1.safetensors"), device=str(device))
    return built


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def triton_vs_torch(fp8: str, bf16: str, device, seed: int = 3, steps: int = 3) -> float:
    """The model on fp8's shards on the Triton path (float32, device) against the model on bf16's shards
    on the torch path (float32, CPU): two rows prefilled in two chunks (the first one's routing
    assignments take the grouped MoE kernels, the second's the few-token ones), then decode steps
    at per-row positions. The worst relative logit error."""
    ref = shard_model(bf16, "fp32", "torch", "cpu")
    fast = shard_model(fp8, "fp32", "triton", device)
    ids = torch.randint(0, 129280, (2, 40), generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    for start, end in ((0, 25), (25, 29)):
        worst = max(worst, rel_err(fast(ids[:, start:end].to(device), start).cpu(), ref(ids[:, start:end], start)))
    pos = torch.tensor([29, 33])
    for step in range(steps):
        tokens = ids[:, 29 + step:30 + step]
        worst = max(worst, rel_err(fast.decode(tokens.to(device), pos.to(device)).cpu(), ref.decode(tokens, pos)))
        pos = pos + 1
    return worst


def main() -> int:
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    root = tempfile.mkdtemp()
    v4, r1 = os.path.join(root, "v4"), os.path.join(root, "r1")
    write_release(v4, seed=0, n_files=2)
    write_release_v3(r1, seed=0, n_files=2)
    bf16 = {release: convert_to(release, release, 1, "bf16") for release in (v4, r1)}
    cases = {"V4 fp8, MXFP4 experts": (v4, None), "V4 fp8, FP8 experts": (v4, "fp8"), "R1 fp8": (r1, None)}
    bad = 0
    for name, (release, experts) in cases.items():
        err = triton_vs_torch(convert_to(release, release, 1, "fp8", experts), bf16[release], device)
        ok = err < 1e-4
        bad += not ok
        print(f"{name:24s} rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
