"""Attention kernels (cpu, triton interpreted) against the float64 reference."""
import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE, fresh_seed, make_masks, make_qkv, reference64, run
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative


def _usable(name, device=DEVICE):
    return not BACKENDS[name].availability(device)


KERNEL_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _usable("cpu"), reason="no _C")),
    pytest.param("triton", marks=pytest.mark.skipif(not _usable("triton"),
                                                    reason="triton not usable here")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _usable("cuda"),
                                                  reason="no CUDA kernels here")),
]


def dtype_for(backend):
    """The dtype a backend is tested in where a test asks for full precision: the CUDA
    attention kernels are fp16/bf16 only (fp32 goes to triton), so they take fp16 and the
    relative rule."""
    return torch.float16 if backend == "cuda" else torch.float32

# (B, Hq, Hkv, L, S, D, Dv): odd sizes, L != S, head dims 8..256, GQA, B = 1.
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 7, 63, 40, 40),
    (1, 2, 2, 63, 7, 80, 80),
    (2, 2, 1, 130, 130, 96, 96),
    (1, 4, 2, 257, 130, 64, 64),
    (1, 1, 1, 63, 257, 128, 128),
    (1, 1, 1, 7, 63, 256, 256),
    (1, 2, 2, 63, 63, 64, 40),
]
SHAPES_INTERPRETED = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 7, 63, 40, 40),
    (1, 2, 1, 63, 130, 80, 80),
    (1, 1, 1, 257, 7, 96, 96),
    (1, 1, 1, 7, 63, 256, 256),
]
MASKS = ["none", "causal", "pad", "bool", "float", "causal+pad", "bool4+pad",
         "floatinf", "causal+float+pad"]
MASKS_INTERPRETED = ["none", "causal", "pad", "bool+causal", "float+pad", "floatinf"]


def _check(backend, shape, mask_kind, dtype, layout="contiguous", dropout_p=0.0,
           scale=None, backward=True):
    B, Hq, Hkv, L, S, D, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype, layout)
    attn_mask, kpm, causal = make_masks(mask_kind, B, Hq, L, S, dtype)
    seed = fresh_seed() if dropout_p else None
    gqa = Hq != Hkv
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = run(backend, q, k, v, attn_mask, kpm, causal, dropout_p, scale, gqa, seed)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference64(q64, k64, v64, attn_mask, kpm, causal, dropout_p, scale, seed)
    grad = torch.randn_like(ref)
    if backward:
        got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
        want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: finite pattern differs"
    if dtype in (torch.float32, torch.float64):
        assert_close("out", out, ref)
        assert_close("lse", lse[finite], ref_lse[finite], dtype=dtype)
        if backward:
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                assert_close(name, g, w)
        return
    # fp16 / bf16: compare with PyTorch's own same-dtype computation of the same function.
    qd, kd, vd = (t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64))
    peer, _ = seqkern.reference.attention(
        qd, kd, vd, attn_mask, dropout_p, causal, scale, kpm,
        None if not dropout_p else seqkern.reference.dropout_keep_mask(
            seed, B, Hq, L, S, dropout_p))
    assert_close_relative("out", out, ref, peer, FWD_FACTOR)
    if backward:
        peer_grads = torch.autograd.grad(peer, (qd, kd, vd), grad.to(dtype))
        for name, g, w, p in zip(("dq", "dk", "dv"), got, want, peer_grads):
            assert_close_relative(name, g, w, p, BWD_FACTOR)


def _grid():
    """Every shape x mask for cpu; a smaller grid for the interpreted Triton backend."""
    for backend in KERNEL_BACKENDS:
        name = backend.values[0]
        full = name != "triton" or DEVICE == "cuda"  # interpreted Triton is slow
        shapes = SHAPES if full else SHAPES_INTERPRETED
        masks = MASKS if full else MASKS_INTERPRETED + ["causal+pad"]
        for shape in shapes:
            for mask_kind in masks:
                yield pytest.param(name, shape, mask_kind, marks=backend.marks,
                                   id=f"{name}-{mask_kind}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("backend, shape, mask_kind", list(_grid()))
def test_masks_shapes(backend, shape, mask_kind):
    _check(backend, shape, mask_kind, dtype_for(backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "strided"])
def test_noncontiguous(backend, layout):
    _check(backend, (2, 2, 2, 63, 130, 40, 40), "causal+pad", dtype_for(backend), layout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "causal+pad", "float"])
def test_half_precision_relative_rule(backend, dtype, mask_kind):
    _check(backend, (1, 2, 2, 130, 63, 64, 64), mask_kind, dtype)


@pytest.mark.parametrize("mask_kind", ["none", "causal+pad", "bool4", "floatinf"])
def test_fp64_cpu(mask_kind):
    if not _usable("cpu"):
        pytest.skip("no _C")
    _check("cpu", (2, 2, 1, 63, 130, 40, 40), mask_kind, torch.float64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "causal+pad"])
def test_dropout_matches_realized_keep_mask(backend, mask_kind):
    _check(backend, (2, 2, 1, 63, 130, 64, 64), mask_kind, dtype_for(backend), dropout_p=0.3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scale(backend):
    _check(backend, (1, 2, 2, 63, 63, 64, 64), "causal", dtype_for(backend), scale=0.37)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_same_seed_same_result(backend):
    q, k, v = make_qkv(1, 2, 2, 63, 63, 64, dtype=dtype_for(backend))
    torch.manual_seed(7)
    a = run(backend, q, k, v, None, None, False, 0.5)[0]
    torch.manual_seed(7)
    b = run(backend, q, k, v, None, None, False, 0.5)[0]
    c = run(backend, q, k, v, None, None, False, 0.5)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_rows_give_zero_not_nan(backend):
    q, k, v = make_qkv(2, 2, 2, 7, 63, 64, dtype=dtype_for(backend))
    kpm = torch.zeros(2, 63, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key is padding
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = run(backend, q, k, v, None, kpm, False)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1]))
