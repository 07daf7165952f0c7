"""The public torch.library ops (schemas, fakes, autograd), one file per op family."""
from seqkern.ops import attention  # noqa: F401
