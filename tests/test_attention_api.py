"""The attention op as an API: errors, backend choice, registration (opcheck, gradcheck,
torch.compile), dropout RNG plumbing."""
import os
import subprocess
import sys

import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS, BackendError
from seqkern.functional import scaled_dot_product_attention as sdpa
from tests.attention_cases import DEVICE, make_qkv, opcheck_inputs, skip_unless_usable
from tests.capability_runner import assert_passes_under_capability
from tests.tolerances import assert_close, assert_close_relative

HAS_C = not BACKENDS["cpu"].availability(DEVICE)
needs_c = pytest.mark.skipif(not HAS_C, reason="seqkern._C not built")


def _qkv(dtype=torch.float32):
    return make_qkv(2, 4, 4, 7, 9, 16, dtype=dtype)


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q[0, 0, 0], k, v), "query .*4-D"),
    (lambda q, k, v: (q, k[..., :8], v), "head dims differ"),
    (lambda q, k, v: (q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), "do not broadcast"),
    (lambda q, k, v: (q, k.double(), v), "query's dtype"),
    (lambda q, k, v: (q.to(torch.int32), k, v), "fp16, bf16, fp32 or fp64"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "enable_gqa"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "value .*must match key"),
])
def test_bad_inputs_raise_before_any_kernel(change, match):
    q, k, v = change(*_qkv())
    with pytest.raises((ValueError, TypeError), match=match):
        sdpa(q, k, v)


def test_bad_masks_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask.*bool or the query's dtype"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask.*bool"):
        sdpa(q, k, v, key_padding_mask=torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"key_padding_mask.*\[B, S\]"):
        sdpa(q, k, v, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="multiple of"):
        q6 = make_qkv(2, 6, 4, 7, 9, 16)[0]
        sdpa(q6, k, v, enable_gqa=True)


def test_mask_requiring_grad_is_refused():
    q, k, v = _qkv()
    mask = torch.zeros(7, 9, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=mask)


def test_tensors_on_different_devices_raise():
    q, k, v = _qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match="device"):
        sdpa(q, meta, v)


OP_CASES = {  # attention_fwd's arguments, changed from q, k, v [1, 2, 8, 16]
    "key head dim": (dict(k=(1, 2, 8, 8)), "query and key head dims differ"),
    "value length": (dict(v=(1, 2, 6, 16)), "value must match key's heads and length"),
    "batch": (dict(k=(2, 2, 8, 16), v=(2, 2, 8, 16)), "batch sizes differ"),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", OP_CASES)
def test_attention_op_refuses_shapes_the_kernels_would_overrun(backend, case):
    """The op itself, not only seqkern.functional: the Triton kernels index by these shapes
    without bounds checks and gave wrong answers for each, silently; every backend refuses
    them before a kernel runs (cpu in C++)."""
    skip_unless_usable(backend)
    change, match = OP_CASES[case]
    shapes = {**dict(q=(1, 2, 8, 16), k=(1, 2, 8, 16), v=(1, 2, 8, 16)), **change}
    t = {name: torch.randn(*shape, device=DEVICE) for name, shape in shapes.items()}
    with seqkern.backend(backend), pytest.raises(RuntimeError, match=match):
        seqkern.ops.attention.attention_fwd(t["q"], t["k"], t["v"], None, None, 0.0, False,
                                            0.25, None)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("which, match", [("out", r"grad_out and out must be \[B, Hq, L, Dv\]"),
                                          ("lse", "lse must be the forward's")])
def test_attention_backward_op_refuses_out_and_lse_of_the_wrong_size(backend, which, match):
    """out and lse of another query length: the kernels read them without bounds checks
    (the CPU binding checked lse's dtype and rank only)."""
    skip_unless_usable(backend)
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE) for _ in range(3))
    ops = seqkern.ops.attention
    with seqkern.backend(backend):
        out, lse = ops.attention_fwd(q, k, v, None, None, 0.0, False, 0.25, None)
        if which == "out":
            out = out[:, :, :7]
        else:
            lse = lse[:, :, :7]
        grad_out = torch.randn_like(out)
        with pytest.raises(RuntimeError, match=match):
            ops.attention_bwd(grad_out, q, k, v, out, lse, None, None, 0.0, False, 0.25, None)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_attention_weights_op_refuses_an_lse_of_the_wrong_size(backend):
    """attention_weights reads lse [B, Hq, L] without bounds checks."""
    skip_unless_usable(backend)
    q, k = (torch.randn(1, 2, 8, 16, device=DEVICE) for _ in range(2))
    lse = torch.zeros(1, 2, 7, device=DEVICE)
    with seqkern.backend(backend), pytest.raises(RuntimeError, match="lse must be the forward's"):
        seqkern.ops.attention.attention_weights(q, k, lse, None, None, False, 0.25, 0.0, None,
                                                True)


def test_forced_backend_that_cannot_run_lists_every_backend():
    q, k, v = _qkv(torch.float64)
    with seqkern.backend("triton"), pytest.raises(BackendError) as info:
        sdpa(q, k, v)
    text = str(info.value)
    for name in BACKENDS:
        assert f"  {name}:" in text
    assert "fp64" in text or "float64" in text


def test_unknown_backend_names_raise():
    with pytest.raises(ValueError, match="unknown seqkern backend"):
        with seqkern.backend("fast"):
            pass


def test_env_override_selects_backend(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("SEQKERN_BACKEND", "reference")
    calls = []
    original = BACKENDS["reference"].attention_fwd
    monkeypatch.setattr(BACKENDS["reference"], "attention_fwd",
                        lambda *a: calls.append(1) or original(*a))
    sdpa(q, k, v)
    assert calls == [1]


@needs_c
def test_cpu_tensors_pick_cpu_backend_by_default(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    q, k, v = _qkv()
    inputs = dict(device=q.device, dtype=q.dtype)
    assert seqkern.backends.select("attention", inputs) is BACKENDS["cpu"]


@needs_c
def test_measured_order_overrides_the_default_priority(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    q, _, _ = _qkv()
    small = dict(device=q.device, dtype=q.dtype, query=q)
    large = dict(small, query=q.new_empty(1, 1, 4096, 8))
    rule = (lambda inputs: inputs["query"].shape[2] < 1024, ("reference", "cpu"), "test")
    monkeypatch.setitem(seqkern.backends.MEASURED_ORDER, ("cpu", "attention"), [rule])
    assert seqkern.backends.select("attention", small) is BACKENDS["reference"]
    assert seqkern.backends.select("attention", large) is BACKENDS["cpu"]
    assert seqkern.backends.select("rnn_layer", small) is BACKENDS["cpu"]


def _attention_step():
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    return sdpa(q, k, v).sum()


def _layer_step():
    layer = seqkern.GRU(5, 6, device=DEVICE)
    return layer(torch.randn(4, 3, 5, device=DEVICE, requires_grad=True))[0].sum()


def _cell_step():
    cell = seqkern.LSTMCell(5, 6, device=DEVICE)
    return cell(torch.randn(3, 5, device=DEVICE, requires_grad=True))[0].sum()


@needs_c
@pytest.mark.parametrize("step, backward_fn", [
    (_attention_step, "attention_bwd"), (_layer_step, "rnn_layer_bwd"),
    (_cell_step, "rnn_cell_gate_grads")], ids=["attention", "rnn_layer", "rnn_cell"])
def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch, step, backward_fn):
    """autograd runs CUDA backwards on its own worker thread: the backend forced around the
    forward must still run the backward (the first GPU run timed cuda's forwards with
    triton's backwards). Here the backward runs on a thread of its own, where the default
    choice would be cpu."""
    import threading
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    calls = []
    original = getattr(BACKENDS["reference"], backward_fn)
    monkeypatch.setattr(BACKENDS["reference"], backward_fn,
                        lambda *a: calls.append(threading.get_ident()) or original(*a))
    with seqkern.backend("reference"):
        loss = step()
    errors = []

    def run_backward():
        try:
            loss.backward()
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    worker = threading.Thread(target=run_backward)
    worker.start()
    worker.join()
    assert not errors and calls and set(calls) == {worker.ident}


def test_cuda_backend_mirrors_what_its_kernels_handle(monkeypatch):
    """The cuda backend's rules, as if a CUDA build and GPU were present: what it refuses
    goes to triton with the reason instead of failing inside the C++ binding."""
    cuda = BACKENDS["cuda"]
    monkeypatch.setattr(cuda, "availability", lambda device, index=None: [])
    present = {"attention_fwd", "attention_bwd", "rnn_cell_fwd", "rnn_cell_gate_grads",
               "rnn_layer_fwd", "rnn_layer_bwd"}
    monkeypatch.setattr(cuda, "has_cuda_kernel", lambda name: name in present)
    device = torch.device("cuda")

    def attention(dtype, D, Dv=None):
        q, v = torch.empty(1, 1, 1, D), torch.empty(1, 1, 1, Dv or D)
        return cuda.not_supported_reasons("attention", dict(device=device, dtype=dtype,
                                                            query=q, key=q, value=v))

    def layer(dtype, gate_rows, projection=False):
        return cuda.not_supported_reasons("rnn_layer", dict(
            device=device, dtype=dtype, mode="LSTM", gate_rows=gate_rows, projection=projection))

    assert attention(torch.float16, 64) == [] and attention(torch.bfloat16, 256, 40) == []
    assert any("fp16 or bf16" in r for r in attention(torch.float32, 64))
    assert any("head dims" in r for r in attention(torch.float16, 320))
    assert layer(torch.float32, 2048) == [] and layer(torch.bfloat16, 32768) == []
    assert any("gate rows" in r for r in layer(torch.float16, 32772))
    assert any("proj_size" in r for r in layer(torch.float32, 2048, projection=True))
    assert any("dtype" in r for r in cuda.not_supported_reasons(
        "rnn_cell", dict(device=device, dtype=torch.float64, mode="GRU")))
    assert any("attention_weights" in r for r in cuda.not_supported_reasons(
        "attention_weights", dict(device=device, dtype=torch.float16)))


def test_triton_on_cpu_needs_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = ("import seqkern.backends as b; r = b.BACKENDS['triton'].availability('cpu'); "
            "print(r); assert any('TRITON_INTERPRET=1' in x for x in r)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "seqkern.info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backends for cpu tensors" in out and "reference" in out


@needs_c
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_kernels_for_every_capability(capability):
    """The kernels compiled for each instruction set agree with the reference."""
    code = """
import torch, seqkern
from tests.attention_cases import DEVICE, make_qkv, make_masks, reference64
torch.manual_seed(1)
q, k, v = make_qkv(2, 2, 2, 63, 130, 40, dtype=torch.float32, layout="packed")
m, kpm, c = make_masks("causal+pad+float", 2, 2, 63, 130, torch.float32)
for t in (q, k, v): t.requires_grad_(True)
with seqkern.backend("cpu"):
    out = seqkern.functional.scaled_dot_product_attention(q, k, v, m, is_causal=c,
                                                          key_padding_mask=kpm)
q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
ref, _ = reference64(q64, k64, v64, m, kpm, c)
g = torch.randn_like(ref)
got = torch.autograd.grad(out, (q, k, v), g.float())
want = torch.autograd.grad(ref, (q64, k64, v64), g)
assert (out.double() - ref).abs().max() < 1e-4, (out.double() - ref).abs().max()
for a, b in zip(got, want):
    assert (a.double() - b).abs().max() < 1e-4, (a.double() - b).abs().max()
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


@needs_c
def test_opcheck_forward_and_backward_ops():
    args = opcheck_inputs()
    q, k, v, mask, kpm, _, _, _, seed = args
    torch.library.opcheck(torch.ops.seqkern.attention_fwd.default, args)
    out, lse = torch.ops.seqkern.attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, mask, kpm, 0.2, True, 0.25, seed)
    torch.library.opcheck(torch.ops.seqkern.attention_bwd.default, bwd_args)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    torch.library.opcheck(torch.ops.seqkern.attention_fwd.default, (q, k, v) + args[3:])


@needs_c
@pytest.mark.parametrize("mask_kind", ["none", "causal+pad", "float"])
def test_gradcheck_fp64(mask_kind):
    from tests.attention_cases import make_masks
    q, k, v = make_qkv(1, 2, 1, 5, 6, 8, dtype=torch.float64, layout="packed")
    m, kpm, c = make_masks(mask_kind, 1, 2, 5, 6, torch.float64)
    if kpm is not None:
        kpm[0, -1] = True
    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: sdpa(q, k, v, m, is_causal=c, enable_gqa=True,
                                 key_padding_mask=kpm),
            (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)))


@needs_c
def test_gradcheck_fp64_with_dropout():
    q, k, v = make_qkv(1, 1, 1, 5, 6, 8, dtype=torch.float64)
    seed = torch.tensor([99, 3], dtype=torch.int64)
    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: seqkern.functional.attention_with_lse(
                q, k, v, dropout_p=0.3, seed_offset=seed)[0],
            (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)))


@needs_c
def test_torch_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(2, 2, 2, 33, 40, 16, layout="packed")
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[0, 30:] = True

    def f(q, k, v):
        return sdpa(q * 1.5, k, v, is_causal=True, key_padding_mask=kpm).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qc = [t.clone().requires_grad_(True) for t in (q, k, v)]
    eager, comp = f(*qs), compiled(*qc)
    torch.testing.assert_close(comp, eager)
    eager.sum().backward()
    comp.sum().backward()
    for a, b in zip(qs, qc):
        torch.testing.assert_close(b.grad, a.grad)


@needs_c
def test_torch_compile_inductor_with_dropout():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16)

    def f(q, k, v):
        return sdpa(q, k, v, dropout_p=0.25)

    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(3)
    a = compiled(q, k, v)
    torch.manual_seed(3)
    b = f(q, k, v)
    torch.testing.assert_close(a, b)


def test_lse_output_carries_no_gradient():
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    with seqkern.backend("reference"):
        _, lse = seqkern.functional.attention_with_lse(q, k, v)
    assert not lse.requires_grad


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_output_can_be_modified_in_place(backend):
    """The attention op returned its [B, H, L, D] output as a transposed view of a
    [B, L, H, D] buffer; autograd refuses in-place ops on views made inside a custom op,
    torch's sdpa allows them. The layout stays the one MultiheadAttention packs. The
    backward reads the output (as FlashAttention's and torch's fused CPU kernel's do): after
    an in-place change it raises autograd's version error, never a wrong gradient."""
    skip_unless_usable(backend)
    q = torch.randn(2, 3, 5, 8, device=DEVICE, requires_grad=True)
    with seqkern.backend(backend):
        out = sdpa(q, q, q)
        assert out.stride() == (120, 8, 24, 1)
        out.mul_(2).add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), q)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert_close("out", out, want * 2 + 1)


def test_head_dims_over_the_gpu_kernels_limit_run_like_torch():
    """D or Dv over 256 (torch's sdpa takes any; seqkern raised): the CPU kernels take them,
    a GPU the reference backend (the Triton and CUDA kernels refuse them); D = 0 raises."""
    q, k = (torch.randn(1, 2, 5, 300, dtype=torch.float64, device=DEVICE, requires_grad=True)
            for _ in range(2))
    v = torch.randn(1, 2, 5, 260, dtype=torch.float64, device=DEVICE, requires_grad=True)
    got = sdpa(q, k, v, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close("out", got, want)
    grad = torch.randn_like(want)
    for name, g, w in zip("qkv", torch.autograd.grad(got, (q, k, v), grad),
                          torch.autograd.grad(want, (q, k, v), grad)):
        assert_close(f"d{name}", g, w)
    with pytest.raises(ValueError, match="head dims must be at least 1"):
        sdpa(q[..., :0], k[..., :0], v)


@pytest.mark.parametrize("case", ["2-D", "2-D-query", "3-D", "5-D", "key-batch-1",
                                  "one-key-head", "fewer-key-dims", "float32-mask"])
def test_sdpa_takes_the_shapes_and_masks_torch_takes(case):
    """torch's sdpa takes [..., H, L, D] with broadcasting leading dims and a float mask of
    another dtype; seqkern's raised ValueErrors. Outputs and gradients against torch's
    (float64)."""
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)

    kw = {}
    if case == "2-D":
        q, k, v = r(4, 8), r(5, 8), r(5, 6)
    elif case == "2-D-query":
        q, k, v = r(4, 8), r(2, 3, 5, 8), r(2, 3, 5, 8)
    elif case == "3-D":
        q, k, v = r(3, 4, 8), r(3, 5, 8), r(3, 5, 6)
    elif case == "5-D":
        q, k, v = r(2, 2, 3, 4, 8), r(2, 2, 3, 5, 8), r(2, 2, 3, 5, 8)
        kw["attn_mask"] = torch.rand(4, 5, device=DEVICE) > 0.3
        kw["attn_mask"][:, 0] = True
    elif case == "one-key-head":  # broadcast without enable_gqa, as torch's matmul does
        q, k, v = r(2, 4, 4, 8), r(2, 1, 5, 8), r(2, 1, 5, 8)
    elif case == "key-batch-1":
        q, k, v = r(2, 3, 4, 8), r(1, 3, 5, 8), r(1, 3, 5, 8)
    elif case == "fewer-key-dims":
        q, k, v = r(2, 3, 4, 8), r(3, 5, 8), r(3, 5, 8)
        kw["is_causal"] = True
    else:
        q, k, v = r(2, 3, 4, 8), r(2, 3, 5, 8), r(2, 3, 5, 8)
        kw["attn_mask"] = torch.randn(4, 5, device=DEVICE)  # float32 beside float64 q
    got = sdpa(q, k, v, **kw)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    assert got.shape == want.shape
    assert_close("out", got, want)
    grad = torch.randn_like(want)
    for name, g, w in zip("qkv", torch.autograd.grad(got, (q, k, v), grad),
                          torch.autograd.grad(want, (q, k, v), grad)):
        assert_close(f"d{name}", g, w)


@pytest.mark.parametrize("fill", [-1e9, -1e30, "finfo.min"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_rows_masked_by_a_large_finite_value(backend, fill):
    """A row whose float mask is one large negative value everywhere (the -1e9 / finfo.min
    convention): the output and every gradient are the softmax of the row's scores, exactly
    as with that row's mask at 0 (softmax ignores a constant per row). Before, lse rounded
    to the row's max, and the backward's exp(s - lse) gave every key weight 1: dv 5x too
    large here, silently."""
    skip_unless_usable(backend)
    dtype = torch.float32
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, device=DEVICE) for n in (3, 5, 5))
    mask = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    exact = mask.clone()
    mask[1] = torch.finfo(dtype).min if fill == "finfo.min" else fill
    exact[1] = 0.0
    mask[2, 1:] = mask[1, 1:]  # a row with one key visible: already right, stays so
    exact[2, 1:] = mask[1, 1:]
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    with seqkern.backend(backend):
        out = sdpa(*leaves, attn_mask=mask.to(dtype))
    want_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference_sdpa(*want_leaves, attn_mask=exact)
    assert_close("out", out, want)
    grad = torch.randn_like(want)
    with seqkern.backend(backend):
        got = torch.autograd.grad(out, leaves, grad.to(dtype))
    for name, g, w in zip("qkv", got, torch.autograd.grad(want, want_leaves, grad)):
        assert_close(f"d{name}", g, w)


def reference_sdpa(q, k, v, attn_mask):
    """torch's sdpa on its math path (float64)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def test_reference_backend_accumulates_16_bit_attention_in_fp32():
    """fp16 scores beyond 6e4 overflowed to NaN in the reference backend (torch's fp16 sdpa
    gives numbers): it computes in fp32 and rounds the output."""
    skip_unless_usable("reference")
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, device=DEVICE) for _ in range(3))
    q, k = q * 300, k * 300
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    peer = torch.nn.functional.scaled_dot_product_attention(q.half(), k.half(), v.half())
    with seqkern.backend("reference"):
        got = sdpa(q.half(), k.half(), v.half())
    assert_close_relative("out", got, want, peer, 2.0)


def test_a_float_mask_wider_than_the_query_is_refused():
    """A float32 mask beside a bf16 query: converting it would round the biases (a bias of
    100 gave 50x torch's error, which keeps it in float32), so it is refused; a narrower
    one is converted exactly (the float32-mask case above)."""
    q = torch.randn(1, 2, 4, 8, device=DEVICE).bfloat16()
    with pytest.raises(ValueError, match="expected bool or the query's dtype"):
        sdpa(q, q, q, attn_mask=torch.randn(4, 4, device=DEVICE) * 100)
