"""FlagGems on a CUDA machine (not collected by pytest): run it as `python -m tools.flaggems_check`.

1. Each FlagGems fused kernel that ops.Ops calls for backend 'flaggems' (sparse attention,
   Hadamard transform, hc split + Sinkhorn) against our torch reference on random inputs of V4
   shapes (64 heads of 512, top-k up to 640, hc_mult 4): max abs and relative error, ok/FAIL; then
   its time against our Triton version (the torch reference where we have no Triton kernel).
2. check.py on fixture checkpoints of three seeds: in bf16 torch vs triton (the baseline) and
   triton vs flaggems (its fused kernels; aten ops stay in torch by default), judged on the means
   over the seeds; on the last one, torch vs flaggems with the aten ops routed through FlagGems but
   flaggems.FLAGGEMS_BROKEN (reported only), and in fp32 torch vs flaggems to 1e-3 with identical
   tokens.
Prints PASS or FAIL last; exit status 0 when everything passed, 1 on a failure, 2 when it cannot run.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

import flaggems
import kernel
import ops
from bench import median_ms  # one timing method for every GPU figure
from ops import Ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)                           # fixture checkpoints of the bf16 comparison


def errors(out, ref):
    """max |out - ref| and max |out - ref| / max |ref|."""
    diff = (out.double() - ref.double()).abs().max().item()
    return diff, diff / max(ref.double().abs().max().item(), 1e-30)


def attn_inputs(b, s, h, d, n, k, seed, dtype=torch.bfloat16, empty_row=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype)
    kv = torch.randn(b, n, d, generator=g, device="cuda").to(dtype)
    sink = torch.randn(h, generator=g, device="cuda")
    idx = torch.stack([torch.randperm(n, generator=g, device="cuda")[:k] for _ in range(b * s)]).view(b, s, k)
    drop = torch.rand(b, s, k, generator=g, device="cuda") < 0.2
    drop[..., 0] = False                              # every query keeps a key, as in the model (its own slot)
    idx = torch.where(drop, -1, idx)
    if empty_row:
        idx[0, 0] = -1
    return q, kv, sink, idx, d ** -0.5


def check_attn(name, b, s, h, d, n, k, seed, results, tol=2e-2):
    q, kv, sink, idx, scale = attn_inputs(b, s, h, d, n, k, seed)
    ref = ops.sparse_attn_torch(q.double(), kv.double(), sink.double(), idx, scale)
    out = flaggems.sparse_attn_flaggems(q, kv, sink, idx, scale)
    mine = kernel.sparse_attn_triton(q, kv, sink, idx, scale)
    report(f"sparse_attn {name}", errors(out, ref), tol, results,
           median_ms(lambda: flaggems.sparse_attn_flaggems(q, kv, sink, idx, scale)),
           median_ms(lambda: kernel.sparse_attn_triton(q, kv, sink, idx, scale)), "our Triton",
           extra=f"(our Triton: max abs {errors(mine, ref)[0]:.2e})")


def check_hadamard(name, shape, dtype, seed, results, tol):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, generator=g, device="cuda").to(dtype)
    scale = shape[-1] ** -0.5
    ref = ops.hadamard_transform(x.double(), scale)
    out = Ops("flaggems").hadamard(x, scale)
    ok_dtype = out.dtype == x.dtype and out.shape == x.shape
    report(f"hadamard {name} {str(dtype)[6:]}", errors(out, ref), tol, results,
           median_ms(lambda: Ops("flaggems").hadamard(x, scale)),
           median_ms(lambda: ops.hadamard_transform(x, scale)), "our torch", ok_extra=ok_dtype)


def check_hc_split(name, lead, seed, results, hc=4, iters=20, eps=1e-6, tol=1e-5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mixes = torch.randn(*lead, (2 + hc) * hc, generator=g, device="cuda")
    scale = torch.rand(3, generator=g, device="cuda") + 0.5
    base = torch.randn((2 + hc) * hc, generator=g, device="cuda")
    ref = ops.hc_split_sinkhorn(mixes.double(), scale.double(), base.double(), hc, iters, eps)
    out = Ops("flaggems").hc_split(mixes, scale, base, hc, iters, eps)
    err = max((errors(o, r) for o, r in zip(out, ref)), key=lambda e: e[0])
    shapes_ok = all(o.shape == r.shape and o.dtype == torch.float32 for o, r in zip(out, ref))
    if hasattr(kernel, "hc_split_sinkhorn_triton"):
        baseline, label = (lambda: kernel.hc_split_sinkhorn_triton(mixes, scale, base, hc, iters, eps)), "our Triton"
    else:
        baseline, label = (lambda: ops.hc_split_sinkhorn(mixes, scale, base, hc, iters, eps)), "our torch"
    report(f"hc_split_sinkhorn {name}", err, tol, results,
           median_ms(lambda: Ops("flaggems").hc_split(mixes, scale, base, hc, iters, eps)), median_ms(baseline), label,
           ok_extra=shapes_ok)


def report(name, err, tol, results, ms_gems, ms_ours, ours_label, extra="", ok_extra=True):
    ok = err[0] <= tol and ok_extra and err[0] == err[0]
    results.append(ok)
    print(f"{name:40s} max abs {err[0]:.2e} rel {err[1]:.2e} {'ok' if ok else 'FAIL'} {extra}".rstrip())
    print(f"{'':40s} FlagGems {ms_gems:.3f} ms, {ours_label} {ms_ours:.3f} ms ({ms_ours / ms_gems:.2f}x)")


def run_check(ckpt, a, b, exclude, root):
    """check.py A vs B on the fixture; its JSON report (None when it did not run to the end)."""
    env = dict(os.environ)
    env.pop("FLAGGEMS_EXCLUDE", None)
    if exclude is not None:
        env["FLAGGEMS_EXCLUDE"] = exclude
    env.pop("USE_FLAGGEMS", None)
    out = os.path.join(root, "report.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.join(ROOT, "check.py"), "--ckpt-path", ckpt, "--input-file",
           os.path.join(ckpt, "prompts.txt"), "--a", a, "--b", b, "--steps", "16", "--max-seq-len", "256",
           "--report", out]
    print(f"\n$ FLAGGEMS_EXCLUDE={'(default)' if exclude is None else repr(exclude)} python {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=900)
    if done.returncode not in (0, 1) or not os.path.exists(out):
        print(f"check.py exit status {done.returncode}: FAIL")
        return None
    with open(out) as f:
        return json.load(f)


def judge_check(name, report, bound, min_top1, results):
    """A check.py report against a max_rel bound and a per-prompt top-1 agreement floor; bound None
    only reports (the torch-vs-Triton bf16 baseline: what bf16 rounding alone does on this model)."""
    if report is None:
        results.append(False)
        return
    s = report["summary"]
    ok = bound is None or (s["max_rel"] is not None and s["max_rel"] <= bound and s["min_top1"] >= min_top1)
    results.append(ok)
    verdict = "reported" if bound is None else f"bound {bound:.3g}, top1 >= {min_top1}: {'ok' if ok else 'FAIL'}"
    print(f"{name}: max_rel {s['max_rel']:.3g}, min top1 {s['min_top1']}, {s['diverged']} diverged ({verdict})")


def main() -> int:
    if not torch.cuda.is_available():
        print("flaggems_check.py needs a CUDA GPU")
        return 2
    try:
        flaggems.flag_gems_module()
    except Exception as e:
        print(f"flaggems_check.py: cannot import flag_gems: {e}")
        return 2
    results = []
    # V4: 64 heads of 512 (8 a rank at mp8), window 128 + top-k 512 compressed keys = 640
    check_attn("V4 decode b32 h64", 32, 1, 64, 512, 16512, 640, 1, results)
    check_attn("V4 decode b1 h8 (mp8)", 1, 1, 8, 512, 4224, 640, 2, results)
    check_attn("V4 prefill 512 h64", 1, 512, 64, 512, 640, 640, 3, results)
    check_attn("V4 prefill 512 h16 (mp4)", 1, 512, 16, 512, 1280, 384, 4, results)
    check_attn("fixture h4 d64", 2, 7, 4, 64, 40, 21, 5, results)
    q, kv, sink, idx, scale = attn_inputs(1, 2, 16, 64, 40, 8, 6, empty_row=True)
    nan = flaggems.sparse_attn_flaggems(q, kv, sink, idx, scale)[0, 0].isnan().any().item()
    print(f"{'sparse_attn query with no valid key':40s} FlagGems gives {'NaN' if nan else 'finite values'} "
          f"(ours: 0); not reached by the model (INFO)")
    # Hadamard: indexer queries [tokens, 64 heads, 128] and compressed entries [tokens, 128]; 512 too
    for dtype, tol in ((torch.bfloat16, 6e-2), (torch.float32, 1e-4)):
        check_hadamard("indexer q 2048x64x128", (2048, 64, 128), dtype, 7, results, tol)
        check_hadamard("decode q 32x64x128", (32, 1, 64, 128), dtype, 8, results, tol)
        check_hadamard("512", (1024, 512), dtype, 9, results, tol)
    check_hc_split("decode 32 tokens", (32, 1), 10, results)
    check_hc_split("prefill 8192 tokens", (1, 8192), 11, results)
    check_hc_split("iters 5", (3, 37), 12, results, iters=5)

    from random_release import write_release
    import convert
    with tempfile.TemporaryDirectory(prefix="flaggems-check-") as root:
        base, fused = [], []
        for seed in SEEDS:
            release, ckpt = os.path.join(root, f"release{seed}"), os.path.join(root, f"mp1-{seed}")
            write_release(release, seed=seed, n_files=1)
            convert.convert(release, ckpt, 1, num_workers=1, ogroups_comm=False)
            with open(os.path.join(ckpt, "prompts.txt"), "w") as f:
                f.write("Hello there\n\nWhy is the sky blue? Answer in one sentence.\n\nList three prime numbers.\n")
            base.append(run_check(ckpt, "backend=torch,dtype=bf16,device=cuda", "backend=triton,dtype=bf16,device=cuda",
                                  "*", root))
            judge_check(f"seed {seed}: baseline torch vs triton (bf16)", base[-1], None, 0, results)
            fused.append(run_check(ckpt, "backend=triton,dtype=bf16,device=cuda",
                                   "backend=flaggems,dtype=bf16,device=cuda", "*", root))
            judge_check(f"seed {seed}: triton vs flaggems fused kernels (bf16)", fused[-1], None, 0, results)
        # bf16 vs bf16 differ through rounding and the discrete choices it flips (top-k keys, experts),
        # by an amount that depends on the seed: FlagGems is held, over the seeds, to a mean max_rel of
        # 3x the baseline's mean (at least 0.05) and top-1 agreement 0.75 on every prompt
        if None in base or None in fused:
            results.append(False)
        else:
            mean_base = sum(r["summary"]["max_rel"] for r in base) / len(base)
            mean_fused = sum(r["summary"]["max_rel"] for r in fused) / len(fused)
            top1 = min(r["summary"]["min_top1"] for r in fused)
            bound = max(0.05, 3 * mean_base)
            ok = mean_fused <= bound and top1 >= 0.75
            results.append(ok)
            print(f"bf16 over seeds {list(SEEDS)}: mean max_rel torch vs triton {mean_base:.3g}, triton vs flaggems "
                  f"{mean_fused:.3g} (bound {bound:.3g}), min top1 {top1} (>= 0.75): {'ok' if ok else 'FAIL'}")
        # every aten op through FlagGems too, but FLAGGEMS_BROKEN (flaggems.py): reported, not counted
        everything = run_check(ckpt, "backend=torch,dtype=bf16,device=cuda", "backend=flaggems,dtype=bf16,device=cuda",
                               "", root)
        print("torch vs flaggems with the aten ops routed (bf16): "
              + (f"max_rel {everything['summary']['max_rel']:.3g}, min top1 {everything['summary']['min_top1']} "
                 "(INFO)" if everything else "did not run (INFO)"))
        # in float32 rounding no longer hides a wrong result: the same logits to 1e-3, the same tokens
        exact = run_check(ckpt, "backend=torch,dtype=fp32,device=cuda", "backend=flaggems,dtype=fp32,device=cuda",
                          None, root)
        judge_check("torch vs flaggems fused kernels (fp32)", exact, 1e-3, 1.0, results)
    failed = results.count(False)
    print(f"\nFLAGGEMS CHECK {'PASS' if not failed else f'FAIL ({failed} of {len(results)} checks)'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
