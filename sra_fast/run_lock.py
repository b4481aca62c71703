"""One job per run folder: rank 0 holds an advisory lock on RUN/.lock while it trains.

Two jobs in one run folder (the same command launched twice, a requeued job while its
predecessor still runs) would both write checkpoints, and the second would cut the first's
metrics.jsonl back to its own start step. The lock is flock(2): the kernel, or the NFS
server, drops it when its process ends, however it ends (SIGKILL included), so a killed job
leaves nothing stale behind. A lock held from another host is waited for (a predecessor
still shutting down; an NFS lock outliving a dead client until its lease expires); one held
by a live process on this host is refused at once. A file system without flock (Lustre
mounted without -o flock) gets a warning, not a refusal.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:   # not POSIX
    fcntl = None

LOCK_NAME = ".lock"
LOCK_WAIT_S = 300.0   # how long a lock held from another host is waited for
POLL_S = 5.0

# run folder (resolved) -> the open descriptor holding its lock. Per process and re-entrant:
# a process that builds several trainers on one folder (tests, a notebook) holds it once.
_held: dict[str, int] = {}


class RunFolderBusy(RuntimeError):
    """Another job holds the run folder."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _read_holder(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):   # gone, or the holder is between truncate and write
        return None


def _describe(rec: dict | None) -> str:
    if not rec:
        return "another process (it has not said which)"
    job = f", SLURM job {rec['job']}" if rec.get("job") else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{job}, since {rec.get('since')}"


def _alive_here(rec: dict | None) -> bool:
    """The holder is a live process on this host: it will not let go soon."""
    if not rec or rec.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(rec.get("pid")), 0)
    except PermissionError:
        return True
    except (ProcessLookupError, TypeError, ValueError, OverflowError):
        return False
    return True


def lock_run_folder(run_dir, wait_s: float | None = None, poll_s: float | None = None,
                    say=None) -> str | None:
    """Lock `run_dir` (which exists) for this process until it ends. Returns None when held,
    or a warning line when this file system cannot lock (the run goes on unguarded). Raises
    RunFolderBusy, one line naming the holder, when another job keeps it."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    poll_s = POLL_S if poll_s is None else poll_s
    key = os.path.realpath(run_dir)
    if key in _held:
        return None
    if fcntl is None:
        return f"warning: cannot lock {run_dir} on this system; nothing stops a second job there"
    path = Path(run_dir) / LOCK_NAME
    try:   # 0o666 less the umask, like the run's other files: a group's shared folder stays
        # lockable by each member (close-on-exec, PEP 446; forks: _close_in_child)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:   # made by someone else without write access for us: reading
        fd = os.open(path, os.O_RDONLY)   # is enough for flock (the holder record stays)
    deadline, said = time.monotonic() + wait_s, False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:   # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without flock
                os.close(fd)
                return (f"warning: cannot lock {run_dir} ({e.strerror or e}; a file system "
                        "without flock); nothing stops a second job there")
            rec = _read_holder(path)
            busy = (f"{run_dir} is in use by another job ({_describe(rec)}); let it end, or "
                    "choose another --exp-name")
            if _alive_here(rec):
                raise RunFolderBusy(busy)
            if time.monotonic() >= deadline:
                raise RunFolderBusy(
                    f"{busy} (waited {wait_s / 60:.0f} min; if no job runs there any more, it "
                    f"is a lock a dead node left on NFS: remove {path})")
            if not said and say is not None:
                say(f"{run_dir} is locked by {_describe(rec)}; waiting up to "
                    f"{wait_s / 60:.0f} min for it to end")
                said = True
            time.sleep(poll_s)
    except BaseException:   # busy, or interrupted while waiting
        os.close(fd)
        raise
    try:   # who holds it, for the message another job gets
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
    except OSError:
        pass
    _held[key] = fd
    return None


def _close_in_child() -> None:
    """A forked child (a data-loader worker) shares the lock's open file, and flock holds
    until every descriptor of it is closed: a worker outliving a killed trainer (stuck on a
    stalled file system) would keep the folder locked. Its copies go at once."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def unlock_run_folder(run_dir) -> None:
    """Let go of the folder's lock now (the process's end does it otherwise)."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)   # closing the descriptor drops the flock
