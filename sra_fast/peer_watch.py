"""Stop every rank within seconds when one rank fails, and within minutes when one dies.

Under NCCL, a rank that catches an error (a full disk, a bad shard), prints it and exits
leaves the other ranks blocked inside a collective until the process-group timeout (30 min
by default): torchrun kills only the workers of the failing node, and srun without
--kill-on-bad-exit kills nobody. So the failing rank announces its failure in the rendezvous
store (the TCPStore behind MASTER_ADDR:MASTER_PORT), and every other rank runs a watcher
thread that polls for that key and ends its own process (os._exit: its main thread is stuck
inside a C call that no Python exception can interrupt).

A rank that dies without a word (SIGKILL from the OOM killer, a segfault, a lost node) is
found by its neighbour: every watcher bumps a counter of its own at each poll and reads the
next rank's (a ring, so each rank reads one key and every set of dead ranks has a live
watcher before it). A counter that has not moved for `lost_after_s` makes that neighbour
announce the silent rank as failed. The counter lives in the watcher thread, so a main thread
busy for hours (a long step, a checkpoint, a collective) still shows signs of life; a process
stopped as a whole (a debugger holding it, a suspend of that one rank) does not. A watcher
whose own process did not run for a while (a SLURM suspend of the whole job) does not count
that time. The store's host leaving is the same event seen from the other side (rank 0 under
env://, the first node's launcher under torchrun): a store that does not answer for
`lost_after_s` while this rank still watches ends it too. Brief store errors reconnect.

    watch = PeerFailureWatch(env).start()       # after init_distributed
    ...
    except SomeError as e:
        say(f"error: {e}"); watch.announce(str(e)); return 2
    ...
    watch.stop()                                # normal end, between two final barriers
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
import uuid

import torch.distributed as dist

from .distributed import DistEnv, broadcast_object, stderr_line


def _one_line(text, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class PeerFailureWatch:
    def __init__(self, env: DistEnv, poll_s: float = 2.0, ack_wait_s: float = 5.0,
                 exit_fn=os._exit, store_timeout_s: float = 30.0,
                 lost_after_s: float = 180.0):
        self.env = env
        # bounds connecting our client (the store is up: init_distributed just used it, so
        # this only matters for a wrong address) and each store operation
        self.store_timeout = datetime.timedelta(seconds=store_timeout_s)
        self.poll_s = float(poll_s)
        self.ack_wait_s = float(ack_wait_s)
        # silence (of the next rank, or of the store) after which the run is stopped; 0: only
        # announced failures count, and a lost store turns the watch off
        self.lost_after_s = float(lost_after_s)
        self.exit_fn = exit_fn
        self.store = None
        self.address = None                # (host, port) of the store, once start() found it
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
        self.failed_key = prefix + "failed"   # how many ranks announced (or were announced)
        self.ack_key = prefix + "acks"        # how many watchers read msg_key
        self._alive_prefix = prefix + "alive/"   # + rank: its watcher's poll count
        self._off_prefix = prefix + "off/"       # + rank: exists once it stopped watching

    def alive_key(self, rank: int) -> str:
        return f"{self._alive_prefix}{rank}"

    def off_key(self, rank: int) -> str:
        return f"{self._off_prefix}{rank}"

    @property
    def active(self) -> bool:
        return self.thread is not None and not self._stopped

    def _warn(self, why: str) -> None:
        stderr_line(f"(rank {self.env.rank}) [sra-fast] warning: peer-failure watch off: {why}")

    def _connect(self, timeout: datetime.timedelta):
        # Our own client, not the process group's store: one client runs one operation at a
        # time (c10d's activeOpLock_), and the process group's own store traffic must never
        # queue behind our polling (or our polling behind its blocking waits).
        host, port = self.address
        return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                             timeout=timeout)

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
                self._warn(f"no launch token: {_one_line(e)}")
                return self
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            self._warn("MASTER_ADDR/MASTER_PORT are not set, so other ranks' failures are not "
                       "seen here until the process-group timeout")
            return self
        self.address = (addr, int(port))
        try:
            self.store = self._connect(self.store_timeout)
            if self.lost_after_s > 0:
                # from now on the previous rank's watcher expects this count to move (a rank
                # whose watch never started is never taken for dead)
                self.store.add(self.alive_key(self.env.rank), 1)
        except Exception as e:   # never fail a run over its safety net
            self._warn(f"cannot connect to the rendezvous store {addr}:{port}: {_one_line(e)}")
            self.store = None
            return self
        self.thread = threading.Thread(target=self._watch, name="sra-fast-peer-watch",
                                       daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        rank, world = self.env.rank, self.env.world_size
        nxt = (rank + 1) % world
        watch_next = self.lost_after_s > 0 and world > 1
        next_count, next_seen = 0, time.monotonic()   # its last count, when it last moved
        next_off = False                              # it stopped watching: a normal end
        store_lost_since, lost = None, None
        last_poll = time.monotonic()
        while True:
            if self._wake.wait(self.poll_s):
                return   # stop() or announce()
            now = time.monotonic()
            gap, last_poll = now - last_poll, now
            if gap > 4 * self.poll_s + 1.0:
                # this watcher did not look for a while (the job suspended, a starved host, a
                # store answering slowly): what went unseen meanwhile is not anyone's silence
                next_seen = now
                if store_lost_since is not None:
                    store_lost_since = now
            try:
                if self.store is None:   # after a store error: a new client
                    # a plain connect first: c10d's own retries would print a C++ stack
                    # every poll for as long as the host is away
                    socket.create_connection(self.address, timeout=2.0).close()
                    self.store = self._connect(datetime.timedelta(
                        seconds=min(self.store_timeout.total_seconds(), 5.0)))
                store = self.store
                failed = store.check([self.msg_key])
                if not failed and self.lost_after_s > 0:
                    store.add(self.alive_key(rank), 1)
                    if watch_next and not next_off:
                        count = store.add(self.alive_key(nxt), 0)
                        if count != next_count:
                            next_count, next_seen = count, now
                        elif count > 0 and now - next_seen >= self.lost_after_s:
                            if store.check([self.off_key(nxt)]):
                                next_off = True
                            else:
                                lost = (nxt, now - next_seen)
            except Exception as e:
                if self._stopped:
                    return   # after stop(): the store's host may have left normally
                if self.lost_after_s <= 0:
                    # we cannot tell a normal end from a crash here: warn, never kill
                    self._warn(f"lost the rendezvous store ({_one_line(e, 200)})")
                    return
                self.store = None
                if store_lost_since is None:
                    store_lost_since = now
                    stderr_line(f"(rank {rank}) [sra-fast] warning: the rendezvous store "
                                f"{self.address[0]}:{self.address[1]} does not answer "
                                f"({_one_line(e, 200)}); retrying for {self.lost_after_s:.0f} s")
                elif now - store_lost_since >= self.lost_after_s:
                    self._stop_process(
                        f"the rendezvous store {self.address[0]}:{self.address[1]} has not "
                        f"answered for {now - store_lost_since:.0f} s: its host (rank 0, or "
                        f"the launcher of the first node) is gone, so the run cannot go on")
                    return
                continue
            if store_lost_since is not None:
                store_lost_since = None
                stderr_line(f"(rank {rank}) [sra-fast] the rendezvous store answers again")
            if failed or lost:
                break
        who, msg = "?", "(its message could not be read)"
        published = False
        try:
            if lost is not None:   # announce the silent rank as failed, unless one was first
                who = str(lost[0])
                msg = (f"no sign of life for {lost[1]:.0f} s (killed, crashed or its node "
                       f"lost; rank {rank} noticed)")
                mine = f"{who} {msg}"
                published = store.compare_set(self.msg_key, "", mine) == mine.encode()
                if published:
                    # the silent rank and this one count as failed: nobody waits for their acks
                    store.add(self.failed_key, 2)
                    self._wait_for_acks(store)
            if not published:
                who, _, msg = store.get(self.msg_key).decode(errors="replace").partition(" ")
                # counted only after the read: the announcer (maybe the store host) waits for
                # these before it exits
                store.add(self.ack_key, 1)
        except Exception:
            pass   # the key was seen (or the silence was): stop anyway
        self._stop_process(f"rank {who} failed: {msg}")

    def _stop_process(self, why: str) -> None:
        with self._lock:
            # announce() got here first: this rank is failing too and reports its own error
            if self._stopped:
                return
            self._stopped = True
            stderr_line(f"(rank {self.env.rank}) [sra-fast] stopping: {why}")
            try:
                sys.stdout.flush()   # os._exit skips it
            except Exception:
                pass
            self.exit_fn(1)

    def _wait_for_acks(self, store) -> None:
        deadline = time.monotonic() + self.ack_wait_s
        while True:
            # every other rank either acked (read the message) or failed itself
            done = store.add(self.ack_key, 0) + store.add(self.failed_key, 0)
            if done >= self.env.world_size or time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        """Normal end: stop watching. Call it on every rank between two final barriers, so
        the store host leaving afterwards is not mistaken for anything, and no rank stops
        watching while another may still fail. Idempotent."""
        with self._lock:
            was_stopped, self._stopped = self._stopped, True
        self._wake.set()
        self._join()
        store = self.store
        if not was_stopped and store is not None and self.lost_after_s > 0:
            try:   # the previous rank's watcher must not take the silence that follows for death
                store.set(self.off_key(self.env.rank), "1")
            except Exception:
                pass

    def _join(self) -> None:
        # a daemon thread still running when the interpreter finalises can abort the process
        # ("terminate called without an active exception", status 134 instead of ours); at
        # most one store round trip (or a brief reconnect) is in flight, bounded in case the
        # store hangs
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2.0)

    def announce(self, msg: str) -> None:
        """This rank is failing with `msg` (one line): tell the other ranks, then wait (at
        most ack_wait_s) until they have read it, since this process may host the store
        (rank 0 under env://). Call it after printing the error, before exiting. Never
        raises. A no-op unless start() connected, or after stop()/announce()."""
        with self._lock:
            if self.thread is None or self._stopped:
                return
            # first, so our own watcher never kills us while we report our own error
            self._stopped = True
        self._wake.set()
        self._join()
        try:
            store = self.store
            if store is None:   # the watcher lost it and had not reconnected yet
                store = self._connect(datetime.timedelta(seconds=2.0))
            line = " ".join(str(msg).split()) or "(no message)"
            # the first announcer's message wins: set only if the key does not exist yet
            store.compare_set(self.msg_key, "", f"{self.env.rank} {line}")
            store.add(self.failed_key, 1)
            self._wait_for_acks(store)
        except Exception:
            pass   # called on an error path: the caller's own error is what matters
