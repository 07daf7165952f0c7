"""One tolerance table for every test, and the comparison helpers that use it.

fp32 / fp64: absolute+relative bounds against a float64 reference.
fp16 / bf16: the relative rule: the kernel's error against the float64 reference may be
at most FWD_FACTOR (forward) or BWD_FACTOR (backward) times the error of PyTorch's own
same-dtype computation of the same function. Where torch's error is below one unit in the
last place of the dtype at the reference's largest magnitude (torch exact, e.g. a gradient
that is exactly zero), that unit is the base instead: no result is closer than its dtype
resolves (the first GPU run failed a kernel for a 6e-8 dq where the answer is 0).

fp32 long reductions (a layer's weight gradient sums T*B products, 19200 at T300 B64): a
small entry that is the difference of large partial sums carries fp32 rounding of the
partial sums' size, beyond the table's atol in any order of summation (torch's own fp32
LSTM on the CPU: 7e-5 at T300 B64 H512). There an entry outside the table passes only if the
kernel's error is within the relative rule's factor of torch's own fp32 result
(assert_close_or_like_torch).
"""
import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
}
FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


def _where_worst(err):
    idx = int(err.argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))


def assert_close(name, actual, expected, dtype=None):
    """actual vs the float64 reference, by the table for `dtype` (default actual.dtype)."""
    dtype = dtype or actual.dtype
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"{name}: NaN at {_where_worst(torch.isnan(a).double())}"
    # NaN in the reference would pass every comparison below (NaN > bound is False).
    assert not torch.isnan(e).any(), (
        f"{name}: NaN in the reference at {_where_worst(torch.isnan(e).double())}")
    err = (a - e).abs()
    bound = tol["atol"] + tol["rtol"] * e.abs()
    if err.numel() and bool((err > bound).any()):
        where = _where_worst(err - bound)
        raise AssertionError(
            f"{name} ({dtype}): max abs err {err.max().item():.3e} at {where} "
            f"(actual {a[where].item():.6g}, expected {e[where].item():.6g}); "
            f"max rel err {(err / e.abs().clamp_min(1e-30)).max().item():.3e}; "
            f"bound atol={tol['atol']} rtol={tol['rtol']}")


def assert_close_relative(name, actual, expected64, torch_same_dtype, factor):
    """The relative rule for fp16/bf16: err(actual) <= factor * err(torch)."""
    assert actual.shape == expected64.shape, f"{name}: shape {actual.shape} != {expected64.shape}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel's result"
    assert not torch.isnan(expected64).any(), f"{name}: NaN in the float64 reference"
    e = expected64.double()
    err = (actual.double() - e).abs().max().item() if e.numel() else 0.0
    peer = (torch_same_dtype.double() - e).abs().max().item() if e.numel() else 0.0
    finfo = torch.finfo(actual.dtype)
    scale = e.abs().max().item() if e.numel() else 0.0
    ulp = max(finfo.eps * scale, finfo.smallest_normal * finfo.eps)  # >= smallest subnormal
    assert err <= factor * max(peer, ulp), (
        f"{name} ({actual.dtype}): max abs err {err:.3e} > {factor} x max(torch's own "
        f"{actual.dtype} error {peer:.3e}, one ulp {ulp:.3e})")


def assert_close_or_like_torch(name, actual, expected64, torch_same_dtype, factor):
    """fp16/bf16: the relative rule. fp32/fp64: the table, or where an entry falls outside it,
    the relative rule against torch's own result in that dtype (long fp32 reductions)."""
    if actual.dtype in (torch.float16, torch.bfloat16):
        assert_close_relative(name, actual, expected64, torch_same_dtype, factor)
        return
    try:
        assert_close(name, actual, expected64)
    except AssertionError as table_failure:
        try:
            assert_close_relative(name, actual, expected64, torch_same_dtype, factor)
        except AssertionError as relative_failure:
            raise AssertionError(f"{table_failure}\n{relative_failure}") from None
