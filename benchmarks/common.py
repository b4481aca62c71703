"""Shared helpers for the benchmark scripts: timing, ceilings, environment, CSV and tables.

Self-contained (torch only, triton optional) so any benchmark script can import it as
`from common import ...` (run from benchmarks/) or `from benchmarks.common import ...`
(run from the repository root). Every figure a benchmark reports should come from here, so
the timing method and the ceilings it is compared against are the same everywhere.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "results.csv"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, warmup: int = 25, rep: int = 100, device=None) -> float:
    """Median milliseconds of fn() over `rep` timed calls after `warmup` untimed ones.

    On CUDA each call is timed with its own pair of CUDA events (so the median discards
    outliers such as a stray allocator sync); elsewhere with a wall clock. The device is
    taken from `device`, else CUDA when available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def measure_copy_bandwidth_gbs(device=None, nbytes: int = 1 << 30, dtype=torch.bfloat16) -> float:
    """Device-to-device copy rate in GB/s (1e9 bytes/s), counting bytes read + written.

    The ceiling memory-bound kernels are compared against. 1 GiB per buffer by default on
    CUDA (well beyond L2); 64 MiB on CPU so the fallback stays quick.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    esize = torch.empty((), dtype=dtype).element_size()
    n = nbytes // esize
    src = torch.randn(n, device=dev, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=5 if dev.type == "cuda" else 1,
                  rep=20 if dev.type == "cuda" else 3, device=dev)
    return 2 * n * esize / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device=None, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Dense n x n x n matmul rate in TFLOP/s on random data (never zeros: zeros run faster
    on some cards). The ceiling the training step's MFU is quoted against."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        n = min(n, 1024)
        if dtype in (torch.float16,):
            dtype = torch.float32  # half matmul on CPU is slow and not what we would quote
    a = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    ms = bench_ms(lambda: torch.matmul(a, b, out=c), warmup=5 if dev.type == "cuda" else 1,
                  rep=20 if dev.type == "cuda" else 3, device=dev)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _git_rev() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except Exception:
        return "unknown"


def env_info(device=None) -> dict:
    """Card, versions, date and git revision: stamped on every CSV row and printed with
    every table, so a number is never separated from where it came from."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        card = torch.cuda.get_device_name(dev)
    else:
        card = f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "git": _git_rev(),
    }


def append_csv(path=None, rows: list[dict] | None = None) -> Path:
    """Append rows to a CSV (default benchmarks/results/results.csv), writing a header when
    the file is new. Columns are the union of the existing header and the rows' keys; if new
    keys appear the file is rewritten with the widened header so old rows stay readable."""
    path = Path(path) if path is not None else RESULTS_CSV
    rows = rows or []
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows, header = [], []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    cols = list(header)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    if cols != header:   # rewritten beside it and renamed: a kill mid-write loses nothing
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(old_rows)
            w.writerows(rows)
        os.replace(tmp, path)
    else:
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writerows(rows)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print rows as an aligned plain-text table (columns default to the first row's keys)."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


__all__ = ["RESULTS_CSV", "bench_ms", "measure_copy_bandwidth_gbs", "measure_matmul_tflops",
           "env_info", "append_csv", "print_table"]
