import os

# SEQKERN_TEST_DEVICE=cuda (bench/gpu_check.sh) runs the suite on a GPU: tensors are created
# there by default and the Triton kernels run compiled; the cpu backend's tests then skip.
# Otherwise the Triton backend runs on CPU tensors under the interpreter, which must be
# chosen before triton is imported.
TEST_DEVICE = os.environ.get("SEQKERN_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk caches (/tmp/torchinductor_$USER, shared by every checkout on a machine)
# key compiled graphs without the custom ops' fake implementations: a graph compiled against
# an older fake (other output strides) is reused and fails. Tests compile from scratch.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    if TEST_DEVICE != "cpu":
        torch.set_default_device(TEST_DEVICE)


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
