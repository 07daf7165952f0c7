"""Masked attention in Triton: forward and FlashAttention-2 style backward.

Shapes: query [B, Hq, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv], any strides;
query head h reads key/value head h // (Hq // Hkv). attn_mask is None or [B, Hq, L, S]
(usually a stride-0 broadcast view, read through its strides), bool (True = may attend)
or float (added to the scaled scores). key_padding_mask is None or [B, S] bool
(True = padding). is_causal hides key j from query i when j > i (top-left aligned).

Nothing of size [L, S] is ever stored: the forward keeps a running max and sum per query
row (online softmax) and writes lse; the backward recomputes P = exp(s - lse) tile by
tile. Dropout regenerates seqkern.reference.dropout_keep_mask from (seed, offset) in both
directions, so no mask is stored either.

The same kernels run compiled on CUDA tensors and under the Triton interpreter
(TRITON_INTERPRET=1) on CPU tensors; they use only long-standing tl APIs so that both
triton 3.6 and 3.9 compile them.
"""
import contextlib

import torch
import triton
import triton.language as tl

from seqkern._debug import new_output

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _fmix32(x):
    # murmur3's finalizer on uint32: the multiplications wrap mod 2**32 and the shifts
    # are logical, exactly as seqkern.reference._fmix32 does on int64 with & 0xFFFFFFFF.
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # fp32 inputs stay fp32 ("ieee", not tf32): the fp32 path is the accurate one.
    if UPCAST:
        # Triton's interpreter keeps bf16 as raw uint16 bits and tl.dot multiplies those
        # (triton-lang/triton#11584); fp32 operands holding the same bf16 values give
        # what the GPU's bf16 MMA with fp32 accumulation gives.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dropout_keep(bh, offs_m, offs_n, L, S, dropout_p, seed_lo, seed_hi, rng_offset):
    """[BLOCK_M, BLOCK_N] keep-mask of seqkern.reference.dropout_keep_mask."""
    # The counter is 64-bit (B * Hq * L * S passes 2**32 on long sequences), but only the
    # per-row counter is held in int64: the tile works on its 32-bit halves, carrying
    # into the high half where the low half wraps, which keeps register pressure down.
    row = (bh.to(tl.int64) * L + offs_m) * S + rng_offset
    row_lo = row.to(tl.uint32)[:, None]
    lo = row_lo + offs_n.to(tl.uint32)[None, :]
    hi = (row >> 32).to(tl.uint32)[:, None] + (lo < row_lo).to(tl.uint32)
    bits = _fmix32(lo ^ seed_lo.to(tl.uint32))
    bits = _fmix32(bits ^ hi ^ seed_hi.to(tl.uint32))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) >= dropout_p


@triton.jit
def _masked_scores(s, b, h, offs_m, offs_n, L, S, Mask, smb, smh, sml, sms, Kpm, spb, sps,
                   MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Scaled scores s [BLOCK_M, BLOCK_N] with every hidden entry set to -inf.

    MASK_KIND: 0 no attn_mask, 1 bool (nonzero = may attend), 2 float (added to s).
    """
    visible = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_KPM:
        pad = tl.load(Kpm + b.to(tl.int64) * spb + offs_n * sps, mask=offs_n < S, other=1)
        visible = visible & (pad == 0)[None, :]
    if MASK_KIND != 0:
        # int64 rows: a materialised [L, S] mask per head can pass 2**31 elements.
        ptrs = (Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh
                + offs_m[:, None].to(tl.int64) * sml + offs_n[None, :] * sms)
        mask = tl.load(ptrs, mask=visible, other=0)
        if MASK_KIND == 1:
            visible = visible & (mask != 0)
        else:
            s = s + mask.to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _key_bounds(b, KvRange, S, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key loop: padding outside the first and last real key is skipped."""
    lo = 0
    hi = S
    if HAS_KPM:
        lo = (tl.load(KvRange + 2 * b) // BLOCK_N) * BLOCK_N
        hi = tl.load(KvRange + 2 * b + 1)
    return lo, hi


# ----------------------------------------------------------------------------- forward

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "rng_offset"])
def _attention_fwd_kernel(
        Q, K, V, Out, Lse, Mask, Kpm, KvRange,
        sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sol, sod,
        smb, smh, sml, sms, spb, sps,
        Hq, group, L, S, D, Dv, scale, dropout_p, dropout_scale,
        seed_lo, seed_hi, rng_offset,
        MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, hi = _key_bounds(b, KvRange, S, HAS_KPM, BLOCK_N)
    if IS_CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k_t = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, k_t, DOT_UPCAST) * scale
        s = _masked_scores(s, b, h, offs_m, offs_n, L, S, Mask, smb, smh, sml, sms,
                           Kpm, spb, sps, MASK_KIND, HAS_KPM, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet has m = -inf; subtracting 0 instead keeps
        # exp(-inf - -inf) = NaN out of p and alpha.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(bh, offs_m, offs_n, L, S, dropout_p, seed_lo, seed_hi,
                                 rng_offset)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < Dv), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_base = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + offs_m[:, None] * sol + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_dv[None, :] < Dv))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# ---------------------------------------------------------------------------- backward

@triton.jit
def _attention_bwd_delta_kernel(
        Out, DO, Delta, sob, soh, sol, sod, sdb, sdh, sdl, sdd, Hq, L, Dv,
        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    # D_i = rowsum(dO * O): the softmax backward's correction, one value per query row.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < L) & (offs_dv[None, :] < Dv)
    o = tl.load(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
                + offs_m[:, None] * sol + offs_dv[None, :] * sod, mask=inside, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
                 + offs_m[:, None] * sdl + offs_dv[None, :] * sdd, mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _probs_and_dscores(q, k_t, v_t, do, lse, delta, b, h, bh, offs_m, offs_n, L, S, scale,
                       Mask, smb, smh, sml, sms, Kpm, spb, sps,
                       dropout_p, dropout_scale, seed_lo, seed_hi, rng_offset,
                       MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       DOT_UPCAST: tl.constexpr):
    """The backward's tile: (P after dropout, dS) for a query block and a key block."""
    s = _dot(q, k_t, DOT_UPCAST) * scale
    s = _masked_scores(s, b, h, offs_m, offs_n, L, S, Mask, smb, smh, sml, sms,
                       Kpm, spb, sps, MASK_KIND, HAS_KPM, IS_CAUSAL)
    # Rows with lse = -inf see no key (every s is -inf): subtracting 0 makes their P 0.
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse[:, None])
    dp = _dot(do, v_t, DOT_UPCAST)
    if HAS_DROPOUT:
        keep = _dropout_keep(bh, offs_m, offs_n, L, S, dropout_p, seed_lo, seed_hi,
                             rng_offset)
        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_dropped = p
    return p_dropped, p * (dp - delta[:, None])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "rng_offset"])
def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, KvRange,
        sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sdl, sdd,
        sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, smb, smh, sml, sms, spb, sps,
        Hq, group, L, S, D, Dv, scale, dropout_p, dropout_scale,
        seed_lo, seed_hi, rng_offset,
        MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program owns a key block of one kv head and walks every query block of every
    # query head in its group: dK and dV are summed in a fixed order, without atomics.
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = Hq // group
    b = bhk // Hkv
    hk = bhk % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_m = tl.arange(0, BLOCK_M)

    k_t = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
                  + offs_n[None, :] * sks + offs_d[:, None] * skd,
                  mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
    v_t = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
                  + offs_n[None, :] * svs + offs_dv[:, None] * svd,
                  mask=(offs_n[None, :] < S) & (offs_dv[:, None] < Dv), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo = 0
    if IS_CAUSAL:
        # Queries before this block's first key see none of it.
        lo = (start_n // BLOCK_M) * BLOCK_M
    hi = L
    if HAS_KPM:
        kv_lo = tl.load(KvRange + 2 * b)
        kv_hi = tl.load(KvRange + 2 * b + 1)
        hi = tl.where((start_n >= kv_hi) | (start_n + BLOCK_N <= kv_lo), lo, hi)
    for g in range(group):
        h = hk * group + g
        bh = b * Hq + h
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + arange_m
            q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                        mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdl + offs_dv[None, :] * sdd,
                         mask=(offs_m[:, None] < L) & (offs_dv[None, :] < Dv), other=0.0)
            lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
            delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L,
                            other=0.0)
            p, ds = _probs_and_dscores(
                q, k_t, v_t, do, lse, delta, b, h, bh, offs_m, offs_n, L, S, scale,
                Mask, smb, smh, sml, sms, Kpm, spb, sps,
                dropout_p, dropout_scale, seed_lo, seed_hi, rng_offset,
                MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_DROPOUT, DOT_UPCAST)
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_UPCAST)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_UPCAST)

    inside_n = offs_n[:, None] < S
    tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh
             + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=inside_n & (offs_d[None, :] < D))
    tl.store(DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh
             + offs_n[:, None] * sdvs + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=inside_n & (offs_dv[None, :] < Dv))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "rng_offset"])
def _attention_bwd_dq_kernel(
        Q, K, V, DO, Lse, Delta, DQ, Mask, Kpm, KvRange,
        sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sdl, sdd,
        sdqb, sdqh, sdql, sdqd, smb, smh, sml, sms, spb, sps,
        Hq, group, L, S, D, Dv, scale, dropout_p, dropout_scale,
        seed_lo, seed_hi, rng_offset,
        MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # A separate pass per query block keeps dQ deterministic (no atomics across key blocks).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    inside_m = offs_m[:, None] < L

    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=inside_m & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
                 + offs_m[:, None] * sdl + offs_dv[None, :] * sdd,
                 mask=inside_m & (offs_dv[None, :] < Dv), other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_bounds(b, KvRange, S, HAS_KPM, BLOCK_N)
    if IS_CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * svs + offs_dv[:, None] * svd,
                      mask=(offs_n[None, :] < S) & (offs_dv[:, None] < Dv), other=0.0)
        _, ds = _probs_and_dscores(
            q, tl.trans(k), v_t, do, lse, delta, b, h, bh, offs_m, offs_n, L, S, scale,
            Mask, smb, smh, sml, sms, Kpm, spb, sps,
            dropout_p, dropout_scale, seed_lo, seed_hi, rng_offset,
            MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_DROPOUT, DOT_UPCAST)
        dq += _dot(ds.to(k.dtype), k, DOT_UPCAST)

    tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh
             + offs_m[:, None] * sdql + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=inside_m & (offs_d[None, :] < D))


# -------------------------------------------------------------------------------- host


def _config(head_dim, dtype):
    """Tiles for the larger of D and Dv: ((BLOCK_M, BLOCK_N) of the forward and dQ passes,
    (queries streamed, keys resident) of the dK/dV pass, num_warps, num_stages).

    Modest tiles so that D = 256 fits an H100's (and an A100's) registers and shared
    memory. fp32 dots run "ieee" on CUDA cores, whose tiles cost far more registers and
    shared memory than tensor-core tiles: hence the smaller fp32 tiles and pipelines.
    Chosen from ptxas's register, spill and shared-memory report (.ci/triton_compile.py,
    sm_80 and sm_90), not from timings: the fp32 dK/dV pass keeps 16 keys above D = 64
    (32 spilled 300-360 bytes at D = 128 and ~5 KB at D = 256; 16 spill none at 128 and
    210-260 bytes at 256, its floor: 16 is tl.dot's smallest tile).
    """
    if dtype == torch.float32:
        return (32, 32), (16, 16 if head_dim > 64 else 32), 8, (2 if head_dim > 128 else 3)
    if head_dim <= 64:
        return (64, 64), (64, 64), 8, 3
    return (64, 32), (32, 64), 8, 3


def _block_dim(dim):
    # tl.dot needs every dimension >= 16; arange needs a power of two.
    return max(16, triton.next_power_of_2(dim))


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _mask_args(query, attn_mask, key_padding_mask):
    """Pointer and strides for the masks; query stands in for a missing one (never read)."""
    if attn_mask is None:
        mask, kind, mask_strides = query, _MASK_NONE, (0, 0, 0, 0)
    elif attn_mask.dtype == torch.bool:
        # A same-size view keeps the strides (stride 0 included): nothing is copied.
        mask, kind, mask_strides = attn_mask.view(torch.uint8), _MASK_BOOL, attn_mask.stride()
    else:
        mask, kind, mask_strides = attn_mask, _MASK_FLOAT, attn_mask.stride()
    if key_padding_mask is None:
        return (mask, query, query), kind, (*mask_strides, 0, 0)
    kpm = key_padding_mask.view(torch.uint8)
    return (mask, kpm, _key_range(key_padding_mask)), kind, (*mask_strides, *kpm.stride())


def _key_range(key_padding_mask):
    """[B, 2] int32: first real key and one past the last, per batch ([S, 0] if none).

    The kernels skip the key tiles outside it (right or left padding); padding inside it
    is masked per key. Computed on the device: no host sync.
    """
    S = key_padding_mask.shape[1]
    pos = torch.arange(S, device=key_padding_mask.device, dtype=torch.int32)
    real = ~key_padding_mask
    first = torch.where(real, pos, S).amin(1)
    end = torch.where(real, pos + 1, 0).amax(1)
    return torch.stack([first, end], 1).to(torch.int32).contiguous()


def _dropout_args(dropout_p, seed_offset):
    if dropout_p == 0.0:
        return False, 0.0, 1.0, 0, 0, 0
    seed, offset = (int(v) for v in seed_offset.tolist())  # seed_offset lives on the CPU
    return (True, float(dropout_p), 1.0 / (1.0 - dropout_p),
            seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset)


def _flags(query, kind, key_padding_mask, is_causal, has_dropout, blocks):
    # CPU tensors only ever run interpreted, and the interpreter cannot tl.dot bf16.
    dot_upcast = query.device.type == "cpu" and query.dtype == torch.bfloat16
    return dict(MASK_KIND=kind, HAS_KPM=key_padding_mask is not None,
                IS_CAUSAL=bool(is_causal), HAS_DROPOUT=has_dropout, DOT_UPCAST=dot_upcast,
                **blocks)


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                  scale, seed_offset):
    """Masked attention forward. Returns (out [B, Hq, L, Dv], lse [B, Hq, L] fp32).

    Args:
      query [B, Hq, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv]: fp16, bf16 or fp32,
        any strides, Hq a multiple of Hkv, D and Dv <= 256.
      attn_mask: None or [B, Hq, L, S] bool (True = may attend) or float (query's dtype).
      key_padding_mask: None or [B, S] bool, True = padding.
      dropout_p: in [0, 1); seed_offset: CPU int64 [2] (seed, offset) when dropout_p > 0.
      is_causal: key j visible to query i iff j <= i. scale: multiplier of q.k.

    A row with no visible key gets out 0 and lse -inf.

    Example:
      >>> q = k = v = torch.randn(1, 2, 16, 64, device="cuda")
      >>> out, lse = attention_fwd(q, k, v, None, None, 0.0, True, 0.125, None)
    """
    B, Hq, L, D = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[3]
    # Laid out as a dense [B, L, Hq, Dv] ("heads inner", seqkern/ops/attention.py).
    out = new_output((B, L, Hq, Dv), query.dtype, query.device).transpose(1, 2)
    lse = new_output((B, Hq, L), torch.float32, query.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    (mask, kpm, kv_range), kind, mask_strides = _mask_args(query, attn_mask,
                                                           key_padding_mask)
    has_dropout, p, p_scale, seed_lo, seed_hi, offset = _dropout_args(dropout_p, seed_offset)
    (block_m, block_n), _, num_warps, num_stages = _config(max(D, Dv), query.dtype)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_dim(D),
                  BLOCK_DV=_block_dim(Dv))
    with _device_guard(query):
        _attention_fwd_kernel[(triton.cdiv(L, block_m), B * Hq)](
            query, key, value, out, lse, mask, kpm, kv_range,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mask_strides,
            Hq, Hq // Hkv, L, S, D, Dv, float(scale), p, p_scale, seed_lo, seed_hi, offset,
            **_flags(query, kind, key_padding_mask, is_causal, has_dropout, blocks),
            num_warps=num_warps, num_stages=num_stages)
    return out, lse


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                  dropout_p, is_causal, scale, seed_offset):
    """Gradients (dq, dk, dv) of attention_fwd, shaped and typed like query, key, value.

    Args: as attention_fwd, plus grad_out [B, Hq, L, Dv] and the forward's out and lse.
    Rows with lse = -inf contribute nothing. No gradient flows to the masks.

    Example:
      >>> dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, None, None, 0.0, True,
      ...                            0.125, None)
    """
    B, Hq, L, D = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[3]
    # Laid out as dense [B, T, H, D] ("heads inner", seqkern/ops/attention.py).
    dq, dk, dv = (new_output((t.shape[0], t.shape[2], t.shape[1], t.shape[3]), t.dtype,
                             t.device).transpose(1, 2) for t in (query, key, value))
    if L == 0 or S == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()  # [B, Hq, L]; the forward wrote it contiguous already
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    (mask, kpm, kv_range), kind, mask_strides = _mask_args(query, attn_mask,
                                                           key_padding_mask)
    has_dropout, p, p_scale, seed_lo, seed_hi, offset = _dropout_args(dropout_p, seed_offset)
    (block_m, block_n), (stream_m, resident_n), num_warps, num_stages = _config(
        max(D, Dv), query.dtype)
    block_d, block_dv = _block_dim(D), _block_dim(Dv)
    common = (Hq, Hq // Hkv, L, S, D, Dv, float(scale), p, p_scale, seed_lo, seed_hi, offset)
    with _device_guard(query):
        _attention_bwd_delta_kernel[(triton.cdiv(L, block_m), B * Hq)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, L, Dv,
            BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=num_warps, num_stages=num_stages)
        _attention_bwd_dkdv_kernel[(triton.cdiv(S, resident_n), B * Hkv)](
            query, key, value, grad_out, lse, delta, dk, dv, mask, kpm, kv_range,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(),
            *dk.stride(), *dv.stride(), *mask_strides, *common,
            **_flags(query, kind, key_padding_mask, is_causal, has_dropout,
                     dict(BLOCK_M=stream_m, BLOCK_N=resident_n, BLOCK_D=block_d,
                          BLOCK_DV=block_dv)),
            num_warps=num_warps, num_stages=num_stages)
        _attention_bwd_dq_kernel[(triton.cdiv(L, block_m), B * Hq)](
            query, key, value, grad_out, lse, delta, dq, mask, kpm, kv_range,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(),
            *dq.stride(), *mask_strides, *common,
            **_flags(query, kind, key_padding_mask, is_causal, has_dropout,
                     dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                          BLOCK_DV=block_dv)),
            num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


def attention_not_supported_reasons(inputs):
    """Why these kernels cannot run `inputs` (seqkern.ops.attention._inputs); [] if they can."""
    reasons = []
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    attn_mask, kpm = inputs["attn_mask"], inputs["key_padding_mask"]
    if query.dtype not in _DTYPES:
        reasons.append(f"dtype {query.dtype} is not one of fp16, bf16, fp32")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        reasons.append("query, key and value must share a dtype")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return reasons + ["query, key and value must be 4-D [B, H, L, D]"]
    D, Dv = query.shape[-1], value.shape[-1]
    if not (0 < D <= _MAX_HEAD_DIM and 0 < Dv <= _MAX_HEAD_DIM):
        reasons.append(f"head dims must be 1..{_MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        reasons.append(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    B, L, S = query.shape[0], query.shape[2], key.shape[2]
    if attn_mask is not None:
        if tuple(attn_mask.shape) != (B, Hq, L, S):
            reasons.append(f"attn_mask must be expanded to [B, Hq, L, S] = {[B, Hq, L, S]}, "
                           f"got {list(attn_mask.shape)}")
        if attn_mask.dtype not in (torch.bool, query.dtype):
            reasons.append(f"attn_mask dtype {attn_mask.dtype} is neither bool nor "
                           f"{query.dtype}")
    if kpm is not None and (kpm.dtype != torch.bool or tuple(kpm.shape) != (B, S)):
        reasons.append("key_padding_mask must be a [B, S] bool tensor")
    devices = {t.device for t in (query, key, value, attn_mask, kpm) if t is not None}
    if len(devices) > 1:
        reasons.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return reasons
