"""One process of `python -m sra_fast.sample` for tests/test_sample_cli.py, started as an srun
task. argv: MODE, then sample's arguments.

    ok     nothing goes wrong
    fails  rank 1 fails at its first batch with a clean error (exit 2); rank 0 sleeps 120 s
           in its first batch, standing for a long sampling run
    nogpuK rank K fails while starting, 2 s in (its device pick finds no GPU for it): the
           other waits in the rendezvous meanwhile
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sra_fast.sample as S  # noqa: E402
from sra_fast import distributed  # noqa: E402

mode, args = sys.argv[1], sys.argv[2:]
rank = int(os.environ.get("SLURM_PROCID", "0"))
real_sample = S.sample


def sample(*a, **k):
    if mode == "fails" and rank == 1:
        raise RuntimeError("decoding latents: a test failure on rank 1")
    if mode == "fails":
        sys.stderr.write(f"(rank {rank}) sampling\n")
        sys.stderr.flush()
        time.sleep(120)
        sys.stderr.write(f"(rank {rank}) woke up\n")
    return real_sample(*a, **k)


S.sample = sample
if mode == f"nogpu{rank}":
    def no_gpu(pref="auto", local_rank=0):
        time.sleep(2)
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only 0 GPUs are visible on this node")
    distributed.pick_device = no_gpu
sys.exit(S.main(args))
