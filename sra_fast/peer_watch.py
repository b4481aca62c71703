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
watcher before it; a rank whose watch never started is skipped, with a warning). A counter
that has not moved for `lost_after_s`, while this rank has made no progress (mark_progress)
for as long either, makes that neighbour announce the silent rank as failed. Both
conditions, because each alone has innocent causes: a dead rank blocks the next collective,
so every live rank stalls; but a watcher thread can also be starved (a C call holding the
GIL) or cut from the store (a network partition the NCCL fabric does not share) while its
rank trains on, and a long checkpoint stalls everyone. A process
stopped as a whole (a debugger holding it) looks dead. A watcher whose own process did not
run for a while (a SLURM suspend of the whole job) does not count that time. The store's
host dying is the same event seen from the other side (rank 0 under env://, the first
node's launcher under torchrun): a store that refuses connections for `lost_after_s` while
this rank stalls ends it too; shorter outages reconnect. A host that is frozen or cut off
without closing its connections makes c10d's store operations wait with no deadline: a
second thread, which never touches the store, stops the rank when one of the watcher's
requests has gone unanswered for as long (again only while this rank stalls), and
announce() and stop() give up on the store after a few seconds.

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
import random
import socket
import sys
import threading
import time
import uuid

import torch.distributed as dist

from .distributed import (DistEnv, broadcast_object, env_ranks, launched_by_srun,
                          srun_rendezvous, stderr_line)


def _one_line(text, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _bounded(fn, timeout_s: float) -> bool:
    """Run fn on a daemon thread for at most timeout_s: c10d's store operations against a
    frozen host have no deadline. True if it returned (exceptions are swallowed)."""
    def run():
        try:
            fn()
        except Exception:
            pass
    t = threading.Thread(target=run, name="sra-fast-peer-watch-store", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


# the threads that may sit inside a c10d store request (no deadline against a frozen host)
_STORE_THREADS = ("sra-fast-peer-watch", "sra-fast-peer-watch-store", "sra-fast-startup-watch")


def exit_if_store_requests_linger(status: int) -> None:
    """At a command's very end: when one of our threads is still inside a store request (a
    store host that stopped answering; stop() and announce() gave up on it), end the process
    now with `status`. Left to the interpreter's finalisation, a request answered meanwhile
    wakes its thread inside C++ just as the interpreter ends such threads, which aborts the
    process (status 134, "terminate called without an active exception") and hides ours.
    Skips atexit handlers, so only then."""
    if any(t.name in _STORE_THREADS and t.is_alive() for t in threading.enumerate()):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(status)


def _say(line: str) -> None:
    # never let a failed write (EPIPE, a full disk) end the watcher thread: its rank's count
    # would stop, and its neighbour would take it for dead
    try:
        stderr_line(line)
    except Exception:
        pass


class PeerFailureWatch:
    def __init__(self, env: DistEnv, poll_s: float = 2.0, ack_wait_s: float = 5.0,
                 exit_fn=os._exit, store_timeout_s: float = 30.0,
                 lost_after_s: float = 180.0):
        self.env = env
        # bounds connecting our client (the store is up: init_distributed just used it, so
        # this only matters for a wrong address) and get(); c10d's add/check/set wait for a
        # store that stops answering without closing (a host held stopped) with no deadline
        self.store_timeout = datetime.timedelta(seconds=store_timeout_s)
        # a limit of a few polls would take one late poll for death
        self.poll_s = min(float(poll_s), lost_after_s / 10) if lost_after_s > 0 else float(
            poll_s)
        self.ack_wait_s = float(ack_wait_s)
        # silence (of the next rank, or of the store) after which the run is stopped; 0: only
        # announced failures count, and a lost store turns the watch off
        self.lost_after_s = float(lost_after_s)
        self.exit_fn = exit_fn
        # when this rank last made progress (mark_progress: a step, a batch); a silence is
        # judged only while this rank makes none either: a dead rank blocks the next
        # collective, while a healthy run whose watcher threads merely lost the store for a
        # while (a network partition that NCCL's fabric does not share) goes on training
        self._progress_t = time.monotonic()
        self.store = None
        self.address = None                # (host, port) of the store, once start() found it
        self.thread: threading.Thread | None = None
        # since when the watcher's current store request waits (None: none in flight); read
        # by the deadline thread, which never touches the store itself
        self._op_since: float | None = None
        self._deadline_thread: threading.Thread | None = None
        self._wake = threading.Event()     # set by stop(): the thread leaves at once
        self._lock = threading.Lock()      # orders "a peer failed -> exit" against announce
        self._stopped = False    # by stop(), announce() or the watcher itself: never fire
        # the thread (watcher or deadline) that is ending the process, once one is
        self._verdict: threading.Thread | None = None
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

    def mark_progress(self) -> None:
        """This rank finished a unit of work (a training step, a sampling batch)."""
        self._progress_t = time.monotonic()

    @property
    def active(self) -> bool:
        return self.thread is not None and not self._stopped

    def _warn(self, why: str) -> None:
        _say(f"(rank {self.env.rank}) [sra-fast] warning: peer-failure watch off: {why}")

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
        if self.lost_after_s > 0:
            self._deadline_thread = threading.Thread(
                target=self._deadline_watch, name="sra-fast-peer-watch-deadline", daemon=True)
            self._deadline_thread.start()
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
            stalled = now - self._progress_t >= self.lost_after_s
            self._op_since = now
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
                        elif count > 0 and now - next_seen >= self.lost_after_s and stalled:
                            if store.check([self.off_key(nxt)]):
                                next_off = True
                            else:
                                lost = (nxt, now - next_seen)
                        elif count == 0 and now - next_seen >= self.lost_after_s:
                            # its watch never started (it could not reach the store): it
                            # cannot be judged, but the ranks after it must not go unwatched
                            _say(f"(rank {rank}) [sra-fast] warning: rank {nxt}'s peer watch "
                                 f"never started: it is not watched, rank {rank} watches the "
                                 "rank after it")
                            nxt = (nxt + 1) % world
                            next_count, next_seen = 0, now
                            watch_next = nxt != rank
            except Exception as e:
                self._op_since = None
                if self._stopped:
                    return   # after stop(): the store's host may have left normally
                if self.lost_after_s <= 0:
                    # we cannot tell a normal end from a crash here: warn, never kill
                    self._warn(f"lost the rendezvous store ({_one_line(e, 200)})")
                    return
                self.store = None
                if store_lost_since is None:
                    store_lost_since = now
                    _say(f"(rank {rank}) [sra-fast] warning: the rendezvous store "
                         f"{self.address[0]}:{self.address[1]} does not answer "
                         f"({_one_line(e, 200)}); retrying")
                elif now - store_lost_since >= self.lost_after_s and stalled:
                    self._stop_process(
                        f"the rendezvous store {self.address[0]}:{self.address[1]} has not "
                        f"answered for {now - store_lost_since:.0f} s: its host (rank 0, or "
                        f"the launcher of the first node) is gone, so the run cannot go on")
                    return
                continue
            self._op_since = None
            if store_lost_since is not None:
                store_lost_since = None
                next_seen = now   # the next rank may not have reconnected yet
                _say(f"(rank {rank}) [sra-fast] the rendezvous store answers again")
            if failed or lost:
                break
        # the last word, before any store write: announce() meanwhile must not count this
        # rank a second time (an ack, then a failure), and stop() meanwhile wins
        if not self._claim(verdict=True):
            return
        # the writes below can block on a store that stops answering: exit regardless
        backstop = self._backstop(self.ack_wait_s + 10.0)
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
        self._exit(f"rank {who} failed: {msg}", backstop)

    def _claim(self, verdict: bool = False) -> bool:
        """Take the last word; False if stop(), announce() or a verdict already has it."""
        with self._lock:
            if self._stopped:
                return False
            self._stopped = True
            if verdict:
                self._verdict = threading.current_thread()
            return True

    def _backstop(self, after_s: float) -> threading.Timer:
        timer = threading.Timer(after_s, self.exit_fn, (1,))
        timer.daemon = True
        timer.start()
        return timer

    def _stop_process(self, why: str) -> None:
        # announce() got here first: this rank is failing too and reports its own error
        if self._claim(verdict=True):
            self._exit(why, self._backstop(10.0))

    def _exit(self, why: str, backstop: threading.Timer) -> None:
        # the line may sit on a stalled file system (or fail): the backstop exits regardless
        _say(f"(rank {self.env.rank}) [sra-fast] stopping: {why}")
        try:
            sys.stdout.flush()   # os._exit skips it
        except Exception:
            pass
        self.exit_fn(1)
        backstop.cancel()   # only reached when exit_fn returns (the tests')

    def _deadline_watch(self) -> None:
        """A store host frozen (SIGSTOP, a hung node) or cut off without closing its
        connections leaves the watcher inside one store request for good. This thread never
        touches the store: it ends the rank once that request has waited lost_after_s while
        this rank made no progress for as long."""
        last = floor = time.monotonic()
        while not self._wake.wait(self.poll_s):
            now = time.monotonic()
            if now - last > 4 * self.poll_s + 1.0:
                floor = now   # this process did not run meanwhile (a suspend): not counted
            last = now
            since = self._op_since
            if since is None:
                continue
            waited = now - max(since, floor)
            if waited >= self.lost_after_s and now - self._progress_t >= self.lost_after_s:
                host, port = self.address
                self._stop_process(
                    f"the rendezvous store {host}:{port} has not answered a request for "
                    f"{waited:.0f} s: its host (rank 0, or the launcher of the first node) is "
                    f"frozen or cut off, so the run cannot go on")
                return

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
        was_stopped = not self._claim()
        self._wake.set()
        self._join()
        store = self.store
        if not was_stopped and store is not None and self.lost_after_s > 0:
            # the previous rank's watcher must not take the silence that follows for death;
            # bounded: a frozen store host must not keep this rank from its normal end
            _bounded(lambda: store.set(self.off_key(self.env.rank), "1"), 5.0)

    def _join(self) -> None:
        # a daemon thread still running when the interpreter finalises can abort the process
        # ("terminate called without an active exception", status 134 instead of ours); at
        # most one store round trip (or a brief reconnect) is in flight; the wait is bounded
        # in case the store hangs (its op is not)
        for t in (self._deadline_thread, self.thread):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=2.0)

    def announce(self, msg: str) -> None:
        """This rank is failing with `msg` (one line): tell the other ranks, then wait (at
        most ack_wait_s) until they have read it, since this process may host the store
        (rank 0 under env://). Call it after printing the error, before exiting. Never
        raises. A no-op unless start() connected, or after stop()/announce(); after a verdict
        of the watcher's (another rank failed or fell silent), it lets the watcher end the
        process instead."""
        with self._lock:
            if self.thread is None or (self._stopped and self._verdict is None):
                return
            verdict = self._verdict
            # first, so our own watcher never kills us while we report our own error
            self._stopped = True
        if verdict is not None:
            # the watcher is ending this process over another rank's failure (and may be
            # waiting for acks, as the store's host): let it, rather than leave first
            if verdict is not threading.current_thread():
                try:
                    verdict.join(timeout=self.ack_wait_s + 15.0)
                except KeyboardInterrupt:
                    pass
            return
        self._wake.set()
        self._join()
        line = " ".join(str(msg).split()) or "(no message)"

        def publish():
            store = self.store
            if store is None or self.thread.is_alive():
                # lost and not reconnected yet, or busy: the watcher is still inside a request
                # (one client runs one at a time)
                store = self._connect(datetime.timedelta(seconds=2.0))
            # the first announcer's message wins: set only if the key does not exist yet
            store.compare_set(self.msg_key, "", f"{self.env.rank} {line}")
            store.add(self.failed_key, 1)
            self._wait_for_acks(store)
        # called on an error path: the caller's own error is what matters, so never raise,
        # and never wait past the acks for a store that stopped answering
        _bounded(publish, self.ack_wait_s + 5.0)


class StartupFailureWatch:
    """The same, for the time before the process group exists (PeerFailureWatch needs it):
    a rank that fails while starting (no GPU for its LOCAL_RANK, an error creating the
    process group, Ctrl-C) leaves the others in the rendezvous or in NCCL's setup, which wait
    for it up to the process-group timeout (30 min) and no Python exception interrupts.

    Every rank polls the rendezvous store (MASTER_ADDR:MASTER_PORT) for a startup-failure
    key from its first moment, with its own client that connects once the store's host has
    created it. A failing rank sets that key; when it is itself the store's host to be (rank
    0 under env:// and srun, which fails before or while creating the store) it hosts one for
    the announcement and stays, at most wait_s, until every other rank has read it (they may
    start minutes later). A watcher that hosts the store does the same before it exits. Any
    other failing rank stays at most ack_wait_s for the reads: under torchrun its exit ends
    its node's agent, which may host the agents' rendezvous store (the c10d backend puts it
    on whichever node binds the endpoint first); the other agents then fail at their next
    sync and kill their workers, which without the wait had not yet polled and stopped
    without a word of why.

        startup = StartupFailureWatch().start()    # before init_distributed
        env = init_distributed(...)                # on failure: startup.announce(msg)
        watch = PeerFailureWatch(env).start()
        startup.stop()                             # both watch the start's one collective
    """

    def __init__(self, wait_s: float = 180.0, poll_s: float = 1.0, ack_wait_s: float = 5.0,
                 exit_fn=os._exit):
        for name, v in (("wait_s", wait_s), ("ack_wait_s", ack_wait_s)):
            if not 0 <= v < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        self.wait_s = float(wait_s)
        self.ack_wait_s = float(ack_wait_s)
        self.poll_s = float(poll_s)
        self.exit_fn = exit_fn
        self.rank, self.world = 0, 1
        self.address = None
        self.store = None
        self.thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._verdict = False   # the watcher saw a failure: it ends the process
        # The store lives as long as its host (rank 0 under env:// and srun: this launch), or
        # as torchrun's agents, whose store outlives their restarts (see start())
        prefix = "sra_fast/startup_failure/"
        self.msg_key, self.ack_key, self.failed_key = (prefix + "msg", prefix + "acks",
                                                       prefix + "failed")

    @property
    def hosts_store(self) -> bool:
        """This process hosts the store: rank 0, unless torchrun's agent does."""
        return self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"

    def start(self) -> "StartupFailureWatch":
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
            # torchrun with restarts: a rank failing while starting makes its agent restart,
            # and every other node's agent restarts its workers with it. The agents' store
            # outlives the restarts, and no attempt number is common to all nodes (an agent
            # counts only its own failures), so an old announcement could not be told apart
            return self
        try:
            self.rank, self.world = env_ranks()[:2]
            if launched_by_srun():
                srun_rendezvous()   # init_distributed does it too: same values
            if self.world > 1:
                self.address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        except (KeyError, ValueError, RuntimeError):
            # init_distributed says what is wrong with the launch, on every rank alike
            self.world = 1
        if self.world > 1:
            self.thread = threading.Thread(target=self._watch, daemon=True,
                                           name="sra-fast-startup-watch")
            self.thread.start()
        return self

    def _client(self):
        # a plain connect first: c10d's own retries print a C++ stack each time (the store
        # does not exist until its host creates it)
        socket.create_connection(self.address, timeout=2.0).close()
        return dist.TCPStore(*self.address, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=5))

    def _watch(self) -> None:
        # the first poll spread over a poll interval: at thousands of ranks, the moment the
        # store's host creates it, every rank's process-group client connects too
        first = self.poll_s * (0.5 + random.random())
        while not self._wake.wait(first if first else self.poll_s):
            first = 0.0
            try:
                if self.store is None:
                    client = self._client()
                    if self._wake.is_set():
                        return   # stop() meanwhile: not kept for the whole run
                    self.store = client
                if not self.store.check([self.msg_key]):
                    continue
            except Exception:
                self.store = None   # not created yet, or gone: try again
                continue
            with self._lock:
                if self._stopped:
                    return
                self._stopped = self._verdict = True
            # a store host frozen mid-write must not keep this rank from exiting
            backstop = threading.Timer(self.wait_s + 10.0, self.exit_fn, (1,))
            backstop.daemon = True
            backstop.start()
            who, msg = "?", "(its message could not be read)"
            try:
                who, _, msg = self.store.get(self.msg_key).decode(
                    errors="replace").partition(" ")
            except Exception:
                pass
            try:   # read or not, counted: the store's host waits for every rank's ack
                self.store.add(self.ack_key, 1)
            except Exception:
                pass
            _say(f"(rank {self.rank}) [sra-fast] stopping: rank {who} failed while "
                 f"starting: {msg}")
            if self.hosts_store:
                self._wait_for_the_others(self.store, self.wait_s)
            try:
                sys.stdout.flush()
            except Exception:
                pass
            self.exit_fn(1)
            backstop.cancel()   # only reached when exit_fn returns (the tests')
            return

    def _wait_for_the_others(self, store, wait_s: float, quiet: bool = False) -> None:
        """Stay until every other rank has read the failure (acked, or failed itself), at
        most wait_s; as the store's host (not quiet), saying so once."""
        deadline = time.monotonic() + wait_s
        said = quiet
        try:
            while store.add(self.ack_key, 0) + store.add(self.failed_key, 0) < self.world:
                if time.monotonic() >= deadline:
                    return
                if not said:
                    _say(f"(rank {self.rank}) [sra-fast] this rank hosts the rendezvous "
                         f"store: waiting up to {wait_s:.0f} s for the other ranks to "
                         "read the failure")
                    said = True
                time.sleep(0.1)
        except Exception:
            pass

    def stop(self) -> None:
        """The process group exists and PeerFailureWatch has taken over. Idempotent."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2.0)   # at most one store round trip in flight
        self.store = None

    def announce(self, msg: str, wait_s: float | None = None) -> None:
        """This rank failed while starting with `msg` (one line): tell the others, trying
        for at most wait_s (default: the watch's) to reach a store not created yet and, as
        its host, waiting as long for them to read it; a short wait_s where every rank failed
        alike (Ctrl-C reaches them all). Call it after printing the error. Never raises (a
        second Ctrl-C ends the wait); a no-op for one process or after stop(); once the
        watcher has seen another rank's failure, it lets the watcher end the process."""
        with self._lock:
            if self.thread is None or (self._stopped and not self._verdict):
                return
            verdict = self._verdict
            self._stopped = True
        wait_s = self.wait_s if wait_s is None else float(wait_s)
        if verdict:
            # another rank failed first and the watcher is ending this process; as the
            # store's host it waits for the others to read that: so must this thread
            try:
                self.thread.join(timeout=self.wait_s + 10.0)
            except KeyboardInterrupt:
                pass
            return
        self._wake.set()
        self.thread.join(timeout=2.0)
        line = " ".join(str(msg).split()) or "(no message)"
        deadline = time.monotonic() + wait_s

        def publish():
            store, said = None, False
            while store is None:
                if self.hosts_store:
                    # the store's host to be: nobody else would create it. multi_tenant: the
                    # process group's own server, if this rank got that far, is reused
                    try:
                        store = dist.TCPStore(*self.address, world_size=self.world,
                                              is_master=True, wait_for_workers=False,
                                              multi_tenant=True,
                                              timeout=datetime.timedelta(seconds=5))
                        break
                    except Exception:
                        pass
                try:
                    store = self._client()
                except Exception:
                    if time.monotonic() >= deadline:
                        _say(f"(rank {self.rank}) [sra-fast] gave up: the rendezvous store "
                             "never answered, the other ranks were not told")
                        return
                    if not said:
                        _say(f"(rank {self.rank}) [sra-fast] the rendezvous store "
                             f"{self.address[0]}:{self.address[1]} does not answer yet: "
                             f"trying for up to {wait_s:.0f} s to tell the other ranks")
                        said = True
                    time.sleep(1.0)
            store.compare_set(self.msg_key, "", f"{self.rank} {line}")
            store.add(self.failed_key, 1)
            if self.hosts_store:
                self._wait_for_the_others(store, wait_s)
            else:   # see the class's comment: torchrun's agents
                self._wait_for_the_others(store, min(self.ack_wait_s,
                                                     max(0.0, deadline - time.monotonic())),
                                          quiet=True)
        try:
            _bounded(publish, wait_s + 10.0)
        except KeyboardInterrupt:
            pass
