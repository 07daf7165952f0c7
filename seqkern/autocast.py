"""What seqkern does under torch.autocast.

Modules (seqkern.LSTM/GRU/RNN and the cells) compute in the dtype torch.nn's module of the
same configuration returns under the input device's autocast, and return that dtype:
`module_dtype` below, from torch's own paths (and checked against torch's modules by
tests/test_autocast.py, so a torch that changes them fails a test):

- CUDA, layers: torch runs them on cuDNN, whose autocast wrapper (aten's
  `_cudnn_rnn_cast_reflatten`) casts input, states and weights to float16 whatever the
  autocast dtype; with cuDNN off (torch.backends.cudnn.enabled = False) torch's per-step
  path runs in the autocast dtype (its `linear` and fused cells are autocast ops).
- CUDA, cells: lstm_cell, gru_cell, rnn_tanh_cell and rnn_relu_cell are autocast ops: the
  autocast dtype.
- CPU, for float32 input or input in the autocast dtype: a padded LSTM without projection
  runs oneDNN's layer (an autocast op) where oneDNN takes the input's dtype: the autocast
  dtype. Everything else runs torch's per-step path, whose
  products (`linear`) autocast casts while its pointwise cell math promotes them with the
  state: RNN and RNNCell (h' = act(products)) return the autocast dtype; GRU, GRUCell,
  LSTMCell and a packed LSTM return the promotion of the autocast dtype with the given
  states' dtypes (the input's where none is given), so float32 for float32 input; an LSTM
  with a projection returns h (a product) in the autocast dtype and c_n in that promotion
  with c0 (`cell_state_dtype`). seqkern computes the layers in the autocast dtype
  (`compute_dtype`: its 16-bit layers run bf16 / fp16 products with a float32 state, as
  torch's path does) and returns torch's dtypes; the cells in the dtype they return.
- Otherwise (float64, or another 16-bit dtype than the autocast one): no cast; the dtype
  checks apply as without autocast.

seqkern.functional.scaled_dot_product_attention (and attention_with_lse) casts as torch's
does, an autocast op: query, key, value and a float mask to the autocast dtype
(`function_dtype`). MultiheadAttention needs nothing of its own: its projections are
torch's `linear`, which autocast casts.

The ops themselves (seqkern::*) are kernels: their bodies are decorated with
`kernel_dtypes_as_given`, which turns autocast off, so a backend's inner torch calls keep the
dtypes they were given.
"""
import functools

import torch

LAYERS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
CELLS = ("LSTMCell", "GRUCell", "RNNCell")


def function_dtype(input):
    """The dtype an autocast op of torch's (scaled_dot_product_attention) casts `input` to
    under the autocast state of its device: the autocast dtype for floating-point input
    other than float64, else None."""
    if not any_enabled():
        return None
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if not input.is_floating_point() or input.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def module_dtype(kind, input, states=(), packed=False, projection=False):
    """The dtype torch.nn's module `kind` (one of LAYERS or CELLS) returns for `input` and the
    given initial `states` (tensors or None) under the autocast state of the input's
    device; None where autocast changes nothing."""
    dtype = function_dtype(input)
    if dtype is None:
        return None
    if input.device.type == "cuda":
        if kind in LAYERS and torch.backends.cudnn.enabled and input.numel() > 0:
            return torch.float16
        return dtype
    if input.dtype not in (torch.float32, dtype):
        return None
    if kind in ("RNN_TANH", "RNN_RELU", "RNNCell") or (kind == "LSTM" and projection) or (
            kind == "LSTM" and not packed and _onednn_lstm(input)):
        return dtype
    return _promoted(dtype, input, states)


def _onednn_support():
    """(oneDNN in this torch, its bfloat16 kernels on this CPU, its float16 ones): fixed for
    the process, so read once (torch.compile cannot trace the queries)."""
    ops = torch.ops.mkldnn
    try:
        return (torch.backends.mkldnn.is_available(), bool(ops._is_mkldnn_bf16_supported()),
                bool(ops._is_mkldnn_fp16_supported()))
    except (AttributeError, RuntimeError):  # a torch built without oneDNN's ops
        return False, False, False


_ONEDNN, _ONEDNN_BF16, _ONEDNN_FP16 = _onednn_support()


def _onednn_lstm(input):
    """Whether torch runs a padded LSTM without projection on `input` (CPU) as oneDNN's layer
    (aten's use_mkldnn): float32, bfloat16 where oneDNN has it, float16 without grad where
    oneDNN has it."""
    if not (_ONEDNN and torch.backends.mkldnn.enabled) or input.numel() == 0:
        return False
    if input.dtype == torch.bfloat16:
        return _ONEDNN_BF16
    if input.dtype == torch.float16:
        return _ONEDNN_FP16 and not torch.is_grad_enabled()
    return input.dtype == torch.float32


def compute_dtype(kind, input, result):
    """The dtype seqkern computes module `kind` in where it returns `result` (module_dtype)
    under autocast: for a layer on the CPU the autocast dtype, in which torch's products
    run even where its result is float32 (GRU, a packed LSTM): seqkern's 16-bit layers keep
    the state in float32 between steps, as torch's pointwise math does, and only the
    outputs are cast. Otherwise the result's: a cell's state is its output, and rounding it
    to 16 bits each step would lose what torch's float32 state keeps (2x torch's error in
    one LSTMCell step). None where autocast changes nothing."""
    if result is None or input.device.type != "cpu" or kind not in LAYERS:
        return result
    return torch.get_autocast_dtype("cpu")


def cell_state_dtype(kind, input, c0, projection, result):
    """The dtype of an LSTM's c_n under autocast where module_dtype returned `result`: on
    the CPU with a projection the promotion of the autocast dtype with c0's (or the
    input's), else the result's."""
    if result is None or input.device.type != "cpu" or kind != "LSTM" or not projection:
        return result
    return _promoted(torch.get_autocast_dtype("cpu"), input, (c0,))


def _promoted(dtype, input, states):
    given = [s.dtype for s in states if s is not None] or [input.dtype]
    for d in given:
        dtype = torch.promote_types(dtype, d)
    return dtype


def cast(tensors, dtype):
    """Each tensor (or None) in dtype; the casts are differentiable, so gradients reach the
    originals in their own dtype."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def kernel_dtypes_as_given(fn):
    """Decorator for an op's body and for the backward functions that call torch ops: runs
    fn with autocast off (torch's own guard, 0.4 us; torch.autocast(enabled=False) costs
    2.3), as ATen's autocast wrappers do before they redispatch. A custom op's body runs
    with the caller's autocast state, so a backend's inner torch calls (the reference's
    products, a Triton layer's input projection) were autocast inside float32 ops."""
    @functools.wraps(fn)  # infer_schema reads the signature through __wrapped__
    def as_given(*args, **kwargs):
        if not any_enabled():
            return fn(*args, **kwargs)
        with torch._C._DisableAutocast():
            return fn(*args, **kwargs)
    return as_given


def any_enabled():
    """Whether autocast is on for any device: the common answer, no, in 0.08 us (the
    per-device query and a tensor's device take 0.1-0.2 us each, on every op call; torch's
    own RNN modules ask the same)."""
    return torch._C._is_any_autocast_enabled()
