"""bench/conftest.py's device clock, on the CPU with torch.cuda's events faked: a GPU session's
benchmark numbers come from this bookkeeping, and a GPU is rarely at hand to catch it wrong.
Also the GPU run's other tools that can be checked here (variant switches, the host-time
script, the prebuilt build's stamp)."""
import importlib.util
import os
import shutil
import subprocess
import types

import pytest
import torch

_CONFTEST = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "conftest.py")


def _bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest", _CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeEvent:
    """Records the fake device clock's time; elapsed_time in ms, as torch.cuda.Event's."""
    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = self.clock[0]

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _fake_benchmark(host_s, rounds, iterations):
    stats = types.SimpleNamespace(median=host_s, data=[host_s] * rounds)
    return types.SimpleNamespace(stats=types.SimpleNamespace(stats=stats, iterations=iterations),
                                 extra_info={})


def test_device_clock_skips_warm_up_and_takes_the_median(monkeypatch):
    conftest = _bench_conftest()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    record = conftest.Recorder()
    # 2 warm-up rounds of 2 calls, then 5 rounds of 2: the median of all 14 would be 4 ms.
    durations = iter([9.0] * 4 + [0.004, 0.001, 0.002, 0.003, 0.005] * 2)

    def target():  # the device clock advances by one duration a call
        _FakeEvent.clock[0] += next(durations)
    timed = record.timed(target)
    assert timed is not target
    for _ in range(14):
        timed()
    record(_fake_benchmark(0.5, rounds=5, iterations=2), "case", "seqkern-x", flops=3e9)
    row = conftest._ROWS[-1]
    assert abs(row["median_ms"] - 3.0) < 1e-9  # not the warm-up's 9 s, not the host's 0.5 s
    assert abs(row["host_ms"] - 500.0) < 1e-9
    assert abs(row["tflops"] - 3e9 / 0.003 / 1e12) < 1e-9


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's host clock")
def test_host_clock_on_the_cpu():
    conftest = _bench_conftest()
    record = conftest.Recorder()

    def target():
        pass
    assert record.timed(target) is target
    record(_fake_benchmark(0.25, rounds=3, iterations=1), "case", "seqkern-cpu", flops=0)
    row = conftest._ROWS[-1]
    assert row["median_ms"] == 250.0 and "host_ms" not in row and row["tflops"] is None


def test_layer_bench_variant_env_sets_its_own_switches_and_restores(monkeypatch):
    """The GPU layer bench's providers differ only by environment switches (bench/
    test_rnn_layer_bench.py, variant_env): a variant must set its own, unset the others',
    and leave the environment as it found it."""
    spec = importlib.util.spec_from_file_location(
        "layer_bench", os.path.join(os.path.dirname(__file__), os.pardir, "bench",
                                    "test_rnn_layer_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("SEQKERN_CUDA_RNN_MMA", "1")
    monkeypatch.delenv("SEQKERN_RNN_PROJ_VIA_PLAIN", raising=False)
    with bench.variant_env("proj"):
        assert os.environ.get("SEQKERN_RNN_PROJ_VIA_PLAIN") == "1"
        assert "SEQKERN_CUDA_RNN_MMA" not in os.environ
    with bench.variant_env("next"):
        assert os.environ.get("SEQKERN_CUDA_RNN_MMA") == "1"
        assert os.environ.get("SEQKERN_CUDA_RNN_TF32") == "1"
        assert os.environ.get("SEQKERN_CUDA_RNN_PREFETCH") == "1"
        assert "SEQKERN_RNN_PROJ_VIA_PLAIN" not in os.environ
    with bench.variant_env("lanes"):
        assert os.environ.get("SEQKERN_CUDA_RNN_LANES") == "1"
        assert os.environ.get("SEQKERN_CUDA_RNN_MMA") == "0"
    with bench.variant_env(""):
        assert not any(k in os.environ for names in bench.VARIANT_ENV.values() for k in names)
    assert os.environ.get("SEQKERN_CUDA_RNN_MMA") == "1"
    assert "SEQKERN_RNN_PROJ_VIA_PLAIN" not in os.environ


def test_host_overhead_script_times_every_layer_of_the_stack(capsys):
    """bench/host_overhead.py (gpu_check.sh's `host` stage) on the CPU, one case, few calls:
    a row per graph mode with a time for each column, the backend named."""
    from seqkern.backends import BACKENDS
    if BACKENDS["cpu"].availability("cpu"):
        pytest.skip("seqkern._C not built")
    spec = importlib.util.spec_from_file_location(
        "host_overhead", os.path.join(os.path.dirname(_CONFTEST), "host_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--calls", "3", "--rounds", "1", "--cases", "GRUCell"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "cpu float32 GRUCell B1 H256 (cpu)", "cpu float32 GRUCell B1 H256 (cpu, grad)"]
    for row in rows:
        times = [float(v) for v in row.strip("|").split("|")[1:]]
        assert len(times) == 5 and all(t > 0 for t in times), row


def test_prebuilt_stamp_names_the_sources_torch_and_archs(tmp_path):
    """bench/prebuilt_stamp.sh: gpu_check.sh installs the _C that `make gpu-torch-check` built
    on the CPU machine only where the stamps agree, so the stamp must change with any file
    under csrc/, setup.py, the torch and the archs, and with nothing else."""
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    copy = tmp_path / "tree"
    shutil.copytree(os.path.join(root, "csrc"), copy / "csrc")
    shutil.copy(os.path.join(root, "setup.py"), copy / "setup.py")
    (copy / "bench").mkdir()
    shutil.copy(os.path.join(root, "bench", "prebuilt_stamp.sh"), copy / "bench")

    def stamp(torch_version="2.11.0+cu130", archs="90a"):
        out = subprocess.run(["bash", str(copy / "bench" / "prebuilt_stamp.sh"), torch_version,
                              archs], capture_output=True, text=True, check=True).stdout
        assert len(out.strip()) == 64, out
        return out.strip()

    first = stamp()
    (copy / "README.md").write_text("not a build input")
    assert stamp() == first
    assert stamp(torch_version="2.13.0") != first
    assert stamp(archs="80;90a") != first
    source = copy / "csrc" / "cuda" / "rnn_layer.cu"
    source.write_text(source.read_text() + "\n")
    assert stamp() != first
