"""The `triton` backend: the Triton kernels of seqkern.kernels (kernels/ in the source tree).

On CUDA tensors they run compiled. On CPU tensors they run only under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is imported): that is how CI tests them.
"""
import importlib
import os

import torch

NAME = "triton"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_import_error = None
_kernels = None


def _load():
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            _kernels = importlib.import_module("seqkern.kernels")
        except ImportError as exc:
            _import_error = f"{type(exc).__name__}: {exc}"
    return _kernels


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(device):
    if _load() is None:
        return [f"triton is not importable ({_import_error})"]
    if device == "cpu" and not _interpreted():
        return ["CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"]
    if device not in ("cpu", "cuda"):
        return [f"runs on CUDA tensors (or CPU tensors interpreted), got {device} tensors"]
    return []


def not_supported_reasons(op, inputs):
    reasons = availability(inputs["device"].type)
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32")
    if reasons:
        return reasons
    check = getattr(_kernels, f"{op}_not_supported_reasons", None)
    if check is None:
        return [f"seqkern.kernels has no Triton kernel for {op}"]
    return check(inputs)


def __getattr__(name):
    """The op entry points (attention_fwd, rnn_layer_bwd, ...) are seqkern.kernels' own."""
    if not name.startswith("_") and _load() is not None and hasattr(_kernels, name):
        return getattr(_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
