"""csrc/cuda's kernels tested without a GPU: their real sources, rewritten into host C++ and
run as fibers, one per CUDA thread (tests/cuda_emulation), against the float64 reference.

The emulation checks indexing, masking, synchronisation, fragment layouts and plan choices,
not timing or memory-model corner cases of real hardware. Where g++ has AddressSanitizer the
harnesses are built with it, every emulated buffer (shared memory included) at its exact
size: a read or write past one fails the test even where the results come out right
(test_sanitizer_stops_a_stray_read shows it does). Needs g++ and the CUDA headers (no GPU, no
nvcc); skips otherwise. Select with `-m cuda_emulation`, deselect with
`-m "not cuda_emulation"`.
"""
import concurrent.futures
import functools
import os
import shutil
import subprocess

import pytest
import torch

from seqkern import reference
from tests.attention_cases import fresh_seed, make_masks, make_qkv, reference64
from tests.cuda_emulation import build
from tests.cuda_emulation.attention import run_attention
from tests.cuda_emulation.rnn import GATES, LayerCase, run_cell, run_layer
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative

pytestmark = pytest.mark.cuda_emulation


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """harness(name) -> path of the built executable, with AddressSanitizer where g++ has it:
    then a kernel's read or write past any buffer, global or shared, fails the test even where
    the results come out right. The first call starts every build (each harness of
    build.HARNESSES, and "stray_read": the layer harness with _STRAY_READ, where ASan is),
    the one asked for first, two at a time: a build takes 3-45 s of one core, most of this
    file's time."""
    reason = build.missing_toolchain()
    if reason:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    root = tmp_path_factory.mktemp("cuda_emulation")
    sanitize = build.sanitizer_missing() is None
    jobs = {name: functools.partial(build.build, name, root / name, sanitize=sanitize)
            for name in build.HARNESSES}
    # The runtime's checks again with its fibers on ucontext (the switch off x86-64).
    jobs["runtime_ucontext"] = functools.partial(
        build.build, "runtime_harness", root / "runtime_ucontext", sanitize=sanitize,
        defines=("EMU_FIBERS_UCONTEXT",))
    if sanitize:
        jobs["stray_read"] = functools.partial(_build_stray_read, root / "stray_read")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {}

    def get(name):
        if not futures:
            for job in [name] + [n for n in jobs if n != name]:
                futures[job] = pool.submit(jobs[job])
        return futures[name].result()

    yield get
    pool.shutdown(wait=True, cancel_futures=True)


# ---- attention ---------------------------------------------------------------------------

F16, BF16 = torch.float16, torch.bfloat16
# (B, Hq, Hkv, L, S, D, Dv), dtype, mask kind (tests/attention_cases.make_masks), layout,
# dropout_p. Layouts: "contiguous"; "packed" ([B, L, H, D] projections viewed as
# [B, H, L, D]); "unaligned" (rows of D + 3 elements: no 16-byte staging); "strided" (every
# dim strided; the binding makes the head dim unit-stride, as here).
ATTENTION_CASES = [
    ((2, 3, 3, 7, 63, 40, 40), F16, "none", "contiguous", 0.0),
    ((2, 3, 3, 7, 63, 40, 40), BF16, "causal+pad", "packed", 0.0),
    ((1, 2, 2, 63, 7, 40, 40), BF16, "floatinf", "unaligned", 0.0),
    ((1, 4, 2, 63, 63, 64, 64), F16, "bool", "contiguous", 0.0),
    ((2, 2, 1, 63, 130, 64, 64), BF16, "causal+pad", "contiguous", 0.2),
    ((1, 2, 2, 63, 63, 64, 40), F16, "float", "packed", 0.1),
    ((1, 2, 1, 130, 63, 96, 96), F16, "float+pad", "unaligned", 0.0),
    ((1, 1, 1, 130, 130, 96, 96), BF16, "causal", "contiguous", 0.0),
    ((1, 1, 1, 63, 130, 128, 128), F16, "bool4+pad", "strided", 0.0),
    ((2, 1, 1, 63, 130, 128, 128), BF16, "holes", "contiguous", 0.3),
    ((1, 1, 1, 7, 63, 256, 256), F16, "causal+floatinf", "contiguous", 0.0),
    ((1, 2, 1, 1, 1, 64, 64), BF16, "none", "contiguous", 0.0),
    ((2, 1, 1, 1, 130, 40, 40), F16, "pad", "packed", 0.0),
    ((1, 2, 2, 130, 1, 64, 64), F16, "causal", "contiguous", 0.5),
    ((2, 2, 2, 63, 1, 64, 64), BF16, "bool+pad", "packed", 0.0),  # many fully masked rows
    ((1, 4, 1, 130, 130, 40, 40), F16, "causal+float+pad", "contiguous", 0.0),
    ((2, 2, 1, 130, 130, 96, 96), F16, "bool+pad", "packed", 0.15),
    ((1, 2, 2, 7, 7, 128, 128), BF16, "float", "unaligned", 0.0),
    ((1, 1, 1, 63, 7, 256, 256), BF16, "pad", "strided", 0.0),
]


def _qkv(shape, dtype, layout):
    B, Hq, Hkv, L, S, D, Dv = shape
    if layout != "unaligned":
        return make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype, layout)
    return tuple(torch.randn(B, T, H, E + 3, dtype=torch.float64)[..., :E].transpose(1, 2)
                 .to(dtype) for H, T, E in ((Hq, L, D), (Hkv, S, D), (Hkv, S, Dv)))


def _case_id(case):
    (B, Hq, Hkv, L, S, D, Dv), dtype, mask, layout, p = case
    dv = "" if Dv == D else f"_dv{Dv}"
    return f"{str(dtype)[6:]}-B{B}H{Hq}/{Hkv}-L{L}S{S}-d{D}{dv}-{mask}-{layout}-p{p}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
def test_attention_fwd_bwd(harness, tmp_path, case):
    shape, dtype, mask_kind, layout, dropout_p = case
    B, Hq, Hkv, L, S, D, Dv = shape
    q, k, v = _qkv(shape, dtype, layout)
    attn_mask, kpm, causal = make_masks(mask_kind, B, Hq, L, S, dtype)
    if kpm is not None and B > 1:
        kpm[-1] = True  # a fully padded batch row: zeros out, zero grads
    seed = fresh_seed() if dropout_p else None
    scale = D ** -0.5
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want_out, want_lse = reference64(q64, k64, v64, attn_mask, kpm, causal, dropout_p, scale,
                                     seed)
    grad_out = torch.randn_like(want_out).to(dtype)
    want_grads = torch.autograd.grad(want_out, (q64, k64, v64), grad_out.double())

    got = run_attention(harness("attention_harness"), tmp_path, q, k, v, attn_mask, kpm, causal,
                        dropout_p, scale, seed, grad_out)

    # PyTorch's own same-dtype computation: the yardstick of the relative rule
    qd, kd, vd = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    keep = reference.dropout_keep_mask(seed, B, Hq, L, S, dropout_p) if dropout_p else None
    peer_out, _ = reference.attention(qd, kd, vd, attn_mask, dropout_p, causal, scale, kpm, keep)
    peer_grads = torch.autograd.grad(peer_out, (qd, kd, vd), grad_out)

    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got["lse"]), finite), "lse: finite pattern differs"
    assert_close("lse", got["lse"][finite], want_lse[finite], torch.float32)
    assert_close_relative("out", got["out"], want_out.detach(), peer_out.detach(), FWD_FACTOR)
    for name, g, w, p in zip(("dq", "dk", "dv"), (got["dq"], got["dk"], got["dv"]), want_grads,
                             peer_grads, strict=True):
        assert_close_relative(name, g, w, p, BWD_FACTOR)


# ---- recurrent cells and layers ----------------------------------------------------------

def _check(name, got, want, peer, factor):
    """got (the kernel's, float64) against the float64 reference: by the float32 table, or for
    fp16/bf16 by the relative rule against `peer` (PyTorch's same-dtype result)."""
    if peer is None:
        assert_close(name, got, want.detach(), torch.float32)
    else:
        assert_close_relative(name, got, want.detach(), peer.detach(), factor)


def _storage_values(t, dtype):
    """t rounded to what the kernels read from dtype storage (float64 again)."""
    return t.to(dtype).double()


def _peer_grads(fn, inputs, dtype, grads_out):
    """fn on inputs cast to dtype, differentiated in dtype: (outputs, grads) or Nones."""
    if dtype == torch.float32:
        return None, [None] * len(inputs)
    low = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    outs = fn(*low)
    return outs, torch.autograd.grad(outs, low, [g.to(dtype) for g in grads_out])


CELL_CASES = [(mode, dtype, B, H, bias) for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
              for dtype, B, H, bias in ((torch.float32, 3, 7, True), (BF16, 5, 16, False),
                                        (F16, 2, 9, True))]


@pytest.mark.parametrize("mode,dtype,B,H,bias", CELL_CASES,
                         ids=[f"{m}-{str(d)[6:]}-B{b}H{h}-bias{int(bi)}"
                              for m, d, b, h, bi in CELL_CASES])
def test_rnn_cell_fwd_and_gate_grads(harness, tmp_path, mode, dtype, B, H, bias):
    G, I = GATES[mode], 5
    lstm, gru = mode == "LSTM", mode == "GRU"
    sv = lambda t: _storage_values(t, dtype)  # noqa: E731
    x = torch.randn(B, I, dtype=torch.float64)
    w_ih = torch.randn(G * H, I, dtype=torch.float64) * 0.4
    w_hh = torch.randn(G * H, H, dtype=torch.float64) * 0.4
    b_ih, b_hh = (sv(torch.randn(G * H, dtype=torch.float64) * 0.3) if bias else None
                  for _ in range(2))
    hx, cx = (sv(torch.randn(B, H, dtype=torch.float64) * 0.5) for _ in range(2))
    grad_h, grad_c = (sv(torch.randn(B, H, dtype=torch.float64)) for _ in range(2))

    got = run_cell(harness("rnn_cell_harness"), tmp_path, mode, dtype, x @ w_ih.T, hx @ w_hh.T,
                   b_ih, b_hh, hx, cx, grad_h, grad_c)

    def cell(x, hx, w_ih, w_hh, cx=None, b_ih=None, b_hh=None):
        if lstm:
            return reference.lstm_cell(x, hx, cx, w_ih, w_hh, b_ih, b_hh)
        if gru:
            return (reference.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh),)
        return (reference.rnn_cell(x, hx, w_ih, w_hh, b_ih, b_hh, mode[4:].lower()),)

    inputs = [x, hx, w_ih, w_hh] + [cx] * lstm + ([b_ih, b_hh] if bias else [])
    names = ["dx", "dhx", "dW_ih", "dW_hh"] + ["dcx"] * lstm + ["db_ih", "db_hh"] * bias
    wrt = [t.clone().requires_grad_(True) for t in inputs]
    kw = dict(zip(["cx"] * lstm + ["b_ih", "b_hh"] * bias, wrt[4:]))
    want_outs = cell(*wrt[:4], **kw)
    grads_out = [grad_h] + [grad_c] * lstm
    want = torch.autograd.grad(want_outs, wrt, grads_out)
    peer_outs, peer = _peer_grads(
        lambda *t: cell(*t[:4], **dict(zip(kw, t[4:]))), inputs, dtype, grads_out)

    d_ih = got["d_ih"]
    d_hh = got["d_hh"] if gru else d_ih
    kernel = [d_ih @ w_ih, d_hh @ w_hh + (got["d_hx"] if gru else 0), d_ih.T @ x, d_hh.T @ hx] + \
        ([got["d_cx"]] if lstm else []) + [d_ih.sum(0), d_hh.sum(0)] * bias
    for i, name in enumerate(["h", "c"][:1 + lstm]):
        _check(name, got[name], want_outs[i], peer_outs and peer_outs[i], FWD_FACTOR)
    for name, k, w, p in zip(names, kernel, want, peer, strict=True):
        _check(name, k, w, p, BWD_FACTOR)


def _lengths_to_batch_sizes(lengths):
    """batch_sizes of the packed sequence torch makes from these (unsorted) lengths."""
    padded = torch.zeros(max(lengths), len(lengths), 1)
    lengths = torch.tensor(lengths, device="cpu")  # torch wants CPU lengths on any device
    packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, enforce_sorted=False)
    return [int(b) for b in packed.batch_sizes]


LAYER_CASES = [
    # the persistent kernel: one cooperative launch, W_hh in shared memory
    LayerCase("LSTM", torch.float32, 4, 5, 13),
    LayerCase("LSTM", torch.float32, 5, 5, 13, _lengths_to_batch_sizes([3, 5, 1, 5, 2]),
              reverse=True, strided=True),
    LayerCase("GRU", torch.float32, 4, 5, 11, _lengths_to_batch_sizes([2, 4, 4, 1, 3]),
              min_work=0),  # several blocks: grid barriers between steps
    LayerCase("RNN_TANH", torch.float32, 5, 4, 9, _lengths_to_batch_sizes([5, 2, 4, 1]),
              sms=2, min_work=0),
    LayerCase("LSTM", torch.float32, 5, 1, 20, reverse=True),
    LayerCase("LSTM", torch.float32, 2, 12, 40, _lengths_to_batch_sizes([1, 2] * 5 + [2, 1])),
    LayerCase("LSTM", BF16, 4, 3, 16, reverse=True, strided=True),
    LayerCase("LSTM", BF16, 5, 6, 20, _lengths_to_batch_sizes([4, 5, 1, 3, 5, 2]),
              min_work=0),
    LayerCase("GRU", BF16, 6, 17, 10, _lengths_to_batch_sizes(
        [6, 1, 3, 6, 2, 5, 4, 6, 1, 1, 2, 3, 5, 6, 4, 2, 1]), strided=True),
    # too many blocks for one multiprocessor's cooperative launch: per step
    LayerCase("RNN_TANH", BF16, 3, 2, 33, sms=1, persistent=False),
    # the per-step fallback: no cooperative launch
    LayerCase("GRU", torch.float32, 3, 10, 20, reverse=True, bias=False, coop=False),
    LayerCase("RNN_RELU", torch.float32, 5, 4, 9, _lengths_to_batch_sizes([2, 5, 5, 3]),
              reverse=True, strided=True, coop=False),
    LayerCase("LSTM", torch.float32, 3, 1, 24, reverse=True, coop=False, min_work=0),
    LayerCase("GRU", BF16, 3, 6, 12, _lengths_to_batch_sizes([3, 1, 2, 3, 3, 2]),
              reverse=True, coop=False),
    LayerCase("LSTM", BF16, 4, 3, 16, coop=False),
    # batch-lane blocks (SEQKERN_CUDA_RNN_LANES=1): 64 rows a pass over a part-filled tile,
    # K not a multiple of 4 (no float4 staging)
    LayerCase("LSTM", torch.float32, 3, 33, 13, reverse=True, lanes=True),
    LayerCase("RNN_RELU", torch.float32, 2, 70, 9, lanes=True, sms=2),  # two passes a step
    LayerCase("RNN_TANH", torch.float32, 2, 64, 136, lanes=True, sms=17),  # 2176 float4s
    LayerCase("GRU", BF16, 4, 40, 10, _lengths_to_batch_sizes(
        [4, 1, 3, 4, 2] * 8), strided=True, lanes=True),  # live rows fall below the tile
    LayerCase("LSTM", BF16, 3, 32, 20, _lengths_to_batch_sizes([3, 2] * 14 + [1] * 4),
              reverse=True, lanes=True, sms=3),  # 32-row tiles
    # the backward stages K = 144 in chunks of 96 and 48 columns (small shared memory)
    LayerCase("GRU", torch.float32, 3, 32, 48, lanes=True, sms=6, smem=30720),
    # 16-row tiles: two K slices a warp
    LayerCase("LSTM", torch.float32, 3, 16, 28, _lengths_to_batch_sizes(
        [3, 1, 2, 3, 3, 1, 2, 2, 3, 1, 1, 3, 2, 3, 1, 2]), lanes=True, sms=4),
    LayerCase("RNN_TANH", BF16, 2, 9, 11, reverse=True, strided=True, lanes=True),
    # tensor-core blocks (SEQKERN_CUDA_RNN_MMA=1): K padded to 16 (13 -> 16, backward 52 ->
    # 64), no float4 staging; two m16 tiles (LSTM, GRU: 32 and 24 weight rows) or one
    LayerCase("LSTM", BF16, 4, 5, 13, reverse=True, strided=True, mma=True),
    LayerCase("GRU", F16, 5, 20, 10, _lengths_to_batch_sizes(
        [5, 1, 3, 5, 2, 4, 4, 5, 1, 1, 2, 3, 5, 5, 4, 2, 1, 3, 2, 5]), mma=True),  # 32-row tile
    LayerCase("RNN_TANH", BF16, 3, 33, 16, mma=True),  # two passes of 32 rows a step
    LayerCase("RNN_RELU", F16, 4, 1, 9, reverse=True, bias=False, mma=True),
    # reverse packed: rows that start late read h0 from either parity of the state's copy
    LayerCase("GRU", BF16, 5, 6, 12, _lengths_to_batch_sizes([5, 4, 2, 5, 1, 3]),
              reverse=True, strided=True, mma=True),
    # the backward stages K = 160 in two chunks of 80 (small shared memory), five blocks
    LayerCase("LSTM", F16, 3, 8, 40, _lengths_to_batch_sizes([3, 1, 2, 3, 3, 1, 2, 2]),
              mma=True, sms=3, smem=20000),
    # fp32 on TF32 (SEQKERN_CUDA_RNN_TF32=1): k steps of 8, K = 13 padded to 16; packed
    # reverse; two passes of 32 rows with the backward's K = 160 in chunks
    LayerCase("LSTM", torch.float32, 4, 5, 13, reverse=True, strided=True, mma=True,
              tf32=True),
    LayerCase("GRU", torch.float32, 5, 6, 12, _lengths_to_batch_sizes([5, 4, 2, 5, 1, 3]),
              reverse=True, mma=True, tf32=True),
    LayerCase("LSTM", torch.float32, 3, 40, 40, mma=True, tf32=True, sms=3, smem=47000),
    # two staging buffers (SEQKERN_CUDA_RNN_PREFETCH=1): the backward's K = 160 in two
    # chunks of 80, each issued while the one before multiplies; passes of 32 and 8 rows, the
    # second's first chunk issued during the first's last; packed rows that end at every
    # step, so that the backward's passes multiply fewer rows (n_a) than they update (n_b)
    LayerCase("LSTM", BF16, 4, 40, 40, _lengths_to_batch_sizes(
        [4, 1, 3, 4, 2, 4, 4, 1, 3, 2] * 4), mma=True, prefetch=True, sms=6, smem=43000),
    LayerCase("LSTM", torch.float32, 3, 40, 40, mma=True, tf32=True, prefetch=True, sms=6,
              smem=66000),
    LayerCase("RNN_TANH", F16, 3, 33, 16, reverse=True, mma=True, prefetch=True),  # 32 + 1
    # K = 264 (272 padded) in three chunks of 96, 96 and 80 both ways (the forward's too)
    LayerCase("RNN_TANH", BF16, 3, 20, 264, mma=True, prefetch=True, sms=33, smem=45500),
    # many blocks at once: 8 (H = 64, B = 64: two passes of 32 rows) and 12 (packed, reverse)
    LayerCase("LSTM", BF16, 3, 64, 64, mma=True, sms=8),
    LayerCase("GRU", F16, 3, 48, 96, _lengths_to_batch_sizes([3, 1, 2] * 16), reverse=True,
              mma=True, sms=12),
    # wide backward blocks (SEQKERN_CUDA_RNN_WIDE=1): tensor cores with 16 units in 16-row
    # passes (H = 40: three blocks, the last part-filled; B = 40: three passes, packed rows
    # ending at every step), TF32 with K in chunks and two staging buffers, CUDA-core blocks
    # of 8 units
    LayerCase("LSTM", BF16, 4, 40, 40, _lengths_to_batch_sizes(
        [4, 1, 3, 4, 2, 4, 4, 1, 3, 2] * 4), mma=True, wide=True, sms=6),
    LayerCase("GRU", F16, 3, 20, 24, reverse=True, mma=True, wide=True, prefetch=True),
    LayerCase("LSTM", torch.float32, 3, 17, 40, mma=True, tf32=True, wide=True, prefetch=True,
              sms=6, smem=37500),
    LayerCase("RNN_TANH", BF16, 3, 5, 20, reverse=True, strided=True, mma=True, wide=True),
    LayerCase("GRU", torch.float32, 3, 6, 20, _lengths_to_batch_sizes([3, 1, 2, 3, 3, 2]),
              wide=True, sms=8, min_work=0),
    # tensor-core blocks over the batch too (SEQKERN_CUDA_RNN_SPLIT=1): two groups of five
    # blocks, the second's pass part-filled (B = 40: rows 32..39)
    LayerCase("LSTM", BF16, 3, 40, 40, reverse=True, strided=True, mma=True, split=True,
              sms=10),
    # more passes than groups: group 0 takes rows 0 and 64, group 1 rows 32 (strided passes,
    # the next one staged early with two buffers); packed reverse rows ending at every step,
    # so that a group has no rows at some steps
    LayerCase("GRU", F16, 4, 80, 24, _lengths_to_batch_sizes([4, 1, 3, 2] * 20), reverse=True,
              mma=True, split=True, prefetch=True, sms=6),
    LayerCase("RNN_TANH", BF16, 3, 70, 16, mma=True, split=True, sms=6),  # three groups
    LayerCase("LSTM", torch.float32, 3, 33, 16, mma=True, tf32=True, split=True, sms=4),
    # with the wide backward: its 16-row passes in three groups, the forward in one (five
    # blocks of 8 units do not fit twice on nine multiprocessors)
    LayerCase("LSTM", BF16, 3, 40, 40, _lengths_to_batch_sizes([3, 1, 2, 3] * 10), mma=True,
              wide=True, split=True, sms=9),
]


def _layer_id(c):
    packed = "packed" if c.batch_sizes else "padded"
    return (f"{c.mode}-{str(c.dtype)[6:]}-T{c.steps}B{c.batch}H{c.hidden}-{packed}"
            f"{'-reverse' * c.reverse}{'-strided' * c.strided}{'-nobias' * (not c.bias)}"
            f"-{'persistent' if c.persistent else 'per_step'}-sms{c.sms}-minwork{c.min_work}"
            f"{'-lanes' * c.lanes}{'-mma' * c.mma}{'-tf32' * c.tf32}{'-prefetch' * c.prefetch}"
            f"{'-wide' * c.wide}{'-split' * c.split}"
            f"-smem{c.smem}")


@pytest.mark.parametrize("case", LAYER_CASES, ids=_layer_id)
def test_rnn_layer_fwd_bwd(harness, tmp_path, case):
    c = case
    G, H, B, N, I = GATES[c.mode], c.hidden, c.batch, c.rows, 3
    lstm, gru = c.mode == "LSTM", c.mode == "GRU"
    sv = lambda t: _storage_values(t, c.dtype)  # noqa: E731
    x = torch.randn(N, I, dtype=torch.float64)
    w_ih = torch.randn(G * H, I, dtype=torch.float64) * 0.3
    w_hh = sv(torch.randn(G * H, H, dtype=torch.float64) * 1.6 / H ** 0.5)
    b_ih, b_hh = (torch.randn(G * H, dtype=torch.float64) * 0.3 if c.bias else None
                  for _ in range(2))
    h0, c0 = (sv(torch.randn(B, H, dtype=torch.float64) * 0.5) for _ in range(2))
    grad_out = sv(torch.randn(N, H, dtype=torch.float64))
    grad_hn, grad_cn = (torch.randn(B, H, dtype=torch.float64) for _ in range(2))
    bias_x = bias_hn = None
    if c.bias:
        bias_x = torch.cat([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]]) if gru else b_ih + b_hh
        bias_hn = b_hh[2 * H:] if gru else None

    got, plan = run_layer(harness("rnn_layer_harness"), tmp_path, c, x @ w_ih.T, bias_x,
                          bias_hn, w_hh, h0, c0, grad_out, grad_hn, grad_cn)
    path = int(c.persistent)  # the plan took the intended path, and launched by it
    assert f"fwd persistent={path} " in plan and f"bwd persistent={path} " in plan, plan
    assert f"coop_launches={path};" in plan and plan.endswith(f"coop_launches={path}"), plan
    # tensor-core plans (16 or 32 rows), batch-lane plans (B > 8; the backward's 8 units a
    # block take at most 32 rows), else 1 to 8 rows
    tile = (64 if B > 32 else 32 if B > 16 else 16) if c.lanes and B > 8 else None
    if c.mma:
        tile = 32 if B > 16 else 16
    for direction, most in (("fwd", 64), ("bwd", 16 if c.wide and c.mma else 32)):
        got_tile = int(plan.split(f"{direction} tile=")[1].split()[0])
        assert got_tile == min(tile, most) if tile else got_tile <= 8, plan
        assert f"mma={int(c.mma)} prefetch={int(c.prefetch)}" in plan.split(
            f"{direction} tile=")[1].split(";")[0], plan  # this direction's section only
    # wide (SEQKERN_CUDA_RNN_WIDE=1): the backward's tensor-core blocks take 16 units, its
    # CUDA-core blocks at least 8 (the planner may take more)
    bwd_units = int(plan.split("bwd tile=")[1].split("units=")[1].split()[0])
    if c.wide and c.mma:
        assert bwd_units == 16, plan
    elif c.wide and not c.lanes and c.persistent:  # min_work 0: 4 units without wide
        assert bwd_units == 8 if c.min_work == 0 else bwd_units >= 8, plan
    # split: tensor-core blocks in as many batch groups as a step has passes and the
    # multiprocessors hold (rnn_layer.cu's mma_plan); else one group
    split_groups = []
    for direction in ("fwd", "bwd"):
        section = plan.split(f"{direction} tile=")[1].split(";")[0]
        tile_d, units_d = int(section.split()[0]), int(section.split("units=")[1].split()[0])
        want = 1
        if c.split and c.mma and c.persistent:
            want = max(1, min(-(-B // tile_d), c.sms // -(-H // units_d)))
        assert f"groups={want}" in section, plan
        split_groups.append(want)
    assert not c.split or max(split_groups) > 1, "a split case that splits nothing"
    if c.smem < 232448:  # the small shared memory made the backward stage K in chunks
        assert int(plan.split("bwd tile=")[1].split("k_chunk=")[1].split()[0]) < G * H, plan
    if c.mode.startswith("RNN") and c.smem < 232448:  # ... and the forward (K = H) too
        assert int(plan.split("fwd tile=")[1].split("k_chunk=")[1].split()[0]) < H, plan

    kind = "RNN" if c.mode.startswith("RNN") else c.mode
    nonlinearity = "relu" if c.mode == "RNN_RELU" else "tanh"
    batch_sizes = torch.tensor(c.batch_sizes) if c.batch_sizes else None

    def layer(x, h0, w_ih, w_hh, c0=None, b_ih=None, b_hh=None):
        xin = x if c.batch_sizes else x.view(c.steps, B, I)
        out, h_n, c_n = reference.recurrent_layer(kind, xin, h0, (w_ih, w_hh, b_ih, b_hh), c0=c0,
                                                  reverse=c.reverse, nonlinearity=nonlinearity,
                                                  batch_sizes=batch_sizes)
        return (out.reshape(N, H), h_n) + ((c_n,) if lstm else ())

    inputs = [x, h0, w_ih, w_hh] + [c0] * lstm + ([b_ih, b_hh] if c.bias else [])
    names = ["dx", "dh0", "dW_ih", "dW_hh"] + ["dc0"] * lstm + ["db_ih", "db_hh"] * c.bias
    kw_names = ["c0"] * lstm + ["b_ih", "b_hh"] * c.bias
    wrt = [t.clone().requires_grad_(True) for t in inputs]
    want_outs = layer(*wrt[:4], **dict(zip(kw_names, wrt[4:])))
    grads_out = [grad_out, grad_hn] + [grad_cn] * lstm
    want = torch.autograd.grad(want_outs, wrt, grads_out)
    # TF32 has no same-dtype PyTorch result on the CPU: bf16's (3 mantissa bits fewer) bounds it
    peer_outs, peer = _peer_grads(lambda *t: layer(*t[:4], **dict(zip(kw_names, t[4:]))),
                                  inputs, BF16 if c.tf32 else c.dtype, grads_out)

    d_gx = got["d_gx"]
    d_gh = got["d_gh"] if gru else d_gx
    # what the binding makes of the gate gradients
    kernel = [d_gx @ w_ih, got["d_h0"], d_gx.T @ x, d_gh.T @ got["h_prev"]] + \
        ([got["d_c0"]] if lstm else []) + [d_gx.sum(0), d_gh.sum(0)] * c.bias
    for i, name in enumerate(["out", "h_n", "c_n"][:2 + lstm]):
        _check(name, got[name], want_outs[i], peer_outs and peer_outs[i], FWD_FACTOR)
    for name, k, w, p in zip(names, kernel, want, peer, strict=True):
        _check(name, k, w, p, BWD_FACTOR)


# ---- the emulated runtime itself ----------------------------------------------------------

# The fiber switches: x86-64's own (every harness's, on this machine) and ucontext's.
RUNTIMES = {"switch": "runtime_harness", "ucontext": "runtime_ucontext"}


@pytest.mark.parametrize("fibers", RUNTIMES)
@pytest.mark.parametrize("check", ["barrier", "warp", "grid"])
def test_emulated_runtime(harness, check, fibers):
    """emu_runtime.h's own primitives, on which every emulated kernel rests: a __syncthreads
    lets no thread run ahead, a warp's shuffles see every lane, and a cooperative launch's
    blocks run together (one spins until all the others have written)."""
    build.run(harness(RUNTIMES[fibers]), check)  # exits 1 with the reason where one fails


@pytest.mark.parametrize("fibers", RUNTIMES)
def test_emulated_runtime_reports_a_deadlocked_block(harness, fibers):
    """A block whose threads all wait at a barrier that one of them never reaches stops the
    run with a report, instead of hanging the test until its timeout."""
    r = subprocess.run([str(harness(RUNTIMES[fibers])), "deadlock"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "emu: block 0 deadlocked: thread 1 waits at __syncthreads (255 of 256 arrived)" \
        in r.stderr, r.stderr


# ---- the sanitizer itself ------------------------------------------------------------------

# Read at the start of the layer's forward kernel when EMU_STRAY_READ is set, and discarded:
# one float past the input gates (global memory) or the byte before the block's shared memory.
# The results stay right; only the sanitizer can tell.
_STRAY_READ = """
  if (const char* stray = std::getenv("EMU_STRAY_READ")) {
    volatile float sink = stray[0] == 'g' ? a.x_gates[a.N * G * a.H] : float(smem[-1]);
    (void)sink;
  }
"""


def _build_stray_read(root):
    """The layer harness built from a copy of csrc/cuda whose forward kernel has _STRAY_READ."""
    src = root / "cuda"
    shutil.copytree(build.CUDA_SRC, src)
    layer = (src / "rnn_layer_kernels.cuh").read_text()
    anchor = "blk(a, smem);\n"
    assert anchor in layer, "the forward kernel's block no longer reads `blk(a, smem);`"
    (src / "rnn_layer_kernels.cuh").write_text(layer.replace(anchor, anchor + _STRAY_READ, 1))
    return build.build("rnn_layer_harness", root / "build", cuda_src=src, sanitize=True)


@pytest.fixture
def stray_read_harness(harness):
    reason = build.sanitizer_missing()
    if reason:
        pytest.skip(f"CUDA emulation with AddressSanitizer unavailable: {reason}")
    return harness("stray_read")


@pytest.mark.parametrize("where", ["global", "shared"])
def test_sanitizer_stops_a_stray_read(stray_read_harness, tmp_path, monkeypatch, where):
    case = LayerCase("LSTM", torch.float32, 3, 2, 13)
    test_rnn_layer_fwd_bwd(lambda name: stray_read_harness, tmp_path, case)  # unset: passes
    monkeypatch.setenv("EMU_STRAY_READ", where)
    with pytest.raises(AssertionError, match="AddressSanitizer: heap-buffer-overflow"):
        test_rnn_layer_fwd_bwd(lambda name: stray_read_harness, tmp_path, case)
