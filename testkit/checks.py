"""check.py's runs for the V4 and the R1 / V3 check tests: a release converted for 1 and 2 ranks
beside a prompt file, and one check.py run on it with its report."""
import json
import os
from typing import Callable

import check
import convert

PROMPTS = ["Hello there", "Why is the sky blue? Answer in one sentence."]
STEPS = 5


def converted_release(root, write: Callable, seed: int, **convert_kw) -> dict:
    """write(path, seed=, n_files=1) a release under root, converted for 1 and 2 ranks: {N: folder},
    and "prompts": a file of PROMPTS."""
    release = os.path.join(root, "release")
    write(release, seed=seed, n_files=1)
    out = {}
    for n in (1, 2):
        out[n] = os.path.join(root, f"mp{n}")
        convert.convert(release, out[n], n, num_workers=1, **convert_kw)
    out["prompts"] = os.path.join(root, "prompts.txt")
    with open(out["prompts"], "w") as f:
        f.write("\n\n".join(PROMPTS) + "\n")
    return out


def run_check(ckpt: dict, a: str, b: str, tmp_path, *extra):
    """check.py with sides a and b on ckpt's N = 1 folder and prompts, STEPS steps: (exit status, the
    JSON report or None where none was written)."""
    report = tmp_path / "report.json"
    rc = check.main(["--ckpt-path", ckpt[1], "--input-file", ckpt["prompts"], "--a", a, "--b", b,
                     "--steps", str(STEPS), "--max-seq-len", "128", "--report", str(report), *extra])
    return rc, (json.loads(report.read_text()) if report.exists() else None)
