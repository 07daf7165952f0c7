"""Which GPU backend is faster, case by case: seqkern-cuda against seqkern-triton in one saved
benchmark run (bench/results/*.json, written by `pytest bench/`). The table it prints is the
evidence for seqkern.backends.MEASURED_ORDER (which backend a GPU op tries first).

Usage: python bench/compare_backends.py [results.json]   (default: the newest run)
       python bench/compare_backends.py --merge OUT.json RUN.json...   (one run of several)
       python bench/compare_backends.py --table RUN.json   (every provider per case, short)
"""
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def times_by_case(rows):
    """{case: {provider: median ms}}, cases in the order they ran."""
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["provider"]] = row["median_ms"]
    return by_case


def compare(rows, first="seqkern-cuda", second="seqkern-triton"):
    """[(case, first ms, second ms, second / first)] for the cases both providers ran."""
    return [(case, times[first], times[second], times[second] / times[first])
            for case, times in times_by_case(rows).items()
            if first in times and second in times]


def family(case):
    """The op a benchmark case exercises, as seqkern.backends names it."""
    head = case.split()[0]
    if head == "attention":
        return "attention"
    if head.endswith("Cell"):
        return "rnn_cell"
    if head in ("LSTM", "GRU", "RNN"):
        return "rnn_layer"
    return head


def report(path):
    run = json.load(open(path))
    pairs = compare(run["rows"])
    lines = [f"{run['device']}, torch {run['torch']}, commit {run['commit']}, {run['date']}",
             "", "| op | case | cuda ms | triton ms | triton / cuda |", "|---|---|---|---|---|"]
    for case, cuda_ms, triton_ms, ratio in sorted(pairs, key=lambda p: (family(p[0]), p[0])):
        lines.append(f"| {family(case)} | {case} | {cuda_ms:.3f} | {triton_ms:.3f} | "
                     f"{ratio:.2f} |")
    if not pairs:
        lines.append("| | no case ran on both seqkern-cuda and seqkern-triton | | | |")
    wins = {}
    for case, _, _, ratio in pairs:
        wins.setdefault(family(case), []).append(ratio > 1.0)
    lines.append("")
    for op, outcome in sorted(wins.items()):
        lines.append(f"{op}: cuda faster in {sum(outcome)} of {len(outcome)} cases")
    return "\n".join(lines)


def merge(paths):
    """Several saved runs of one session (one per pytest call) as one run."""
    runs = [json.load(open(p)) for p in paths]
    merged = dict(runs[0], rows=[row for run in runs for row in run["rows"]])
    merged["date"] = ", ".join(run["date"] for run in runs)
    return merged


def table(run):
    """One line per case: each provider's milliseconds, then torch's time over each seqkern
    provider's (>1: seqkern faster)."""
    lines = [f"{run['device']}, torch {run['torch']}, commit {run['commit']}",
             "case | ms per provider | torch / seqkern"]
    for case, times in times_by_case(run["rows"]).items():
        peer = next((ms for name, ms in times.items() if name.startswith("torch")), None)
        cells = " ".join(f"{name.replace('seqkern-', '')} {ms:.3f}" for name, ms in times.items())
        ratios = " ".join(f"{name.replace('seqkern-', '')} {peer / ms:.2f}"
                          for name, ms in times.items()
                          if peer is not None and not name.startswith("torch"))
        lines.append(f"{case} | {cells} | {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        paths = [p for p in sys.argv[3:] if os.path.exists(p)]
        if not paths:
            sys.exit("no saved benchmark run to merge")
        with open(sys.argv[2], "w") as f:
            json.dump(merge(paths), f, indent=1)
        sys.exit(0)
    if sys.argv[1:2] == ["--table"]:
        if not os.path.exists(sys.argv[2]):
            sys.exit(f"no benchmark run at {sys.argv[2]}")
        run = json.load(open(sys.argv[2]))
        print(table(run))
        print()
        print(report(sys.argv[2]))
        sys.exit(0)
    runs = sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))[-1:]
    if not runs:
        sys.exit("no saved benchmark run in bench/results/")
    print(report(runs[0]))
