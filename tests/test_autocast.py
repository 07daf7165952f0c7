"""Autocast (seqkern/autocast.py): seqkern's recurrent modules compute in, and return, the
dtype torch.nn's module of the same configuration does under the input device's autocast,
with outputs and gradients within the relative rule of torch's own autocast result (or,
where the computation stays float32, within the float32 table); and seqkern's ops keep the
dtypes they are given whatever the autocast state (a backend's inner torch calls are not
autocast). The expected dtypes come from torch's modules run beside ours, not from a table
here: a torch that changes its autocast paths fails these tests.
"""
import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern
from seqkern.ops.rnn_layer import rnn_layer_fwd
from tests.attention_cases import DEVICE, skip_unless_usable
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DEVICE_TYPE = torch.device(DEVICE).type

LAYER_CONFIGS = {
    "LSTM": ("LSTM", {}),
    "LSTM-proj": ("LSTM", dict(proj_size=5)),
    "LSTM-2bi": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "GRU": ("GRU", {}),
    "RNN-tanh": ("RNN", {}),
    "RNN-relu": ("RNN", dict(nonlinearity="relu")),
}
CELL_CONFIGS = {
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell-tanh": ("RNNCell", {}),
    "RNNCell-relu": ("RNNCell", dict(nonlinearity="relu")),
}
T, B, I, H = 6, 3, 8, 12
LENGTHS = torch.tensor([4, 6, 1], device="cpu")  # unsorted; pack_padded_sequence wants CPU


def _triple(cls, **kw):
    """(seqkern module, torch module, torch's float64 copy): float32, the same weights."""
    ours = getattr(seqkern, cls)(I, H, device=DEVICE, **kw)
    theirs = getattr(torch.nn, cls)(I, H, device=DEVICE, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, copy.deepcopy(theirs).double()


def _outputs(result):
    """A module's outputs as a list of tensors (packed data; LSTM's h and c apart)."""
    if isinstance(result, torch.Tensor):
        return [result]
    out, hidden = result
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        out = out.data
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _caller(packed, state=None):
    """call(module, x) -> outputs; packed: x [T, B, I] packed by LENGTHS first; state: the
    initial state given (float32 unless state_dtype says), or None."""
    def call(module, x, state_dtype=None):
        inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
        if state is None:
            return _outputs(module(inp))
        s = [t.to(state_dtype or t.dtype) for t in state]
        return _outputs(module(inp, tuple(s) if len(s) == 2 else s[0]))
    return call


def _initial_state(cls, kw):
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    h0 = torch.randn(layers, B, kw.get("proj_size") or H, device=DEVICE)
    return [h0, torch.randn(layers, B, H, device=DEVICE)] if cls == "LSTM" else [h0]


def _backend(name):
    return seqkern.backend(name) if name else contextlib.nullcontext()


def _check(ours, theirs, theirs64, call, x, autocast_dtype, backend=None):
    """ours and theirs on x under autocast: the same output dtypes; ours against the
    float64 module by the relative rule against torch's result (its products are 16-bit
    under autocast, float32 results included; torch's module in the autocast dtype without
    autocast where torch's autocast path itself fails). Then the gradients of the float32
    parameters of a backward run outside the autocast region, as an AMP step runs it."""
    peer_module = theirs
    try:
        with torch.autocast(DEVICE_TYPE, dtype=autocast_dtype):
            peer = call(theirs, x)
    except RuntimeError as failure:
        # torch's oneDNN LSTM has no float16 primitive for float32 input on CPUs without
        # native float16 ("could not create a primitive descriptor"); seqkern runs it.
        assert DEVICE_TYPE == "cpu" and "primitive" in str(failure), failure
        peer_module = copy.deepcopy(theirs).to(autocast_dtype)
        peer = call(peer_module, x.to(autocast_dtype), autocast_dtype)
    with _backend(backend), torch.autocast(DEVICE_TYPE, dtype=autocast_dtype):
        got = call(ours, x)
    assert [g.dtype for g in got] == [p.dtype for p in peer], (
        f"output dtypes {[g.dtype for g in got]}, torch's {[p.dtype for p in peer]}")
    want = call(theirs64, x.double(), torch.float64)
    compare = assert_close_relative  # torch's products are 16-bit under autocast, and ours

    for i, (g, w, p) in enumerate(zip(got, want, peer)):
        compare(f"output[{i}]", g, w, p, FWD_FACTOR)
    grads = [torch.randn_like(w) for w in want]
    with _backend(backend):
        g_ours = torch.autograd.grad(got, list(ours.parameters()),
                                     [g.to(o.dtype) for g, o in zip(grads, got)])
    g_want = torch.autograd.grad(want, list(theirs64.parameters()), grads)
    g_peer = torch.autograd.grad(peer, list(peer_module.parameters()),
                                 [g.to(p.dtype) for g, p in zip(grads, peer)])
    for (name, _), g, w, p in zip(ours.named_parameters(), g_ours, g_want, g_peer):
        assert g.dtype == F32, f"d{name}: {g.dtype}, the parameter's dtype is float32"
        compare(f"d{name}", g, w, p, BWD_FACTOR)


@pytest.mark.parametrize("autocast_dtype", [BF16, F16], ids=["ac-bf16", "ac-fp16"])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("state", ["h0", "no-h0"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_layer_under_autocast_matches_torch(config, packed, state, input_dtype,
                                            autocast_dtype):
    cls, kw = LAYER_CONFIGS[config]
    x = torch.randn(T, B, I, device=DEVICE)
    x = x if input_dtype == "float32" else x.to(autocast_dtype)
    given = _initial_state(cls, kw) if state == "h0" else None
    _check(*_triple(cls, **kw), _caller(packed, given), x, autocast_dtype)


@pytest.mark.parametrize("autocast_dtype", [BF16, F16], ids=["ac-bf16", "ac-fp16"])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("config", CELL_CONFIGS)
def test_cell_under_autocast_matches_torch(config, input_dtype, autocast_dtype):
    cls, kw = CELL_CONFIGS[config]
    x = torch.randn(B, I, device=DEVICE)
    x = x if input_dtype == "float32" else x.to(autocast_dtype)
    hx = torch.randn(B, H, device=DEVICE)
    state = [hx, torch.randn(B, H, device=DEVICE)] if cls == "LSTMCell" else [hx]

    def call(module, inp, state_dtype=None):
        s = [t.to(state_dtype or t.dtype) for t in state]
        return _outputs(module(inp, tuple(s) if len(s) == 2 else s[0]))

    _check(*_triple(cls, **kw), call, x, autocast_dtype)


@pytest.mark.parametrize("config, backend", [
    ("GRU", "reference"), ("GRU", "triton"), ("GRU", "cpu"), ("LSTM", "reference"),
    ("LSTM", "triton"), ("LSTM", "cpu")])
def test_backends_under_autocast(config, backend):
    """Each backend under autocast: GRU returns float32 on the CPU (cuDNN's float16 on a
    GPU), a padded LSTM the autocast dtype; all within the relative rule of torch's."""
    skip_unless_usable(backend)
    cls, kw = LAYER_CONFIGS[config]
    _check(*_triple(cls, **kw), _caller(False), torch.randn(T, B, I, device=DEVICE), BF16,
           backend)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_ops_keep_their_dtypes_under_autocast(backend):
    """The layer op called directly under autocast computes in the dtype it is given."""
    skip_unless_usable(backend)
    G = 3
    args = [torch.randn(T, B, I, device=DEVICE), None, torch.randn(B, H, device=DEVICE), None,
            torch.randn(G * H, I, device=DEVICE) * 0.3, torch.randn(G * H, H, device=DEVICE) * 0.3,
            torch.randn(G * H, device=DEVICE), torch.randn(G * H, device=DEVICE)]
    want = rnn_layer_fwd("GRU", *[a.double() if a is not None else None for a in args],
                         False, False)[0]
    with seqkern.backend(backend), torch.autocast(DEVICE_TYPE, dtype=BF16):
        got = rnn_layer_fwd("GRU", *args, False, False)[0]
    assert got.dtype == F32
    assert_close("output", got, want)


def test_mixed_dtypes_under_autocast_raise_clearly():
    """Under autocast, input that is neither float32 nor in the autocast dtype is not cast
    (as torch): a float64 input to a float32 module raises naming both dtypes."""
    ours = seqkern.GRU(I, H, device=DEVICE)
    with torch.autocast(DEVICE_TYPE, dtype=BF16):
        with pytest.raises(ValueError, match="input must have the type torch.float32, got "
                                             "type torch.float64"):
            ours(torch.randn(T, B, I, device=DEVICE, dtype=torch.float64))


def test_compiled_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) of a model with autocast inside: the dtype rule and the
    casts trace, and the result is eager's."""
    ours = seqkern.LSTM(I, H, device=DEVICE)
    x = torch.randn(T, B, I, device=DEVICE)

    def f(x):
        with torch.autocast(DEVICE_TYPE, dtype=BF16):
            out, _ = ours(x)
        return out

    eager = f(x)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == eager.dtype == (BF16 if DEVICE_TYPE == "cpu" else F16)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


@pytest.mark.parametrize("autocast_dtype", [BF16, F16], ids=["ac-bf16", "ac-fp16"])
def test_attention_function_under_autocast_matches_torch(autocast_dtype):
    """seqkern.functional.scaled_dot_product_attention casts as torch's (an autocast op):
    the same output dtype; output and the float32 inputs' gradients by the relative rule."""
    q, k, v = (torch.randn(2, 3, 7, 40, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.randn(7, 7, device=DEVICE)
    with torch.autocast(DEVICE_TYPE, dtype=autocast_dtype):
        peer = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = seqkern.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.dtype == peer.dtype == autocast_dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*leaves64,
                                                            attn_mask=mask.double())
    assert_close_relative("out", got, want, peer, FWD_FACTOR)
    grad = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (q, k, v), grad.to(got.dtype))
    g_peer = torch.autograd.grad(peer, (q, k, v), grad.to(peer.dtype))
    g_want = torch.autograd.grad(want, leaves64, grad)
    for name, g, w, p in zip("qkv", g_got, g_want, g_peer):
        assert g.dtype == F32
        assert_close_relative(f"d{name}", g, w, p, BWD_FACTOR)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_attention_op_keeps_its_dtypes_under_autocast(backend):
    """The attention op called directly under autocast computes in the dtype it is given
    (the reference's products were autocast before)."""
    skip_unless_usable(backend)
    q, k, v = (torch.randn(2, 3, 7, 40, device=DEVICE) for _ in range(3))
    want, _ = torch.ops.seqkern.attention_fwd(q.double(), k.double(), v.double(), None, None,
                                              0.0, True, 0.2, None)
    with seqkern.backend(backend), torch.autocast(DEVICE_TYPE, dtype=BF16):
        got, _ = torch.ops.seqkern.attention_fwd(q, k, v, None, None, 0.0, True, 0.2, None)
    assert got.dtype == F32
    assert_close("out", got, want)
