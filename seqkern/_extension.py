"""Loads seqkern._C if it was built; remembers why not otherwise (import seqkern never fails)."""
import importlib

_C = None
load_error = None

try:
    _C = importlib.import_module("seqkern._C")
except ImportError as exc:  # not built, or built against another torch
    load_error = f"{type(exc).__name__}: {exc}"


def available():
    return _C is not None


def build_info():
    """What _C was built with (compiler flags, CUDA archs), or None if it is missing."""
    if _C is None:
        return None
    import torch
    return dict(zip(("cpu_flags", "cuda_archs", "compiler"),
                    torch.ops.seqkern_C.build_info()))
