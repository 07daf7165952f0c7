"""The `cuda` backend: the CUDA kernels of seqkern._C (csrc/cuda/) on CUDA tensors.

The kernels are registered under seqkern_C's CUDA dispatch key by csrc/cuda/bind_*.cpp,
which setup.py compiles only where torch has CUDA. What they handle is mirrored here, so
that the dispatcher moves on to `triton` (with the reason) instead of failing in C++:
attention fp16/bf16 with head dims up to 256 (an sm_90a wgmma/TMA forward for D = Dv in
{64, 128} without masks or dropout, the sm_80 kernels otherwise; SEQKERN_CUDA_SM90=0 turns
the Hopper path off); cells and layers in fp16/bf16/fp32, layers with G*H <= 32768 (a
persistent cooperative kernel keeping W_hh in shared memory when it fits on the GPU, one
launch per step otherwise). attention_weights has no CUDA kernel: triton computes it.
"""
import functools

import torch

from seqkern import _extension
from seqkern.backends._compiled import (  # noqa: F401  (the op entry points)
    attention_bwd, attention_fwd, attention_weights, rnn_cell_fwd, rnn_cell_gate_grads,
    rnn_layer_bwd, rnn_layer_fwd,
)

NAME = "cuda"
# Every op's arguments are checked by the C++ entry points (csrc/rnn_args.h,
# attention_args.h): seqkern/ops/ does not check them again.
CHECKS_ARGS = True

# Each op the dispatcher asks about -> the seqkern_C entry points it calls.
ENTRY_POINTS = {
    "attention": ("attention_fwd", "attention_bwd"),
    "attention_weights": ("attention_weights",),
    "rnn_cell": ("rnn_cell_fwd", "rnn_cell_gate_grads"),
    "rnn_layer": ("rnn_layer_fwd", "rnn_layer_bwd"),
}
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_RNN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# csrc/cuda/rnn_layer.cu: a block owns whole hidden units, all G*H gate rows of a step in
# one grid (G*H <= 32768: LSTM H <= 8192).
MAX_LAYER_GATE_ROWS = 32768


# What the build, the kernels registered and a GPU's capability allow is fixed for the
# process, so each is asked once (functools.cache): asked on every op call, they cost a GPU
# call of the op about 10 us of host time before its kernels (bench/RESULTS.md, "the
# Autograd kernel calls the op's kernel itself").
@functools.cache
def _build_reasons():
    if not _extension.available():
        return (f"seqkern._C is not built or failed to load ({_extension.load_error})",)
    info = _extension.build_info() or {}
    if not info.get("cuda_archs"):
        return ("seqkern._C was built without CUDA kernels (torch without CUDA, "
                "SEQKERN_SKIP_CUDA_BUILD=1, or no nvcc)",)
    return ()


@functools.cache
def _capability(index):
    return torch.cuda.get_device_capability(index)


def availability(device, index=None):
    """Why the cuda backend cannot run on `device` (a device type; index: the GPU's, None
    for the current one), or []."""
    reasons = list(_build_reasons())
    if reasons:
        return reasons
    if device != "cuda":
        return [f"runs on CUDA tensors only, got {device} tensors"]
    capability = _capability(torch.cuda.current_device() if index is None else index)
    if capability < (8, 0):
        return [f"needs compute capability 8.0 or newer (mma.sync, cp.async), this GPU has "
                f"{capability[0]}.{capability[1]}"]
    return []


@functools.cache
def has_cuda_kernel(entry_point):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"seqkern_C::{entry_point}", "CUDA")


def _attention_reasons(inputs):
    reasons = []
    if inputs["dtype"] not in _ATTENTION_DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not fp16 or bf16 (triton runs fp32)")
    D, Dv = inputs["query"].shape[-1], inputs["value"].shape[-1]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        reasons.append(f"head dims D={D}, Dv={Dv} outside 1..{MAX_HEAD_DIM}")
    return reasons


def not_supported_reasons(op, inputs):
    device = inputs["device"]
    reasons = availability(device.type, device.index)
    if reasons:
        return reasons
    missing = [name for name in ENTRY_POINTS.get(op, (op,)) if not has_cuda_kernel(name)]
    if missing:
        return [f"seqkern._C has no CUDA kernel for {', '.join(missing)}"]
    if op == "attention":
        return _attention_reasons(inputs)
    reasons = []
    if inputs["dtype"] not in _RNN_DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32")
    if op == "rnn_layer":
        rows = inputs.get("gate_rows", 0)
        if rows > MAX_LAYER_GATE_ROWS:
            reasons.append(f"{inputs['mode']} with {rows} gate rows (G*H) > "
                           f"{MAX_LAYER_GATE_ROWS}")
        if inputs.get("projection"):
            reasons.append("LSTM projections (proj_size) have no CUDA kernel")
    return reasons
