"""DiT's DDPM objective: 1000-step linear-beta diffusion, eps-prediction with learned variance.

The training loss is improved-DDPM's "hybrid" loss as DiT uses it: MSE on eps plus the
variational bound term on the variance with the predicted mean detached (loss_type MSE,
model_var_type LEARNED_RANGE, no rescaling). Schedules are float64 tables computed once and
kept on the device, gathered with t: no host sync.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1,1] discretised to 256 bins (ADM's decoder NLL)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))


class GaussianDiffusion:
    def __init__(self, num_steps: int = 1000):
        betas = linear_betas(num_steps)
        self.num_timesteps = num_steps
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
        }
        self._np = tables
        self._dev = {}

    def _table(self, name, device):
        key = (name, str(device))
        if key not in self._dev:
            self._dev[key] = torch.from_numpy(self._np[name]).to(device)
        return self._dev[key]

    def _gather(self, name, t, x):
        v = self._table(name, x.device)[t].to(x.dtype if x.dtype == torch.float64 else torch.float32)
        return v.reshape(-1, *([1] * (x.dim() - 1)))

    # ------------------------------------------------------------------ forward process
    def sample_t(self, n: int, device, generator=None):
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def q_sample(self, x0, eps, t):
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * eps)

    def q_posterior(self, x0, x_t, t):
        mean = (self._gather("posterior_mean_coef1", t, x_t) * x0
                + self._gather("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._gather("posterior_log_variance_clipped", t, x_t)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """Mean and log-variance of p(x_{t-1}|x_t) from the 2C-channel output."""
        C = x_t.shape[1]
        eps, var_values = model_output[:, :C], model_output[:, C:]
        min_log = self._gather("posterior_log_variance_clipped", t, x_t)
        max_log = self._gather("log_betas", t, x_t)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
              - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0

    def loss(self, model_output, x0, x_t, eps, t):
        """Per-sample hybrid loss (N,): MSE(eps) + VLB term (bits/dim) with mean detached."""
        C = x_t.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(f"DDPM with learned variance needs {2 * C} output channels, "
                             f"got {model_output.shape[1]}")
        out = model_output.float()
        mse = (eps.float() - out[:, :C]).square().flatten(1).mean(1)
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
        x0f, x_tf = x0.float(), x_t.float()
        true_mean, true_log_var = self.q_posterior(x0f, x_tf, t)
        mean, log_var, _ = self.p_mean_variance(frozen, x_tf, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0f, mean, 0.5 * log_var)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb
