"""benchmarks/gpu_check.sh's time plan: the part budgets it gives for a device-time budget.

The lent GPU's device time is short and its start takes an unknown part of it, so the check
must fit what is left: floors in order of need, top-ups in the same order, nothing past the
deadline. These run the script's planning only (GPU_CHECK_PLAN_ONLY=1), no part.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
DEFAULTS = {"tests_kernels": 60, "bench_step": 215, "bench_ops": 90, "bench_infer": 30,
            "bench_update": 30, "tests_step": 60, "tests_compile": 35, "train_smoke": 45}
FIXED = 35   # environment report, summary, slack
CAP = 570    # GPU_CHECK_MAX_S: one device command runs 600 s at most

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def plan(tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "T_"))}
    e.update({k: str(v) for k, v in env.items()}, GPU_CHECK_PLAN_ONLY="1")
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=e, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    vals = dict(zip(out[0::2], (int(v) for v in out[1::2])))
    return vals.pop("budget"), vals


def test_without_a_budget_the_check_fits_one_device_command(tmp_path):
    # the defaults (565 s + 35) exceed 570: floors first (385), then top-ups by need; the
    # last ones (update, infer, compile tests) give way
    budget, parts = plan(tmp_path)
    assert budget == CAP and sum(parts.values()) == CAP - FIXED
    assert parts == {**DEFAULTS, "bench_update": 25, "bench_infer": 15, "tests_compile": 25}
    assert plan(tmp_path, GPU_CHECK_BUDGET_S=2000) == (budget, parts)


def test_without_the_cap_a_long_budget_keeps_the_defaults(tmp_path):
    assert plan(tmp_path, GPU_CHECK_MAX_S=0)[1] == DEFAULTS
    assert plan(tmp_path, GPU_CHECK_MAX_S=0, GPU_CHECK_BUDGET_S=2000)[1] == DEFAULTS


def test_a_short_budget_gives_floors_by_need_then_tops_up(tmp_path):
    # 240 s: 35 s fixed; step floor 150 + kernel tests 45 = 195; the step tests' floor (45)
    # no longer fits, so every later part is skipped and the 10 s left go to the step
    _, parts = plan(tmp_path, GPU_CHECK_BUDGET_S=240)
    assert parts == {**{k: 0 for k in DEFAULTS}, "bench_step": 160, "tests_kernels": 45}
    # 400 s: every floor but the train smoke's (45) fits (340 of 365), the 25 s left top up the
    # step benchmark first
    _, parts = plan(tmp_path, GPU_CHECK_BUDGET_S=400)
    assert parts == {"tests_kernels": 45, "bench_step": 175, "bench_ops": 45, "bench_infer": 15,
                     "bench_update": 15, "tests_step": 45, "tests_compile": 25, "train_smoke": 0}
    # 500 s: floors 385, then step +65 (to 215), kernel tests +15
    _, parts = plan(tmp_path, GPU_CHECK_BUDGET_S=500)
    assert parts == {"tests_kernels": 60, "bench_step": 215, "bench_ops": 45, "bench_infer": 15,
                     "bench_update": 15, "tests_step": 45, "tests_compile": 25, "train_smoke": 45}


@pytest.mark.parametrize("budget", [120, 240, 333, 400, 480, 560, 600, 900])
def test_the_plan_never_exceeds_the_budget(tmp_path, budget):
    _, parts = plan(tmp_path, GPU_CHECK_BUDGET_S=budget)
    assert sum(parts.values()) <= min(budget, CAP) - FIXED
    assert all(0 <= parts[k] <= DEFAULTS[k] for k in DEFAULTS)


def test_a_deadline_sets_the_budget_from_the_clock(tmp_path):
    budget, _ = plan(tmp_path, GPU_CHECK_DEADLINE=int(time.time()) + 300)
    assert 295 <= budget <= 300
    budget, _ = plan(tmp_path, GPU_CHECK_DEADLINE=int(time.time()) - 50)   # already past
    assert budget == 60


def test_every_provider_in_the_step_plan_exists():
    """A misspelt provider in the benchmark plan would cost its place on a scarce GPU run;
    both plans (the GPU one and the DRY one) name only providers bench_step.py has."""
    import re
    import sys
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_step
    text = SCRIPT.read_text()
    gpu = "".join(re.findall(r'^PLAN\+?="([^"]*)"', text, flags=re.M))
    dry = re.search(r'GPU_CHECK_DRY:-0}" = "1" \] && PLAN="([^"]*)"', text).group(1)
    for plan in (gpu, dry):
        entries = [e for e in plan.split(";") if e]
        assert len(entries) > 3 if plan is gpu else entries
        for entry in entries:
            _, provs = entry.split("=")
            for p in provs.split(","):
                assert p in bench_step.PROVIDERS, (p, entry)
    assert "ours-compile-graph" in gpu and "ours-graph" in gpu
