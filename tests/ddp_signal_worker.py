"""Worker for tests/test_interruptions.py: two gloo processes under torchrun; only rank 1 gets
SIGUSR1, after step SIGNAL_AT. Both must stop after the same step, with one checkpoint
(argv: OUT SIGNAL_AT MAX_STEPS CHECK_EVERY). Writes each rank's result to OUT."""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_worker import SmallDigits  # noqa: E402
from sra_fast import stop_signals  # noqa: E402
from sra_fast.config import TrainConfig  # noqa: E402
from sra_fast.trainer import Trainer  # noqa: E402


def main(out, signal_at, steps, check_every):
    stop_signals.CHECK_EVERY = int(check_every)
    cfg = TrainConfig(out_dir=out, exp_name="run", batch_size=8, max_steps=int(steps),
                      log_every=1000, ckpt_every=1000, sample_every=0, kernels="ref",
                      attn="math", threads=1, device="cpu")
    tr = Trainer(cfg, dataset=SmallDigits(), quiet=True)
    step_once = tr.one_step

    def one_step(*a):
        step_once(*a)
        if tr.env.rank == 1 and tr.step + 1 == int(signal_at):   # tr.step counts after this
            os.kill(os.getpid(), signal.SIGUSR1)

    tr.one_step = one_step
    res = tr.train()
    # a file per rank: the ranks' stdout lines interleave under torchrun
    Path(out, f"result-{tr.env.rank}.json").write_text(json.dumps(
        {"rank": tr.env.rank, "step": res["step"], "signal": res["signal"]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
