"""Reading a module's weights by name, as getattr does, faster."""


def registered(module, names):
    """[getattr(module, name) for name in names], without the failed attribute lookup that
    precedes Module.__getattr__ (~1 us a weight: a decoding step's layer or cell reads four).
    Where a name is in _parameters and not in the instance's dict, getattr returns
    _parameters' entry (no class attribute can shadow a registered parameter: torch refuses
    to register one under such a name, and torch.nn.utils.parametrize takes the name out of
    _parameters); torch.func.functional_call swaps the tensors there. Otherwise getattr."""
    params, own = module._parameters, module.__dict__
    return [params[name] if name in params and name not in own else getattr(module, name)
            for name in names]
