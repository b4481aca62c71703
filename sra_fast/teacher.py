"""How the step runs the EMA teacher: truncated (default), full (as released), bf16 shadow.

The SRA teacher is the EMA of the student, called without autograd and stopped after
`block_out_t` (`forward_hidden`). Two optional variants, used by the step:

* `BF16Shadow`: a view of the EMA whose matmul weights (every nn.Linear / nn.Conv2d weight
  and bias the truncated teacher uses) are bf16 copies, refreshed right after each EMA
  update by one `_foreach_copy_`. Under bf16 autocast PyTorch otherwise re-casts each fp32
  weight op by op every step (read 4 B + write 2 B per weight, per step, in ~100 small
  kernels); with the shadow the teacher reads bf16 weights directly. Autocast's cast and
  `copy_` both round to nearest even, so the teacher's output is bit-identical to running
  the fp32 EMA under autocast. Everything else (embedding table, pos_embed, unused blocks)
  is shared with the EMA, not copied. Cost: 2 bytes per shadowed parameter.
* `FullTeacher`: runs every block and the final layer and keeps block_out_t's hidden state,
  as the released code does (for baselines only: ~40% more teacher FLOPs on SiT-XL 8->20).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from .profiling import nvtx_range


def _matmul_params(model, upto_block: int):
    """(name, param) of the Linear/Conv2d weights and biases blocks 1..upto_block use."""
    mods = [model.x_embedder, model.t_embedder, *list(model.blocks)[:upto_block]]
    out = []
    for root in mods:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                out += [p for p in (m.weight, m.bias) if p is not None]
    return out


class BF16Shadow:
    """A teacher module sharing the EMA's parameters except bf16 copies of the matmul
    weights of blocks 1..upto_block (and the embedders). `sync()` refreshes the copies."""

    def __init__(self, ema: nn.Module, upto_block: int):
        src = _matmul_params(ema, upto_block)
        memo = {id(p): p for p in ema.parameters()}
        memo.update({id(b): b for b in ema.buffers()})
        self.src, self.dst = [], []
        for p in src:
            q = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            memo[id(p)] = q
            self.src.append(p)
            self.dst.append(q)
        self.module = copy.deepcopy(ema, memo)   # the module tree; tensors from the memo
        self.module.eval()
        self._versions = self._src_versions()

    def _src_versions(self):
        return [p._version for p in self.src]

    @torch.no_grad()
    def sync(self):
        """Copy the EMA's fp32 matmul weights into the bf16 shadow (one foreach call)."""
        torch._foreach_copy_(self.dst, [p.detach() for p in self.src])
        self._versions = self._src_versions()

    def refresh_if_stale(self):
        """Re-sync when the EMA was changed outside the step (e.g. a checkpoint loaded into
        it): compares PyTorch's per-tensor version counters, host-side, no device sync."""
        if self._src_versions() != self._versions:
            self.sync()
            return True
        return False

    def mark_synced(self):
        """Record the EMA's current versions as in sync (after an update that also synced)."""
        self._versions = self._src_versions()

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.dst)


class TeacherView:
    """What the objective calls as `teacher`: drop_labels + forward_hidden of `module`,
    optionally running the full network (`full=True`, as released), outside the student's
    autocast (`fp32=True`: the released teacher, which accelerate's autocast did not wrap,
    ran in fp32/TF32), compiled (`compiler`: a function that compiles a function, e.g.
    step.compile_fn with a mode; whole, or `blocks=True`: its blocks only, through a
    compiled DiTBlock.run of its own, so the module, the EMA that sampling also runs, stays
    eager), and inside an NVTX range (outside the compiled code)."""

    def __init__(self, module: nn.Module, full: bool = False, fp32: bool = False,
                 compiler=None, blocks: bool = False):
        self.module, self.full, self.fp32 = module, full, fp32
        self.block_run = None
        self._hidden = self._hidden_eager
        if compiler and blocks:
            from .models.dit import fresh_block_run
            self.block_run = compiler(fresh_block_run())
        elif compiler:
            self._hidden = compiler(self._hidden_eager)

    def drop_labels(self, y, generator=None):
        return self.module.drop_labels(y, generator)

    def __getattr__(self, name):   # anything else (num_classes, ...): the module's
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def _hidden_eager(self, x, t, y, block: int):
        with (torch.autocast(x.device.type, enabled=False) if self.fp32
              else contextlib.nullcontext()):
            if self.full:
                self.module.check_block(block)
                return self.module._trunk(x, t, y, block, block_run=self.block_run)[1]
            if self.block_run is None:   # (any module with forward_hidden)
                return self.module.forward_hidden(x, t, y, block)
            return self.module.forward_hidden(x, t, y, block, block_run=self.block_run)

    def forward_hidden(self, x, t, y, block: int):
        with nvtx_range("teacher forward"):
            return self._hidden(x, t, y, block)


class StudentView:
    """The student called inside an NVTX range (used only while NVTX profiling is on)."""

    def __init__(self, student):
        self.student = student

    def __call__(self, *args, **kwargs):
        with nvtx_range("student forward"):
            return self.student(*args, **kwargs)


__all__ = ["BF16Shadow", "TeacherView", "StudentView"]
