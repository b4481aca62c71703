"""Helpers for the trainer, data, sampling and CLI tests (imported by those test files).

Tiny latent folders in the released REPA/SRA layout, a clean environment for subprocesses
(no TRITON_INTERPRET, so the CLI runs the plain-PyTorch ops on CPU, as a user's CPU run
would), and a fixture that restores the global op/attention backends a Trainer sets.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def make_released_latents(root, n=24, channels=4, size=8, num_classes=3, seed=0,
                          per_folder=10, dtype=np.float32) -> Path:
    """ROOT/vae-sd/ of (2C, size, size) moments (class-dependent means, std 0.05) and
    dataset.json, in numbered folders like the released layout. Returns ROOT."""
    rng = np.random.default_rng(seed)
    feat = Path(root) / "vae-sd"
    labels = []
    for i in range(n):
        c = int(i % num_classes)
        mean = rng.normal(0, 0.5, (channels, size, size)) + (c - 1) * 2.0
        std = np.full((channels, size, size), 0.05)
        s = f"{i:08d}"
        rel = f"{i // per_folder:05d}/img-mean-std-{s}.npy"
        (feat / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(feat / rel, np.concatenate([mean, std]).astype(dtype))
        labels.append([rel, c])
    (feat / "dataset.json").write_text(json.dumps({"labels": labels}))
    return Path(root)


def subprocess_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    for k in [k for k in env if k.startswith("SLURM_")]:   # tests run inside a SLURM job
        env.pop(k)
    return env


def run_cli(args, cwd, timeout=240, env=None, check=True) -> subprocess.CompletedProcess:
    """Run `python ARGS...` as a user would; on failure show its output."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env or subprocess_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\n"
                             f"stderr:\n{p.stderr[-3000:]}")
    return p


def srun_like_procs(args, n: int) -> list[subprocess.Popen]:
    """Start `python ARGS` as n tasks of a SLURM job step started by srun without torchrun:
    SLURM's variables only (no RANK, WORLD_SIZE, MASTER_ADDR); stdout and stderr together."""
    import socket
    with socket.socket() as sock:          # a free port; the job-id default is unit-tested
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(n):
        env = subprocess_env()
        env.update(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_STEP_NUM_TASKS=str(n),
                   SLURM_NTASKS=str(n), SLURM_STEP_TASKS_PER_NODE=str(n), SLURM_JOB_ID="7",
                   SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish_procs(procs, timeout: float):
    """Wait for every process to end: (return codes, outputs, seconds until the last one
    ended). Past `timeout` in all, kills them and fails with their outputs."""
    import time
    t0 = time.monotonic()
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(0.1, timeout - (time.monotonic() - t0)))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        got = [p.communicate()[0] for p in procs]
        raise AssertionError(f"still running after {timeout} s:\n" + "\n".join(got)) from None
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs, time.monotonic() - t0


def tiny_latent_config(out_dir, data_dir, **kw):
    """A TrainConfig for a ~2M-parameter SiT on 8x8 latents, reference ops, no grids."""
    from sra_fast.config import TrainConfig
    base = dict(data_dir=str(data_dir), model="SiT-T/2", batch_size=8, num_workers=0,
                max_steps=4, log_every=2, ckpt_every=100, sample_every=0, vae="none",
                precision="fp32", kernels="ref", out_dir=str(out_dir), exp_name="run",
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def aot_eager_compile_fn(seen=None):
    """A stand-in for sra_fast.step.compile_fn that compiles with dynamo's aot_eager backend
    (the same ATen ops as eager, seconds instead of inductor's minutes on a CPU); records
    each mode asked for in `seen`."""
    from sra_fast.step import compile_fn

    def fn(f, mode, backend="inductor"):
        if seen is not None:
            seen.append(mode)
        return compile_fn(f, mode, "aot_eager")
    return fn


@pytest.fixture
def restore_backends():
    """A Trainer selects global op/attention backends; put the previous ones back."""
    from sra_fast import ops
    from sra_fast.ops import attention
    old_ops, old_attn = ops.get_backend(), attention.get_attention_backend()
    threads = torch.get_num_threads()
    yield
    ops.set_backend(old_ops)
    attention.set_attention_backend(old_attn)
    torch.set_num_threads(threads)


def training_state(tr) -> dict:
    """What must be equal for two runs to be the same run: weights, optimizer state, step
    generator and data position."""
    return {"model": tr.model.state_dict(), "ema": tr.ema.state_dict(),
            "opt": tr.opt.state_dict()["state"], "gen": tr.generator.get_state(),
            "pos": (tr.step, tr.epoch, tr.pos)}


def assert_same_training_state(a: dict, b: dict):
    assert a["pos"] == b["pos"]
    assert torch.equal(a["gen"], b["gen"])
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs"
    for i, st in a["opt"].items():
        for k, v in st.items():
            assert torch.equal(v, b["opt"][i][k]), f"opt state {i}.{k} differs"
