"""The C++ CPU layer kernels in particular: the float32 activations, the team time loop and
the row split, every instruction set, bf16 products, LSTM projections, cached outputs."""
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern
from tests.attention_cases import DEVICE
from tests.capability_runner import assert_passes_under_capability
from tests.rnn_layer_cases import HAS_C, check_against_torch, flatten_outputs, module_pair
from tests.tolerances import BWD_FACTOR, FWD_FACTOR, assert_close, assert_close_relative


def _native_cpu_bf16_products():
    """What csrc/cpu/matmul.cpp's bf16_products_available() looks for: AVX512-BF16, no AMX
    (and oneDNN not capped below AVX-512, which its probe then finds)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags and "amx_bf16" not in flags


# The path each case is for, as the C++ layer logs it (csrc/cpu/rnn_layer_plan.h, LayerPath;
# every forward and backward call of the case must show these fields): the team loop or the
# row split (its blocks), W_ih and W_hh packed or multiplied as given.
PACKED, IN_PLACE = {"w_ih": "packed", "w_hh": "packed"}, {"w_ih": "in_place", "w_hh": "in_place"}
TEAM, ROW_SPLIT = {"team": "1", "row_blocks": "1"}, {"team": "0", "row_blocks": "2"}
ONE_BLOCK = {"team": "0", "row_blocks": "1"}  # each step's product parallel inside
CASE_PATHS = {
    "padded": TEAM | PACKED, "one-row": TEAM | PACKED, "packed-bidirectional": TEAM | PACKED,
    "expanded-gradient": TEAM | PACKED, "row-split": ROW_SPLIT | PACKED,
    "one-step": ONE_BLOCK | IN_PLACE, "two-steps-packed": ROW_SPLIT | IN_PLACE,
    "row-split-one-step": ROW_SPLIT | IN_PLACE, "thirty-two-rows": ONE_BLOCK | IN_PLACE,
    "team-one-step": TEAM | IN_PLACE, "team-two-steps-packed": TEAM | IN_PLACE}


def layer_paths():
    """The paths of this thread's CPU layer calls since the last call (then forgotten):
    [{"pass": "fwd" or "bwd", "team": "0" or "1", "row_blocks": ..., "bf16": ..., "w_ih":
    "packed" or "in_place", "w_hh": ...}]."""
    paths = []
    for line in torch.ops.seqkern_C.rnn_layer_cpu_paths():
        kind, *fields = line.split()
        paths.append({"pass": kind, **dict(f.split("=") for f in fields)})
    return paths


def assert_paths(label, paths, want, want_bwd=None):
    """Every forward call in paths ran want's fields, every backward call want_bwd's (default:
    want's), and there were both."""
    assert {p["pass"] for p in paths} == {"fwd", "bwd"}, (label, paths)
    for p in paths:
        w = want if p["pass"] == "fwd" or want_bwd is None else want_bwd
        assert {k: p[k] for k in w} == w, f"{label}: ran {p}, the case is for {w}"


@pytest.mark.skipif(not HAS_C or DEVICE != "cpu", reason="the CPU kernels")
@pytest.mark.parametrize("form", ["team", "row split", "packed", "as given"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_cpu_bf16_products_relative_rule(cls, form, monkeypatch):
    """bf16 layers on a CPU with native bf16 products run the input projection and the step
    products on bf16 operands (the state rounded each step): outputs and gradients within
    the relative rule of torch's own bf16 layers, both directions. Where the CPU has them the
    result must differ from the fp32-product path (SEQKERN_CPU_BF16_PRODUCTS=0): the bf16 path
    ran. B = 3 at H = 128 takes the team loop, B = 40 the row split, with the weights packed
    (over 32 rows); "as given": two steps, the forward's weights multiplied as they are."""
    B, H = (40, 64) if form == "row split" else (3, 128)
    T = 2 if form == "as given" else 12
    ours, theirs = module_pair(cls, input_size=32, hidden_size=H, bidirectional=True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(T, B, 32, dtype=torch.float64, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[1] = T

    def run(module, x, dtype, backward_fp32_products=False):
        module = module.to(dtype)
        leaf = x.detach().to(dtype).requires_grad_(True)
        inp = pack_padded_sequence(leaf, lengths, enforce_sorted=False) if form == "packed" \
            else leaf
        outs = flatten_outputs(module(inp))
        if backward_fp32_products:
            monkeypatch.setenv("SEQKERN_CPU_BF16_PRODUCTS", "0")
        grads = torch.autograd.grad(sum(o.double().square().sum() for o in outs),
                                    [leaf, *module.parameters()])
        monkeypatch.delenv("SEQKERN_CPU_BF16_PRODUCTS", raising=False)
        return [o.detach() for o in outs] + list(grads)

    want = run(theirs, x, torch.float64)
    peer = run(theirs, x, torch.bfloat16)
    layer_paths()
    with seqkern.backend("cpu"):
        got = run(ours, x, torch.bfloat16)
        loop = ROW_SPLIT if form == "row split" else TEAM
        products = {"bf16": str(int(_native_cpu_bf16_products()))}
        # "as given": the forward's weights as they are; bf16 backward products pack them
        assert_paths(f"{cls} {form}", layer_paths(),
                     loop | products | (IN_PLACE if form == "as given" else PACKED),
                     loop | products | (PACKED if products["bf16"] == "1" or
                                        form != "as given" else IN_PLACE))
        fp32_backward = run(ours, x, torch.bfloat16, backward_fp32_products=True)
        monkeypatch.setenv("SEQKERN_CPU_BF16_PRODUCTS", "0")
        fp32_products = run(ours, x, torch.bfloat16)
    outputs = len(want) - 1 - len(list(ours.parameters()))
    for i, (g, w, p) in enumerate(zip(got, want, peer)):
        factor = FWD_FACTOR if i < outputs else BWD_FACTOR
        assert_close_relative(f"{cls} {form} result[{i}]", g, w, p, factor)
    if _native_cpu_bf16_products():
        assert not torch.equal(got[0], fp32_products[0]), "the bf16 products did not run"
        # The same forward, the backward's products in bf16 or fp32: dx and every weight
        # gradient differ (the bias sums stay fp32).
        for i, name in [(outputs, "input"), (outputs + 1, "weight_ih"),
                        (outputs + 2, "weight_hh")]:
            assert not torch.equal(got[i], fp32_backward[i]), \
                f"{name}: the backward's bf16 products did not run"


@pytest.mark.skipif(not HAS_C or DEVICE != "cpu", reason="the CPU kernels")
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_cpu_row_split_into_claimed_blocks(cls, form):
    """B = 70 on two threads: the row split makes four blocks (at least 16 rows each, split
    by live (step, row) pairs when packed) that the threads claim as they finish; every row
    against torch in float64, forward and gradients, both directions."""
    if torch.get_num_threads() < 2:
        pytest.skip("the row split needs two threads")
    B = 70
    ours, theirs = module_pair(cls, input_size=5, hidden_size=12, bidirectional=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, B, 5, dtype=torch.float64, generator=gen)
    lengths = torch.randint(1, 7, (B,), generator=gen)
    lengths[3] = 6
    h0 = torch.randn(2, B, 12, dtype=torch.float64, generator=gen)
    hx = (h0, torch.randn_like(h0)) if cls == "LSTM" else h0

    def call(module, leaves):
        h = tuple(leaves[1:]) if cls == "LSTM" else leaves[1]
        inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) \
            if form == "packed_unsorted" else leaves[0]
        return flatten_outputs(module(inp, h))

    leaves = [t.requires_grad_(True) for t in (x, *(hx if isinstance(hx, tuple) else (hx,)))]
    layer_paths()
    check_against_torch(f"{cls} {form}", ours, theirs, call, leaves, "cpu", torch.float64)
    assert_paths(f"{cls} {form}", layer_paths(), {"team": "0", "row_blocks": "4"})


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
def test_lstm_projection_kernel_matches_torch(form):
    """proj_size runs inside the C++ recurrence (h = h_full W_hr^T every step)."""
    ours, theirs = module_pair("LSTM", input_size=7, hidden_size=33, proj_size=13, num_layers=2,
                         bidirectional=True)
    x = torch.randn(11, 6, 7, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(4, 6, 13, dtype=torch.float64, device=DEVICE)
    c0 = torch.randn(4, 6, 33, dtype=torch.float64, device=DEVICE)
    lengths = torch.tensor([11, 3, 7, 1, 11, 5], device="cpu")

    def run(module, x, h0, c0):
        inp = x if form == "padded" else pack_padded_sequence(x, lengths, enforce_sorted=False)
        return flatten_outputs(module(inp, (h0, c0)))

    leaves = [[t.clone().requires_grad_(True) for t in (x, h0, c0)] for _ in range(2)]
    with seqkern.backend("cpu"):
        got = run(ours, *leaves[0])
    want = run(theirs, *leaves[1])
    grads = [torch.randn_like(w) for w in want]
    with seqkern.backend("cpu"):
        g_ours = torch.autograd.grad(got, leaves[0] + list(ours.parameters()), grads)
    g_theirs = torch.autograd.grad(want, leaves[1] + list(theirs.parameters()), grads)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"output[{i}]", g, w)
    names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, g_ours, g_theirs):
        assert_close(f"d{name}", g, w)


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_lstm_projection_gradcheck():
    sizes = torch.tensor([3, 2, 1])
    H, P = 5, 3
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (2, P)]
    b = [torch.randn(4 * H, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w_hr = torch.randn(P, H, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, w_hr, *wb):
        out, h, c, _ = seqkern.ops.rnn_layer.rnn_layer_fwd("LSTM", x, sizes, h0, c0, *wb, True,
                                                           True, w_hr)
        return out.sum() + h.square().sum() + c.sum()

    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(f, (x, h0, c0, w_hr, *w, *b))


def _relative_ulps(y, ref):
    """Largest error of y against the float64 ref in float32 ulps (relative, normal range)."""
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    return ((y - ref).abs()[normal] / ref.abs()[normal]).max().item() / 2.0**-24


def check_cpu_float32_activations():
    """The C++ cells' float32 tanh and sigmoid (an inlined exp, tanh through exp(-2|x|) and a
    series near 0: csrc/cpu/rnn_pointwise_impl.h) against float64 torch, through one-step
    layers whose 32 units all see x (the vector path, H >= 16): at most 4 ulps relative,
    including 1e-30 (where (1 - t) / (1 + t) alone loses every digit) and the ends of exp's
    range; +-1 / 0 and 1 at +-inf and beyond; NaN at NaN."""
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.logspace(-30, 2, 4001),
                   -torch.logspace(-30, 2, 4001),
                   torch.tensor([0.0, -0.0, 0.25, -0.25, 0.2499999, 87.5, -87.5, 88.5, -88.5,
                                 89.0, -89.0, 104.0, -104.0, 1e30, -1e30, float("nan")])])
    rnn = seqkern.RNN(1, 32, bias=False)
    lstm = seqkern.LSTM(1, 32)  # c_n = sigmoid(x) * tanh(20) + sigmoid(-1000) * 0
    with torch.no_grad(), seqkern.backend("cpu"):
        rnn.weight_ih_l0.fill_(1.0)
        rnn.weight_hh_l0.fill_(0.0)
        tanh = rnn(x.view(1, -1, 1))[0][0].double()  # [rows, 32]
        for p in lstm.parameters():
            p.zero_()
        lstm.weight_ih_l0[:32] = 1.0
        lstm.bias_ih_l0[32:64] = -1000.0
        lstm.bias_ih_l0[64:96] = 20.0
        sigmoid = lstm(x.view(1, -1, 1))[1][1][0].double()
    for name, y, fn in (("tanh", tanh, torch.tanh), ("sigmoid", sigmoid, torch.sigmoid)):
        ref = fn(x.double())[:, None].expand_as(y)
        assert torch.isnan(y[-1]).all(), name
        ulps = _relative_ulps(y[:-1], ref[:-1])
        assert ulps <= 4, f"{name}: {ulps:.2f} ulps"
        tiny = ref[:-1].abs() < torch.finfo(torch.float32).tiny  # subnormal answers
        assert (y[:-1] - ref[:-1]).abs()[tiny].max().item() <= 1e-38, name
    assert (tanh[-3] == 1).all() and (tanh[-2] == -1).all()
    assert (sigmoid[-3] == 1).all() and (sigmoid[-2] == 0).all()


@pytest.mark.skipif(not HAS_C, reason="no _C")
def test_cpu_float32_activations_within_four_ulps():
    check_cpu_float32_activations()


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_float32_activations_for_every_capability(capability):
    code = """
import torch, seqkern
from tests.test_rnn_layers_cpu import check_cpu_float32_activations
check_cpu_float32_activations()
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


# (name, hidden size, batch, packed, bidirectional, output gradient, steps): float32, whole
# panels of 64 units and under 16 rows a thread, so that on the two threads these tests run
# with the C++ layer splits the hidden units over a team (csrc/cpu/rnn_layer_team.h: it needs
# a panel per thread); H = 192 gives the threads 64 and 128 units. Over 32 rows in all, so
# that W_hh is packed (rnn_layer.cpp's w_hh_in_place).
TEAM_CASES = {case[0]: case for case in [
    ("padded", 128, 5, False, False, "weighted", 9),
    ("one-row", 128, 1, False, False, "weighted", 40),
    ("packed-bidirectional", 192, 7, True, True, "weighted", 9),
    ("expanded-gradient", 128, 3, False, True, "sum", 12),
    ("row-split", 128, 33, True, False, "weighted", 9)]}  # 33 rows: the other loop, same checks
TEAM_THREADS = 2

# Decoding-sized calls, whose weights the forward multiplies in place (rows_dot, no packing):
# odd H and input size 24 leave tails in K (the vector width) and in N (4 W rows a block);
# B = 9 on two threads takes the row split, each thread's rows against the whole W.
IN_PLACE_CASES = {case[0]: case for case in [
    ("one-step", 63, 5, False, True, "weighted", 1),
    ("two-steps-packed", 63, 11, True, True, "weighted", 2),
    ("row-split-one-step", 130, 9, False, False, "sum", 1),
    ("thirty-two-rows", 70, 4, False, False, "weighted", 8),
    # whole 64-unit panels and a small batch: the team loop, each thread its W rows
    ("team-one-step", 128, 3, False, True, "weighted", 1),
    ("team-two-steps-packed", 192, 7, True, True, "weighted", 2)]}


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("case", TEAM_CASES)
@pytest.mark.parametrize("cls,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}),
                                    ("RNN", {"nonlinearity": "relu"})],
                         ids=["LSTM", "GRU", "RNN", "RNN_RELU"])
def test_cpu_float32_team_time_loop_matches_float64(case, cls, kw):
    """float32 forward and every gradient (input, h0/c0, weights) against torch's module in
    float64, initial states given, the case's steps (packed: unsorted lengths 1 .. T, so rows
    end and, in the reverse direction, start at different steps). Run on TEAM_THREADS threads
    whatever the machine has, so that the team loop is the one tested."""
    _check_float32_layer_against_float64(TEAM_CASES[case], cls, kw)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("case", IN_PLACE_CASES)
@pytest.mark.parametrize("cls,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {})],
                         ids=["LSTM", "GRU", "RNN"])
def test_cpu_float32_weights_in_place_match_float64(case, cls, kw):
    """As the team test, for calls of at most 32 rows or two steps: the products read W_ih
    and W_hh in place."""
    _check_float32_layer_against_float64(IN_PLACE_CASES[case], cls, kw)


def _check_float32_layer_against_float64(case, cls, kw, paths=None):
    """On TEAM_THREADS threads. paths(rows) -> (forward's fields, backward's or None) is what
    the calls must log; without it, the case's CASE_PATHS with the smallest calls' one-thread
    rule off (SEQKERN_CPU_ONE_THREAD_CALLS=0: the cases are for the team and the row split)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEAM_THREADS)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if paths is None:
                mp.setenv("SEQKERN_CPU_ONE_THREAD_CALLS", "0")
                paths = lambda rows: (CASE_PATHS[case[0]], None)  # noqa: E731
            _check_float32_layer_on_threads(case, cls, kw, paths)
    finally:
        torch.set_num_threads(threads)


def one_thread_rule(mode_gates, H, I, rows):
    """csrc/cpu/rnn_layer_plan.cpp's forward_on_one_thread for fp32 weights [G*H, I + H] and
    a call's rows (one direction): at most 512 KiB of weights and 0.6 MFLOP."""
    weights = mode_gates * H * (I + H)
    return 4 * weights <= 512 * 1024 and 2 * rows * weights <= 600_000


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("case", IN_PLACE_CASES)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_cpu_smallest_calls_run_on_one_thread(case, cls):
    """The in-place cases as they run by default on two threads: the smallest forwards on one
    (one row block, no team), the others on their case's path (the backward is not under the
    rule); all against float64."""
    want = CASE_PATHS[case]
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[cls]

    def paths(rows):
        if one_thread_rule(gates, IN_PLACE_CASES[case][1], 24, rows):
            return ONE_BLOCK | IN_PLACE, want
        return want, None

    _check_float32_layer_against_float64(IN_PLACE_CASES[case], cls, {}, paths=paths)


def test_one_thread_rule_cases_include_both_kinds():
    """Among the unpacked in-place cases some forwards fall under the rule and some not, so
    that the test above checks both sides of it."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}
    kinds = {one_thread_rule(gates[cls], H, 24, T * B)
             for cls in gates for _, H, B, packed, _, _, T in IN_PLACE_CASES.values()
             if not packed}
    assert kinds == {True, False}


def _check_float32_layer_on_threads(case, cls, kw, paths):
    _, H, B, packed, bidirectional, grad, T = case
    torch.manual_seed(B * H)
    ours = getattr(seqkern, cls)(24, H, bidirectional=bidirectional, device="cpu", **kw)
    theirs = getattr(torch.nn, cls)(24, H, bidirectional=bidirectional, device="cpu",
                                    dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    dirs = 2 if bidirectional else 1
    x = torch.randn(T, B, 24)
    states = [torch.randn(dirs, B, H) * 0.5 for _ in range(2 if cls == "LSTM" else 1)]
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    if packed:
        lengths[0] = T

    def run(module, dtype):
        xs = x.to(dtype).requires_grad_(True)
        hs = [s.to(dtype).requires_grad_(True) for s in states]
        inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs
        out, hn = module(inp, tuple(hs) if cls == "LSTM" else hs[0])
        out = out.data if packed else out
        finals = list(hn) if cls == "LSTM" else [hn]
        gen = torch.Generator().manual_seed(1)
        if grad == "sum":
            loss = out.sum()
        else:
            loss = (out * torch.randn(out.shape, generator=gen).to(dtype)).sum()
        loss = loss + sum((f * torch.randn(f.shape, generator=gen).to(dtype)).sum()
                          for f in finals)
        grads = torch.autograd.grad(loss, [xs, *hs, *module.parameters()])
        return [out, *finals, *grads]

    layer_paths()
    with seqkern.backend("cpu"):
        got = run(ours, torch.float32)
    want, want_bwd = paths(int(lengths.sum()) if packed else T * B)
    assert_paths(f"{cls} {case[0]}", layer_paths(), want, want_bwd)
    want = run(theirs, torch.float64)
    names = ["out", "h_n", "c_n"][:1 + len(states)] + ["dx", "dh0", "dc0"][:1 + len(states)]
    names += [f"d{n}" for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_close(f"{cls} {name}", a, b)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_float32_layers_for_every_capability(capability):
    """The float32 layer (team and row-split loops, weight panels and transposes, weights
    multiplied in place, fp16 / bf16 ones too, activations) under the kernels compiled for
    each instruction set."""
    code = """
import torch, seqkern
from tests.test_rnn_layers_cpu import test_cpu_float32_team_time_loop_matches_float64 as check
from tests.test_rnn_layers_cpu import test_cpu_float32_weights_in_place_match_float64 as check2
for case in ("packed-bidirectional", "row-split"):
    for cls in ("LSTM", "GRU", "RNN"):
        check(case, cls, {})
for case in ("one-step", "row-split-one-step", "team-one-step"):
    for cls in ("LSTM", "GRU"):
        check2(case, cls, {})
from _pytest.monkeypatch import MonkeyPatch
from tests.test_rnn_layers import test_low_precision_relative_rule as check3
for dtype in (torch.float16, torch.bfloat16):  # weights read in their own dtype
    with MonkeyPatch.context() as mp:
        check3("GRU", dtype, 2, False, mp)
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_bf16_layers_for_every_capability(capability):
    """The bf16 products' state and gate-gradient roundings and dG's rounded transpose
    (round_bf16_kernel.h) under the kernels compiled for each instruction set."""
    code = """
import torch, seqkern
from _pytest.monkeypatch import MonkeyPatch
from tests.test_rnn_layers_cpu import test_cpu_bf16_products_relative_rule as check
for form in ("team", "row split", "packed", "as given"):
    for cls in ("LSTM", "GRU"):
        with MonkeyPatch.context() as mp:
            check(cls, form, mp)
print(torch.ops.seqkern_C.cpu_capability())
"""
    assert_passes_under_capability(code, capability)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("which", ["output", "input gradient"])
def test_cpu_layer_outputs_resize_like_torchs(which):
    """The C++ layer's output and input gradient live in seqkern's cached blocks
    (csrc/cpu/buffer_cache.cpp, over 1 MB each here); like torch's they can still grow in
    place."""
    lstm = seqkern.LSTM(512, 512)
    x = torch.randn(20, 32, 512, requires_grad=True)
    with seqkern.backend("cpu"):
        out, _ = lstm(x)
        out.sum().backward()
    t = out.detach() if which == "output" else x.grad
    kept = t.clone()
    t.resize_(2 * t.shape[0], *t.shape[1:])
    assert torch.equal(t[: kept.shape[0]], kept)


@pytest.mark.skipif(not HAS_C, reason="no _C")
@pytest.mark.parametrize("steps", [1, 12])  # weights as given / packed
def test_cpu_op_bf16_input_with_fp32_weights(steps):
    """The op called directly with bf16 input and fp32 weights (the modules require one
    dtype): the weights are rounded to bf16 as the products read them, and fp32 ones are not
    taken as given by bf16 products (a review found keep_right refusing them at one step).
    Against the reference on the weights the products read (rounded where the CPU has bf16
    products; weights at torch's init scale): within one bf16 ulp of 1 (bf16 products round
    the state to bf16 each step, the reference does not)."""
    from seqkern.ops.rnn_layer import rnn_layer_fwd
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(steps, 2, 8, generator=gen).bfloat16()
    h0 = torch.zeros(2, 16, dtype=torch.bfloat16)
    w_ih, w_hh = (torch.randn(48, k, generator=gen) / 4 for k in (8, 16))
    with seqkern.backend("cpu"):
        got = rnn_layer_fwd("GRU", x, None, h0, None, w_ih, w_hh, None, None, False, False,
                            None)[0].float()
    with seqkern.backend("reference"):
        read = (lambda w: w.bfloat16()) if _native_cpu_bf16_products() else (lambda w: w)
        want = rnn_layer_fwd("GRU", x, None, h0, None, read(w_ih), read(w_hh), None, None,
                             False, False, None)[0].float()
    assert (got - want).abs().max() <= 2.0 ** -7
