"""Worker for tests/test_distributed.py: trains a tiny SiT on digits with the trainer, as one
process (python ddp_worker.py ...) or under torchrun, and saves its final weights.

The SRA objective's random draws (t, t', eps, label dropout) are replaced by functions of
each sample's own pixels: whichever process holds a sample, it gets the same draws, so
2 processes x batch B must train exactly like 1 process x batch 2B (the ranks' slices of a
global batch are contiguous, see data.ShardedBatchSampler), up to fp32 rounding.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sra_fast.config import TrainConfig  # noqa: E402
from sra_fast.data import DigitsDataset  # noqa: E402
from sra_fast.objective import SRAObjective  # noqa: E402
from sra_fast.trainer import Trainer  # noqa: E402


class SampleKeyedDraws(SRAObjective):
    def draw(self, x0, y, model, generator=None):
        flat = x0.flatten(1).double()
        key = (flat * torch.arange(1, flat.shape[1] + 1, dtype=torch.float64)).sum(1)
        u = torch.frac(torch.sin(key * 12.9898).abs() * 43758.5453).float()
        t = 0.05 + 0.9 * u
        t_teacher = (t - self.cfg.t_max * torch.frac(u * 97.0)).clamp(0.0, 1.0)
        eps = torch.sin(x0 * 17.0 + key.float().view(-1, 1, 1, 1))
        drop = torch.frac(u * 13.0) < 0.2
        return t, t_teacher, eps, torch.where(drop, torch.full_like(y, model.num_classes), y)


class SmallDigits(DigitsDataset):
    def __init__(self, n=96):
        super().__init__()
        self.x, self.y, self.labels = self.x[:n], self.y[:n], self.labels[:n]


def main(out, batch_size, steps, sync="ddp", compile="off", grad_accum="1"):
    """sync "own": the trainer's --cuda-graph choice across processes (the step's own
    gradient all-reduce instead of DDP), taken on CPU by pretending the graph is possible;
    the step itself then finds the CPU, says so and runs the same sync eagerly.
    compile: the trainer's --compile (with dynamo's aot_eager backend: seconds, not minutes
    of inductor on the CPU), MODE or MODE:SCOPE (--compile-scope; default blocks)."""
    compile, _, scope = compile.partition(":")
    torch.set_num_threads(1)
    if sync == "own":
        import sra_fast.trainer
        sra_fast.trainer.graph_refusal = lambda *a, **k: None
    if compile != "off":
        import sra_fast.step
        from trainer_fixtures import aot_eager_compile_fn
        sra_fast.step.compile_fn = aot_eager_compile_fn()
    cfg = TrainConfig(out_dir=out, exp_name="run", batch_size=int(batch_size),
                      max_steps=int(steps), log_every=1, ckpt_every=int(steps), sample_every=0,
                      kernels="ref", attn="math", threads=1, lr=1e-3, lr_warmup_steps=0,
                      device="cpu", cuda_graph=sync == "own", grad_bucket_mb=0.05,
                      compile=compile, compile_scope=scope or "blocks",
                      grad_accum=int(grad_accum))
    tr = Trainer(cfg, dataset=SmallDigits(), quiet=True,
                 objective_factory=lambda model, sra: SampleKeyedDraws.for_model(model, sra))
    tr.train()
    sync = "own" if tr.train_step._grad_sync is not None else type(tr.student).__name__
    sys.stdout.write(f"rank {tr.env.rank} gradient sync: {sync}, compile: "
                     f"{tr.train_step.compile} {tr.train_step.compile_scope}\n")   # one write
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
