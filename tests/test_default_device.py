"""A default device other than the inputs' (torch.set_default_device, `with torch.device(...)`)
changes nothing: every tensor seqkern makes for its inputs lands on their device.

On the first GPU run of these modules under torch.set_default_device("cuda"), an index made
without a device (seqkern/nn/projection.py's packed path) met CPU batch sizes and failed.
Here the default device is "meta", which holds no data: a stray tensor made there fails
loudly on the CPU too (the test that would have caught that bug without a GPU)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern
from tests.attention_cases import DEVICE, skip_unless_usable

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="CPU inputs under a meta default")

LAYERS = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)),
          ("GRU", dict(batch_first=True)), ("RNN", dict(nonlinearity="relu"))]


def _outputs_and_grads(run, leaves):
    outs = [t for t in run() if t is not None]
    grads = torch.autograd.grad(sum(o.double().sin().sum() for o in outs), leaves)
    return [o.detach() for o in outs] + list(grads)


def _same_under_meta_default(run, leaves):
    want = _outputs_and_grads(run, leaves)
    with torch.device("meta"):
        got = _outputs_and_grads(run, leaves)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device == w.device
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("via_plain", [False, True], ids=["", "proj-via-plain"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("cls, kw", LAYERS, ids=[f"{c}-{'-'.join(k)}" for c, k in LAYERS])
def test_layers(monkeypatch, cls, kw, backend, via_plain):
    skip_unless_usable(backend)
    if via_plain and "proj_size" not in kw:
        pytest.skip("SEQKERN_RNN_PROJ_VIA_PLAIN concerns LSTM projections")
    monkeypatch.setenv("SEQKERN_RNN_PROJ_VIA_PLAIN", str(int(via_plain)))
    torch.manual_seed(0)
    dtype = torch.float64 if backend != "triton" else torch.float32
    module = getattr(seqkern, cls)(4, 5, dtype=dtype, **kw)
    x = torch.randn(3, 3, 4, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([3, 1, 2])

    def run():
        with seqkern.backend(backend):
            packed, hidden = module(pack_padded_sequence(x, lengths, enforce_sorted=False,
                                                         batch_first=kw.get("batch_first",
                                                                            False)))
            out, _ = module(x)
        return [packed.data, out] + list(hidden if isinstance(hidden, tuple) else (hidden,))

    _same_under_meta_default(run, [x] + list(module.parameters()))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cells_attention_and_multihead_attention(backend):
    skip_unless_usable(backend)
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    cells = [seqkern.LSTMCell(4, 5, **f64), seqkern.GRUCell(4, 5, **f64),
             seqkern.RNNCell(4, 5, **f64)]
    mha = seqkern.MultiheadAttention(8, 2, batch_first=True, **f64)
    x = torch.randn(3, 4, **f64, requires_grad=True)
    q = torch.randn(2, 5, 8, **f64, requires_grad=True)
    padding = torch.zeros(2, 5, **f64)
    padding[1, 3:] = float("-inf")
    float_mask = torch.randn(5, 5, **f64) * 1e3  # rows shifted (functional._rows_to_zero_max)

    def run():
        with seqkern.backend(backend):
            outs = []
            for cell in cells:
                out = cell(x)
                outs += list(out) if isinstance(out, tuple) else [out]
            outs += list(mha(q, q, q, key_padding_mask=padding, attn_mask=float_mask))
            outs.append(seqkern.functional.scaled_dot_product_attention(
                q.view(2, 1, 5, 8), q.view(2, 1, 5, 8), q.view(2, 1, 5, 8), is_causal=True))
        return outs

    params = [p for m in cells + [mha] for p in m.parameters()]
    _same_under_meta_default(run, [x, q] + params)

