"""seqkern's recurrent layers under torch.autocast on the CPU, beside torch's, in one
process on the same inputs: torch under autocast, seqkern under autocast, and seqkern with
autocast off (float32: what autocast users got before the modules followed torch's dtypes).
Inference (no_grad) and the training step on data (backward outside the autocast region,
into the float32 parameters, as an AMP step runs it); medians of 3 rounds, each the median
of 5 (inference) / 3 (train) calls; the ratio is torch / seqkern.

Usage: python bench/autocast_compare.py [LSTM|GRU]   (bench/RESULTS.md, "under torch.autocast")
"""
import statistics
import sys
import time

import torch

import seqkern

CASES = (("LSTM", 256, 4), ("LSTM", 100, 16), ("LSTM", 100, 64), ("GRU", 256, 4),
         ("GRU", 100, 16), ("GRU", 100, 64))
SIZE = 512


def median_ms(call, reps):
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def inference(module, x, autocast=True):
    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            module(x)
    return call


def train_step(module, x, autocast=True):
    def call():
        for p in module.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = module(x)
        out.float().sum().backward()
    return call


def main(only=None):
    torch.manual_seed(0)
    for cls, T, B in CASES:
        if only and cls != only:
            continue
        theirs = getattr(torch.nn, cls)(SIZE, SIZE)
        ours = getattr(seqkern, cls)(SIZE, SIZE)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(T, B, SIZE)
        for mode, make, reps in (("inference", inference, 5), ("train-data", train_step, 3)):
            rounds = [(median_ms(make(theirs, x), reps), median_ms(make(ours, x), reps),
                       median_ms(make(ours, x, autocast=False), reps)) for _ in range(3)]
            t, o, f = (statistics.median(r[i] for r in rounds) for i in range(3))
            print(f"{cls} T{T} B{B} {mode:10s} torch-autocast {t:7.2f} ms  "
                  f"seqkern-autocast {o:7.2f} ({t / o:.2f}x)  seqkern-fp32 {f:7.2f} "
                  f"({t / f:.2f}x)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
