"""The reference recurrences (seqkern.reference.rnn) against torch.nn, in float64."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern
from seqkern import reference
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_cells_match_torch(kind, bias):
    B, I, H = 7, 5, 11
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    if kind == "LSTM":
        cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
        c = torch.randn(B, H, dtype=torch.float64)
        want = cell(x, (h, c))
        got = reference.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                  cell.bias_hh)
        assert_close("h", got[0], want[0])
        assert_close("c", got[1], want[1])
        return
    if kind == "GRU":
        cell = torch.nn.GRUCell(I, H, bias=bias, dtype=torch.float64)
        got = reference.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                 cell.bias_hh)
    else:
        nl = kind.split("_")[1].lower()
        cell = torch.nn.RNNCell(I, H, bias=bias, nonlinearity=nl, dtype=torch.float64)
        got = reference.rnn_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                 cell.bias_hh, nl)
    assert_close("h", got, cell(x, h))


def _layer_weights(module, suffix=""):
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    return tuple(getattr(module, n + suffix) for n in names)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_bidirectional_layer_matches_torch(mode, packed):
    T, B, I, H = 6, 4, 3, 5
    module = getattr(torch.nn, mode)(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(2, B, H, dtype=torch.float64)
    c0 = torch.randn(2, B, H, dtype=torch.float64)
    lengths = torch.tensor([6, 5, 3, 1], device="cpu")  # lengths live on the CPU
    state = (h0, c0) if mode == "LSTM" else h0
    if packed:
        data = pack_padded_sequence(x, lengths)
        want_out, want_state = module(data, state)
        want_out = want_out.data
        inp, sizes = data.data, data.batch_sizes
    else:
        want_out, want_state = module(x, state)
        inp, sizes = x, None
    want_h = want_state[0] if mode == "LSTM" else want_state
    outs = []
    for d, suffix in enumerate(("", "_reverse")):
        out, h_n, c_n = reference.recurrent_layer(
            mode, inp, h0[d], _layer_weights(module, suffix),
            c0=c0[d] if mode == "LSTM" else None, reverse=bool(d), batch_sizes=sizes)
        assert_close(f"h_n[{d}]", h_n, want_h[d])
        if mode == "LSTM":
            assert_close(f"c_n[{d}]", c_n, want_state[1][d])
        outs.append(out)
    assert_close("output", torch.cat(outs, -1), want_out)


def test_lstm_projection_matches_torch():
    T, B, I, H, P = 5, 3, 4, 6, 2
    module = torch.nn.LSTM(I, H, proj_size=P, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    want, (h_n, c_n) = module(x)
    out, h, c = reference.recurrent_layer(
        "LSTM", x, torch.zeros(B, P, dtype=torch.float64), _layer_weights(module),
        c0=torch.zeros(B, H, dtype=torch.float64), w_hr=module.weight_hr_l0)
    assert_close("output", out, want)
    assert_close("h_n", h, h_n[0])
    assert_close("c_n", c, c_n[0])


def test_bf16_layer_accumulates_in_fp32():
    """The reference in bf16 computes in fp32 and rounds the results (it is the backend
    the modules run under torch.func): a T=1000 LSTM's output and weight gradients within
    the relative rule of torch's own bf16 layer (computed in bf16 throughout they were
    1.5-23x further from float64)."""
    theirs = torch.nn.LSTM(2, 3, dtype=torch.float64)
    ours = seqkern.LSTM(2, 3, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1000, 1, 2, dtype=torch.float64)
    grad = torch.randn(1000, 1, 3, dtype=torch.float64)
    results = []
    for module, backend, dtype in ((theirs, None, torch.float64), (theirs, None, torch.bfloat16),
                                   (ours, "reference", torch.bfloat16)):
        m = copy.deepcopy(module).to(dtype)
        with seqkern.backend(backend) if backend else torch.enable_grad():
            out = m(x.to(dtype))[0]
            grads = torch.autograd.grad(out, list(m.parameters()), grad.to(dtype))
        results.append((out, grads))
    (want, g_want), (peer, g_peer), (got, g_got) = results
    assert_close_relative("output", got, want, peer, FWD_FACTOR)
    for name, g, w, p in zip(("w_ih", "w_hh", "b_ih", "b_hh"), g_got, g_want, g_peer):
        assert_close_relative(f"d{name}", g, w, p, BWD_FACTOR)
