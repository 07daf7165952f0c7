"""bench/compare_backends.py: the evidence table behind MEASURED_ORDER."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_pairs_cuda_with_triton_per_case(tmp_path):
    rows = [dict(case="attention fwd B1-H8-L4096-D128-bfloat16-none", provider="seqkern-cuda",
                 median_ms=2.0),
            dict(case="attention fwd B1-H8-L4096-D128-bfloat16-none",
                 provider="seqkern-triton", median_ms=3.0),
            dict(case="LSTM inference small-batch T256 B4 H512 bfloat16",
                 provider="seqkern-cuda", median_ms=4.0),
            dict(case="LSTM inference small-batch T256 B4 H512 bfloat16",
                 provider="seqkern-triton", median_ms=2.0),
            dict(case="LSTMCell step-fwd LSTMCell-B16-H512-bfloat16", provider="torch",
                 median_ms=1.0)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(device="H100", torch="2.11", commit="abc", date="d",
                                    rows=rows)))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare_backends.py"),
                          str(path)], capture_output=True, text=True, check=True).stdout
    attention = "attention fwd B1-H8-L4096-D128-bfloat16-none"
    layer = "LSTM inference small-batch T256 B4 H512 bfloat16"
    assert f"| attention | {attention} | 2.000 | 3.000 | 1.50 |" in out
    assert f"| rnn_layer | {layer} | 4.000 | 2.000 | 0.50 |" in out
    assert "attention: cuda faster in 1 of 1 cases" in out
    assert "rnn_layer: cuda faster in 0 of 1 cases" in out
    assert "LSTMCell" not in out  # only one provider ran it


def test_merge_then_table_ratios_against_torch(tmp_path):
    """gpu_check.sh merges a call's runs (one per pytest call) and prints every provider."""
    case = "LSTM train fastrnns T100 B64 H512 bfloat16"
    runs = [dict(case=case, provider="seqkern-cuda", median_ms=8.0),
            dict(case=case, provider="torch-LSTM", median_ms=4.0)], [
        dict(case="GRUCell step-fwd GRUCell-B64-H512-bfloat16", provider="torch",
             median_ms=3.0)]
    paths = []
    for i, rows in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(dict(device="H200", torch="2.11", commit="abc",
                                             date=f"d{i}", rows=rows)))
    script = os.path.join(ROOT, "bench", "compare_backends.py")
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, script, "--merge", str(merged), *map(str, paths)],
                   check=True)
    assert len(json.loads(merged.read_text())["rows"]) == 3
    out = subprocess.run([sys.executable, script, "--table", str(merged)],
                         capture_output=True, text=True, check=True).stdout
    assert f"{case} | cuda 8.000 torch-LSTM 4.000 | cuda 0.50" in out
    assert "GRUCell step-fwd GRUCell-B64-H512-bfloat16 | torch 3.000 | " in out
