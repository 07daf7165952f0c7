"""Compiles every Triton kernel of seqkern.kernels for sm_80 and sm_90 without a GPU, as its
launches on a GPU would: `make triton-check` (CI runs it). The interpreter, which runs them
in the tests, never builds them; a kernel that does not compile showed up only on the rare
GPU machine.

How: the op wrappers (seqkern.kernels.*) run on meta tensors (shapes only, and device type
not "cpu", so they take the GPU's tile sizes and flags) with JITFunction.run replaced by a
recorder; every distinct launch (kernel, argument types, constexprs, num_warps/num_stages)
is then compiled with triton.compile for each target, down to a cubin (Triton's bundled
ptxas). Arguments are specialized as a launch does (integers equal to 1 as constexprs,
divisibility by 16 of integers and of pointers, meta tensors counting as aligned). Prints
registers, stack (spills) and shared memory per kernel and target, and lists every launch
that spills; exits 1 if a launch fails to compile, multiplies 16-bit operands without tensor
cores where it should (TENSOR_CORE_KERNELS), or spills more than --max-stack bytes
(default 300: what is left is fp32 attention's dK/dV at D = 256, ~260 bytes, at tl.dot's
smallest tiles, and 8-16 bytes in fp16 dK/dV and attention weights on sm_80;
kernels/attention.py) or asks for more shared memory than a block may have. It compiles
with the triton it imports: `make triton-check` runs it with the one installed here (3.9)
and with the GPU machine's (3.6, put first on PYTHONPATH).

Usage: python .ci/triton_compile.py [--jobs N] [--only NAME_PART] [--max-stack BYTES]
"""
import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels (JITFunction), before the import
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, said (it warns)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
# How a launch specializes its arguments: libtriton's own rule (triton 3.4 and later; CI
# runs 3.9 and the GPU machine's 3.6).
from triton._C.libtriton import native_specialize_impl  # noqa: E402

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
# The most dynamic shared memory a block may opt in to (A100: 163 KB, H100: 227 KB); a launch
# asking for more fails with "out of resource" on the GPU only.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
META = torch.device("meta")
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Kernels whose fp16/bf16 launches must multiply on tensor cores (mma.sync on sm_80, wgmma
# on sm_90): a 16-bit dot falling back to FMA (an upcast meant for the interpreter, say)
# would still be correct and only slow. The layer step kernels multiply in fp32 by design.
TENSOR_CORE_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dq_kernel",
                       "_attention_bwd_dkdv_kernel", "_attention_weights_kernel",
                       "_rnn_cell_fwd_kernel")
_MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\b")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def _specialize(param, value):
    """(type, attributes) as a GPU launch specializes the argument (integers equal to 1
    become constexprs, 16-divisible integers and 16-byte aligned pointers get divisibility
    facts; a meta tensor counts as aligned unless its offset is not)."""
    kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                        not param.do_not_specialize_on_alignment)
    return kind, (BaseBackend.parse_attr(spec) if isinstance(spec, str) else [])


def record_launches(run_cases):
    """{key: (JITFunction, signature, constexprs, attrs, options)} of every launch run_cases
    makes."""
    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(self.params):
            value = bound[param.name]
            kind, attr = ("constexpr", []) if param.is_constexpr or value is None else (
                _specialize(param, value))
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[(i,)] = value
            elif attr:
                attrs[(i,)] = attr
        key = (self.fn.__qualname__, tuple(signature.items()),
               tuple(sorted((k[0], repr(v)) for k, v in constexprs.items())),
               tuple(sorted((k[0], repr(v)) for k, v in attrs.items())),
               tuple(sorted(options.items())))
        launches.setdefault(key, (self, signature, constexprs, attrs, options))

    original = JITFunction.run
    JITFunction.run = record
    try:
        run_cases()
    finally:
        JITFunction.run = original
    return launches


def randn(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def attention_cases():
    from seqkern.kernels import attention_bwd, attention_fwd, attention_weights
    seed = torch.tensor([1, 2], dtype=torch.int64)  # (seed, offset) on the CPU

    def run(dtype, D, Dv=None, Hq=2, Hkv=2, mask=None, kpm=False, causal=False, p=0.0):
        B, L, S = 1, 128, 128
        q, k, v = randn(B, Hq, L, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype), randn(
            B, Hkv, S, Dv or D, dtype=dtype)
        attn_mask = None if mask is None else randn(
            B, Hq, L, S, dtype=torch.bool if mask == "bool" else dtype)
        key_padding = torch.zeros(B, S, dtype=torch.bool, device=META) if kpm else None
        out, lse = attention_fwd(q, k, v, attn_mask, key_padding, p, causal, 0.125, seed)
        attention_bwd(randn(*out.shape, dtype=dtype), q, k, v, out, lse, attn_mask,
                      key_padding, p, causal, 0.125, seed)
        if Dv is None and Hq == Hkv:
            for average in (False, True):
                attention_weights(q, k, lse, attn_mask, key_padding, causal, 0.125, p, seed,
                                  average)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (40, 64, 80, 96, 128, 256):
            run(dtype, D)
    for dtype, D in ((torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64)):
        run(dtype, D, causal=True)
        run(dtype, D, mask="bool")
        run(dtype, D, mask="float")
        run(dtype, D, kpm=True, causal=True)
        run(dtype, D, p=0.1)
        run(dtype, D, Hq=4, Hkv=2)
        run(dtype, D, Dv=2 * D)


def rnn_cell_cases():
    from seqkern.kernels import rnn_cell_fwd, rnn_cell_gate_grads
    saved_width = {"LSTM": 4, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}
    B, I, H = 64, 512, 512
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for bias in (True, False):
                x, h = randn(B, I, dtype=dtype), randn(B, H, dtype=dtype)
                c = randn(B, H, dtype=dtype) if mode == "LSTM" else None
                b = [randn(G * H, dtype=dtype)] * 2 if bias else [None, None]
                rnn_cell_fwd(mode, x, h, c, randn(G * H, I, dtype=dtype),
                             randn(G * H, H, dtype=dtype), *b)
            for grad_c in (True, False):
                rnn_cell_gate_grads(mode, randn(B, H, dtype=dtype),
                                    randn(B, H, dtype=dtype) if grad_c else None, h, c, h,
                                    randn(B * saved_width[mode] * H))


def rnn_layer_cases():
    from seqkern.kernels import rnn_layer_bwd, rnn_layer_fwd
    T, B, I, H = 3, 64, 512, 512
    cases = [(mode, H) for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")] + [("LSTM", 256)]
    for mode, P in cases:
        G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x, h0 = randn(T, B, I, dtype=dtype), randn(B, P, dtype=dtype)
            c0 = randn(B, H, dtype=dtype) if mode == "LSTM" else None
            w = (randn(G * H, I, dtype=dtype), randn(G * H, P, dtype=dtype),
                 randn(G * H, dtype=dtype), randn(G * H, dtype=dtype))
            w_hr = randn(P, H, dtype=dtype) if P != H else None
            for need_workspace in (False, True):  # the backward reads the last one's
                out, h_n, c_n, workspace = rnn_layer_fwd(mode, x, None, h0, c0, *w, False,
                                                         need_workspace, w_hr)
            for grad_output in (out, None):
                rnn_layer_bwd(mode, x, None, h0, c0, *w, False, workspace,
                              None if grad_output is None else randn(*out.shape, dtype=dtype),
                              h_n, c_n if mode == "LSTM" else None, [True] * 8, w_hr)


def all_cases():
    attention_cases()
    rnn_cell_cases()
    rnn_layer_cases()


def compile_one(item):
    """(label, target, (registers, stack bytes, shared bytes) or the error's text); the
    label says "needs tensor cores, has none" where a TENSOR_CORE_KERNELS launch with
    fp16/bf16 operands has no mma instruction."""
    (fn, signature, constexprs, attrs, options), target = item
    name = fn.fn.__qualname__
    flags = ",".join(f"{param}={value}" for param, value in zip(
        fn.arg_names, [constexprs.get((i,), "") for i in range(len(fn.arg_names))])
        if value != "" and isinstance(value, bool) and value)
    label = f"{name}[{flags}]" if flags else name
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                target=target, options=options)
    except Exception as exc:  # noqa: BLE001  (reported with the launch that failed)
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""
        return label, target, f"{type(exc).__name__}: {where}{lines[-1][:300]}"
    sixteen_bit = {"*fp16", "*bf16"} & set(signature.values())
    if name in TENSOR_CORE_KERNELS and sixteen_bit and not _MMA.search(kernel.asm["ptx"]):
        return label, target, "needs tensor cores (fp16/bf16 operands), has no mma instruction"
    return label, target, (*resource_usage(kernel.asm["cubin"]), kernel.metadata.shared)


def resource_usage(cubin):
    """(registers, stack and local memory bytes) from cuobjdump's report (the driver reports
    them only when loading the kernel on a GPU)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                                capture_output=True, text=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", report)}
    return usage.get("REG", 0), usage.get("STACK", 0) + usage.get("LOCAL", 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="kernels whose name contains this")
    parser.add_argument("--max-stack", type=int, default=300,
                        help="fail if a launch spills more than this many bytes")
    args = parser.parse_args()
    launches = record_launches(all_cases)
    if not launches:
        print("no Triton launch was recorded: are the kernels interpreted?")
        return 1
    work = [(launch, target) for key, launch in launches.items() if args.only in key[0]
            for target in TARGETS]
    print(f"triton {triton.__version__}: {len(work) // len(TARGETS)} distinct launches x "
          f"{len(TARGETS)} targets")
    failed, spilled = [], []
    most = {}  # (kernel, arch) -> the most registers, stack and shared memory of its launches
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for label, target, meta in pool.map(compile_one, work):
            arch = f"sm_{target.arch}"
            if isinstance(meta, str):
                failed.append(f"{label} {arch}: {meta}")
                continue
            regs, stack, smem = meta
            if smem > SHARED_LIMIT[target.arch]:
                failed.append(f"{label} {arch}: {smem} bytes of shared memory, more than the "
                              f"{SHARED_LIMIT[target.arch]} a block may have")
            if stack:
                over = stack > args.max_stack
                spilled.append((over, f"{label} {arch}: {stack} bytes of stack, {regs} "
                                      f"registers{' (over --max-stack)' if over else ''}"))
            key = (label.split("[")[0], arch)
            most[key] = tuple(max(a, b) for a, b in zip(most.get(key, (0, 0, 0)), meta))
    print(f"{'kernel':<40} {'arch':<6} {'regs':>5} {'stack':>6} {'smem':>7}  (most of a launch)")
    for (name, arch), (regs, stack, smem) in sorted(most.items()):
        print(f"{name:<40} {arch:<6} {regs:>5} {stack:>6} {smem:>7}")
    for line in failed + [line for _, line in spilled]:
        print(line)
    over = sum(too_much for too_much, _ in spilled)
    print(f"{len(work) - len(failed)} of {len(work)} compiled and fit; {len(spilled)} spill, "
          f"{over} of them more than {args.max_stack} bytes")
    return 1 if failed or over else 0

if __name__ == "__main__":
    sys.exit(main())
