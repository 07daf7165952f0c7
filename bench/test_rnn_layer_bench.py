"""Recurrent layers: seqkern.LSTM / GRU against torch.nn's (oneDNN on the CPU, cuDNN on CUDA),
same weights and inputs, same process. Inference (no_grad) and two training steps (forward +
backward of the output sum): "train" with the input's gradient too (as a layer above another
computes it), "train-data" with the input as data and the initial state zero, the gradients
of the parameters only (pytorch's benchmarks/fastrnns step; torch's oneDNN and cuDNN layers
compute the input's gradient anyway, seqkern skips that product). FLOPs: 2*T*B*G*H*(I+H)
forward (G = 4 LSTM, 3 GRU; with a projection 2*T*B*(G*H*(I+P) + H*P)), 3x for "train", 3x
less the 2*T*B*G*H*I of dx for "train-data"; packed sequences count only their live rows.
The "projection" shape (LSTM proj_size, as in speech models) runs LSTM only; on a GPU the cuda
backend refuses projections: they run on triton (the default there) and, as
"seqkern-cuda-proj", through the cuda backend as a plain layer (seqkern/nn/projection.py).
Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed calls; on the CPU
(fastrnns shape only) the peak RSS growth of one call in a fresh process
(bench/peak_memory.py).
"""
import contextlib
import json
import os
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_memory  # noqa: E402  (bench/peak_memory.py; bench/ is not a package)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float32]
# On the CPU bf16 (bf16 products where the CPU has them, see README) at five shapes only,
# inference and the training step on data: the CPU targets are fp32.
CPU_BF16_CASES = {("fastrnns", 64), ("mid-batch", 16), ("small-batch", 4), ("decode", 1),
                  ("decode", 8)}

# (name, T, B, I, H, packed, proj_size)
SHAPES = [("fastrnns", 100, 64, 512, 512, False, 0),
          ("mid-batch", 100, 16, 512, 512, False, 0),
          ("small-batch", 256, 1, 512, 512, False, 0),
          ("small-batch", 256, 4, 512, 512, False, 0),
          ("small-batch", 256, 8, 512, 512, False, 0),
          ("packed", 200, 16, 512, 512, True, 0),
          ("projection", 100, 16, 512, 1024, False, 256),
          # one step a call, as a decoder or an agent runs its layer
          ("decode", 1, 1, 512, 512, False, 0),
          ("decode", 1, 8, 512, 512, False, 0)]


BATCHES_NAMED = ("small-batch", "decode")  # shapes named with their batch in test ids

# On a GPU both compiled backends run side by side, and as its own row the cuda backend's
# candidate: "next" = tensor-core blocks at every batch (SEQKERN_CUDA_RNN_MMA=1; the fp16/bf16
# default at B >= 4 since the H100 run of 2026-11-26) with two staging buffers
# (SEQKERN_CUDA_RNN_PREFETCH=1, opt-in) and fp32 layers on TF32 (opt-in,
# SEQKERN_CUDA_RNN_TF32=1; csrc/cuda/rnn_layer.cu's use_mma, use_prefetch); for fp32 layers
# also "lanes" = batch-lane blocks forward and backward (SEQKERN_CUDA_RNN_LANES=1, the
# backward measured 1.42x slower than 8-row blocks before its step epilogue was coalesced);
# "wide" = the backward in fewer, wider blocks (SEQKERN_CUDA_RNN_WIDE=1, opt-in: tensor-core
# blocks of 16 units in 16-row passes, CUDA-core blocks of at least 8 units; training only).
# "split" = the tensor-core blocks over the batch too (SEQKERN_CUDA_RNN_SPLIT=1, opt-in: one
# pass a block a step; at B > 32 only, the fastrnns shape here) with the wide backward (its
# blocks read half the gate gradients from L2 that 8-unit blocks do: with the split, the
# backward's reads in all would otherwise stay 16 MB a step) and fp32 on TF32. Its forward
# against "cuda"'s, its backward against "wide"'s, isolate the split.
# "seqkern-cuda" runs the defaults. LSTM projections (the "projection" shape), which the CUDA kernel refuses, run on
# triton, and on cuda as "seqkern-cuda-proj": a plain layer with the projection folded into
# its weights (SEQKERN_RNN_PROJ_VIA_PLAIN=1, seqkern/nn/projection.py). On the CPU the
# default dispatch.
PROVIDERS = (["seqkern-cuda", "seqkern-cuda-next", "seqkern-cuda-wide", "seqkern-cuda-split",
              "seqkern-cuda-lanes", "seqkern-cuda-proj", "seqkern-triton", "torch"] if CUDA
             else ["seqkern", "torch"])
VARIANT_ENV = {"next": {"SEQKERN_CUDA_RNN_MMA": "1", "SEQKERN_CUDA_RNN_TF32": "1",
                        "SEQKERN_CUDA_RNN_PREFETCH": "1"},
               "wide": {"SEQKERN_CUDA_RNN_WIDE": "1"},
               "split": {"SEQKERN_CUDA_RNN_SPLIT": "1", "SEQKERN_CUDA_RNN_WIDE": "1",
                         "SEQKERN_CUDA_RNN_MMA": "1", "SEQKERN_CUDA_RNN_TF32": "1"},
               "lanes": {"SEQKERN_CUDA_RNN_LANES": "1", "SEQKERN_CUDA_RNN_MMA": "0"},
               "proj": {"SEQKERN_RNN_PROJ_VIA_PLAIN": "1"}}


@contextlib.contextmanager
def variant_env(variant):
    """The environment of a cuda variant: its VARIANT_ENV set, every other name unset."""
    names = {k for env in VARIANT_ENV.values() for k in env}
    before = {k: os.environ.pop(k, None) for k in names}
    os.environ.update(VARIANT_ENV.get(variant, {}))
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _backend(provider):
    """(backend or None, variant): "seqkern-cuda-next" -> ("cuda", "next")."""
    if not provider.startswith("seqkern-"):
        return None, ""
    backend, _, variant = provider.split("-", 1)[1].partition("-")
    return backend, variant


def _setup(provider, cls, shape, dtype, pass_, batch=None):
    """(target, flops) for one provider; batch overrides B (the memory probe's warm-up)."""
    name, T, B, I, H, packed, P = shape
    B = batch or B
    gen = torch.Generator().manual_seed(0)
    kw = dict(proj_size=P) if P else {}
    theirs = getattr(torch.nn, cls)(I, H, **kw).to(DEVICE, dtype)
    module = theirs
    backend, variant = _backend(provider)
    if provider.startswith("seqkern"):
        module = getattr(seqkern, cls)(I, H, **kw).to(DEVICE, dtype)
        module.load_state_dict(theirs.state_dict())
    x = torch.randn(T, B, I, generator=gen).to(DEVICE, dtype)
    rows = T * B
    if packed:  # lengths spread from 10 to 200, unsorted
        lengths = torch.linspace(10, T, B).round().long()[torch.randperm(B, generator=gen)]
        rows = int(lengths.sum())

    def make_input(t):
        return pack_padded_sequence(t, lengths, enforce_sorted=False) if packed else t

    G = 4 if cls == "LSTM" else 3
    flops = 2 * rows * (G * H * (I + P) + H * P) if P else 2 * rows * G * H * (I + H)
    if pass_ == "inference":
        inp = make_input(x)

        def run():
            with torch.no_grad():
                module(inp)
    else:
        flops = 3 * flops - (2 * rows * G * H * I if pass_ == "train-data" else 0)
        xg = x.detach().requires_grad_(pass_ == "train")

        def run():
            out, _ = module(make_input(xg))
            (out.data if packed else out).float().sum().backward()
    if not backend:
        return run, flops

    def forced():
        with variant_env(variant), seqkern.backend(backend):
            run()
    return forced, flops


def _peak_memory_mb(provider, cls, shape, dtype, pass_):
    """CPU: peak RSS growth of one call in a fresh process (bench/peak_memory.py)."""
    return peak_memory.probe(__file__, dict(provider=provider, cls=cls, shape=list(shape),
                                            dtype=str(dtype), pass_=pass_))


# provider outermost in the decorators: it varies fastest, so a case's peers run one after
# another and a run cut short by its time limit (bench/gpu_check.sh) still has whole rows.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["inference", "train", "train-data"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES,
                         ids=lambda s: f"{s[0]}-B{s[2]}" if s[0] in BATCHES_NAMED else s[0])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_layer(benchmark, record, provider, cls, shape, dtype, pass_):
    name, T, B, I, H, packed, P = shape
    if not CUDA and dtype == torch.bfloat16 and (
            (name, B) not in CPU_BF16_CASES or pass_ == "train"):
        pytest.skip("bf16 on the CPU: three shapes, inference and train-data")
    if P and cls != "LSTM":
        pytest.skip("proj_size is LSTM's")
    backend, variant = _backend(provider)
    if variant == "lanes" and dtype != torch.float32:
        pytest.skip("seqkern-cuda-lanes: fp32 only (fp16/bf16 take tensor cores)")
    if variant == "wide" and (pass_ == "inference" or name == "decode"):
        pytest.skip("seqkern-cuda-wide changes the backward only: training steps")
    if variant == "split" and B <= 32:
        pytest.skip("seqkern-cuda-split changes tensor-core plans at B > 32 only")
    if variant == "proj" and not P:
        pytest.skip("seqkern-cuda-proj runs the projection shape only")
    # The op's own inputs dict, as the op builds it (w_hh [G*H, P or H], w_hr [P, H]).
    x = torch.empty(T, B, I, device=DEVICE, dtype=dtype)
    w_hh = torch.empty((4 if cls == "LSTM" else 3) * H, P or H, device=DEVICE, dtype=dtype)
    w_hr = torch.empty(P, H, device=DEVICE, dtype=dtype) if P and variant != "proj" else None
    if variant == "proj":  # the plain layer the projection is folded into: hidden size H
        w_hh = torch.empty(4 * H, H, device=DEVICE, dtype=dtype)
    if backend and seqkern.backends.BACKENDS[backend].not_supported_reasons(
            "rnn_layer", seqkern.ops.rnn_layer._inputs(x, cls, w_hh, w_hr)):
        pytest.skip(f"{provider} not usable here")
    target, flops = _setup(provider, cls, shape, dtype, pass_)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    # Triton's layers ran 24-170x slower than the CUDA kernel on a GPU (bench/RESULTS.md,
    # before their grid of programs a step): fewer rounds keep the GPU run's lease.
    rounds = (3 if backend == "triton" else 10) if CUDA else 4
    iterations = 20 if name == "decode" else 1  # calls of ~0.1 ms: many a round
    benchmark.pedantic(record.timed(target), rounds=rounds, iterations=iterations,
                       warmup_rounds=1)
    if CUDA:
        extra = {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    elif name == "fastrnns":  # a fresh process per measurement: a few seconds each
        extra = {"peak_mb": _peak_memory_mb(provider, cls, shape, dtype, pass_)}
    else:
        extra = None
    case = (f"{cls} {pass_} {name} T{T} B{B} H{H}{f' P{P}' if P else ''} "
            f"{str(dtype).replace('torch.', '')}")
    label = {"seqkern": f"seqkern-{DEVICE}", "torch": f"torch-{cls}"}.get(provider, provider)
    record(benchmark, case, label, flops, extra)


if __name__ == "__main__":  # the CPU memory probe: one call in a fresh process
    spec = json.loads(sys.argv[1])
    args = (spec["provider"], spec["cls"], tuple(spec["shape"]),
            getattr(torch, spec["dtype"].replace("torch.", "")), spec["pass_"])
    warm_up, _ = _setup(*args, batch=1)
    target, _ = _setup(*args)
    print(peak_memory.measure(warm_up, target))
