"""The Triton kernels, run on the CPU by Triton's interpreter, against their torch references."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_match_torch_references_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" ok") == 42 and "FAIL" not in run.stdout
