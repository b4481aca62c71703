"""Stop at a step boundary with a checkpoint when the job is told to end.

Schedulers end weeks-long runs with a signal and a grace period before SIGKILL: SLURM sends
SIGTERM at the time limit or on preemption (and SIGUSR1 ahead of it with
`--signal=USR1@SECONDS`), torchrun forwards SIGTERM to its workers, Kubernetes sends SIGTERM.
Without a handler that signal kills the process and the run loses everything since its last
checkpoint (at XL/2 and the default --ckpt-every 50,000, up to ~2 hours on every GPU).

The handler only records the signal; the trainer asks `agreed()` after each step and, when it
says stop, writes a checkpoint and exits with 128 + the signal number (what a shell reports
for a process that signal killed). Ctrl-C (SIGINT) keeps its default: it aborts without
saving.
"""
from __future__ import annotations

import signal
import threading

from .distributed import DistEnv, max_over_ranks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Under several processes, every rank must stop after the same step: they agree through one
# 1-element all-reduce and a host read every CHECK_EVERY steps (one stall of the launch queue
# per CHECK_EVERY steps; ~1 s at XL/2, well inside the usual 30 s grace).
CHECK_EVERY = 10


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: while active, STOP_SIGNALS set `received` instead of killing.

    Installs nothing (and never stops) when disabled or when not in the main thread, where
    Python cannot install signal handlers.
    """

    def __init__(self, enabled: bool = True, signals=STOP_SIGNALS, check_every: int | None = None):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signals, self.check_every = tuple(signals), check_every or CHECK_EVERY
        self.received = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.received:   # the first one names the stop; repeats change nothing
            self.received = signum

    def __enter__(self):
        if self.enabled:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()
        return False

    def agreed(self, env: DistEnv, step: int) -> int:
        """The signal every rank stops for after `step` (0: go on). One process: its own
        flag, every step, free. Several: every check_every steps, the largest signal number
        any rank received (a collective, so every rank must call this after every step)."""
        if not self.enabled:
            return 0
        if not env.distributed:
            return self.received
        if step % self.check_every:
            return 0
        return int(max_over_ranks(self.received, env))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a scheduler signals the whole process group, and a worker
    killed by it makes the main process's next batch raise before it can save. The main
    process decides; workers exit when it shuts the loader down (or dies)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
