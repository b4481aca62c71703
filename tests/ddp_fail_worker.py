"""Worker for tests/test_peer_watch.py: one rank of a 2-process train.py run (sra_fast.trainer.
main, as the command line runs it) in which rank 1 fails with a clean error at step 2 while
rank 0 hangs there (a sleep standing for a rank blocked in an NCCL collective, which gloo on
CPU would not give). argv: OUT, then train.py's arguments."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sra_fast import trainer  # noqa: E402
from sra_fast.data import DataError  # noqa: E402

one_step = trainer.Trainer.one_step


def failing_step(self, *a):
    if self.step == 2:
        if self.env.rank == 1:
            raise DataError("shard 7 of the latents is unreadable")
        sys.stderr.write("(rank 0) stuck\n")
        sys.stderr.flush()
        time.sleep(120)
        sys.stderr.write("(rank 0) woke up\n")
    return one_step(self, *a)


trainer.Trainer.one_step = failing_step
sys.exit(trainer.main(sys.argv[1:]))
