"""Hardware counters of the recurrent layer kernels, for Nsight Compute (ncu).

The layer benchmarks say how long a step takes; they cannot say why (a B64 H512 bf16
forward step took 16.5 us on the H100 against ~4.4 us at B4). Under ncu this runs one
training step of each case below between cudaProfilerStart and cudaProfilerStop, after a
warm-up outside that range, so the report holds exactly one forward and one backward
recurrence kernel per case: where their warps stall (WarpStateStats), what they move
through L1 and L2 (MemoryWorkloadAnalysis) and how busy each unit is (SpeedOfLight).

    ncu --clock-control none --profile-from-start off -k regex:layer_ \
        --section SpeedOfLight --section WarpStateStats ... python bench/ncu_rnn.py
    (bench/gpu_check.sh's `ncu` stage; VARIANT=next runs every case as the cuda-next
    variant; by default each case runs as its own variant says, "" the defaults)

Without ncu it runs the same steps and prints their times: a check that it works.
"""
import os
import time

import torch

import seqkern
from test_rnn_layer_bench import variant_env  # bench/ is this script's directory: on sys.path

# (module, T, B, H, dtype, variant): the fastrnns training shape, the targets not met; bf16
# also as the split variant (tensor-core blocks over the batch: 128 blocks of one pass a
# step, the wide backward; bench/test_rnn_layer_bench.py's VARIANT_ENV).
CASES = [("LSTM", 100, 64, 512, torch.bfloat16, ""), ("LSTM", 100, 64, 512, torch.float32, ""),
         ("LSTM", 100, 64, 512, torch.bfloat16, "split")]


def training_step(cls, T, B, H, dtype):
    torch.manual_seed(0)
    module = getattr(seqkern, cls)(H, H).cuda().to(dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)

    def step():
        out, _ = module(x)
        out.float().sum().backward()
    return step


def main():
    forced = os.environ.get("VARIANT")
    for *case, own in CASES:
        variant = own if forced is None else forced
        with variant_env(variant), seqkern.backend("cuda"):
            step = training_step(*case)
            step()  # plans, packed weights, caching allocator: outside the profiled range
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"{case[0]} T{case[1]} B{case[2]} H{case[3]} {str(case[4])[6:]} "
              f"variant {variant or 'default'}: one step {1e3 * (time.perf_counter() - start):.2f} ms "
              "(under ncu: with its replays)")


if __name__ == "__main__":
    main()
