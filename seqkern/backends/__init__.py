"""Declarative backend choice.

Each backend says, per op and inputs, why it cannot run them (`not_supported_reasons`,
an empty list meaning it can). The dispatcher walks a priority list per device and takes
the first backend with no reasons; `SEQKERN_BACKEND=name` or `with seqkern.backend(name):`
forces one. When nothing fits, the error lists every backend with its reasons.
"""
import contextlib
import os
import threading

from seqkern.backends import cpu, cuda, reference, triton

BACKENDS = {b.NAME: b for b in (cuda, triton, cpu, reference)}

# Per device type: the order in which backends are tried. On CUDA tensors `triton` goes
# first unless MEASURED_ORDER says otherwise for the op: a CUDA kernel goes first only once
# a GPU run has verified and timed it against the Triton one.
PRIORITY = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# Which of the two compiled GPU backends goes first is a measured fact. Each entry:
# (device, op) -> [(applies(inputs) -> bool, order, evidence)]; the first that applies
# wins; evidence names the bench/RESULTS.md run that showed it (bench/gpu_check.sh runs
# both side by side). An op without a matching entry keeps PRIORITY's order.
MEASURED_ORDER = {
    # H200, 2026-11-26 (bench/RESULTS.md, "GPU"): the persistent CUDA recurrence ran every
    # layer case faster than the Triton one (inference 24-170x: Triton's layer kernel then
    # ran one program per 16 batch rows, so one to four SMs), and passed the GPU test suite,
    # 3000-step grid-barrier runs included. H100, same day: Triton's grid of programs a step
    # (one launch each) still 13-18x slower in the 4 cases timed (its tile sizes changed
    # after, untimed).
    ("cuda", "rnn_layer"): [(lambda inputs: True, ("cuda", "triton", "reference"),
                             "H200 2026-11-26: cuda faster in 24 of 24 layer cases; "
                             "H100 2026-11-26: 4 of 4")],
}


def priority(device, op, inputs):
    """The order in which backends are tried for op on inputs on this device type."""
    for applies, order, _evidence in MEASURED_ORDER.get((device, op), ()):
        if applies(inputs):
            return order
    return PRIORITY.get(device, ("reference",))


_local = threading.local()


class BackendError(RuntimeError):
    pass


@contextlib.contextmanager
def backend(name):
    """Force a backend inside the block: `with seqkern.backend("triton"): ...`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown seqkern backend {name!r}; expected one of {sorted(BACKENDS)}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def remember_forced(ctx):
    """In an op's setup_context (the forward's thread): keep the backend forced there.

    autograd runs the backward of CUDA tensors on its own worker thread, which does not see
    this thread's `with seqkern.backend(...)`: without this, a forced forward's backward went
    to the default choice (on the first GPU run, cuda's forward with triton's backward)."""
    ctx.seqkern_forced = getattr(_local, "forced", None)


def as_in_forward(ctx):
    """Context for an op's backward: the backend forced around its forward, if any."""
    name = getattr(ctx, "seqkern_forced", None)
    return backend(name) if name is not None else contextlib.nullcontext()


def forced_backend():
    name = getattr(_local, "forced", None) or os.environ.get("SEQKERN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"SEQKERN_BACKEND={name!r} is not a seqkern backend; "
                         f"expected one of {sorted(BACKENDS)}")
    return name


def _format(op, reasons):
    lines = [f"  {name}: " + ("; ".join(r) if r else "usable (not tried)")
             for name, r in reasons.items()]
    return "\n".join(lines)


def select(op, inputs):
    """The backend module to run `op` on `inputs` (a dict of the op's arguments)."""
    device = inputs["device"].type
    forced = forced_backend()
    if forced is not None:
        reasons = BACKENDS[forced].not_supported_reasons(op, inputs)
        if not reasons:
            return BACKENDS[forced]
        every = {n: b.not_supported_reasons(op, inputs) for n, b in BACKENDS.items()}
        raise BackendError(f"seqkern: backend {forced!r} was requested for {op} but cannot "
                           f"run these inputs. Every backend:\n{_format(op, every)}")
    order = priority(device, op, inputs)
    every = {}
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(op, inputs)
        if not reasons:
            return BACKENDS[name]
        every[name] = reasons
    for name, b in BACKENDS.items():
        every.setdefault(name, b.not_supported_reasons(op, inputs) or
                         [f"not in the priority list for {device} tensors"])
    raise BackendError(f"seqkern: no backend can run {op} on these inputs. "
                       f"Every backend:\n{_format(op, every)}")


def checks_own_args(impl):
    """Whether a backend's entry points check their arguments themselves (the C++ ones:
    csrc/*_args.h; CHECKS_ARGS = True), so that the ops in seqkern/ops/ check them only for
    the others (triton, reference), with the same rules and messages."""
    return getattr(impl, "CHECKS_ARGS", False)


def usable_report(device="cpu"):
    """{backend: reasons it is unavailable here} for a generic probe, for seqkern.info."""
    return {name: b.availability(device) for name, b in BACKENDS.items()}
