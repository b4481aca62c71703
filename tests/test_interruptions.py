"""Runs ended from outside. A stop signal (SIGTERM / SIGUSR1: scheduler time limit,
preemption, torchrun shutdown) ends training after the current step with a checkpoint, and
the run resumes from it exactly; a full disk at a checkpoint is one line and loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sra_fast.stop_signals import CHECK_EVERY
from sra_fast.trainer import Trainer
from trainer_fixtures import (REPO, assert_same_training_state,  # noqa: F401
                              make_released_latents, restore_backends, run_cli,
                              subprocess_env, tiny_latent_config, training_state)

pytestmark = pytest.mark.usefixtures("restore_backends")


def _signal_after(tr, step, signum):
    """Make `tr` send itself `signum` while it runs step `step` (1-based)."""
    step_once = tr.one_step

    def one_step(*a):
        step_once(*a)
        if tr.step + 1 == step:
            os.kill(os.getpid(), signum)

    tr.one_step = one_step


def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path):
    data = make_released_latents(tmp_path / "d", n=40)
    kw = dict(lr=1e-3, lr_warmup_steps=4, ckpt_every=100, log_every=100, max_steps=6)
    ref = training_state(_run_to_end(tiny_latent_config(tmp_path / "a", data, **kw)))

    before = signal.getsignal(signal.SIGUSR1)
    tr = Trainer(tiny_latent_config(tmp_path / "b", data, **kw), quiet=True)
    _signal_after(tr, 3, signal.SIGUSR1)
    out = tr.train()
    assert out["step"] == 3 and out["signal"] == signal.SIGUSR1 and out["stopped"] == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before      # handler removed again
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").glob("*.pt"))
    assert ckpts == ["0000003.pt"]
    events = [json.loads(ln) for ln in
              (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "stopped", "signal": "SIGUSR1", "saved": True}.items() <= events[-1].items()

    resumed = _run_to_end(tiny_latent_config(tmp_path / "b", data, resume="auto", **kw))
    assert_same_training_state(ref, training_state(resumed))


def _run_to_end(cfg):
    tr = Trainer(cfg, quiet=True)
    assert tr.train()["signal"] == 0
    return tr


def test_without_save_on_signal_the_handler_is_not_installed(tmp_path):
    data = make_released_latents(tmp_path / "d", n=16)
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        tr = Trainer(tiny_latent_config(tmp_path / "a", data, max_steps=3,
                                        save_on_signal=False), quiet=True)
        _signal_after(tr, 1, signal.SIGUSR1)
        assert tr.train()["step"] == 3            # the signal went to the old handler
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def _start(args, tmp_path):
    log = open(tmp_path / "out.txt", "w")
    # its own session, like a batch job: killpg reaches the data-loader workers too, as a
    # scheduler's signal does
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _signal_a_run(args, tmp_path, send):
    """Start `python ARGS` (a run "r" in tmp_path/runs), let it log 3 steps, send(process) a
    signal, wait for the end: (exit status, its output, its checkpoint files)."""
    p = _start(args, tmp_path)
    try:
        _wait_for_steps(p, tmp_path / "runs" / "r" / "metrics.jsonl", 3)
        assert p.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        send(p)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return (rc, (tmp_path / "out.txt").read_text(),
            sorted((tmp_path / "runs" / "r" / "checkpoints").glob("*.pt")))


def _wait_for_steps(p, metrics: Path, n: int, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            return
        if metrics.exists():
            steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines()
                     if '"loss"' in ln]
            if len(steps) >= n:
                return
        time.sleep(0.2)
    raise AssertionError("training did not log in time")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("save_on_signal", [True, False])
def test_sigterm_to_the_process_group_of_train_py(tmp_path, save_on_signal):
    """As a scheduler does it: SIGTERM to every process of the job, data-loader workers
    included. With --save-on-signal (default) train.py checkpoints and exits with 143."""
    data = make_released_latents(tmp_path / "d", n=64)
    args = ["train.py", "--data-dir", data, "--out-dir", tmp_path / "runs", "--exp-name", "r",
            "--model", "SiT-T/2", "--batch-size", "8", "--max-steps", "100000",
            "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "0",
            "--vae", "none", "--precision", "fp32", "--kernels", "ref", "--threads", "1",
            "--num-workers", "2", "--device", "cpu"]
    if not save_on_signal:
        args.append("--no-save-on-signal")
    rc, out, ckpts = _signal_a_run(args, tmp_path, lambda p: os.killpg(p.pid, signal.SIGTERM))
    if not save_on_signal:
        assert rc == -signal.SIGTERM and ckpts == [], out[-3000:]
        return
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert len(ckpts) == 1, out[-3000:]
    step = int(ckpts[0].stem)
    assert step >= 3
    assert f"SIGTERM: stopped after step {step}, checkpoint written" in out
    ck = torch.load(ckpts[0], weights_only=True)
    assert ck["steps"] == step
    # and it goes on from there
    p2 = run_cli(args[:args.index("--max-steps") + 1] + [str(step + 2)]
                 + args[args.index("--max-steps") + 2:] + ["--resume", "auto"], cwd=REPO)
    assert f"step {step}" in p2.stdout + p2.stderr and "resumed from" in p2.stdout + p2.stderr
    assert (tmp_path / "runs" / "r" / "checkpoints" / f"{step + 2:07d}.pt").exists()


@pytest.mark.timeout(300)
def test_sigterm_to_torchrun_reaches_the_workers_and_they_save(tmp_path):
    """torchrun's agent forwards SIGTERM to its workers (and kills them 30 s later)."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "train.py", "--out-dir", tmp_path / "runs", "--exp-name", "r", "--max-steps",
            "100000", "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "0",
            "--batch-size", "8", "--kernels", "ref", "--device", "cpu", "--threads", "1"]
    _, out, ckpts = _signal_a_run(args, tmp_path,
                                  lambda p: p.send_signal(signal.SIGTERM))   # the agent only
    assert len(ckpts) == 1 and int(ckpts[0].stem) % CHECK_EVERY == 0, out[-3000:]
    assert f"SIGTERM: stopped after step {int(ckpts[0].stem)}, checkpoint written" in out


@pytest.mark.timeout(300)
def test_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(tmp_path):
    worker = Path(__file__).resolve().parent / "ddp_signal_worker.py"
    p = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 worker, tmp_path, 3, 50, 2], cwd=REPO)
    res = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert res == [{"rank": 0, "step": 4, "signal": signal.SIGUSR1},
                   {"rank": 1, "step": 4, "signal": signal.SIGUSR1}], p.stdout + p.stderr
    ckpts = [c.name for c in (tmp_path / "run" / "checkpoints").glob("*.pt")]
    assert ckpts == ["0000004.pt"]


@pytest.mark.parametrize("how", ["OSError", "torch-writer"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_older_ones(tmp_path,
                                                                          monkeypatch, how):
    """torch.save reports a failed write from its zip writer as a RuntimeError, not OSError."""
    from sra_fast import train_state
    from sra_fast.checkpoint import CheckpointError
    data = make_released_latents(tmp_path / "d", n=16)
    tr = Trainer(tiny_latent_config(tmp_path / "a", data, max_steps=4, ckpt_every=2),
                 quiet=True)
    real_save = torch.save

    def save(obj, fh, *a, **k):
        if obj.get("steps") == 4:
            fh.write(b"partial")
            if how == "OSError":
                raise OSError(28, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "64 vs 0\nNo space left on device")
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(train_state.torch, "save", save)
    with pytest.raises(CheckpointError) as err:
        tr.train()
    ckdir = tmp_path / "a" / "run" / "checkpoints"
    why = ("No space left on device" if how == "OSError" else
           "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    assert str(err.value) == (f"could not write checkpoint {ckdir / '0000004.pt'}: {why}. "
                              f"The newest complete checkpoint is {ckdir / '0000002.pt'}")
    assert sorted(p.name for p in ckdir.iterdir()) == ["0000002.json", "0000002.pt"]
