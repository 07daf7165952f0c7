"""The recurrent cells as an API: drop-in modules (constructors, parameters, init,
state_dict, errors), registration (opcheck, gradcheck, double backward, torch.compile)."""

import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE, skip_unless_usable
from tests.capability_runner import assert_passes_under_capability
from tests.test_rnn_cells import MODES, call, call_reference, make_cell_args
from tests.weight_changes import change_weights

HAS_C = not BACKENDS["cpu"].availability(DEVICE)
needs_c = pytest.mark.skipif(not HAS_C, reason="seqkern._C not built")
CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
         ("RNNCell", {"nonlinearity": "relu"}), ("LSTMCell", {"bias": False})]


def _pair(name, kwargs, I=6, H=5):
    """The same cell from torch.nn and seqkern, built from the same seed."""
    torch.manual_seed(7)
    peer = getattr(torch.nn, name)(I, H, **kwargs)
    torch.manual_seed(7)
    ours = getattr(seqkern, name)(I, H, **kwargs)
    return peer, ours


@pytest.mark.parametrize("name, kwargs", CELLS)
def test_drop_in_parameters_init_state_dict(name, kwargs):
    peer, ours = _pair(name, kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(peer)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in peer.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), peer.named_parameters()):
        assert torch.equal(a, b), f"{n}: init differs from torch.nn's for the same seed"
    assert ours.bias_ih is None if kwargs.get("bias") is False else ours.bias_ih is not None
    other = getattr(torch.nn, name)(6, 5, **kwargs)
    ours.load_state_dict(other.state_dict())  # torch -> seqkern
    other.load_state_dict(ours.state_dict())  # and back
    x = torch.randn(3, 6)
    with seqkern.backend("reference"):
        torch.testing.assert_close(ours(x), other(x))


@pytest.mark.parametrize("name, kwargs", CELLS)
def test_cells_read_weights_where_getattr_finds_them(name, kwargs):
    """A parametrized weight (torch.nn.utils.parametrize), a weight replaced by a plain tensor
    and torch.func.functional_call reach the step as they reach torch's cell
    (seqkern/nn/weights.py reads _parameters only where getattr would)."""
    x = torch.randn(3, 6, dtype=torch.float64)
    for make in ("parametrized", "plain tensor", "functional_call"):
        peer, ours = (m.double() for m in _pair(name, kwargs))
        params = None
        for m in (peer, ours):
            change_weights(m, make, "weight_hh", "weight_ih")
            if make == "functional_call":
                params = params or {n: torch.randn_like(p) for n, p in m.named_parameters()}
        outs = [torch.func.functional_call(m, params, (x,)) if params else m(x)
                for m in (ours, peer)]
        torch.testing.assert_close(*outs, msg=make)


def test_rnn_cell_positional_nonlinearity_and_unknown_one():
    cell = seqkern.RNNCell(4, 3, True, "relu")
    assert cell.nonlinearity == "relu"
    bad = seqkern.RNNCell(4, 3, nonlinearity="foo")  # torch accepts it too, then fails
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: foo"):
        bad(torch.randn(2, 4))


def _bad_calls():
    """(cell name, input, hx) that torch.nn's cells reject."""
    r = torch.randn
    yield "LSTMCell", r(2, 5), None                           # wrong feature size
    yield "LSTMCell", r(2, 4), (r(3, 3), r(2, 3))             # batch mismatch, h
    yield "LSTMCell", r(2, 4), (r(2, 3), r(3, 3))             # batch mismatch, c
    yield "LSTMCell", r(2, 4), (r(2, 4), r(2, 3))             # wrong hidden size
    yield "LSTMCell", r(2, 2, 4), None                        # 3-D input
    yield "LSTMCell", r(2, 4), (r(1, 2, 3), r(2, 3))          # 3-D hx
    yield "GRUCell", r(2, 4), r(2, 4)                         # wrong hidden size
    yield "GRUCell", r(2, 4), r(3, 3)                         # batch mismatch
    yield "GRUCell", torch.randint(0, 3, (2, 4)), None        # integer dtype
    yield "GRUCell", r(2, 4).double(), None                   # dtype differs from weights
    yield "GRUCell", r(4), r(2, 3)                            # unbatched input, 2-D hx
    yield "RNNCell", r(2, 4), r(2, 3).double()                # hx dtype
    yield "RNNCell", r(3), None                               # wrong feature size, 1-D
    yield "LSTMCell", r(2, 4), (r(2, 3),)                     # one state
    yield "LSTMCell", r(2, 4), (r(2, 3), r(2, 3), r(2, 3))    # three states


@pytest.mark.parametrize("index", range(15))
def test_bad_inputs_raise_like_torch(index):
    name, x, hx = list(_bad_calls())[index]
    peer, ours = _pair(name, {}, I=4, H=3)
    with pytest.raises(Exception) as expected:
        peer(x, hx)
    with pytest.raises(expected.type) as got:
        ours(x, hx)
    # Where torch names the problem in its message, seqkern says the same words.
    if any(w in str(expected.value) for w in ("inconsistent", "batch size", "Expected",
                                              "expects")):
        assert str(got.value) == str(expected.value)


def test_functional_rejects_bad_weights_before_any_kernel():
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = make_cell_args("LSTM", 2, 4, 3)
    F = seqkern.functional
    with pytest.raises(RuntimeError, match="w_ih"):
        F.lstm_cell(x, hx, cx, w_ih[:-1], w_hh, b_ih, b_hh)
    with pytest.raises(RuntimeError, match="b_hh"):
        F.lstm_cell(x, hx, cx, w_ih, w_hh, b_ih, b_hh[:-1])
    with pytest.raises(ValueError, match="both"):
        F.lstm_cell(x, hx, cx, w_ih, w_hh, b_ih, None)
    with pytest.raises(RuntimeError, match="w_hh.*dtype"):
        F.lstm_cell(x, hx, cx, w_ih, w_hh.double(), b_ih, b_hh)


@needs_c
def test_default_backend_on_cpu_tensors_is_cpu_and_cuda_says_why_not():
    inputs = dict(device=torch.device("cpu"), dtype=torch.float32, mode="GRU", input=None)
    assert seqkern.backends.select("rnn_cell", inputs).NAME == "cpu"
    assert BACKENDS["cuda"].not_supported_reasons("rnn_cell", inputs)
    assert BACKENDS["triton"].not_supported_reasons(
        "rnn_cell", dict(inputs, dtype=torch.float64))


@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck_fp64(mode):
    args = make_cell_args(mode, 2, 3, 4, dtype=torch.float64)
    present = [i for i, a in enumerate(args) if a is not None]

    def f(*tensors):
        full = list(args)
        for i, t in zip(present, tensors):
            full[i] = t
        return call(mode, full)

    leaves = [args[i].clone().requires_grad_(True) for i in present]
    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(f, leaves)
        assert torch.autograd.gradgradcheck(f, leaves)


@needs_c
def test_double_backward_matches_reference():
    args = make_cell_args("LSTM", 3, 4, 5, dtype=torch.float64)
    leaves = [a.clone().requires_grad_(True) for a in args]
    leaves_ref = [a.clone().requires_grad_(True) for a in args]
    with seqkern.backend("cpu"):
        h, c = call("LSTM", leaves)
        gx, = torch.autograd.grad((h * c).sum(), leaves[0], create_graph=True)
        gw, = torch.autograd.grad(gx.pow(2).sum(), leaves[3])
    h, c = call_reference("LSTM", leaves_ref)
    gx_ref, = torch.autograd.grad((h * c).sum(), leaves_ref[0], create_graph=True)
    gw_ref, = torch.autograd.grad(gx_ref.pow(2).sum(), leaves_ref[3])
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_forward_and_backward_ops(mode):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = make_cell_args(mode, 3, 4, 5)
    fwd_args = (mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    torch.library.opcheck(torch.ops.seqkern.rnn_cell_fwd.default, fwd_args)
    h, c, saved = torch.ops.seqkern.rnn_cell_fwd(*fwd_args)
    grad_c = torch.randn_like(c) if mode == "LSTM" else None
    bwd_args = (mode, torch.randn_like(h), grad_c, x, hx, cx, w_ih, w_hh, True, h, saved,
                [True] * 7)
    torch.library.opcheck(torch.ops.seqkern.rnn_cell_bwd.default, bwd_args)
    w_ih.requires_grad_(True), hx.requires_grad_(True)
    torch.library.opcheck(torch.ops.seqkern.rnn_cell_fwd.default, fwd_args)


@needs_c
def test_torch_compile_fullgraph_loop_matches_eager():
    torch.manual_seed(3)
    lstm, gru = seqkern.LSTMCell(6, 8), seqkern.GRUCell(8, 8)
    xs = torch.randn(5, 3, 6)

    def f(xs):
        state, h2 = None, None
        for t in range(xs.shape[0]):
            state = lstm(xs[t], state)
            h2 = gru(state[0], h2)
        return h2.sum() + state[1].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(xs)
    grads_eager = torch.autograd.grad(eager, list(lstm.parameters()))
    comp = compiled(xs)
    grads_comp = torch.autograd.grad(comp, list(lstm.parameters()))
    torch.testing.assert_close(comp, eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


@needs_c
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_cell_kernels_for_every_capability(capability):
    """The cell kernels compiled for each instruction set agree with the reference."""
    code = """
import torch, seqkern
from tests.test_rnn_cells import MODES, check_against_reference64, make_cell_args
from tests.test_rnn_cells import test_half_precision_relative_rule as check_half
torch.manual_seed(1)
for mode in MODES:
    check_against_reference64("cpu", mode, make_cell_args(mode, 3, 40, 37))
    check_against_reference64("cpu", mode, make_cell_args(mode, 12, 40, 37))  # brgemm
    check_half("cpu", torch.float16, mode, 5)  # fp16 weights read as fp16
    check_against_reference64("cpu", mode, make_cell_args(mode, 2, 5, 9, torch.float64))
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


OP_CASES = {  # rnn_cell_fwd's arguments, changed from x [3, 4], hx, cx [3, 5], LSTM weights
    "hx wider than w_hh": (dict(hx=(3, 6)), r"w_ih must be \[24, 4\], got \[20, 4\]"),
    "w_hh narrow": (dict(w_hh=(20, 4)), r"w_hh must be \[20, 5\], got \[20, 4\]"),
    "input batch": (dict(x=(2, 4)), r"hx must be \[2, 5\], got \[3, 5\]"),
    "cx short": (dict(cx=(3, 4)), r"cx must be \[3, 5\], got \[3, 4\]"),
    "w_ih features": (dict(w_ih=(20, 3)), r"w_ih must be \[20, 4\], got \[20, 3\]"),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", OP_CASES)
def test_cell_op_refuses_shapes_the_kernels_would_overrun(backend, case):
    """The op itself (torch.ops.seqkern.rnn_cell_fwd), not only seqkern.functional: the
    Triton kernel indexes by these shapes without bounds checks and gave wrong answers for
    each, silently; every backend now refuses them before a kernel runs (cpu in C++)."""
    skip_unless_usable(backend)
    change, match = OP_CASES[case]
    shapes = {**dict(x=(3, 4), hx=(3, 5), cx=(3, 5), w_ih=(20, 4), w_hh=(20, 5)), **change}
    t = {name: torch.randn(*shape, device=DEVICE) for name, shape in shapes.items()}
    with seqkern.backend(backend), pytest.raises(RuntimeError, match=match):
        seqkern.ops.rnn_cells.rnn_cell_fwd("LSTM", t["x"], t["hx"], t["cx"], t["w_ih"],
                                           t["w_hh"], None, None)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("which, match", [("grad_h", r"grad_h must be \[3, 5\]"),
                                          ("saved", "saved must be the forward's flat")])
def test_cell_backward_op_refuses_gradients_of_the_wrong_size(backend, which, match):
    skip_unless_usable(backend)
    x, hx, cx = (torch.randn(3, n, device=DEVICE) for n in (4, 5, 5))
    w_ih, w_hh = torch.randn(20, 4, device=DEVICE), torch.randn(20, 5, device=DEVICE)
    with seqkern.backend(backend):
        h, c, saved = seqkern.ops.rnn_cells.rnn_cell_fwd("LSTM", x, hx, cx, w_ih, w_hh, None,
                                                         None)
        grad_h = torch.randn(3, 4 if which == "grad_h" else 5, device=DEVICE)
        saved = saved[:-1] if which == "saved" else saved
        with pytest.raises(RuntimeError, match=match):
            seqkern.ops.rnn_cells.rnn_cell_bwd("LSTM", grad_h, None, x, hx, cx, w_ih, w_hh,
                                               False, h, saved, [True] * 7)
