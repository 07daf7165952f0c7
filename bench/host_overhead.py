"""Where a small call's host time goes, layer by layer of seqkern's stack, beside torch's module.

For one-step calls (cells, and layers at T = 1) the kernels take microseconds and the call
is host time: the module's Python, the public op (dispatcher and Autograd kernel), the op's
body (backend choice, output wrapping) and the backend's entry point (the C++ op, or the
Triton launch). Each is called directly with the same arguments, in alternating rounds in one
process, so that the differences between the columns are what each layer adds. Host time per
call: on a GPU the calls are not synchronised one by one (the host runs ahead while the
device keeps up), only at the end of each round.

    python bench/host_overhead.py                 CPU fp32 (B1, H256), and on a GPU bf16 (B64, H512)
    python bench/host_overhead.py --calls 50      fewer calls a round (a quick look)
(bench/gpu_check.sh's `host` stage; bench/RESULTS.md)
"""
import argparse
import statistics
import time

import torch

import seqkern
from seqkern import backends
from seqkern.ops import rnn_cells, rnn_layer

CELLS = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN_TANH"}
LAYERS = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN_TANH"}


def _case(cls, B, H, device, dtype):
    """(seqkern's module, torch's with the same weights, the module's input, the op, the op's
    arguments, the backend's op name, the inputs the op's body chooses its backend by)."""
    theirs = getattr(torch.nn, cls)(H, H, device=device, dtype=dtype)
    ours = getattr(seqkern, cls)(H, H, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    weights = list(ours.parameters())  # the op called with them records a graph in grad mode
    cell = cls in CELLS
    mode = CELLS[cls] if cell else LAYERS[cls]
    x = torch.randn((B, H) if cell else (1, B, H), device=device, dtype=dtype)
    h = torch.zeros(B, H, device=device, dtype=dtype)
    c = torch.zeros(B, H, device=device, dtype=dtype) if mode == "LSTM" else None
    if cell:
        return (ours, theirs, x, rnn_cells.rnn_cell_fwd, (mode, x, h, c, *weights), "rnn_cell",
                rnn_cells._inputs(mode, x))
    # A layer keeps a workspace for its backward where the module records a graph, as the
    # module's own call does (seqkern/nn/rnn.py, need_workspace).
    need_workspace = torch.is_grad_enabled()
    return (ours, theirs, x, rnn_layer.rnn_layer_fwd,
            (mode, x, None, h, c, *weights, False, need_workspace, None), "rnn_layer",
            rnn_layer._inputs(x, mode, weights[1], None))


def layers_of(cls, B, H, device, dtype):
    """(the backend's name, {column: call} from the top of the stack down, torch's module
    last). The body and the entry point get the weights detached: below the op's Autograd
    kernel nothing records a graph."""
    ours, theirs, x, op, args, op_name, inputs = _case(cls, B, H, device, dtype)
    impl = backends.select(op_name, inputs)
    entry = getattr(impl, f"{op_name}_fwd")
    below = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    return impl.NAME, {"module": lambda: ours(x), "op": lambda: op(*args),
                       "body": lambda: op.kernel(*below), "entry": lambda: entry(*below),
                       "torch module": lambda: theirs(x)}


def _round_us(call, calls, sync):
    start = time.perf_counter()
    for _ in range(calls):
        call()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def measure(columns, calls, rounds, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for call in columns.values():  # warm-up: compiles, caches, allocator
        _round_us(call, max(3, calls // 10), sync)
    times = {name: [] for name in columns}
    for _ in range(rounds):
        for name, call in columns.items():
            times[name].append(_round_us(call, calls, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default="LSTMCell,GRUCell,RNNCell,LSTM,GRU,RNN")
    args = parser.parse_args(argv)
    configs = [(torch.device("cpu"), torch.float32, 1, 256)]
    if torch.cuda.is_available():
        configs.append((torch.device("cuda"), torch.bfloat16, 64, 512))
    print("host us per call, medians of rounds; layers at T = 1; (backend, grad): the "
          "backend that ran, and a graph recorded (parameters requiring grad, grad mode on)")
    header = None
    for device, dtype, B, H in configs:
        for cls in args.cases.split(","):
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    backend, columns = layers_of(cls, B, H, device, dtype)
                    row = measure(columns, args.calls, args.rounds, device)
                if header is None:
                    header = list(row)
                    print("| case | " + " | ".join(header) + " |")
                    print("|---" * (len(header) + 1) + "|")
                label = (f"{device.type} {str(dtype).replace('torch.', '')} {cls} B{B} H{H}"
                         f" ({backend}{', grad' if grad else ''})")
                print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
