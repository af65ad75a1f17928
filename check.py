"""Check that two configurations of the model give consistent outputs on the same prompts.

    python check.py --ckpt-path DST --input-file prompts.txt \\
        --a "mp=1,backend=torch,dtype=fp32,device=cpu" \\
        --b "mp=2,backend=torch,dtype=fp32,device=cpu,ckpt=DST_MP2" \\
        --steps 16 --max-abs 1e-3 --max-rel 1e-4 --min-top1 1.0 --report out.json

Meant for porting to a new backend: run a trusted configuration as A and the new one as B.

A configuration (a spec) is comma-separated key=value pairs:
    ckpt     folder written by convert.py (default --ckpt-path); N ranks read model{r}-mp{N}.safetensors
    mp       model-parallel size N (default 1): 1 runs in this process, N > 1 under
             `torchrun --standalone --nproc-per-node N check.py --worker ...` (gloo on CPU, nccl on CUDA)
    backend  auto | torch | triton | flaggems (default auto; see model.py's ModelArgs.backend)
    device   cpu | cuda (default cuda when a GPU is visible)
    dtype    fp32 | bf16 (default: the checkpoint config's)
    ogroups  0 | 1: the o-groups layout (USE_OGROUPS_COMM=1; mp above o_groups, converted with it)
    experts  triton | humming | humming-fp8: V4's MXFP4 routed experts on our kernels (default) or on
             humming-kernels (USE_HUMMING=1 / fp8; bf16, CUDA): e.g. A experts=humming, B
             experts=humming-fp8 measures how far DeepSeek's FP8-activation numerics move the logits

For each prompt (encoded as generate.py does, in the chat format of the checkpoint's family: V4's,
or R1's for a deepseek_v3 config.json; one prompt at a time), A runs the prefill and then greedy
steps: `--steps` forward passes, recording the float32 logits of the last position at each step
and their argmax tokens. B runs (i) its own greedy decoding and (ii) the same positions
teacher-forced with A's tokens, so that logits are compared on the same token path. Per prompt:

    max_abs      max over steps and vocabulary of |a - b| (teacher-forced logits)
    max_rel      max over steps of  max_v |a_v - b_v| / max_v |a_v|  (the largest difference at a
                 step relative to the largest logit magnitude of A at that step)
    top1         fraction of steps where argmax a == argmax b (teacher-forced)
    first_divergence  the first step where the greedy tokens of A and B differ, or null
    nonfinite    count of NaN/inf logits (on either side); any makes the prompt fail

The JSON report (--report) has these per prompt, the worst values over all prompts, the thresholds
and the failures; a table goes to stdout. --keep DIR keeps each side's results (a.pt, b.pt:
torch.save of per-prompt logits and tokens) for closer study.

Exit status: 0 consistent within the thresholds given; 1 a threshold is passed; 2 a usage error
(bad option or spec, missing checkpoint or shards, a backend or device this machine cannot run),
nothing compared; 3 a side failed or timed out while running.

Environment: with backend=flaggems, FLAGGEMS_EXCLUDE set (even empty) also routes the aten ops
through FlagGems except the names it lists; unset or '*', FlagGems' fused kernels only.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

import torch

import runtime
from ops import BACKENDS, EXPERT_KERNELS, backend_unavailable
from runtime import SetupError, greedy, write_atomically

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_KEYS = ("ckpt", "mp", "backend", "device", "dtype", "ogroups", "experts")
DEFINITIONS = {
    "step": "forward pass i of a prompt: 0 the prefill, i > 0 one token after it; logits of the last position",
    "max_abs": "max over steps and vocabulary of |a - b|, B teacher-forced with A's greedy tokens",
    "max_rel": "max over steps of max_v |a_v - b_v| / max_v |a_v|",
    "top1": "fraction of steps where argmax a == argmax b (teacher-forced)",
    "first_divergence": "first step where A's and B's own greedy tokens differ, null if none",
    "nonfinite": "NaN/inf logits on either side (teacher-forced)",
}


class UsageError(Exception):
    """A bad option, spec or setup found before any run: exit status 2."""


class RunError(Exception):
    """A side failed while running: exit status 3."""


# ---------------------------------------------------------------- specs

def parse_spec(text: str, name: str, default_ckpt: Optional[str]) -> dict:
    """A spec string -> {ckpt, mp, backend, device, dtype, ogroups, experts}; UsageError naming the bad key."""
    spec = {"ckpt": default_ckpt, "mp": 1, "backend": "auto", "device": None, "dtype": None, "ogroups": False,
            "experts": "triton"}
    seen = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UsageError(f"{name}: '{item}' in spec {text!r} is not key=value (keys: {', '.join(SPEC_KEYS)})")
        if key not in SPEC_KEYS:
            raise UsageError(f"{name}: unknown key '{key}' in spec {text!r} (keys: {', '.join(SPEC_KEYS)})")
        if key in seen:
            raise UsageError(f"{name}: key '{key}' given twice in spec {text!r}")
        seen.add(key)
        if key == "mp":
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"{name}: mp={value!r} must be a positive integer")
            spec["mp"] = int(value)
        elif key == "backend":
            if value not in BACKENDS:
                raise UsageError(f"{name}: backend={value!r} is unknown (one of {', '.join(BACKENDS)})")
            spec["backend"] = value
        elif key == "device":
            if value not in ("cpu", "cuda"):
                raise UsageError(f"{name}: device={value!r} must be cpu or cuda")
            spec["device"] = value
        elif key == "dtype":
            if value not in ("fp32", "bf16"):
                raise UsageError(f"{name}: dtype={value!r} must be fp32 or bf16")
            spec["dtype"] = value
        elif key == "ogroups":
            if value not in ("0", "1"):
                raise UsageError(f"{name}: ogroups={value!r} must be 0 or 1")
            spec["ogroups"] = value == "1"
        elif key == "experts":
            if value not in EXPERT_KERNELS:
                raise UsageError(f"{name}: experts={value!r} is unknown (one of {', '.join(EXPERT_KERNELS)})")
            spec["experts"] = value
        else:
            if not value:
                raise UsageError(f"{name}: ckpt= needs a folder")
            spec["ckpt"] = value
    if spec["ckpt"] is None:
        raise UsageError(f"{name}: no checkpoint: give ckpt= in the spec or --ckpt-path")
    if spec["device"] is None:
        spec["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def spec_text(spec: dict) -> str:
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())


def check_spec(spec: dict, name: str, max_seq_len: Optional[int]):
    """Everything about one side that can be checked without building the model; its ModelArgs.
    Fills in the spec's dtype from the config when it was not given."""
    why = backend_unavailable(spec["backend"], torch.device(spec["device"]))
    if why:
        raise UsageError(f"{name}: {why} (device={spec['device']}"
                         f"{'' if torch.cuda.is_available() else '; no CUDA GPU is visible'})")
    if spec["device"] == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{name}: device=cuda but no CUDA GPU is visible")
        if torch.cuda.device_count() < spec["mp"]:
            raise UsageError(f"{name}: mp={spec['mp']} on CUDA needs {spec['mp']} GPUs, "
                             f"{torch.cuda.device_count()} visible")
    if spec["backend"] == "flaggems":
        import importlib.util
        if importlib.util.find_spec("flag_gems") is None:
            raise UsageError(f"{name}: backend=flaggems but FlagGems is not installed: "
                             f"pip install --no-deps flag-gems==5.0.2 && "
                             f"pip install PyYAML sqlalchemy packaging typing_extensions (see README)")
    try:
        paths = [runtime.shard_path(spec["ckpt"], rank, spec["mp"]) for rank in range(spec["mp"])]
        args = side_args(spec, max_seq_len, spec["mp"])
        for path in paths:
            runtime.check_shard(path, spec["mp"], args.vocab_size)
    except SetupError as e:
        raise UsageError(f"{name}: " + str(e).replace("set USE_OGROUPS_COMM=1", "give ogroups=1")) from None
    spec["dtype"] = args.dtype
    return args


def side_args(spec: dict, max_seq_len: Optional[int], world: int):
    """The ModelArgs of one side, checked for world ranks (runtime.load_args)."""
    return runtime.load_args(spec["ckpt"], world, ogroups_comm=spec["ogroups"], expert_kernels=spec["experts"],
                             device=torch.device(spec["device"]), max_batch_size=1, max_seq_len=max_seq_len,
                             dtype=spec["dtype"], backend=spec["backend"])


# ---------------------------------------------------------------- one side

def decode(model, ids: List[int], steps: int, device: torch.device, forced: Optional[List[int]] = None):
    """Prefill ids, then steps - 1 more one-token passes (runtime.greedy): float32 logits [steps, vocab]
    of the last position at each pass (on CPU) and the argmax token of each. The token fed after
    pass i is the argmax, or forced[i] when teacher-forcing."""
    teacher = None if forced is None else torch.tensor([forced[:steps - 1]], device=device)
    logits, _ = greedy(model, torch.tensor([ids], dtype=torch.long, device=device), steps, teacher)
    return logits[0], logits[0].argmax(-1).tolist()


def run_side(job: dict, rank: int, world: int, device: torch.device,
             checked: Callable = lambda step: step()) -> Optional[dict]:
    """Build the side's model and decode every prompt; the results on rank 0 (None elsewhere).
    job: spec, prompts (token ids), steps, max_seq_len, teacher (A's tokens per prompt, or None).
    Each step that can fail on one rank alone (a missing shard, weights that do not fit) goes
    through checked, Ranks.checked on several ranks: all ranks stop there together, where a rank
    that went on to decode would wait in a collective for the one that stopped."""
    spec = job["spec"]

    def locate():
        path = runtime.shard_path(spec["ckpt"], rank, world)
        args = side_args(spec, job["max_seq_len"], world)
        runtime.check_shard(path, world, args.vocab_size)
        return args, path

    args, path = checked(locate)
    scope = contextlib.nullcontext()
    if spec["backend"] == "flaggems":
        scope = checked(lambda: runtime.ready_flaggems("backend=flaggems", scoped=True))
    with scope:
        model = checked(lambda: runtime.build_model(args, path, device, world))
        out = {"logits": [], "tokens": [], "greedy_logits": [], "greedy_tokens": []}
        for i, ids in enumerate(job["prompts"]):
            if job["teacher"] is None:
                logits, tokens = decode(model, ids, job["steps"], device)
                out["logits"].append(logits)
                out["tokens"].append(tokens)
                out["greedy_tokens"].append(tokens)
            else:
                forced, forced_tokens = decode(model, ids, job["steps"], device, job["teacher"][i])
                own, own_tokens = decode(model, ids, job["steps"], device)
                out["logits"].append(forced)
                out["tokens"].append(forced_tokens)
                out["greedy_logits"].append(own)
                out["greedy_tokens"].append(own_tokens)
        del model
    gc.collect()
    out["meta"] = {"spec": spec, "world": world, "device": str(device), "dtype": args.dtype,
                   "backend": args.backend}
    return out if rank == 0 else None


def save_atomic(obj, path: str) -> None:
    """torch.save into a file that appears only once complete."""
    write_atomically(path, lambda f: torch.save(obj, f), binary=True)


def worker_main(job_path: str, out_path: str) -> int:
    """check.py --worker JOB OUT: one side under torchrun; rank 0 writes OUT."""
    job = torch.load(job_path, weights_only=False)
    if job["spec"]["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""     # before Ranks looks for a GPU (only at the first CUDA call)
    ranks = runtime.Ranks()
    if job["spec"]["device"] == "cpu" and ranks.device.type != "cpu":
        ranks.device = torch.device("cpu")
    try:
        ranks.connect(job["timeout"])
        result = run_side(job, ranks.rank, ranks.world, ranks.device, ranks.checked)
        if ranks.rank == 0:
            save_atomic(result, out_path)
        return 0
    except SetupError as e:
        if ranks.rank == 0:
            print(f"check.py worker: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        runtime.end_process_groups()      # on every rank, after success or failure: no rank is left waiting


def launch(job: dict, name: str, workdir: str, timeout: float) -> dict:
    """Run one side: in this process for mp=1, else under torchrun with a time limit."""
    spec = job["spec"]
    if spec["mp"] == 1:
        device = torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device("cpu")
        try:
            return run_side(job, 0, 1, device)
        except SetupError as e:
            raise RunError(f"{name}: {e}") from None
        except Exception as e:      # a backend that fails: report which side, keep the type of error
            raise RunError(f"{name}: {type(e).__name__}: {e}") from e
    job_path, out_path = os.path.join(workdir, f"{name}.job.pt"), os.path.join(workdir, f"{name}.out.pt")
    save_atomic(job, job_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "USE_FLAGGEMS")}
    env["USE_OGROUPS_COMM"] = "1" if spec["ogroups"] else "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(spec["mp"]),
           os.path.join(HERE, "check.py"), "--worker", job_path, out_path]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RunError(f"{name}: mp={spec['mp']} run did not finish within --timeout {timeout:g} s") from None
    if proc.returncode != 0 or not os.path.isfile(out_path):
        lines = [line for line in log.splitlines() if line.strip()]
        errors = [line for line in lines if "check.py worker: error:" in line]
        detail = "\n".join(errors or lines[-15:])
        raise RunError(f"{name}: mp={spec['mp']} run failed (exit status {proc.returncode}):\n{detail}")
    return torch.load(out_path, weights_only=False)


def stop(proc: subprocess.Popen) -> None:
    """End the torchrun job we started (its process group), SIGTERM first."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- comparison

def compare(a_logits: torch.Tensor, b_logits: torch.Tensor, a_greedy: List[int], b_greedy: List[int]) -> dict:
    """Metrics of one prompt from A's and B's teacher-forced logits [steps, vocab] and the greedy
    tokens of each side (see the module docstring for the definitions)."""
    a, b = a_logits.float(), b_logits.float()
    if a.shape != b.shape:
        raise RunError(f"logits of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    nonfinite = int((~torch.isfinite(a)).sum() + (~torch.isfinite(b)).sum())
    diff = (a - b).abs()
    per_step_abs = diff.amax(dim=-1)                                        # [steps]
    per_step_rel = per_step_abs / a.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    if nonfinite:
        max_abs, max_rel = math.inf, math.inf
    else:
        max_abs, max_rel = float(per_step_abs.max()), float(per_step_rel.max())
    agree = a.argmax(dim=-1) == b.argmax(dim=-1)
    first = next((i for i, (x, y) in enumerate(zip(a_greedy, b_greedy)) if x != y), None)
    return {"max_abs": max_abs, "max_rel": max_rel, "top1": float(agree.float().mean()),
            "first_divergence": first, "nonfinite": nonfinite, "steps": int(a.size(0)),
            "per_step_max_abs": [float(x) for x in per_step_abs]}


def judge(rows: List[dict], max_abs: Optional[float], max_rel: Optional[float], min_top1: Optional[float],
          same_greedy: bool) -> List[str]:
    """The thresholds passed, one line each."""
    failures = []
    for r in rows:
        where = f"prompt {r['index']}"
        if r["nonfinite"]:
            failures.append(f"{where}: {r['nonfinite']} NaN/inf logits")
        if max_abs is not None and r["max_abs"] > max_abs:
            failures.append(f"{where}: max_abs {r['max_abs']:.3g} > --max-abs {max_abs:g}")
        if max_rel is not None and r["max_rel"] > max_rel:
            failures.append(f"{where}: max_rel {r['max_rel']:.3g} > --max-rel {max_rel:g}")
        if min_top1 is not None and r["top1"] < min_top1:
            failures.append(f"{where}: top1 {r['top1']:.3f} < --min-top1 {min_top1:g}")
        if same_greedy and r["first_divergence"] is not None:
            failures.append(f"{where}: greedy tokens diverge at step {r['first_divergence']}")
    return failures


def finite_or_none(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def table(rows: List[dict]) -> str:
    lines = [f"{'prompt':>6} {'tokens':>6} {'max_abs':>10} {'max_rel':>10} {'top1':>6} {'diverge':>7}"]
    for r in rows:
        div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        lines.append(f"{r['index']:>6} {r['prompt_tokens']:>6} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} "
                     f"{r['top1']:>6.3f} {div:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare two configurations of a converted DeepSeek-V4 or DeepSeek-R1 / "
                                            "V3 checkpoint on the same prompts.")
    p.add_argument("--ckpt-path", help="default checkpoint folder of both specs (ckpt= in a spec overrides it)")
    p.add_argument("--input-file", required=True, help="prompts: blank-line separated text, or JSON lines")
    p.add_argument("--a", required=True, help='the reference spec, e.g. "mp=1,backend=torch,dtype=fp32,device=cpu"')
    p.add_argument("--b", required=True, help="the spec under test")
    p.add_argument("--steps", type=int, default=16, help="forward passes per prompt (prefill + steps-1 decode)")
    p.add_argument("--max-abs", type=float, help="fail when a prompt's max_abs is above this")
    p.add_argument("--max-rel", type=float, help="fail when a prompt's max_rel is above this")
    p.add_argument("--min-top1", type=float, help="fail when a prompt's top-1 agreement is below this")
    p.add_argument("--same-greedy", action="store_true", help="fail when the greedy tokens diverge")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--keep", help="keep each side's results here (a.pt, b.pt)")
    p.add_argument("--max-seq-len", type=int, help="override the config's max_seq_len (both sides)")
    p.add_argument("--thinking", action="store_true", help="encode prompts in thinking mode")
    p.add_argument("--raw", action="store_true", help="feed prompts as they are after BOS")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a torchrun side may take")
    opts = p.parse_args(argv)          # argparse itself exits with status 2 on a bad command line
    if opts.steps < 1:
        raise UsageError("--steps must be at least 1")
    if opts.min_top1 is not None and not 0 <= opts.min_top1 <= 1:
        raise UsageError("--min-top1 must be in [0, 1]")
    for flag in ("report", "keep"):
        path = getattr(opts, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"the folder of --{flag} {path} does not exist")
    return opts


def run(opts: argparse.Namespace) -> int:
    spec_a = parse_spec(opts.a, "--a", opts.ckpt_path)
    spec_b = parse_spec(opts.b, "--b", opts.ckpt_path)
    args_a = check_spec(spec_a, "--a", opts.max_seq_len)
    max_seq_len = opts.max_seq_len or args_a.max_seq_len
    args_b = check_spec(spec_b, "--b", max_seq_len)
    family = runtime.family_of(args_a)
    if runtime.family_of(args_b) is not family:
        raise UsageError(f"--a is {family.title}, --b is {runtime.family_of(args_b).title}: not one model")
    if args_a.vocab_size != args_b.vocab_size:
        raise UsageError(f"--a has a vocabulary of {args_a.vocab_size}, --b of {args_b.vocab_size}: not one model")
    try:
        tokenizer = runtime.Tokenizer(spec_a["ckpt"], args_a.vocab_size)
        prompts = runtime.read_prompts(opts.input_file)
        ids = runtime.tokenize(prompts, tokenizer, "thinking" if opts.thinking else "chat", opts.raw,
                               max_seq_len - opts.steps + 1, family)
    except SetupError as e:
        raise UsageError(f"{e} (with --steps {opts.steps})" if "max_seq_len" in str(e) else str(e)) from None

    with tempfile.TemporaryDirectory(prefix="check-") as workdir:
        job = {"prompts": ids, "steps": opts.steps, "max_seq_len": max_seq_len, "timeout": opts.timeout}
        start = time.perf_counter()
        a = launch(dict(job, spec=spec_a, teacher=None), "a", workdir, opts.timeout)
        a_s = time.perf_counter() - start
        b = launch(dict(job, spec=spec_b, teacher=a["tokens"]), "b", workdir, opts.timeout)
        b_s = time.perf_counter() - start - a_s
    if opts.keep:
        os.makedirs(opts.keep, exist_ok=True)
        save_atomic(a, os.path.join(opts.keep, "a.pt"))
        save_atomic(b, os.path.join(opts.keep, "b.pt"))

    rows = []
    for i, prompt_ids in enumerate(ids):
        row = {"index": i, "prompt_tokens": len(prompt_ids)}
        row.update(compare(a["logits"][i], b["logits"][i], a["greedy_tokens"][i], b["greedy_tokens"][i]))
        row["a_tokens"], row["b_tokens"] = a["greedy_tokens"][i], b["greedy_tokens"][i]
        row["a_text"] = tokenizer.decode(a["greedy_tokens"][i])
        row["b_text"] = tokenizer.decode(b["greedy_tokens"][i])
        rows.append(row)
    failures = judge(rows, opts.max_abs, opts.max_rel, opts.min_top1, opts.same_greedy)
    summary = {"prompts": len(rows), "max_abs": max(r["max_abs"] for r in rows),
               "max_rel": max(r["max_rel"] for r in rows), "min_top1": min(r["top1"] for r in rows),
               "diverged": sum(r["first_divergence"] is not None for r in rows)}
    report = {"a": spec_a, "b": spec_b, "steps": opts.steps, "max_seq_len": max_seq_len, "definitions": DEFINITIONS,
              "seconds": {"a": round(a_s, 3), "b": round(b_s, 3)},
              "thresholds": {"max_abs": opts.max_abs, "max_rel": opts.max_rel, "min_top1": opts.min_top1,
                             "same_greedy": opts.same_greedy},
              "summary": summary, "prompts": rows, "failures": failures, "ok": not failures}
    if opts.report:
        text = json.dumps(sanitize(report), indent=1, ensure_ascii=False, allow_nan=False)
        write_atomically(opts.report, lambda f: f.write(text + "\n"))
    print(f"A: {spec_text(spec_a)}  ({a_s:.1f} s)\nB: {spec_text(spec_b)}  ({b_s:.1f} s)")
    print(table(rows))
    print(f"worst: max_abs {summary['max_abs']:.3g}, max_rel {summary['max_rel']:.3g}, "
          f"top1 {summary['min_top1']:.3f}, {summary['diverged']} of {len(rows)} prompts diverged")
    for line in failures:
        print("FAIL", line)
    print("OK" if not failures else f"FAILED: {len(failures)} threshold(s) passed", flush=True)
    return 0 if not failures else 1


def sanitize(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sanitize(v) for v in obj]
    return finite_or_none(obj)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        if len(argv) != 3:
            print("check.py: --worker takes JOB OUT", file=sys.stderr)
            return 2
        return worker_main(argv[1], argv[2])
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"check.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunError as e:
        print(f"check.py: error: {e}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
