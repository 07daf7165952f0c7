"""Whole-sequence recurrent layers (LSTM, GRU, vanilla RNN) in Triton: one launch per step
for the forward recurrence and one per step (plus one) for the backward chain, per layer and
direction, enqueued back to back with no host synchronisation.

A launch's programs tile (batch rows x hidden units): each computes all gates of its units
for its rows from the whole previous state, so a step spreads over many multiprocessors. The
steps need a grid-wide order (every unit reads every unit's previous state), which here comes
from the launches. A grid barrier inside one launch would need every program co-resident
(recent Triton releases can ask for a cooperative launch, launch_cooperative_grid) and
cannot run in the CPU interpreter at all, which runs programs one after another: it would
wait forever there, so it could not be tested on the machines that test this code. The CUDA
kernel (csrc/cuda) keeps its weights on chip in one cooperative launch instead. The input
projection of all steps (before) and the weight gradients and dx (after) are single large
products made with torch, the latter only where autograd asks for them (needs).
Packed sequences: the step table (row offset, live rows) is built on the host from
batch_sizes; rows beyond a step's live count carry their state over unchanged.

LSTM with a projection (proj_size P < H: the state is h = h_full W_hr^T): each step is two
launches, the cell over hidden units (writing h_full) and the projection over the P state
columns; the backward phase likewise, dh of the state first (P columns), then dh_full = dh
W_hr and the cell's backward over hidden units; dW_hr is one product after the loop.

Workspace layout: identical to the CPU kernel's (seqkern/ops/rnn_layer.py: saved gates,
h_prev (P wide), then c_prev and c_new for LSTM, then h_full with a projection), in fp32.
"""
import torch
import triton
import triton.language as tl

from seqkern._debug import new_output

_MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # Portable tanh (no libdevice in the interpreter): exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _relu(x):
    # NaN stays NaN, as torch's relu (tl.maximum returns the other operand for NaN).
    return tl.where(x <= 0.0, 0.0, x)


@triton.jit
def _state_times_gates(State, row_stride, rows, row_mask, W, sw_r, sw_k, offs_j, H, K,
                       NG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """State[rows, :K] . W[g * H + offs_j, :K]^T for the NG gates g < NG (1, 3 or 4) as
    [BLOCK_B, BLOCK_H] fp32 tiles (zeros past NG), columns offs_j < H, in one pass over K:
    each slice of the state is loaded once for every gate, and the gates' weight slices are
    loaded together (a step's four gates looped over K one after another before). The
    products are fp32 FMA dots ("ieee") in every dtype."""
    a0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    w_mask_j = offs_j[None, :] < H
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        st = tl.load(State + rows[:, None] * row_stride + offs_k[None, :],
                     mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w_mask = w_mask_j & (offs_k[:, None] < K)
        w_ptr = W + offs_j[None, :] * sw_r + offs_k[:, None] * sw_k
        a0 += tl.dot(st, tl.load(w_ptr, mask=w_mask, other=0.0).to(tl.float32),
                     input_precision="ieee")
        if NG > 1:
            a1 += tl.dot(st, tl.load(w_ptr + H * sw_r, mask=w_mask, other=0.0).to(tl.float32),
                         input_precision="ieee")
        if NG > 2:
            a2 += tl.dot(st, tl.load(w_ptr + 2 * H * sw_r, mask=w_mask,
                                     other=0.0).to(tl.float32), input_precision="ieee")
        if NG > 3:
            a3 += tl.dot(st, tl.load(w_ptr + 3 * H * sw_r, mask=w_mask,
                                     other=0.0).to(tl.float32), input_precision="ieee")
    return a0, a1, a2, a3


@triton.jit
def _state_times_weight(State, row_stride, rows, row_mask, W, sw_r, sw_k, offs_j, J, K,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """State[rows, :K] . W[offs_j, :K]^T as a [BLOCK_B, BLOCK_H] fp32 tile, for the
    columns offs_j < J (W's element (j, k) at W + j * sw_r + k * sw_k: pass the strides
    swapped to multiply by W itself)."""
    acc, _, _, _ = _state_times_gates(State, row_stride, rows, row_mask, W, sw_r, sw_k, offs_j,
                                      J, K, 1, BLOCK_B, BLOCK_H, BLOCK_K)
    return acc


@triton.jit
def _step_tile(STEP_OFF, STEP_ROWS, s, B, J, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """A program's tile of step s: batch rows program_id(0), columns (hidden units or state
    columns, J of them) program_id(1). (rows, cols, in_batch, the step's row offset, live
    rows, the tile's mask, its live rows' mask)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_batch = rows < B
    off = tl.load(STEP_OFF + s)
    live = in_batch & (rows < tl.load(STEP_ROWS + s))
    return (rows, cols, in_batch, off, live, in_batch[:, None] & (cols[None, :] < J),
            live[:, None] & (cols[None, :] < J))


@triton.jit(do_not_specialize=["s"])
def _rnn_layer_fwd_step_kernel(
        XG, HG_BIAS, W, sw_r, sw_k, STEP_OFF, STEP_ROWS, s, STATE_H, STATE_C, OUT,
        SAVED, H_PREV, C_PREV, C_NEW, H_FULL, B, H, P,
        MODE: tl.constexpr, G: tl.constexpr, SW: tl.constexpr, HAS_HG_BIAS: tl.constexpr,
        SAVE: tl.constexpr, PROJ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # Step s (processing order) for batch rows tile program_id(0) and hidden units tile
    # program_id(1). XG [N, G*H] fp32: input projection (+ biases, GRU: b_ih only). STATE_H
    # [2, B, P] fp32 ping-pong (step s reads half s % 2, writes the other), both halves
    # holding h0 on entry; STATE_C [B, H] fp32 (LSTM), in place (a program touches only its
    # own tile). OUT [N, H] fp32. SW = saved width in units of H. P: the state's width (H,
    # or an LSTM projection's proj_size: then the cell writes h_full to H_FULL, [N, H] by
    # flat row when SAVE else [B, H] by batch row, and _rnn_layer_proj_step_kernel makes the
    # state, the output and H_PREV from it).
    rows, offs_j, in_batch, off, live, tile, live_tile = _step_tile(
        STEP_OFF, STEP_ROWS, s, B, H, BLOCK_B, BLOCK_H)
    old_h = STATE_H + (s % 2) * B * P
    new_h = STATE_H + ((s + 1) % 2) * B * P
    # Flat row indices in int64: N * G * H passes 2^31 at sizes in use (T1000 B256 H2048).
    n_idx = (off + rows).to(tl.int64)[:, None]
    xrow = XG + n_idx * (G * H) + offs_j[None, :]
    if not PROJ:
        h_old = tl.load(old_h + rows[:, None] * H + offs_j[None, :], mask=tile, other=0.0)
        if SAVE:
            tl.store(H_PREV + n_idx * H + offs_j[None, :], h_old, mask=live_tile)
    p0, p1, p2, p3 = _state_times_gates(old_h, P, rows, live, W, sw_r, sw_k, offs_j, H, P, G,
                                        BLOCK_B, BLOCK_H, BLOCK_K)
    a0 = tl.load(xrow, mask=live_tile, other=0.0) + p0
    srow = SAVED + n_idx * (SW * H) + offs_j[None, :]
    if MODE == 0:  # LSTM: i, f, g, o
        a1 = tl.load(xrow + H, mask=live_tile, other=0.0) + p1
        a2 = tl.load(xrow + 2 * H, mask=live_tile, other=0.0) + p2
        a3 = tl.load(xrow + 3 * H, mask=live_tile, other=0.0) + p3
        i, f, g, o = _sigmoid(a0), _sigmoid(a1), _tanh(a2), _sigmoid(a3)
        cptr = STATE_C + rows[:, None] * H + offs_j[None, :]
        c_old = tl.load(cptr, mask=tile, other=0.0)
        c_new = f * c_old + i * g
        h_new = o * _tanh(c_new)
        tl.store(cptr, tl.where(live_tile, c_new, c_old), mask=tile)
        if SAVE:
            tl.store(srow, i, mask=live_tile)
            tl.store(srow + H, f, mask=live_tile)
            tl.store(srow + 2 * H, g, mask=live_tile)
            tl.store(srow + 3 * H, o, mask=live_tile)
            tl.store(C_PREV + n_idx * H + offs_j[None, :], c_old,
                     mask=live_tile)
            tl.store(C_NEW + n_idx * H + offs_j[None, :], c_new,
                     mask=live_tile)
        if PROJ:
            if SAVE:
                tl.store(H_FULL + n_idx * H + offs_j[None, :], h_new, mask=live_tile)
            else:
                tl.store(H_FULL + rows[:, None] * H + offs_j[None, :], h_new, mask=live_tile)
    elif MODE == 1:  # GRU: r, z, n with b_hn inside r * (...)
        h1, hn = p1, p2
        if HAS_HG_BIAS:
            bmask = offs_j < H
            a0 += tl.load(HG_BIAS + offs_j, mask=bmask, other=0.0)[None, :]
            h1 += tl.load(HG_BIAS + H + offs_j, mask=bmask, other=0.0)[None, :]
            hn += tl.load(HG_BIAS + 2 * H + offs_j, mask=bmask, other=0.0)[None, :]
        r = _sigmoid(a0)
        z = _sigmoid(tl.load(xrow + H, mask=live_tile, other=0.0) + h1)
        n = _tanh(tl.load(xrow + 2 * H, mask=live_tile, other=0.0) + r * hn)
        h_new = n + z * (h_old - n)
        if SAVE:
            tl.store(srow, r, mask=live_tile)
            tl.store(srow + H, z, mask=live_tile)
            tl.store(srow + 2 * H, n, mask=live_tile)
            tl.store(srow + 3 * H, hn, mask=live_tile)
    else:  # vanilla RNN
        if MODE == 2:
            h_new = _tanh(a0)
        else:
            h_new = _relu(a0)
        if SAVE:
            tl.store(srow, h_new, mask=live_tile)
    if not PROJ:
        h_keep = tl.where(live_tile, h_new, h_old)
        tl.store(new_h + rows[:, None] * H + offs_j[None, :], h_keep, mask=tile)
        tl.store(OUT + n_idx * H + offs_j[None, :], h_new, mask=live_tile)


@triton.jit(do_not_specialize=["s"])
def _rnn_layer_proj_step_kernel(
        H_FULL, WR, swr_r, swr_k, STEP_OFF, STEP_ROWS, s, STATE_H, OUT, H_PREV, B, H, P,
        SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # LSTM with a projection, after the step kernel of step s: the new state h = h_full
    # W_hr^T (W_hr [P, H]) for batch rows tile program_id(0) and state columns tile
    # program_id(1); rows not live at step s keep theirs. Also the output and, when SAVE,
    # the state entering the step (H_PREV [N, P]).
    rows, offs_p, in_batch, off, live, tile, live_tile = _step_tile(
        STEP_OFF, STEP_ROWS, s, B, P, BLOCK_B, BLOCK_H)
    n_rows = (off + rows).to(tl.int64)
    n_idx = n_rows[:, None]
    state = rows[:, None] * P + offs_p[None, :]
    h_old = tl.load(STATE_H + (s % 2) * B * P + state, mask=tile, other=0.0)
    if SAVE:  # H_FULL by flat row, else by batch row
        tl.store(H_PREV + n_idx * P + offs_p[None, :], h_old, mask=live_tile)
        h_new = _state_times_weight(H_FULL, H, n_rows, live, WR, swr_r, swr_k, offs_p, P, H,
                                    BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        h_new = _state_times_weight(H_FULL, H, rows, live, WR, swr_r, swr_k, offs_p, P, H,
                                    BLOCK_B, BLOCK_H, BLOCK_K)
    tl.store(STATE_H + ((s + 1) % 2) * B * P + state, tl.where(live_tile, h_new, h_old),
             mask=tile)
    tl.store(OUT + n_idx * P + offs_p[None, :], h_new, mask=live_tile)


@triton.jit
def _cell_bwd(dh, rows, n_idx, offs_j, live_tile, tile, STATE_DC, SAVED, H_PREV, C_PREV, C_NEW,
              DXG, DHG, H, MODE: tl.constexpr, G: tl.constexpr, SW: tl.constexpr):
    """The pointwise backward of one step's cell for a (rows, units) tile, given dh (the
    gradient reaching the cell's output): writes the gate gradients (DXG; GRU's also DHG),
    carries LSTM's dc in STATE_DC, returns the part of dL/dh_prev that bypasses W_hh (GRU:
    dh * z; the others 0)."""
    srow = SAVED + n_idx * (SW * H) + offs_j[None, :]
    xg = DXG + n_idx * (G * H) + offs_j[None, :]
    direct = dh * 0.0
    if MODE == 0:
        i = tl.load(srow, mask=live_tile, other=0.0)
        f = tl.load(srow + H, mask=live_tile, other=0.0)
        g = tl.load(srow + 2 * H, mask=live_tile, other=0.0)
        o = tl.load(srow + 3 * H, mask=live_tile, other=0.0)
        tc = _tanh(tl.load(C_NEW + n_idx * H + offs_j[None, :], mask=live_tile, other=0.0))
        c_prev = tl.load(C_PREV + n_idx * H + offs_j[None, :], mask=live_tile, other=0.0)
        dc_ptr = STATE_DC + rows[:, None] * H + offs_j[None, :]
        dc_old = tl.load(dc_ptr, mask=tile, other=0.0)
        dc = dc_old + dh * o * (1.0 - tc * tc)
        tl.store(xg, dc * g * i * (1.0 - i), mask=live_tile)
        tl.store(xg + H, dc * c_prev * f * (1.0 - f), mask=live_tile)
        tl.store(xg + 2 * H, dc * i * (1.0 - g * g), mask=live_tile)
        tl.store(xg + 3 * H, dh * tc * o * (1.0 - o), mask=live_tile)
        tl.store(dc_ptr, tl.where(live_tile, dc * f, dc_old), mask=tile)
    elif MODE == 1:
        r = tl.load(srow, mask=live_tile, other=0.0)
        z = tl.load(srow + H, mask=live_tile, other=0.0)
        n = tl.load(srow + 2 * H, mask=live_tile, other=0.0)
        hn = tl.load(srow + 3 * H, mask=live_tile, other=0.0)
        h_prev = tl.load(H_PREV + n_idx * H + offs_j[None, :], mask=live_tile, other=0.0)
        d_npre = dh * (1.0 - z) * (1.0 - n * n)
        d_rpre = d_npre * hn * r * (1.0 - r)
        d_zpre = dh * (h_prev - n) * z * (1.0 - z)
        tl.store(xg, d_rpre, mask=live_tile)
        tl.store(xg + H, d_zpre, mask=live_tile)
        tl.store(xg + 2 * H, d_npre, mask=live_tile)
        hg = DHG + n_idx * (G * H) + offs_j[None, :]
        tl.store(hg, d_rpre, mask=live_tile)
        tl.store(hg + H, d_zpre, mask=live_tile)
        tl.store(hg + 2 * H, d_npre * r, mask=live_tile)
        direct = dh * z
    else:
        out = tl.load(srow, mask=live_tile, other=0.0)
        if MODE == 2:
            d_pre = dh * (1.0 - out * out)
        else:
            d_pre = tl.where(out <= 0, 0.0, dh)  # NaN passes dh, as torch
        tl.store(xg, d_pre, mask=live_tile)
    return direct


@triton.jit(do_not_specialize=["p"])
def _rnn_layer_bwd_step_kernel(
        W, sw_r, sw_k, STEP_OFF, STEP_ROWS, p, num_steps, GRAD_OUT, HAS_GRAD_OUT: tl.constexpr,
        STATE_DH, STATE_DC, SAVED, H_PREV, C_PREV, C_NEW, DXG, DHG, DH_STEP, B, H, P,
        MODE: tl.constexpr, G: tl.constexpr, SW: tl.constexpr, PROJ: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # Phase p of num_steps + 1 for batch rows tile program_id(0) and state columns tile
    # program_id(1): first dh += (the gate gradients of processing step S - p, written by
    # phase p - 1) . W_hh for that step's live rows, then the pointwise backward of step
    # S - 1 - p. STATE_DH [B, P] fp32 (grad_hn on entry), STATE_DC [B, H] fp32 (LSTM):
    # carried between phases in place, a program touching only its own tile. DXG [N, G*H]:
    # gradient of the gate pre-activations for the input projection; DHG [N, G*H]: for
    # h W_hh^T + b_hh (GRU; for the others DHG is DXG). With a projection (PROJ, P < H) the
    # pointwise is not here: this kernel writes step S - 1 - p's dh to DH_STEP [N, P] and
    # _rnn_layer_bwd_proj_kernel takes it through W_hr to the cell.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_batch = rows < B
    tile = in_batch[:, None] & (offs_j[None, :] < P)
    state = rows[:, None] * P + offs_j[None, :]
    dh = tl.load(STATE_DH + state, mask=tile, other=0.0)
    if p > 0:
        s_a = num_steps - p
        off_a = tl.load(STEP_OFF + s_a)
        live_a = in_batch & (rows < tl.load(STEP_ROWS + s_a))
        row_a = (off_a + rows).to(tl.int64)  # int64: as in the forward
        # zero on rows not live at step S - p; W_hh [G*H, P] itself (strides swapped)
        dh += _state_times_weight(DHG, G * H, row_a, live_a, W, sw_k, sw_r, offs_j, P,
                                  G * H, BLOCK_B, BLOCK_H, BLOCK_K)
    if p < num_steps:
        s = num_steps - 1 - p
        off = tl.load(STEP_OFF + s)
        live = in_batch & (rows < tl.load(STEP_ROWS + s))
        live_tile = live[:, None] & (offs_j[None, :] < P)
        n_idx = (off + rows).to(tl.int64)[:, None]  # int64: as in the forward
        dh_carry = dh
        if HAS_GRAD_OUT:
            dh += tl.load(GRAD_OUT + n_idx * P + offs_j[None, :], mask=live_tile, other=0.0)
        if PROJ:
            tl.store(DH_STEP + n_idx * P + offs_j[None, :], dh, mask=live_tile)
            direct = dh * 0.0
        else:
            direct = _cell_bwd(dh, rows, n_idx, offs_j, live_tile, tile, STATE_DC, SAVED,
                               H_PREV, C_PREV, C_NEW, DXG, DHG, H, MODE, G, SW)
        # Rows not live at this step carry their dh over.
        tl.store(STATE_DH + state, tl.where(live_tile, direct, dh_carry), mask=tile)
    else:
        tl.store(STATE_DH + state, dh, mask=tile)


@triton.jit(do_not_specialize=["p"])
def _rnn_layer_bwd_proj_kernel(
        WR, swr_r, swr_k, STEP_OFF, STEP_ROWS, p, num_steps, DH_STEP, STATE_DC, SAVED, C_PREV,
        C_NEW, DXG, B, H, P, SW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # LSTM with a projection, phase p < num_steps, after _rnn_layer_bwd_step_kernel: the
    # gradient reaching the cell of step S - 1 - p, dh_full = dh . W_hr (W_hr [P, H]), for
    # batch rows tile program_id(0) and hidden units tile program_id(1), then the cell's
    # pointwise backward.
    rows, offs_j, in_batch, off, live, tile, live_tile = _step_tile(
        STEP_OFF, STEP_ROWS, num_steps - 1 - p, B, H, BLOCK_B, BLOCK_H)
    n_rows = (off + rows).to(tl.int64)
    dh_full = _state_times_weight(DH_STEP, P, n_rows, live, WR, swr_k, swr_r, offs_j, H, P,
                                  BLOCK_B, BLOCK_H, BLOCK_K)
    # LSTM (MODE 0, G 4): its cell reads no h_prev and has no separate DHG (C_PREV, DXG stand in)
    _cell_bwd(dh_full, rows, n_rows[:, None], offs_j, live_tile, tile, STATE_DC, SAVED, C_PREV,
              C_PREV, C_NEW, DXG, DXG, H, 0, 4, SW)


def rnn_layer_not_supported_reasons(inputs):
    reasons = []
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32")
    return reasons


def _steps(input, batch_sizes, reverse):
    """(row offsets, live rows) per step in processing order, int32 on input's device: made
    there for a padded input (no copy from host memory), from the CPU batch sizes for a
    packed one."""
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        on = dict(device=input.device, dtype=torch.int32)
        offsets, sizes = torch.arange(T, **on) * B, torch.full((T,), B, **on)
    else:
        sizes = batch_sizes.to("cpu", torch.int64)
        offsets = torch.cumsum(sizes, 0) - sizes
        to = dict(device=input.device, dtype=torch.int32)
        offsets, sizes = offsets.to(**to), sizes.to(**to)
    if reverse:
        sizes, offsets = sizes.flip(0), offsets.flip(0)
    return offsets, sizes


def _blocks(H):
    """(BLOCK_B, BLOCK_H, BLOCK_K): tl.dot's smallest tiles (16) for the batch rows and the
    hidden units (H = 512: 32 programs a batch tile), K in slices of up to 64. A program
    waits on its loads slice by slice, so fewer, wider slices cut a step's latency: on an
    H100 a forward step took 82 us at B16 and at B64 alike with 32 units and 32-wide slices
    (latency, not throughput; bench/RESULTS.md). The products are fp32 FMA dots, each thread
    holding whole K slices of both operands: 128-wide slices spilled 128-344 bytes of stack
    in every step kernel, 64-wide ones none (.ci/triton_compile.py, sm_80 and sm_90). Not
    timed yet. Slices of half of H rounded up to a power of two at most, so that the K loop
    runs more than once at the small sizes the interpreted tests use."""
    return 16, 16, min(64, max(16, triton.next_power_of_2(H) // 2))


def _workspace(mode, N, H, P, device, need):
    """Uninitialised: every flat row is live at exactly one step, and the step kernels write
    all of its blocks (NaN-poisoned in the tests; a zero fill was a pass over 92 MB at the
    fastrnns shape)."""
    from seqkern.ops.rnn_layer import workspace_numel
    return new_output((workspace_numel(mode, N, H, P) if need else 0,), torch.float32, device)


def _views(mode, workspace, N, H, P):
    """(saved width, saved gates, h_prev, c_prev, c_new, h_full) in the workspace, laid out
    as the CPU kernel's (csrc/cpu/rnn_layer_plan.h, Workspace)."""
    sw = 4 if mode in ("LSTM", "GRU") else 1
    blocks = [N * sw * H, N * P] + ([N * H, N * H] if mode == "LSTM" else []) + (
        [N * H] if P != H else [])
    parts = list(torch.split(workspace[: sum(blocks)], blocks)) if workspace.numel() else []
    saved, h_prev = (parts[0], parts[1]) if parts else (workspace, workspace)
    c_prev, c_new = (parts[2], parts[3]) if parts and mode == "LSTM" else (workspace, workspace)
    h_full = parts[-1] if parts and P != H else workspace
    return sw, saved, h_prev, c_prev, c_new, h_full


def _sizes(mode, input, w_hh):
    """(G, H, P, I): gates, hidden size, state width (proj_size with a projection), input
    size."""
    G = _GATES[mode]
    return G, w_hh.shape[0] // G, w_hh.shape[1], input.shape[-1]


def rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  need_workspace, w_hr=None):
    G, H, P, I = _sizes(mode, input, w_hh)
    proj = w_hr is not None
    x = input.reshape(-1, I).float()
    N = x.shape[0]
    bias_x, bias_h = None, None
    if b_ih is not None:
        bias_x = b_ih.float() + (b_hh.float() if mode != "GRU" else 0.0)
        bias_h = b_hh.float().contiguous() if mode == "GRU" else None
    x_gates = x @ w_ih.float().t()
    if bias_x is not None:
        x_gates += bias_x
    offsets, sizes = _steps(input, batch_sizes, reverse)
    B = h0.shape[0]
    state_h = h0.float().unsqueeze(0).repeat(2, 1, 1)
    state_c = (c0.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
               if mode == "LSTM"
               else torch.empty(0, device=input.device))
    out = new_output((N, P), torch.float32, input.device)
    workspace = _workspace(mode, N, H, P, input.device, need_workspace)
    sw, saved, h_prev, c_prev, c_new, h_full = _views(mode, workspace, N, H, P)
    scratch = torch.empty(1, device=input.device)
    if proj and not need_workspace:  # the cell's output before the projection, by batch row
        h_full = torch.empty(B, H, dtype=torch.float32, device=input.device)
    BLOCK_B, BLOCK_H, BLOCK_K = _blocks(H)
    # The step kernel multiplies all G gates in one pass over K (_state_times_gates): with
    # 64-wide slices its G weight slices spilled 8-64 bytes, 32-wide none.
    step_block_k = BLOCK_K if G == 1 else max(16, BLOCK_K // 2)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    grid_proj = (triton.cdiv(B, BLOCK_B), triton.cdiv(P, BLOCK_H))
    for s in range(offsets.numel() if B and H else 0):
        _rnn_layer_fwd_step_kernel[grid](
            x_gates, bias_h if bias_h is not None else scratch, w_hh, w_hh.stride(0),
            w_hh.stride(1), offsets, sizes, s, state_h, state_c, out,
            saved if need_workspace else scratch, h_prev if need_workspace else scratch,
            c_prev if need_workspace and mode == "LSTM" else scratch,
            c_new if need_workspace and mode == "LSTM" else scratch,
            h_full if proj else scratch, B, H, P, MODE=_MODES[mode], G=G, SW=sw,
            HAS_HG_BIAS=bias_h is not None, SAVE=need_workspace, PROJ=proj, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=step_block_k)
        if proj:
            _rnn_layer_proj_step_kernel[grid_proj](
                h_full, w_hr, w_hr.stride(0), w_hr.stride(1), offsets, sizes, s, state_h, out,
                h_prev if need_workspace else scratch, B, H, P, SAVE=need_workspace,
                BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    h_n = state_h[offsets.numel() % 2]
    out = out.reshape(*input.shape[:-1], P).to(input.dtype)
    c_n = state_c.to(input.dtype) if mode == "LSTM" else h0.new_empty((0,))
    return out, h_n.to(input.dtype), c_n, workspace


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn, needs, w_hr=None):
    G, H, P, I = _sizes(mode, input, w_hh)
    proj = w_hr is not None
    x = input.reshape(-1, I).float()
    N, B = x.shape[0], h0.shape[0]
    offsets, sizes = _steps(input, batch_sizes, reverse)
    sw, saved, h_prev, c_prev, c_new, h_full = _views(mode, workspace, N, H, P)
    state_dh = (grad_hn.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                if grad_hn is not None else torch.zeros(B, P, device=x.device))
    state_dc = ((grad_cn.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                 if grad_cn is not None
                 else torch.zeros(B, H, device=x.device)) if mode == "LSTM"
                else torch.empty(0, device=x.device))
    # Every flat row is live at exactly one step, so the kernels write all of them.
    dxg = new_output((N, G * H), torch.float32, x.device)
    dhg = new_output((N, G * H), torch.float32, x.device) if mode == "GRU" else dxg
    dh_step = new_output((N, P), torch.float32, x.device) if proj else dxg
    grad_out = (grad_output.reshape(N, P).float().contiguous() if grad_output is not None
                else torch.empty(0, device=x.device))
    BLOCK_B, BLOCK_H, BLOCK_K = _blocks(H)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(P, BLOCK_H))
    grid_proj = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    S = offsets.numel()
    for p in range(S + 1 if B and H and S else 0):
        _rnn_layer_bwd_step_kernel[grid](
            w_hh, w_hh.stride(0), w_hh.stride(1), offsets, sizes, p, S, grad_out,
            grad_output is not None, state_dh, state_dc, saved, h_prev, c_prev, c_new, dxg, dhg,
            dh_step, B, H, P, MODE=_MODES[mode], G=G, SW=sw, PROJ=proj, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
        if proj and p < S:
            _rnn_layer_bwd_proj_kernel[grid_proj](
                w_hr, w_hr.stride(0), w_hr.stride(1), offsets, sizes, p, S, dh_step, state_dc,
                saved, c_prev, c_new, dxg, B, H, P, SW=sw, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
                BLOCK_K=BLOCK_K)
    dt = input.dtype
    h_prev_rows = h_prev.view(N, P)
    # Only the products asked for (needs); an unwanted gradient is [0].
    has_bias = b_ih is not None
    make = (lambda: (dxg @ w_ih.float()).reshape(input.shape), lambda: state_dh,
            lambda: state_dc if mode == "LSTM" else None, lambda: dxg.t() @ x,
            lambda: dhg.t() @ h_prev_rows, lambda: dxg.sum(0) if has_bias else None,
            lambda: (dhg if mode == "GRU" else dxg).sum(0) if has_bias else None,
            lambda: dh_step.t() @ h_full.view(N, H) if proj else None)
    grads = [(make_grad() if want else None) for make_grad, want in zip(make, needs)]
    grads = [h0.new_empty((0,)) if g is None else g for g in grads]
    return [g.to(dt) if g.numel() else g for g in grads]
