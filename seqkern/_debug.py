"""Debug switches read at call time (never set by the library itself).

SEQKERN_POISON_OUTPUTS=1: fill every new kernel output with NaN before the kernel runs,
so an element the kernel forgets to write shows up in the tests.
"""
import os

import torch


def poison_outputs():
    return os.environ.get("SEQKERN_POISON_OUTPUTS", "0") == "1"


def new_output(shape, dtype, device):
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
