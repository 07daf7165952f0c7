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


def test_extension_uses_the_stable_abi_only():
    """_C is built as _C.abi3.so against CPython's stable ABI (setup.py: py_limited_api), so
    that one build loads under another CPython beside the same torch: the GPU machine's Python
    3.12 loads the _C that `make gpu-torch-check` builds here (gpu-prebuilt/). One built for a
    single CPython (a _C.cpython-3XX-*.so) would also shadow the abi3 one on import."""
    if not _extension.available():
        pytest.skip("seqkern._C is not built here")
    path = _extension._C.__file__
    assert path.endswith(".abi3.so") or path.endswith(".pyd"), \
        f"seqkern._C loaded from {path}, not an abi3 build (a stale build? `make clean`)"
