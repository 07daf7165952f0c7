"""Collects every benchmark's median next to its peer's, prints the ratio table at the end
of the run and saves it as JSON (bench/results/), with device, versions and commit.

On a GPU the times are on the device clock: `record.timed(target)` puts CUDA events around
each call on the current stream and synchronizes the device after the end event (targets do
not synchronize themselves); the median of those is the row's time, pytest-benchmark's host
median beside it as host_ms. A host-bound peer (torch's layers at small sizes) shows its host
time either way: the device waits between its launches. On the CPU the host clock.
"""
import datetime
import json
import os
import platform
import subprocess

import pytest
import torch

_ROWS = []


class Recorder:
    def __init__(self):
        self.device_s = []  # device-clock seconds of each call of a timed() target

    def timed(self, target):
        """target on the device clock (see the module docstring); on the CPU target itself."""
        if not torch.cuda.is_available():
            return target

        def timed_target():
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            target()
            end.record()
            torch.cuda.synchronize()
            self.device_s.append(start.elapsed_time(end) / 1e3)
        return timed_target

    def __call__(self, benchmark, case, provider, flops, extra=None):
        host = benchmark.stats.stats.median
        # The timed calls (rounds x iterations), not the warm-up's before them.
        calls = len(benchmark.stats.stats.data) * benchmark.stats.iterations
        device = sorted(self.device_s[-calls:]) if self.device_s else []
        median = device[len(device) // 2] if device else host
        if device:
            extra = dict(extra or {}, host_ms=host * 1e3)
        row = dict(case=case, provider=provider, median_ms=median * 1e3,
                   tflops=flops / median / 1e12 if flops else None, **(extra or {}))
        benchmark.extra_info.update(row)
        _ROWS.append(row)


@pytest.fixture
def record():
    return Recorder()


def _commit():
    if os.environ.get("SEQKERN_COMMIT"):  # the device copy's .git may lag its tree
        return os.environ["SEQKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


def _device():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    by_case = {}
    for row in _ROWS:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    clock = "device clock" if torch.cuda.is_available() else "host clock"
    lines = ["", f"seqkern benchmarks on {_device()} (torch {torch.__version__}, "
             f"commit {_commit()}, {clock}); ratio = peer time / seqkern time (>1: seqkern "
             "faster)",
             f"{'case':58s} {'provider':16s} {'ms':>9s} {'TFLOP/s':>8s} {'ratio':>6s}"]
    for case, providers in by_case.items():
        peer = next((r for p, r in providers.items() if p.startswith("torch")), None)
        for name, row in providers.items():
            ratio = (peer["median_ms"] / row["median_ms"]) if peer and row is not peer else None
            tf = f"{row['tflops']:.3f}" if row["tflops"] is not None else "-"
            peak = f"  peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else ""
            lines.append(f"{case:58s} {name:16s} {row['median_ms']:9.2f} {tf:>8s} "
                         f"{'' if ratio is None else f'{ratio:6.2f}'}{peak}")
    text = "\n".join(lines)
    print(text)
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(out_dir, f"bench-{stamp}.json"), "w") as f:
        json.dump(dict(device=_device(), torch=torch.__version__, commit=_commit(),
                       date=stamp, clock=clock, rows=_ROWS), f, indent=1)
