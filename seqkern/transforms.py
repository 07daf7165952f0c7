"""Under torch.func transforms (grad, jvp, vmap, jacrev, jacfwd, ...) and forward-mode AD
the modules and functions run seqkern's reference (plain torch ops, which every transform
supports) instead of the ops.

torch's custom ops (Python ops with torch.library.register_autograd) support neither there:
torch.func.grad raised "In order to use an autograd.Function with functorch transforms ...
it must override the setup_context staticmethod", and torch.func.jvp silently gave zero
tangents through them (a wrong answer). The reference is slower but right; outside
transforms nothing changes (one check, 0.1 us).

Not covered: a torch.func transform inside a torch.compile'd function. While dynamo
traces, this check cannot tell a user's transform from dynamo's own functorch levels, so
the compiled graph calls the ops, which raise there (seqkern/ops/registration.py,
refuse_transforms): grad, vjp and jacrev (torch's own error named neither the op nor the way
out), jvp and jacfwd (they gave zero tangents through the ops, silently). Eager transforms
are right.
"""
import torch
import torch.autograd.forward_ad as forward_ad


def active():
    """Whether a torch.func transform or a forward-mode AD level is active here (never
    while torch.compile traces: it reports its own functorch levels then, and the compiled
    graph calls the ops)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None or
            getattr(forward_ad, "_current_level", -1) >= 0)
