"""Building Triton kernels for the H100 (sm_90) with no GPU, through the compiler's whole path that the
interpreter skips: a kernel that does not compile, or that spills registers to the stack, is found on
a CPU-only machine."""
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def build_sm90(fn, types: dict, consts: dict, warps: int, stages: int, unhinted=frozenset()) -> str:
    """Compile the jitted fn for sm_90: types {argument: Triton type} of its runtime arguments, consts
    {argument: value} of its constexprs. Pointers and integers other than those named in unhinted are
    marked divisible by 16, as Triton specialises them for the real shapes. Returns cuobjdump's
    resource usage of the cubin (registers, shared memory, and STACK: the bytes spilled)."""
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in consts and name not in unhinted and types[name] != "fp32"}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    built = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(built.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout


def spills(usage: str) -> bool:
    """Whether build_sm90's resource usage shows a stack, i.e. registers spilled."""
    return "STACK:0 " not in usage
