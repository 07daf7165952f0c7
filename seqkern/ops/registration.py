"""How seqkern's public ops are registered: `@seqkern_op("name")` on the op's body.

The same registration as torch.library.custom_op (the schema inferred from the body's type
hints by torch.library.infer_schema, the body as the op's CompositeExplicitAutograd kernel,
`.register_fake` and `.register_autograd`, see there for its own saving), without
custom_op's per-call wrapper, whose backend_impl re-checked every call's outputs for aliasing
in Python: the op alone took 58.9 us a decoding-step call with it and 53.1 us without (RNN
H256 T1 B1 on the CPU, the C++ kernel itself ~20 us; bench/RESULTS.md, "a decoding step's
fixed cost"). The aliasing rule still holds (every body returns tensors of its own:
seqkern/ops/outputs.py) and torch.library.opcheck checks it in the tests. As custom_op does,
the body runs with dynamo disabled: it is a kernel, which torch.compile treats as one op
through its fake.
"""
import torch
import torch.autograd.forward_ad as forward_ad

_LIBRARY = torch.library.Library("seqkern", "FRAGMENT")


def refuse_transforms(qualname, args, records_graph):
    """Raises where a torch.func transform or forward-mode AD reaches the op, which supports
    neither (seqkern's modules and functions run their reference under them in eager mode,
    but inside a torch.compile'd function they cannot tell a user's transform from dynamo's
    own levels and call the ops: seqkern/transforms.py):
    - forward-mode AD (torch.func.jvp, jacfwd, forward_ad.dual_level): the op has no forward
      rule, and torch gave its outputs zero tangents, silently;
    - torch.func.grad, vjp, jacrev, where the call records a graph (records_graph): its
      autograd.Function has no functorch support, and torch's own error named neither the op
      nor the way out.
    Cost where none is active: ~0.3 us."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    kind = interpreter.key() if interpreter is not None else None
    if kind == torch._C._functorch.TransformType.Jvp or (
            forward_ad._current_level >= 0 and
            any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None
                for a in args)):
        problem = ("has no forward-mode AD rule: torch.func.jvp, jacfwd or "
                   "torch.autograd.forward_ad through it would give zero tangents")
    elif records_graph and kind == torch._C._functorch.TransformType.Grad:
        problem = "cannot be differentiated by torch.func.grad, vjp or jacrev here"
    else:
        return
    raise RuntimeError(
        f"{qualname} {problem}. seqkern's modules and functions run their reference under "
        "these transforms in eager mode, but not inside a torch.compile'd function: apply the "
        "transform outside torch.compile, or use torch.nn's module there.")


# The keys below autograd that an Autograd kernel is given for plain CPU or CUDA tensors
# (all on one device type, no tensor subclass, no dispatch mode, no functionalization):
# the backend's alone, ADInplaceOrView (a fallthrough) with it or not. There the
# dispatcher's next stop is the CompositeExplicitAutograd kernel, which the Autograd kernel
# then calls itself.
_DENSE_KEYSETS = frozenset(
    keys.raw_repr()
    for backend in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)
    for keys in (torch._C.DispatchKeySet(backend),
                 torch._C.DispatchKeySet(backend).add(torch._C.DispatchKey.ADInplaceOrView)))


class SeqkernOp:
    """seqkern::<name>, callable like the function it was made from."""

    def __init__(self, name, body):
        schema = torch.library.infer_schema(body, mutates_args=())
        _LIBRARY.define(name + schema)
        self.kernel = torch._disable_dynamo(body)
        _LIBRARY.impl(name, self.kernel, "CompositeExplicitAutograd")
        self.name, self.qualname = name, f"seqkern::{name}"
        self.default = getattr(torch.ops.seqkern, name).default  # the OpOverload
        self.__doc__, self.__wrapped__ = body.__doc__, body

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fake):
        """fake(*args) -> outputs of the right shapes, dtypes and strides, for FakeTensor
        tracing (torch.compile) and meta tensors."""
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward, setup_context):
        """backward(ctx, *grads) -> a gradient (or None) per argument; setup_context(ctx,
        inputs, output) saves what it needs. The op's Autograd kernel, as
        torch.library.register_autograd makes it, but for one step: torch's forward passed
        setup_context the arguments completed with their defaults by
        torch._library.utils.fill_defaults, which rebuilds the schema's argument list twice an
        argument (44 us a call for the layer op's 12 arguments, in every call that records a
        graph: a decoding or cell step without torch.no_grad). Here the defaults are read
        once. Below autograd, plain CPU or CUDA tensors go to the op's kernel directly
        (_DENSE_KEYSETS); everything else through the dispatcher's redispatch."""
        op, kernel = self.default, self.kernel
        defaults = tuple(a.default_value for a in op._schema.arguments)

        def below_autograd(keyset, args):  # the op's CompositeExplicitAutograd kernel
            below = keyset & torch._C._after_autograd_keyset
            with torch._C._AutoDispatchBelowAutograd():
                if below.raw_repr() in _DENSE_KEYSETS:
                    # Where the dispatcher would go: the kernel itself, without the round
                    # trip of every argument through it (bench/RESULTS.md, "the Autograd
                    # kernel calls the op's kernel itself").
                    return kernel(*args)
                return op.redispatch(below, *args)

        def forward(ctx, *args):
            keyset, args = args[-1], args[:-1]  # the dispatch keys: an argument of apply
            output = below_autograd(keyset, args)
            # The dispatcher drops trailing arguments equal to their defaults.
            setup_context(ctx, args + defaults[len(args):], output)
            return output

        def backward_of_apply(ctx, *grads):
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:-1]  # the op's arguments only, not the keys
            try:
                grads_in = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            return (*grads_in, None) if isinstance(grads_in, tuple) else (grads_in, None)

        function = type(f"SeqkernBackward_{self.name}", (torch.autograd.Function,),
                        {"forward": staticmethod(forward),
                         "backward": staticmethod(backward_of_apply)})

        qualname = self.qualname

        def autograd_kernel(keyset, *args):
            records_graph = torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
            refuse_transforms(qualname, args, records_graph)
            if records_graph:
                return function.apply(*args, keyset)
            return below_autograd(keyset, args)

        _LIBRARY.impl(self.name, autograd_kernel, "Autograd", with_keyset=True)


def seqkern_op(name):
    """Decorator: the body becomes the op seqkern::<name> (a SeqkernOp)."""
    return lambda body: SeqkernOp(name, body)
