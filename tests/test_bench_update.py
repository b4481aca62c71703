"""Smoke test of benchmarks/bench_update.py --quick (CPU, tiny SiT): every provider runs
through the extension, rows are stamped and the byte counts order as designed."""
import csv

import pytest

from trainer_fixtures import load_benchmark


def test_quick_runs_and_records(tmp_path, capsys):
    from sra_fast import ext
    if ext.load(jit=True) is None:
        pytest.skip(f"extension unavailable: {ext.unavailable_reason()}")
    bench = load_benchmark("bench_update")
    out = tmp_path / "u.csv"
    rows = bench.main(["--quick", "--csv", str(out)])
    assert [r["provider"] for r in rows] == list(bench.PROVIDERS)
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in rows), rows
    gb = {r["provider"]: r["gb"] for r in rows}
    assert gb["one-pass"] < gb["adamw+fema"] < gb["adamw+lerp"]
    saved = list(csv.DictReader(out.open()))
    assert len(saved) == 3 and all(r["card"] and r["git"] for r in saved)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].lstrip().startswith("one-pass")
