"""Reads ptxas's -v report from a CMake build log (`make cuda-check`) and prints, per kernel
and architecture, registers, shared memory, stack and spills. Exits 1 if a kernel spills
registers or uses local memory (a stack frame), which on the hot kernels of a fused
attention or recurrence means a slow path.

Usage: python .ci/cuda_resources.py build-cmake/build.log
"""
import re
import shutil
import subprocess
import sys

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse(log):
    kernels, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = dict(regs=0, smem=0, stack=0, spill_st=0, spill_ld=0)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                                    spill_ld=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            kernels[current].update(regs=int(m.group(1)), smem=int(m.group(3) or 0))
            current = None
    return kernels


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                         text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def main(path):
    kernels = parse(open(path, errors="replace").read())
    if not kernels:
        print(f"{path}: no ptxas report (no CUDA kernels compiled?)")
        return 0
    names = demangle(sorted({k for k, _ in kernels}))
    bad = []
    print(f"{'arch':7} {'regs':>4} {'smem':>6} {'stack':>5} {'spill':>5}  kernel")
    for (name, arch), r in sorted(kernels.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        pretty = names[name]
        short = pretty if len(pretty) < 110 else pretty[:107] + "..."
        spill = r["spill_st"] + r["spill_ld"]
        print(f"{arch:7} {r['regs']:4d} {r['smem']:6d} {r['stack']:5d} {spill:5d}  {short}")
        if spill or r["stack"]:
            bad.append(f"{arch} {short}: {r['stack']} B stack, {spill} B spills")
    if bad:
        print("\nkernels with local memory or spills:\n  " + "\n  ".join(bad))
        return 1
    print(f"\n{len(kernels)} kernel builds, none with spills or local memory")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
