"""seqkern.nn.MultiheadAttention against torch.nn.MultiheadAttention.

Parity over a randomized grid of constructor options, input forms and masks (forward,
returned weights, gradients of inputs and of every parameter), in float64 on the cpu
backend and fp32 on the interpreted triton backend; state_dict round trips; the module
inside nn.TransformerEncoderLayer / DecoderLayer; fully masked rows; errors; dropout;
half precision and autocast; torch.compile.
"""
import copy
import os
import random
import warnings

import pytest
import torch
from torch import nn

import seqkern
from seqkern.backends import BACKENDS
from seqkern.reference import dropout_keep_mask
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative


# Written for CPU tensors (the cpu backend, Triton interpreted); under SEQKERN_TEST_DEVICE=cuda
# (bench/gpu_check.sh) the module is covered by bench/test_mha_bench.py instead.
pytestmark = pytest.mark.skipif(os.environ.get("SEQKERN_TEST_DEVICE", "cpu") != "cpu",
                                reason="CPU-tensor tests")


def _usable(name):
    return not BACKENDS[name].availability("cpu")


CPU = pytest.param("cpu", marks=pytest.mark.skipif(not _usable("cpu"), reason="no _C"))
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not _usable("triton"),
                                                         reason="triton not usable here"))
# float64 where the backend has it (cpu), else fp32 against torch's float64.
DTYPE = {"cpu": torch.float64, "triton": torch.float32}
GRID_SIZE = {"cpu": 96, "triton": 16}


def _pair(dtype=torch.float64, **options):
    """(torch's module, seqkern's) with the same weights; float64 torch as the oracle."""
    ref = nn.MultiheadAttention(dtype=torch.float64, **options)
    if options.get("add_bias_kv"):  # torch leaves them random; any value will do
        nn.init.normal_(ref.bias_k)
        nn.init.normal_(ref.bias_v)
    if options.get("bias", True):  # torch zeroes the biases: make them count
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = seqkern.nn.MultiheadAttention(dtype=dtype, **options)
    ours.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    return ref, ours


def _draw_case(rng):
    """One random point of the grid: module options and call arguments (as a recipe)."""
    H = rng.choice([1, 2, 3])
    E = H * rng.choice([2, 4, 8])
    kind = rng.choice(["self", "encdec", "general", "kvdim"])
    options = dict(embed_dim=E, num_heads=H, bias=rng.random() < 0.8,
                   add_bias_kv=rng.random() < 0.3, add_zero_attn=rng.random() < 0.3,
                   batch_first=rng.random() < 0.5)
    if kind == "kvdim":
        options.update(kdim=rng.choice([3, E]), vdim=rng.choice([5, 7]))
    L = rng.choice([1, 5, 7])
    S = L if kind == "self" else rng.choice([1, 6, 7])
    call = dict(kind=kind, N=rng.choice([1, 3]), L=L, S=S, batched=rng.random() < 0.8,
                kpm=rng.choice([None, "bool", "float"]),
                attn_mask=rng.choice([None, "bool2", "float2", "bool3", "float3"]),
                need_weights=rng.random() < 0.6, average=rng.random() < 0.5)
    call["is_causal"] = call["attn_mask"] is not None and rng.random() < 0.3
    return options, call


def _masks(call, H, gen):
    """(key_padding_mask, attn_mask) without fully masked rows (tested separately)."""
    N, L, S = call["N"], call["L"], call["S"]
    kpm = attn_mask = None
    if call["kpm"] is not None:
        padded = torch.rand(N, S, generator=gen) < 0.3
        padded[:, 0] = False
        kpm = padded if call["kpm"] == "bool" else \
            torch.randn(N, S, generator=gen, dtype=torch.float64).masked_fill(padded, -torch.inf)
        if not call["batched"]:
            kpm = kpm[0]
    if call["attn_mask"] is not None:
        lead = () if call["attn_mask"].endswith("2") else (
            (H,) if not call["batched"] else (N * H,))
        hidden = torch.rand(*lead, L, S, generator=gen) < 0.3
        hidden[..., 0] = False
        if call["is_causal"]:
            hidden = torch.ones(L, S, dtype=torch.bool).triu(1).expand(*lead, L, S).clone()
        attn_mask = hidden if call["attn_mask"].startswith("bool") else \
            torch.randn(*lead, L, S, generator=gen, dtype=torch.float64).masked_fill(
                hidden, -torch.inf)
    return kpm, attn_mask


def _inputs(options, call, gen):
    E = options["embed_dim"]
    kdim, vdim = options.get("kdim") or E, options.get("vdim") or E
    N, L, S = call["N"], call["L"], call["S"]

    def make(T, width):
        shape = ((N, T) if options["batch_first"] else (T, N)) if call["batched"] else (T,)
        return torch.randn(*shape, width, generator=gen, dtype=torch.float64)

    query = make(L, E)
    if call["kind"] == "self":
        return query, query, query
    if call["kind"] == "encdec":
        key = make(S, E)
        return query, key, key
    return query, make(S, kdim), make(S, vdim)


def _run(module, qkv, kpm, attn_mask, call, dtype):
    """Forward and backward; returns {name: tensor} of everything compared."""
    unique = []
    for t in qkv:
        if not any(t is u for u in unique):
            unique.append(t)
    leaves = {id(t): t.detach().to(dtype).requires_grad_(True) for t in unique}
    q, k, v = (leaves[id(t)] for t in qkv)
    cast = (lambda m: None if m is None or m.dtype == torch.bool else m.to(dtype))
    kpm_c = kpm if kpm is None or kpm.dtype == torch.bool else cast(kpm)
    mask_c = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool \
        else cast(attn_mask)
    out, weights = module(q, k, v, key_padding_mask=kpm_c, need_weights=call["need_weights"],
                          attn_mask=mask_c, average_attn_weights=call["average"],
                          is_causal=call["is_causal"])
    grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    params = dict(module.named_parameters())
    tensors = list(leaves.values()) + list(params.values())
    grads = torch.autograd.grad(out, tensors, grad.to(dtype))
    result = {"out": out.detach()}
    if weights is not None:
        result["weights"] = weights.detach()
    names = [f"d_input{i}" for i in range(len(leaves))] + [f"d_{n}" for n in params]
    result.update(zip(names, grads))
    return result


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_randomized_grid_matches_torch(backend):
    dtype = DTYPE[backend]
    rng = random.Random(20261125)
    for case in range(GRID_SIZE[backend]):
        options, call = _draw_case(rng)
        gen = torch.Generator().manual_seed(case)
        torch.manual_seed(case)
        ref, ours = _pair(dtype, **options)
        qkv = _inputs(options, call, gen)
        kpm, attn_mask = _masks(call, options["num_heads"], gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mismatched mask dtypes: deprecated, tested below
            want = _run(ref, qkv, kpm, attn_mask, call, torch.float64)
            with seqkern.backend(backend):
                got = _run(ours, qkv, kpm, attn_mask, call, dtype)
        assert got.keys() == want.keys(), (options, call)
        for name in want:
            try:
                assert_close(name, got[name], want[name], dtype=dtype)
            except AssertionError as exc:
                raise AssertionError(f"case {case}: {options} {call}: {exc}") from None


def test_init_registration_and_state_dict_round_trip():
    for options in (dict(), dict(add_bias_kv=True, add_zero_attn=True),
                    dict(kdim=6, vdim=10, bias=False), dict(batch_first=True, dropout=0.1)):
        torch.manual_seed(1)
        ref = nn.MultiheadAttention(8, 2, **options)
        torch.manual_seed(1)
        ours = seqkern.nn.MultiheadAttention(8, 2, **options)
        assert isinstance(ours, nn.MultiheadAttention)
        assert seqkern.MultiheadAttention is seqkern.nn.MultiheadAttention
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        assert list(sd_ref) == list(sd_ours)
        for key in sd_ref:  # same initialisation, drawn in the same order
            assert torch.equal(sd_ref[key], sd_ours[key]), key
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads",
                     "dropout", "batch_first", "head_dim", "add_zero_attn"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
        assert (ours.bias_k is None) == (ref.bias_k is None)
        assert type(ours.out_proj) is type(ref.out_proj)
        # Both directions.
        other = nn.MultiheadAttention(8, 2, **options)
        other.load_state_dict(ours.state_dict())
        ours2 = seqkern.nn.MultiheadAttention(8, 2, **options)
        ours2.load_state_dict(other.state_dict())
        for key, value in ours2.state_dict().items():
            assert torch.equal(value, sd_ours[key]), key


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_fully_masked_rows_give_zeros_not_nan(backend):
    dtype = DTYPE[backend]
    ref, ours = _pair(dtype, embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True                       # batch 1: every key padded
    attn_mask = torch.zeros(5, 5, dtype=torch.bool)
    attn_mask[2] = True                 # query 2: every key hidden
    # torch's need_weights=False path (SDPA) gives zeros for these rows: the oracle.
    xr = x.clone().requires_grad_(True)
    want, _ = ref(xr, xr, xr, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    want_grads = torch.autograd.grad(want.sum(), [xr, *ref.parameters()])
    for need_weights in (True, False):
        xo = x.to(dtype).requires_grad_(True)
        with seqkern.backend(backend):
            out, weights = ours(xo, xo, xo, key_padding_mask=kpm, attn_mask=attn_mask,
                                need_weights=need_weights)
            grads = torch.autograd.grad(out.sum(), [xo, *ours.parameters()])
        assert_close("out", out, want, dtype=dtype)
        assert torch.allclose(out[1].double(), ours.out_proj.bias.double().expand(5, 8))
        for name, g, w in zip(["dx", *dict(ours.named_parameters())], grads, want_grads):
            assert_close(f"d_{name}", g, w, dtype=dtype)
        if need_weights:
            assert torch.equal(weights[1], torch.zeros_like(weights[1]))
            assert torch.equal(weights[:, 2], torch.zeros_like(weights[:, 2]))
            _, torch_weights = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
            assert torch.isnan(torch_weights[1]).all()  # what torch does, and we do not
            assert_close("weights", weights[0, [0, 1, 3, 4]],
                         torch_weights[0, [0, 1, 3, 4]], dtype=dtype)


def test_is_causal_hint_follows_torch():
    ref, ours = _pair(embed_dim=8, num_heads=2)
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    wrong = torch.zeros(6, 6, dtype=torch.bool)  # not causal: ignored where torch ignores it
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    for kwargs in (dict(need_weights=False), dict(need_weights=True),
                   dict(need_weights=False, key_padding_mask=kpm)):
        want = ref(x, x, x, attn_mask=wrong, is_causal=True, **kwargs)
        got = ours(x, x, x, attn_mask=wrong, is_causal=True, **kwargs)
        assert_close("out", got[0], want[0])
        if kwargs["need_weights"]:
            assert_close("weights", got[1], want[1])


def _error_cases():
    E = 8
    x = torch.randn(5, 3, E)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    return {
        "key 2-D for batched query": dict(args=(x, x[:, 0], x[:, 0])),
        "query 4-D": dict(args=(x[None], x[None], x[None])),
        "batch mismatch": dict(args=(x, x[:, :2], x[:, :2])),
        "embed mismatch": dict(args=(x[..., :6], x, x)),
        "key/value shape": dict(args=(x, x, x[:4])),
        "kpm shape": dict(args=(x, x, x), kwargs=dict(key_padding_mask=kpm[:, :4])),
        "kpm 3-D": dict(args=(x, x, x), kwargs=dict(key_padding_mask=kpm[None])),
        "kpm int": dict(args=(x, x, x), kwargs=dict(key_padding_mask=kpm.long())),
        "mask int": dict(args=(x, x, x), kwargs=dict(attn_mask=torch.zeros(5, 5).int())),
        "mask uint8": dict(args=(x, x, x), kwargs=dict(attn_mask=torch.zeros(5, 5).byte())),
        "mask 2-D shape": dict(args=(x, x, x), kwargs=dict(attn_mask=torch.zeros(5, 4))),
        "mask 3-D shape": dict(args=(x, x, x), kwargs=dict(attn_mask=torch.zeros(3, 5, 5))),
        "mask 4-D": dict(args=(x, x, x), kwargs=dict(attn_mask=torch.zeros(1, 6, 5, 5))),
        "unbatched 3-D mask": dict(args=(x[:, 0], x[:, 0], x[:, 0]),
                                   kwargs=dict(attn_mask=torch.zeros(3, 5, 5))),
        "is_causal without mask": dict(args=(x, x, x), kwargs=dict(is_causal=True)),
        "kdim mismatch": dict(options=dict(kdim=4, vdim=4), args=(x, x[..., :3], x[..., :4])),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_errors_match_torch(name):
    case = _error_cases()[name]
    options = dict(embed_dim=8, num_heads=2, **case.get("options", {}))
    ref = nn.MultiheadAttention(**options)
    ours = seqkern.nn.MultiheadAttention(**options)
    with pytest.raises(Exception) as torch_error:
        ref(*case["args"], **case.get("kwargs", {}))
    with pytest.raises(type(torch_error.value)) as our_error:
        ours(*case["args"], **case.get("kwargs", {}))
    assert str(our_error.value)


def test_constructor_errors_match_torch():
    for args in ((8, 3), (0, 2), (8, 0), (-4, 2)):
        with pytest.raises(Exception) as torch_error:
            nn.MultiheadAttention(*args)
        with pytest.raises(type(torch_error.value)):
            seqkern.nn.MultiheadAttention(*args)


def test_mismatched_mask_dtypes_warn_like_torch():
    _, ours = _pair(embed_dim=8, num_heads=2)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool),
             attn_mask=torch.zeros(5, 5, dtype=torch.float64))


@pytest.mark.parametrize("average", [True, False])
def test_gradients_through_the_weights(average):
    ref, ours = _pair(embed_dim=8, num_heads=2, add_zero_attn=True)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    attn_mask = torch.rand(5, 5) < 0.3
    grads = []
    for module in (ref, ours):
        xr = x.clone().requires_grad_(True)
        out, weights = module(xr, xr, xr, attn_mask=attn_mask, average_attn_weights=average)
        loss = out.sum() + (weights * torch.arange(weights.numel()).view(weights.shape)).sum()
        grads.append(torch.autograd.grad(loss, [xr, *module.parameters()]))
    for name, g, w in zip(["dx", *dict(ours.named_parameters())], grads[1], grads[0]):
        assert_close(f"d_{name}", g, w)


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_dropout_only_in_training_and_weights_are_the_ones_used(backend):
    dtype = DTYPE[backend]
    _, ours = _pair(dtype, embed_dim=8, num_heads=2, dropout=0.4, batch_first=True)
    x = torch.randn(2, 7, 8, dtype=dtype)
    ours.eval()
    with seqkern.backend(backend):
        a, b = ours(x, x, x)[0], ours(x, x, x)[0]
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(3)
    with seqkern.backend(backend):
        out, weights = ours(x, x, x, average_attn_weights=False)
    torch.manual_seed(3)
    seed = seqkern.ops.attention.draw_dropout_seed()
    keep = dropout_keep_mask(seed, 2, 2, 7, 7, 0.4)
    assert torch.equal(weights != 0, keep)  # exactly the realised keep-mask
    # The output is out_proj(weights @ v): the returned weights are the ones used.
    v = torch.nn.functional.linear(x, ours.in_proj_weight[16:], ours.in_proj_bias[16:])
    v = v.view(2, 7, 2, 4).transpose(1, 2)
    attended = (weights @ v).transpose(1, 2).reshape(2, 7, 8)
    expected = ours.out_proj(attended)
    assert_close("out", out.detach(), expected.detach(), dtype=dtype)
    assert not torch.allclose(out, a)


def _layer_pair(kind, **options):
    torch.manual_seed(4)
    layer_cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    ref = layer_cls(16, 4, dim_feedforward=32, dropout=0.0, dtype=torch.float64, **options)
    ours = seqkern.swap_modules(copy.deepcopy(ref))
    assert isinstance(ours.self_attn, seqkern.nn.MultiheadAttention)
    return ref, ours


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_inside_transformer_layers(kind, batch_first):
    ref, ours = _layer_pair(kind, batch_first=batch_first)
    L, N = 7, 3
    shape = (N, L, 16) if batch_first else (L, N, 16)
    x, memory = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 5:] = True
    if kind == "encoder":
        args = (x,)
        kwargs = dict(src_mask=causal, src_key_padding_mask=kpm, is_causal=True)
    else:
        args = (x, memory)
        kwargs = dict(tgt_mask=causal, memory_key_padding_mask=kpm, tgt_is_causal=True)
    want = ref(*args, **kwargs)
    got = ours(*args, **kwargs)
    assert_close("out", got, want)
    want_grads = torch.autograd.grad(want.sum(), list(ref.parameters()))
    got_grads = torch.autograd.grad(got.sum(), list(ours.parameters()))
    for (name, _), g, w in zip(ref.named_parameters(), got_grads, want_grads):
        assert_close(f"d_{name}", g, w)
    # Inference: torch's layer would take its fused path; ours runs seqkern's kernels.
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert_close("out (eval)", ours(*args, **kwargs), ref(*args, **kwargs))


def test_swap_modules_keeps_parameters_device_dtype_and_mode():
    model = nn.Transformer(16, 2, 1, 1, dim_feedforward=32, dtype=torch.float64).eval()
    params = {n: p for n, p in model.named_parameters()}
    assert seqkern.swap_modules(model) is model
    for name, p in model.named_parameters():
        assert p is params[name]
    swapped = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(swapped) == 3
    assert all(type(m) is seqkern.nn.MultiheadAttention and not m.training for m in swapped)


def test_transformer_encoder_nested_tensor_inference():
    """nn.TransformerEncoder turns padded input into a NestedTensor in inference."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dtype=torch.float64)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ours = seqkern.swap_modules(copy.deepcopy(ref))
    ours.use_nested_tensor = True  # as nn.TransformerEncoder sets it for such layers
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        want, got = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    assert_close("out", got.masked_fill(kpm[..., None], 0), want.masked_fill(kpm[..., None], 0))


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_relative_rule(backend, dtype):
    ref, ours = _pair(dtype, embed_dim=16, num_heads=2, batch_first=True)
    peer = copy.deepcopy(ref).to(dtype)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    want, want_w = ref(x, x, x, key_padding_mask=kpm)
    xd = x.to(dtype)
    peer_out, peer_w = peer(xd, xd, xd, key_padding_mask=kpm)
    with seqkern.backend(backend):
        out, weights = ours(xd, xd, xd, key_padding_mask=kpm)
    assert out.dtype == weights.dtype == dtype
    if dtype == torch.float32:
        assert_close("out", out, want), assert_close("weights", weights, want_w)
        return
    assert_close_relative("out", out, want, peer_out, FWD_FACTOR)
    assert_close_relative("weights", weights, want_w, peer_w, FWD_FACTOR)
    grad_ref = torch.autograd.grad(want.sum(), ref.in_proj_weight)[0]
    grad_peer = torch.autograd.grad(peer_out.float().sum(), peer.in_proj_weight)[0]
    with seqkern.backend(backend):
        out, _ = ours(xd, xd, xd, key_padding_mask=kpm, need_weights=False)
        grad = torch.autograd.grad(out.float().sum(), ours.in_proj_weight)[0]
    assert_close_relative("d_in_proj_weight", grad, grad_ref, grad_peer, BWD_FACTOR)


def test_autocast_bf16():
    ref, ours = _pair(torch.float32, embed_dim=16, num_heads=2, add_bias_kv=True)
    peer = copy.deepcopy(ref).float()
    x = torch.randn(9, 2, 16, dtype=torch.float64)
    want, _ = ref(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peer_out, _ = peer(x.float(), x.float(), x.float())
        out, weights = ours(x.float(), x.float(), x.float())
    assert out.dtype == peer_out.dtype
    assert_close_relative("out", out, want, peer_out, FWD_FACTOR)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    _, ours = _pair(torch.float32, embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 5:] = True

    def f(x):
        out, weights = ours(x, x, x, key_padding_mask=kpm)
        return out, weights

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    eager = f(x)
    got = compiled(x)
    for name, a, b in zip(("out", "weights"), got, eager):
        assert_close(name, a, b)
    xs = x.clone().requires_grad_(True)
    compiled(xs)[0].sum().backward()
    xe = x.clone().requires_grad_(True)
    f(xe)[0].sum().backward()
    assert_close("dx", xs.grad, xe.grad)


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["causal+pad+dropout", "float+gqa", "bool"])
def test_attention_weights_op_matches_reference(backend, average, masks):
    """seqkern::attention_weights on its own: GQA, causal, both masks, dropout."""
    dtype = DTYPE[backend]
    gen = torch.Generator().manual_seed(9)
    Hkv = 1 if "gqa" in masks else 2
    q = torch.randn(2, 2, 70, 40, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(2, Hkv, 131, 40, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn_like(k)
    kpm = attn_mask = seed = None
    dropout_p = 0.3 if "dropout" in masks else 0.0
    if "pad" in masks:
        kpm = torch.zeros(2, 131, dtype=torch.bool)
        kpm[1, 60:] = True
        kpm[0, :] = True  # batch 0: fully padded rows
    if "float" in masks:
        attn_mask = torch.randn(1, 1, 70, 131, generator=gen, dtype=torch.float64).to(dtype)
    if "bool" in masks:
        attn_mask = torch.rand(70, 131, generator=gen) > 0.2
    if dropout_p:
        seed = seqkern.ops.attention.draw_dropout_seed()
    kwargs = dict(key_padding_mask=kpm, seed_offset=seed)
    causal = "causal" in masks
    with seqkern.backend(backend):
        _, lse = seqkern.functional.attention_with_lse(q, k, v, attn_mask, dropout_p, causal,
                                                       None, Hkv != 2, **kwargs)
        got = seqkern.functional.attention_weights(q, k, lse, attn_mask, dropout_p, causal,
                                                   average_heads=average, **kwargs)
    with seqkern.backend("reference"):
        _, lse64 = seqkern.functional.attention_with_lse(
            q.double(), k.double(), v.double(),
            attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point()
            else attn_mask, dropout_p, causal, None, Hkv != 2, **kwargs)
        want = seqkern.functional.attention_weights(
            q.double(), k.double(), lse64,
            attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point()
            else attn_mask, dropout_p, causal, average_heads=average, **kwargs)
    assert_close("weights", got, want, dtype=dtype)
    if "pad" in masks:
        assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_attention_weights_opcheck():
    q = torch.randn(2, 2, 7, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    seed = torch.tensor([1234, 0], dtype=torch.int64)
    _, lse = seqkern.functional.attention_with_lse(q, k, v, None, 0.2, True,
                                                   key_padding_mask=kpm, seed_offset=seed)
    for average in (True, False):
        torch.library.opcheck(torch.ops.seqkern.attention_weights.default,
                              (q, k, lse, None, kpm, True, 0.25, 0.2, seed, average))


@pytest.mark.parametrize("embed_dim, num_heads", [(512, 1), (600, 2)])
def test_head_dims_over_the_kernels_limit_run_like_torch(embed_dim, num_heads):
    """Heads wider than the GPU kernels' 256 (torch takes any; seqkern raised 'head dims
    must be 1..256'): the CPU kernels take them, a GPU runs the reference backend; outputs,
    weights and gradients as torch's."""
    ref, ours = _pair(embed_dim=embed_dim, num_heads=num_heads)
    x = torch.randn(5, 2, embed_dim, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    results = []
    for module in (ours, ref):
        out, weights = module(x, x, x, key_padding_mask=pad)
        grads = torch.autograd.grad((out.sin().sum() + weights.square().sum()),
                                    [x, *module.parameters()])
        results.append((out, weights, grads))
    (out, weights, grads), (out_ref, weights_ref, grads_ref) = results
    assert_close("out", out, out_ref)
    assert_close("weights", weights, weights_ref)
    for name, g, w in zip(["x"] + [n for n, _ in ours.named_parameters()], grads, grads_ref):
        assert_close(f"d{name}", g, w)


def test_weights_of_rows_masked_by_finfo_min_sum_to_one():
    """MultiheadAttention's weights for a query row masked entirely by finfo.min (the
    additive-mask convention) sum to 1, as torch's (they summed to S: the weights are
    rebuilt from lse, which rounded to the row's max); the values are the softmax of the
    row's scores (torch's own rounds them to one value: uniform)."""
    ref, ours = _pair(torch.float32, embed_dim=8, num_heads=2, batch_first=True)
    x, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.zeros(3, 5)
    mask[1] = torch.finfo(torch.float32).min
    exact = mask.clone()
    exact[1] = 0.0
    weights = ours(x, kv, kv, attn_mask=mask)[1]
    want = ref(x.double(), kv.double(), kv.double(), attn_mask=exact.double())[1]
    assert_close("weights", weights, want)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
