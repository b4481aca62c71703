"""DDP: 2 gloo processes launched by torchrun (or as the tasks of an srun step, without
torchrun) train exactly like 1 process on the concatenated batch (fp32 tolerance). See tests/ddp_worker.py for how the random draws are
made to correspond."""
import os
from pathlib import Path

import pytest
import torch

from sra_fast.config import build_model
from sra_fast.distributed import DistEnv, env_ranks, first_host, srun_rendezvous
from trainer_fixtures import REPO, restore_backends, run_cli, srun_like_procs  # noqa: F401

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
SPLIT_WORKER = Path(__file__).resolve().parent / "ddp_split_worker.py"


def _srun_like(args, n: int):
    procs = srun_like_procs(args, n)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["torchrun", "srun", "torchrun-own-sync",
                                      "torchrun-compile-accum", "torchrun-compile-model",
                                      "torchrun-own-sync-compile"])
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path, launcher):
    """torchrun-own-sync: the gradient sync that --cuda-graph uses across processes (the
    step's own all-reduce, sra_fast.grad_sync) in place of DDP, run eagerly on CPU.
    ...-compile: the two processes run --compile default (its blocks scope under DDP, with
    accum DDP's no_sync on the first micro-batch; -model: the whole DDP wrapper compiled,
    which dynamo splits at DDP's buckets), the one process does not."""
    steps = 3
    accum = "2" if launcher.endswith("-accum") else "1"
    run_cli([WORKER, tmp_path / "one", 16, steps, "ddp", "off", accum], cwd=REPO)
    if launcher.startswith("torchrun"):
        sync = "own" if "own-sync" in launcher else "ddp"
        scope = "model" if launcher.endswith("-model") else "blocks"
        out = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       WORKER, tmp_path / "two", 8, steps, sync,
                       f"default:{scope}" if "compile" in launcher else "off", accum],
                      cwd=REPO)
        want = "own" if sync == "own" else "DistributedDataParallel"
        for r in (0, 1):
            assert (f"rank {r} gradient sync: {want}, compile: "
                    + (f"default {scope}" if "compile" in launcher else "None None")) \
                in out.stdout, out.stdout[-2000:]
    else:
        _srun_like([WORKER, tmp_path / "two", 8, steps], 2)
    a = torch.load(tmp_path / "one" / "run" / "checkpoints" / f"{steps:07d}.pt",
                   weights_only=True)
    b = torch.load(tmp_path / "two" / "run" / "checkpoints" / f"{steps:07d}.pt",
                   weights_only=True)
    assert b["data_position"]["world_size"] == 2 and len(b["rng"]["ranks"]) == 2
    assert a["data_position"]["global_batch"] == b["data_position"]["global_batch"] == 16
    torch.manual_seed(0)   # the trainer's initialisation, to show the weights moved
    init = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    moved = max((a["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.allclose(v, b[part][k], rtol=1e-5, atol=1e-6), f"{part}.{k}"
    for i, st in a["opt"]["state"].items():
        assert torch.allclose(st["exp_avg"], b["opt"]["state"][i]["exp_avg"], rtol=1e-4,
                              atol=1e-9)


@pytest.mark.timeout(300)
def test_ranks_that_would_resume_from_different_checkpoints_all_stop(tmp_path):
    """Nodes that do not share --out-dir (here: rank r writes to node<r>): rank 0 finds a
    checkpoint, rank 1 none. Each would start from its own state and their collectives would
    pair up wrongly; instead every rank stops with one line naming the cause."""
    run_cli([SPLIT_WORKER, tmp_path, "1", 2], cwd=REPO)          # one process: node0 at step 2
    assert (tmp_path / "node0" / "run" / "checkpoints" / "0000002.pt").exists()
    p = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 SPLIT_WORKER, tmp_path, "1", 4], cwd=REPO, check=False)
    assert p.returncode != 0
    errs = [ln for ln in p.stderr.splitlines() if "would resume from different checkpoints" in ln]
    assert len(errs) == 2, p.stderr[-3000:]                      # said by both ranks
    assert any(ln.startswith("(rank 1) error: ") for ln in errs)
    assert "rank 1: no checkpoint" in errs[0]
    assert not (tmp_path / "node0" / "run" / "checkpoints" / "0000004.pt").exists()


def test_env_ranks_follow_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")       # torchrun inside a SLURM step: torchrun's
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert env_ranks() == (5, 16, 1, 8)   # the device comes from LOCAL_RANK, not RANK
    assert DistEnv(5, 16, 1, 8).distributed and not DistEnv(5, 16, 1, 8).is_main


def test_env_ranks_of_srun_tasks_and_of_a_batch_script(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    # the batch script itself: SLURM_NTASKS says 16, but it is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert env_ranks() == (0, 1, 0, 1)
    # task 11 of `srun --nodes 2 --ntasks-per-node 8`
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert env_ranks() == (11, 16, 3, 8)
    srun_rendezvous()
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    monkeypatch.setenv("MASTER_ADDR", "head")      # what the job script set wins
    monkeypatch.setenv("MASTER_PORT", "29500")
    srun_rendezvous()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29500")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "odd[a-b]")
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        srun_rendezvous()


@pytest.mark.parametrize("nodelist,host", [("gpu[03-05,9]", "gpu03"), ("a01,a02", "a01"),
                                           ("node7", "node7"), ("n[001-004],m[01-02]", "n001"),
                                           ("gpu-a[1-2]-ib", "gpu-a1-ib"), ("x[a-b]", None)])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.timeout(300)
def test_sampling_across_ranks_matches_one_process(tmp_path, restore_backends):  # noqa: F811
    import json

    import numpy as np

    from sra_fast.config import TrainConfig
    from sra_fast.trainer import Trainer
    Trainer(TrainConfig(out_dir=str(tmp_path), max_steps=2, batch_size=16, log_every=1,
                        ckpt_every=2, sample_every=0, sample_num_steps=1, kernels="ref",
                        threads=1), quiet=True).train()
    ck = tmp_path / "digits" / "checkpoints" / "0000002.pt"
    args = ["--ckpt", ck, "--num-samples", "7", "--batch-size", "2", "--sampler", "sde",
            "--num-steps", "3", "--cfg-scale", "2", "--seed", "5"]
    run_cli(["-m", "sra_fast.sample", *args, "--out", tmp_path / "one.npz"], cwd=REPO)
    run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "sra_fast.sample", *args, "--out", tmp_path / "two.npz"], cwd=REPO)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (7, 8, 8, 3)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["world_size"] == 2 and meta["num_samples"] == 7


def test_one_gpu_bound_per_process_is_cuda_0(monkeypatch):
    """SLURM --gpus-per-task=1 (and the like) binds one GPU per process through
    CUDA_VISIBLE_DEVICES: every rank sees it as cuda:0, whatever its LOCAL_RANK. Without such
    a binding, more processes than GPUs is an error naming the fix."""
    from sra_fast.distributed import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert pick_device("auto", local_rank=3) == torch.device("cuda", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeError, match="only 1 GPUs are visible"):
        pick_device("auto", local_rank=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda", 3)


def test_a_distributed_start_raises_the_soft_open_file_limit_to_the_hard_one():
    """The store's host holds sockets per rank: a soft limit of 256 (below the hard one) is
    raised when the process group is made; a world of one leaves it alone."""
    import resource
    import subprocess
    import sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here is {hard}")
    code = ("import resource, sys; from unittest import mock; import sra_fast.distributed as d\n"
            "with mock.patch.object(d.dist, 'init_process_group'):\n"
            "    d.init_distributed('cpu')\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    for world, raised in (("1", False), ("2", True)):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0", WORLD_SIZE=world,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
        got = int(out.stdout.split()[-1])
        assert (got > 256) == raised, (world, got, out.stderr)
        if raised:
            assert got == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
