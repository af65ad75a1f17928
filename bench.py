"""Benchmarks of the toolkit, one subcommand each; results go into BENCHMARKS.md by hand.

    python bench.py convert --layers 2 --workdir /tmp/bench

convert: writes a synthetic release with the real DeepSeek-V4-Flash tensor shapes (random valid
FP8 / FP4 codes and scales, not quantised numbers), times a plain read of its files and convert.py
at each --model-parallel, and reports throughput and peak memory against the largest shard and the
largest single tensor. The release stays in WORKDIR/release; each conversion's output is deleted
after it has been measured, so the disk needs room for the release and one conversion.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import convert

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fixtures import hf_config, release_specs  # noqa: E402  (the one description of the release layout)

GB = 1e9


# ----------------------------------------------------------------------------- convert

def v4_flash_config(layers: int) -> dict:
    """A Hugging Face config with V4-Flash shapes and `layers` layers: one hash-routed, then
    compression ratios 4 (compressor + indexer) and 128 alternating; no MTP layer."""
    return hf_config(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=[4 if i % 2 == 0 else 128 for i in range(layers)], num_hash_layers=1,
        n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048, index_n_heads=64,
        index_head_dim=128, index_topk=512, hc_mult=4, num_nextn_predict_layers=0)


def stored_tensors(spec) -> list:
    """The tensors one layout entry is stored as: (OutTensor, kind of bytes)."""
    if spec.kind == "fp8":
        rows, cols = spec.shape
        scale = (-(-rows // 128), -(-cols // 128))
        return [(convert.OutTensor(spec.name, "F8_E4M3", spec.shape), "e4m3"),
                (convert.OutTensor(spec.name[:-len("weight")] + "scale", "F8_E8M0", scale), "scale")]
    if spec.kind == "fp4":
        rows, cols = spec.shape
        return [(convert.OutTensor(spec.name, "I8", (rows, cols // 2)), "bits"),
                (convert.OutTensor(spec.name[:-len("weight")] + "scale", "F8_E8M0", (rows, cols // 32)), "scale")]
    dtype = {"bf16": "BF16", "fp32": "F32", "int": "I32"}[spec.kind]
    return [(convert.OutTensor(spec.name, dtype, spec.shape), "normal" if spec.kind != "int" else "expert_ids")]


def random_values(t: "convert.OutTensor", kind: str, n_experts: int) -> torch.Tensor:
    """Random contents of a stored tensor, fast: valid codes, not quantised numbers."""
    if kind == "normal":
        return (0.02 * torch.randn(t.shape)).to(convert.DTYPES[t.dtype][0])
    if kind == "expert_ids":
        return torch.randint(0, n_experts, t.shape, dtype=torch.int32)
    if kind == "scale":                                     # 2**-10 .. 2**-4 as ue8m0 bytes
        return torch.randint(127 - 10, 127 - 4 + 1, (t.nbytes,), dtype=torch.uint8)
    data = torch.empty(-(-t.nbytes // 8), dtype=torch.int64).random_().view(torch.uint8)[:t.nbytes]
    if kind == "e4m3":                                      # no NaN codes (0x7f, 0xff)
        data[(data & 0x7F) == 0x7F] -= 1
    return data


def write_synthetic_release(path: str, config: dict, file_bytes: int) -> int:
    """Write the release in files of about file_bytes each; its total size in bytes."""
    os.makedirs(path, exist_ok=True)
    groups, current, size = [], [], 0
    for spec in release_specs(config):
        stored = stored_tensors(spec)
        current += stored
        size += sum(t.nbytes for t, _ in stored)
        if size >= file_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offsets = convert.layout([t for t, _ in group])
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header)
        writer = convert.ShardWriter([os.path.join(path, fname)])
        try:
            for t, kind in group:
                writer.write(0, random_values(t, kind, config["n_routed_experts"]), offsets[t.name])
                weight_map[t.name] = fname
                total += t.nbytes
        finally:
            writer.close()
    with open(os.path.join(path, convert.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total


def timed_read(paths: list) -> float:
    """Seconds to read the files front to back, 16 MiB at a time."""
    buf = bytearray(16 * 2**20)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grown = bool(more)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_measured(argv: list, env: dict) -> dict:
    """Run a command; wall seconds, peak resident bytes of its whole process tree (sampled every
    0.1 s) and of its largest single process (from the kernel, via wait4)."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env)
    peak_tree = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        peak_tree = max(peak_tree, _tree_rss(pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench.py: {' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return {"seconds": seconds, "peak_tree": peak_tree, "peak_process": usage.ru_maxrss * 1024}


def largest_tensor(release: str) -> tuple:
    """(name, bytes) of the largest tensor once dequantised: what one worker holds at most."""
    best = ("", 0)
    for fname in os.listdir(release):
        if fname.endswith(".safetensors"):
            for t in convert.read_header(os.path.join(release, fname)).values():
                numel = 1
                for d in convert.dequantised_shape(t):
                    numel *= d
                size = numel * 2 if t.dtype in convert.QUANTISED else t.nbytes
                best = max(best, (t.name, size), key=lambda x: x[1])
    return best


def bench_convert(args) -> None:
    config = v4_flash_config(args.layers)
    release = os.path.join(args.workdir, "release")
    shutil.rmtree(release, ignore_errors=True)
    start = time.perf_counter()
    in_bytes = write_synthetic_release(release, config, int(args.file_gb * GB))
    files = sorted(os.path.join(release, f) for f in os.listdir(release) if f.endswith(".safetensors"))
    print(f"release: {args.layers} layers, {len(files)} files, {in_bytes / GB:.2f} GB written in "
          f"{time.perf_counter() - start:.0f} s")
    name, size = largest_tensor(release)
    print(f"largest single tensor once dequantised: {name} {size / GB:.2f} GB")

    first, second = timed_read(files), timed_read(files)
    print(f"plain read of the release: {in_bytes / GB / first:.2f} GB/s (first pass, just written), "
          f"{in_bytes / GB / second:.2f} GB/s (second pass, page cache warm)")

    for n in args.model_parallel:
        out = os.path.join(args.workdir, f"mp{n}")
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, os.path.join(ROOT, "convert.py"), "--hf-ckpt-path", release, "--save-path", out,
                "--model-parallel", str(n)]
        if args.num_workers:
            argv += ["--num-workers", str(args.num_workers)]
        timed_read(files)                                   # warm the page cache again before each run
        m = run_measured(argv, dict(os.environ))
        shards = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
        out_bytes = sum(os.path.getsize(p) for p in shards)
        print(f"convert --model-parallel {n}: {m['seconds']:.1f} s, {in_bytes / GB / m['seconds']:.3f} GB/s in, "
              f"{out_bytes / GB / m['seconds']:.3f} GB/s out ({out_bytes / GB:.2f} GB in {len(shards)} shards); "
              f"peak RSS {m['peak_tree'] / GB:.2f} GB all processes, {m['peak_process'] / GB:.2f} GB largest process; "
              f"largest shard {max(map(os.path.getsize, shards)) / GB:.2f} GB")
        shutil.rmtree(out)


def add_convert(commands) -> None:
    p = commands.add_parser("convert", help="convert.py on a synthetic V4-Flash-shaped release")
    p.add_argument("--layers", type=int, default=2, help="transformer layers in the synthetic release")
    p.add_argument("--workdir", required=True, help="scratch folder (needs room for the release and one output)")
    p.add_argument("--model-parallel", type=int, nargs="+", default=[8, 1], help="N values to convert for")
    p.add_argument("--num-workers", type=int, help="passed on to convert.py (default: its own)")
    p.add_argument("--file-gb", type=float, default=2.0, help="size of each release file")
    p.set_defaults(run=bench_convert)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_convert(commands)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
