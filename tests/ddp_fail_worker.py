"""Worker for tests/test_peer_watch.py: a train.py run (sra_fast.trainer.main, as the command
line runs it) in which something goes wrong at step 2. argv: MODE, then train.py's arguments.

    fails  rank 1 fails with a clean error; rank 0 hangs (a sleep standing for a rank blocked
           in an NCCL collective, which gloo on CPU would not give)
    killedK  rank K kills itself there (SIGKILL: no word to anyone); the others hang (as
           for fails)
    hangs  the last rank hangs there (a lost peer under --cuda-graph, a stalled file
           system); under several processes rank 0 gets ten times its --hang-exit-min, so
           that it is the peer watch that stops it
    none   nothing goes wrong
    late   rank 1 fails after training, past the last collective, while rank 0 goes on to
           main()'s final barrier
    slow   no hang: every step but the last works (CPU time, which stops while the process
           is stopped) 0.2 x --hang-exit-min, the first one 1.2 x (against its 3 x); room for
           a machine loaded 2x (CPU time then takes twice as long; the last step's window
           also holds the end's checkpoint and grid); each says "step N" on stderr first
    nogpuK rank K fails while starting, before the process group exists (its device pick
           says there is no GPU for it), after a 2 s delay: the others are in the rendezvous
           by then (rank 0, the store's host to be, is the one that must create it)
    pgfailK  rank K's creation of the process group fails (as an NCCL setup might), after
           its store exists (rank 0 hosts it: the others are connected to it by then)
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sra_fast import distributed, trainer  # noqa: E402
from sra_fast.data import DataError  # noqa: E402

one_step = trainer.Trainer.one_step
mode, args = sys.argv[1], sys.argv[2:]
world = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("WORLD_SIZE", "1")))
rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))   # srun; torchrun


def busy(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def failing_step(self, *a):
    if mode == "slow":
        sys.stderr.write(f"step {self.step}\n")
        sys.stderr.flush()
        limit = 60 * float(args[args.index("--hang-exit-min") + 1])
        last = int(args[args.index("--max-steps") + 1]) - 1
        if self.step < last:   # the last one's window also holds the checkpoint and grid
            busy((1.2 if self.step == 0 else 0.2) * limit)
    if self.step == 2:
        if mode == "fails" and rank == 1:
            raise DataError("shard 7 of the latents is unreadable")
        if mode == f"killed{rank}":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode in ("fails", "killed0", "killed1") or (mode == "hangs" and rank == world - 1):
            sys.stderr.write(f"(rank {rank}) stuck\n")
            sys.stderr.flush()
            time.sleep(120)
            sys.stderr.write(f"(rank {rank}) woke up\n")
    return one_step(self, *a)


if mode == "late" and rank == 1:
    train = trainer.Trainer.train

    def train_then_fail(self):
        train(self)
        raise DataError("a failure after the last collective")
    trainer.Trainer.train = train_then_fail
if mode == f"nogpu{rank}":
    def no_gpu(pref="auto", local_rank=0):
        time.sleep(2)
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only 0 GPUs are visible on this node")
    distributed.pick_device = no_gpu
if mode == f"pgfail{rank}":
    kept = []

    def pg_fails(**kw):
        import datetime
        e = os.environ
        # as torch's env:// rendezvous makes it (the others' clients connect to it), and
        # still alive when the failure is announced, as it may be
        kept.append(distributed.dist.TCPStore(
            e["MASTER_ADDR"], int(e["MASTER_PORT"]), world, rank == 0, multi_tenant=True,
            wait_for_workers=False, timeout=datetime.timedelta(seconds=60)))
        time.sleep(2)
        raise RuntimeError("NCCL error: unhandled system error (a stand-in)")
    distributed.dist.init_process_group = pg_fails
if mode == "hangs" and world > 1 and rank == 0:
    i = args.index("--hang-exit-min") + 1
    args[i] = str(10 * float(args[i]))
trainer.Trainer.one_step = failing_step
sys.exit(trainer.main(args))
