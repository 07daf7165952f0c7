"""The `cpu` backend: the C++ kernels of seqkern._C (csrc/cpu/) on CPU tensors."""
import torch

from seqkern import _extension
from seqkern.backends._compiled import (  # noqa: F401  (the op entry points)
    attention_bwd, attention_fwd, attention_weights, rnn_cell_bwd, rnn_cell_fwd, rnn_layer_bwd,
    rnn_layer_fwd,
)

NAME = "cpu"
# Every op's arguments are checked by the C++ entry points (csrc/rnn_args.h,
# attention_args.h): seqkern/ops/ does not check them again.
CHECKS_ARGS = True
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def availability(device):
    if not _extension.available():
        return [f"seqkern._C is not built or failed to load ({_extension.load_error}); "
                "reinstall with `pip install -e . --no-build-isolation`"]
    if device != "cpu":
        return [f"runs on CPU tensors only, got {device} tensors"]
    return []


def not_supported_reasons(op, inputs):
    reasons = availability(inputs["device"].type)
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32, fp64")
    return reasons
