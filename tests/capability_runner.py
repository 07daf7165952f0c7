"""Runs test code in a fresh process with ATEN_CPU_CAPABILITY set, so the CPU kernels built
for that instruction set (csrc/cpu/capability/) are the ones exercised."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_passes_under_capability(code, capability):
    """code must run cleanly and end by printing torch.ops.seqkern_C.cpu_capability()."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in (capability.upper(), "DEFAULT")
