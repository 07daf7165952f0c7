"""The CUDA layer kernels at small sizes, forward and backward, for compute-sanitizer
(bench/gpu_check.sh's racecheck stage: shared-memory hazards between threads, which the
emulator does not look for). One small shape per block kind the planner picks: tensor-core
blocks (bf16, B >= 4: the default), CUDA-core 8-row blocks (bf16 B2, fp32), batch-lane
blocks (fp32 forward at B >= 64), and the tensor-core blocks with two staging buffers
(SEQKERN_CUDA_RNN_PREFETCH=1). Prints one line per case."""
import os

import torch

import seqkern

CASES = [("LSTM", torch.bfloat16, 16, "default"), ("GRU", torch.bfloat16, 5, "default"),
         ("LSTM", torch.bfloat16, 2, "default"), ("GRU", torch.float32, 3, "default"),
         ("LSTM", torch.float32, 64, "default"), ("RNN", torch.bfloat16, 40, "mma"),
         ("LSTM", torch.bfloat16, 40, "prefetch"), ("GRU", torch.float32, 20, "prefetch")]


def main():
    torch.manual_seed(0)
    for cls, dtype, B, mode in CASES:
        for name in ("MMA", "PREFETCH", "TF32"):
            os.environ.pop(f"SEQKERN_CUDA_RNN_{name}", None)
        if mode in ("mma", "prefetch"):
            os.environ["SEQKERN_CUDA_RNN_MMA"] = "1"
        if mode == "prefetch":  # two staging buffers (fp32: on TF32)
            os.environ.update(SEQKERN_CUDA_RNN_PREFETCH="1", SEQKERN_CUDA_RNN_TF32="1")
        layer = getattr(seqkern, cls)(40, 72).to("cuda", dtype)
        x = torch.randn(6, B, 40, device="cuda", dtype=dtype, requires_grad=True)
        with seqkern.backend("cuda"):
            out, _ = layer(x)
            out.float().square().sum().backward()
        torch.cuda.synchronize()
        print(f"{cls} {dtype} B{B} {mode}: |dx| {x.grad.float().norm():.4g}", flush=True)


if __name__ == "__main__":
    main()
