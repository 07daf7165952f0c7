"""How seqkern's public ops are registered: `@seqkern_op("name")` on the op's body.

The same registration as torch.library.custom_op (the schema inferred from the body's type
hints by torch.library.infer_schema, the body as the op's CompositeExplicitAutograd kernel,
`.register_fake` and `.register_autograd`), without custom_op's per-call wrapper: its
backend_impl re-checked every call's outputs for aliasing in Python: the op alone took 58.9 us
a decoding-step call with it and 53.1 us without (RNN H256 T1 B1 on the CPU, the C++ kernel
itself ~20 us; bench/RESULTS.md, "a decoding step's fixed cost"). The
aliasing rule still holds (every body returns tensors of its own: seqkern/ops/outputs.py) and
torch.library.opcheck checks it in the tests. As custom_op does, the body runs with dynamo
disabled: it is a kernel, which torch.compile treats as one op through its fake.
"""
import torch

_LIBRARY = torch.library.Library("seqkern", "FRAGMENT")


class SeqkernOp:
    """seqkern::<name>, callable like the function it was made from."""

    def __init__(self, name, body):
        schema = torch.library.infer_schema(body, mutates_args=())
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, torch._disable_dynamo(body), "CompositeExplicitAutograd")
        self.qualname = f"seqkern::{name}"
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
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context,
                                        lib=_LIBRARY)


def seqkern_op(name):
    """Decorator: the body becomes the op seqkern::<name> (a SeqkernOp)."""
    return lambda body: SeqkernOp(name, body)
