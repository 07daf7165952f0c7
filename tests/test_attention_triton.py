"""What only the Triton kernels need checked beyond tests/test_attention.py's grid:
D != Dv, padding that does not start at key 0, wide GQA groups with dropout, the exact
dropout bits (seed halves, 64-bit counters), determinism, strided grad_out, and the op's
registration (opcheck, torch.compile) with this backend."""
import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import make_qkv, opcheck_inputs
from tests.test_attention import _check

pytestmark = pytest.mark.skipif(bool(BACKENDS["triton"].availability("cpu")),
                                reason="triton not usable here")


def _kernels():
    import seqkern.kernels
    return seqkern.kernels


@pytest.mark.parametrize("shape", [(1, 2, 1, 70, 90, 64, 40), (2, 1, 1, 33, 65, 40, 96)])
@pytest.mark.parametrize("mask_kind", ["none", "causal+pad"])
def test_value_head_dim_differs(shape, mask_kind):
    _check("triton", shape, mask_kind, torch.float32)


@pytest.mark.parametrize("mask_kind", ["holes", "causal+holes", "holes+float"])
def test_padding_not_starting_at_key_zero(mask_kind):
    # The key loop starts at the first real key's tile; rows before it (causal) see none.
    _check("triton", (3, 2, 2, 150, 150, 32, 32), mask_kind, torch.float32)


@pytest.mark.parametrize("mask_kind", ["bool+causal", "causal+holes"])
def test_gqa_group_of_four_with_dropout(mask_kind):
    _check("triton", (1, 4, 1, 70, 70, 32, 32), mask_kind, torch.float32, dropout_p=0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dropout(dtype):
    _check("triton", (1, 2, 2, 70, 70, 64, 64), "causal+pad", dtype, dropout_p=0.2)


@pytest.mark.parametrize("seed,offset", [(1, 0), (0xFFFFFFFF, 5), (2 ** 62 - 1, 2 ** 32 - 1000),
                                         (0x1234_5678_9ABC, 2 ** 40)])
def test_dropout_bits_match_reference_keep_mask(seed, offset):
    # Uniform weights (scale 0) over one-hot values make out[..., i, j] = keep[i, j] / (S (1-p)):
    # the realised mask, bit for bit, including counters that cross 2**32.
    from seqkern.reference import dropout_keep_mask
    B, H, L, S, p = 2, 3, 5, 64, 0.4
    q, k, _ = make_qkv(B, H, H, L, S, 16)
    v = torch.eye(S).expand(B, H, S, S)
    seed_offset = torch.tensor([seed, offset], dtype=torch.int64)
    out, _ = _kernels().attention_fwd(q, k, v, None, None, p, False, 0.0, seed_offset)
    keep = dropout_keep_mask(seed_offset, B, H, L, S, p)
    assert torch.equal(out * (S * (1 - p)) > 0.5, keep)


def test_backward_is_deterministic():
    q, k, v = make_qkv(1, 4, 2, 90, 70, 32)
    grad = torch.randn(1, 4, 90, 32)
    seed_offset = torch.tensor([12345, 0], dtype=torch.int64)
    args = (None, None, 0.1, True, 0.2, seed_offset)
    out, lse = _kernels().attention_fwd(q, k, v, *args)
    first = _kernels().attention_bwd(grad, q, k, v, out, lse, *args)
    second = _kernels().attention_bwd(grad, q, k, v, out, lse, *args)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward calls"


def test_strided_grad_out_is_read_through_strides():
    q, k, v = make_qkv(2, 2, 2, 40, 50, 40)
    args = (None, None, 0.0, False, 0.3, None)
    out, lse = _kernels().attention_fwd(q, k, v, *args)
    grad = torch.randn(2, 40, 2, 40).transpose(1, 2)  # [B, L, H, Dv] storage
    strided = _kernels().attention_bwd(grad, q, k, v, out, lse, *args)
    packed = _kernels().attention_bwd(grad.contiguous(), q, k, v, out, lse, *args)
    for name, a, b in zip(("dq", "dk", "dv"), strided, packed):
        assert torch.equal(a, b), f"{name}: strided grad_out gives a different result"


def test_not_supported_reasons():
    def inputs(D=64, Dv=64, dtype=torch.float32, attn_mask=None):
        q, k, _ = make_qkv(1, 2, 2, 8, 8, D, dtype=dtype)
        _, _, v = make_qkv(1, 2, 2, 8, 8, Dv, dtype=dtype)
        return dict(device=q.device, dtype=dtype, query=q, key=k, value=v,
                    attn_mask=attn_mask, key_padding_mask=None, dropout_p=0.0,
                    is_causal=False)

    reasons = _kernels().attention_not_supported_reasons
    assert reasons(inputs()) == []
    assert reasons(inputs(D=40, Dv=256, dtype=torch.bfloat16)) == []
    assert any("head dims" in r for r in reasons(inputs(Dv=320)))
    assert any("dtype" in r for r in reasons(inputs(dtype=torch.float64)))
    assert any("attn_mask" in r for r in reasons(inputs(attn_mask=torch.ones(8, 8).bool())))


def test_opcheck_with_the_triton_backend():
    args = opcheck_inputs()
    q, k, v, mask, kpm, _, _, _, seed = args
    with seqkern.backend("triton"):
        torch.library.opcheck(torch.ops.seqkern.attention_fwd.default, args)
        out, lse = torch.ops.seqkern.attention_fwd(*args)
        bwd_args = (torch.randn_like(out), q, k, v, out, lse, mask, kpm, 0.2, True, 0.25,
                    seed)
        torch.library.opcheck(torch.ops.seqkern.attention_bwd.default, bwd_args)
        for t in (q, k, v):
            t.requires_grad_(True)
        torch.library.opcheck(torch.ops.seqkern.attention_fwd.default, args)


def test_torch_compile_fullgraph_with_the_triton_backend():
    q, k, v = make_qkv(2, 2, 2, 33, 40, 16, layout="packed")
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[0, 30:] = True

    def f(q, k, v):
        return seqkern.functional.scaled_dot_product_attention(
            q * 1.5, k, v, is_causal=True, key_padding_mask=kpm).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    compiled_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with seqkern.backend("triton"):
        eager, comp = f(*eager_in), compiled(*compiled_in)
        torch.testing.assert_close(comp, eager)
        eager.sum().backward()
        comp.sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), eager_in, compiled_in):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m: f"{name}: {m}")
