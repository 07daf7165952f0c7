"""The tolerance helpers themselves: what the relative rule accepts and what it refuses."""
import pytest
import torch

from tests.tolerances import assert_close, assert_close_or_like_torch, assert_close_relative


def test_relative_rule_scales_with_torchs_error():
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    peer = ref + 1e-2
    assert_close_relative("ok", (ref + 2.9e-2).half(), ref, peer, 3.0)
    with pytest.raises(AssertionError, match="max abs err"):
        assert_close_relative("too far", (ref + 3.5e-2).half(), ref, peer, 3.0)


def test_exact_torch_leaves_one_ulp_at_the_references_scale():
    # Where torch is exact the base is one fp16 ulp at max |ref| (2^-10 at 1.0), no more.
    ref = torch.tensor([1.0, 0.25], dtype=torch.float64)
    assert_close_relative("2 ulp", (ref + 2 * 2.0**-10).half(), ref, ref.half(), 3.0)
    with pytest.raises(AssertionError):
        assert_close_relative("4 ulp", (ref + 4 * 2.0**-10).half(), ref, ref.half(), 3.0)


def test_exact_zero_answer_allows_only_the_smallest_subnormal():
    # The H200 case: dq exactly 0, torch exactly 0, the kernel 6e-8 (fp16's smallest step).
    ref = torch.zeros(4, dtype=torch.float64)
    tiny = torch.finfo(torch.float16).smallest_normal * torch.finfo(torch.float16).eps
    assert_close_relative("one subnormal", (ref + tiny).half(), ref, ref.half(), 3.0)
    with pytest.raises(AssertionError):
        assert_close_relative("1e-5", (ref + 1e-5).half(), ref, ref.half(), 3.0)


def test_nan_always_fails():
    ref = torch.ones(3, dtype=torch.float64)
    bad = torch.tensor([1.0, float("nan"), 1.0]).half()
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_relative("nan", bad, ref, ref.half(), 3.0)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close("nan", bad.float(), ref)


def test_fp32_outside_the_table_passes_only_as_close_as_torch():
    # A long reduction's small entry beside large ones: 1e-4 off at 0.03 is outside the table
    # (2e-5 + 2e-4 * 0.03), fine where torch's own fp32 is 5e-5 off, not where torch is exact.
    ref = torch.tensor([186.0, 0.0344], dtype=torch.float64)
    ours = (ref + torch.tensor([0.0, 1e-4], dtype=torch.float64)).float()
    with pytest.raises(AssertionError):
        assert_close("table", ours, ref)
    assert_close_or_like_torch("like torch", ours, ref, (ref + 5e-5).float(), 3.0)
    with pytest.raises(AssertionError, match="torch's own"):
        assert_close_or_like_torch("torch exact", ours, ref, ref.float(), 3.0)
    assert_close_or_like_torch("in the table", ref.float(), ref, ref.float(), 3.0)
