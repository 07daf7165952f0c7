""".ci/cuda_resources.py, the spill check `make cuda-check` runs on ptxas's report."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci",
                      "cuda_resources.py")

_KERNEL = """ptxas info    : Compiling entry function '{name}' for 'sm_90a'
ptxas info    : Function properties for {name}
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 536 bytes cmem[0]
"""


def _run(tmp_path, kernels):
    log = tmp_path / "build.log"
    log.write_text("".join(_KERNEL.format(name=n, stack=st, spill=sp) for n, st, sp in kernels))
    return subprocess.run([sys.executable, SCRIPT, str(log)], capture_output=True, text=True)


def test_clean_report_passes(tmp_path):
    result = _run(tmp_path, [("_Z3fwdv", 0, 0), ("_Z3bwdv", 0, 0)])
    assert result.returncode == 0, result.stdout
    assert "2 kernel builds, none with spills" in result.stdout


def test_a_spill_or_a_stack_frame_fails(tmp_path):
    for kernels in ([("_Z3fwdv", 0, 0), ("_Z3bwdv", 0, 8)], [("_Z3fwdv", 16, 0)]):
        result = _run(tmp_path, kernels)
        assert result.returncode == 1, result.stdout
        assert "kernels with local memory or spills" in result.stdout
