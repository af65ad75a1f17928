"""The Triton kernels, run on the CPU by Triton's interpreter, against their torch references."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernels_match_torch_references_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "testkit.cases"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    total, failed = map(int, re.search(r"^(\d+) checks, (\d+) failed$", run.stdout, re.M).groups())
    assert failed == 0 and total >= 40 and run.stdout.count(" ok\n") == total, run.stdout
