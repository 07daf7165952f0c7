"""The CUDA layer kernels at small sizes, forward and backward, for compute-sanitizer
(bench/gpu_check.sh's racecheck stage: shared-memory hazards between threads, which the
emulator does not look for). One small shape per block kind the planner picks, by default
(tensor-core blocks for bf16 at B >= 4, CUDA-core 8-row blocks for bf16 B2 and fp32,
batch-lane blocks for the fp32 forward at B >= 64) and in the layer benchmarks' variants
(bench/test_rnn_layer_bench.py's VARIANT_ENV): "lanes", batch-lane blocks both ways; "next",
tensor-core blocks at every batch with two staging buffers, fp32 on TF32; "wide", the
backward's tensor-core blocks of 16 units and CUDA-core blocks of 8; "split", tensor-core
blocks over the batch too (B80: three groups forward, five of 16 rows in the wide backward).
Prints one line per case."""
import torch

import seqkern
from test_rnn_layer_bench import variant_env  # bench/ is this script's directory: on sys.path

CASES = [("LSTM", torch.bfloat16, 16, ""), ("GRU", torch.bfloat16, 5, ""),
         ("LSTM", torch.bfloat16, 2, ""), ("GRU", torch.float32, 3, ""),
         ("LSTM", torch.float32, 64, ""), ("GRU", torch.float32, 40, "lanes"),
         ("LSTM", torch.bfloat16, 40, "next"), ("RNN", torch.bfloat16, 2, "next"),
         ("GRU", torch.float32, 20, "next"), ("LSTM", torch.bfloat16, 40, "wide"),
         ("GRU", torch.float32, 20, "wide"), ("LSTM", torch.bfloat16, 80, "split")]


def main():
    torch.manual_seed(0)
    for cls, dtype, B, variant in CASES:
        layer = getattr(seqkern, cls)(40, 72).to("cuda", dtype)
        x = torch.randn(6, B, 40, device="cuda", dtype=dtype, requires_grad=True)
        with variant_env(variant), seqkern.backend("cuda"):
            out, _ = layer(x)
            out.float().square().sum().backward()
        torch.cuda.synchronize()
        print(f"{cls} {dtype} B{B} {variant or 'default'}: |dx| {x.grad.float().norm():.4g}",
              flush=True)


if __name__ == "__main__":
    main()
