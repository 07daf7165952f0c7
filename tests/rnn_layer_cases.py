"""Shared by the recurrent layer tests: which backends run here, torch/seqkern module pairs
with the same weights, and the parity check of outputs and gradients."""
import copy

import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.attention_cases import DEVICE
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative


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
    gradients. fp32/fp64 by the tolerance table; fp16/bf16 by the relative rule against
    torch's own module in that dtype (its CPU or cuDNN kernels)."""
    low = dtype in (torch.float16, torch.bfloat16)
    peer = copy.deepcopy(theirs).to(dtype) if low else None

    def leaves_in_dtype():
        return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in leaves]

    leaves_a = leaves_in_dtype()
    leaves_p = leaves_in_dtype() if low else []
    with seqkern.backend(backend):
        got = call(ours, leaves_a)
    want = call(theirs, leaves)
    peer_out = call(peer, leaves_p) if low else [None] * len(want)

    def compare(name, g, w, p, factor):
        if low:
            assert_close_relative(name, g, w, p, factor)
        else:
            assert_close(name, g, w)

    for i, (g, w, p) in enumerate(zip(got, want, peer_out)):
        compare(f"{label} output[{i}]", g, w, p, FWD_FACTOR)
    grads = [torch.randn_like(w) for w in want]
    names = ["input", "h0", "c0"][:len(leaves)] + [n for n, _ in ours.named_parameters()]
    peer_leaves = leaves_p + list(peer.parameters()) if low else [None] * len(names)
    pairs = [(n, a, b, c) for n, a, b, c in zip(names, leaves_a + list(ours.parameters()),
                                                leaves + list(theirs.parameters()), peer_leaves)
             if a.requires_grad]
    if not pairs:
        return
    with seqkern.backend(backend):
        g_ours = torch.autograd.grad(got, [a for _, a, _, _ in pairs],
                                     [g.to(dtype) for g in grads])
    g_theirs = torch.autograd.grad(want, [b for _, _, b, _ in pairs], grads)
    g_peer = torch.autograd.grad(peer_out, [c for _, _, _, c in pairs],
                                 [g.to(dtype) for g in grads]) if low else [None] * len(pairs)
    for (name, _, _, _), g, w, p in zip(pairs, g_ours, g_theirs, g_peer):
        compare(f"{label} d{name}", g, w, p, BWD_FACTOR)
