"""seqkern._C: a built extension must load. import seqkern never fails without _C (the
reference and Triton backends still work) and the C++ tests then skip, so an extension that
was built but cannot load (an undefined symbol, another torch's ABI) would leave `make test`
green with every C++ kernel untested."""
import glob
import os

import pytest

import seqkern
from seqkern import _extension


def test_built_extension_loads():
    package = os.path.dirname(seqkern.__file__)
    built = glob.glob(os.path.join(package, "_C*.so")) + glob.glob(os.path.join(package, "_C*.pyd"))
    if not built:
        pytest.skip("seqkern._C is not built here")
    assert _extension.available(), f"{built[0]} is built but does not load: " \
                                    f"{_extension.load_error}"
