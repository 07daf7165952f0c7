"""Runs the emulated recurrent kernels (rnn_cell_harness.cpp, rnn_layer_harness.cpp).

Both take what the torch binding hands the kernels: the input projections x W_ih^T as
float32 (cuBLAS's job, not the kernels'), recurrent weights, states and incoming gradients in
the storage dtype; they return the kernels' outputs as float64 tensors, plus the gate
gradients from which the binding forms dx, dW and db by matrix products.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.cuda_emulation import build

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")  # rnn.h's CellKind order
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
SAVED_WIDTH = {"LSTM": 4, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}  # rnn.h saved_width
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # rnn.h DType


def _write(path, ints, arrays):
    with open(path, "wb") as f:
        f.write(np.asarray(ints, np.int32).tobytes())
        for a in arrays:
            f.write(np.ascontiguousarray(torch.as_tensor(a).numpy(), np.float32).tobytes())


def _split(path, sizes):
    raw = torch.from_numpy(np.fromfile(path, np.float32).astype(np.float64))
    assert raw.numel() == sum(n for _, n in sizes), "harness output has an unexpected size"
    return dict(zip((name for name, _ in sizes), torch.split(raw, [n for _, n in sizes])))


def run_cell(exe, workdir, mode, dtype, gates_x, gates_h, b_ih, b_hh, hx, cx, grad_h, grad_c):
    """One cell step and its gate gradients.

    Args: gates_x, gates_h [B, G*H] float32 (x W_ih^T, hx W_hh^T); b_ih, b_hh [G*H] or None;
      hx, cx, grad_h, grad_c [B, H] (cx, grad_c unused but required for non-LSTM cells);
      values already representable in `dtype`.
    Returns dict: h [B, H], c [B, H] (LSTM), d_ih [B, G*H] (gradient of the input gates),
      d_hh [B, G*H] and d_hx [B, H] (GRU: the gradient of hx's own term), d_cx (LSTM).
    """
    B, H = hx.shape
    G = GATES[mode]
    fin, fout = Path(workdir) / "cell_in.bin", Path(workdir) / "cell_out.bin"
    bias = b_ih is not None
    _write(fin, [MODES.index(mode), DTYPE_CODE[dtype], B, H, int(bias)],
           [gates_x, gates_h] + ([b_ih, b_hh] if bias else []) + [hx, cx, grad_h, grad_c])
    build.run(exe, fin, fout)
    lstm, gru = mode == "LSTM", mode == "GRU"
    sizes = [("h", B * H)] + [("c", B * H)] * lstm + [("d_ih", B * G * H)] + \
        [("d_hh", B * G * H), ("d_hx", B * H)] * gru + [("d_cx", B * H)] * lstm
    got = _split(fout, sizes)
    return {n: t.reshape(B, -1) for n, t in got.items()}


@dataclass
class LayerCase:
    """One layer problem and the emulated device it runs on."""
    mode: str
    dtype: torch.dtype
    steps: int
    batch: int
    hidden: int
    batch_sizes: list = None  # packed input: live rows per step (non-increasing), else None
    reverse: bool = False
    bias: bool = True
    strided: bool = False  # W_hh, h0 and c0 transposed in memory
    sms: int = 4  # multiprocessors of the emulated device
    coop: bool = True  # cooperative launches supported (else: the per-step fallback)
    min_work: int = 8 * 256  # the plan's minimum work per block (smaller: more blocks)
    persistent: bool = None  # the path the plan should take (default: coop)
    lanes: bool = False  # batch-lane blocks allowed (SEQKERN_CUDA_RNN_LANES=1)
    mma: bool = False  # tensor-core blocks (SEQKERN_CUDA_RNN_MMA=1; fp16 / bf16, or fp32 ...
    tf32: bool = False  # ... on TF32 with SEQKERN_CUDA_RNN_TF32=1)
    prefetch: bool = False  # ... with two staging buffers (SEQKERN_CUDA_RNN_PREFETCH=1)
    wide: bool = False  # wider backward blocks (SEQKERN_CUDA_RNN_WIDE=1)
    split: bool = False  # tensor-core blocks over the batch too (SEQKERN_CUDA_RNN_SPLIT=1)
    smem: int = 232448  # opt-in shared memory per block (H100's by default)

    def __post_init__(self):
        if self.persistent is None:
            self.persistent = self.coop

    @property
    def rows(self):
        return sum(self.batch_sizes) if self.batch_sizes else self.steps * self.batch


def run_layer(exe, workdir, case, x_gates, bias_x, bias_hn, w_hh, h0, c0, grad_out, grad_hn,
              grad_cn):
    """A layer's forward (training mode) and backward.

    Args: x_gates [N, G*H] float32 (N = case.rows, time-major or packed rows); bias_x [G*H]
      (b_ih + b_hh, GRU: b_hh's n part excluded) and bias_hn [H] (GRU) or None; w_hh
      [G*H, H]; h0, c0 [B, H]; grad_out [N, H]; grad_hn, grad_cn [B, H].
    Returns (dict: out [N, H], h_n, c_n [B, H], h_prev [N, H] (from the workspace),
      d_gx [N, G*H], d_gh [N, G*H] (GRU), d_h0, d_c0 [B, H]; the harness's plan line).
    """
    c = case
    G, H, B, N = GATES[c.mode], c.hidden, c.batch, c.rows
    lstm, gru = c.mode == "LSTM", c.mode == "GRU"
    fin, fout = Path(workdir) / "layer_in.bin", Path(workdir) / "layer_out.bin"
    hdr = [MODES.index(c.mode), DTYPE_CODE[c.dtype], c.steps, B, H, int(bool(c.batch_sizes)),
           int(c.reverse), int(c.bias), 1, int(c.strided), c.sms, int(c.coop), c.min_work,
           c.smem]
    arrays = [x_gates] + ([bias_x] + [bias_hn] * gru if c.bias else []) + [w_hh, h0] + \
        [c0] * lstm + [grad_out, grad_hn] + [grad_cn] * lstm
    _write(fin, hdr + list(c.batch_sizes or []), arrays)
    env = dict(os.environ, SEQKERN_CUDA_RNN_LANES=str(int(c.lanes)),
               SEQKERN_CUDA_RNN_MMA=str(int(c.mma)), SEQKERN_CUDA_RNN_TF32=str(int(c.tf32)),
               SEQKERN_CUDA_RNN_PREFETCH=str(int(c.prefetch)),
               SEQKERN_CUDA_RNN_WIDE=str(int(c.wide)), SEQKERN_CUDA_RNN_SPLIT=str(int(c.split)))
    plan = build.run(exe, fin, fout, env=env).strip()
    W = SAVED_WIDTH[c.mode]
    ws = N * (W * H + H + (2 * H if lstm else 0))  # rnn_layer_workspace_numel
    sizes = [("out", N * H), ("h_n", B * H)] + [("c_n", B * H)] * lstm + [("ws", ws),
             ("d_gx", N * G * H)] + [("d_gh", N * G * H)] * gru + [("d_h0", B * H)] + \
        [("d_c0", B * H)] * lstm
    got = _split(fout, sizes)
    got["h_prev"] = got.pop("ws")[N * W * H:N * (W + 1) * H]
    width = {"d_gx": G * H, "d_gh": G * H}
    return {n: t.reshape(-1, width.get(n, H)) for n, t in got.items()}, plan
