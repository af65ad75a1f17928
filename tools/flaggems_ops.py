"""Which FlagGems aten operators the model can run on (CUDA machine, not collected by pytest).

`python -m tools.flaggems_ops [--out report.json]`:
1. Runs the fixture model (float32, backend triton, eager: prefill of two prompts in two chunks,
   then decode steps at tensor positions) without FlagGems and records the aten operators it calls.
2. For each FlagGems function that implements one of them, runs the same steps with only that
   function routed through FlagGems (flag_gems.use_gems(include=[...])): an exception, logits off
   the torch run by more than 1e-3 relative, or no result within --timeout-per-function seconds
   (status "timeout": slow compilation or a hang, not told apart) marks the function bad.
3. Runs everything routed except the bad functions (limit --timeout-all), and reports its logit error.
4. Probes the two functions found bad with flag-gems 5.0.2 (mul, topk) on small inputs shaped as
   the model's, to say what goes wrong.
Every run is a child process of this script (a hidden --worker mode), in its own process group,
killed with its group when it passes its limit: one function that compiles for minutes or hangs
costs its limit and the audit goes on. This process never touches CUDA; the release is written
once and each child builds the fixture from it. On SIGTERM (a `timeout` around the audit) it ends
the running child before exiting. A child sent SIGTERM first dumps its Python stacks to its log:
the report's log_tail of a timed-out function says where it was (compiling or waiting on the GPU).

`--shapes real` runs 4 layers of configs/config_flash.json instead (bf16, random weights made on the
GPU with a fixed seed, as bench.py builds them, before FlagGems is switched on; tolerance --tol,
default 5e-2 there, for bf16):
decode graphs captured first, then a prefill of 64 tokens and 4 graphed decode steps, as generate.py
runs them. `--bisect` replaces the one-by-one trials: everything but --exclude routed at once, and
while that fails, each half of the failing set on its own, down to the single functions that fail
(or a set that fails only together): about 2 log2(n) children for one bad function.

`--exclude a,b` skips step 2 and takes that list as the bad functions.
`--only f,g` audits only these functions (in the audited order) and keeps the other functions'
results of an existing --out report: a later run continues one that was cut short, and step 3
excludes the bad functions of both runs.
Prints one line per function and writes the JSON report, kept up to date after each function;
exit status 1 when step 3 still fails, 2 when the run without FlagGems fails (nothing audited).
"""
import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from check import stop  # ends a child's process group: SIGTERM, then SIGKILL
from random_release import write_release
from testkit.models import fixture_model

TOL = {"fixture": 1e-3, "real": 5e-2}      # relative logit error: float32 fixture, bf16 real shapes
DUMP_LINES = ("  File ", "Thread 0x", "Current thread 0x", "Fatal Python error", "Extension modules:")


class OpRecorder(TorchDispatchMode):
    """Collects the names of the aten overloads called (e.g. 'add.Tensor'), composite ones and the
    ops they decompose into (linear -> t, mm, ...): FlagGems registers kernels at either level."""
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.add(func._schema.name.split("::")[-1] + ("." + func._overloadname
                                                           if func._overloadname != "default" else ""))
        with self:                                    # record what a composite op runs, too
            out = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def run_model(path, weights, ids):
    """Logits [steps, b, vocab] of a fresh model: two prefill chunks then 6 decode steps."""
    model = fixture_model(path, weights, "fp32", "triton", "cuda", max_seq_len=64, max_batch_size=2)
    out = [model(ids[:, :9], 0), model(ids[:, 9:14], 9)]
    for p in range(14, 20):
        out.append(model.decode(ids[:, p:p + 1], torch.full((2,), p, device="cuda")))
    return torch.stack(out)


def real_model():
    """4 real-shape V4-Flash layers, bf16, bench.py's random weights (fixed seed), batch 2, 256 positions."""
    from bench import build
    return build(os.path.join(ROOT, "configs", "config_flash.json"), 4, 2, 256, "triton")


def run_real(model, ids):
    """Float32 logits [5, b, vocab] of real_model(): decode graphs captured, a prefill of 64 tokens,
    then 4 graphed decode steps. Each call starts afresh: the caches are rewritten from position 0."""
    from runtime import GraphedDecoder
    decoder = GraphedDecoder(model)
    out = [model(ids[:, :64], 0).float()]
    for p in range(64, 68):
        out.append(decoder(ids[:, p:p + 1], torch.full((ids.size(0),), p, device="cuda")))
    return torch.stack(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def probes(flag_gems) -> dict:
    """mul and topk through FlagGems against torch on inputs shaped as in the model, sum over a dim
    in bf16 against a float64 sum, then cat and stack with outputs past 2^31 elements (as the MoE's
    stacked expert weights at real shapes); those come last: a fault ends the CUDA context."""
    g = torch.Generator(device="cuda").manual_seed(5)
    a, b = torch.rand(2, 1, 4, 1, device="cuda", generator=g), torch.rand(2, 1, 4, 64, device="cuda", generator=g)
    scores = torch.randn(2, 1, 40, device="cuda", generator=g)
    scores[..., 25:] = float("-inf")                    # entries not visible yet, as in the indexer
    want_mul, want_top = a * b, scores.topk(8, dim=-1)
    with flag_gems.use_gems(include=["mul"]):
        got_mul = a * b
    with flag_gems.use_gems(include=["topk"]):
        got_top = scores.topk(8, dim=-1)
    found = {"mul [2,1,4,1] * [2,1,4,64]": f"torch shape {list(want_mul.shape)}, FlagGems shape {list(got_mul.shape)}"
             + ("" if got_mul.shape != want_mul.shape else f", max diff {(got_mul - want_mul).abs().max().item():.2e}"),
             "topk(8) of 40 scores, 15 of them -inf": f"values equal: {torch.equal(got_top.values, want_top.values)}, "
             f"indices equal: {torch.equal(got_top.indices, want_top.indices)}; torch indices "
             f"{want_top.indices[0, 0].tolist()}, FlagGems {got_top.indices[0, 0].tolist()}"}
    x = torch.randn(64, 4096, device="cuda", generator=g).to(torch.bfloat16) + 1
    exact = x.double().sum(dim=-1)
    with flag_gems.use_gems(include=["sum_dim"]):
        got_sum = x.sum(dim=-1)
    found["sum(dim=-1) of bf16 [64, 4096] (+1 offset)"] = (
        f"max rel error vs float64: torch {((x.sum(dim=-1).double() - exact).abs() / exact.abs()).max().item():.1e}, "
        f"FlagGems {((got_sum.double() - exact).abs() / exact.abs()).max().item():.1e}")
    half = (1 << 30) + (1 << 20)                     # two halves: 2^31 + 2^21 elements in all
    for name, fn in (("cat", lambda a, b: torch.cat([a, b])), ("stack", lambda a, b: torch.stack([a, b]))):
        what = f"{name} of two bf16 [{half}] (output past 2^31 elements)"
        try:
            a = torch.ones(half, device="cuda", dtype=torch.bfloat16)
            b = torch.full((half,), 2.0, device="cuda", dtype=torch.bfloat16)
            with flag_gems.use_gems(include=[name]):
                out = fn(a, b).flatten()
            tail = out[-1000:].float()
            found[what] = f"ok, last elements {tail.min().item():g}..{tail.max().item():g} (want 2)"
            del a, b, out
        except Exception as e:           # noqa: BLE001 - a fault is the finding
            found[what] = describe(e)
            break
    return found


def describe(e: Exception) -> str:
    """Type and first line of an exception's message, short enough for one printed line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def worker(what: str, workdir: str, exclude: List[str], include: List[str], shapes: str, tol: float) -> int:
    """One run in a child process (--worker): REF (the model without FlagGems: its logits into
    ref.pt, the aten ops it calls and the FlagGems functions implementing them), a function name
    (that function routed alone), SET-<label> (the functions `include` routed), ALL (everything
    routed but `exclude`) or PROBES. Writes its result as WORKDIR/WHAT.json, an exception included,
    and prints nothing itself. run_seconds is the time of the routed steps alone (compilation
    included), without the child's start."""
    faulthandler.enable()                                                  # where it crashed, if it does
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)   # where it was, when stopped
    try:
        import flag_gems
        if shapes == "real":
            ids = torch.randint(0, 129280, (2, 68), generator=torch.Generator().manual_seed(4)).cuda()
            model = real_model() if what != "PROBES" else None     # weights made without FlagGems
            run = lambda: run_real(model, ids)                                   # noqa: E731
        else:
            weights = torch.load(os.path.join(workdir, "weights.pt"), weights_only=True)
            ids = torch.randint(0, 129280, (2, 20), generator=torch.Generator().manual_seed(4)).cuda()
            run = lambda: run_model(os.path.join(workdir, "release"), weights, ids)   # noqa: E731
        with torch.no_grad():
            if what == "REF":
                torch.save(run().cpu(), os.path.join(workdir, "ref.pt"))
                recorder = OpRecorder()
                with recorder:
                    run()
                funcs = sorted({item[1].__name__ for item in flag_gems._FULL_CONFIG
                                if len(item) > 1 and item[0] in recorder.names})
                result = {"aten_ops": sorted(recorder.names), "functions": funcs}
            elif what == "PROBES":
                result = {"probes": probes(flag_gems)}
            else:
                ref = torch.load(os.path.join(workdir, "ref.pt"), weights_only=True)
                if what == "ALL":
                    scope = flag_gems.use_gems(exclude=exclude)
                else:
                    scope = flag_gems.use_gems(include=include if what.startswith("SET-") else [what])
                t0 = time.perf_counter()
                with scope:
                    got = run()
                seconds = round(time.perf_counter() - t0, 1)
                err = rel(got.cpu(), ref)                 # compared outside FlagGems, on the CPU
                result = {"status": "ok" if err <= tol else "wrong result", "rel_err": err,
                          "detail": f"rel err {err:.2e}", "run_seconds": seconds}
    except Exception as e:                 # noqa: BLE001 - the audit records whatever the op raised
        result = {"status": "error", "detail": describe(e), "error": f"{type(e).__name__}: {e}"}
    path = os.path.join(workdir, f"{what}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)              # the parent never reads half a result
    return 0


def log_tail(path: str, lines: int = 200) -> List[str]:
    """The last non-blank lines of a child's log: room for the Python stacks it dumps when stopped."""
    with open(path, errors="replace") as f:
        return [line.rstrip() for line in f.read().splitlines() if line.strip()][-lines:]


def run_worker(what: str, workdir: str, limit: float, exclude: List[str] = (), include: List[str] = ()) -> dict:
    """Run `worker(what)` as a child with a time limit: its result plus "seconds" (wall time of the
    child); status "timeout" when it gave none within `limit`, "error" when it died without one.
    Those two also carry the end of the child's log."""
    log = os.path.join(workdir, f"{what}.log")
    out = os.path.join(workdir, f"{what}.json")
    if os.path.exists(out):
        os.remove(out)
    with open(os.path.join(workdir, "settings.json")) as f:
        settings = json.load(f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", what, "--workdir", workdir,
           "--exclude", ",".join(exclude), "--include", ",".join(include), "--shapes", settings["shapes"],
           "--tol", str(settings["tol"])]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:                                   # also when this process is stopped while waiting
        seconds = round(time.perf_counter() - t0, 1)
        if proc.poll() is None:
            stop(proc)
    if os.path.isfile(out):                    # a result counts even if the child then failed to exit
        with open(out) as f:
            result = json.load(f)
        result["seconds"] = seconds
        return result
    if timed_out:
        return {"status": "timeout", "detail": f"no result within {limit:g} s (slow compilation or a hang)",
                "seconds": seconds, "log_tail": log_tail(log)}
    code = proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    tail = log_tail(log)
    said = next((line for line in reversed(tail) if not line.startswith(DUMP_LINES)), "no output")
    return {"status": "error", "detail": f"worker {how}: {said[:160]}", "seconds": seconds, "log_tail": tail}


def stack_lines(result: dict, limit: int = 10) -> List[str]:
    """The innermost frames of the main thread's stack that a stopped or crashed child dumped:
    faulthandler lists the threads newest first, so the main thread's header is the last one."""
    tail = result.get("log_tail", [])
    heads = [i for i, line in enumerate(tail) if line.startswith(("Thread 0x", "Current thread 0x"))]
    return [line for line in tail[heads[-1]:] if line.startswith(DUMP_LINES[:3])][:limit] if heads else []


def write_report(report: dict, path: str) -> None:
    """The JSON report under a temporary name, then renamed: a stopped audit leaves a whole file."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def audit(opts) -> int:
    earlier = {}
    if opts.only and os.path.isfile(opts.out):       # read first: a bad file stops the audit before it starts
        with open(opts.out) as f:
            earlier = json.load(f).get("functions", {})
    workdir = tempfile.mkdtemp(prefix="flaggems_ops_")
    tol = opts.tol if opts.tol is not None else TOL[opts.shapes]
    with open(os.path.join(workdir, "settings.json"), "w") as f:
        json.dump({"shapes": opts.shapes, "tol": tol}, f)
    if opts.shapes == "fixture":
        weights = write_release(os.path.join(workdir, "release"), seed=3, n_files=1)
        torch.save(weights, os.path.join(workdir, "weights.pt"))
    print(f"{opts.shapes} shapes, tolerance {tol:g}; work files and child logs in {workdir}", flush=True)
    found = run_worker("REF", workdir, opts.timeout_all)
    if "aten_ops" not in found:
        print(f"the run without FlagGems failed: {found['status']}: {found.get('error', found['detail'])}")
        for line in found.get("log_tail", [])[-15:]:
            print("    " + line)
        return 2
    names, funcs = found["aten_ops"], found["functions"]
    print(f"{len(names)} aten ops used by the model: {' '.join(names)}")
    print(f"{len(funcs)} FlagGems functions implement them: {' '.join(funcs)}  ({found['seconds']:.1f} s)", flush=True)
    report = {"shapes": opts.shapes, "tolerance": tol, "aten_ops": names, "functions": {}}
    if opts.bisect:
        return bisect(opts, workdir, funcs, report)
    todo = [] if opts.exclude else funcs
    if opts.only:
        only = [fn.strip() for fn in opts.only.split(",") if fn.strip()]
        unknown = [fn for fn in only if fn not in funcs]
        if unknown:
            print(f"--only: not among the functions above, skipped: {' '.join(unknown)}")
        todo = [fn for fn in funcs if fn in only]
        if earlier:
            report["functions"] = {fn: r for fn, r in earlier.items() if fn in funcs and fn not in todo}
            print(f"kept {len(report['functions'])} results of {opts.out}, bad among them: "
                  f"{[fn for fn, r in report['functions'].items() if r['status'] != 'ok']}")
    for fn in todo:
        r = run_worker(fn, workdir, opts.timeout_per_function)
        report["functions"][fn] = {k: r[k] for k in ("status", "detail", "seconds", "run_seconds", "log_tail")
                                   if k in r}
        print(f"{fn:32s} {r['status']:13s} {r['detail']}  ({r['seconds']:.1f} s)", flush=True)
        for line in stack_lines(r):
            print("    " + line)
        write_report(report, opts.out)          # kept up to date: a long audit may be cut short
    if opts.exclude:
        bad = opts.exclude.split(",")
    else:
        bad = [fn for fn in funcs if fn in report["functions"] and report["functions"][fn]["status"] != "ok"]
    r = run_worker("ALL", workdir, opts.timeout_all, bad)
    final = {"excluded": bad, "status": r["status"], "ok": r["status"] == "ok", "seconds": r["seconds"]}
    if "rel_err" in r:
        final["rel_err"] = r["rel_err"]
    else:
        final["error"] = r.get("error", r["detail"])
    if not opts.exclude:
        final["unaudited"] = [fn for fn in funcs if fn not in report["functions"]]
    report["all_but_bad"] = final
    print("every FlagGems op except", bad, "->", final, flush=True)
    for line in stack_lines(r):
        print("    " + line)
    if not final["ok"]:
        report["all_but_bad"]["log_tail"] = r.get("log_tail", [])
    r = run_worker("PROBES", workdir, opts.timeout_per_function)
    report["probes"] = r["probes"] if "probes" in r else {"failed": f"{r.get('status')}: {r.get('detail')}"}
    for what, result in report["probes"].items():
        print(f"probe {what}: {result}")
    write_report(report, opts.out)
    return 0 if final["ok"] else 1


def bisect(opts, workdir: str, funcs: List[str], report: dict) -> int:
    """Everything but --exclude routed at once; while a set fails, each half on its own, down to the
    single functions that fail, or a set that fails only as a whole. Reports every trial and the
    culprits; exit status 1 when there are any."""
    excluded = [fn.strip() for fn in (opts.exclude or "").split(",") if fn.strip()]
    trials = report["trials"] = []

    def fails(group: List[str]) -> bool:
        label = f"SET-{len(trials)}"
        r = run_worker(label, workdir, opts.timeout_all, include=group)
        trials.append({"functions": group, **{k: r[k] for k in ("status", "detail", "seconds") if k in r}})
        print(f"{len(group):3d} routed: {r['status']:13s} {r['detail']}  ({r['seconds']:.1f} s)  {' '.join(group)}",
              flush=True)
        for line in stack_lines(r):
            print("    " + line)
        write_report(report, opts.out)
        return r["status"] != "ok"

    def culprits(group: List[str]) -> List[List[str]]:
        if len(group) == 1:
            return [group]
        halves = [group[:len(group) // 2], group[len(group) // 2:]]
        found = [c for half in halves if fails(half) for c in culprits(half)]
        return found or [group]             # each half passes alone: only the whole set fails

    routed = [fn for fn in funcs if fn not in excluded]
    bad = culprits(routed) if fails(routed) else []
    report["excluded"], report["culprits"] = excluded, bad
    write_report(report, opts.out)
    print(f"excluded from the start: {excluded}; failing: {bad if bad else 'none'}")
    return 1 if bad else 0


def on_sigterm(signum, frame) -> None:
    """Stop as on Ctrl-C: run_worker's cleanup ends the running child before this process exits."""
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="flaggems_ops.json")
    parser.add_argument("--exclude", help="comma-separated bad functions: skip the one-by-one audit")
    parser.add_argument("--only", help="comma-separated functions: audit only these, keep the other results of --out")
    parser.add_argument("--timeout-per-function", type=float, default=90.0,
                        help="seconds a function's trial (and the probes) may take, child start included")
    parser.add_argument("--timeout-all", type=float, default=240.0,
                        help="seconds the run without FlagGems and the run with everything but the bad ones may take")
    parser.add_argument("--shapes", choices=["fixture", "real"], default="fixture",
                        help="the float32 fixture model, or 4 real-shape V4-Flash layers in bf16")
    parser.add_argument("--bisect", action="store_true",
                        help="find the failing functions by halving the routed set (routed: all but --exclude)")
    parser.add_argument("--tol", type=float, help="relative logit error allowed (default: 1e-3 fixture, 5e-2 real)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)      # REF | ALL | SET-n | PROBES | a function name
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--include", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts.worker, opts.workdir, opts.exclude.split(",") if opts.exclude else [],
                      opts.include.split(",") if opts.include else [], opts.shapes, opts.tol)
    if opts.only and (opts.exclude or opts.bisect):
        parser.error("--only audits functions one by one; --exclude and --bisect do not: give one of them")
    signal.signal(signal.SIGTERM, on_sigterm)
    return audit(opts)


if __name__ == "__main__":
    sys.exit(main())
