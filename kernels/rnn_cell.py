"""Recurrent cells (LSTM, GRU, vanilla RNN) in Triton: one fused forward step and the
pointwise part of the backward. The layout and the `saved` tensor are described in
seqkern/ops/rnn_cells.py; the backward's products are torch.matmul calls made there.

Forward: a program owns a tile of batch rows and a tile of hidden units and computes all
gates of those units, x W_ih^T + h W_hh^T over K chunks with tl.dot, adds the biases,
applies the nonlinearities and writes only h', c' (LSTM) and the saved activations.
The cells differ by MODE (a constexpr): gate count, GRU's n gate keeping W_hn h + b_hn
apart for r * (...), and the epilogue. Long-standing tl APIs only (triton 3.6 and 3.9).
`saved` has the CPU layout (seqkern/ops/rnn_cells.py), in fp32.
"""
import contextlib

import torch
import triton
import triton.language as tl

from seqkern._debug import new_output

# Mode numbers, gate counts, dtypes and the portable activations are the layer kernel's.
from .rnn_layer import _DTYPES, _GATES, _MODES, _relu, _sigmoid, _tanh  # noqa: E402

_SAVED = {"LSTM": 5, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}  # saved numel / (B * H)


@triton.jit
def _product(A, sab, sak, W, swr, swk, row0, offs_b, offs_h, B, K, H,
             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST: tl.constexpr):
    """A[offs_b, :K] . W[row0 + offs_h, :K]^T as a [BLOCK_B, BLOCK_H] fp32 tile."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    rows = row0 + offs_h
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + offs_b[:, None] * sab + offs_k[None, :] * sak,
                    mask=(offs_b[:, None] < B) & (offs_k[None, :] < K), other=0.0)
        w_t = tl.load(W + rows[None, :] * swr + offs_k[:, None] * swk,
                      mask=(offs_h[None, :] < H) & (offs_k[:, None] < K), other=0.0)
        if UPCAST:
            # The interpreter keeps bf16 as raw bits and tl.dot would multiply those
            # (see kernels/attention.py); fp32 copies of the same values are exact.
            a = a.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc += tl.dot(a, w_t, input_precision="ieee")
    return acc


@triton.jit
def _bias(Bias, sb, row0, offs_h, H, HAS_BIAS: tl.constexpr):
    """Bias[row0 + offs_h] as a [1, BLOCK_H] fp32 row (zeros without bias)."""
    if HAS_BIAS:
        b = tl.load(Bias + (row0 + offs_h) * sb, mask=offs_h < H, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(offs_h).to(tl.float32)
    return b[None, :]


@triton.jit
def _gate(X, sxb, sxi, Hx, shb, shh, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k, B_ih, sbi,
          B_hh, sbh, gate, offs_b, offs_h, B, I, H, HAS_BIAS: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
          UPCAST: tl.constexpr):
    """(x W_ih[gate]^T + b_ih[gate], h W_hh[gate]^T + b_hh[gate]) for the tile."""
    row0 = gate * H
    gi = _product(X, sxb, sxi, W_ih, swi_r, swi_k, row0, offs_b, offs_h, B, I, H,
                  BLOCK_B, BLOCK_H, BLOCK_K, UPCAST)
    gh = _product(Hx, shb, shh, W_hh, swh_r, swh_k, row0, offs_b, offs_h, B, H, H,
                  BLOCK_B, BLOCK_H, BLOCK_K, UPCAST)
    gi += _bias(B_ih, sbi, row0, offs_h, H, HAS_BIAS)
    gh += _bias(B_hh, sbh, row0, offs_h, H, HAS_BIAS)
    return gi, gh


@triton.jit
def _rnn_cell_fwd_kernel(
        X, sxb, sxi, Hx, shb, shh, Cx, scb, sch, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k,
        B_ih, sbi, B_hh, sbh, H_out, C_out, Saved, B, I, H,
        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b[:, None] < B) & (offs_h[None, :] < H)
    out_offs = offs_b[:, None] * H + offs_h[None, :]
    # (x W_ih[g]^T + b_ih[g], h W_hh[g]^T + b_hh[g]) for the gates the mode has: LSTM i, f,
    # g, o; GRU r, z, n; RNN one. The ifs are on a constexpr, resolved when compiling.
    gi0, gh0 = _gate(X, sxb, sxi, Hx, shb, shh, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k, B_ih,
                     sbi, B_hh, sbh, 0, offs_b, offs_h, B, I, H, HAS_BIAS, BLOCK_B, BLOCK_H,
                     BLOCK_K, UPCAST)
    if MODE <= 1:
        gi1, gh1 = _gate(X, sxb, sxi, Hx, shb, shh, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k,
                         B_ih, sbi, B_hh, sbh, 1, offs_b, offs_h, B, I, H, HAS_BIAS, BLOCK_B,
                         BLOCK_H, BLOCK_K, UPCAST)
        gi2, gh2 = _gate(X, sxb, sxi, Hx, shb, shh, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k,
                         B_ih, sbi, B_hh, sbh, 2, offs_b, offs_h, B, I, H, HAS_BIAS, BLOCK_B,
                         BLOCK_H, BLOCK_K, UPCAST)
    if MODE == 0:
        gi3, gh3 = _gate(X, sxb, sxi, Hx, shb, shh, W_ih, swi_r, swi_k, W_hh, swh_r, swh_k,
                         B_ih, sbi, B_hh, sbh, 3, offs_b, offs_h, B, I, H, HAS_BIAS, BLOCK_B,
                         BLOCK_H, BLOCK_K, UPCAST)
    if MODE == 0:  # LSTM: i, f, g, o
        in_gate = _sigmoid(gi0 + gh0)
        forget = _sigmoid(gi1 + gh1)
        cand = _tanh(gi2 + gh2)
        out_gate = _sigmoid(gi3 + gh3)
        c_prev = tl.load(Cx + offs_b[:, None] * scb + offs_h[None, :] * sch, mask=mask,
                         other=0.0).to(tl.float32)
        c = forget * c_prev + in_gate * cand
        tanh_c = _tanh(c)
        h = out_gate * tanh_c
        tl.store(C_out + out_offs, c.to(C_out.dtype.element_ty), mask=mask)
        saved = Saved + offs_b[:, None] * (4 * H) + offs_h[None, :]
        tl.store(saved, in_gate, mask=mask)
        tl.store(saved + H, forget, mask=mask)
        tl.store(saved + 2 * H, cand, mask=mask)
        tl.store(saved + 3 * H, out_gate, mask=mask)
        tl.store(Saved + 4 * B * H + out_offs, c, mask=mask)
    elif MODE == 1:  # GRU: r, z, n with n = tanh(gi_n + r * (W_hn h + b_hn))
        reset = _sigmoid(gi0 + gh0)
        update = _sigmoid(gi1 + gh1)
        gh_n = gh2
        cand = _tanh(gi2 + reset * gh_n)
        h_prev = tl.load(Hx + offs_b[:, None] * shb + offs_h[None, :] * shh, mask=mask,
                         other=0.0).to(tl.float32)
        h = (1.0 - update) * cand + update * h_prev
        saved = Saved + offs_b[:, None] * (4 * H) + offs_h[None, :]
        tl.store(saved, reset, mask=mask)
        tl.store(saved + H, update, mask=mask)
        tl.store(saved + 2 * H, cand, mask=mask)
        tl.store(saved + 3 * H, gh_n, mask=mask)
    else:  # RNN, tanh (2) or relu (3)
        if MODE == 2:
            h = _tanh(gi0 + gh0)
        else:
            h = _relu(gi0 + gh0)
        tl.store(Saved + out_offs, h, mask=mask)
    tl.store(H_out + out_offs, h.to(H_out.dtype.element_ty), mask=mask)


@triton.jit
def _rnn_cell_gate_grads_kernel(
        Grad_h, sgb, sgh, Grad_c, sdb, sdh, Hx, shb, shh, Cx, scb, sch, Saved,
        D_ih, D_hh, D_hx, D_cx, B, H,
        MODE: tl.constexpr, HAS_GRAD_C: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b[:, None] < B) & (offs_h[None, :] < H)
    offs = offs_b[:, None] * H + offs_h[None, :]
    dh = tl.load(Grad_h + offs_b[:, None] * sgb + offs_h[None, :] * sgh, mask=mask,
                 other=0.0).to(tl.float32)
    out_ty = D_ih.dtype.element_ty
    if MODE == 0:
        saved = Saved + offs_b[:, None] * (4 * H) + offs_h[None, :]
        i = tl.load(saved, mask=mask, other=0.0)
        f = tl.load(saved + H, mask=mask, other=0.0)
        g = tl.load(saved + 2 * H, mask=mask, other=0.0)
        o = tl.load(saved + 3 * H, mask=mask, other=0.0)
        tanh_c = _tanh(tl.load(Saved + 4 * B * H + offs, mask=mask, other=0.0))
        dc = dh * o * (1.0 - tanh_c * tanh_c)
        if HAS_GRAD_C:
            dc += tl.load(Grad_c + offs_b[:, None] * sdb + offs_h[None, :] * sdh, mask=mask,
                          other=0.0).to(tl.float32)
        c_prev = tl.load(Cx + offs_b[:, None] * scb + offs_h[None, :] * sch, mask=mask,
                         other=0.0).to(tl.float32)
        tl.store(D_cx + offs, (dc * f).to(out_ty), mask=mask)
        d = D_ih + offs_b[:, None] * (4 * H) + offs_h[None, :]
        tl.store(d, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
        tl.store(d + H, (dc * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
        tl.store(d + 2 * H, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
        tl.store(d + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(out_ty), mask=mask)
    elif MODE == 1:
        saved = Saved + offs_b[:, None] * (4 * H) + offs_h[None, :]
        r = tl.load(saved, mask=mask, other=0.0)
        z = tl.load(saved + H, mask=mask, other=0.0)
        n = tl.load(saved + 2 * H, mask=mask, other=0.0)
        gh_n = tl.load(saved + 3 * H, mask=mask, other=0.0)
        h_prev = tl.load(Hx + offs_b[:, None] * shb + offs_h[None, :] * shh, mask=mask,
                         other=0.0).to(tl.float32)
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dz = dh * (h_prev - n) * z * (1.0 - z)
        dr = dn * gh_n * r * (1.0 - r)
        d_i = D_ih + offs_b[:, None] * (3 * H) + offs_h[None, :]
        d_h = D_hh + offs_b[:, None] * (3 * H) + offs_h[None, :]
        tl.store(d_i, dr.to(out_ty), mask=mask)
        tl.store(d_h, dr.to(out_ty), mask=mask)
        tl.store(d_i + H, dz.to(out_ty), mask=mask)
        tl.store(d_h + H, dz.to(out_ty), mask=mask)
        tl.store(d_i + 2 * H, dn.to(out_ty), mask=mask)
        tl.store(d_h + 2 * H, (dn * r).to(out_ty), mask=mask)
        tl.store(D_hx + offs, (dh * z).to(out_ty), mask=mask)
    else:
        y = tl.load(Saved + offs, mask=mask, other=0.0)
        if MODE == 2:
            d = dh * (1.0 - y * y)
        else:
            d = tl.where(y <= 0.0, 0.0, dh)  # NaN passes dh, as torch
        tl.store(D_ih + offs, d.to(out_ty), mask=mask)


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _blocks(B, H, device, dtype):
    # tl.dot needs every tile dim >= 16. Interpreted (CPU tensors) the smallest tiles keep
    # the numpy work per program down; compiled, larger batch tiles reuse each weight tile.
    # fp32 products are "ieee" FMA dots, each thread holding whole K slices of both
    # operands: 64 x 64 tiles spilled up to 712 bytes of stack, 32 x 32 none; the
    # forward runs 8 warps (4 spilled 300-700 bytes in every dtype; .ci/triton_compile.py,
    # sm_80 and sm_90). Chosen by that report, not timed.
    if device.type == "cpu":
        return 16, 32, 32
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    return (block_b, 32, 32) if dtype == torch.float32 else (block_b, 64, 64)


def rnn_cell_not_supported_reasons(inputs):
    """Why these kernels cannot run `inputs` (seqkern.ops.rnn_cells._inputs); [] if they can."""
    reasons = []
    if inputs["dtype"] not in _DTYPES:
        reasons.append(f"dtype {inputs['dtype']} is not one of fp16, bf16, fp32")
    if inputs["mode"] not in _MODES:
        reasons.append(f"mode {inputs['mode']!r} is not one of {sorted(_MODES)}")
    return reasons


def rnn_cell_fwd(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    B, I = input.shape
    H = hx.shape[1]
    device, dtype = input.device, input.dtype
    lstm = mode == "LSTM"
    h = new_output((B, H), dtype, device)
    c = new_output((B, H) if lstm else (0, 0), dtype, device)
    saved = new_output((B * _SAVED[mode] * H,), torch.float32, device)
    if B == 0 or H == 0:
        return h, c, saved
    block_b, block_h, block_k = _blocks(B, H, device, dtype)
    cx_arg = cx if lstm else hx
    has_bias = b_ih is not None
    b_ih_arg, b_hh_arg = (b_ih, b_hh) if has_bias else (w_ih, w_hh)
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_h))
    with _device_guard(input):
        _rnn_cell_fwd_kernel[grid](
            input, input.stride(0), input.stride(1), hx, hx.stride(0), hx.stride(1),
            cx_arg, cx_arg.stride(0), cx_arg.stride(1),
            w_ih, w_ih.stride(0), w_ih.stride(1), w_hh, w_hh.stride(0), w_hh.stride(1),
            b_ih_arg, b_ih_arg.stride(0), b_hh_arg, b_hh_arg.stride(0),
            h, c if lstm else h, saved, B, I, H,
            MODE=_MODES[mode], HAS_BIAS=has_bias, BLOCK_B=block_b, BLOCK_H=block_h,
            BLOCK_K=block_k, UPCAST=device.type == "cpu" and dtype == torch.bfloat16,
            num_warps=8)
    return h, c, saved


def rnn_cell_gate_grads(mode, grad_h, grad_c, hx, cx, h, saved):
    B, H = hx.shape
    device, dtype = hx.device, hx.dtype
    lstm, gru = mode == "LSTM", mode == "GRU"
    d_ih = new_output((B, _GATES[mode] * H), dtype, device)
    d_hh = new_output((B, 3 * H) if gru else (0, 0), dtype, device)
    d_hx = new_output((B, H) if gru else (0, 0), dtype, device)
    d_cx = new_output((B, H) if lstm else (0, 0), dtype, device)
    if B == 0 or H == 0:
        return d_ih, d_hh, d_hx, d_cx
    saved = saved.contiguous()
    grad_c_arg = grad_c if grad_c is not None else grad_h
    cx_arg = cx if lstm else hx
    block_b, block_h = 16, 32 if device.type == "cpu" else 64
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_h))
    with _device_guard(hx):
        _rnn_cell_gate_grads_kernel[grid](
            grad_h, grad_h.stride(0), grad_h.stride(1),
            grad_c_arg, grad_c_arg.stride(0), grad_c_arg.stride(1),
            hx, hx.stride(0), hx.stride(1), cx_arg, cx_arg.stride(0), cx_arg.stride(1),
            saved, d_ih, d_hh if gru else d_ih,
            d_hx if gru else d_ih, d_cx if lstm else d_ih, B, H,
            MODE=_MODES[mode], HAS_GRAD_C=grad_c is not None, BLOCK_B=block_b,
            BLOCK_H=block_h)
    return d_ih, d_hh, d_hx, d_cx
