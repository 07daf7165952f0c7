"""Builds the emulation harnesses: host-C++ copies of csrc/cuda's kernels, compiled with g++.

The kernels are not edited for the test; `rewrite_cuda_source` makes textual substitutions
on a copy, and emu_runtime.h supplies what the rewritten code then calls.
"""
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The kernels under test; SEQKERN_EMULATION_CUDA_SRC points at another copy (a mutated one, to
# see the tests fail).
CUDA_SRC = Path(os.environ.get("SEQKERN_EMULATION_CUDA_SRC", REPO / "csrc" / "cuda"))
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
REQUIRED_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")

# harness source -> the kernel sources it includes (rewritten into the build dir)
HARNESSES = {
    "runtime_harness": (),  # emu_runtime.h's own checks: no kernel sources
    "attention_harness": ("mma.cuh", "attention_common.cuh", "attention_fwd.cu",
                          "attention_bwd.cu"),
    "rnn_cell_harness": ("rnn.h", "rnn_cell.cu"),
    "rnn_layer_harness": ("rnn.h", "mma.cuh", "rnn_layer_blocks.cuh", "rnn_layer_kernels.cuh",
                          "rnn_layer.cu"),
}

_LAUNCH = re.compile(r"([\w:]+(?:<\w+>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)
_SPIN = re.compile(r"(while \([^;{]*\) \{)(\s*\})")
_DEVICE_FN = re.compile(r"(?:template <[^>]*>\s*)?__device__ __forceinline__ [^;{]*\{")


def _drop_ptx_functions(src):
    """Removes every __device__ __forceinline__ function whose body holds inline PTX (asm)
    or takes a shared-memory address (__cvta_generic_to_shared): emu_runtime.h defines
    emulated ldmatrix / mma.sync / cp.async under the same names."""
    out, pos = [], 0
    for m in _DEVICE_FN.finditer(src):
        if m.start() < pos:
            continue
        depth, i, in_str = 1, m.end(), False
        while depth:  # match braces, skipping string literals ("{%0, %1}" in asm templates)
            ch = src[i]
            if in_str:
                in_str = ch != '"' or src[i - 1] == "\\"
            elif ch == '"':
                in_str = True
            else:
                depth += {"{": 1, "}": -1}.get(ch, 0)
            i += 1
        body = src[m.end():i]
        if "asm" in body or "__cvta_generic_to_shared" in body:
            out.append(src[pos:m.start()])
            pos = i
    return "".join(out) + src[pos:]


def rewrite_cuda_source(name, src):
    """Returns csrc/cuda/<name>'s text made compilable as host C++ against emu_runtime.h.

    - `extern __shared__ ... smem[]` becomes a pointer to the emulated block's shared memory;
    - `kernel<<<grid, block, smem, stream>>>(args);` becomes
      `emu_launch(grid, block, smem, stream, [&] { kernel(args); });`;
    - empty spin loops (the layer's grid barrier, rnn_layer_kernels.cuh) yield, so that the
      block's other threads and the blocks they wait for run;
    - rnn_layer.cu's minimum work per block (`8 * kThreads`) becomes g_emu_min_work, so a test
      can force many small blocks (and cross-block barriers) at small hidden sizes;
    - rnn_layer.cu's packed step table goes 3 steps a launch (kStepsPerLaunch), so that the
      packed cases cross launches;
    - rnn.h's device section (`#if defined(__CUDACC__)`) is compiled;
    - mma.cuh's inline-PTX wrappers are dropped (emu_runtime.h has them).
    Each substitution must apply where expected, so that a change in the kernels that
    defeats one fails the build instead of silently testing something else.
    """
    def sub(pattern, repl, text, expect, flags=0):
        text, n = re.subn(pattern, repl, text, flags=flags)
        assert n >= expect, f"{name}: rewrite {pattern!r} applied {n} times, expected {expect}+"
        return text

    smem = r"extern __shared__ __align__\(16\) unsigned char smem\[\];"
    # files with kernels: how many of them take dynamic shared memory, how many launches
    kernels = {"attention_fwd.cu": (1, 1), "attention_bwd.cu": (1, 3), "rnn_cell.cu": (0, 2),
               "rnn_layer_kernels.cuh": (2, 0), "rnn_layer.cu": (0, 5)}
    if name in kernels:
        shared, launches = kernels[name]
        src = sub(smem, "unsigned char* smem = emu_smem();", src, shared)
        src = sub(_LAUNCH.pattern, lambda m: f"emu_launch({m[2]}, [&] {{ {m[1]}({m[3]}); }});",
                  src, launches, re.S)
    if name == "rnn_layer_kernels.cuh":
        src = sub(_SPIN.pattern, r"\1 emu_yield();\2", src, 1)
    if name == "rnn_layer.cu":
        src = sub(r"< 8 \* kThreads\) \+\+first;", "< g_emu_min_work) ++first;", src, 1)
        # a packed step table in launches of 3 steps, so that every packed case with more
        # steps crosses launches (a part-filled last one included)
        src = sub(r"constexpr int kStepsPerLaunch = \d+;", "constexpr int kStepsPerLaunch = 3;",
                  src, 1)
    if name == "rnn.h":
        src = sub(r"#if defined\(__CUDACC__\)", "#if 1", src, 1)
    if name == "mma.cuh":
        before = src
        src = _drop_ptx_functions(src)
        assert "asm" not in src.replace("asm_", ""), f"{name}: inline PTX left after rewrite"
        assert src != before
    return src


def missing_toolchain():
    """Why the harnesses cannot be built here (None when they can)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "g++ not found"
    absent = [h for h in REQUIRED_HEADERS if not (CUDA_INCLUDE / h).is_file()]
    if absent:
        return f"CUDA headers missing in {CUDA_INCLUDE}: {', '.join(absent)}"
    return None


@functools.cache
def sanitizer_missing():
    """Why the harnesses cannot be built with AddressSanitizer here (None when they can):
    a trivial program compiled, linked and run with -fsanitize=address."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("int main() { return 0; }\n")
        r = subprocess.run([os.environ.get("CXX", "g++"), "-fsanitize=address", str(src), "-o",
                            str(exe)], capture_output=True, text=True)
        if r.returncode != 0:
            return f"g++ -fsanitize=address failed: {r.stderr.strip()[-300:]}"
        r = subprocess.run([str(exe)], capture_output=True, text=True)
        return None if r.returncode == 0 else f"an ASan program fails to run: {r.stderr[-300:]}"


def build(harness, out_dir, cuda_src=CUDA_SRC, sanitize=False, defines=()):
    """Compiles tests/cuda_emulation/<harness>.cpp with rewritten kernels from cuda_src;
    returns the executable's path. sanitize: with AddressSanitizer, and every emulated
    buffer (shared memory included) allocated to its exact size, so that a read or write
    past any of them stops the run with ASan's report. defines: macros (-D) for the build."""
    out_dir = Path(out_dir)
    gen = out_dir / "cuda"  # the rewritten sources; their own includes fall back to cuda_src
    gen.mkdir(parents=True, exist_ok=True)
    for name in HARNESSES[harness]:
        (gen / name).write_text(rewrite_cuda_source(name, (Path(cuda_src) / name).read_text()))
    exe = out_dir / harness
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-w", "-pthread",
           f"-I{gen}", f"-I{HERE}", f"-I{cuda_src}", f"-I{CUDA_INCLUDE}",
           *(f"-D{d}" for d in defines), str(HERE / f"{harness}.cpp"), "-o", str(exe)]
    if sanitize:
        cmd[3:3] = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building {harness} failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return exe


def run(exe, *args, timeout=120, env=None):
    """Runs a harness (env: its environment, default ours); returns its stderr (diagnostics
    such as the chosen RNN plan)."""
    env = dict(os.environ if env is None else env)
    # A sanitized harness: ASan's report of any bad access, without LeakSanitizer (a harness
    # exits after one run and frees nothing).
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{Path(exe).name} {' '.join(map(str, args))} failed " \
                              f"(rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    return r.stderr
