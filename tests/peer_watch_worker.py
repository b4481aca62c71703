"""One rank of tests/test_peer_watch.py (gloo, 2 processes, started by the test or torchrun).

    peer_watch_worker.py fail K [LINGER]  rank K announces "disk full on /ckpt" and exits 2
                                          (after LINGER s); the others sleep 120 s, standing
                                          for ranks stuck inside a collective
    peer_watch_worker.py normal           stop(), barrier, rank 0 exits at once, rank 1 2 s later
    peer_watch_worker.py both             every rank announces at once and exits 2
    peer_watch_worker.py vanish K         rank K kills itself (SIGKILL: no word to anyone);
                                          the others sleep 120 s
    peer_watch_worker.py quiet S          no failure: for S s rank 0 sleeps and the others
                                          spin in Python (holding the GIL, bar its switches),
                                          then stop(), barrier, exit 0

PEER_LOST_S in the environment sets lost_after_s (default: the class's).
"""
import os
import signal
import sys
import time

from sra_fast.distributed import barrier, init_distributed, stderr_line
from sra_fast.peer_watch import PeerFailureWatch


def fail(env, watch, failing: int, linger: float) -> int:
    if env.rank == failing:
        stderr_line(f"(rank {env.rank}) error: disk full on /ckpt")
        watch.announce("disk full on /ckpt")
        stderr_line(f"(rank {env.rank}) announced")
        time.sleep(linger)
        # at once, no interpreter shutdown: when rank 0 fails, its store is gone right after
        # announce returns, and only announce's wait for the acks lets the peer read it
        os._exit(2)
    stderr_line(f"(rank {env.rank}) sleeping")
    time.sleep(120)
    stderr_line(f"(rank {env.rank}) woke up")
    return 0


def main() -> int:
    scenario = sys.argv[1]
    env = init_distributed("cpu")
    lost = {"lost_after_s": float(os.environ["PEER_LOST_S"])} if "PEER_LOST_S" in os.environ \
        else {}
    watch = PeerFailureWatch(env, poll_s=0.2, **lost).start()
    assert watch.active, "the watch did not start"
    stderr_line(f"(rank {env.rank}) key {watch.msg_key}")
    barrier(env)   # every watcher is polling before anyone fails
    if scenario == "fail":
        return fail(env, watch, int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0)
    if scenario == "normal":
        watch.stop()
        barrier(env)
        if env.rank == 1:
            time.sleep(2)   # rank 0 and the store it hosts are gone meanwhile
        stderr_line(f"(rank {env.rank}) done")
        return 0
    if scenario == "both":
        t0 = time.monotonic()
        watch.announce(f"rank {env.rank} disk full")
        stderr_line(f"(rank {env.rank}) announced in {time.monotonic() - t0:.2f} s")
        return 2
    if scenario == "vanish":
        if env.rank == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        stderr_line(f"(rank {env.rank}) sleeping")
        time.sleep(120)
        stderr_line(f"(rank {env.rank}) woke up")
        return 0
    if scenario == "quiet":
        stderr_line(f"(rank {env.rank}) busy")
        end = time.monotonic() + float(sys.argv[2])
        if env.rank == 0:
            time.sleep(float(sys.argv[2]))
        while time.monotonic() < end:
            pass
        watch.stop()
        barrier(env)
        stderr_line(f"(rank {env.rank}) done")
        return 0
    raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    sys.exit(main())
