"""Ways a user changes a module's weights without changing the module's class
(tests of seqkern/nn/weights.py, which reads _parameters only where getattr would)."""
import torch
from torch.nn.utils import parametrize


class Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def change_weights(module, how, parametrized, replaced):
    """how "parametrized": weight `parametrized` doubled through torch.nn.utils.parametrize
    (a property of a subclass; the name leaves _parameters); "plain tensor": weight
    `replaced` replaced by three times it as a plain tensor (an instance attribute);
    anything else: no change."""
    if how == "parametrized":
        parametrize.register_parametrization(module, parametrized, Doubled())
    elif how == "plain tensor":
        w = getattr(module, replaced).detach() * 3
        delattr(module, replaced)
        setattr(module, replaced, w)
