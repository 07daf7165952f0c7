"""seqkern._C: a built extension must load. import seqkern never fails without _C (the
reference and Triton backends still work) and the C++ tests then skip, so an extension that
was built but cannot load (an undefined symbol, another torch's ABI) would leave `make test`
green with every C++ kernel untested."""
import glob
import os

import pytest
import torch

import seqkern
from seqkern import _extension


def test_built_extension_loads():
    package = os.path.dirname(seqkern.__file__)
    built = glob.glob(os.path.join(package, "_C*.so")) + glob.glob(os.path.join(package, "_C*.pyd"))
    if not built:
        pytest.skip("seqkern._C is not built here")
    assert _extension.available(), f"{built[0]} is built but does not load: " \
                                    f"{_extension.load_error}"


def test_extension_uses_the_stable_abi_only():
    """_C is built as _C.abi3.so against CPython's stable ABI (setup.py: py_limited_api), so
    that one build loads under another CPython beside the same torch: the GPU machine's Python
    3.12 loads the _C that `make gpu-torch-check` builds here (gpu-prebuilt/). One built for a
    single CPython (a _C.cpython-3XX-*.so) would also shadow the abi3 one on import."""
    if not _extension.available():
        pytest.skip("seqkern._C is not built here")
    path = _extension._C.__file__
    assert path.endswith(".abi3.so") or path.endswith(".pyd"), \
        f"seqkern._C loaded from {path}, not an abi3 build (a stale build? `make clean`)"


def test_entry_points_run_below_autograd():
    """The kernel entry points run below autograd (csrc/below_autograd.h): called directly with
    tensors that require grad and with grad mode on, the ATen calls inside one record no graph.
    The fp64 cell backward writes its products with at::mm_out, which autograd refuses for
    inputs that require grad ("functions with out=... arguments don't support automatic
    differentiation"), and whose graph would save its operands."""
    if not _extension.available():
        pytest.skip("seqkern._C is not built here")
    B, I, H, d = 3, 5, 7, torch.float64
    x, hx, cx = torch.randn(B, I, dtype=d), torch.randn(B, H, dtype=d), torch.randn(B, H, dtype=d)
    w_ih, w_hh = torch.randn(4 * H, I, dtype=d), torch.randn(4 * H, H, dtype=d)
    for t in (x, hx, w_ih, w_hh):
        t.requires_grad_(True)
    saved = []
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        h, _, workspace = torch.ops.seqkern_C.rnn_cell_fwd("LSTM", x, hx, cx, w_ih, w_hh, None,
                                                           None)
        grads = torch.ops.seqkern_C.rnn_cell_bwd(
            "LSTM", torch.randn(B, H, dtype=d), torch.randn(B, H, dtype=d), x, hx, cx, w_ih,
            w_hh, False, h, workspace, [True] * 7)
        assert saved == [], f"ATen calls inside the entry points saved tensors {saved}"
        torch.mm(x, w_ih.t())  # the hooks see a product that autograd records
    assert len(saved) == 2, saved  # the control: mm saved both operands
    assert [tuple(g.shape) for g in grads[:5]] == [(B, I), (B, H), (B, H), (4 * H, I),
                                                  (4 * H, H)]
