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


@pytest.fixture
def world_of_one(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_micro_batches_accumulate_in_the_buffer_with_unused_parameters(world_of_one):
    """Copied at the first micro-batch, added after; a parameter with no gradient in some
    micro-batches gets only the others', one with none at all zeros (poisoned buffer)."""
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    s = FlatGradSync([a, b, c], bucket_mb=1e-5)   # ~10-byte buckets: one per parameter
    for step in range(3):   # the first learns the order; the next ones use it
        s.flat.fill_(float("nan"))
        xs = [torch.randn(5) for _ in range(3)]
        s.begin(first=True, last=False)
        (a * xs[0]).sum().backward()                       # a only
        assert s.finish() is None
        assert a.grad is None   # in the buffer, freed
        s.begin(torch.tensor(False), first=False, last=False)
        (a * xs[1] + b * xs[1]).sum().backward()
        s.finish()
        s.begin(torch.tensor(False), first=False, last=True)
        (b * xs[2]).sum().backward()                       # b only
        assert not bool(s.finish())
        assert torch.equal(a.grad, xs[0] + xs[1])
        assert torch.equal(b.grad, xs[1] + xs[2])
        assert torch.equal(c.grad, torch.zeros(5))
        assert all(p.grad.data_ptr() >= s.flat.data_ptr() for p in (a, b, c))   # views
        assert len(s.buckets) == 3
        a.grad = b.grad = c.grad = None


def test_a_gradient_left_in_the_buffer_survives_the_reordering(world_of_one):
    """Whoever does not clear .grad between steps accumulates into it (PyTorch's rule); the
    switch to the learned bucket order after the first step must not scramble it."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(6))
    s = FlatGradSync([a, b], bucket_mb=1e-5)
    s.begin(first=True, last=True, nonfinite=torch.tensor(False))
    (2 * a.sum() + b.sum()).backward()   # b's gradient ready first: the order changes
    s.finish()
    assert s._learned == [1, 0]
    s.begin(first=True, last=True, nonfinite=torch.tensor(False))   # .grad not cleared
    (2 * a.sum() + b.sum()).backward()
    s.finish()
    assert torch.equal(a.grad, torch.full((4,), 4.0)) and torch.equal(b.grad, torch.full((6,), 2.0))
    assert s.views[1].data_ptr() == s.flat.data_ptr()   # b first now


def test_gradients_are_held_once_not_twice(world_of_one):
    """Each bucket's gradients are freed once they are in the flat buffer, so during the
    backward at most a few buckets' worth of separate gradients exist (DDP with
    gradient_as_bucket_view holds them once too), over accumulated micro-batches as well."""
    from sra_fast import ops
    from sra_fast.models.dit import SiT
    from sra_fast.objective import SRAConfig, SRAObjective, make_ema
    from sra_fast.step import TrainStep, make_optimizer
    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    params = [p for p in m.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    live = []

    def count(_):
        flat = step._grad_sync.flat
        lo, hi = flat.data_ptr(), flat.data_ptr() + 4 * flat.numel()
        live.append(sum(p.grad.numel() for p in params if p.grad is not None
                        and not lo <= p.grad.data_ptr() < hi))
    for p in params:   # after the sync's own hooks
        p.register_post_accumulate_grad_hook(count)
    step = TrainStep(m, make_ema(m), SRAObjective.for_model(m, SRAConfig(block_out_s=1,
                                                                          block_out_t=3)),
                     make_optimizer(m), precision="fp32", grad_accum=2,
                     grad_sync=world_of_one, grad_bucket_mb=0.02)
    x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    with ops.use_backend("ref"):
        for _ in range(2):
            live.clear()
            step(x, y, 1.0)
            assert len(live) == 2 * len(params)
            assert max(live) < 0.25 * total, (max(live), total)


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
