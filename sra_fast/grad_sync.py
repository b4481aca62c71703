"""Gradient averaging across processes done by the training step itself, so that it can be
captured in the step's CUDA graph (DDP's all-reduce runs from autograd hooks with bucket
state a replayed graph would not refresh, so a DDP-wrapped student is never captured).

After the last micro-batch's backward, every gradient is copied into one flat fp32 buffer
and the buffer is summed across processes with ONE all-reduce; the parameters' .grad then
become views of that buffer (no copy back). The averaging is folded into the loss: the step
back-propagates loss / world_size, so the sum is the mean. For a power-of-two world size the
scaling is exact and the result is bit-for-bit DDP's (which divides each gradient by
world_size before summing); otherwise it differs by fp32 rounding.

One more element at the end of the buffer carries this process's "my loss was not finite"
flag through the same all-reduce: every process then skips the same steps (otherwise the
replicas and their EMAs drift apart for good) without a second collective.

Unlike DDP the all-reduce does not overlap the backward: it starts after it. On the
graph-captured step that is the trade: no per-kernel launch cost and no bucket hooks, against
the all-reduce's time (about 2 x 4 bytes x parameters / bus bandwidth). Measure before
choosing (see docs/performance.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FlatGradSync:
    """Sum `params`' gradients over `group` in one all-reduce of a flat fp32 buffer."""

    def __init__(self, params, group=None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters to synchronise")
        bad = sorted({str(p.dtype) for p in self.params if p.dtype != torch.float32})
        if bad:
            raise ValueError(f"gradient sync keeps fp32 parameters only (got {', '.join(bad)}); "
                             "train in fp32 weights with bf16 autocast")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + 1, dtype=torch.float32, device=next(iter(devices)))
        self.views, off = [], 0
        for p in self.params:
            self.views.append(self.flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.flag = self.flat[n:]   # this process's non-finite flag, then their sum

    @torch.no_grad()
    def all_reduce(self, nonfinite: torch.Tensor) -> torch.Tensor:
        """Sum the gradients (and `nonfinite`, a 0-d bool: this process's loss was not
        finite) over the group; afterwards every parameter's .grad is its view of the summed
        buffer. Returns a 0-d bool device tensor: some process's loss was not finite. No host
        sync; capturable (NCCL) as long as which gradients exist does not change."""
        dst, src = [], []
        for p, v in zip(self.params, self.views):
            if p.grad is None:       # unused this step: contributes zeros, as in DDP
                v.zero_()
            elif p.grad is not v:    # (a gradient already in place needs no copy)
                dst.append(v)
                src.append(p.grad)
        if dst:
            torch._foreach_copy_(dst, src)
        self.flag.copy_(nonfinite.reshape(1))
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=self.group)
        for p, v in zip(self.params, self.views):
            p.grad = v
        return self.flag[0] > 0


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Every parameter and buffer of `module` := rank `src`'s, as DDP does when it wraps a
    module (the step's own gradient sync replaces DDP, so this replaces its broadcast)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)
