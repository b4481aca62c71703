"""Smoke test of benchmarks/bench_step.py --quick (CPU, tiny model): it runs, writes CSV rows
stamped with the environment, and --summarize prints the table of the last run."""
import csv

import pytest
import torch

from trainer_fixtures import load_benchmark


def load_bench():
    return load_benchmark("bench_step")


def test_quick_runs_and_records(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench_step.csv"
    assert bench.main(["--quick", "--plan",
                       "tiny-SiT@4=eager-ref,ours-graph,ours-graph-sync;tiny-DiT@4=ours",
                       "--steps", "1", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.rindex("x_eager_ref") > text.rindex("-- tiny-DiT")   # the table comes last
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["eager-ref", "ours-graph", "ours-graph-sync",
                                             "ours"]
    assert rows[0]["status"] == "ok" and rows[3]["status"] == "ok"
    for r in rows[1:3]:                                             # no CUDA graphs on CPU
        assert r["status"].startswith("eager fallback")
    assert not torch.distributed.is_initialized()   # its one-process group is gone again
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


def test_budget_stops_a_configuration_that_outlives_it(tmp_path, capsys, monkeypatch):
    """--budget-s also ends the configuration running at its end (a cold torch.compile can
    take minutes): its row says so, later ones are not run, the rows and table still come
    out (gpu_check's next parts get the time)."""
    import time
    bench = load_bench()
    monkeypatch.setattr(bench, "run_one", lambda *a, **k: time.sleep(30))
    monkeypatch.setattr(bench, "measure_matmul_tflops", lambda *a, **k: 1.0)
    out = tmp_path / "bench_step.csv"
    t0 = time.time()
    assert bench.main(["--quick", "--plan", "tiny-SiT@4=compile;tiny-DiT@4=ours",
                       "--budget-s", "1.5", "--compile-reserve-s", "0", "--csv", str(out)]) == 0
    assert time.time() - t0 < 20
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["status"].startswith("stopped (budget)")
    assert rows[1]["status"] == "not run (budget)"
    assert "x_eager_ref" in capsys.readouterr().out


def test_a_compile_configuration_cut_at_its_own_limit_lets_the_next_ones_run(tmp_path,
                                                                               monkeypatch):
    """--after-compile-s: a cold torch.compile that would take the whole budget is stopped
    that many seconds before its end; the cheaper entries after it (the eager baseline) run."""
    import time
    bench = load_bench()
    ran = []

    def fake_run_one(name, batch, prov, *a, **k):
        ran.append(prov)
        if prov.startswith("compile"):
            time.sleep(30)
        return {"model": name, "res": 32, "batch": batch, "provider": prov, "status": "ok",
                "ms": 1.0, "img_s": 8.0, "peak_gib": 0.1, "mfu_pct": 1.0, "first_step_s": 0.1}
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    monkeypatch.setattr(bench, "measure_matmul_tflops", lambda *a, **k: 1.0)
    out = tmp_path / "bench_step.csv"
    t0 = time.time()
    assert bench.main(["--quick", "--plan", "tiny-SiT@4=compile-ro,eager-ref,compile",
                       "--budget-s", "4", "--compile-reserve-s", "0", "--after-compile-s",
                       "2.5", "--csv", str(out)]) == 0
    assert time.time() - t0 < 20
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["status"].startswith("stopped (its limit, 2s before the budget's end")
    assert rows[1]["status"] == "ok"
    # the second compile starts with less than --after-compile-s left: cut by the budget
    assert rows[2]["status"].startswith("stopped (budget)"), rows[2]
    assert ran == ["compile-ro", "eager-ref", "compile"]
