"""The step's own gradient all-reduce (sra_fast.grad_sync), which lets the CUDA-graph step run
under several processes: 2 gloo processes give bit-for-bit DDP's weights, EMA and optimizer
state, eagerly and through the captured code path (cuda_graph="emulate"), in one bucket or
in buckets started during the backward, with gradient accumulation and with a non-finite
loss on one rank only (every rank skips that step)."""
from pathlib import Path

import pytest
import torch

from sra_fast.grad_sync import FlatGradSync
from trainer_fixtures import REPO, run_cli

WORKER = Path(__file__).resolve().parent / "grad_sync_worker.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("accum,bad_rank", [(1, -1), (2, 1)])
def test_own_all_reduce_is_bitwise_ddp_on_two_processes(tmp_path, accum, bad_rank):
    run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             WORKER, tmp_path, accum, bad_rank], cwd=REPO)
    r0 = torch.load(tmp_path / "result-0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "result-1.pt", weights_only=True)
    variants = ("eager-0", "emulate-0", "eager-0.02", "emulate-0.02")
    for r in (r0, r1):
        assert r["ddp"]["nonfinite"] == (1 if bad_rank >= 0 else 0)
        for v in variants:
            assert r[v]["nonfinite"] == r["ddp"]["nonfinite"] and r[v]["steps"] == 3
            a, b = r["ddp"]["state"], r[v]["state"]
            assert len(a) == len(b)
            bad = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
            assert not bad, f"{v}: {len(bad)} of {len(a)} tensors differ from DDP's"
        for v in ("eager-0", "emulate-0"):       # one all-reduce, after the backward
            assert r[v]["buckets"] == 1 and r[v]["in_backward"] == 0
        for v in ("eager-0.02", "emulate-0.02"):
            # 20 KB buckets in the order the gradients became ready (the alignment head's
            # or the last layer's first, not the registration order's embedders), all
            # started by the hooks while the backward ran
            assert r[v]["buckets"] >= 5
            assert r[v]["in_backward"] == r[v]["buckets"]
            assert all(n.startswith(("ap_head.", "final_layer.")) for n in r[v]["first_bucket"])
    for v in ("ddp",) + variants:   # the replicas stay identical
        assert all(torch.equal(x, y) for x, y in zip(r0[v]["state"], r1[v]["state"]))
    # and the ranks' different data did move the weights (a test of something)
    torch.manual_seed(0)
    from sra_fast.models.dit import SiT
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), r0["eager-0"]["state"]))


def test_flat_sync_refuses_what_it_cannot_sum(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="fp32"):
            FlatGradSync([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
        with pytest.raises(ValueError, match="no trainable"):
            FlatGradSync([torch.nn.Parameter(torch.zeros(3), requires_grad=False)])
        # one process: the sum is the gradient itself; a missing gradient counts as zeros
        a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
        s = FlatGradSync([a, b])
        s.flat.fill_(float("nan"))   # poisoned: every element must be written
        a.grad = torch.arange(6.0).view(2, 3)
        bad = s.all_reduce(torch.tensor(False))
        assert not bool(bad)
        assert torch.equal(a.grad, torch.arange(6.0).view(2, 3)) and torch.equal(b.grad,
                                                                                torch.zeros(4))
        assert a.grad.data_ptr() == s.flat.data_ptr()   # a view: no copy back
        assert bool(s.all_reduce(torch.tensor(True)))
    finally:
        dist.destroy_process_group()


def test_a_failed_capture_under_several_processes_stops_instead_of_falling_back(tmp_path,
                                                                                monkeypatch):
    """One process falling back to eager collectives while the others replay captured ones
    would pair NCCL calls wrongly: the step raises one line (the trainer exits 2 with it)."""
    from sra_fast.models.dit import SiT
    from sra_fast.objective import SRAConfig, SRAObjective, make_ema
    from sra_fast.step import GraphCaptureError, TrainStep, make_optimizer
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        m = SiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4)
        obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=2))
        with pytest.warns(UserWarning, match="need a CUDA device"):   # on CPU: refused...
            step = TrainStep(m, make_ema(m), obj, make_optimizer(m), precision="fp32",
                             grad_sync=dist.group.WORLD, cuda_graph=True)
        step.graph_refusal = None                       # ...pretend it was possible
        x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])

        def fail(*a):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                               "CUDA kernel errors might be asynchronously reported")
        monkeypatch.setattr(step, "_capture", fail)
        with pytest.warns(UserWarning, match="capture failed"):   # one process: eager
            step(x, y, 1.0)
        step.graph_refusal = None
        step._grad_sync.world_size = 2                  # as if there were two
        with pytest.raises(GraphCaptureError) as e:
            step(x, y, 1.0)
        msg = str(e.value)
        assert "\n" not in msg and "operation not permitted" in msg
        assert "run without --cuda-graph" in msg
    finally:
        dist.destroy_process_group()
