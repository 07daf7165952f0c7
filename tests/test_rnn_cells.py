"""Recurrent cells (cpu, triton interpreted) against the float64 reference and torch.nn's
cells with the same weights: forward and every gradient."""
import pytest
import torch

import seqkern
from seqkern import reference
from tests.test_attention import KERNEL_BACKENDS, _usable
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
ARG_NAMES = ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")

# (B, I, H): sizes 1, 7, 63, 257 and primes, batch 1. The C++ cell multiplies batches of up
# to 8 rows by dot products and larger ones by brgemm (rnn_cell_impl.h): B = 9 and 19 take
# the latter.
SHAPES = [(1, 1, 1), (3, 7, 7), (2, 63, 5), (1, 13, 63), (5, 2, 31), (2, 11, 257), (9, 40, 17),
          (19, 5, 33)]


def make_cell_args(mode, B, I, H, dtype=torch.float32, bias=True, layout="packed"):
    """(input, hx, cx or None, w_ih, w_hh, b_ih, b_hh), weights at torch's init scale."""
    G = GATES[mode]
    scale = H ** -0.5 * 2

    def rand(*shape, s=1.0, weight=False):
        t = (torch.randn(*shape, dtype=torch.float64) * s).to(dtype)
        if layout != "strided":
            return t
        if weight:  # column-major: a transposed view, as w.t() of a [K, G*H] tensor gives
            return t.t().contiguous().t()
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]

    args = [rand(B, I), rand(B, H), rand(B, H) if mode == "LSTM" else None,
            rand(G * H, I, s=scale, weight=True), rand(G * H, H, s=scale, weight=True)]
    args += [rand(G * H, s=scale), rand(G * H, s=scale)] if bias else [None, None]
    return args


def call(mode, args):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = args
    F = seqkern.functional
    if mode == "LSTM":
        return F.lstm_cell(x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if mode == "GRU":
        return (F.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh),)
    return (F.rnn_cell(x, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity=mode[4:].lower()),)


def call_reference(mode, args):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = args
    if mode == "LSTM":
        return reference.lstm_cell(x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if mode == "GRU":
        return (reference.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh),)
    return (reference.rnn_cell(x, hx, w_ih, w_hh, b_ih, b_hh, mode[4:].lower()),)


def forward_and_grads(fn, mode, args, grads_out):
    """Outputs and the gradient of every tensor argument (None where there is none)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    outs = fn(mode, leaves)
    wanted = [a for a in leaves if a is not None]
    found = iter(torch.autograd.grad(outs, wanted, [g.to(o.dtype) for o, g in
                                                    zip(outs, grads_out)]))
    return [o.detach() for o in outs], [None if a is None else next(found) for a in leaves]


def check_against_reference64(backend, mode, args):
    dtype = args[0].dtype
    args64 = [None if a is None else a.double() for a in args]
    B, H = args[1].shape
    grads_out = [torch.randn(B, H, dtype=torch.float64) for _ in range(2)]
    ref_out, ref_grads = forward_and_grads(call_reference, mode, args64, grads_out)
    with seqkern.backend(backend):
        out, grads = forward_and_grads(call, mode, args, grads_out)
    for name, a, e in zip(("h", "c"), out, ref_out):
        assert_close(f"{mode} {name}", a, e, dtype)
    for name, a, e in zip(ARG_NAMES, grads, ref_grads):
        if e is not None:
            assert_close(f"{mode} d{name}", a, e, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-I{}-H{}".format(*s))
def test_fp32_against_reference(backend, mode, shape):
    check_against_reference64(backend, mode, make_cell_args(mode, *shape))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_no_bias_and_strided_inputs(backend, mode):
    check_against_reference64(backend, mode, make_cell_args(mode, 3, 9, 17, bias=False,
                                                            layout="strided"))
    check_against_reference64(backend, mode, make_cell_args(mode, 2, 5, 6, layout="strided"))
    check_against_reference64(backend, mode, make_cell_args(mode, 12, 5, 6, layout="strided"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 63, 7), (4, 9, 257)],
                         ids=lambda s: "B{}-I{}-H{}".format(*s))
def test_fp64_cpu(mode, shape):
    if not _usable("cpu"):
        pytest.skip("no _C")
    check_against_reference64("cpu", mode, make_cell_args(mode, *shape, dtype=torch.float64))


@pytest.mark.parametrize("B", [5, 12])  # the C++ cell: dot products up to 8 rows, brgemm above
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_relative_rule(backend, dtype, mode, B):
    args = make_cell_args(mode, B, 40, 33, dtype=dtype)
    args64 = [None if a is None else a.double() for a in args]
    grads_out = [torch.randn(B, 33, dtype=torch.float64) for _ in range(2)]
    ref_out, ref_grads = forward_and_grads(call_reference, mode, args64, grads_out)
    peer_out, peer_grads = forward_and_grads(call_reference, mode, args, grads_out)
    with seqkern.backend(backend):
        out, grads = forward_and_grads(call, mode, args, grads_out)
    for name, a, e, p in zip(("h", "c"), out, ref_out, peer_out):
        assert a.dtype == dtype
        assert_close_relative(f"{mode} {name}", a, e, p, FWD_FACTOR)
    for name, a, e, p in zip(ARG_NAMES, grads, ref_grads, peer_grads):
        if e is not None:
            assert_close_relative(f"{mode} d{name}", a, e, p, BWD_FACTOR)


def _torch_cell(mode, I, H, bias, dtype):
    if mode == "LSTM":
        return torch.nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    if mode == "GRU":
        return torch.nn.GRUCell(I, H, bias=bias, dtype=dtype)
    return torch.nn.RNNCell(I, H, bias=bias, nonlinearity=mode[4:].lower(), dtype=dtype)


def _seqkern_cell(mode, I, H, bias, dtype):
    if mode == "LSTM":
        return seqkern.LSTMCell(I, H, bias=bias, dtype=dtype)
    if mode == "GRU":
        return seqkern.GRUCell(I, H, bias=bias, dtype=dtype)
    return seqkern.RNNCell(I, H, bias, mode[4:].lower(), dtype=dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["hx", "no-hx", "unbatched", "no-bias", "eval"])
def test_module_matches_torch_nn_with_loaded_weights(backend, mode, case):
    """fp32 module against torch.nn's cell in fp64 holding the same weights."""
    B, I, H = 4, 10, 19
    bias = case != "no-bias"
    ours = _seqkern_cell(mode, I, H, bias, torch.float32)
    peer = _torch_cell(mode, I, H, bias, torch.float64)
    peer.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    if case == "eval":
        ours.eval(), peer.eval()
    shape = (I,) if case == "unbatched" else (B, I)
    x = torch.randn(*shape, requires_grad=True)
    hx = None
    if case != "no-hx":
        states = [torch.randn(*shape[:-1], H, requires_grad=True)
                  for _ in range(2 if mode == "LSTM" else 1)]
        hx = tuple(states) if mode == "LSTM" else states[0]
    x64 = x.detach().double().requires_grad_(True)
    hx64 = None if hx is None else (
        tuple(s.detach().double().requires_grad_(True) for s in hx) if mode == "LSTM"
        else hx.detach().double().requires_grad_(True))
    with seqkern.backend(backend):
        out = ours(x, hx)
    ref = peer(x64, hx64)
    out = out if mode == "LSTM" else (out,)
    ref = ref if mode == "LSTM" else (ref,)
    for name, a, e in zip(("h", "c"), out, ref):
        assert_close(f"{mode} {name}", a.detach(), e.detach(), torch.float32)
    grads_out = [torch.randn_like(e) for e in ref]
    inputs = [x] + ([] if hx is None else list(hx if mode == "LSTM" else (hx,)))
    inputs64 = [x64] + ([] if hx64 is None else list(hx64 if mode == "LSTM" else (hx64,)))
    with seqkern.backend(backend):
        got = torch.autograd.grad(out, inputs + list(ours.parameters()),
                                  [g.float() for g in grads_out])
    want = torch.autograd.grad(ref, inputs64 + list(peer.parameters()), grads_out)
    names = ["input", "h0", "c0"][:len(inputs)] + [n for n, _ in ours.named_parameters()]
    for name, a, e in zip(names, got, want):
        assert_close(f"{mode} d{name}", a, e, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("which", ["h", "c"])
def test_lstm_backward_with_only_one_output_grad(backend, which):
    args = make_cell_args("LSTM", 3, 6, 11)
    leaves = [a.clone().requires_grad_(True) for a in args]
    leaves64 = [a.detach().double().requires_grad_(True) for a in args]
    with seqkern.backend(backend):
        h, c = call("LSTM", leaves)
        (h if which == "h" else c).sum().backward()
    h64, c64 = call_reference("LSTM", leaves64)
    (h64 if which == "h" else c64).sum().backward()
    for name, a, e in zip(ARG_NAMES, leaves, leaves64):
        assert_close(f"d{name}", a.grad, e.grad, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_only_where_asked(backend):
    """Frozen weights with an input that needs a gradient, and the reverse."""
    args = make_cell_args("GRU", 3, 6, 11)
    x, hx, _, w_ih, w_hh, b_ih, b_hh = args
    with seqkern.backend(backend):
        x.requires_grad_(True)
        seqkern.functional.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh).sum().backward()
        assert x.grad is not None and w_ih.grad is None and hx.grad is None
        w_hh.requires_grad_(True)
        x.requires_grad_(False)
        seqkern.functional.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh).sum().backward()
        assert w_hh.grad is not None and w_ih.grad is None
    x64, hx64, w_hh64 = (t.detach().double() for t in (x, hx, w_hh))
    w_hh64.requires_grad_(True)
    reference.gru_cell(x64, hx64, w_ih.double(), w_hh64, b_ih.double(),
                       b_hh.double()).sum().backward()
    assert_close("dw_hh", w_hh.grad, w_hh64.grad, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_zero(backend, mode):
    args = make_cell_args(mode, 0, 5, 6)
    with seqkern.backend(backend):
        out = call(mode, args)
    assert all(o.shape == (0, 6) for o in out)
