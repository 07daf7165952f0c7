"""Attention: seqkern's backends against torch's SDPA, same inputs, same process.

FLOPs by the FlashAttention convention: forward 4*B*H*L*S*D (halved with is_causal),
backward 2.5x the forward. Key padding is given to torch as the equivalent bool attn_mask
([B, 1, 1, S]); its FLOPs are counted as unpadded for both peers.
"""
import pytest
import torch
import torch.nn.functional as F

import seqkern

CUDA = torch.cuda.is_available()


def _cases():
    if CUDA:
        cases = []
        for D in (64, 128):
            H = 2048 // D
            for L in (512, 1024, 2048, 4096, 8192, 16384):
                for mask in ("none", "causal", "pad"):
                    cases.append((16384 // L, H, L, D, torch.bfloat16, mask))
        return cases
    return [(4, 8, 512, 64, torch.float32, m) for m in ("none", "causal", "pad")] + [
        (4, 8, 512, 64, torch.bfloat16, "none")]


def _providers():
    if CUDA:
        return ["seqkern-triton", "seqkern-cuda", "torch-sdpa"]
    return ["seqkern-cpu", "torch-sdpa"]


def _inputs(B, H, L, D, dtype, mask):
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float32).to(device, dtype)
               for _ in range(3))
    kpm = None
    if mask == "pad":  # 25% padding on average, at the end of each sequence
        lengths = torch.linspace(0.5, 1.0, B) * L if B > 1 else torch.tensor([0.75 * L])
        kpm = (torch.arange(L)[None, :] >= lengths.round()[:, None]).to(device)
    return q, k, v, kpm


def _fn(provider, q, k, v, kpm, causal):
    if provider == "torch-sdpa":
        attn_mask = None if kpm is None else ~kpm[:, None, None, :]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                              is_causal=causal)
    backend = provider.split("-", 1)[1]

    def run(q, k, v):
        with seqkern.backend(backend):
            return seqkern.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, key_padding_mask=kpm)
    return run


def _available(provider, q, kpm, causal):
    if provider == "torch-sdpa":
        return True
    name = provider.split("-", 1)[1]
    # The op's own inputs dict: the first GPU run failed every triton case on a partial one.
    inputs = seqkern.ops.attention._inputs(q, q, q, None, kpm, 0.0, causal)
    return not seqkern.backends.BACKENDS[name].not_supported_reasons("attention", inputs)


def _case_id(c):
    return "B{}-H{}-L{}-D{}-{}-{}".format(c[0], c[1], c[2], c[3],
                                          str(c[4]).replace("torch.", ""), c[5])


# provider outermost: it varies fastest, so a case's peers run back to back (whole rows
# when a time limit cuts the run short)
@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_attention(benchmark, record, provider, case, pass_):
    B, H, L, D, dtype, mask = case
    q, k, v, kpm = _inputs(*case)
    if not _available(provider, q, kpm, mask == "causal"):
        pytest.skip(f"{provider} not usable here")
    fn = _fn(provider, q, k, v, kpm, mask == "causal")
    flops = 4 * B * H * L * L * D * (0.5 if mask == "causal" else 1.0)
    if pass_ == "fwd":
        def target():
            with torch.no_grad():
                fn(q, k, v)
    else:
        flops *= 3.5
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        grad = torch.randn_like(q)

        def target():
            fn(qg, kg, vg).backward(grad)
    rounds = 20 if CUDA else 8
    benchmark.pedantic(record.timed(target), rounds=rounds, iterations=1, warmup_rounds=3)
    record(benchmark, f"attention {pass_} {_case_id(case)}", provider, flops)
