"""sra_fast.peer_watch: when one rank fails with a clean error and announces it, the other
ranks (stuck in a collective; here: asleep for 120 s) stop within seconds. Two gloo
processes launched directly (env://, rank 0 hosts the store) and under torchrun (the agent
hosts it), plus in-process checks of the thread against a store of our own."""
import datetime
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from sra_fast.distributed import DistEnv
from sra_fast.peer_watch import PeerFailureWatch, StartupFailureWatch
from trainer_fixtures import REPO, finish_procs, srun_like_procs, subprocess_env

WORKER = Path(__file__).resolve().parent / "peer_watch_worker.py"
FAIL_WORKER = Path(__file__).resolve().parent / "ddp_fail_worker.py"
TRAIN_ARGS = ["--exp-name", "run", "--batch-size", "8", "--max-steps", "4", "--sample-every",
              "0", "--kernels", "ref", "--attn", "math", "--device", "cpu", "--num-workers",
              "0", "--ckpt-every", "100", "--log-every", "1", "--sample-num-steps", "2"]


def _train_tasks(mode, tmp_path, *extra, world=2, timeout=100):
    """ddp_fail_worker.py MODE as `world` srun-style tasks (one: a plain process), to the
    end: (return codes, outputs, seconds); killed whatever happens."""
    args = [FAIL_WORKER, mode, "--out-dir", tmp_path, *TRAIN_ARGS, *extra]
    procs = srun_like_procs(args, world) if world > 1 else [
        subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    return finish_procs(procs, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, world=2, lost_after_s=None):
    """`world` ranks of the worker, env:// on a free port; returns their Popen objects."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = subprocess_env()
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if lost_after_s is not None:
            env["PEER_LOST_S"] = str(lost_after_s)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.timeout(150)
@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_stops_the_others_within_seconds(failing):
    """failing=0: the announcer hosts the store and must outlive the other's read of it."""
    other = 1 - failing
    rc, outs, took = finish_procs(_launch("fail", failing), timeout=90)   # the sleeper: 120 s
    msg = "\n---\n".join(outs)
    # one namespace per launch, drawn by rank 0 (not the restart count, which can differ
    # between the nodes of one attempt), the same on both ranks
    keys = [re.search(r"key (\S+)", o).group(1) for o in outs]
    assert keys[0] == keys[1] and re.fullmatch(r"sra_fast/peer_failure/[0-9a-f]{16}/msg",
                                               keys[0]), msg
    assert rc[failing] == 2, msg
    assert rc[other] == 1, msg
    assert f"(rank {other}) [sra-fast] stopping: rank {failing} failed: disk full on /ckpt" \
        in outs[other], msg
    assert "woke up" not in outs[other] and "stopping" not in outs[failing], msg
    assert took < 60, msg   # (bounds loose for a busy CI machine: the point is < 120 s)


@pytest.mark.timeout(60)
def test_a_normal_end_kills_nobody():
    """stop() on both, barrier, rank 0 (the store host) leaves at once: rank 1, still
    running without a store, is neither killed nor warned."""
    rc, outs, _ = finish_procs(_launch("normal"), timeout=30)
    msg = "\n---\n".join(outs)
    assert rc == [0, 0], msg
    assert all("(rank %d) done" % r in outs[r] for r in (0, 1)), msg
    assert "stopping" not in msg and "warning" not in msg, msg


@pytest.mark.timeout(60)
def test_ranks_failing_at_once_each_report_their_own_error():
    """Each announce stops its own watcher first: both exit with their own code 2, neither
    is stopped for the other; each waits at most ack_wait_s (5 s) for the other's count."""
    rc, outs, _ = finish_procs(_launch("both"), timeout=30)
    msg = "\n---\n".join(outs)
    assert rc == [2, 2], msg
    assert all("(rank %d) announced" % r in outs[r] for r in (0, 1)), msg
    assert "stopping" not in msg, msg
    # both counted themselves failed: neither waited out ack_wait_s (5 s) for an ack
    for r in (0, 1):
        waited = float(outs[r].split("announced in ")[1].split()[0])
        assert waited < 4, msg


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world,silent", [(2, 1), (3, 2), (2, 0)])
def test_a_rank_killed_without_a_word_stops_the_others_after_lost_after_s(world, silent):
    """SIGKILL (the OOM killer, a segfault, a lost node): the rank before it in the ring
    notices its count standing still for lost_after_s (2 s) and announces it; the others
    (rank 0 when 3 ranks run) learn it from the store. silent=0 under env:// is the store's
    host: the others find the store gone for lost_after_s instead."""
    rc, outs, took = finish_procs(_launch("vanish", silent, world=world, lost_after_s=2), 90)
    msg = "\n---\n".join(outs)
    assert rc[silent] == -9, msg
    for r in set(range(world)) - {silent}:
        assert rc[r] == 1 and "woke up" not in outs[r], msg
        if silent == 0:
            assert re.search(rf"\(rank {r}\) \[sra-fast\] stopping: the rendezvous store "
                             r"\S+ has not answered for \d+ s: its host", outs[r]), msg
        else:
            assert re.search(rf"\(rank {r}\) \[sra-fast\] stopping: rank {silent} failed: "
                             rf"no sign of life for \d+ s \(killed, crashed or its node lost; "
                             rf"rank {silent - 1} noticed\)", outs[r]), msg
    assert took < 60, msg   # the sleepers' 120 s


@pytest.mark.timeout(150)
def test_busy_or_suspended_ranks_are_not_taken_for_dead():
    """lost_after_s=2: rank 0's main thread sleeps and rank 1's spins in Python (taking the
    GIL from the watcher but for its switches) for 8 s, and the whole job is stopped
    (SIGSTOP, as a SLURM suspend) for 3 s meanwhile, its nodes 0.5 s apart: rank 1 stops
    first and resumes last, so rank 0 sees its count stand still for 4 s, all but 1 s of
    them while rank 0 itself was stopped, which a watcher does not count. Both end normally."""
    import signal
    procs = _launch("quiet", 8, lost_after_s=2)
    try:
        for p in procs:   # both busy
            while "busy" not in p.stdout.readline():
                pass
        time.sleep(1.0)
        for p in reversed(procs):
            p.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
        time.sleep(2.5)
        for p in procs:
            p.send_signal(signal.SIGCONT)
            time.sleep(0.5)
        rc, outs, _ = finish_procs(procs, 60)
    finally:
        for p in procs:
            p.kill()
    msg = "\n---\n".join(outs)
    assert rc == [0, 0], msg
    assert "stopping" not in msg and "warning" not in msg, msg


@pytest.mark.timeout(150)
def test_under_torchrun_the_watch_stops_the_peer_before_torchrun_would():
    """torchrun: the workers' MASTER_ADDR:PORT is the agent's store (TORCHELASTIC_USE_AGENT_
    STORE), hosted by torchrun itself. Rank 1 announces and lingers 30 s before exiting 2, so
    torchrun (which stops the other workers once one exits) cannot be what stops rank 0: the
    watch must, and rank 0's own line shows it did."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", str(WORKER), "fail", "1", "30"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=100)
    out = p.stdout + p.stderr
    assert "(rank 0) [sra-fast] stopping: rank 1 failed: disk full on /ckpt" in out, out
    assert "(rank 1) error: disk full" in out and "woke up" not in out, out
    assert out.count("stopping:") == 1, out
    assert p.returncode != 0, out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("rdzv_host", ["surviving node", "failing node"])
def test_under_multi_node_torchrun_a_rank_failing_while_starting_stops_the_other_node(
        tmp_path, rdzv_host):
    """Two torchrun agents (two "nodes", c10d rendezvous, no restarts): rank 1 finds no GPU
    for itself before the process group exists. Its agent ends only its own node; the other
    node's rank, waiting in the rendezvous for the 30-min timeout (measured: still there
    after 50 s without the startup watch), stops within seconds, told through the workers'
    store (rank 0's agent hosts it). The agents' rendezvous store is on whichever node binds
    the endpoint first (on one machine: a race, which once failed CI): when it is the failing
    node's, its end makes the other agent fail and kill rank 0; rank 1 must stay until rank
    0 has read the failure. Ranks follow the agents' pids (sorted node descriptors): the
    first agent started runs rank 0."""
    port = _free_port()
    hosts = (1, 0) if rdzv_host == "surviving node" else (0, 1)
    procs = []
    for tmp, is_host in zip((tmp_path / "a", tmp_path / "b"), hosts):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "startup-test", "--rdzv-conf",
             f"is_host={is_host}", str(FAIL_WORKER), "nogpu1", "--out-dir", str(tmp),
             *TRAIN_ARGS],
            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    rc, outs, took = finish_procs(procs, 150)
    both = "\n".join(outs)
    assert ("(rank 0) [sra-fast] stopping: rank 1 failed while starting: error: LOCAL_RANK 0 "
            "but only 0 GPUs are visible on this node") in both, both[-3000:]
    assert "(rank 1) error: LOCAL_RANK 0 but only 0 GPUs" in both, both[-3000:]
    assert rc == [1, 1], both[-3000:]   # torchrun's own status for a failed node
    assert took < 60, took


# ------------------------------------------------------------------ in-process checks


def test_not_distributed_is_a_no_op():
    w = PeerFailureWatch(DistEnv(), exit_fn=lambda code: pytest.fail("exit_fn called"))
    assert w.start() is w
    assert w.thread is None and w.store is None and not w.active
    t0 = time.monotonic()
    w.announce("boom")
    w.stop()
    w.stop()
    assert time.monotonic() - t0 < 0.5


class _Exits:
    def __init__(self):
        self.codes = []
        self.called = threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.called.set()


@pytest.fixture
def store(monkeypatch):
    """A store hosted here, as rank 0 would; the watch under test plays rank 1 of 2."""
    port = _free_port()
    # only the dict holds the server: the test shuts it down by clearing it
    box = {"host": dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=10))}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    yield box
    box.clear()


def _watch(exits, **kw):
    return PeerFailureWatch(DistEnv(rank=1, world_size=2), poll_s=0.05, exit_fn=exits,
                            **kw).start()


def _no_verdict_while_progressing_then_exit_1(w, exits):
    """For 2 s this rank makes progress: no verdict; then it stalls: exit 1 after about
    lost_after_s (1 s)."""
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        w.mark_progress()
        assert not exits.called.wait(0.05)
    t0 = time.monotonic()
    assert exits.called.wait(10)
    took = time.monotonic() - t0
    assert exits.codes == [1] and 0.9 < took < 8, took


def test_the_watcher_reads_the_failure_acks_it_and_exits_1(store, capsys):
    exits = _Exits()
    w = _watch(exits)
    assert w.active
    time.sleep(0.2)
    assert not exits.called.is_set()
    store["host"].compare_set(w.msg_key, "", "0 disk full on /ckpt")
    assert exits.called.wait(5)
    assert exits.codes == [1]
    assert store["host"].add(w.ack_key, 0) == 1      # read before the announcer may leave
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "(rank 1) [sra-fast] stopping: rank 0 failed: disk full on /ckpt" in err
    w.stop()


def test_announce_publishes_first_message_and_waits_for_acks(store):
    exits = _Exits()
    w = _watch(exits, ack_wait_s=0.5)
    store["host"].compare_set(w.msg_key, "", "3 an earlier failure")   # another rank first
    t0 = time.monotonic()
    w.announce("disk full\non /ckpt")
    took = time.monotonic() - t0
    assert store["host"].get(w.msg_key) == b"3 an earlier failure"    # first one wins
    assert store["host"].add(w.failed_key, 0) == 1
    assert 0.45 < took < 5        # 1 of 2 counted: waited out ack_wait_s
    time.sleep(0.2)
    assert not exits.called.is_set()   # its own watcher, stopped first, did not fire

    store["host"].delete_key(w.msg_key)
    w2 = _watch(exits, ack_wait_s=5)   # the other rank has now counted: no wait
    t0 = time.monotonic()
    w2.announce("second")
    assert time.monotonic() - t0 < 1
    assert store["host"].get(w2.msg_key) == b"1 second"


def test_a_failure_under_another_launchs_namespace_is_ignored(store, monkeypatch):
    """Without a process group (here) the namespace is the restart count; with one, a token
    per launch (checked by the subprocess tests)."""
    store["host"].set("sra_fast/peer_failure/attempt0/msg", "0 from attempt 0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    exits = _Exits()
    w = _watch(exits)
    assert w.msg_key == "sra_fast/peer_failure/attempt1/msg"
    assert not exits.called.wait(0.5)
    w.stop()
    assert not w.thread.is_alive()


def test_without_liveness_a_lost_store_is_a_warning_and_announce_never_raises(store, capsys):
    """lost_after_s=0: only announced failures count; the store going away turns the watch
    off with a warning (a normal end and a crash look alike from here)."""
    exits = _Exits()
    w = _watch(exits, ack_wait_s=0.5, lost_after_s=0)
    w2 = _watch(exits, ack_wait_s=0.5, lost_after_s=0)
    time.sleep(0.1)
    store.clear()   # the store host goes away
    w.thread.join(5)
    assert not w.thread.is_alive()    # ended on the store error...
    assert not exits.called.is_set()  # ...without killing
    err = capsys.readouterr().err
    assert "(rank 1) [sra-fast] warning: peer-failure watch off: lost the rendezvous store" \
        in err
    t0 = time.monotonic()
    w.announce("disk full")           # the store is gone: swallowed
    w2.announce("disk full")
    assert time.monotonic() - t0 < 2
    w.stop()


def test_a_store_gone_for_lost_after_s_stops_the_rank(store, capfd):
    """The store's host (rank 0 under env://) died without a word while this rank still
    watches: one warning, then, once this rank has also made no progress for lost_after_s,
    one line and exit 1; retrying the connection prints no C++ stack at each poll."""
    exits = _Exits()
    w = _watch(exits, lost_after_s=1.0)
    time.sleep(0.2)
    store.clear()
    _no_verdict_while_progressing_then_exit_1(w, exits)   # lost_after_s 1 s
    err = capfd.readouterr().err
    port = w.address[1]
    assert err.count(f"(rank 1) [sra-fast] warning: the rendezvous store 127.0.0.1:{port} "
                     "does not answer") == 1, err
    assert re.search(rf"\(rank 1\) \[sra-fast\] stopping: the rendezvous store "
                     rf"127\.0\.0\.1:{port} has not answered for \d+ s: its host \(rank 0, or "
                     r"the launcher of the first node\) is gone", err), err
    assert "retrying (try=" not in err, err   # c10d's connect retries, a stack each
    w.stop()


def test_a_store_back_within_lost_after_s_is_used_again(store, capsys):
    """A brief outage: the watch reconnects, says so, and still sees a failure announced
    on the store afterwards."""
    exits = _Exits()
    w = _watch(exits, lost_after_s=20)
    time.sleep(0.2)
    host, port = w.address
    store.clear()
    time.sleep(0.5)
    store["host"] = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=10))
    deadline = time.monotonic() + 10
    while "answers again" not in capsys.readouterr().err:
        assert time.monotonic() < deadline, "never reconnected"
        time.sleep(0.1)
    assert not exits.called.is_set()
    store["host"].compare_set(w.msg_key, "", "0 disk full on /ckpt")
    assert exits.called.wait(5) and exits.codes == [1]
    assert "stopping: rank 0 failed: disk full on /ckpt" in capsys.readouterr().err
    w.stop()


def _beat(host, key, every_s, until):
    while not until.is_set():
        host.add(key, 1)
        until.wait(every_s)


def test_a_silent_next_rank_is_announced_as_failed(store, capsys):
    """The watch (rank 1 of 2) reads rank 0's count: started, then silent for lost_after_s
    (SIGKILLed, say) while this rank made no progress for as long either. It announces rank
    0 as failed for every other rank, counted as two failures (rank 0 and itself, who ack
    nothing), and stops its own process."""
    exits = _Exits()
    w = _watch(exits, lost_after_s=0.6)
    host = store["host"]
    assert host.add(w.alive_key(1), 0) == 1          # counted in start(), before any poll
    stopped = threading.Event()
    beats = threading.Thread(target=_beat, args=(host, w.alive_key(0), 0.1, stopped))
    beats.start()
    try:
        assert not exits.called.wait(1.5)            # rank 0 shows signs of life
    finally:
        stopped.set()
        beats.join()
    assert host.add(w.alive_key(1), 0) > 10          # and so does the watch itself
    # rank 0 falls silent, but this rank still makes progress (its watcher, not rank 0,
    # could be the one cut off): no verdict while it does
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        w.mark_progress()
        assert not exits.called.wait(0.05)
    t0 = time.monotonic()
    assert exits.called.wait(5)                      # this rank stalled too
    assert exits.codes == [1] and time.monotonic() - t0 > 0.5
    msg = host.get(w.msg_key).decode()
    assert re.fullmatch(r"0 no sign of life for \d+ s \(killed, crashed or its node lost; "
                        r"rank 1 noticed\)", msg), msg
    assert host.add(w.failed_key, 0) == 2
    err = capsys.readouterr().err
    assert "(rank 1) [sra-fast] stopping: rank 0 failed: " + msg[2:] in err, err
    w.stop()


@pytest.mark.parametrize("case", ["never-started", "stopped-watching"])
def test_a_next_rank_without_a_watch_is_never_taken_for_dead(store, case):
    """A rank whose watch never started (no count) or that stopped watching (its normal
    end, marked by stop()) is silent by right."""
    exits = _Exits()
    w = _watch(exits, lost_after_s=0.3)
    if case == "stopped-watching":
        other = PeerFailureWatch(DistEnv(rank=0, world_size=2), poll_s=0.05,
                                 exit_fn=exits, lost_after_s=0.3).start()
        time.sleep(0.2)
        other.stop()
        assert store["host"].check([w.off_key(0)])
        assert store["host"].add(w.alive_key(0), 0) >= 1
    assert not exits.called.wait(1.5), store["host"].get(w.msg_key)
    assert not store["host"].check([w.msg_key])
    w.stop()


def test_a_rank_whose_watch_never_started_is_skipped_in_the_ring(store, capsys):
    """Rank 1 of 3 reads rank 2, whose watch never started: after lost_after_s it warns and
    reads rank 0 instead, whose silence it then announces (rank 0 would otherwise go
    unwatched: its only watcher is rank 2)."""
    exits = _Exits()
    w = PeerFailureWatch(DistEnv(rank=1, world_size=3), poll_s=0.05, exit_fn=exits,
                         lost_after_s=0.6, ack_wait_s=0.2).start()   # nobody acks here
    host = store["host"]
    stopped = threading.Event()
    beats = threading.Thread(target=_beat, args=(host, w.alive_key(0), 0.1, stopped))
    beats.start()
    try:
        deadline = time.monotonic() + 5
        while "never started" not in (err := capsys.readouterr().err):
            assert time.monotonic() < deadline, err
            time.sleep(0.05)
        assert ("(rank 1) [sra-fast] warning: rank 2's peer watch never started: it is not "
                "watched, rank 1 watches the rank after it") in err
        assert not exits.called.wait(1.0)          # rank 0 shows signs of life
    finally:
        stopped.set()
        beats.join()
    assert exits.called.wait(5)                    # then falls silent
    msg = host.get(w.msg_key).decode()
    assert msg.startswith("0 no sign of life for "), msg
    w.stop()


def test_no_store_to_connect_to_is_a_warning_not_an_error(monkeypatch, capsys):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    exits = _Exits()
    w = _watch(exits)
    assert not w.active and w.store is None
    assert "MASTER_ADDR/MASTER_PORT are not set" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))   # nobody listens
    w = _watch(exits, store_timeout_s=0.5)
    assert not w.active and w.store is None
    assert "cannot connect to the rendezvous store" in capsys.readouterr().err
    w.announce("x")
    w.stop()


def _startup_watch(monkeypatch, rank, world, **kw):
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))   # nobody listens yet
    return StartupFailureWatch(poll_s=0.05, **kw).start()


def test_the_startup_watch_of_one_process_is_a_no_op(monkeypatch):
    exits = _Exits()
    w = _startup_watch(monkeypatch, 0, 1, exit_fn=exits)
    assert w.thread is None
    t = time.monotonic()
    w.announce("error: x")   # no store, nobody to tell: returns at once
    assert time.monotonic() - t < 1 and not exits.codes
    w.stop()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_startup_announcement_waits_at_most_its_wait_for_a_store_or_readers(monkeypatch,
                                                                             capsys, rank):
    """Rank 1 finds no store (rank 0 not started yet) and tries for wait_s; rank 0 hosts one
    and waits as long for a reader who never comes; a short wait (Ctrl-C, which reached
    every rank) overrides the watch's, and both say what they wait for."""
    w = _startup_watch(monkeypatch, rank, 2, wait_s=60.0, exit_fn=_Exits())
    t = time.monotonic()
    w.announce("interrupted (Ctrl-C)", wait_s=1.0)
    took = time.monotonic() - t
    err = capsys.readouterr().err
    assert 0.9 < took < 5, took
    if rank == 1:
        assert "does not answer yet: trying for up to 1 s to tell the other ranks" in err, err
    else:
        assert "hosts the rendezvous store: waiting up to 1 s for the other ranks" in err, err


def test_the_startup_watch_stops_with_its_client_and_sits_out_torchrun_restarts(store,
                                                                                monkeypatch):
    """stop() ends the thread and drops its store client (not kept for the whole run); under
    torchrun with restarts (whose agents' store outlives them, with no attempt number common
    to all nodes) there is no startup watch: the agents restart every node's workers."""
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    w = StartupFailureWatch(poll_s=0.05, exit_fn=_Exits()).start()
    t_end = time.monotonic() + 5
    while w.store is None and time.monotonic() < t_end:
        time.sleep(0.02)
    assert w.store is not None and w.thread.is_alive()
    w.stop()
    assert not w.thread.is_alive() and w.store is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert StartupFailureWatch(poll_s=0.05).start().thread is None


def test_a_failing_rank_not_hosting_the_store_stays_until_read_at_most_ack_wait_s(
        store, monkeypatch, capsys):
    """Rank 1 of 2 fails while starting; the store is not its own (rank 0's, or torchrun's
    agents'). It stays until rank 0 has read the failure (its exit may end the agent that
    hosts the rendezvous store: rank 0 would be killed before it could say why), and no
    longer than ack_wait_s when nobody reads it; quietly, the store is not its to keep."""
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    host = store["host"]
    w = StartupFailureWatch(poll_s=0.05, ack_wait_s=1.0, exit_fn=_Exits()).start()
    t0 = time.monotonic()
    w.announce("error: no GPU for rank 1")   # nobody reads it
    took = time.monotonic() - t0
    assert 0.9 < took < 5, took
    assert host.get(w.msg_key) == b"1 error: no GPU for rank 1"
    assert host.add(w.failed_key, 0) == 1 and "waiting" not in capsys.readouterr().err

    for key in (w.msg_key, w.ack_key, w.failed_key):
        host.delete_key(key)
    w = StartupFailureWatch(poll_s=0.05, ack_wait_s=30.0, exit_fn=_Exits()).start()
    reader = threading.Timer(0.5, lambda: host.add(w.ack_key, 1))   # rank 0's watcher
    reader.start()
    t0 = time.monotonic()
    w.announce("error: no GPU for rank 1")
    took = time.monotonic() - t0
    reader.join()
    assert 0.4 < took < 5, took   # left once read, not after 30 s


def test_a_store_host_that_saw_a_failure_and_then_fails_itself_still_waits(store,
                                                                         monkeypatch):
    """Rank 0 of 3 hosts the store; its watcher reads rank 1's startup failure and waits for
    rank 2 to read it too; meanwhile rank 0's own start fails: its announce() must not return
    (and the process leave with the store) before the watcher is done."""
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    exits = _Exits()
    w = StartupFailureWatch(poll_s=0.05, wait_s=1.5, exit_fn=exits).start()
    host = store["host"]
    host.set(w.msg_key, "1 error: no GPU for rank 1")
    host.add(w.failed_key, 1)
    t_end = time.monotonic() + 5
    while host.add(w.ack_key, 0) < 1 and time.monotonic() < t_end:   # rank 0's watcher read it
        time.sleep(0.02)
    assert host.add(w.ack_key, 0) == 1 and not exits.called.is_set()
    t0 = time.monotonic()
    w.announce("error: no GPU for rank 0 either")
    assert exits.called.is_set() and exits.codes == [1]   # the watcher finished first
    assert time.monotonic() - t0 > 1.0
    assert host.get(w.msg_key) == b"1 error: no GPU for rank 1"


def test_a_watcher_waiting_for_acks_of_its_verdict_is_not_cut_short_by_announce(store):
    """Rank 1 of 3 announced silent rank 2 and waits (ack_wait_s) for rank 0 to read it;
    its own main thread fails meanwhile: announce() waits for the watcher instead of leaving
    (this rank may host the store) and counts nothing twice."""
    exits = _Exits()
    w = PeerFailureWatch(DistEnv(rank=1, world_size=3), poll_s=0.05, exit_fn=exits,
                         lost_after_s=0.3, ack_wait_s=1.5).start()
    host = store["host"]
    host.add(w.alive_key(2), 1)   # rank 2 started watching, then fell silent
    t_end = time.monotonic() + 5
    while not host.check([w.msg_key]) and time.monotonic() < t_end:
        time.sleep(0.02)
    assert host.check([w.msg_key]) and not exits.called.is_set()
    w.announce("error: mine")
    assert exits.called.is_set() and exits.codes == [1]
    assert host.get(w.msg_key).decode().startswith("2 no sign of life")
    assert host.add(w.failed_key, 0) == 2
    w.stop()


@pytest.mark.timeout(300)
def test_a_training_rank_that_fails_stops_a_rank_stuck_in_a_collective(tmp_path):
    """Through the trainer's main(), as tasks of an srun step (nobody else would end them):
    rank 1's clean error at step 2 ends rank 0, stuck there, within seconds, saying why."""
    rc, outs, took = _train_tasks("fails", tmp_path)
    assert rc == [1, 2], "\n".join(o[-2000:] for o in outs)
    assert "(rank 0) stuck" in outs[0] and "woke up" not in outs[0]
    assert ("(rank 0) [sra-fast] stopping: rank 1 failed: error: shard 7 of the latents is "
            "unreadable") in outs[0], outs[0][-2000:]
    assert "(rank 1) error: shard 7 of the latents is unreadable" in outs[1]
    assert took < 60, took   # the sleep was 120 s


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["nogpu1", "nogpu0", "pgfail2", "pgfail0"])
def test_a_rank_failing_while_starting_stops_the_others_in_the_rendezvous(tmp_path, mode):
    """Through main() as 3 srun tasks: one rank fails before the process group exists (no GPU
    for it; rank 0 then never creates the store the others wait for) or while creating it;
    the others, waiting in the rendezvous for the 30-min timeout, stop within seconds saying
    why (exit 1), and the failing rank says its own error (exit 2)."""
    failing = int(mode[-1])
    rc, outs, took = _train_tasks(mode, tmp_path, world=3)
    both = "\n".join(o[-2000:] for o in outs)
    error = (f"error: LOCAL_RANK {failing} but only 0 GPUs" if mode.startswith("nogpu") else
             "error: NCCL error: unhandled system error (a stand-in)")
    assert rc == [2 if r == failing else 1 for r in range(3)], both
    prefix = f"(rank {failing}) " if failing else ""
    assert f"{prefix}{error}" in outs[failing], both
    for r in set(range(3)) - {failing}:
        assert (f"(rank {r}) [sra-fast] stopping: rank {failing} failed while starting: "
                f"{error}") in outs[r], both
    assert took < 60, took   # the rendezvous waits 30 min


@pytest.mark.timeout(300)
@pytest.mark.parametrize("killed", [1, 0])
def test_a_training_rank_killed_without_a_word_stops_the_other(tmp_path, killed):
    """Through main() as srun tasks, --peer-lost-min 2 s: rank `killed` is SIGKILLed at step
    2 while the other is stuck there; the other stops with the reason and exit 1 (rank 0
    hosts the store: its death is seen as the store gone)."""
    rc, outs, took = _train_tasks(f"killed{killed}", tmp_path, "--peer-lost-min",
                                  str(2 / 60))
    other = 1 - killed
    both = "\n".join(o[-2000:] for o in outs)
    assert rc[killed] == -9 and rc[other] == 1, both
    assert f"(rank {other}) stuck" in outs[other] and "woke up" not in outs[other], both
    why = (r"rank 1 failed: no sign of life for \d+ s \(killed, crashed or its node lost; rank "
           r"0 noticed\)") if killed == 1 else r"the rendezvous store \S+ has not answered"
    assert re.search(rf"\(rank {other}\) \[sra-fast\] stopping: {why}", outs[other]), both
    assert took < 60, took   # the sleep was 120 s


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2])
def test_a_step_that_hangs_ends_the_run_with_status_4(tmp_path, world):
    """--hang-exit-min: a step that never ends (a lost peer under --cuda-graph has no NCCL
    timeout) ends the process with every thread's stack, one line and status 4; under two
    processes the hung rank 1 tells rank 0 (waiting for it), which stops at once."""
    rc, outs, took = _train_tasks("hangs", tmp_path, "--hang-exit-min", str(1.5 / 60),
                                  "--hang-report-min", "0", world=world)
    hung = outs[-1]
    assert rc[-1] == 4, "\n".join(o[-3000:] for o in outs)
    assert "stuck" in hung and "woke up" not in hung
    assert "in failing_step" in hung and "Thread 0x" in hung   # every thread's stack
    who = "(rank 1) " if world > 1 else ""
    lines = [ln for ln in hung.splitlines() if ln.startswith(f"{who}[sra-fast] no step finished")]
    assert len(lines) == 1 and lines[0].endswith(
        " min (--hang-exit-min 0.025; stacks above): stopping at step 2 with exit status 4; "
        "continue with --resume auto from the newest checkpoint"), hung[-2000:]
    if world > 1:   # rank 0's own limit is 15 s: the watch stopped it
        assert rc[0] == 1, outs[0][-3000:]
        assert "(rank 0) [sra-fast] stopping: rank 1 failed: [sra-fast] no step finished" \
            in outs[0], outs[0][-3000:]
    assert took < 60, took   # the sleep was 120 s


@pytest.mark.timeout(300)
def test_slow_steps_a_slow_first_step_and_a_suspend_are_no_hang(tmp_path):
    """The limit counts from the last step's end (steps of 1.2 x, 0.2 x and 0.2 x the limit,
    1.6 x in all, never trip it), the first step gets 3 x, and the seconds the process spends
    stopped (SIGSTOP for 7 s, as a SLURM suspend, against a 5 s limit) do not count. Room for
    a machine loaded 2x: a 3 s limit with 0.4 x steps failed here once, the last step's
    window (its work, the checkpoint and the end's grid) taking over 3 s."""
    import signal
    p = subprocess.Popen([sys.executable, str(FAIL_WORKER), "slow", "--out-dir", tmp_path,
                          *TRAIN_ARGS, "--hang-exit-min", str(5.0 / 60), "--hang-report-min",
                          "0"], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for ln in p.stdout:
            seen.append(ln)
            if ln.startswith("step 2"):   # inside step 2's work: stop the process for 7 s
                time.sleep(0.2)
                p.send_signal(signal.SIGSTOP)
                time.sleep(7.0)
                p.send_signal(signal.SIGCONT)
                break
        out = "".join(seen) + p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    assert "step 3" in out and "no step finished" not in out, out[-3000:]


@pytest.mark.timeout(300)
def test_a_rank_failing_after_the_last_collective_stops_the_one_at_the_final_barrier(tmp_path):
    """main() meets at its final barrier with the watch still on: rank 0, done, is stopped
    there by rank 1's failure (not left to the process-group timeout), saying why."""
    rc, outs, _ = _train_tasks("late", tmp_path, timeout=150)
    assert rc == [1, 2], "\n".join(o[-3000:] for o in outs)
    assert ("(rank 0) [sra-fast] stopping: rank 1 failed: error: a failure after the last "
            "collective") in outs[0], outs[0][-3000:]


@pytest.mark.timeout(300)
def test_a_normal_two_rank_end_through_main_is_quiet(tmp_path):
    """The watch on, then off at the final barriers: both ranks exit 0, and rank 0 (the
    store's host under srun) leaving first costs rank 1 no warning."""
    rc, outs, _ = _train_tasks("none", tmp_path, timeout=150)
    both = "\n".join(o[-3000:] for o in outs)
    assert rc == [0, 0], both
    assert "[sra-fast] done: step 4" in outs[0]
    assert "stopping" not in both and "peer-failure watch" not in both, both


def test_each_finished_step_is_progress_for_the_watch():
    """The trainer marks progress at every step's end (silences are judged only while a rank
    makes none)."""
    from types import SimpleNamespace

    from sra_fast.trainer import Trainer
    marks = []
    fake = SimpleNamespace(_hang_s=0.0, peer_watch=SimpleNamespace(
        mark_progress=lambda: marks.append(1)))
    Trainer._step_done(fake)
    Trainer._step_done(fake, first=True)
    assert marks == [1, 1]
    Trainer._step_done(SimpleNamespace(_hang_s=0.0, peer_watch=None))   # a single process


_FROZEN_HOST = """
import datetime, sys, time
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False,
                  timeout=datetime.timedelta(seconds=60))
print("up", flush=True)
time.sleep(600)
"""


@pytest.fixture
def frozen_store(monkeypatch):
    """A store hosted by another process, which the test freezes (SIGSTOP: a hung node, a
    host held by a debugger): its connections stay open, and no request gets an answer."""
    import signal
    port = _free_port()
    host = subprocess.Popen([sys.executable, "-c", _FROZEN_HOST, str(port)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
        yield lambda: host.send_signal(signal.SIGSTOP)
    finally:   # the blocked requests of the watches end with the host
        host.send_signal(signal.SIGCONT)
        host.kill()
        host.wait()


@pytest.mark.timeout(120)
def test_a_frozen_store_host_stops_the_rank_and_never_blocks_announce_or_stop(frozen_store,
                                                                             capfd):
    """Against a frozen store host c10d's requests wait with no deadline. The deadline thread
    ends the rank once a request has waited lost_after_s while the rank made no progress
    either (none while it does); announce() and stop() give up on the store in seconds."""
    exits = _Exits()
    w = _watch(exits, lost_after_s=1.0)
    other_exits = _Exits()
    announcer = _watch(other_exits, lost_after_s=0, ack_wait_s=0.5)   # no deadline thread
    stopper = _watch(other_exits, lost_after_s=30)
    time.sleep(0.3)
    assert w.active and announcer.active and stopper.active
    frozen_store()
    _no_verdict_while_progressing_then_exit_1(w, exits)   # lost_after_s 1 s
    err = capfd.readouterr().err
    assert re.search(rf"\(rank 1\) \[sra-fast\] stopping: the rendezvous store "
                     rf"127\.0\.0\.1:{w.address[1]} has not answered a request for \d+ s: its "
                     r"host \(rank 0, or the launcher of the first node\) is frozen or cut off",
                     err), err
    assert err.count("stopping") == 1, err

    t0 = time.monotonic()
    announcer.announce("disk full")   # its watcher is stuck in a request: bounded
    stopper.stop()
    assert time.monotonic() - t0 < 20
    assert not other_exits.called.is_set()
    w.stop()


def test_a_rank_that_acks_and_then_fails_is_counted_once(store):
    """The watcher claims the last word before it acks: announce() afterwards (this rank's
    main thread failing too) neither counts it a second time nor outlives the verdict."""
    exits = _Exits()
    w = _watch(exits, ack_wait_s=0.3)
    host = store["host"]

    class AnnounceWhileAcking:   # this rank's main thread fails right as its watcher acks
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def add(self, key, n):
            if key == w.ack_key:
                w.announce("a failure of my own")
            return self.inner.add(key, n)
    w.store = AnnounceWhileAcking(w.store)
    host.compare_set(w.msg_key, "", "0 disk full")
    assert exits.called.wait(5)
    assert host.add(w.ack_key, 0) + host.add(w.failed_key, 0) == 1
    assert host.get(w.msg_key) == b"0 disk full"
    w.stop()


_GIL_HELD_EXIT = """
import fcntl, os, sys, threading
from types import SimpleNamespace
from sra_fast.trainer import Trainer

# fill stderr's pipe (nobody reads it): the next write blocks, as on a stalled file system
fl = fcntl.fcntl(2, fcntl.F_GETFL)
fcntl.fcntl(2, fcntl.F_SETFL, fl | os.O_NONBLOCK)
try:
    while True:
        os.write(2, b"x" * 4096)
except BlockingIOError:
    pass
fcntl.fcntl(2, fcntl.F_SETFL, fl)
print("full", flush=True)
fake = SimpleNamespace(HANG_EXIT_GRACE_S=0.5, cfg=SimpleNamespace(hang_exit_min=1.0), step=3,
                       peer_watch=None, _hang_file=sys.stderr, main=True,
                       env=SimpleNamespace(distributed=False))
t = threading.Thread(target=Trainer._hang_exit, args=(fake, 90.0))   # as the watch thread
t.start()
t.join()
"""


@pytest.mark.timeout(120)
def test_the_hang_exit_ends_even_when_its_stack_dump_blocks_holding_the_gil():
    """faulthandler's dump holds the GIL while its write blocks (stderr on a stalled file
    system), so the backstop timer thread cannot run: the kernel's alarm ends the process."""
    import signal
    p = subprocess.Popen([sys.executable, "-c", _GIL_HELD_EXIT], cwd=REPO,
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "full"
        t0 = time.monotonic()
        rc = p.wait(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert rc == -signal.SIGALRM and time.monotonic() - t0 < 30, rc


_LINGERING = """
import atexit, datetime, os, signal, sys, threading, time
import torch.distributed as dist
from sra_fast.peer_watch import exit_if_store_requests_linger
port, host_pid, marker, linger = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                  timeout=datetime.timedelta(seconds=30))
c.set("k", "v")
if linger == "1":
    os.kill(host_pid, signal.SIGSTOP)   # frozen: the watcher's request gets no answer
    while open(f"/proc/{host_pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)   # (the signal takes effect when the host is next scheduled)
    threading.Thread(target=lambda: c.get("k"), name="sra-fast-peer-watch",
                     daemon=True).start()
    time.sleep(0.3)

def at_exit():
    open(marker, "w").close()
    os.kill(host_pid, signal.SIGCONT)   # the answer comes while the interpreter ends
atexit.register(at_exit)
print("ending", flush=True)
exit_if_store_requests_linger(7)
sys.exit(5)
"""


@pytest.mark.timeout(120)
def test_a_store_request_still_waiting_at_the_end_cannot_turn_the_status_into_an_abort(
        tmp_path):
    """A watcher thread still inside a request to a frozen store when the command ends: the
    process ends at once with its own status (7 here) and flushed output. Left to the
    interpreter's end, the answer arriving meanwhile aborted it (134) in most runs. Without
    such a thread the end is the normal one (atexit handlers run, status 5)."""
    import signal
    for linger in ("1", "1", "1", "0"):
        port = _free_port()
        host = subprocess.Popen([sys.executable, "-c", _FROZEN_HOST, str(port)], cwd=REPO,
                                env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        try:
            assert host.stdout.readline().strip() == "up"
            marker = tmp_path / f"atexit-{linger}"
            p = subprocess.run([sys.executable, "-c", _LINGERING, str(port), str(host.pid),
                                str(marker), linger], cwd=REPO, env=subprocess_env(),
                               capture_output=True, text=True, timeout=60)
        finally:
            host.send_signal(signal.SIGCONT)
            host.kill()
            host.wait()
        assert p.stdout == "ending\n", (p.returncode, p.stdout, p.stderr)
        if linger == "1":
            assert p.returncode == 7 and not marker.exists(), (p.returncode, p.stderr)
        else:
            assert p.returncode == 5 and marker.exists(), (p.returncode, p.stderr)
