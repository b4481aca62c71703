"""Smoke test of benchmarks/bench_compile.py --quick (CPU, tiny SiT, aot_eager): both scopes
run in fresh processes, compile the graphs the step should (blocks: two forms of a block for
the student and two for the teacher; model: the student and the teacher), unbroken, and rows
are stamped."""
import csv

import pytest

from trainer_fixtures import load_benchmark


@pytest.mark.timeout(300)
def test_quick_runs_both_scopes_and_records(tmp_path, capsys):
    bench = load_benchmark("bench_compile")
    out = tmp_path / "c.csv"
    rows = bench.main(["--quick", "--csv", str(out)])
    assert [r["scope"] for r in rows] == ["blocks", "model"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert [r["graphs"] for r in rows] == [4, 2] and all(r["graph_breaks"] == 0 for r in rows)
    assert all(r["first_step_s"] > 0 and r["step_ms"] > 0 for r in rows), rows
    saved = list(csv.DictReader(out.open()))
    assert len(saved) == 2 and all(r["card"] and r["git"] for r in saved)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].split()[4] == "model"
