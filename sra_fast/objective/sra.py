"""The SRA objective: denoising loss + lambda * alignment of student and EMA-teacher features.

Per step, for clean latents x0 and labels y:
  t ~ the generative objective's sampler; eps ~ N(0, I); labels dropped once (p=0.1) and the
  same dropped labels given to student and teacher; teacher time t' = t - delta,
  delta ~ U(0, t_max) (SiT: continuous, clamped to [0,1]; DiT: integer
  t - randint(0, int(1000*t_max)), clamped to [1, 999]); the teacher sees the SAME x0 and eps.
  h_s = ap_head(student hidden after block_out_s); h_t = teacher hidden after block_out_t
  (raw, no autograd, eval mode). loss = denoise.mean() + weight * align(h_s, h_t).mean().
All randomness comes from the data's device (optional torch.Generator): no CPU RNG, no host
sync, so the CUDA-graph step can capture it.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import ops
from ..ops.reference import ALIGN_LOSSES
from .ddpm import GaussianDiffusion
from .transport import Transport

WEIGHT_SCHEDULES = ("constant", "smooth-l1-decay-sit-256", "smooth-l1-decay-sit-512",
                    "smooth-l1-decay-dit-256", "smooth-l1-decay-dit-512")


def align_weight(schedule: str, epoch: int, constant: float = 0.5) -> float:
    """Alignment weight for an epoch.

    constant: `constant` (0.5 with the cosine losses in the released code).
    smooth-l1-decay-{sit,dit}-{256,512}: the released smooth-L1 decay, prefactor 2 (SiT) or
    0.4 (DiT) times 0.1**e, e = 1 up to epoch 149 (99 at 512px) and
    1 + (epoch - 149) / 1000 after (1 + (epoch - 99) / 800 at 512px).
    """
    if schedule == "constant":
        return float(constant)
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"unknown weight schedule {schedule!r}; choose one of {WEIGHT_SCHEDULES}")
    _, _, _, arch, res = schedule.split("-")
    pre = 2.0 if arch == "sit" else 0.4
    start, span = (149, 1000) if res == "256" else (99, 800)
    e = 1.0 if epoch <= start else 1.0 + (epoch - start) / span
    return pre * 0.1 ** e


def released_weight_schedule(loss_type: str, kind: str, resolution: int) -> str:
    """The schedule the released code ties to a loss: a constant (--align-weight, 0.5) for the
    cosine losses; for every other loss the smooth-L1 decay of the model's kind ("sit" or
    "dit"), in its 512px form at 512px, its 256px form otherwise (the released train.py
    branches on --resolution == 256 / else)."""
    if loss_type.startswith("cos"):
        return "constant"
    return f"smooth-l1-decay-{kind}-{512 if resolution == 512 else 256}"


@dataclasses.dataclass
class SRAConfig:
    block_out_s: int = 8
    block_out_t: int = 20
    t_max: float = 0.2
    loss_type: str = "cos"
    weight_schedule: str = "constant"
    align_weight: float = 0.5          # the constant weight / lambda
    path_type: str = "linear"          # SiT only
    time_sampler: str = "uniform"      # SiT only

    def validate(self, depth: int | None = None):
        if not (0.0 < float(self.t_max) <= 1.0):
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.loss_type not in ALIGN_LOSSES:
            raise ValueError(f"unknown alignment loss {self.loss_type!r}; choose one of {ALIGN_LOSSES}")
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"unknown weight schedule {self.weight_schedule!r}; "
                             f"choose one of {WEIGHT_SCHEDULES}")
        if depth is not None:
            for name in ("block_out_s", "block_out_t"):
                k = getattr(self, name)
                if not isinstance(k, int) or not 1 <= k <= depth:
                    raise ValueError(f"{name.replace('_', '-')} {k!r} is outside 1..{depth} "
                                     f"for this {depth}-block model")
        if self.block_out_s >= self.block_out_t:
            _warn_once(f"block_out_s={self.block_out_s} >= block_out_t={self.block_out_t}: the "
                       "student aligns to a teacher layer that is not deeper (the paper ablates "
                       "this; its recommended setting has the teacher deeper)")
        return self


_warned: set = set()


def _warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


class SRAObjective:
    """Computes the SRA loss for SiT (flow) or DiT (DDPM) models."""

    def __init__(self, cfg: SRAConfig, kind: str, depth: int):
        if kind not in ("sit", "dit"):
            raise ValueError(f"objective kind must be 'sit' or 'dit', got {kind!r}")
        self.cfg = cfg.validate(depth)
        self.kind = kind
        self.transport = Transport(cfg.path_type, cfg.time_sampler) if kind == "sit" else None
        self.diffusion = GaussianDiffusion() if kind == "dit" else None

    @classmethod
    def for_model(cls, model, cfg: SRAConfig):
        from ..models import DiT
        return cls(cfg, "dit" if isinstance(model, DiT) else "sit", model.depth)

    def sample_times(self, n: int, device, generator=None):
        """Student time t and teacher time t' <= t, both on `device`."""
        u = torch.rand(n, device=device, generator=generator)
        if self.kind == "sit":
            t = self.transport.sample_t(n, device, generator)
            return t, (t - self.cfg.t_max * u).clamp(0.0, 1.0)
        t = self.diffusion.sample_t(n, device, generator)
        # randint(0, int(1000*t_max)) from one uniform draw, as an integer on the device
        delta = (u * int(1000 * self.cfg.t_max)).long()
        return t, (t - delta).clamp(1, self.diffusion.num_timesteps - 1)

    def draw(self, x0, y, model, generator=None):
        """Every random quantity of one step: t, t', eps, labels after dropout."""
        n = x0.shape[0]
        t, t_teacher = self.sample_times(n, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, t_teacher, eps, model.drop_labels(y, generator)

    def noisy(self, x0, eps, t):
        """(model input, regression target) at time t."""
        if self.kind == "sit":
            return self.transport.interpolate(x0, eps, t)
        return self.diffusion.q_sample(x0, eps, t), eps

    def __call__(self, student, teacher, x0, y, weight, generator=None):
        """Returns (loss, per-sample denoising loss, per-sample alignment loss).

        weight: the alignment weight (float or 0-d tensor, e.g. from `align_weight`).
        """
        cfg = self.cfg
        t, t_teacher, eps, y = self.draw(x0, y, teacher, generator)
        x_t, target = self.noisy(x0, eps, t)
        x_tt, _ = self.noisy(x0, eps, t_teacher)
        out, h_s = student(x_t, t, y, hidden_block=cfg.block_out_s)
        with torch.no_grad():
            h_t = teacher.forward_hidden(x_tt, t_teacher, y, cfg.block_out_t)
        if self.kind == "sit":
            denoise = self.transport.loss(out, target)
        else:
            denoise = self.diffusion.loss(out, x0, x_t, eps, t)
        # the teacher's hidden state as it is (fp32 residual stream under autocast): a cast
        # to h_s's bf16 would round the target and cost a pass; the loss reads either dtype
        align = ops.align_loss(h_s, h_t.detach(), cfg.loss_type)
        loss = denoise.mean() + weight * align.mean()
        return loss, denoise.detach(), align.detach()
