"""Process-group setup for torchrun and srun launches (single and multi node) and small
collectives.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
A SLURM job step with several tasks (`srun --ntasks-per-node=8 python train.py`, one task
per GPU, no torchrun) gives the same through SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID and SLURM_STEP_NODELIST; without this every task would think it is the only
one and train alone into the same run folder. We rendezvous through env:// and pick the
device from the local rank (never the global rank, which breaks on the second node). NCCL
on GPUs, gloo on CPU. A plain `python train.py` is a world of one and creates no process
group.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist


def stderr_line(line: str) -> None:
    """One line on stderr in one write: lines that several processes write into one log
    (torchrun, srun) stay whole (print writes the text and the newline apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, ...): independent streams per tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False   # True when we created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_srun() -> bool:
    """A task of a SLURM job step with several tasks, not started by torchrun (which sets
    RANK). A batch script itself (SLURM_NTASKS set, but no step of its own) is not one."""
    return ("RANK" not in os.environ and "SLURM_PROCID" in os.environ
            and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1)


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment, or
    from SLURM's for a task that srun started (see launched_by_srun)."""
    if launched_by_srun():
        e = os.environ
        per_node = re.match(r"\d+", e.get("SLURM_STEP_TASKS_PER_NODE", ""))
        return (int(e["SLURM_PROCID"]), int(e["SLURM_STEP_NUM_TASKS"]),
                int(e.get("SLURM_LOCALID", 0)), int(per_node.group()) if per_node else 1)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world if world > 1 else 1))
    return rank, world, local_rank, local_world


def first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list ("gpu[03-05,9]", "a01,a02", "node7"), or None
    for a form this does not read."""
    m = re.fullmatch(r"([^\[\],]+)(?:\[(\d+)[^\]]*\])?([^\[\],]*)(?:,.*)?", nodelist.strip())
    if not m:
        return None
    return m.group(1) + (m.group(2) or "") + m.group(3)


def srun_rendezvous() -> None:
    """MASTER_ADDR (the step's first node) and MASTER_PORT (from the job id, so concurrent
    jobs on a node differ) for srun-started tasks, unless the job script set them."""
    e = os.environ
    if "MASTER_ADDR" not in e:
        host = first_host(e.get("SLURM_STEP_NODELIST", e.get("SLURM_JOB_NODELIST", "")))
        if host is None:
            raise RuntimeError("srun started this task without torchrun, and the node list "
                               f"{e.get('SLURM_STEP_NODELIST')!r} is not one this reads: "
                               "export MASTER_ADDR (the first node's name) and MASTER_PORT")
        e["MASTER_ADDR"] = host
    e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available here")
        n = torch.cuda.device_count()
        if n == 1 and local_rank > 0 and os.environ.get("CUDA_VISIBLE_DEVICES"):
            # one GPU bound per process (SLURM --gpus-per-task=1 and the like): it is cuda:0
            return torch.device("cuda", 0)
        if local_rank >= n:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n} GPUs are visible on this "
                               "node: launch at most one process per GPU (torchrun "
                               f"--nproc-per-node {n})")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: the store's host (rank 0 under env:// and
    srun) holds a few sockets per rank (the process group's client, the peer watch's), and
    the common soft limit of 1024 runs out at a few hundred ranks."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):   # not POSIX, or not allowed: keep it
        pass


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Create the process group when launched by torchrun or srun with several processes."""
    rank, world, local_rank, local_world = env_ranks()
    if world > 1:
        raise_open_file_limit()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local_rank, local_world, dev)
    if world > 1 and not dist.is_initialized():
        if launched_by_srun():
            srun_rendezvous()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = dict(backend=backend, init_method="env://", rank=rank, world_size=world,
                  timeout=datetime.timedelta(minutes=timeout_min))
        if dev.type == "cuda":
            kw["device_id"] = dev
        try:
            dist.init_process_group(**kw)
        except TypeError:   # older torch without device_id
            kw.pop("device_id", None)
            dist.init_process_group(**kw)
        env.initialized = True
    elif world > 1:
        env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
    return env


def cleanup(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_(t: torch.Tensor, env: DistEnv, op=None) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(value: float, env: DistEnv) -> float:
    """The largest of every rank's `value`, on every rank (one 1-element all-reduce and a
    host read: a sync, so never per step in the hot path)."""
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
