"""Shared by the recurrent layer tests: which backends run here, torch/seqkern module pairs
with the same weights, and the parity check of outputs and gradients."""
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE
from tests.tolerances import assert_close


HAS_C = not BACKENDS["cpu"].availability(DEVICE)
HAS_TRITON = not BACKENDS["triton"].availability(DEVICE)
HAS_CUDA = not BACKENDS["cuda"].availability(DEVICE)


def module_pair(cls, dtype=torch.float64, **kw):
    ours = getattr(seqkern, cls)(dtype=dtype, device=DEVICE, **kw)
    theirs = getattr(torch.nn, cls)(dtype=dtype, device=DEVICE, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def flatten_outputs(result):
    out, hidden = result
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        out = out.data
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    return [out, *hidden]


def check_against_torch(label, ours, theirs, call, leaves, backend, dtype):
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
