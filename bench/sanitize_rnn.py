"""The CUDA layer kernels at small sizes, forward and backward, for compute-sanitizer
(bench/gpu_check.sh's racecheck stage: shared-memory hazards between threads, which the
emulator does not look for). One small shape per block kind the planner picks: tensor-core
blocks (bf16, B >= 4: the default), CUDA-core 8-row blocks (bf16 B2, fp32), batch-lane
blocks (fp32 forward at B >= 64). Prints one line per case."""
import os

import torch

import seqkern

CASES = [("LSTM", torch.bfloat16, 16, "default"), ("GRU", torch.bfloat16, 5, "default"),
         ("LSTM", torch.bfloat16, 2, "default"), ("GRU", torch.float32, 3, "default"),
         ("LSTM", torch.float32, 64, "default"), ("RNN", torch.bfloat16, 40, "mma")]


def main():
    torch.manual_seed(0)
    for cls, dtype, B, mode in CASES:
        os.environ.pop("SEQKERN_CUDA_RNN_MMA", None)
        if mode == "mma":
            os.environ["SEQKERN_CUDA_RNN_MMA"] = "1"
        layer = getattr(seqkern, cls)(40, 72).to("cuda", dtype)
        x = torch.randn(6, B, 40, device="cuda", dtype=dtype, requires_grad=True)
        with seqkern.backend("cuda"):
            out, _ = layer(x)
            out.float().square().sum().backward()
        torch.cuda.synchronize()
        print(f"{cls} {dtype} B{B} {mode}: |dx| {x.grad.float().norm():.4g}", flush=True)


if __name__ == "__main__":
    main()
