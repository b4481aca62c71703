"""Stop every rank within seconds when one rank fails with a clean error.

Under NCCL, a rank that catches an error (a full disk, a bad shard), prints it and exits
leaves the other ranks blocked inside a collective until the process-group timeout (30 min
by default): torchrun kills only the workers of the failing node, and srun without
--kill-on-bad-exit kills nobody. So the failing rank announces its failure in the rendezvous
store (the TCPStore behind MASTER_ADDR:MASTER_PORT), and every other rank runs a watcher
thread that polls for that key and ends its own process (os._exit: its main thread is stuck
inside a C call that no Python exception can interrupt).

    watch = PeerFailureWatch(env).start()       # after init_distributed
    ...
    except SomeError as e:
        say(f"error: {e}"); watch.announce(str(e)); return 2
    ...
    watch.stop()                                # normal end, before the final barrier

A rank that dies without calling announce (a segfault, SIGKILL, the store host crashing) is
not detected: a store that vanishes is also what a normal end looks like from a rank still
running, and a false kill is worse than the timeout.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import uuid

import torch.distributed as dist

from .distributed import DistEnv, broadcast_object, stderr_line


class PeerFailureWatch:
    def __init__(self, env: DistEnv, poll_s: float = 2.0, ack_wait_s: float = 5.0,
                 exit_fn=os._exit, store_timeout_s: float = 30.0):
        self.env = env
        # bounds connecting our client (the store is up: init_distributed just used it, so
        # this only matters for a wrong address) and each store operation
        self.store_timeout = datetime.timedelta(seconds=store_timeout_s)
        self.poll_s = float(poll_s)
        self.ack_wait_s = float(ack_wait_s)
        self.exit_fn = exit_fn
        self.store = None
        self.thread: threading.Thread | None = None
        self._wake = threading.Event()     # set by stop(): the thread leaves at once
        self._lock = threading.Lock()      # orders "a peer failed -> exit" against announce
        self._stopped = False    # by stop(), announce() or the watcher itself: never fire
        # replaced in start() by a token per launch; this is for a world without a process
        # group (the in-process tests)
        self._set_keys("attempt" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def _set_keys(self, launch: str) -> None:
        prefix = f"sra_fast/peer_failure/{launch}/"
        self.msg_key = prefix + "msg"         # "RANK MESSAGE" of the first announcer
        self.failed_key = prefix + "failed"   # how many ranks announced
        self.ack_key = prefix + "acks"        # how many watchers read msg_key

    @property
    def active(self) -> bool:
        return self.thread is not None and not self._stopped

    def _warn(self, why: str) -> None:
        stderr_line(f"(rank {self.env.rank}) [sra-fast] warning: peer-failure watch off: {why}")

    def start(self) -> "PeerFailureWatch":
        """Call on every rank right after init_distributed (it runs one broadcast)."""
        if not self.env.distributed or self.store is not None or self._stopped:
            return self
        # One key namespace per launch: torchrun's agent store outlives a worker restart, and
        # a failure announced by the previous attempt must not kill the restarted workers.
        # TORCHELASTIC_RESTART_COUNT cannot name the attempt: each node's agent counts only
        # its own workers' failures, so the nodes of one attempt may disagree on it. Rank 0
        # draws a token instead (first, so every rank takes part whatever happens below).
        if dist.is_available() and dist.is_initialized():
            try:
                self._set_keys(broadcast_object(uuid.uuid4().hex[:16] if self.env.is_main
                                                else None, self.env))
            except Exception as e:
                self._warn(f"no launch token: {' '.join(str(e).split())[:300]}")
                return self
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            self._warn("MASTER_ADDR/MASTER_PORT are not set, so other ranks' failures are not "
                       "seen here until the process-group timeout")
            return self
        try:
            # Our own client, not the process group's store: one client runs one operation at
            # a time (c10d's activeOpLock_), and the process group's own store traffic must
            # never queue behind our polling (or our polling behind its blocking waits).
            self.store = dist.TCPStore(addr, int(port), is_master=False,
                                       wait_for_workers=False, timeout=self.store_timeout)
        except Exception as e:   # never fail a run over its safety net
            self._warn(f"cannot connect to the rendezvous store {addr}:{port}: "
                       f"{' '.join(str(e).split())[:300]}")
            self.store = None
            return self
        self.thread = threading.Thread(target=self._watch, name="sra-fast-peer-watch",
                                       daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        store = self.store
        while not self._wake.wait(self.poll_s):
            try:
                failed = store.check([self.msg_key])
            except Exception as e:
                # The store host is gone or unreachable. After stop() that is a normal end;
                # otherwise we cannot tell a normal end from a crash: warn, never kill.
                if not self._stopped:
                    self._warn(f"lost the rendezvous store ({' '.join(str(e).split())[:200]})")
                return
            if failed:
                break
        else:
            return   # stop() or announce()
        who, msg = "?", "(its message could not be read)"
        try:
            who, _, msg = store.get(self.msg_key).decode(errors="replace").partition(" ")
            # counted only after the read: the announcer (maybe the store host) waits for
            # these before it exits
            store.add(self.ack_key, 1)
        except Exception:
            pass   # the key was seen: stop anyway
        with self._lock:
            # announce() got here first: this rank is failing too and reports its own error
            if self._stopped:
                return
            self._stopped = True
            stderr_line(f"(rank {self.env.rank}) [sra-fast] stopping: rank {who} failed: {msg}")
            try:
                sys.stdout.flush()   # os._exit skips it
            except Exception:
                pass
            self.exit_fn(1)

    def stop(self) -> None:
        """Normal end: stop watching. Call it on every rank before the final barrier, so the
        store host leaving afterwards is not mistaken for anything. Idempotent."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._join()

    def _join(self) -> None:
        # a daemon thread still running when the interpreter finalises can abort the process
        # ("terminate called without an active exception", status 134 instead of ours); at
        # most one store round trip is in flight, bounded in case the store hangs
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2.0)

    def announce(self, msg: str) -> None:
        """This rank is failing with `msg` (one line): tell the other ranks, then wait (at
        most ack_wait_s) until they have read it, since this process may host the store
        (rank 0 under env://). Call it after printing the error, before exiting. Never
        raises. A no-op unless start() connected, or after stop()/announce()."""
        with self._lock:
            if self.store is None or self._stopped:
                return
            # first, so our own watcher never kills us while we report our own error
            self._stopped = True
        self._wake.set()
        self._join()
        store = self.store
        try:
            line = " ".join(str(msg).split()) or "(no message)"
            # the first announcer's message wins: set only if the key does not exist yet
            store.compare_set(self.msg_key, "", f"{self.env.rank} {line}")
            store.add(self.failed_key, 1)
            deadline = time.monotonic() + self.ack_wait_s
            while True:
                # every other rank either acked (read the message) or failed itself
                done = store.add(self.ack_key, 0) + store.add(self.failed_key, 0)
                if done >= self.env.world_size or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except Exception:
            pass   # called on an error path: the caller's own error is what matters
