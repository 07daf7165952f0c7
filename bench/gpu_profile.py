"""Where a GPU call's time goes: torch.profiler over a few cases, each provider side by side.

For each case and provider: host time per call (wall clock, synchronised), device time per
call (the sum of its CUDA kernels), and the kernels that take most of it. Host time far above
device time means launch or Python overhead; device time above the peer's means a kernel.

    python bench/gpu_profile.py            (bench/gpu_check.sh's `profile` stage)
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import seqkern
from test_rnn_layer_bench import variant_env  # bench/ is this script's directory: on sys.path

ITERS = 10


def _module(provider, cls, H, dtype):
    """torch's module, or seqkern's with torch's weights."""
    theirs = getattr(torch.nn, cls)(H, H).cuda().to(dtype)
    if provider == "torch":
        return theirs
    ours = getattr(seqkern, cls)(H, H).cuda().to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours


def _layer_train(cls, T, B, H, dtype, input_grad=True):
    """A training step; without input_grad the input is data ("train-data", pytorch
    fastrnns' step: cuDNN computes the input's gradient anyway, seqkern skips it)."""
    def make(provider):
        module = _module(provider, cls, H, dtype)
        x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=input_grad)

        def step():
            out, _ = module(x)
            out.float().sum().backward()
        return step
    kind = "train" if input_grad else "train-data"
    return f"{cls} {kind} T{T} B{B} H{H} {str(dtype)[6:]}", make


def _cell_step(cls, B, H, dtype):
    def make(provider):
        cell = _module(provider, cls, H, dtype)
        x = torch.randn(B, H, device="cuda", dtype=dtype)

        def step():
            with torch.no_grad():
                cell(x)
        return step
    return f"{cls} step B{B} H{H} {str(dtype)[6:]}", make


CASES = [_layer_train("LSTM", 100, 64, 512, torch.bfloat16, input_grad=False),
         _layer_train("LSTM", 200, 16, 512, torch.bfloat16),
         _cell_step("LSTMCell", 64, 512, torch.bfloat16)]
# cuda-next: the cuda backend with its opt-in candidate, as the layer benchmarks run it
PROVIDERS = ["cuda", "cuda-next", "triton", "torch"]


def measure(step):
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ITERS):
        step()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1e3 / ITERS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = event.cuda_time_total
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = device_us / 1e3 / ITERS
    return host_ms, kernels


def cudnn_fp32_precision():
    """Whether cuDNN's fp32 LSTM computes in TF32 under torch.backends.cudnn.allow_tf32 (the
    condition for seqkern's TF32 recurrence to be a default): its output's error against
    float64 with the flag on and off, and seqkern's TF32 blocks' beside them."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(512, 512).cuda()
    x = torch.randn(100, 16, 512, device="cuda")
    want = torch.nn.LSTM(512, 512).cuda().double()
    want.load_state_dict(lstm.state_dict())
    ref = want(x.double())[0]
    errors = {}
    for allow in (True, False):
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=allow):
            errors[f"cuDNN allow_tf32={allow}"] = (lstm(x)[0].double() - ref).abs().max().item()
    ours = seqkern.LSTM(512, 512).cuda()
    ours.load_state_dict(lstm.state_dict())
    with torch.no_grad(), variant_env("next"), seqkern.backend("cuda"):
        errors["seqkern TF32 blocks"] = (ours(x)[0].double() - ref).abs().max().item()
    print("fp32 LSTM T100 B16 H512, max error vs float64: " +
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; per call, "
          f"mean of {ITERS}")
    for (name, make) in CASES:
        for provider in PROVIDERS:
            if provider == "cuda-next" and not name.startswith("LSTM train"):
                continue  # layers only
            step = make(provider)
            if provider == "torch":
                host_ms, kernels = measure(step)
            else:
                backend, _, variant = provider.partition("-")
                with variant_env(variant), seqkern.backend(backend):
                    host_ms, kernels = measure(step)
            device_ms = sum(kernels.values())
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:4]
            print(f"{name} | {provider}: host {host_ms:.3f} ms, device {device_ms:.3f} ms")
            for key, ms in top:
                print(f"    {ms:8.3f} ms  {key[:90]}")
    cudnn_fp32_precision()


if __name__ == "__main__":
    main()
