"""torch.func transforms and forward-mode AD through seqkern's modules and functions
(seqkern/transforms.py): they run the reference there, and match torch's modules (float64).
Before, torch.func.grad raised inside the custom ops and torch.func.jvp returned zero
tangents through them, silently."""
import types

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqkern
from seqkern import transforms
from tests.attention_cases import DEVICE
from tests.tolerances import assert_close

F64 = torch.float64
LAYERS = {
    "LSTM-2bi": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "LSTM-proj": ("LSTM", dict(proj_size=2)),
    "GRU": ("GRU", dict(batch_first=True)),
    "RNN-relu": ("RNN", dict(nonlinearity="relu")),
}


def _to(value, device):
    """value (a tensor, PackedSequence or tuple/list of them) moved to device, differentiably."""
    if isinstance(value, (torch.Tensor, PackedSequence)):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


class _OnCPU(torch.nn.Module):
    """torch's module run on the CPU, called with and returning DEVICE tensors: on a GPU
    torch's cuDNN layers have no double backward (jvp through autograd.functional, jacobian)
    and its fused CUDA cells no forward AD, so there the peer is torch's CPU path."""

    def __init__(self, module):
        super().__init__()
        self.module = module.cpu()

    def forward(self, *args, **kwargs):
        return _to(self.module(*_to(args, "cpu"), **{k: _to(v, "cpu") for k, v in
                                                       kwargs.items()}), DEVICE)


def _pair(cls, *args, **kw):
    theirs = getattr(torch.nn, cls)(*args, dtype=F64, device="cpu", **kw)
    ours = getattr(seqkern, cls)(*args, dtype=F64, device=DEVICE, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, _OnCPU(theirs)


def _randn(*shape):
    return torch.randn(*shape, dtype=F64, device=DEVICE)


def _layer_out(packed):
    """run(module, x) -> output; packed: x [T, 3, I] as a packed sequence's data, packed
    outside the transform (torch's pack_padded_sequence has no forward AD)."""
    lengths = torch.tensor([4, 2, 3], device="cpu")
    layout = pack_padded_sequence(_randn(4, 3, 1), lengths, enforce_sorted=False)

    def run(module, x):
        if packed:
            data = x.transpose(0, 1)[layout.unsorted_indices.argsort()].transpose(0, 1)
            data = torch.cat([data[t, :int(n)] for t, n in enumerate(layout.batch_sizes)])
            return module(layout._replace(data=data))[0].data
        return module(x)[0]
    return run


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", LAYERS)
def test_layer_transforms_match_torch(config, packed):
    cls, kw = LAYERS[config]
    if packed and kw.get("batch_first"):
        pytest.skip("packed input has no batch_first")
    ours, theirs = _pair(cls, 3, 5, **kw)
    run = _layer_out(packed)
    x, v = _randn(4, 3, 3), _randn(4, 3, 3)
    # torch's packed layers fail under torch.func ("Cannot access data pointer"): its side
    # runs torch.autograd.functional (plain autograd, double backward for the jvp).
    def last(m):
        return lambda a: run(m, a)[-1].sum(-1)

    assert_close(f"{config} jvp", torch.func.jvp(lambda a: run(ours, a), (x,), (v,))[1],
                 torch.autograd.functional.jvp(lambda a: run(theirs, a), x, v)[1])
    assert_close(f"{config} grad", torch.func.grad(lambda a: run(ours, a).sin().sum())(x),
                 torch.autograd.functional.vjp(lambda a: run(theirs, a).sin().sum(), x)[1])
    assert_close(f"{config} jacrev", torch.func.jacrev(last(ours))(x),
                 torch.autograd.functional.jacobian(last(theirs), x))
    params = dict(ours.named_parameters())
    got = torch.func.grad(
        lambda p: torch.func.functional_call(ours, p, (x,))[0].pow(2).sum())(params)
    want = torch.autograd.grad(theirs(x)[0].pow(2).sum(), list(theirs.parameters()))
    for (name, _), w in zip(ours.named_parameters(), want):
        assert_close(f"{config} grad d{name}", got[name], w.to(DEVICE))


@pytest.mark.parametrize("config", ["LSTM-2bi", "GRU"])
def test_layer_vmap_and_forward_ad_match_torch(config):
    """vmap (torch's own layers have no batching rule: compared with a loop) and
    torch.autograd.forward_ad (seqkern's ops raised NotImplementedError there)."""
    cls, kw = LAYERS[config]
    ours, theirs = _pair(cls, 3, 5, **kw)
    xs = _randn(2, 4, 3, 3)
    got = torch.func.vmap(lambda a: ours(a)[0])(xs)
    assert_close(f"{config} vmap", got, torch.stack([theirs(a)[0] for a in xs]))
    x, v = xs[0], xs[1]
    tangents = []
    for m in (ours, theirs):
        with forward_ad.dual_level():
            tangents.append(forward_ad.unpack_dual(m(forward_ad.make_dual(x, v))[0]).tangent)
    assert_close(f"{config} forward AD", *tangents)


@pytest.mark.parametrize("cls, kw", [("LSTMCell", {}), ("GRUCell", {}),
                                     ("RNNCell", dict(nonlinearity="relu"))])
def test_cell_transforms_match_torch(cls, kw):
    ours, theirs = _pair(cls, 3, 5, **kw)
    x, v = _randn(2, 3), _randn(2, 3)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    for name, transform in (
            ("jvp", lambda m: torch.func.jvp(lambda a: first(m(a)), (x,), (v,))[1]),
            ("grad", lambda m: torch.func.grad(lambda a: first(m(a)).sin().sum())(x)),
            ("vmap", lambda m: torch.func.vmap(lambda a: first(m(a)))(x) if m is ours
             else torch.stack([first(m(a)) for a in x]))):  # torch's lstm_cell: no vmap
        assert_close(f"{cls} {name}", transform(ours), transform(theirs))


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_transforms_match_torch(need_weights):
    ours, theirs = _pair("MultiheadAttention", 8, 2)
    q, v = _randn(5, 2, 8), _randn(5, 2, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    pad[1, 3:] = True

    def run(m, a):
        # torch without weights runs its fused kernel, which has no forward AD: its peer
        # returns them (the math path) and they are left out.
        out, weights = m(a, a, a, key_padding_mask=pad, need_weights=need_weights or
                         m is theirs)
        return out + weights.sum() if need_weights else out

    for name, transform in (
            ("jvp", lambda m: torch.func.jvp(lambda a: run(m, a), (q,), (v,))[1]),
            ("grad", lambda m: torch.func.grad(lambda a: run(m, a).sin().sum())(q))):
        assert_close(f"mha {name}", transform(ours), transform(theirs))


def test_attention_function_jvp_matches_the_math():
    """torch's fused sdpa refuses jvp: against the same attention in plain torch ops."""
    q, k, val = _randn(2, 3, 5, 4), _randn(2, 3, 6, 4), _randn(2, 3, 6, 4)
    tangents = (_randn(2, 3, 5, 4), _randn(2, 3, 6, 4), _randn(2, 3, 6, 4))
    mask = torch.rand(5, 6, device=DEVICE) > 0.3
    mask[:, 0] = True

    def math(a, b, c):
        scores = (a @ b.transpose(-1, -2)) / 2.0
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ c

    def ours(a, b, c):
        return seqkern.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask)

    got = torch.func.jvp(ours, (q, k, val), tangents)
    want = torch.func.jvp(math, (q, k, val), tangents)
    assert_close("out", got[0], want[0])
    assert_close("tangent", got[1], want[1])


def test_ops_run_outside_transforms(monkeypatch):
    """Outside transforms the modules call the ops, not the reference."""
    assert not transforms.active()

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran outside a transform")

    # The names the transform routes call (on a GPU float64 attention has no compiled
    # kernel: the op's own reference backend may run, outside any transform).
    monkeypatch.setattr("seqkern.nn.rnn.reference_forward", refuse)
    monkeypatch.setattr("seqkern.functional.reference",
                        types.SimpleNamespace(attention=refuse,
                                              keep_mask_for=seqkern.reference.keep_mask_for))
    seqkern.LSTM(3, 5, dtype=F64, device=DEVICE)(_randn(4, 2, 3))[0].sum().backward()
    q = _randn(1, 2, 3, 4)
    seqkern.functional.scaled_dot_product_attention(q, q, q)
    with pytest.raises(AssertionError, match="outside a transform"):
        torch.func.grad(lambda a: seqkern.functional.scaled_dot_product_attention(
            a, a, a).sum())(q)


def _layer_op(gru):
    """a -> the layer op's output on a one-layer GRU's weights (detached) with a zero h0 of
    batch 2, the op called directly."""
    from seqkern.ops.rnn_layer import rnn_layer_fwd
    weights = [w.detach() for w in gru._flat_weights]
    h0 = torch.zeros(2, gru.hidden_size, dtype=F64, device=DEVICE)
    return lambda a: rnn_layer_fwd("GRU", a, None, h0, None, *weights, False, False)[0]


def test_forward_ad_through_the_ops_raises():
    """Where forward-mode AD reaches an op (it has no forward rule: torch gave its outputs zero
    tangents, silently), the op raises. Inside a torch.compile'd function the modules cannot
    tell a user's transform from dynamo's levels and call the ops: there torch.func.jvp
    returned zero tangents before (seqkern/transforms.py); and an op called directly under
    jvp or a dual level."""
    ours, theirs = _pair("GRU", 3, 5)
    x, v = _randn(4, 2, 3), _randn(4, 2, 3)

    def jvp(m):
        return torch.func.jvp(lambda a: m(a)[0], (x,), (v,))[1]

    assert_close("eager jvp", jvp(ours), jvp(theirs))  # the reference runs: right
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="seqkern::rnn_layer_fwd has no forward-mode AD"):
        torch.compile(jvp, backend="aot_eager")(ours)
    torch._dynamo.reset()

    op = _layer_op(ours)
    with pytest.raises(RuntimeError, match="no forward-mode AD"):
        torch.func.jvp(op, (x,), (v,))
    with pytest.raises(RuntimeError, match="no forward-mode AD"):
        torch.func.jacfwd(op)(x)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode AD"):
        op(forward_ad.make_dual(x, v))
    assert op(x).shape == (4, 2, 5)  # outside them the op runs


def test_grad_through_the_ops_raises_seqkern_error():
    """torch.func.grad reaching an op (inside a torch.compile'd function, or an op called
    directly) raises an error naming the op and the way out, not torch's about
    autograd.Function's setup_context; an op whose inputs the transform does not track runs."""
    ours, _ = _pair("GRU", 3, 5)
    x = _randn(4, 2, 3)

    def loss(a):
        return ours(a)[0].sum()

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="cannot be differentiated by torch.func.grad"):
        torch.compile(torch.func.grad(loss), backend="aot_eager")(x)
    torch._dynamo.reset()

    op = _layer_op(ours)
    for name, transform in (("grad", lambda: torch.func.grad(lambda a: op(a).sum())(x)),
                            ("vjp", lambda: torch.func.vjp(op, x)),
                            ("jacrev", lambda: torch.func.jacrev(op)(x))):
        with pytest.raises(RuntimeError, match="seqkern::rnn_layer_fwd cannot be differ"):
            transform()
    got = torch.func.grad(lambda a: a.sum() + op(x).sum())(x)
    assert_close("untracked op under grad", got, torch.ones_like(x))

