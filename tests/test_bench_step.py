"""Smoke test of benchmarks/bench_step.py --quick (CPU, tiny model): it runs, writes CSV rows
stamped with the environment, and --summarize prints the table of the last run."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_runs_and_records(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench_step.csv"
    assert bench.main(["--quick", "--plan", "tiny-SiT@4=eager-ref,ours-graph;tiny-DiT@4=ours",
                       "--steps", "1", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.rindex("x_eager_ref") > text.rindex("-- tiny-DiT")   # the table comes last
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["eager-ref", "ours-graph", "ours"]
    assert rows[0]["status"] == "ok" and rows[2]["status"] == "ok"
    assert rows[1]["status"].startswith("eager fallback")          # no CUDA graphs on CPU
    for r in rows:
        assert r["card"] and r["torch"] and r["git"] and float(r["img_s"]) > 0
    assert float(rows[0]["gflop_per_img"]) > 0 and float(rows[0]["mfu_pct"]) > 0
    bench.main(["--summarize", str(out)])
    assert "tiny-DiT" in capsys.readouterr().out


def test_plan_entry_errors_name_the_entry(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--plan", "tiny-SiT@big=ours", "--no-csv"])
    assert "tiny-SiT@big=ours" in capsys.readouterr().err
