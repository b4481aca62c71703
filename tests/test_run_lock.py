"""One job per run folder (sra_fast.run_lock): a second job is refused at once when the holder
lives on this host, waits for one on another host, and a killed holder leaves no stale lock.
Holders are other processes (a process's own lock is re-entrant)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sra_fast import run_lock
from sra_fast.run_lock import RunFolderBusy, lock_run_folder, unlock_run_folder
from trainer_fixtures import REPO, make_released_latents, run_cli, subprocess_env

HOLDER = textwrap.dedent("""
    import sys, time
    from sra_fast import run_lock
    if sys.argv[2] != "-":   # pretend to live on another host
        run_lock.socket.gethostname = lambda: sys.argv[2]
    run_lock.lock_run_folder(sys.argv[1], wait_s=0)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


@pytest.fixture
def holder(tmp_path):
    """holder(folder, host="-", hold_s=60): a process that locks `folder` and keeps it."""
    procs = []

    def start(folder, host="-", hold_s=60.0):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), host, str(hold_s)],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held", p.stderr.read()
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_live_holder_on_this_host_is_refused_at_once_and_named(tmp_path, holder):
    p = holder(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RunFolderBusy) as e:
        lock_run_folder(tmp_path, wait_s=60, poll_s=0.1)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"{tmp_path} is in use by another job (pid {p.pid} on " in msg
    assert "choose another --exp-name" in msg and "\n" not in msg
    rec = json.loads((tmp_path / ".lock").read_text())
    assert rec["pid"] == p.pid


def test_a_holder_on_another_host_is_waited_for(tmp_path, holder):
    holder(tmp_path, host="elsewhere", hold_s=60)
    said = []
    t0 = time.monotonic()
    with pytest.raises(RunFolderBusy, match=r"on elsewhere.*\(waited 0 min; if no job runs "
                       r"there any more, it is a lock a dead node left on NFS: remove .*\.lock\)"):
        lock_run_folder(tmp_path, wait_s=1.0, poll_s=0.1, say=said.append)
    assert time.monotonic() - t0 >= 1.0
    assert len(said) == 1 and "waiting up to" in said[0] and "on elsewhere" in said[0]
    # one that ends while we wait: we get the folder
    (tmp_path / "b").mkdir()
    holder(tmp_path / "b", host="elsewhere", hold_s=1.5)
    t0 = time.monotonic()
    try:
        assert lock_run_folder(tmp_path / "b", wait_s=30, poll_s=0.1) is None
        assert 0.5 < time.monotonic() - t0 < 20
    finally:
        unlock_run_folder(tmp_path / "b")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    p = holder(tmp_path, host="elsewhere")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert lock_run_folder(tmp_path, wait_s=0) is None
    try:
        rec = json.loads((tmp_path / ".lock").read_text())
        assert rec["pid"] == os.getpid()   # now says who holds it
    finally:
        unlock_run_folder(tmp_path)


def test_reentrant_in_a_process_and_unlock_frees_it(tmp_path, holder):
    assert lock_run_folder(tmp_path, wait_s=0) is None
    assert lock_run_folder(tmp_path, wait_s=0) is None   # a second trainer on one folder
    p = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "-", "0"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "RunFolderBusy" in p.stderr
    unlock_run_folder(tmp_path)
    p = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "-", "0"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch):
    class NoFlock:
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd, op):
            raise OSError(38, "Function not implemented")
    monkeypatch.setattr(run_lock, "fcntl", NoFlock)
    note = lock_run_folder(tmp_path)
    assert note.startswith(f"warning: cannot lock {tmp_path} (Function not implemented")
    assert "nothing stops a second job there" in note


@pytest.mark.timeout(300)
def test_a_second_training_job_in_a_busy_run_folder_stops_with_one_line(tmp_path, holder):
    """Through train.py: the job refuses before it reads or writes anything there (the
    holder's metrics.jsonl and checkpoints stay as they are)."""
    data = make_released_latents(tmp_path / "data", n=16, num_classes=2)
    run = tmp_path / "runs" / "e1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    p0 = holder(run)
    p = run_cli([REPO / "train.py", "--data-dir", data, "--model", "SiT-T/2", "--batch-size",
                 "4", "--max-steps", "2", "--out-dir", tmp_path / "runs", "--exp-name", "e1",
                 "--sample-every", "0", "--vae", "none", "--num-workers", "0", "--kernels",
                 "ref", "--precision", "fp32", "--resume", "auto"], cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == [f"error: {run} is in use by another job (pid {p0.pid} on "
                     f"{run_lock.socket.gethostname()}, since "
                     f"{json.loads((run / '.lock').read_text())['since']}); let it end, or "
                     "choose another --exp-name"], lines
    assert (run / "metrics.jsonl").read_text() == '{"step": 5}\n'
    assert not (run / "config.json").exists()


@pytest.mark.timeout(300)
def test_every_rank_stops_when_rank_0_cannot_lock(tmp_path, holder):
    """Rank 0 takes the lock before any rank reads the folder; when it cannot, rank 1 stops
    too, saying why (instead of training alone or waiting in a collective)."""
    run = tmp_path / "two" / "run"
    run.mkdir(parents=True)
    holder(run)
    p = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 REPO / "tests" / "ddp_worker.py", tmp_path / "two", 8, 2], cwd=REPO,
                check=False, timeout=240)
    assert p.returncode != 0
    assert "RunError: rank 0 could not start: " in p.stderr, p.stderr[-3000:]
    assert p.stderr.count(f"{run} is in use by another job") == 2
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()


FORKING_HOLDER = textwrap.dedent("""
    import os, sys, time
    from sra_fast import run_lock
    run_lock.lock_run_folder(sys.argv[1], wait_s=0)
    child = os.fork()   # as a data-loader worker is forked
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
""")


def test_a_forked_child_keeps_no_share_of_the_lock(tmp_path):
    """flock holds while any descriptor of the open file lives, and a fork copies them: a
    data-loader worker outliving a killed trainer would keep the folder locked."""
    p = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], cwd=REPO,
                         env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        with pytest.raises(RunFolderBusy):
            lock_run_folder(tmp_path, wait_s=0)
        p.kill()
        p.wait()
        os.kill(child, 0)   # the child lives on
        assert lock_run_folder(tmp_path, wait_s=0) is None
    finally:
        unlock_run_folder(tmp_path)
        p.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_lock_file_takes_the_umask_like_the_runs_other_files(tmp_path):
    """A group's shared folder (umask 002) stays lockable by each member."""
    old = os.umask(0o002)
    try:
        lock_run_folder(tmp_path, wait_s=0)
    finally:
        os.umask(old)
        unlock_run_folder(tmp_path)
    assert (tmp_path / ".lock").stat().st_mode & 0o777 == 0o664
