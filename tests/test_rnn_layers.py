"""seqkern.LSTM / GRU / RNN against torch.nn's modules with the same weights: parity over
every option, torch's semantics and errors."""
import contextlib
import random

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from tests.attention_cases import DEVICE, skip_unless_usable
from tests.rnn_layer_cases import (HAS_C, HAS_CUDA, HAS_TRITON, check_against_torch,
                                   flatten_outputs, module_pair)
from tests.tolerances import FWD_FACTOR, assert_close, assert_close_relative
from tests.weight_changes import change_weights


def _random_config(rng, projections=True):
    cls = rng.choice(["LSTM", "GRU", "RNN"])
    kw = dict(input_size=rng.choice([1, 3, 7]), hidden_size=rng.choice([1, 5, 8]),
              num_layers=rng.choice([1, 2, 3]), bias=rng.random() < 0.7,
              batch_first=rng.random() < 0.5, bidirectional=rng.random() < 0.5)
    if cls == "RNN":
        kw["nonlinearity"] = rng.choice(["tanh", "relu"])
    if cls == "LSTM" and rng.random() < 0.25 and projections:
        kw["proj_size"] = rng.randint(1, kw["hidden_size"] - 1) if kw["hidden_size"] > 1 else 0
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


GRID = [pytest.param(backend, seed, torch.float64, id=f"{backend}-{seed}")
        for backend in ("cpu", "reference") for seed in range(24)] + [
    pytest.param(backend, seed, torch.float32, id=f"{backend}-{seed}")
    for backend in ("triton", "cuda") for seed in range(10)] + [
    # bf16 by the relative rule against torch's own bf16 module: the CPU's bf16 products, the
    # Triton layers (on a GPU the path of LSTM projections), the cuda defaults (tensor-core
    # blocks at B >= 4), its tensor-core blocks at every batch (cuda-mma:
    # SEQKERN_CUDA_RNN_MMA=1) and its CUDA-core blocks at every batch (cuda-cores: =0)
    pytest.param(backend, seed, torch.bfloat16, id=f"{backend}-bf16-{seed}")
    for backend, seeds in (("cpu", 6), ("triton", 6), ("cuda", 10), ("cuda-mma", 10),
                           ("cuda-cores", 6))
    for seed in range(seeds)]


@pytest.mark.parametrize("backend, seed, dtype", GRID)
def test_randomized_parity_with_torch(monkeypatch, backend, seed, dtype):
    """seqkern's module (in dtype, on backend) against torch's in float64."""
    if backend in ("cuda-mma", "cuda-cores"):
        monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1" if backend == "cuda-mma" else "0")
        backend = "cuda"
    usable = {"cpu": HAS_C, "triton": HAS_TRITON, "cuda": HAS_CUDA, "reference": True}
    if not usable[backend]:
        pytest.skip(f"{backend} backend not usable here")
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the modules' initial weights: the same case whatever ran before
    # LSTM projections run on cpu and triton (cuda refuses them: on a GPU they go to triton,
    # in every dtype); not drawn for cpu in bf16 (its bf16 products skip projections).
    cls, kw, form, T, B, given_h0 = _random_config(
        rng, backend == "triton" or (backend in ("cpu", "reference") and
                                     dtype != torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = module_pair(cls, **kw)
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
        return flatten_outputs(module(inp, h))

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
    check_against_torch(f"{cls} {kw} {form} frozen {sorted(frozen)}", ours, theirs, call,
                         leaves, backend, dtype)


@pytest.mark.parametrize("form, dtype", [("padded", torch.float32),
                                         ("packed_unsorted", torch.float32),
                                         ("padded", torch.bfloat16)])
def test_triton_projection_parity_over_several_tiles(form, dtype):
    """LSTM proj_size on triton (on a GPU the layers with a projection run there): batch,
    hidden units and state columns each over two tiles of 16, two bidirectional layers, every
    gradient, against torch's float64 module (bf16: by the relative rule, torch's bf16
    module the peer)."""
    if not HAS_TRITON:
        pytest.skip("triton backend not usable here")
    kw = dict(input_size=5, hidden_size=20, num_layers=2, bidirectional=True, proj_size=17)
    ours, theirs = module_pair("LSTM", **kw)
    ours.to(dtype)
    gen = torch.Generator().manual_seed(11)
    T, B = 5, 18
    x, hx = _make_input("LSTM", dict(kw, batch_first=False), "padded", T, B, True, gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen, device="cpu")
    lengths[3] = T

    def call(module, leaves):
        inp = leaves[0]
        if form == "packed_unsorted":
            inp = pack_padded_sequence(inp, lengths, enforce_sorted=False)
        return flatten_outputs(module(inp, tuple(leaves[1:])))

    leaves = [t.clone().requires_grad_(True) for t in (x, *hx)]
    check_against_torch(f"LSTM {kw} {form}", ours, theirs, call, leaves, "triton", dtype)
    if dtype != torch.float32:
        return
    with torch.no_grad(), seqkern.backend("triton"):  # inference: h_full by batch row
        got = call(ours, [t.float() for t in (x, *hx)])
    for i, (g, w) in enumerate(zip(got, call(theirs, [x, *hx]))):
        assert_close(f"LSTM {kw} {form} no_grad output[{i}]", g, w)


@pytest.mark.parametrize("backend, dtype, form", [
    ("cpu", torch.float64, "padded"), ("cpu", torch.float64, "packed_unsorted"),
    ("triton", torch.float32, "packed_unsorted"), ("cpu", torch.bfloat16, "padded"),
    ("cuda", torch.float32, "packed_unsorted"), ("cuda", torch.bfloat16, "padded")])
def test_projection_via_plain_layer_matches_torch(monkeypatch, backend, dtype, form):
    """SEQKERN_RNN_PROJ_VIA_PLAIN=1: an LSTM with a projection as a plain layer of hidden
    size H (W_hh W_hr as its recurrent weight, h0 through the input; seqkern/nn/projection.py),
    which the CUDA kernel runs though it has no projection step. Bidirectional (the reverse
    direction injects h0 at each packed sequence's own last step), batch_first, every
    gradient; bf16 by the relative rule against torch's bf16 module."""
    skip_unless_usable(backend)
    monkeypatch.setenv("SEQKERN_RNN_PROJ_VIA_PLAIN", "1")
    import seqkern.nn.rnn as rnn_module
    taken = []
    plain = rnn_module.lstm_projection_via_plain_layer
    monkeypatch.setattr(rnn_module, "lstm_projection_via_plain_layer",
                        lambda *a: taken.append(1) or plain(*a))
    kw = dict(input_size=5, hidden_size=12, num_layers=2, bidirectional=True, proj_size=7,
              batch_first=True)
    ours, theirs = module_pair("LSTM", **kw)
    ours.to(dtype)
    gen = torch.Generator().manual_seed(5)
    T, B = 6, 4
    x, hx = _make_input("LSTM", kw, "padded", T, B, True, gen)
    lengths = torch.tensor([3, 6, 1, 5], device="cpu")

    def call(module, leaves):
        inp = leaves[0]
        if form == "packed_unsorted":
            inp = pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
        return flatten_outputs(module(inp, tuple(leaves[1:])))

    leaves = [t.clone().requires_grad_(True) for t in (x, *hx)]
    check_against_torch(f"LSTM {kw} {form} via a plain layer", ours, theirs, call, leaves,
                        backend, dtype)
    assert taken, "the plain-layer path did not run"
    if dtype == torch.bfloat16:
        return
    with torch.no_grad(), seqkern.backend(backend):  # inference: no workspace
        got = call(ours, [t.to(dtype) for t in (x, *hx)])
    for i, (g, w) in enumerate(zip(got, call(theirs, [x, *hx]))):
        assert_close(f"LSTM {kw} {form} via a plain layer, no_grad output[{i}]", g, w)


@pytest.mark.parametrize("backend, cls", [(None, "LSTM"), (None, "GRU"), (None, "RNN"),
                                          ("triton", "LSTM")])  # interpreted: ~25 s
def test_long_sequence_stays_finite_and_matches(backend, cls):
    """T = 1000, forward and backward through all of it, float32 against float64."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton backend not usable here")
    ours, theirs = module_pair(cls, dtype=torch.float32, input_size=8, hidden_size=16)
    theirs.double()  # the float64 reference, same weights
    x = torch.randn(1000, 2, 8, device=DEVICE)
    xa, xb = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    with seqkern.backend(backend) if backend else contextlib.nullcontext():
        a = flatten_outputs(ours(xa))
        g_ours = torch.autograd.grad(a[0].sum(), [xa, *ours.parameters()])
    b = flatten_outputs(theirs(xb))
    g_theirs = torch.autograd.grad(b[0].sum(), [xb, *theirs.parameters()])
    for i, (g, w) in enumerate(zip(a, b)):
        assert torch.isfinite(g).all()
        assert_close(f"{cls} T=1000 output[{i}]", g, w)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, g_ours, g_theirs):
        assert torch.isfinite(g).all()
        assert_close(f"{cls} T=1000 d{name}", g, w)


@pytest.mark.parametrize("steps,bf16_products", [(12, True), (2, True), (2, False)],
                         ids=["packed", "as-given", "as-given-fp32-products"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_low_precision_relative_rule(cls, dtype, steps, bf16_products, monkeypatch):
    """The C++ layer's dtypes: 36 rows pack the weights; 6 rows multiply them as given, fp16
    and bf16 ones in their own dtype (converted as loaded, rnn_layer_plan.cpp), bf16 on bf16
    products where the CPU has them or on fp32 products (SEQKERN_CPU_BF16_PRODUCTS=0)."""
    if not HAS_C:
        pytest.skip("no _C")
    if not bf16_products:
        monkeypatch.setenv("SEQKERN_CPU_BF16_PRODUCTS", "0")
    ours, theirs = module_pair(cls, dtype=torch.float64, input_size=17, hidden_size=33)
    x = torch.randn(steps, 3, 17, dtype=torch.float64)
    want = flatten_outputs(theirs(x))
    peer = flatten_outputs(theirs.to(dtype)(x.to(dtype)))
    got = flatten_outputs(ours.to(dtype)(x.to(dtype)))
    for i, (g, w, p) in enumerate(zip(got, want, peer)):
        assert g.dtype == dtype
        if dtype == torch.float32:
            assert_close(f"out[{i}]", g, w)
        else:
            assert_close_relative(f"out[{i}]", g, w, p, FWD_FACTOR)


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
    ours, theirs = module_pair("GRU", input_size=3, hidden_size=4)
    params = {n: torch.randn_like(p) for n, p in ours.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    a = torch.func.functional_call(ours, params, (x,))
    b = torch.func.functional_call(theirs, params, (x,))
    assert_close("output", a[0], b[0])


def test_weights_read_where_getattr_finds_them():
    """The modules read their weights from _parameters where getattr would find them there,
    else through getattr (seqkern/nn/weights.py): a parametrized weight
    (torch.nn.utils.parametrize: a property of a subclass, the name out of _parameters), a
    weight replaced by a plain tensor (an instance attribute) and a subclass of seqkern's
    class give torch's results, forward and gradients."""
    class Sub(seqkern.LSTM):
        pass

    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for make in ("parametrized", "plain tensor", "subclass"):
        ours, theirs = module_pair("LSTM", input_size=3, hidden_size=4, num_layers=2)
        if make == "subclass":
            sub = Sub(3, 4, num_layers=2, dtype=torch.float64)
            sub.load_state_dict(ours.state_dict())
            ours = sub
        for m in (ours, theirs):
            change_weights(m, make, "weight_hh_l1", "weight_ih_l1")
        outs = [m(x)[0] for m in (ours, theirs)]
        assert_close(f"{make} output", outs[0], outs[1])
        grads = [torch.autograd.grad(o.sum(), [p for p in m.parameters()])
                 for o, m in zip(outs, (ours, theirs))]
        for a, b in zip(*grads, strict=True):
            assert_close(f"{make} gradient", a, b)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_dropout_between_layers_only_in_training(cls):
    ours, theirs = module_pair(cls, input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
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


def test_lstm_needs_two_hidden_states_like_torch():
    ours, theirs = seqkern.LSTM(3, 4), torch.nn.LSTM(3, 4)
    h, x = torch.randn(1, 2, 4), torch.randn(5, 2, 3)
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match="lstm expects two hidden states"):
            module(x, (h, h, h))
        with pytest.raises(IndexError):  # torch's own dims check reads hx[1]
            module(x, (h,))


@pytest.mark.parametrize("case", ["packed-input", "one-weight"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_weights_of_another_dtype_raise_like_torch(cls, case):
    """A packed LSTM's input of another dtype (torch checks every other input's dtype in
    check_forward_args, not this one) and a module holding one weight of another dtype:
    torch's products fail, seqkern's kernels took them (converting) silently."""
    ours, theirs = getattr(seqkern, cls)(3, 4), getattr(torch.nn, cls)(3, 4)
    x = torch.randn(5, 2, 3)
    if case == "packed-input":
        if cls != "LSTM":
            pytest.skip("torch's check_forward_args raises ValueError for the others, tested")
        x = pack_padded_sequence(x.double(), torch.tensor([5, 3], device="cpu"))
    else:
        for module in (ours, theirs):
            module.weight_hh_l0.data = module.weight_hh_l0.data.double()
    with pytest.raises(RuntimeError):  # in a product, or oneDNN's "unsupported data type"
        theirs(x)
    with pytest.raises(RuntimeError, match="every weight must have the input's dtype"):
        ours(x)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_hidden_state_of_another_dtype_raises_like_torch(cls):
    ours, theirs = getattr(seqkern, cls)(3, 4), getattr(torch.nn, cls)(3, 4)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    hx = (h, h) if cls == "LSTM" else h
    with pytest.raises(RuntimeError):
        theirs(torch.randn(5, 2, 3), hx)
    with pytest.raises(RuntimeError, match="not the same dtype"):
        ours(torch.randn(5, 2, 3), hx)


def test_packed_output_unpacks_like_torch():
    ours, theirs = module_pair("LSTM", input_size=3, hidden_size=4, bidirectional=True)
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
    ours, theirs = module_pair(cls, dtype=torch.float64, input_size=64, hidden_size=128)
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


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend not usable here")
@pytest.mark.parametrize("cls, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
def test_triton_layers_over_several_program_tiles(cls, kw):
    """Triton's steps run as a grid of (16-row, 16-unit) programs: B = 37 and H = 40 make 3 x 3
    of them, each reading the state the others wrote at the step before (the randomized grid
    stays within one tile). Packed unsorted, both directions, float32 against float64."""
    ours, theirs = module_pair(cls, input_size=6, hidden_size=40, bidirectional=True, **kw)
    ours.float()
    gen = torch.Generator().manual_seed(3)  # a CPU generator: draws on the CPU, then moved
    x = torch.randn(7, 37, 6, dtype=torch.float64, generator=gen, device="cpu").to(DEVICE)
    lengths = torch.randint(1, 8, (37,), generator=gen, device="cpu")
    lengths[5] = 7
    h0 = torch.randn(2, 37, 40, dtype=torch.float64, generator=gen, device="cpu").to(DEVICE)
    hx = (h0, torch.randn_like(h0)) if cls == "LSTM" else h0

    def call(module, leaves):
        h = tuple(leaves[1:]) if cls == "LSTM" else leaves[1]
        packed = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False)
        return flatten_outputs(module(packed, h))

    leaves = [t.requires_grad_(True) for t in (x, *(hx if isinstance(hx, tuple) else (hx,)))]
    check_against_torch(cls, ours.float(), theirs, call, leaves, "triton", torch.float32)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("used", ["h_n", "c_n", "output"])
def test_gradients_when_only_some_outputs_are_used(cls, used):
    """Unused outputs reach the backward as None, not as zero tensors (no materialisation)."""
    if cls == "GRU" and used == "c_n":
        pytest.skip("GRU has no c_n")
    ours, theirs = module_pair(cls, input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
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


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_expanded_output_gradient_is_read_through_its_strides(cls):
    """out.sum()'s gradient is one value expanded (all strides 0); a transposed one has a
    column stride: the C++ backward reads both in place."""
    ours, theirs = module_pair(cls, input_size=3, hidden_size=4, num_layers=2)
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


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("cls, batch_first", [("LSTM", False), ("GRU", True), ("RNN", False)])
def test_outputs_can_be_modified_in_place(cls, batch_first, backend):
    """`out.mul_(2)` / `relu_(h_n)` on the outputs, as torch's modules allow: the layer op
    returned its output as a view of the kernel's [N, H] rows, and autograd refuses in-place
    ops on views made inside a custom op. Gradients then flow as torch's (float64; the
    Triton layers in float32)."""
    skip_unless_usable(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    theirs = getattr(torch.nn, cls)(3, 4, batch_first=batch_first, dtype=torch.float64,
                                    device=DEVICE)
    ours = getattr(seqkern, cls)(3, 4, batch_first=batch_first, dtype=dtype, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)
    grads = []
    # torch's cuDNN layers refuse in-place changes to their outputs (CudnnRnnBackward0 saves
    # them): on a GPU the peer is torch's own CUDA path, which allows them as on the CPU.
    for module, forced in ((ours, seqkern.backend(backend)),
                           (theirs, torch.backends.cudnn.flags(enabled=False))):
        with forced:
            out, hidden = module(x.to(next(module.parameters()).dtype))
            h_n = hidden[0] if cls == "LSTM" else hidden
            out.mul_(2).add_(1)
            torch.relu_(h_n)
            grads.append(torch.autograd.grad((out.sin().sum() + h_n.sum()),
                                             list(module.parameters())))
    for (name, _), g, w in zip(ours.named_parameters(), *grads):
        assert_close(f"{cls} d{name}", g, w)


@pytest.mark.parametrize("make", [lambda: torch.nn.Sequential(seqkern.LSTM(3, 4)),
                                  lambda: seqkern.GRUCell(3, 4),
                                  lambda: seqkern.MultiheadAttention(8, 2)],
                         ids=["LSTM-in-Sequential", "GRUCell", "MultiheadAttention"])
def test_torchscript_raises_clearly(make):
    """torch.jit.script failed deep in TorchScript's compiler; now a RuntimeError that says
    what works instead (the ops cannot be called from TorchScript)."""
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(make())


def test_torch_export_matches_eager():
    """What the TorchScript error recommends: torch.export of a model with seqkern's layer."""
    model = seqkern.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64,
                         device=DEVICE)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)
    exported = torch.export.export(model, (x,))
    for got, want in zip(flatten_outputs(exported.module()(x)), flatten_outputs(model(x))):
        assert_close("exported", got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("kind", ["RNN", "RNNCell"])
def test_relu_keeps_nan_and_passes_its_gradient_like_torch(kind, backend):
    """A NaN input: torch's relu keeps NaN (the Triton kernels' tl.maximum and the CUDA
    kernel's fmaxf returned 0 there, and later steps went on from made-up numbers) and its
    backward passes the gradient where the output is NaN (NaN <= 0 is false; the kernels'
    out > 0 test zeroed it)."""
    skip_unless_usable(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    theirs = getattr(torch.nn, kind)(3, 4, nonlinearity="relu", dtype=torch.float64,
                                     device=DEVICE)
    ours = getattr(seqkern, kind)(3, 4, nonlinearity="relu", dtype=dtype, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, device=DEVICE)
    x[0, 0, 0] = float("nan")
    if kind == "RNNCell":
        x, h0 = x[0], h0[0]
    results = []
    for module, forced in ((ours, seqkern.backend(backend)), (theirs, contextlib.nullcontext())):
        h = h0.to(next(module.parameters()).dtype).requires_grad_()
        with forced:
            out = module(x.to(h.dtype), h)
            out = out[0] if kind == "RNN" else out
            results.append((out, torch.autograd.grad(out.sum(), h)[0]))
    (out, dh), (want, want_dh) = results
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
    assert_close("output", out.nan_to_num(7.0), want.nan_to_num(7.0))
    assert_close("dh0", dh, want_dh)
