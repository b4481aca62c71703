"""Smoke test of benchmarks/bench_host_overhead.py (CPU, Triton launches stubbed): every op
runs through every path, including the custom ops with their full signatures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_op_and_path_runs():
    pytest.importorskip("sra_fast.kernels")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_overhead.py"),
                          "--iters", "3", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()
            if line and not line.startswith(("#", "op "))]
    assert len(rows) == 4 * 5, res.stdout
    for op, path, us, launches, *_ in rows:
        assert float(us) > 0
        assert (int(launches) == 0) == (path == "ref"), (op, path, launches)
