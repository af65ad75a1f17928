"""Which FlagGems aten operators the model can run on (CUDA machine, not collected by pytest).

`python tests/flaggems_ops.py [--out report.json]`:
1. Runs the fixture model (float32, backend triton, eager: prefill of two prompts in two chunks,
   then decode steps at tensor positions) without FlagGems and records the aten operators it calls.
2. For each FlagGems function that implements one of them, runs the same steps with only that
   function routed through FlagGems (flag_gems.use_gems(include=[...])): an exception, or logits
   off the torch run by more than 1e-3 relative, marks the function bad.
3. Runs everything routed except the bad functions, and reports its logit error.
4. Probes the two functions found bad with flag-gems 5.0.2 (mul, topk) on small inputs shaped as
   the model's, to say what goes wrong.
`--exclude a,b` skips step 2 and takes that list as the bad functions.
Prints one line per function and writes the JSON report; exit status 1 when step 3 still fails.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from fixtures import fixture_model, write_release  # noqa: E402

TOL = 1e-3


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
        out.append(model(ids[:, p:p + 1], torch.full((2,), p, device="cuda")))
    return torch.stack(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def probes(flag_gems) -> dict:
    """mul and topk through FlagGems against torch on inputs shaped as in the model."""
    g = torch.Generator(device="cuda").manual_seed(5)
    a, b = torch.rand(2, 1, 4, 1, device="cuda", generator=g), torch.rand(2, 1, 4, 64, device="cuda", generator=g)
    scores = torch.randn(2, 1, 40, device="cuda", generator=g)
    scores[..., 25:] = float("-inf")                    # entries not visible yet, as in the indexer
    want_mul, want_top = a * b, scores.topk(8, dim=-1)
    with flag_gems.use_gems(include=["mul"]):
        got_mul = a * b
    with flag_gems.use_gems(include=["topk"]):
        got_top = scores.topk(8, dim=-1)
    return {"mul [2,1,4,1] * [2,1,4,64]": f"torch shape {list(want_mul.shape)}, FlagGems shape {list(got_mul.shape)}"
            + ("" if got_mul.shape != want_mul.shape else f", max diff {(got_mul - want_mul).abs().max().item():.2e}"),
            "topk(8) of 40 scores, 15 of them -inf": f"values equal: {torch.equal(got_top.values, want_top.values)}, "
            f"indices equal: {torch.equal(got_top.indices, want_top.indices)}; torch indices "
            f"{want_top.indices[0, 0].tolist()}, FlagGems {got_top.indices[0, 0].tolist()}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="flaggems_ops.json")
    parser.add_argument("--exclude", help="comma-separated bad functions: skip the one-by-one audit")
    opts = parser.parse_args()
    import flag_gems
    path = tempfile.mkdtemp()
    weights = write_release(path, seed=3, n_files=1)
    ids = torch.randint(0, 129280, (2, 20), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        ref = run_model(path, weights, ids)
        recorder = OpRecorder()
        with recorder:
            run_model(path, weights, ids)
        funcs = sorted({item[1].__name__ for item in flag_gems._FULL_CONFIG
                        if len(item) > 1 and item[0] in recorder.names})
        print(f"{len(recorder.names)} aten ops used by the model: {' '.join(sorted(recorder.names))}")
        print(f"{len(funcs)} FlagGems functions implement them: {' '.join(funcs)}", flush=True)
        report = {"aten_ops": sorted(recorder.names), "functions": {}}
        bad = opts.exclude.split(",") if opts.exclude else []
        for fn in funcs if not opts.exclude else []:
            t0 = time.perf_counter()
            try:
                with flag_gems.use_gems(include=[fn]):
                    got = run_model(path, weights, ids)
                err = rel(got, ref)
                status = "ok" if err <= TOL else "wrong result"
                detail = f"rel err {err:.2e}"
            except Exception as e:         # noqa: BLE001 - the audit records whatever the op raised
                status, detail = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if status != "ok":
                bad.append(fn)
            report["functions"][fn] = {"status": status, "detail": detail}
            print(f"{fn:32s} {status:13s} {detail}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            with open(opts.out, "w") as f:          # kept up to date: a long audit may be cut short
                json.dump(report, f, indent=1)
        try:
            with flag_gems.use_gems(exclude=bad):
                err = rel(run_model(path, weights, ids), ref)
            final = {"excluded": bad, "rel_err": err, "ok": err <= TOL}
        except Exception as e:             # noqa: BLE001
            final = {"excluded": bad, "error": f"{type(e).__name__}: {e}", "ok": False}
        report["all_but_bad"] = final
        print("every FlagGems op except", bad, "->", final, flush=True)
        report["probes"] = probes(flag_gems)
        for what, result in report["probes"].items():
            print(f"probe {what}: {result}")
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0 if final["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
