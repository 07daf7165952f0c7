"""MultiheadAttention: seqkern.nn.MultiheadAttention against torch.nn.MultiheadAttention.

Self-attention with a key padding mask (25% padding on average, at the end of each
sequence, bool) or a causal mask (float [L, L] mask with is_causal=True), need_weights
True and False; the forward (eval, no grad: torch may take its fused inference path) and a
training step (train mode, forward + backward of out.sum()). Both modules hold the same
weights.

FLOPs: projections 8*B*L*E^2, attention 4*B*L*L*E (halved with the causal mask), a
training step 3x the forward. Peak memory: on CUDA, torch.cuda.max_memory_allocated over
one call above what was allocated before it; on the CPU, the process's peak resident set size
(getrusage maxrss) after one call minus its resident set size before it, in a fresh
process per measurement (so that one provider's peak cannot hide another's), after a
warm-up call on one batch row (so one-off allocations such as thread pools are not
counted, while the warm-up's own, smaller, peak stays below the measured one). Both count every allocation of the
call: projections, attention, weights and gradients.
"""
import json
import os
import sys

import pytest
import torch

import seqkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_memory  # noqa: E402  (bench/peak_memory.py; bench/ is not a package)

CUDA = torch.cuda.is_available()


def _cases():
    if CUDA:
        return [(16384 // L, E, E // 128, L, torch.bfloat16, mask)
                for E in (1024, 2048) for L in (1024, 2048, 4096, 8192)
                for mask in ("pad", "causal")]
    return [(8, 512, 8, 512, torch.float32, mask) for mask in ("pad", "causal")]


def _case_id(c):
    return "B{}-E{}-H{}-L{}-{}-{}".format(c[0], c[1], c[2], c[3],
                                          str(c[4]).replace("torch.", ""), c[5])


def _setup(provider, case, mode):
    B, E, H, L, dtype, mask = case
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cls = torch.nn.MultiheadAttention if provider == "torch" else seqkern.nn.MultiheadAttention
    module = cls(E, H, batch_first=True, device=device, dtype=dtype)
    module.train(mode == "train")
    x = torch.randn(B, L, E, generator=gen).to(device, dtype)
    kwargs = {}
    if mask == "pad":
        lengths = (torch.linspace(0.5, 1.0, B) * L).round() if B > 1 else torch.tensor([0.75 * L])
        kwargs["key_padding_mask"] = (torch.arange(L)[None, :] >= lengths[:, None]).to(device)
    else:
        kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(
            L, device=device, dtype=dtype)
        kwargs["is_causal"] = True
    return module, x, kwargs


def _target(module, x, kwargs, mode, need_weights):
    if mode == "fwd":
        def target():
            with torch.no_grad():
                module(x, x, x, need_weights=need_weights, **kwargs)
    else:
        xg = x.detach().requires_grad_(True)

        def target():
            module(xg, xg, xg, need_weights=need_weights, **kwargs)[0].sum().backward()
    return target


def _flops(case, mode):
    B, E, H, L, dtype, mask = case
    fwd = 8 * B * L * E * E + 4 * B * L * L * E * (0.5 if mask == "causal" else 1.0)
    return fwd * (3 if mode == "train" else 1)


def _peak_memory_mb(provider, case, mode, need_weights):
    """Peak memory of one call above the memory held before it (see the module docstring)."""
    if CUDA:
        module, x, kwargs = _setup(provider, case, mode)
        target = _target(module, x, kwargs, mode, need_weights)
        target()  # warm-up: the Triton compile and the caching allocator's first blocks
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        target()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    spec = dict(provider=provider, case=[*case[:4], str(case[4]), case[5]], mode=mode,
                need_weights=need_weights)
    return peak_memory.probe(__file__, spec)


@pytest.mark.parametrize("mode", ["fwd", "train"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
@pytest.mark.parametrize("provider", ["seqkern", "torch"])
def test_multihead_attention(benchmark, record, provider, case, need_weights, mode):
    module, x, kwargs = _setup(provider, case, mode)
    target = _target(module, x, kwargs, mode, need_weights)
    rounds = 20 if CUDA else 6
    benchmark.pedantic(record.timed(target), rounds=rounds, iterations=1, warmup_rounds=2)
    peak = _peak_memory_mb(provider, case, mode, need_weights)
    name = f"mha {mode} {'weights' if need_weights else 'noweights'} {_case_id(case)}"
    record(benchmark, name, provider, _flops(case, mode), extra=dict(peak_mb=peak))


if __name__ == "__main__":  # the CPU memory probe: one call in a fresh process
    spec = json.loads(sys.argv[1])
    B, E, H, L, dtype, mask = spec["case"]
    case = (B, E, H, L, getattr(torch, dtype.replace("torch.", "")), mask)
    module, x, kwargs = _setup(spec["provider"], case, spec["mode"])
    one_row = {k: (v[:1] if k == "key_padding_mask" else v) for k, v in kwargs.items()}
    warm_up = _target(module, x[:1], one_row, spec["mode"], spec["need_weights"])
    target = _target(module, x, kwargs, spec["mode"], spec["need_weights"])
    print(peak_memory.measure(warm_up, target))
