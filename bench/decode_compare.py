"""One step a call on the CPU, in every dtype: seqkern's recurrent layers (T = 1) and cells
beside torch's, in one process on the same weights and inputs (inference). The fp32 rows
are also in `pytest bench/` (the "decode" shape and B = 1 cells); this script adds fp16 and
bf16 and H = 256. Medians of 5 rounds of `calls` calls; the ratio is torch / seqkern.

Usage: python bench/decode_compare.py [float32|float16|bfloat16 ...]
(bench/RESULTS.md, "CPU: decoding steps")
"""
import statistics
import sys
import time

import torch

import seqkern

LAYERS = [(cls, H, B) for cls in ("LSTM", "GRU", "RNN") for H in (256, 512) for B in (1, 8)]
CELLS = [(cls, 512, 1) for cls in ("LSTMCell", "GRUCell", "RNNCell")]


def median_us(call, calls=100):
    for _ in range(10):
        call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds) * 1e6


def main(dtypes):
    torch.manual_seed(0)
    for dtype in dtypes:
        for cls, H, B in LAYERS + CELLS:
            theirs = getattr(torch.nn, cls)(H, H).to(dtype)
            ours = getattr(seqkern, cls)(H, H).to(dtype)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn((B, H) if cls.endswith("Cell") else (1, B, H), dtype=dtype)
            with torch.no_grad():
                t, s = median_us(lambda: theirs(x)), median_us(lambda: ours(x))
            print(f"{str(dtype).replace('torch.', '')} {cls} H{H} B{B}: torch {t:.0f} us, "
                  f"seqkern {s:.0f} us ({t / s:.2f}x)", flush=True)


if __name__ == "__main__":
    main([getattr(torch, name) for name in sys.argv[1:]] or
         [torch.float32, torch.float16, torch.bfloat16])
