"""Worker for tests/test_grad_sync.py, run under torchrun with gloo on CPU: the same steps on
this rank's batches with several gradient syncs - DDP (the eager default), the step's own
all-reduce (grad_sync) run eagerly and inside the captured code path (cuda_graph="emulate":
what a CUDA graph would replay), each as one bucket after the backward and as 20 KB buckets
started during it - saving the weights, EMA and optimizer
state after each into OUT/result-<rank>.pt.

Usage: grad_sync_worker.py OUT ACCUM BAD_RANK (BAD_RANK: the rank whose second batch holds an
inf, -1 for none).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sra_fast import ops  # noqa: E402
from sra_fast.models.dit import SiT  # noqa: E402
from sra_fast.objective import SRAConfig, SRAObjective, make_ema  # noqa: E402
from sra_fast.step import TrainStep, make_optimizer  # noqa: E402


def batches(rank, bad_rank, n=3, bs=4):
    g = torch.Generator().manual_seed(50 + rank)   # each rank its own data
    out = []
    for i in range(n):
        x, y = torch.randn(bs, 4, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)
        if rank == bad_rank and i == 1:
            x[0, 0, 0, 0] = float("inf")
        out.append((x, y))
    return out


def run(variant, rank, accum, bad_rank):
    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    ema = make_ema(m)
    obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
    opt = make_optimizer(m, lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)   # each rank its own draws
    if variant == "ddp":
        kw = dict(student=torch.nn.parallel.DistributedDataParallel(
            m, gradient_as_bucket_view=True))
    else:   # "eager-<MB>" / "emulate-<MB>": grad_sync with buckets of MB megabytes
        mode, mb = variant.split("-")
        kw = dict(grad_sync=dist.group.WORLD, grad_bucket_mb=float(mb),
                  cuda_graph="emulate" if mode == "emulate" else False)
    step = TrainStep(m, ema, obj, opt, precision="bf16", grad_accum=accum, generator=gen, **kw)
    for i, (x, y) in enumerate(batches(rank, bad_rank)):
        step(x, y, 0.5 if i else 1.0)
    stats = step.read_stats()
    state = [p.detach().clone() for p in list(m.parameters()) + list(ema.parameters())]
    for st in opt.state.values():
        state += [v.detach().clone() for v in st.values()]
    res = {"state": state, "nonfinite": stats["nonfinite"], "steps": stats["steps"]}
    sync = step._grad_sync
    if sync is not None:   # how the last step's all-reduces went
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        res.update(buckets=len(sync.buckets), in_backward=sync.launched_in_backward,
                   first_bucket=[names[i] for i in sync.buckets[0]])
    return res


def main(out, accum, bad_rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with ops.use_backend("ref"):
        res = {v: run(v, rank, int(accum), int(bad_rank))
               for v in ("ddp", "eager-0", "emulate-0", "eager-0.02", "emulate-0.02")}
    torch.save(res, Path(out) / f"result-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
