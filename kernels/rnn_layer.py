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

Workspace layout: identical to the CPU kernel's (seqkern/ops/rnn_layer.py: saved gates,
h_prev, then c_prev and c_new for LSTM), in fp32.
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
def _state_times_weight(State, row_stride, rows, row_mask, W, sw_r, sw_k, w_row0, offs_j, H,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """State[rows, :H] . W[w_row0 + offs_j, :H]^T as a [BLOCK_B, BLOCK_H] fp32 tile."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(State + rows[:, None] * row_stride + offs_k[None, :],
                    mask=row_mask[:, None] & (offs_k[None, :] < H), other=0.0)
        w = tl.load(W + (w_row0 + offs_j)[None, :] * sw_r + offs_k[:, None] * sw_k,
                    mask=(offs_j[None, :] < H) & (offs_k[:, None] < H), other=0.0)
        acc += tl.dot(s, w.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit(do_not_specialize=["s"])
def _rnn_layer_fwd_step_kernel(
        XG, HG_BIAS, W, sw_r, sw_k, STEP_OFF, STEP_ROWS, s, STATE_H, STATE_C, OUT,
        SAVED, H_PREV, C_PREV, C_NEW, B, H,
        MODE: tl.constexpr, G: tl.constexpr, SW: tl.constexpr, HAS_HG_BIAS: tl.constexpr,
        SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # Step s (processing order) for batch rows tile program_id(0) and hidden units tile
    # program_id(1). XG [N, G*H] fp32: input projection (+ biases, GRU: b_ih only). STATE_H
    # [2, B, H] fp32 ping-pong (step s reads half s % 2, writes the other), both halves
    # holding h0 on entry; STATE_C [B, H] fp32 (LSTM), in place (a program touches only its
    # own tile). OUT [N, H] fp32. SW = saved width in units of H.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_batch = rows < B
    off = tl.load(STEP_OFF + s)
    live = in_batch & (rows < tl.load(STEP_ROWS + s))
    old_h = STATE_H + (s % 2) * B * H
    new_h = STATE_H + ((s + 1) % 2) * B * H
    tile = in_batch[:, None] & (offs_j[None, :] < H)
    live_tile = live[:, None] & (offs_j[None, :] < H)
    h_old = tl.load(old_h + rows[:, None] * H + offs_j[None, :], mask=tile, other=0.0)
    # Flat row indices in int64: N * G * H passes 2^31 at sizes in use (T1000 B256 H2048).
    n_idx = (off + rows).to(tl.int64)[:, None]
    xrow = XG + n_idx * (G * H) + offs_j[None, :]
    if SAVE:
        tl.store(H_PREV + n_idx * H + offs_j[None, :], h_old, mask=live_tile)
    a0 = tl.load(xrow, mask=live_tile, other=0.0) + _state_times_weight(
        old_h, H, rows, live, W, sw_r, sw_k, 0, offs_j, H, BLOCK_B, BLOCK_H, BLOCK_K)
    srow = SAVED + n_idx * (SW * H) + offs_j[None, :]
    if MODE == 0:  # LSTM: i, f, g, o
        a1 = tl.load(xrow + H, mask=live_tile, other=0.0) + _state_times_weight(
            old_h, H, rows, live, W, sw_r, sw_k, H, offs_j, H, BLOCK_B, BLOCK_H, BLOCK_K)
        a2 = tl.load(xrow + 2 * H, mask=live_tile, other=0.0) + _state_times_weight(
            old_h, H, rows, live, W, sw_r, sw_k, 2 * H, offs_j, H, BLOCK_B, BLOCK_H,
            BLOCK_K)
        a3 = tl.load(xrow + 3 * H, mask=live_tile, other=0.0) + _state_times_weight(
            old_h, H, rows, live, W, sw_r, sw_k, 3 * H, offs_j, H, BLOCK_B, BLOCK_H,
            BLOCK_K)
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
    elif MODE == 1:  # GRU: r, z, n with b_hn inside r * (...)
        h1 = _state_times_weight(old_h, H, rows, live, W, sw_r, sw_k, H, offs_j, H,
                                 BLOCK_B, BLOCK_H, BLOCK_K)
        hn = _state_times_weight(old_h, H, rows, live, W, sw_r, sw_k, 2 * H, offs_j, H,
                                 BLOCK_B, BLOCK_H, BLOCK_K)
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
            h_new = tl.maximum(a0, 0.0)
        if SAVE:
            tl.store(srow, h_new, mask=live_tile)
    h_keep = tl.where(live_tile, h_new, h_old)
    tl.store(new_h + rows[:, None] * H + offs_j[None, :], h_keep, mask=tile)
    tl.store(OUT + n_idx * H + offs_j[None, :], h_new, mask=live_tile)


@triton.jit(do_not_specialize=["p"])
def _rnn_layer_bwd_step_kernel(
        W, sw_r, sw_k, STEP_OFF, STEP_ROWS, p, num_steps, GRAD_OUT, HAS_GRAD_OUT: tl.constexpr,
        STATE_DH, STATE_DC, SAVED, H_PREV, C_PREV, C_NEW, DXG, DHG, B, H,
        MODE: tl.constexpr, G: tl.constexpr, SW: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # Phase p of num_steps + 1 for batch rows tile program_id(0) and hidden units tile
    # program_id(1): first dh += (the gate gradients of processing step S - p, written by
    # phase p - 1) . W_hh for that step's live rows, then the pointwise backward of step
    # S - 1 - p. STATE_DH [B, H] fp32 (grad_hn on entry), STATE_DC [B, H] fp32 (LSTM):
    # carried between phases in place, a program touching only its own tile. DXG [N, G*H]:
    # gradient of the gate pre-activations for the input projection; DHG [N, G*H]: for
    # h W_hh^T + b_hh (GRU; for the others DHG is DXG).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_batch = rows < B
    tile = in_batch[:, None] & (offs_j[None, :] < H)
    state = rows[:, None] * H + offs_j[None, :]
    dh = tl.load(STATE_DH + state, mask=tile, other=0.0)
    if p > 0:
        s_a = num_steps - p
        off_a = tl.load(STEP_OFF + s_a)
        live_a = in_batch & (rows < tl.load(STEP_ROWS + s_a))
        row_a = (off_a + rows).to(tl.int64)  # int64: as in the forward
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, G * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            dg = tl.load(DHG + row_a[:, None] * (G * H) + offs_k[None, :],
                         mask=live_a[:, None] & (offs_k[None, :] < G * H), other=0.0)
            w = tl.load(W + offs_k[:, None] * sw_r + offs_j[None, :] * sw_k,
                        mask=(offs_k[:, None] < G * H) & (offs_j[None, :] < H), other=0.0)
            acc += tl.dot(dg, w.to(tl.float32), input_precision="ieee")
        dh += acc  # zero on rows not live at step S - p
    if p < num_steps:
        s = num_steps - 1 - p
        off = tl.load(STEP_OFF + s)
        live = in_batch & (rows < tl.load(STEP_ROWS + s))
        live_tile = live[:, None] & (offs_j[None, :] < H)
        n_idx = (off + rows).to(tl.int64)[:, None]  # int64: as in the forward
        dh_carry = dh
        if HAS_GRAD_OUT:
            dh += tl.load(GRAD_OUT + n_idx * H + offs_j[None, :], mask=live_tile, other=0.0)
        srow = SAVED + n_idx * (SW * H) + offs_j[None, :]
        xg = DXG + n_idx * (G * H) + offs_j[None, :]
        direct = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        if MODE == 0:
            i = tl.load(srow, mask=live_tile, other=0.0)
            f = tl.load(srow + H, mask=live_tile, other=0.0)
            g = tl.load(srow + 2 * H, mask=live_tile, other=0.0)
            o = tl.load(srow + 3 * H, mask=live_tile, other=0.0)
            tc = _tanh(tl.load(C_NEW + n_idx * H + offs_j[None, :], mask=live_tile,
                               other=0.0))
            c_prev = tl.load(C_PREV + n_idx * H + offs_j[None, :], mask=live_tile,
                             other=0.0)
            dc_ptr = STATE_DC + state
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
                d_pre = tl.where(out > 0, dh, 0.0)
            tl.store(xg, d_pre, mask=live_tile)
        # The part of dL/dh_prev that bypasses W_hh (GRU: dh * z; others 0); rows not live
        # at this step carry theirs over.
        tl.store(STATE_DH + state, tl.where(live_tile, direct, dh_carry), mask=tile)
    else:
        tl.store(STATE_DH + state, dh, mask=tile)


def rnn_layer_not_supported_reasons(inputs):
    reasons = []
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32")
    if inputs.get("projection"):
        reasons.append("LSTM projections (proj_size) have no Triton kernel")
    return reasons


def _steps(input, batch_sizes, reverse):
    """(row offsets, live rows) per step in processing order, on input's device."""
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        sizes = torch.full((T,), B, dtype=torch.int64)
    else:
        sizes = batch_sizes.to("cpu", torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    if reverse:
        sizes, offsets = sizes.flip(0), offsets.flip(0)
    to = dict(device=input.device, dtype=torch.int32)
    return offsets.to(**to), sizes.to(**to)


def _blocks(H):
    """(BLOCK_B, BLOCK_H, BLOCK_K): tl.dot's smallest tiles (16) for the batch rows and the
    hidden units (H = 512: 32 programs a batch tile), K in slices of up to 128. A program
    waits on its loads slice by slice, so fewer, wider slices cut a step's latency: on an
    H100 a forward step took 82 us at B16 and at B64 alike with 32 units and 32-wide slices
    (latency, not throughput; bench/RESULTS.md). The new sizes are not timed yet. Slices of
    half of H rounded up to a power of two at most, so that the K loop runs more than once
    at the small sizes the interpreted tests use."""
    return 16, 16, min(128, max(16, triton.next_power_of_2(H) // 2))


def _workspace(mode, N, H, device, need):
    from seqkern.ops.rnn_layer import workspace_numel
    return torch.zeros(workspace_numel(mode, N, H) if need else 0, dtype=torch.float32,
                       device=device)


def _views(mode, workspace, N, H):
    sw = 4 if mode in ("LSTM", "GRU") else 1
    saved = workspace[: N * sw * H]
    h_prev = workspace[N * sw * H: N * (sw + 1) * H]
    rest = workspace[N * (sw + 1) * H:]
    c_prev, c_new = (rest[: N * H], rest[N * H:]) if mode == "LSTM" else (rest, rest)
    return sw, saved, h_prev, c_prev, c_new


def rnn_layer_fwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  need_workspace, w_hr=None):
    assert w_hr is None, "rnn_layer_not_supported_reasons refuses projections"
    G, H, I = _GATES[mode], w_hh.shape[1], input.shape[-1]
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
    out = new_output((N, H), torch.float32, input.device)
    workspace = _workspace(mode, N, H, input.device, need_workspace)
    sw, saved, h_prev, c_prev, c_new = _views(mode, workspace, N, H)
    scratch = torch.empty(1, device=input.device)
    BLOCK_B, BLOCK_H, BLOCK_K = _blocks(H)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    for s in range(offsets.numel() if B and H else 0):
        _rnn_layer_fwd_step_kernel[grid](
            x_gates, bias_h if bias_h is not None else scratch, w_hh, w_hh.stride(0),
            w_hh.stride(1), offsets, sizes, s, state_h, state_c, out,
            saved if need_workspace else scratch, h_prev if need_workspace else scratch,
            c_prev if need_workspace and mode == "LSTM" else scratch,
            c_new if need_workspace and mode == "LSTM" else scratch,
            B, H, MODE=_MODES[mode], G=G, SW=sw, HAS_HG_BIAS=bias_h is not None,
            SAVE=need_workspace, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    h_n = state_h[offsets.numel() % 2]
    out = out.reshape(*input.shape[:-1], H).to(input.dtype)
    c_n = state_c.to(input.dtype) if mode == "LSTM" else h0.new_empty((0,))
    return out, h_n.to(input.dtype), c_n, workspace


def rnn_layer_bwd(mode, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                  workspace, grad_output, grad_hn, grad_cn, needs, w_hr=None):
    assert w_hr is None, "rnn_layer_not_supported_reasons refuses projections"
    G, H, I = _GATES[mode], w_hh.shape[1], input.shape[-1]
    x = input.reshape(-1, I).float()
    N, B = x.shape[0], h0.shape[0]
    offsets, sizes = _steps(input, batch_sizes, reverse)
    sw, saved, h_prev, c_prev, c_new = _views(mode, workspace, N, H)
    state_dh = (grad_hn.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                if grad_hn is not None else torch.zeros(B, H, device=x.device))
    state_dc = ((grad_cn.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                 if grad_cn is not None
                 else torch.zeros(B, H, device=x.device)) if mode == "LSTM"
                else torch.empty(0, device=x.device))
    # Every flat row is live at exactly one step, so the kernel writes all of them.
    dxg = new_output((N, G * H), torch.float32, x.device)
    dhg = new_output((N, G * H), torch.float32, x.device) if mode == "GRU" else dxg
    grad_out = (grad_output.reshape(N, H).float().contiguous() if grad_output is not None
                else torch.empty(0, device=x.device))
    BLOCK_B, BLOCK_H, BLOCK_K = _blocks(H)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    S = offsets.numel()
    for p in range(S + 1 if B and H and S else 0):
        _rnn_layer_bwd_step_kernel[grid](
            w_hh, w_hh.stride(0), w_hh.stride(1), offsets, sizes, p, S, grad_out,
            grad_output is not None, state_dh, state_dc, saved, h_prev, c_prev, c_new, dxg, dhg,
            B, H, MODE=_MODES[mode], G=G, SW=sw, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
            BLOCK_K=BLOCK_K)
    dt = input.dtype
    h_prev_rows = h_prev.view(N, H)
    # Only the products asked for (needs); an unwanted gradient is [0].
    has_bias = b_ih is not None
    make = (lambda: (dxg @ w_ih.float()).reshape(input.shape), lambda: state_dh,
            lambda: state_dc if mode == "LSTM" else None, lambda: dxg.t() @ x,
            lambda: dhg.t() @ h_prev_rows, lambda: dxg.sum(0) if has_bias else None,
            lambda: (dhg if mode == "GRU" else dxg).sum(0) if has_bias else None,
            lambda: None)  # d_w_hr: no projection here
    grads = [(make_grad() if want else None) for make_grad, want in zip(make, needs)]
    grads = [h0.new_empty((0,)) if g is None else g for g in grads]
    return [g.to(dt) if g.numel() else g for g in grads]
