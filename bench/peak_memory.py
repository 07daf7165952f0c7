"""Peak CPU memory of one call, measured in a fresh process.

The process's peak resident set size during the call (VmHWM of /proc/self/status, reset to
the current size just before the call through /proc/self/clear_refs) minus its resident set
size just before it. A fresh process per measurement, so that one provider's allocations
cannot hide another's; the caller warms up on a smaller input first, so that one-off
allocations (thread pools, first-touch of the allocator) are not counted.

Not getrusage's ru_maxrss: Linux carries the parent's peak into a child across fork and
exec, so under pytest every probe reported at least the pytest process's own size (seen:
270 MB for a call that peaks at 19 MB).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    """Sets the peak RSS to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(warm_up, target):
    """In the probe process: the peak growth (MB) of target() after warm_up()."""
    warm_up()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    before = rss_mb()
    target()
    return peak_rss_mb() - before


def probe(script, spec):
    """Runs `python script <spec as JSON>` (its __main__ prints measure(...)) and returns the
    number it printed last."""
    result = subprocess.run([sys.executable, script, json.dumps(spec)], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed: {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])
