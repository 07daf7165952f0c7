"""The tensors an op returns: their own, never views.

A backend may return a view (the layer's output reshaped from the [N, H] rows its kernel
writes; attention's [B, H, L, D] transposed from the [B, L, H, D] buffer MultiheadAttention
packs). autograd treats a view returned from a custom op as created inside a custom
Function, and an in-place op on it (`out += 1`, `relu_`) then raised where torch's modules
allow it. `unviewed` gives the same memory as a tensor of its own (no copy): detach(),
which is not a view to autograd (`_is_view()` is false) and costs 0.3 us.
"""
import torch


def unviewed(t):
    """t, or a tensor with t's storage, offset, sizes and strides that is not a view."""
    if t._base is None:
        return t
    return t.detach()  # set_ on a fresh tensor did the same in 1.7 us


def strided_like_transposed(t, shape):
    """An uninitialised [d0, d1, d2, d3] tensor laid out as [d0, d2, d1, d3] (what
    `new_empty((d0, d2, d1, d3)).transpose(1, 2)` lays out), but not a view."""
    d0, d1, d2, d3 = shape
    return t.new_empty_strided(shape, (d1 * d2 * d3, d3, d1 * d3, 1))
