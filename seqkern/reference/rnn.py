"""Reference recurrent cells and whole-sequence layers, in torch.nn's gate order and layout.

Cells (batched: input [B, I], hx/cx [B, H]; w_ih [G*H, I], w_hh [G*H, H], biases [G*H]):
  LSTM: G = 4, gates i, f, g, o;  c' = f*c + i*g;  h' = o * tanh(c')
  GRU:  G = 3, gates r, z, n;     n = tanh(x W_in + b_in + r * (h W_hn + b_hn));
        h' = (1 - z) * n + z * h
  RNN:  G = 1,                    h' = act(x W_ih + b_ih + h W_hh + b_hh), act tanh or relu

fp16 / bf16 arguments are computed in fp32 and the results rounded back, as the kernels
keep their state and accumulate in fp32 (computed in bf16 throughout, a T=1000 LSTM's weight
gradients were 1.5-23x further from float64 than torch's own bf16 layer). The reference is
also what the modules run under torch.func transforms (seqkern/transforms.py).
"""
import torch
import torch.nn.functional as F

from seqkern.autocast import cast


def accumulation_dtype(dtype):
    """fp32 for fp16 / bf16, else dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step. Returns (h' [B, H], c' [B, H])."""
    acc = accumulation_dtype(input.dtype)
    if acc != input.dtype:
        h, c = lstm_cell(*cast((input, hx, cx, w_ih, w_hh, b_ih, b_hh), acc))
        return h.to(input.dtype), c.to(input.dtype)
    gates = F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    return h_next, c_next


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step. Returns h' [B, H]."""
    acc = accumulation_dtype(input.dtype)
    if acc != input.dtype:
        return gru_cell(*cast((input, hx, w_ih, w_hh, b_ih, b_hh), acc)).to(input.dtype)
    gi_r, gi_z, gi_n = F.linear(input, w_ih, b_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = F.linear(hx, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return (1.0 - z) * n + z * hx


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One vanilla RNN step. Returns h' [B, H]."""
    acc = accumulation_dtype(input.dtype)
    if acc != input.dtype:
        return rnn_cell(*cast((input, hx, w_ih, w_hh, b_ih, b_hh), acc),
                        nonlinearity).to(input.dtype)
    pre = F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def recurrent_layer(mode, input, h0, weights, c0=None, reverse=False, w_hr=None,
                    nonlinearity="tanh", batch_sizes=None):
    """One layer, one direction, over a whole sequence.

    Args:
      mode: "LSTM", "GRU" or "RNN".
      input: [T, B, I] (time-major), or packed data [sum(batch_sizes), I] with batch_sizes.
      h0: [B, H_out] (H_out = proj_size for LSTM with projection, else H); c0: [B, H] (LSTM).
      weights: (w_ih, w_hh, b_ih, b_hh), biases may be None.
      reverse: run from the last step to the first (for packed input: from each
        sequence's own last step).
      w_hr: [proj_size, H] LSTM projection, or None.
      batch_sizes: for packed input, live rows per step (non-increasing), on the CPU.
    Returns (output [T, B, H_out] or packed [N, H_out], h_n [B, H_out], c_n [B, H] or None).
    """
    acc = accumulation_dtype(input.dtype)
    if acc != input.dtype:
        x, h, c, w_r = cast((input, h0, c0, w_hr), acc)
        outs = recurrent_layer(mode, x, h, cast(weights, acc), c, reverse, w_r, nonlinearity,
                               batch_sizes)
        return tuple(cast(outs, input.dtype))
    w_ih, w_hh, b_ih, b_hh = weights
    if batch_sizes is None:
        steps = [input[t] for t in range(input.shape[0])]
        sizes = [input.shape[1]] * input.shape[0]
    else:
        sizes = [int(b) for b in batch_sizes]
        steps = list(torch.split(input, sizes))
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    h, c = h0, c0
    h_final, c_final = h0.clone(), (c0.clone() if c0 is not None else None)
    outputs = [None] * len(steps)
    for t in order:
        n = sizes[t]
        if reverse:
            # Rows that start at this step (for packed input) begin from their initial state.
            h = torch.cat([h[:n], h0[h.shape[0]:n]]) if h.shape[0] < n else h[:n]
            if c is not None:
                c = torch.cat([c[:n], c0[c.shape[0]:n]]) if c.shape[0] < n else c[:n]
        else:
            if h.shape[0] > n:  # rows whose sequence ended: keep their final state
                h_final = torch.cat([h_final[:n], h[n:], h_final[h.shape[0]:]])
                if c is not None:
                    c_final = torch.cat([c_final[:n], c[n:], c_final[c.shape[0]:]])
            h, c = h[:n], (c[:n] if c is not None else None)
        x = steps[t]
        if mode == "LSTM":
            h, c = lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
            if w_hr is not None:
                h = torch.matmul(h, w_hr.t())
        elif mode == "GRU":
            h = gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        elif mode == "RNN":
            h = rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        else:
            raise ValueError(f"mode must be LSTM, GRU or RNN, got {mode!r}")
        outputs[t] = h
    n_last = h.shape[0]
    h_final = torch.cat([h, h_final[n_last:]])
    if c is not None:
        c_final = torch.cat([c, c_final[n_last:]])
    output = torch.cat(outputs) if batch_sizes is not None else torch.stack(outputs)
    return output, h_final, (c_final if mode == "LSTM" else None)
