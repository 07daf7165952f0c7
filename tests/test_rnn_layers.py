"""seqkern.LSTM / GRU / RNN against torch.nn's modules with the same weights."""
import contextlib
import os
import random

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE
from tests.capability_runner import assert_passes_under_capability
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative

HAS_C = not BACKENDS["cpu"].availability(DEVICE)


def _pair(cls, dtype=torch.float64, **kw):
    ours = getattr(seqkern, cls)(dtype=dtype, device=DEVICE, **kw)
    theirs = getattr(torch.nn, cls)(dtype=dtype, device=DEVICE, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _flatten(result):
    out, hidden = result
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        out = out.data
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    return [out, *hidden]


def _random_config(rng, projections=True):
    cls = rng.choice(["LSTM", "GRU", "RNN"])
    kw = dict(input_size=rng.choice([1, 3, 7]), hidden_size=rng.choice([1, 5, 8]),
              num_layers=rng.choice([1, 2, 3]), bias=rng.random() < 0.7,
              batch_first=rng.random() < 0.5, bidirectional=rng.random() < 0.5)
    if cls == "RNN":
        kw["nonlinearity"] = rng.choice(["tanh", "relu"])
    if cls == "LSTM" and rng.random() < 0.25 and projections:
        kw["proj_size"] = rng.randint(1, kw["hidden_size"]) if kw["hidden_size"] > 1 else 0
    form = rng.choice(["padded", "padded", "unbatched", "packed_sorted", "packed_unsorted"])
    return cls, kw, form, rng.choice([1, 4, 9]), rng.choice([1, 2, 5]), rng.random() < 0.5


def _make_input(cls, kw, form, T, B, given_h0, gen):
    I, H = kw["input_size"], kw["hidden_size"]
    out = kw.get("proj_size", 0) or H
    D = (2 if kw["bidirectional"] else 1) * kw["num_layers"]
    shape = (B, T, I) if kw["batch_first"] else (T, B, I)
    if form == "unbatched":
        shape = (T, I)
    def randn(*size):  # drawn on the CPU generator, then moved: same values on any device
        return torch.randn(*size, dtype=torch.float64, generator=gen, device="cpu").to(DEVICE)

    x = randn(*shape)
    hx = None
    if given_h0:
        hshape = (D, out) if form == "unbatched" else (D, B, out)
        cshape = (D, H) if form == "unbatched" else (D, B, H)
        h = randn(*hshape)
        hx = (h, randn(*cshape)) if cls == "LSTM" else h
    return x, hx


def _check_against_torch(label, ours, theirs, call, leaves, backend, dtype):
    """call(module, leaves) -> the module's outputs (flattened). ours (in dtype, on backend)
    against theirs (float64) on the same leaves (input, initial states): the outputs, then
    the gradients of every leaf and parameter that requires one, for random output
    gradients."""
    leaves_a = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in leaves]
    with seqkern.backend(backend):
        got = call(ours, leaves_a)
    want = call(theirs, leaves)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"{label} output[{i}]", g, w)
    grads = [torch.randn_like(w) for w in want]
    names = ["input", "h0", "c0"][:len(leaves)] + [n for n, _ in ours.named_parameters()]
    pairs = [(n, a, b) for n, a, b in zip(names, leaves_a + list(ours.parameters()),
                                          leaves + list(theirs.parameters()))
             if a.requires_grad]
    if not pairs:
        return
    with seqkern.backend(backend):
        g_ours = torch.autograd.grad(got, [a for _, a, _ in pairs], [g.to(dtype) for g in grads])
    g_theirs = torch.autograd.grad(want, [b for _, _, b in pairs], grads)
    for (name, _, _), g, w in zip(pairs, g_ours, g_theirs):
        assert_close(f"{label} d{name}", g, w)


HAS_TRITON = not BACKENDS["triton"].availability(DEVICE)
HAS_CUDA = not BACKENDS["cuda"].availability(DEVICE)
GRID = [pytest.param(backend, seed, torch.float64, id=f"{backend}-{seed}")
        for backend in ("cpu", "reference") for seed in range(24)] + [
    pytest.param(backend, seed, torch.float32, id=f"{backend}-{seed}")
    for backend in ("triton", "cuda") for seed in range(10)]


@pytest.mark.parametrize("backend, seed, dtype", GRID)
def test_randomized_parity_with_torch(backend, seed, dtype):
    """seqkern's module (in dtype, on backend) against torch's in float64."""
    usable = {"cpu": HAS_C, "triton": HAS_TRITON, "cuda": HAS_CUDA, "reference": True}
    if not usable[backend]:
        pytest.skip(f"{backend} backend not usable here")
    rng = random.Random(seed)
    # LSTM projections have a kernel on cpu only (triton and cuda refuse them).
    cls, kw, form, T, B, given_h0 = _random_config(rng, backend in ("cpu", "reference"))
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = _pair(cls, **kw)
    ours.to(dtype)
    x, hx = _make_input(cls, kw, form, T, B, given_h0, gen)
    lengths = None
    if form.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen, device="cpu")
        lengths[0] = T
        if form == "packed_sorted":
            lengths = lengths.sort(descending=True).values

    def call(module, leaves):
        h = None if hx is None else (tuple(leaves[1:]) if cls == "LSTM" else leaves[1])
        inp = leaves[0]
        if lengths is not None:
            inp = pack_padded_sequence(inp, lengths, batch_first=kw["batch_first"],
                                       enforce_sorted=form == "packed_sorted")
        return _flatten(module(inp, h))

    # Which leaves want a gradient, drawn apart from the configuration: the input (data, as in
    # a training step, or not), the initial states, and a random subset of frozen parameters.
    # The backward skips the products of the unwanted ones.
    want_rng = random.Random(1000 + seed)
    leaves = [x] + ([] if hx is None else list(hx if isinstance(hx, tuple) else (hx,)))
    leaves = [t.clone().requires_grad_(want_rng.random() < 0.6) for t in leaves]
    frozen = {name for name, _ in ours.named_parameters() if want_rng.random() < 0.2}
    for module in (ours, theirs):
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
    _check_against_torch(f"{cls} {kw} {form} frozen {sorted(frozen)}", ours, theirs, call,
                         leaves, backend, dtype)


@pytest.mark.parametrize("backend, cls", [(None, "LSTM"), (None, "GRU"), (None, "RNN"),
                                          ("triton", "LSTM")])  # interpreted: ~25 s
def test_long_sequence_stays_finite_and_matches(backend, cls):
    """T = 1000, forward and backward through all of it, float32 against float64."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton backend not usable here")
    ours, theirs = _pair(cls, dtype=torch.float32, input_size=8, hidden_size=16)
    theirs.double()  # the float64 reference, same weights
    x = torch.randn(1000, 2, 8, device=DEVICE)
    xa, xb = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    with seqkern.backend(backend) if backend else contextlib.nullcontext():
        a = _flatten(ours(xa))
        g_ours = torch.autograd.grad(a[0].sum(), [xa, *ours.parameters()])
    b = _flatten(theirs(xb))
    g_theirs = torch.autograd.grad(b[0].sum(), [xb, *theirs.parameters()])
    for i, (g, w) in enumerate(zip(a, b)):
        assert torch.isfinite(g).all()
        assert_close(f"{cls} T=1000 output[{i}]", g, w)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, g_ours, g_theirs):
        assert torch.isfinite(g).all()
        assert_close(f"{cls} T=1000 d{name}", g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_low_precision_relative_rule(cls, dtype):
    if not HAS_C:
        pytest.skip("no _C")
    ours, theirs = _pair(cls, dtype=torch.float64, input_size=17, hidden_size=33)
    x = torch.randn(12, 3, 17, dtype=torch.float64)
    want = _flatten(theirs(x))
    peer = _flatten(theirs.to(dtype)(x.to(dtype)))
    got = _flatten(ours.to(dtype)(x.to(dtype)))
    for i, (g, w, p) in enumerate(zip(got, want, peer)):
        assert g.dtype == dtype
        if dtype == torch.float32:
            assert_close(f"out[{i}]", g, w)
        else:
            assert_close_relative(f"out[{i}]", g, w, p, FWD_FACTOR)


def _native_cpu_bf16_products():
    """What csrc/cpu/matmul.cpp's bf16_products_available() looks for: AVX512-BF16, no AMX
    (and oneDNN not capped below AVX-512, which its probe then finds)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags and "amx_bf16" not in flags


@pytest.mark.skipif(not HAS_C or DEVICE != "cpu", reason="the CPU kernels")
@pytest.mark.parametrize("form", ["team", "row split", "packed"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_cpu_bf16_products_relative_rule(cls, form, monkeypatch):
    """bf16 layers on a CPU with native bf16 products run the input projection and the step
    products on bf16 operands (the state rounded each step): outputs and gradients within
    the relative rule of torch's own bf16 layers, both directions. Where the CPU has them the
    result must differ from the fp32-product path (SEQKERN_CPU_BF16_PRODUCTS=0): the bf16 path
    ran. B = 3 at H = 128 takes the team loop, B = 40 the row split."""
    B, H = (40, 64) if form == "row split" else (3, 128)
    ours, theirs = _pair(cls, input_size=32, hidden_size=H, bidirectional=True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, B, 32, dtype=torch.float64, generator=gen)
    lengths = torch.randint(1, 10, (B,), generator=gen)
    lengths[1] = 9

    def run(module, x, dtype):
        module = module.to(dtype)
        leaf = x.detach().to(dtype).requires_grad_(True)
        inp = pack_padded_sequence(leaf, lengths, enforce_sorted=False) if form == "packed" \
            else leaf
        outs = _flatten(module(inp))
        grads = torch.autograd.grad(sum(o.double().square().sum() for o in outs),
                                    [leaf, *module.parameters()])
        return [o.detach() for o in outs] + list(grads)

    want = run(theirs, x, torch.float64)
    peer = run(theirs, x, torch.bfloat16)
    with seqkern.backend("cpu"):
        got = run(ours, x, torch.bfloat16)
        monkeypatch.setenv("SEQKERN_CPU_BF16_PRODUCTS", "0")
        fp32_products = run(ours, x, torch.bfloat16)
    outputs = len(want) - 1 - len(list(ours.parameters()))
    for i, (g, w, p) in enumerate(zip(got, want, peer)):
        factor = FWD_FACTOR if i < outputs else BWD_FACTOR
        assert_close_relative(f"{cls} {form} result[{i}]", g, w, p, factor)
    if _native_cpu_bf16_products():
        assert not torch.equal(got[0], fp32_products[0]), "the bf16 products did not run"


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_state_dict_round_trips_both_ways(cls):
    ours = getattr(seqkern, cls)(3, 4, num_layers=2, bidirectional=True)
    theirs = getattr(torch.nn, cls)(3, 4, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.RNNBase)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert len(ours.all_weights) == len(theirs.all_weights)
    ours.flatten_parameters()


def test_constructor_errors_match_torch():
    for cls, kw in [("GRU", dict(proj_size=2)), ("RNN", dict(nonlinearity="gelu")),
                    ("LSTM", dict(proj_size=5)), ("LSTM", dict(dropout=2.0))]:
        with pytest.raises(ValueError) as want:
            getattr(torch.nn, cls)(3, 4, **kw)
        with pytest.raises(ValueError) as got:
            getattr(seqkern, cls)(3, 4, **kw)
        assert str(got.value) == str(want.value)
    ours = seqkern.RNN(3, 4, 2, "relu", False)
    theirs = torch.nn.RNN(3, 4, 2, "relu", False)
    assert (ours.mode, ours.num_layers, ours.bias) == (theirs.mode, theirs.num_layers, theirs.bias)


def test_functional_call_uses_the_given_weights():
    ours, theirs = _pair("GRU", input_size=3, hidden_size=4)
    params = {n: torch.randn_like(p) for n, p in ours.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    a = torch.func.functional_call(ours, params, (x,))
    b = torch.func.functional_call(theirs, params, (x,))
    assert_close("output", a[0], b[0])


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_dropout_between_layers_only_in_training(cls):
    ours, theirs = _pair(cls, input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ours.eval(), theirs.eval()
    assert_close("eval output", ours(x)[0], theirs(x)[0])
    ours.train()
    torch.manual_seed(0)
    a = ours(x)[0]
    torch.manual_seed(1)
    b = ours(x)[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("make_bad, error", [
    (lambda m: (torch.randn(5, 2, 4), None), RuntimeError),        # wrong feature size
    (lambda m: (torch.randn(5, 2, 3, 1), None), ValueError),       # 4-D input
    (lambda m: (torch.randn(5, 2, 3), torch.randn(1, 3, 4)), RuntimeError),  # wrong h0 batch
    (lambda m: (torch.randn(5, 2, 3), torch.randn(2, 4)), RuntimeError),     # 2-D h0 batched
    (lambda m: (torch.randn(0, 2, 3), None), RuntimeError),        # T = 0
])
@pytest.mark.parametrize("cls", ["GRU", "RNN"])
def test_bad_inputs_raise_like_torch(cls, make_bad, error):
    ours, theirs = getattr(seqkern, cls)(3, 4), getattr(torch.nn, cls)(3, 4)
    x, h = make_bad(None)
    with pytest.raises(error) as want:
        theirs(x, h)
    with pytest.raises(error) as got:
        ours(x, h)
    assert str(got.value) == str(want.value)


def test_lstm_bad_states_and_integer_input_raise_like_torch():
    ours, theirs = seqkern.LSTM(3, 4), torch.nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    for hx in [(torch.randn(1, 2, 4), torch.randn(1, 3, 4)),
               (torch.randn(1, 2, 5), torch.randn(1, 2, 4))]:
        with pytest.raises(RuntimeError) as want:
            theirs(x, hx)
        with pytest.raises(RuntimeError) as got:
            ours(x, hx)
        assert str(got.value) == str(want.value)
    with pytest.raises((RuntimeError, ValueError)):
        ours(torch.ones(5, 2, 3, dtype=torch.int64))


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_hidden_state_of_another_dtype_raises_like_torch(cls):
    ours, theirs = getattr(seqkern, cls)(3, 4), getattr(torch.nn, cls)(3, 4)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    hx = (h, h) if cls == "LSTM" else h
    with pytest.raises(RuntimeError):
        theirs(torch.randn(5, 2, 3), hx)
    with pytest.raises(RuntimeError, match="not the same dtype"):
        ours(torch.randn(5, 2, 3), hx)


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
    """A batch_first bidirectional LSTM (its layer ops see a transposed, strided input)
    under a GRU, with torch ops around them."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.lstm = seqkern.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = seqkern.GRU(10, 4)

    def forward(self, x):
        y, (h, c) = self.lstm(torch.tanh(self.embed(x)))
        z, h_gru = self.gru(y.transpose(0, 1))
        return z.square().sum() + h.sum() + c.square().sum() + h_gru.sum()


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    """Forward and every gradient. Inductor checks the real outputs' strides against the
    fakes' (the backward's fake once gave a strided input's gradient its strides while every
    backend returns it contiguous: a failed assertion under inductor only)."""
    model = _CompiledModel()
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
def test_compiled_backward_runs_where_the_forward_ran(forced):
    """A backend forced around a compiled forward, the backward outside it: the compiled
    graph's backward has none of the forward's thread-local state, and the cpu kernel's
    backward once read the reference's workspace (zeros) and gave wrong gradients, silently.
    The workspace's producer now runs the backward, whatever is forced at that time."""
    ours, theirs = _pair("LSTM", input_size=5, hidden_size=6)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    compiled = torch.compile(lambda x: ours(x)[0].sum(), fullgraph=True, backend="aot_eager")
    with seqkern.backend(forced):
        loss = compiled(x)
    other = "cpu" if forced == "reference" else "reference"
    with seqkern.backend(other):
        loss.backward()
    theirs(x)[0].sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(f"forced {forced}, backward under {other}: d{name}", p.grad, q.grad)


def test_packed_output_unpacks_like_torch():
    ours, theirs = _pair("LSTM", input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([2, 6, 4], device="cpu"), enforce_sorted=False)
    a, (ha, ca) = ours(packed)
    b, (hb, cb) = theirs(packed)
    assert_close("padded output", pad_packed_sequence(a)[0], pad_packed_sequence(b)[0])
    assert_close("h_n", ha, hb)
    assert_close("c_n", ca, cb)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_forwards_pending_backward_keep_their_own_buffers(cls):
    """Workspaces large enough to come from the CPU buffer cache (csrc/cpu/buffer_cache.cpp):
    three forwards before one backward, the second graph freed unused in between, so that
    a freed block is handed to the next forward. In float64 (the workspaces are still over the
    cache's 1 MB floor): a mixed-up buffer shows as an O(1) error, while float32's own rounding
    over these sums (torch's float32 module is off by up to 1.7e-4) sits at the fp32 bound."""
    ours, theirs = _pair(cls, dtype=torch.float64, input_size=64, hidden_size=128)
    xs = [torch.randn(40, 32, 64, device=DEVICE) for _ in range(3)]
    weights = (1.0, 0.0, 3.0)

    def loss(module):
        outs = []
        for i, x in enumerate(xs):
            out = module(x.to(module.weight_ih_l0.dtype))[0]
            if weights[i]:
                outs.append(weights[i] * out.square().sum())
        return sum(outs)

    with seqkern.backend("cpu"):
        g_ours = torch.autograd.grad(loss(ours), list(ours.parameters()))
    g_theirs = torch.autograd.grad(loss(theirs), list(theirs.parameters()))
    for (name, _), a, b in zip(ours.named_parameters(), g_ours, g_theirs):
        assert_close(f"{cls} d{name}", a, b)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
def test_lstm_projection_kernel_matches_torch(form):
    """proj_size runs inside the C++ recurrence (h = h_full W_hr^T every step)."""
    ours, theirs = _pair("LSTM", input_size=7, hidden_size=33, proj_size=13, num_layers=2,
                         bidirectional=True)
    x = torch.randn(11, 6, 7, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(4, 6, 13, dtype=torch.float64, device=DEVICE)
    c0 = torch.randn(4, 6, 33, dtype=torch.float64, device=DEVICE)
    lengths = torch.tensor([11, 3, 7, 1, 11, 5], device="cpu")

    def run(module, x, h0, c0):
        inp = x if form == "padded" else pack_padded_sequence(x, lengths, enforce_sorted=False)
        return _flatten(module(inp, (h0, c0)))

    leaves = [[t.clone().requires_grad_(True) for t in (x, h0, c0)] for _ in range(2)]
    with seqkern.backend("cpu"):
        got = run(ours, *leaves[0])
    want = run(theirs, *leaves[1])
    grads = [torch.randn_like(w) for w in want]
    with seqkern.backend("cpu"):
        g_ours = torch.autograd.grad(got, leaves[0] + list(ours.parameters()), grads)
    g_theirs = torch.autograd.grad(want, leaves[1] + list(theirs.parameters()), grads)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"output[{i}]", g, w)
    names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, g_ours, g_theirs):
        assert_close(f"d{name}", g, w)


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_lstm_projection_gradcheck():
    sizes = torch.tensor([3, 2, 1])
    H, P = 5, 3
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (2, P)]
    b = [torch.randn(4 * H, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w_hr = torch.randn(P, H, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, w_hr, *wb):
        out, h, c, _ = seqkern.ops.rnn_layer.rnn_layer_fwd("LSTM", x, sizes, h0, c0, *wb, True,
                                                           True, w_hr)
        return out.sum() + h.square().sum() + c.sum()

    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(f, (x, h0, c0, w_hr, *w, *b))


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend not usable here")
@pytest.mark.parametrize("cls, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
def test_triton_layers_over_several_program_tiles(cls, kw):
    """Triton's steps run as a grid of (16-row, 32-unit) programs: B = 37 and H = 40 make 3 x 2
    of them, each reading the state the others wrote at the step before (the randomized grid
    stays within one tile). Packed unsorted, both directions, float32 against float64."""
    ours, theirs = _pair(cls, input_size=6, hidden_size=40, bidirectional=True, **kw)
    ours.float()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 37, 6, dtype=torch.float64, generator=gen).to(DEVICE)
    lengths = torch.randint(1, 8, (37,), generator=gen)
    lengths[5] = 7
    h0 = torch.randn(2, 37, 40, dtype=torch.float64, generator=gen).to(DEVICE)
    hx = (h0, torch.randn_like(h0)) if cls == "LSTM" else h0

    def call(module, leaves):
        h = tuple(leaves[1:]) if cls == "LSTM" else leaves[1]
        return _flatten(module(pack_padded_sequence(leaves[0], lengths, enforce_sorted=False),
                               h))

    leaves = [t.requires_grad_(True) for t in (x, *(hx if isinstance(hx, tuple) else (hx,)))]
    _check_against_torch(cls, ours.float(), theirs, call, leaves, "triton", torch.float32)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("used", ["h_n", "c_n", "output"])
def test_gradients_when_only_some_outputs_are_used(cls, used):
    """Unused outputs reach the backward as None, not as zero tensors (no materialisation)."""
    if cls == "GRU" and used == "c_n":
        pytest.skip("GRU has no c_n")
    ours, theirs = _pair(cls, input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5, dtype=torch.float64, device=DEVICE)

    def loss(module, x):
        out, hidden = module(x)
        h_n, c_n = hidden if cls == "LSTM" else (hidden, None)
        return {"h_n": h_n, "c_n": c_n, "output": out}[used].square().sum()

    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with seqkern.backend("cpu"):
        g_ours = torch.autograd.grad(loss(ours, xa), [xa, *ours.parameters()], allow_unused=True)
    g_theirs = torch.autograd.grad(loss(theirs, xb), [xb, *theirs.parameters()],
                                   allow_unused=True)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g_ours, g_theirs):
        if b is None:
            assert a is None or not a.abs().max(), f"d{name}: expected no gradient"
            continue
        assert_close(f"{used}: d{name}", a, b)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("sizes, match", [([2, 3], "non-increasing"), ([3, 3], "sum to 6"),
                                          ([3, -1], "non-increasing")])
def test_layer_op_refuses_malformed_batch_sizes(sizes, match):
    """The kernels index rows by batch_sizes: a malformed one must raise, not read past N."""
    x = torch.randn(5, 4)
    h0 = torch.zeros(3, 6)
    w_ih, w_hh = torch.randn(18, 4), torch.randn(18, 6)
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=match):
        seqkern.ops.rnn_layer.rnn_layer_fwd("GRU", x, torch.tensor(sizes), h0, None, w_ih, w_hh,
                                            None, None, False, False)


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_layer_op_refuses_biases_of_the_wrong_size():
    x, h0 = torch.randn(4, 2, 3), torch.zeros(2, 5)
    w_ih, w_hh = torch.randn(15, 3), torch.randn(15, 5)
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=r"each \[G\*H\]"):
        seqkern.ops.rnn_layer.rnn_layer_fwd("GRU", x, None, h0, None, w_ih, w_hh,
                                            torch.randn(14), torch.randn(15), False, False)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("which, match", [(0, "grad_output must have the output's 40"),
                                          (1, r"grad_hn must be h_n's \[2, 5\]"),
                                          (2, r"grad_cn must be c_n's \[2, 5\]")])
def test_layer_backward_op_refuses_gradients_of_the_wrong_size(which, match):
    """The backward reads the incoming gradients without bounds checks."""
    x, h0, c0 = torch.randn(4, 2, 3), torch.zeros(2, 5), torch.zeros(2, 5)
    w_ih, w_hh = torch.randn(20, 3), torch.randn(20, 5)
    args = ("LSTM", x, None, h0, c0, w_ih, w_hh, None, None, False)
    with seqkern.backend("cpu"):
        workspace = seqkern.ops.rnn_layer.rnn_layer_fwd(*args, True)[3]
        grads = [torch.randn(4, 2, 5), torch.randn(2, 5), torch.randn(2, 5)]
        grads[which] = grads[which][..., :4] if which else torch.randn(4, 2, 4)
        with pytest.raises(RuntimeError, match=match):
            seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, [True] * 8, None)


NEEDS_PATTERNS = {  # rnn_layer_bwd's needs: d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh
    "parameters only (a first layer on data)": [0, 0, 0, 1, 1, 1, 1, 0],
    "input only (frozen layer)": [1, 0, 0, 0, 0, 0, 0, 0],
    "states and w_hh": [0, 1, 1, 0, 1, 0, 0, 0],
    "biases and w_ih": [0, 0, 0, 1, 0, 1, 1, 0],
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("pattern", NEEDS_PATTERNS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_layer_backward_computes_only_the_gradients_asked_for(backend, pattern, mode):
    """What needs leaves out comes back as [0] (its product skipped), and what it asks for
    equals the gradient of a backward that computes everything."""
    usable = {"cpu": HAS_C, "triton": HAS_TRITON, "reference": True}
    if not usable[backend]:
        pytest.skip(f"{backend} backend not usable here")
    dtype = torch.float32 if backend == "triton" else torch.float64
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    gen = torch.Generator().manual_seed(7)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=dtype).to(DEVICE)

    T, B, I, H = 5, 3, 4, 6
    c0 = randn(B, H) if mode == "LSTM" else None
    args = (mode, randn(T, B, I), None, randn(B, H), c0, randn(G * H, I), randn(G * H, H),
            randn(G * H), randn(G * H), False)
    grads = (randn(T, B, H), randn(B, H), randn(B, H) if mode == "LSTM" else None)
    needs = [bool(n) for n in NEEDS_PATTERNS[pattern]]
    with seqkern.backend(backend):
        workspace = seqkern.ops.rnn_layer.rnn_layer_fwd(*args, True)[3]
        everything = seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, [True] * 8)
        asked = seqkern.ops.rnn_layer.rnn_layer_bwd(*args, workspace, *grads, needs)
    for name, want, full, got in zip(seqkern.ops.rnn_layer.GRAD_NAMES, needs, everything, asked):
        if not want or full.numel() == 0:  # not asked for, or not applicable (d_c0 of GRU)
            assert got.numel() == 0, f"{name} was not asked for but came back {got.shape}"
        else:
            assert_close(f"{mode} {pattern} {name}", got, full)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_expanded_output_gradient_is_read_through_its_strides(cls):
    """out.sum()'s gradient is one value expanded (all strides 0); a transposed one has a
    column stride: the C++ backward reads both in place."""
    ours, theirs = _pair(cls, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)
    for make_loss in (lambda out: out.sum(),
                      lambda out: (out * torch.randn(4, 2, 5, dtype=torch.float64,
                                                     device=DEVICE).permute(2, 1, 0)).sum()):
        torch.manual_seed(1)
        got = torch.autograd.grad(make_loss(ours(x)[0]), list(ours.parameters()))
        torch.manual_seed(1)
        want = torch.autograd.grad(make_loss(theirs(x)[0]), list(theirs.parameters()))
        for (name, _), g, w in zip(ours.named_parameters(), got, want):
            assert_close(f"{cls} d{name}", g, w)


def _relative_ulps(y, ref):
    """Largest error of y against the float64 ref in float32 ulps (relative, normal range)."""
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    return ((y - ref).abs()[normal] / ref.abs()[normal]).max().item() / 2.0**-24


def check_cpu_float32_activations():
    """The C++ cells' float32 tanh and sigmoid (an inlined exp, tanh through exp(-2|x|) and a
    series near 0: csrc/cpu/rnn_pointwise_impl.h) against float64 torch, through one-step
    layers whose 32 units all see x (the vector path, H >= 16): at most 4 ulps relative,
    including 1e-30 (where (1 - t) / (1 + t) alone loses every digit) and the ends of exp's
    range; +-1 / 0 and 1 at +-inf and beyond; NaN at NaN."""
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.logspace(-30, 2, 4001),
                   -torch.logspace(-30, 2, 4001),
                   torch.tensor([0.0, -0.0, 0.25, -0.25, 0.2499999, 87.5, -87.5, 88.5, -88.5,
                                 89.0, -89.0, 104.0, -104.0, 1e30, -1e30, float("nan")])])
    rnn = seqkern.RNN(1, 32, bias=False)
    lstm = seqkern.LSTM(1, 32)  # c_n = sigmoid(x) * tanh(20) + sigmoid(-1000) * 0
    with torch.no_grad(), seqkern.backend("cpu"):
        rnn.weight_ih_l0.fill_(1.0)
        rnn.weight_hh_l0.fill_(0.0)
        tanh = rnn(x.view(1, -1, 1))[0][0].double()  # [rows, 32]
        for p in lstm.parameters():
            p.zero_()
        lstm.weight_ih_l0[:32] = 1.0
        lstm.bias_ih_l0[32:64] = -1000.0
        lstm.bias_ih_l0[64:96] = 20.0
        sigmoid = lstm(x.view(1, -1, 1))[1][1][0].double()
    for name, y, fn in (("tanh", tanh, torch.tanh), ("sigmoid", sigmoid, torch.sigmoid)):
        ref = fn(x.double())[:, None].expand_as(y)
        assert torch.isnan(y[-1]).all(), name
        ulps = _relative_ulps(y[:-1], ref[:-1])
        assert ulps <= 4, f"{name}: {ulps:.2f} ulps"
        tiny = ref[:-1].abs() < torch.finfo(torch.float32).tiny  # subnormal answers
        assert (y[:-1] - ref[:-1]).abs()[tiny].max().item() <= 1e-38, name
    assert (tanh[-3] == 1).all() and (tanh[-2] == -1).all()
    assert (sigmoid[-3] == 1).all() and (sigmoid[-2] == 0).all()


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_cpu_float32_activations_within_four_ulps():
    check_cpu_float32_activations()


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_float32_activations_for_every_capability(capability):
    code = """
import torch, seqkern
from tests.test_rnn_layers import check_cpu_float32_activations
check_cpu_float32_activations()
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


# (name, hidden size, batch, packed, bidirectional, output gradient): float32, whole panels of
# 64 units and under 16 rows a thread, so that on the two threads these tests run with the C++
# layer splits the hidden units over a team (csrc/cpu/rnn_layer_team.h: it needs a panel per
# thread); H = 192 gives the threads 64 and 128 units.
TEAM_CASES = {case[0]: case for case in [
    ("padded", 128, 5, False, False, "weighted"),
    ("one-row", 128, 1, False, False, "weighted"),
    ("packed-bidirectional", 192, 7, True, True, "weighted"),
    ("expanded-gradient", 128, 3, False, True, "sum"),
    ("row-split", 128, 33, True, False, "weighted")]}  # 33 rows: the other loop, same checks
TEAM_THREADS = 2


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("case", TEAM_CASES)
@pytest.mark.parametrize("cls,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}),
                                    ("RNN", {"nonlinearity": "relu"})],
                         ids=["LSTM", "GRU", "RNN", "RNN_RELU"])
def test_cpu_float32_team_time_loop_matches_float64(case, cls, kw):
    """float32 forward and every gradient (input, h0/c0, weights) against torch's module in
    float64, initial states given, 9 steps (packed: unsorted lengths 1 .. 9, so rows end and,
    in the reverse direction, start at different steps). Run on TEAM_THREADS threads whatever
    the machine has, so that the team loop is the one tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEAM_THREADS)
    try:
        _check_float32_layer_against_float64(TEAM_CASES[case], cls, kw)
    finally:
        torch.set_num_threads(threads)


def _check_float32_layer_against_float64(case, cls, kw):
    _, H, B, packed, bidirectional, grad = case
    torch.manual_seed(B * H)
    ours = getattr(seqkern, cls)(24, H, bidirectional=bidirectional, device="cpu", **kw)
    theirs = getattr(torch.nn, cls)(24, H, bidirectional=bidirectional, device="cpu",
                                    dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    dirs = 2 if bidirectional else 1
    x = torch.randn(9, B, 24)
    states = [torch.randn(dirs, B, H) * 0.5 for _ in range(2 if cls == "LSTM" else 1)]
    lengths = torch.randint(1, 10, (B,)) if packed else None
    if packed:
        lengths[0] = 9

    def run(module, dtype):
        xs = x.to(dtype).requires_grad_(True)
        hs = [s.to(dtype).requires_grad_(True) for s in states]
        inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs
        out, hn = module(inp, tuple(hs) if cls == "LSTM" else hs[0])
        out = out.data if packed else out
        finals = list(hn) if cls == "LSTM" else [hn]
        gen = torch.Generator().manual_seed(1)
        if grad == "sum":
            loss = out.sum()
        else:
            loss = (out * torch.randn(out.shape, generator=gen).to(dtype)).sum()
        loss = loss + sum((f * torch.randn(f.shape, generator=gen).to(dtype)).sum()
                          for f in finals)
        grads = torch.autograd.grad(loss, [xs, *hs, *module.parameters()])
        return [out, *finals, *grads]

    with seqkern.backend("cpu"):
        got = run(ours, torch.float32)
    want = run(theirs, torch.float64)
    names = ["out", "h_n", "c_n"][:1 + len(states)] + ["dx", "dh0", "dc0"][:1 + len(states)]
    names += [f"d{n}" for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_close(f"{cls} {name}", a, b)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_float32_layers_for_every_capability(capability):
    """The float32 layer (team and row-split loops, weight panels and transposes, activations)
    under the kernels compiled for each instruction set."""
    code = """
import torch, seqkern
from tests.test_rnn_layers import test_cpu_float32_team_time_loop_matches_float64 as check
for case in ("packed-bidirectional", "row-split"):
    for cls in ("LSTM", "GRU", "RNN"):
        check(case, cls, {})
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("which", ["output", "input gradient"])
def test_cpu_layer_outputs_resize_like_torchs(which):
    """The C++ layer's output and input gradient live in seqkern's cached blocks
    (csrc/cpu/buffer_cache.cpp, over 1 MB each here); like torch's they can still grow in
    place."""
    lstm = seqkern.LSTM(512, 512)
    x = torch.randn(20, 32, 512, requires_grad=True)
    with seqkern.backend("cpu"):
        out, _ = lstm(x)
        out.sum().backward()
    t = out.detach() if which == "output" else x.grad
    kept = t.clone()
    t.resize_(2 * t.shape[0], *t.shape[1:])
    assert torch.equal(t[: kept.shape[0]], kept)
