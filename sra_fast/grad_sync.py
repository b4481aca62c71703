"""Gradient averaging across processes done by the training step itself, so that it can be
captured in the step's CUDA graph (DDP's all-reduce runs from autograd hooks with bucket
state a replayed graph would not refresh, so a DDP-wrapped student is never captured).

The gradients are summed in one flat fp32 buffer, cut into buckets of about `bucket_mb`
megabytes, which is also where they are accumulated, so they are held once, not twice (as
DDP with gradient_as_bucket_view): during every micro-batch's backward, a hook on every
parameter counts the gradients that are ready; when all of a bucket's are, they are copied
(first micro-batch) or added (later ones) into it and freed. During the last micro-batch's
backward a bucket's all-reduce then starts (asynchronously, on the communication library's
stream), so communication overlaps the rest of the backward, as with DDP. Buckets start
strictly in order, the same on every process (NCCL pairs collectives by order). The first
step's buckets follow the parameters' registration order; from the second step on, the order
their gradients became ready at the first step (rank 0's order, broadcast once), as DDP
rebuilds its buckets. `bucket_mb=0` keeps one bucket, filled and all-reduced after each
backward, and no hooks. After the step's last wait, every parameter's .grad is its view of the
summed buffer (no copy back).

The averaging is folded into the loss: the step back-propagates loss / world_size, so the
sum is the mean. For a power-of-two world size the scaling is exact and the result is
bit-for-bit DDP's (which divides each gradient by world_size before summing); otherwise it
differs by fp32 rounding.

One more element at the end of the buffer carries this process's "my loss was not finite"
flag through the same all-reduce: every process then skips the same steps (otherwise the
replicas and their EMAs drift apart for good) without a second collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FlatGradSync:
    """Sum `params`' gradients over `group`. Around every micro-batch's backward:
    begin(first=, last=, nonfinite=) before, finish() after (on the last micro-batch it waits
    and returns the any-process-non-finite flag). Eager or inside a CUDA-graph capture (NCCL)."""

    def __init__(self, params, group=None, bucket_mb: float = 25.0):
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
        if not bucket_mb >= 0:
            raise ValueError(f"bucket_mb must be >= 0 (0: one bucket), got {bucket_mb!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.device = next(iter(devices))
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + 1, dtype=torch.float32, device=self.device)
        self.flag = self.flat[n:]   # this process's non-finite flag, then their sum
        self.bucket_bytes = bucket_mb * 2 ** 20
        self._armed = self._first = self._last = False
        self._recording = []
        self._works = []
        self._next = 0
        self._done = []
        self.launched_in_backward = 0   # buckets started by hooks at the last step
        # registration order until the first step has shown the order gradients become ready
        self._layout(range(len(self.params)))
        self.order = None if bucket_mb else list(range(len(self.params)))
        self._learned = None   # that order, applied at the next step's first begin()
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready_hook(i))
                       for i, p in enumerate(self.params)] if bucket_mb else []

    # -------------------------------------------------------------- layout
    def _layout(self, order):
        """Views of the flat buffer in `order` (parameter indices) and the buckets: runs of
        that order of about bucket_bytes (one bucket for bucket_mb=0); the last bucket also
        holds the flag."""
        self.views = [None] * len(self.params)
        self.buckets, cur, cur_bytes, off = [], [], 0, 0
        for i in order:
            p = self.params[i]
            self.views[i] = self.flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            cur.append(i)
            cur_bytes += 4 * p.numel()
            if self.bucket_bytes and cur_bytes >= self.bucket_bytes:
                self.buckets.append(cur)
                cur, cur_bytes = [], 0
        if cur or not self.buckets:
            self.buckets.append(cur)
        bounds = [0]
        for b in self.buckets:
            bounds.append(bounds[-1] + sum(self.params[i].numel() for i in b))
        bounds[-1] = self.flat.numel()   # the last bucket also carries the flag
        self._bucket_flat = [self.flat[bounds[k]:bounds[k + 1]]
                             for k in range(len(self.buckets))]
        self._bucket_of = {i: k for k, b in enumerate(self.buckets) for i in b}

    def _learn_order(self):
        """The order the first step's gradients became ready (parameters whose hook never
        fired go last), rank 0's on every process; applied from the next step on (this
        step's sums stay in the layout they were made in)."""
        seen, ready = set(), []
        for i in self._recording + list(range(len(self.params))):
            if i not in seen:
                seen.add(i)
                ready.append(i)
        t = torch.tensor(ready, dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.order = t.tolist()   # once, at the first step: a host sync is fine
        self._learned = self.order

    def _relayout(self):
        """Switch to the learned order. A .grad still pointing into the buffer (its owner did
        not clear it) keeps its values in a copy of its own."""
        old = self.views
        for p, v in zip(self.params, old):
            if p.grad is v:
                p.grad = v.clone()
        self._layout(self._learned)
        self._learned = None

    # -------------------------------------------------------------- one step
    def begin(self, nonfinite: torch.Tensor | None = None, *, first: bool = True,
              last: bool = True) -> None:
        """Before a micro-batch's backward (`first`/`last` of the step). On the last,
        `nonfinite` (0-d bool) says this process's loss was not finite, and ready buckets
        start their all-reduce from here on."""
        if last and nonfinite is None:
            raise ValueError("the last micro-batch needs this process's nonfinite flag")
        if first:
            if self._learned is not None:
                self._relayout()
            self._recording = []
            self._fresh = [True] * len(self.params)   # view not yet written this step
        if last:
            self.flag.copy_(nonfinite.reshape(1))
            self._next = 0
            self._works = []
            self.launched_in_backward = 0
        self._first, self._last = first, last
        self._pending = [len(b) for b in self.buckets]
        self._done = [False] * len(self.buckets)
        self._armed = True

    def _ready_hook(self, i):
        def hook(p):
            if not self._armed:
                return
            if self.order is None and self._first:
                self._recording.append(i)
            k = self._bucket_of[i]
            self._pending[k] -= 1
            if self._pending[k] == 0:
                self._accumulate(k)
                if self._last:
                    n = self._next
                    self._launch_ready()
                    self.launched_in_backward += self._next - n
        return hook

    @torch.no_grad()
    def _accumulate(self, k):
        """Bucket k's gradients into their views (copied the first time this step, added
        after), then freed; a parameter with no gradient this step contributes zeros, as in
        DDP."""
        copy_dst, copy_src, add_dst, add_src = [], [], [], []
        for i in self.buckets[k]:
            p, v = self.params[i], self.views[i]
            g = p.grad
            if g is None:
                if self._first and self._fresh[i]:
                    v.zero_()
                    self._fresh[i] = False
                continue
            if g is not v:   # (a gradient already in place needs nothing)
                (copy_dst if self._fresh[i] else add_dst).append(v)
                (copy_src if self._fresh[i] else add_src).append(g)
                p.grad = None
            self._fresh[i] = False
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)
        self._done[k] = True

    def _launch_ready(self):
        """Start the all-reduce of every filled bucket next in line."""
        while self._next < len(self.buckets) and self._done[self._next]:
            self._works.append(dist.all_reduce(self._bucket_flat[self._next],
                                               op=dist.ReduceOp.SUM, group=self.group,
                                               async_op=True))
            self._next += 1

    @torch.no_grad()
    def finish(self) -> torch.Tensor | None:
        """After a micro-batch's backward: the gradients not summed yet go into the buffer.
        After the last: start the buckets not started yet, wait for all (on the device: no
        host sync), point every .grad at its view of the sum and return a 0-d bool device
        tensor, some process's loss was not finite (None after the others)."""
        self._armed = False
        for k in range(len(self.buckets)):
            if not self._done[k]:
                self._accumulate(k)
        if not self._last:
            return None
        self._launch_ready()
        for w in self._works:
            w.wait()
        self._works = []
        if self.order is None:
            self._learn_order()
        for p, v in zip(self.params, self.views):
            p.grad = v
        return self.flag[0] > 0

    def all_reduce(self, nonfinite: torch.Tensor) -> torch.Tensor:
        """begin + finish around nothing: the gradients already there (tests, one-off use)."""
        self.begin(nonfinite)
        return self.finish()


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Every parameter and buffer of `module` := rank `src`'s, as DDP does when it wraps a
    module (the step's own gradient sync replaces DDP, so this replaces its broadcast)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)
