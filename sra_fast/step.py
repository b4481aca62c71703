"""One SRA training step: student + teacher forward, loss, backward, clip, AdamW, EMA.

Host-sync free: statistics accumulate in device buffers read by `read_stats()` every N steps;
gradient clipping uses clip_grad_norm_ (no .item()); a non-finite loss or gradient norm skips
the optimizer and EMA update through the optimizer's `found_inf` input and a zero EMA weight
(no Python branch on tensor values), and is counted.
"""
from __future__ import annotations

import contextlib

import torch

from .objective import SRAObjective, ema_update

PRECISIONS = ("bf16", "fp16", "fp32")


def autocast_ctx(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model, lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 0.0,
                   eps: float = 1e-8):
    """AdamW as in the released runs; fused where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                 fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                 foreach=True)


class TrainStep:
    """Eager SRA step. `student` may be a DDP wrapper of `model`; `ema` is the teacher."""

    STATS = ("loss", "denoise", "align", "grad_norm", "nonfinite", "steps")

    def __init__(self, model, ema, objective: SRAObjective, optimizer, *, student=None,
                 precision: str = "bf16", grad_clip: float = 1.0, ema_decay: float = 0.9999,
                 grad_accum: int = 1, generator: torch.Generator | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model, self.ema, self.objective, self.opt = model, ema, objective, optimizer
        self.student = student if student is not None else model
        self.precision, self.grad_clip, self.ema_decay = precision, grad_clip, ema_decay
        self.grad_accum, self.generator = grad_accum, generator
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._stats = torch.zeros(len(self.STATS), device=self.device)
        self._found_inf = torch.zeros((), device=self.device)

    def _micro(self, x0, y, weight):
        with autocast_ctx(self.precision, self.device):
            loss, denoise, align = self.objective(self.student, self.ema, x0, y, weight,
                                                  generator=self.generator)
        return loss, denoise, align

    def __call__(self, x0, y, weight):
        """One optimizer step on a batch (split into grad_accum micro-batches)."""
        self.model.train()
        xs, ys = x0.chunk(self.grad_accum), y.chunk(self.grad_accum)
        if len(xs) != self.grad_accum:
            raise ValueError(f"batch of {x0.shape[0]} cannot be split into "
                             f"{self.grad_accum} accumulation steps")
        tot = torch.zeros(3, device=self.device)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            sync = i == self.grad_accum - 1
            ctx = (self.student.no_sync() if (not sync and hasattr(self.student, "no_sync"))
                   else contextlib.nullcontext())
            with ctx:
                loss, denoise, align = self._micro(xb, yb, weight)
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            tot += torch.stack([loss.detach().float(), denoise.mean(), align.mean()])
        tot /= self.grad_accum
        if self.scaler:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        finite = torch.isfinite(tot[0]) & torch.isfinite(gnorm)
        if self.scaler:
            self.scaler.step(self.opt)   # skips on inf/nan grads itself (fp16 path)
            self.scaler.update()
        else:
            self._found_inf.copy_((~finite).float())
            self.opt.found_inf = self._found_inf   # fused AdamW skips the update when 1
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, self.ema_decay if self.scaler else
                   1.0 - (1.0 - self.ema_decay) * finite.float())
        self._stats += torch.cat([torch.where(finite, tot, torch.zeros_like(tot)),
                                  torch.where(finite, gnorm.float(), gnorm.new_zeros(())).reshape(1),
                                  (~finite).float().reshape(1), torch.ones(1, device=self.device)])

    def read_stats(self) -> dict:
        """Means since the last call over finite steps, and the non-finite count (host sync)."""
        s = self._stats.tolist()
        self._stats.zero_()
        n_ok = max(s[5] - s[4], 1.0)
        return {"loss": s[0] / n_ok, "denoise_loss": s[1] / n_ok, "align_loss": s[2] / n_ok,
                "grad_norm": s[3] / n_ok, "nonfinite": int(s[4]), "steps": int(s[5])}
