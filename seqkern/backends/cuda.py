"""The `cuda` backend: the CUDA kernels of seqkern._C (csrc/cuda/) on CUDA tensors.

The kernels themselves come with their own issue; until _C holds a CUDA kernel for an op,
this backend says so and the dispatcher moves on to `triton`.
"""
from seqkern import _extension

NAME = "cuda"


def availability(device):
    if not _extension.available():
        return [f"seqkern._C is not built or failed to load ({_extension.load_error})"]
    info = _extension.build_info() or {}
    if not info.get("cuda_archs"):
        return ["seqkern._C was built without CUDA kernels (torch without CUDA, "
                "SEQKERN_SKIP_CUDA_BUILD=1, or no nvcc)"]
    if device != "cuda":
        return [f"runs on CUDA tensors only, got {device} tensors"]
    return []


def not_supported_reasons(op, inputs):
    reasons = availability(inputs["device"].type)
    if not reasons:
        reasons.append(f"no CUDA kernel for {op} yet (csrc/cuda/ does not implement it)")
    return reasons
