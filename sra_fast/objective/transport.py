"""SiT's flow-matching objective ("transport"): paths, time sampling, v-prediction loss.

t in [0,1], t=1 is pure noise. x_t = alpha(t) x0 + sigma(t) eps, target v = alpha'(t) x0 +
sigma'(t) eps. All randomness is drawn on the data's device (optionally from a
torch.Generator) so a training step needs no CPU RNG and no host sync.
"""
from __future__ import annotations

import math

import torch

PATHS = ("linear", "cosine")
TIME_SAMPLERS = ("uniform", "lognormal")


def _expand(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Transport:
    def __init__(self, path: str = "linear", time_sampler: str = "uniform"):
        if path == "cos":
            # the released CLI offers "cos" but its code checks for "cosine": accept both
            path = "cosine"
        if path not in PATHS:
            raise ValueError(f"unknown path type {path!r}; choose one of {PATHS}")
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {time_sampler!r}; choose one of {TIME_SAMPLERS}")
        self.path, self.time_sampler = path, time_sampler

    def sample_t(self, n: int, device, generator=None) -> torch.Tensor:
        if self.time_sampler == "uniform":
            return torch.rand(n, device=device, generator=generator)
        sigma = torch.randn(n, device=device, generator=generator).exp()
        if self.path == "linear":
            return sigma / (1 + sigma)
        return 2 / math.pi * torch.atan(sigma)   # REPA's lognormal for the cosine path

    def coefficients(self, t):
        """alpha, sigma, d_alpha/dt, d_sigma/dt."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)

    def interpolate(self, x0, eps, t):
        """Returns (x_t, v_target) for per-sample times t (N,)."""
        a, s, da, ds = (_expand(c, x0) for c in self.coefficients(t))
        return a * x0 + s * eps, da * x0 + ds * eps

    @staticmethod
    def loss(pred, target):
        """Per-sample denoising loss: mean over non-batch dims of (v_pred - v)^2, fp32."""
        return (pred.float() - target.float()).square().flatten(1).mean(1)

    def velocity_from_output(self, out):
        return out
