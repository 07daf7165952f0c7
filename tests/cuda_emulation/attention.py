"""Runs the emulated sm_80 attention kernels (attention_harness.cpp) on torch tensors."""
from pathlib import Path

import torch

from tests.cuda_emulation import build

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


def _storage_from_view(t):
    """t's storage from t's first element on (a strided view keeps its strides), as bytes."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    flat = t.as_strided((n,), (1,), t.storage_offset()).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    elif flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def run_attention(exe, workdir, q, k, v, attn_mask, key_padding_mask, causal, dropout_p,
                  scale, seed_offset, grad_out):
    """Forward and backward through the emulated kernels, as the torch binding calls them.

    Args:
      q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], grad_out [B, Hq, L, Dv]: fp16 or
        bf16, any strides (made unit-stride along the head dim, as the binding does).
      attn_mask: None, bool or q.dtype, broadcastable to [B, Hq, L, S];
      key_padding_mask: None or bool [B, S] (True = padding).
      seed_offset: int64 [2] (dropout's seed and offset) or None.
    Returns dict of out [B, Hq, L, Dv], lse [B, Hq, L] (float32), dq, dk, dv.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v, grad_out = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, grad_out))
    mask_kind = 0
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, Hq, L, S)
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
    strides = []
    for name, t in (("q", q), ("k", k), ("v", v), ("mask", attn_mask), ("go", grad_out),
                    ("kp", key_padding_mask)):
        (workdir / f"{name}.bin").write_bytes(b"" if t is None else _storage_from_view(t))
        strides.append(([0] * 4 if t is None else list(t.stride()) + [0] * (4 - t.dim())))
    seed, offset = (0, 0) if seed_offset is None else (int(x) & (2**64 - 1) for x in seed_offset)
    cfg = [_DTYPE_CODE[q.dtype], B, Hq, Hkv, L, S, D, Dv, int(causal), mask_kind,
           int(key_padding_mask is not None), repr(float(dropout_p)), seed, offset,
           repr(float(scale))]
    (workdir / "cfg.txt").write_text(" ".join(map(str, cfg)) + "\n" + "\n".join(
        " ".join(map(str, s)) for s in strides) + "\n")
    build.run(exe, workdir)

    def load(name, shape, dtype):
        raw = bytearray((workdir / f"{name}.bin").read_bytes())
        if dtype == torch.float32:
            return torch.frombuffer(raw, dtype=torch.float32).reshape(shape)
        return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape)

    dt = q.dtype
    return dict(out=load("out", (B, L, Hq, Dv), dt).transpose(1, 2),
                lse=load("lse", (B, Hq, L), torch.float32),
                dq=load("dq", (B, L, Hq, D), dt).transpose(1, 2),
                dk=load("dk", (B, S, Hkv, D), dt).transpose(1, 2),
                dv=load("dv", (B, S, Hkv, Dv), dt).transpose(1, 2))
