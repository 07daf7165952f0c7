import os

# The Triton backend runs on CPU tensors only under the interpreter, which must be chosen
# before triton is imported (tests/ never need compiled Triton on a CPU-only machine).
if not os.environ.get("SEQKERN_TEST_COMPILED_TRITON"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setenv("SEQKERN_POISON_OUTPUTS", "1")
    torch.manual_seed(0x5EC)
    yield


def pytest_report_header(config):
    import seqkern.backends as b
    lines = []
    for dev in ("cpu", "cuda"):
        for name, reasons in b.usable_report(dev).items():
            lines.append(f"seqkern {dev}/{name}: " + ("usable" if not reasons else "; ".join(reasons)))
    return lines
