"""The layer ops themselves (seqkern::rnn_layer_fwd / rnn_layer_bwd): opcheck, gradcheck and
double backward, torch.compile, which backend runs the backward, argument checks, and the
backward computing only the gradients asked for."""

import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE, skip_unless_usable
from tests.rnn_layer_cases import HAS_C, HAS_TRITON, module_pair
from tests.tolerances import assert_close


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_opcheck_layer_ops():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    w = [torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64),
         torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)]
    for need_workspace in (True, False):
        args = ("LSTM", x, None, h0, c0, *w, True, need_workspace)
        torch.library.opcheck(torch.ops.seqkern.rnn_layer_fwd.default, args)
    leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0, *w)]
    torch.library.opcheck(torch.ops.seqkern.rnn_layer_fwd.default,
                          ("LSTM", leaves[0], None, *leaves[1:3], *leaves[3:], True, True))


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("grad", [False, True])
def test_autograd_kernel_calls_the_kernel_for_plain_tensors_only(grad, monkeypatch):
    """The ops' Autograd kernel calls their kernel itself where the dispatcher would go next
    to it (seqkern/ops/registration.py): for plain tensors no redispatch, while under a
    dispatch mode (as for tensor subclasses and functionalization) the dispatcher's
    redispatch runs and the mode sees the op; with and without a graph, the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    redispatched = []
    redispatch = torch._ops.OpOverload.redispatch

    def counted(op, keyset, *args, **kwargs):
        redispatched.append((str(op), keyset))
        return redispatch(op, keyset, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverload, "redispatch", counted)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ours, peer = module_pair("GRU", input_size=3, hidden_size=5)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    with torch.set_grad_enabled(grad):
        plain = ours(x)[0]
        assert not redispatched
        with Seen() as seen:
            moded = ours(x)[0]
    assert "seqkern.rnn_layer_fwd.default" in seen.ops, seen.ops
    assert [op for op, _ in redispatched] == ["seqkern.rnn_layer_fwd.default"]
    expected = peer(x)[0]
    assert_close("output", plain, expected)
    assert_close("output under a dispatch mode", moded, expected)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_gradcheck_and_double_backward(mode):
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    sizes = torch.tensor([3, 2, 1])
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True) if mode == "LSTM" else None
    w = [torch.randn(G * 4, n, dtype=torch.float64, requires_grad=True) for n in (2, 4)]
    b = [torch.randn(G * 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def f(x, h0, *wb):
        out, h, c, _ = seqkern.ops.rnn_layer.rnn_layer_fwd(mode, x, sizes, h0, c0, *wb, True)
        return out.sum() + h.square().sum() + (c.sum() if c0 is not None else 0)

    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(f, (x, h0, *w, *b))
        assert torch.autograd.gradgradcheck(f, (x, h0, *w, *b))


class _CompiledModel(torch.nn.Module):
    """A batch_first bidirectional LSTM (its layer ops see a transposed, strided input;
    proj_size > 0: with a projection) under a GRU, with torch ops around them."""

    def __init__(self, proj_size=0):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.lstm = seqkern.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True,
                                 proj_size=proj_size)
        self.gru = seqkern.GRU(2 * (proj_size or 5), 4)

    def forward(self, x):
        y, (h, c) = self.lstm(torch.tanh(self.embed(x)))
        z, h_gru = self.gru(y.transpose(0, 1))
        return z.square().sum() + h.sum() + c.square().sum() + h_gru.sum()


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("compiler, proj_size", [("aot_eager", 0), ("inductor", 0),
                                                ("inductor", 3)])
def test_torch_compile_fullgraph_matches_eager(compiler, proj_size):
    """Forward and every gradient. Inductor checks the real outputs' strides against the
    fakes' (the backward's fake once gave a strided input's gradient its strides while every
    backend returns it contiguous: a failed assertion under inductor only)."""
    model = _CompiledModel(proj_size)
    x = torch.randn(2, 5, 3)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    got = compiled(x)
    g_got = torch.autograd.grad(got, list(model.parameters()))
    want = model(x)
    g_want = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("forced", ["reference", "cpu"])
def test_compiled_backward_runs_where_the_forward_ran(forced, monkeypatch):
    """A backend forced around a compiled forward, the backward outside it: the compiled
    graph's backward has none of the forward's thread-local state, and the cpu kernel's
    backward once read the reference's workspace (zeros) and gave wrong gradients, silently.
    The workspace's producer now runs the backward, whatever is forced at that time: the
    gradients match torch's, and the backward that ran is the forward's backend's."""
    ran = []
    for name in ("cpu", "reference"):
        original = BACKENDS[name].rnn_layer_bwd
        monkeypatch.setattr(BACKENDS[name], "rnn_layer_bwd",
                            lambda *a, name=name, original=original:
                            ran.append(name) or original(*a))
    ours, theirs = module_pair("LSTM", input_size=5, hidden_size=6)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    compiled = torch.compile(lambda x: ours(x)[0].sum(), fullgraph=True, backend="aot_eager")
    with seqkern.backend(forced):
        loss = compiled(x)
    other = "cpu" if forced == "reference" else "reference"
    with seqkern.backend(other):
        loss.backward()
    assert ran == [forced]
    theirs(x)[0].sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(f"forced {forced}, backward under {other}: d{name}", p.grad, q.grad)


CHECKING_BACKENDS = ["cpu", "reference", "triton"]  # cpu: C++ checks; others: the op's


@pytest.mark.parametrize("backend", CHECKING_BACKENDS)
@pytest.mark.parametrize("sizes, match", [([2, 3], "non-increasing"), ([3, 3], "sum to 6"),
                                          ([3, -1], "non-increasing")])
def test_layer_op_refuses_malformed_batch_sizes(backend, sizes, match):
    """The kernels index rows by batch_sizes: a malformed one must raise, not read past N."""
    skip_unless_usable(backend)
    x = torch.randn(5, 4)
    h0 = torch.zeros(3, 6)
    w_ih, w_hh = torch.randn(18, 4), torch.randn(18, 6)
    with seqkern.backend(backend), pytest.raises(RuntimeError, match=match):
        seqkern.ops.rnn_layer.rnn_layer_fwd("GRU", x, torch.tensor(sizes, device="cpu"), h0,
                                            None, w_ih, w_hh, None, None, False, False)


@pytest.mark.parametrize("backend", CHECKING_BACKENDS)
def test_layer_op_refuses_biases_of_the_wrong_size(backend):
    skip_unless_usable(backend)
    x, h0 = torch.randn(4, 2, 3), torch.zeros(2, 5)
    w_ih, w_hh = torch.randn(15, 3), torch.randn(15, 5)
    with seqkern.backend(backend), pytest.raises(RuntimeError, match=r"each \[G\*H\]"):
        seqkern.ops.rnn_layer.rnn_layer_fwd("GRU", x, None, h0, None, w_ih, w_hh,
                                            torch.randn(14), torch.randn(15), False, False)


@pytest.mark.parametrize("backend", CHECKING_BACKENDS)
@pytest.mark.parametrize("case, match", [
    ("w_hr rows", "w_hh must be"), ("w_hh columns", "w_hh must be"),
    ("h0 with a projection", r"h0 must be \[2, 5\], got \[2, 4\]"),
    ("h0", r"h0 must be \[2, 7\], got \[2, 6\]"), ("input features", r"w_ih must be"),
    ("c0", r"LSTM needs c0 \[2, 7\]"), ("integer input", "torch.int64")])
def test_layer_op_refuses_shapes_the_kernels_would_overrun(backend, case, match):
    """Each of these once ran the Triton kernels out of bounds (memory corruption in the
    interpreter, no error): every backend refuses them before a kernel runs."""
    skip_unless_usable(backend)
    x, h0, c0 = torch.randn(4, 2, 3), torch.zeros(2, 5), torch.zeros(2, 7)
    w_ih, w_hh, w_hr = torch.randn(28, 3), torch.randn(28, 5), torch.randn(5, 7)
    args = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr)
    args.update({"w_hr rows": dict(w_hr=torch.randn(6, 7)),
                 "w_hh columns": dict(w_hh=torch.randn(28, 4)),
                 "h0 with a projection": dict(h0=torch.zeros(2, 4)),
                 "h0": dict(h0=torch.zeros(2, 6), w_hh=torch.randn(28, 7), w_hr=None),
                 "input features": dict(x=torch.randn(4, 2, 2)),
                 "c0": dict(c0=torch.zeros(2, 5)),
                 "integer input": dict(x=torch.ones(4, 2, 3, dtype=torch.int64))}[case])
    with seqkern.backend(backend), pytest.raises(RuntimeError, match=match):
        seqkern.ops.rnn_layer.rnn_layer_fwd("LSTM", args["x"], None, args["h0"], args["c0"],
                                            args["w_ih"], args["w_hh"], None, None, False, True,
                                            args["w_hr"])


@pytest.mark.parametrize("backend", CHECKING_BACKENDS)
@pytest.mark.parametrize("which, match", [(0, "grad_output must have the output's 40"),
                                          (1, r"grad_hn must be h_n's \[2, 5\]"),
                                          (2, r"grad_cn must be c_n's \[2, 5\]"),
                                          (3, "workspace does not come from rnn_layer_fwd")])
def test_layer_backward_op_refuses_gradients_of_the_wrong_size(backend, which, match):
    """The backward reads the incoming gradients and the workspace without bounds checks."""
    skip_unless_usable(backend)
    x, h0, c0 = torch.randn(4, 2, 3), torch.zeros(2, 5), torch.zeros(2, 5)
    w_ih, w_hh = torch.randn(20, 3), torch.randn(20, 5)
    args = ("LSTM", x, None, h0, c0, w_ih, w_hh, None, None, False)
    with seqkern.backend(backend):
        workspace = seqkern.ops.rnn_layer.rnn_layer_fwd(*args, True)[3]
        grads = [torch.randn(4, 2, 5), torch.randn(2, 5), torch.randn(2, 5)]
        if which == 3:
            workspace = workspace[:-1]
        else:
            grads[which] = grads[which][..., :4] if which else torch.randn(4, 2, 4)
        with pytest.raises(RuntimeError, match=match):
            seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, [True] * 8, None)


NEEDS_PATTERNS = {  # rnn_layer_bwd's needs: d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh
    "parameters only (a first layer on data)": [0, 0, 0, 1, 1, 1, 1, 0],
    "input only (frozen layer)": [1, 0, 0, 0, 0, 0, 0, 0],
    "states and w_hh": [0, 1, 1, 0, 1, 0, 0, 0],
    "biases and w_ih": [0, 0, 0, 1, 0, 1, 1, 0],
    "w_hr and the input": [1, 0, 0, 0, 0, 0, 0, 1],
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("pattern", NEEDS_PATTERNS)
@pytest.mark.parametrize("mode", ["LSTM", "LSTM-proj", "GRU", "RNN_TANH"])
def test_layer_backward_computes_only_the_gradients_asked_for(backend, pattern, mode):
    """What needs leaves out comes back as [0] (its product skipped), and what it asks for
    equals the gradient of a backward that computes everything. LSTM-proj: with a projection
    (state width P = 4 < H = 6)."""
    usable = {"cpu": HAS_C, "triton": HAS_TRITON, "reference": True}
    if not usable[backend]:
        pytest.skip(f"{backend} backend not usable here")
    dtype = torch.float32 if backend == "triton" else torch.float64
    P = 4 if mode == "LSTM-proj" else 6
    mode = mode.removesuffix("-proj")
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    gen = torch.Generator().manual_seed(7)  # a CPU generator: draws on the CPU, then moved

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=dtype, device="cpu").to(DEVICE)

    T, B, I, H = 5, 3, 4, 6
    w_hr = randn(P, H) if P != H else None
    c0 = randn(B, H) if mode == "LSTM" else None
    args = (mode, randn(T, B, I), None, randn(B, P), c0, randn(G * H, I), randn(G * H, P),
            randn(G * H), randn(G * H), False)
    grads = (randn(T, B, P), randn(B, P), randn(B, H) if mode == "LSTM" else None)
    needs = [bool(n) for n in NEEDS_PATTERNS[pattern]]
    with seqkern.backend(backend):
        workspace = seqkern.ops.rnn_layer.rnn_layer_fwd(*args, True, w_hr)[3]
        everything = seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, [True] * 8,
                                                         w_hr)
        asked = seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, needs, w_hr)
    for name, want, full, got in zip(seqkern.ops.rnn_layer.GRAD_NAMES, needs, everything, asked):
        if not want or full.numel() == 0:  # not asked for, or not applicable (d_c0 of GRU)
            assert got.numel() == 0, f"{name} was not asked for but came back {got.shape}"
        else:
            assert_close(f"{mode} {pattern} {name}", got, full)
