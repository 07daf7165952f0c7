"""Recurrent cells: seqkern's modules against torch.nn's cells, same weights, same process.

Cases: one cell step forward, and a Python loop of T = 100 steps, forward and forward +
backward (the training step: the loss is the sum of the last state). FLOPs: a step is
2*B*G*H*(I+H) with G = 4 (LSTM), 3 (GRU), 1 (RNN); a training loop counts 3x its forward.

The training loop allocates two fresh [G*H, H] weight gradients per step (seqkern and torch
alike), and glibc's trimming then makes page faults vary from a few thousand to ~100K per
loop, for either provider: on the 2-core CI machine that moved the loop's time by +-30%.
For stable loop numbers run with MALLOC_MMAP_THRESHOLD_=268435456
MALLOC_TRIM_THRESHOLD_=1073741824 (the library itself sets nothing).
"""
import pytest
import torch

import seqkern

CUDA = torch.cuda.is_available()
T = 100
GATES = {"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}
MODES = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN_TANH"}  # the op's mode names


def _cases():
    cells = list(GATES)
    if CUDA:
        return [(cell, B, H, torch.bfloat16) for cell in cells for B in (16, 64, 256)
                for H in (512, 1024)]
    # B = 1: a model stepping one sequence (an agent, a decoder)
    return [(cell, B, 512, torch.float32) for cell in cells for B in (1, 16)]


def _providers():
    return ["seqkern-cuda", "seqkern-triton", "torch"] if CUDA else ["seqkern-cpu", "torch"]


def _case_id(c):
    return "{}-B{}-H{}-{}".format(c[0], c[1], c[2], str(c[3]).replace("torch.", ""))


def _cells(name, H, dtype):
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    peer = getattr(torch.nn, name)(H, H, device=device, dtype=dtype)
    ours = getattr(seqkern, name)(H, H, device=device, dtype=dtype)
    ours.load_state_dict(peer.state_dict())
    return peer, ours


# provider outermost: it varies fastest, so a case's peers run back to back (whole rows
# when a time limit cuts the run short)
@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("pass_", ["step-fwd", "loop-fwd", "loop-fwd+bwd"])
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_rnn_cell(benchmark, record, provider, case, pass_):
    name, B, H, dtype = case
    peer, ours = _cells(name, H, dtype)
    cell = peer if provider == "torch" else ours
    backend = provider.split("-", 1)[1] if provider != "torch" else None
    xs = torch.randn(T, B, H, device=peer.weight_ih.device, dtype=dtype)
    # The op's own inputs dict (a hand-made partial one named every cell LSTM).
    if backend and seqkern.backends.BACKENDS[backend].not_supported_reasons(
            "rnn_cell", seqkern.ops.rnn_cells._inputs(MODES[name], xs[0])):
        pytest.skip(f"{provider} not usable here")
    step_flops = 2 * B * GATES[name] * H * (H + H)

    def loop():
        state = None
        for t in range(T):
            state = cell(xs[t], state)
        return state

    if pass_ == "step-fwd":
        state = cell(xs[0])

        def target():
            with torch.no_grad():
                cell(xs[1], state)
        flops, rounds, iterations = step_flops, 30, 10
    elif pass_ == "loop-fwd":
        def target():
            with torch.no_grad():
                loop()
        flops, rounds, iterations = T * step_flops, 5, 1
    else:
        def target():
            for p in cell.parameters():
                p.grad = None
            state = loop()
            loss = state[0].sum() + state[1].sum() if name == "LSTMCell" else state.sum()
            loss.backward()
        flops, rounds, iterations = 3 * T * step_flops, 5, 1

    def run():
        if backend is None:
            return target()
        with seqkern.backend(backend):
            return target()
    benchmark.pedantic(record.timed(run), rounds=rounds, iterations=iterations,
                       warmup_rounds=2)
    record(benchmark, f"{name} {pass_} {_case_id(case)}", provider, flops)
