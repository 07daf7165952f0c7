"""Checks aimed at the CUDA kernels' riskiest parts, on a GPU only (bench/gpu_check.sh runs
them first, under a short time limit). Elsewhere every test here skips.

The persistent recurrences synchronise all blocks with a grid barrier once per step; a
missing fence shows up only after many steps, so one sequence here is long. Hidden sizes
that do not fit on chip take the per-step fallback. The results are compared with the same
layer run in float64 by the cpu backend.
"""
import json
import os
import re
import tempfile

import pytest
import torch

import seqkern
from seqkern.backends import BACKENDS
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close_or_like_torch

CUDA_USABLE = torch.cuda.is_available() and not BACKENDS["cuda"].availability("cuda")
pytestmark = pytest.mark.skipif(not CUDA_USABLE, reason="needs the cuda backend on a GPU")


def _layer_against_cpu64(cls, T, B, I, H, dtype, bidirectional=False, peer_dtype=None):
    """The cuda layer against the cpu backend's in float64, every dtype beside torch.nn's own
    module (cuDNN, TF32 off) in that dtype (or peer_dtype): fp16/bf16 by the relative rule,
    fp32 by the table or, for entries of long reductions outside it, by the relative rule too
    (tests/tolerances.py)."""
    torch.manual_seed(0)
    # Explicit devices: the GPU run sets torch's default device to cuda (tests/conftest.py).
    ours = getattr(seqkern, cls)(I, H, bidirectional=bidirectional, device="cpu")
    ref = getattr(seqkern, cls)(I, H, bidirectional=bidirectional, dtype=torch.float64,
                                device="cpu")
    ref.load_state_dict(ours.state_dict())
    peer = getattr(torch.nn, cls)(I, H, bidirectional=bidirectional, device="cpu")
    peer.load_state_dict(ours.state_dict())
    peer = peer.to("cuda", peer_dtype or dtype)
    ours = ours.to("cuda", dtype)
    # The reference sees exactly the input the kernel does (x rounded to dtype).
    x = torch.randn(T, B, I, dtype=torch.float64, device="cpu").to(dtype).double()
    x_gpu = x.to("cuda", dtype).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    with seqkern.backend("cuda"):
        out, _ = ours(x_gpu)
        grad = torch.randn_like(out)
        out.backward(grad)
    with seqkern.backend("cpu"):
        want, _ = ref(x_ref)
        want.backward(grad.double().cpu())
    got = [("output", out, want), ("dx", x_gpu.grad, x_ref.grad)] + [
        (f"d{name}", p.grad, q.grad)
        for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters())]
    x_peer = x.to("cuda", peer_dtype or dtype).requires_grad_(True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out_peer, _ = peer(x_peer)
        out_peer.backward(grad.to(out_peer.dtype))
    peers = [out_peer, x_peer.grad] + [p.grad for p in peer.parameters()]
    for (name, a, w), b in zip(got, peers, strict=True):
        assert_close_or_like_torch(f"{cls} T{T} H{H} {name}", a.cpu(), w, b.cpu(),
                                   FWD_FACTOR if name == "output" else BWD_FACTOR)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_long_sequence_grid_barrier(cls):
    _layer_against_cpu64(cls, T=3000, B=4, I=32, H=256, dtype=torch.float32)


def test_hidden_size_past_the_persistent_kernel():
    _layer_against_cpu64("LSTM", T=20, B=3, I=64, H=2048, dtype=torch.float32)


def _layer_kernels(cls, T, B, H, dtype, peer_dtype=None, grids=None):
    """Checks the layer as _layer_against_cpu64 does and returns ({"fwd": {(batch tile, mma,
    units)}, "bwd": ...}, every kernel name) from the layer kernels' template arguments
    (Cell, T, batch tile, Mma[, the backward's tensor-core units MU]). grids: a dict to fill
    with {"fwd": {blocks}, "bwd": ...}, the layer kernels' launch grids from the profiler's
    trace (the CUDA-core kernels' units show only there: blocks = ceil(H / units))."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _layer_against_cpu64(cls, T=T, B=B, I=64, H=H, dtype=dtype, peer_dtype=peer_dtype)
    names = {e.key for e in prof.key_averages()}
    if grids is not None:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                events = json.load(f)["traceEvents"]
        for d in ("fwd", "bwd"):
            grids[d] = {e["args"]["grid"][0] for e in events
                        if f"layer_{d}_kernel<" in e.get("name", "") and "grid" in e.get("args", {})}
        assert grids["fwd"] and grids["bwd"], "the trace holds no layer kernel with its grid"
    found = {}
    for d in ("fwd", "bwd"):
        found[d] = set()
        for args in (m for n in names for m in re.findall(rf"layer_{d}_kernel<([^>]*)>", n)):
            parts = [re.sub(r"\(\w+\)", "", a).strip() for a in args.split(",")]
            units = int(parts[4]) if len(parts) > 4 else None
            found[d].add((int(parts[2]), parts[3] in ("true", "1"), units))
    assert found["fwd"] and found["bwd"], f"no layer kernels among {sorted(names)[:8]}"
    return found, names


def _layer_kernel_tiles(cls, T, B, H, dtype, mma=False, peer_dtype=None):
    """Checks the layer as _layer_against_cpu64 does and returns the batch tiles its forward
    and backward kernels ran with; asserts that they were (or were not, mma=False) the
    tensor-core kernels."""
    found, names = _layer_kernels(cls, T, B, H, dtype, peer_dtype)
    for d, kinds in found.items():
        assert {k for _, k, _ in kinds} == {mma}, (d, kinds)
    return {d: {t for t, _, _ in kinds} for d, kinds in found.items()}, names


@pytest.mark.parametrize("cls,T,B,H,dtype", [
    ("LSTM", 300, 64, 512, torch.float32),  # the fastrnns width, many barriers
    ("GRU", 300, 33, 136, torch.float32),  # a part-filled 64-row tile, K not a multiple of 32
    ("LSTM", 20, 40, 136, torch.bfloat16),
    ("GRU", 20, 32, 512, torch.bfloat16),  # 32-row tiles
    ("LSTM", 100, 16, 512, torch.float32),  # 16-row tiles: two K slices a warp
])
def test_batch_lane_blocks(monkeypatch, cls, T, B, H, dtype):
    # Wherever they fit, forward and backward (by default the forward at B >= 64 only);
    # the planner reads it at every call. bf16: the backward's products on bf16 tensor
    # cores (csrc/cuda/bind_rnn.cpp), the default, asked for explicitly here.
    monkeypatch.setenv("SEQKERN_CUDA_RNN_LANES", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_BF16_GEMMS", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "0")  # bf16's default at B >= 4 otherwise
    tiles, _ = _layer_kernel_tiles(cls, T, B, H, dtype)
    # The planner falls back to the 8-row blocks where a lane plan does not fit; on Hopper
    # (227 KB of shared memory a block) every case here must take it.
    want = 64 if B > 32 else 32 if B > 16 else 16
    if torch.cuda.get_device_capability()[0] >= 9:
        assert tiles == {"fwd": {want}, "bwd": {min(want, 32)}}, tiles


@pytest.mark.parametrize("cls,T,B,H,dtype", [
    ("LSTM", 300, 64, 512, torch.bfloat16),  # the fastrnns width, two passes of 32 rows
    ("GRU", 200, 16, 512, torch.float16),  # 16-row tiles
    ("LSTM", 50, 33, 1024, torch.bfloat16),  # backward K = 4096 in chunks
    ("RNN", 100, 5, 136, torch.bfloat16),  # one m16 tile, K padded 136 -> 144
])
@pytest.mark.parametrize("prefetch", [False, True], ids=["one-buffer", "prefetch"])
def test_tensor_core_blocks(monkeypatch, cls, T, B, H, dtype, prefetch):
    # The default at B >= 4 (csrc/cuda/rnn_layer.cu's use_mma), asked for at every batch
    # here; the planner reads it every call. prefetch: two staging buffers (opt-in).
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_PREFETCH", str(int(prefetch)))
    tiles, _ = _layer_kernel_tiles(cls, T, B, H, dtype, mma=True)
    want = 32 if B > 16 else 16
    assert tiles == {"fwd": {want}, "bwd": {want}}, tiles


@pytest.mark.parametrize("prefetch", [False, True], ids=["one-buffer", "prefetch"])
@pytest.mark.parametrize("cls,T,B,H", [("LSTM", 300, 64, 512), ("GRU", 100, 16, 136)])
def test_tensor_core_blocks_tf32(monkeypatch, cls, T, B, H, prefetch):
    # fp32 on TF32: opt-in twice (csrc/cuda/rnn_layer.cu's use_mma). The fp32 peer runs with
    # allow_tf32 off (_layer_against_cpu64), so cuDNN's bf16 layer bounds the error (bf16
    # keeps 3 bits fewer).
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_TF32", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_PREFETCH", str(int(prefetch)))
    tiles, _ = _layer_kernel_tiles(cls, T, B, H, torch.float32, mma=True,
                                   peer_dtype=torch.bfloat16)
    want = 32 if B > 16 else 16
    assert tiles == {"fwd": {want}, "bwd": {want}}, tiles


@pytest.mark.parametrize("cls,T,B,H,dtype,prefetch", [
    ("LSTM", 300, 64, 512, torch.bfloat16, False),  # fastrnns: four 16-row passes a phase
    ("LSTM", 50, 33, 1024, torch.bfloat16, True),  # backward K = 4096 in chunks, prefetched
    ("GRU", 100, 5, 136, torch.float16, False),  # H = 136: nine blocks, the last part-filled
    ("LSTM", 300, 64, 512, torch.float32, False),  # CUDA-core blocks of 8 units
    ("GRU", 100, 16, 136, torch.float32, True),  # TF32
])
def test_wide_backward_blocks(monkeypatch, cls, T, B, H, dtype, prefetch):
    # SEQKERN_CUDA_RNN_WIDE=1 (opt-in until timed): the backward's tensor-core blocks of 16
    # units in 16-row passes, its CUDA-core blocks of at least 8 units.
    monkeypatch.setenv("SEQKERN_CUDA_RNN_WIDE", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_PREFETCH", str(int(prefetch)))
    mma = dtype != torch.float32 or prefetch  # the fp32 TF32 case asks for tensor cores
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1" if mma else "0")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_TF32", "1" if mma else "0")
    grids = {}
    found, _ = _layer_kernels(cls, T, B, H, dtype, grids=grids,
                              peer_dtype=torch.bfloat16 if mma and dtype == torch.float32 else None)
    if mma:
        assert found["bwd"] == {(16, True, 16)}, found
        assert grids["bwd"] == {-(-H // 16)}, grids
    else:  # CUDA-core blocks of 8 units (the planner's choice without wide: 4 at H512)
        assert {k for _, k, _ in found["bwd"]} == {False}, found
        assert grids["bwd"] == {H // 8}, grids


@pytest.mark.parametrize("cls,T,B,H,dtype,wide,prefetch", [
    ("LSTM", 100, 64, 512, torch.bfloat16, False, False),  # fastrnns: 2 x 64 blocks both ways
    ("GRU", 50, 80, 512, torch.float16, False, True),  # 3 passes, 2 groups: strided passes
    ("LSTM", 100, 64, 512, torch.bfloat16, True, False),  # the wide backward: 4 x 32 blocks
    ("LSTM", 50, 40, 1024, torch.bfloat16, False, False),  # 128 unit blocks: no room, one group
])
def test_tensor_core_blocks_over_the_batch(monkeypatch, cls, T, B, H, dtype, wide, prefetch):
    # SEQKERN_CUDA_RNN_SPLIT=1 (opt-in until timed): as many groups of blocks as a step has
    # passes and the multiprocessors hold, one block each (csrc/cuda/rnn_layer.cu's mma_plan).
    monkeypatch.setenv("SEQKERN_CUDA_RNN_SPLIT", "1")
    monkeypatch.setenv("SEQKERN_CUDA_RNN_WIDE", str(int(wide)))
    monkeypatch.setenv("SEQKERN_CUDA_RNN_PREFETCH", str(int(prefetch)))
    grids = {}
    found, _ = _layer_kernels(cls, T, B, H, dtype, grids=grids)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for d, (tile, units) in {"fwd": (32, 8), "bwd": (16, 16) if wide else (32, 8)}.items():
        assert {(t, m) for t, m, _ in found[d]} == {(tile, True)}, found
        unit_blocks = -(-H // units)
        groups = max(1, min(-(-B // tile), sms // unit_blocks))
        assert grids[d] == {unit_blocks * groups}, (d, grids, groups)


@pytest.mark.parametrize("dtype, B, mma, want", [
    (torch.bfloat16, 64, True, {"fwd": {32}, "bwd": {32}}),  # tensor cores, two 32-row passes
    (torch.bfloat16, 4, True, {"fwd": {16}, "bwd": {16}}),
    (torch.bfloat16, 2, False, None),  # below kMmaDefaultMinBatch: the CUDA-core blocks
    (torch.float32, 64, False, {"fwd": {64}, "bwd": {8}}),  # batch-lane forward at B >= 64
    (torch.float32, 40, False, {"fwd": {8}, "bwd": {8}})])
def test_default_plan(monkeypatch, dtype, B, mma, want):
    """The defaults as timed on an H100 (bench/RESULTS.md; csrc/cuda/rnn_layer.cu's use_mma
    and use_lanes): fp16/bf16 layers at B >= 4 on tensor-core blocks; fp32 ones in
    batch-lane blocks for the forward at B >= 64, 8-row blocks below and in the backward;
    bf16 backward products on tensor cores."""
    for name in ("LANES", "BF16_GEMMS", "MMA", "TF32"):
        monkeypatch.delenv(f"SEQKERN_CUDA_RNN_{name}", raising=False)
    tiles, names = _layer_kernel_tiles("LSTM", 30, B, 256, dtype, mma=mma)
    if want and torch.cuda.get_device_capability()[0] >= 9:
        assert tiles == want, tiles
    if dtype != torch.bfloat16:
        return

    def fp32_gemms(kernel_names):  # cuBLAS's fp32 kernels as named in the H100 profiles
        return [n for n in kernel_names if "sgemm" in n or "f32f32_f32f32" in n]

    assert not fp32_gemms(names), fp32_gemms(names)
    # ... which the same layer with the fp32 products does run: the check can see them.
    monkeypatch.setenv("SEQKERN_CUDA_RNN_BF16_GEMMS", "0")
    _, names_fp32 = _layer_kernel_tiles("LSTM", 30, B, 256, dtype, mma=mma)
    assert fp32_gemms(names_fp32), sorted(names_fp32)[:12]


def test_bidirectional_directions_on_two_streams():
    _layer_against_cpu64("GRU", T=50, B=8, I=16, H=128, dtype=torch.float32,
                         bidirectional=True)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 63, 257, 4096])
def test_attention_hopper_shapes_finish_and_match(D, L):
    """The shapes the sm_90a forward takes (D 64/128, no mask): partial tiles, one block,
    many blocks. A wrong TMA byte count or mbarrier phase hangs here rather than later."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with seqkern.backend("cuda"):
        out = seqkern.functional.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    torch.cuda.synchronize()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=L > 1)
    peer = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    err, peer_err = (out.double() - want).abs().max(), (peer.double() - want).abs().max()
    assert err <= 2 * peer_err + 1e-6, f"D{D} L{L}: error {err:.3g}, torch's {peer_err:.3g}"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mma", [False, True])
def test_layer_forward_replays_in_a_cuda_graph(monkeypatch, mma, packed):
    """A captured CUDA graph replays the layer (torch.compile's reduce-overhead mode captures
    graphs): a padded sequence's step table is made on the device, a packed one's carried in
    kernel parameters (500 steps: two launches of them), with no copy from host memory that a
    replay would read after it was freed. Replays match eager calls exactly."""
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1" if mma else "0")  # B8 bf16: on by default
    torch.manual_seed(0)
    lstm = seqkern.LSTM(64, 128).cuda().to(torch.bfloat16)
    static_x = torch.randn(500 if packed else 20, 8, 64, device="cuda", dtype=torch.bfloat16)
    if packed:  # packed outside the graph (packing copies its indices from the host)
        lengths = torch.tensor([500, 3, 250, 499, 1, 77, 500, 12], device="cpu")
        static_in = torch.nn.utils.rnn.pack_padded_sequence(static_x, lengths,
                                                            enforce_sorted=False)
        static_x = static_in.data  # the packed rows, refilled in place below
    else:
        static_in = static_x

    def run():
        out = lstm(static_in)[0]
        return out.data if packed else out

    with torch.no_grad(), seqkern.backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run()
        for _ in range(2):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            want = run()
            torch.testing.assert_close(static_out, want, rtol=0, atol=0)
