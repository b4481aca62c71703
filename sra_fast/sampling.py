"""Samplers for SiT (flow) and DiT (DDPM) with classifier-free guidance, and image helpers.

SiT (t = 1 is noise, t = 0 data; the network predicts the velocity):
  euler / heun  ODE from t = 1 to 0 on a uniform grid (Heun's second evaluation is skipped
                on the last step, as in REPA's sampler).
  sde           Euler-Maruyama as the released evaluation: t from 1 to `t_min` (0.04) on
                a uniform grid of `steps` points, diffusion coefficient w(t) = 2t, drift
                v - w/2 * score(v); then one final deterministic step from t_min to 0.
DiT:
  ddpm          ancestral sampling with learned variance on a respaced schedule (250 of
                1000 steps by default, improved-DDPM's space_timesteps).
Guidance: out = uncond + s * (cond - uncond), applied when guidance_low <= t <= guidance_high
(t normalised to [0, 1]; DiT: t / 1000). cfg_channels="all" guides every latent channel
(REPA/SRA); "first3" reproduces the original SiT/DiT code, which guides channels 0-2 only
and takes the rest (and DiT's variance channels) from the conditional half.
The state is carried in float64 as in the released samplers; the model runs in its dtype.
Original SiT checkpoints (willisma/SiT: t = 1 is data) run through `SiTOriginalTime`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

SAMPLERS = ("euler", "heun", "sde", "ddpm")
CFG_CHANNELS = ("all", "first3")
PATH_TYPES = ("linear", "cosine")


@dataclasses.dataclass
class SamplerConfig:
    sampler: str = "sde"
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    cfg_channels: str = "all"
    path_type: str = "linear"
    t_min: float = 0.04          # SDE: last stochastic time before the final step

    def validate(self, kind: str):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if kind == "dit" and self.sampler != "ddpm":
            raise ValueError(f"DiT models sample with ddpm, not {self.sampler!r}")
        if kind == "sit" and self.sampler == "ddpm":
            raise ValueError("SiT models sample with euler, heun or sde, not ddpm")
        if self.steps < 1:
            raise ValueError(f"--num-steps must be >= 1, got {self.steps}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        if self.cfg_channels not in CFG_CHANNELS:
            raise ValueError(f"cfg_channels must be one of {CFG_CHANNELS}")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ValueError(f"guidance interval [{self.guidance_low}, {self.guidance_high}] "
                             "must satisfy 0 <= low <= high <= 1")
        if self.path_type == "cos":
            self.path_type = "cosine"
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {self.path_type!r}; choose one of {PATH_TYPES}")
        if self.sampler == "sde" and not 0.0 < self.t_min < 1.0:
            raise ValueError(f"--t-min must be in (0, 1) (the SDE's last stochastic time), "
                             f"got {self.t_min}")
        return self


class GuidedModel:
    """Calls the model with CFG (doubling the batch only where guidance is on)."""

    def __init__(self, model, cfg: SamplerConfig, guided_channels: int):
        self.model, self.cfg = model, cfg
        self.guided_channels = guided_channels
        self.dtype = next(model.parameters()).dtype
        self.null = getattr(model, "num_classes", 1000)
        if cfg.cfg_scale != 1.0:
            emb = model.y_embedder.embedding_table.num_embeddings
            if emb <= self.null:
                raise ValueError("classifier-free guidance needs the null class embedding, "
                                 "which this model lacks (trained with --cfg-prob 0)")

    def guided(self, t_norm: float) -> bool:
        c = self.cfg
        return c.cfg_scale != 1.0 and c.guidance_low <= t_norm <= c.guidance_high

    def __call__(self, x, t, y, t_norm: float):
        xin = x.to(self.dtype)
        if not self.guided(t_norm):
            return self.model(xin, t.to(self._tdtype(t)), y).to(torch.float64)
        n = x.shape[0]
        out = self.model(torch.cat([xin, xin]), torch.cat([t, t]).to(self._tdtype(t)),
                         torch.cat([y, torch.full_like(y, self.null)])).to(torch.float64)
        cond, uncond = out[:n], out[n:]
        k = self.guided_channels if self.cfg.cfg_channels == "all" else 3
        g = uncond[:, :k] + self.cfg.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([g, cond[:, k:]], dim=1)

    def _tdtype(self, t):
        return t.dtype if not t.is_floating_point() else self.dtype


# ---------------------------------------------------------------------------- SiT
class SiTOriginalTime(torch.nn.Module):
    """An original SiT network (willisma/SiT) under this package's time convention.

    SiT's linear path is x_s = s * x + (1 - s) * eps (s = 1 is data), predicting the velocity
    x - eps; REPA, SRA and these samplers use x_t = (1 - t) * x + t * eps (t = 1 is noise),
    velocity eps - x. With s = 1 - t the two agree up to the sign of the velocity:
    v(x, t) = -v_SiT(x, 1 - t). The same flip maps SiT's GVP path onto the cosine path.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = getattr(model, "num_classes", 1000)

    @property
    def y_embedder(self):
        return self.model.y_embedder

    @property
    def head_dim(self) -> int:
        return self.model.head_dim

    def forward(self, x, t, y):
        return -self.model(x, 1 - t, y)


def _path_coeffs(t: float, path: str):
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    h = math.pi / 2
    return math.cos(h * t), math.sin(h * t), -h * math.sin(h * t), h * math.cos(h * t)


def score_from_velocity(v, x, t: float, path: str = "linear"):
    """Score of p_t from the velocity prediction (REPA's get_score_from_velocity)."""
    a, s, da, ds = _path_coeffs(t, path)
    ratio = a / da
    var = s ** 2 - ratio * ds * s
    return (ratio * v - x) / var


@torch.no_grad()
def sample_sit(model, z, y, cfg: SamplerConfig, generator=None):
    cfg.validate("sit")
    g = GuidedModel(model, cfg, guided_channels=z.shape[1])
    x = z.to(torch.float64)
    n = x.shape[0]

    def vel(x_, t_, t_guide=None):
        # guidance is on or off for a whole step: REPA's Heun decides both of its
        # evaluations by the step's start time
        return g(x_, torch.full((n,), t_, device=x.device, dtype=torch.float64), y,
                 t_ if t_guide is None else t_guide)

    # the released grids, from torch.linspace in float64: the guidance interval test is
    # exact, so a grid point one ulp off a bound (numpy's linspace) flips its guidance
    if cfg.sampler in ("euler", "heun"):
        ts = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64).tolist()
        for i, (tc, tn) in enumerate(zip(ts[:-1], ts[1:])):
            d = vel(x, tc)
            x_next = x + (tn - tc) * d
            if cfg.sampler == "heun" and i < cfg.steps - 1:
                d2 = vel(x_next, tn, t_guide=tc)
                x_next = x + (tn - tc) * (0.5 * d + 0.5 * d2)
            x = x_next
        return x.to(torch.float32)
    # Euler-Maruyama, released schedule
    ts = torch.linspace(1.0, cfg.t_min, cfg.steps, dtype=torch.float64).tolist() + [0.0]
    for tc, tn in zip(ts[:-2], ts[1:-1]):
        tc, dt = float(tc), float(tn - tc)
        v = vel(x, tc)
        w = 2 * tc
        drift = v - 0.5 * w * score_from_velocity(v, x, tc, cfg.path_type)
        noise = torch.randn(x.shape, device=x.device, dtype=torch.float64, generator=generator)
        x = x + drift * dt + math.sqrt(w) * math.sqrt(abs(dt)) * noise
    tc, dt = float(ts[-2]), float(ts[-1] - ts[-2])
    v = vel(x, tc)
    drift = v - 0.5 * (2 * tc) * score_from_velocity(v, x, tc, cfg.path_type)
    return (x + dt * drift).to(torch.float32)


# ---------------------------------------------------------------------------- DiT
def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """improved-DDPM's space_timesteps for a single section: `count` evenly spaced steps.
    Its index is a running sum of the fractional stride, rounded (not round(i * stride): the
    two differ by one timestep for 278 of the 1000 possible counts)."""
    if count > num_timesteps:
        raise ValueError(f"cannot take {count} steps out of {num_timesteps}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    taken, cur = set(), 0.0
    for _ in range(count):
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


class SpacedDDPM:
    """DDPM tables for a respaced linear-beta schedule (float64), as SpacedDiffusion."""

    def __init__(self, steps: int = 250, num_timesteps: int = 1000):
        from .objective.ddpm import linear_betas
        base_ac = np.cumprod(1.0 - linear_betas(num_timesteps))
        self.timestep_map = space_timesteps(num_timesteps, steps)
        last, betas = 1.0, []
        for i in self.timestep_map:
            betas.append(1 - base_ac[i] / last)
            last = base_ac[i]
        betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.original_T = num_timesteps
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.t = {
            "log_betas": np.log(betas),
            "sqrt_recip_ac": np.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
            "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
            "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        }

    def p_mean_logvar(self, out, x, i: int, channels: int):
        eps, var_v = out[:, :channels], out[:, channels:]
        tb = {k: float(v[i]) for k, v in self.t.items()}
        frac = (var_v + 1) / 2
        log_var = frac * tb["log_betas"] + (1 - frac) * tb["post_log_var"]
        x0 = tb["sqrt_recip_ac"] * x - tb["sqrt_recipm1_ac"] * eps
        return tb["coef1"] * x0 + tb["coef2"] * x, log_var


@torch.no_grad()
def sample_dit(model, z, y, cfg: SamplerConfig, generator=None):
    cfg.validate("dit")
    c = z.shape[1]
    g = GuidedModel(model, cfg, guided_channels=c)
    d = SpacedDDPM(cfg.steps)
    x = z.to(torch.float64)
    n = x.shape[0]
    for i in reversed(range(d.num_timesteps)):
        t_orig = d.timestep_map[i]
        t = torch.full((n,), t_orig, device=x.device, dtype=torch.long)
        out = g(x, t, y, t_orig / d.original_T)
        if out.shape[1] != 2 * c:
            raise ValueError("DDPM sampling needs a DiT with learned variance (2C outputs)")
        mean, log_var = d.p_mean_logvar(out, x, i, c)
        if i > 0:
            noise = torch.randn(x.shape, device=x.device, dtype=torch.float64,
                                generator=generator)
            x = mean + torch.exp(0.5 * log_var) * noise
        else:
            x = mean
    return x.to(torch.float32)


def sample(model, z, y, cfg: SamplerConfig, kind: str, generator=None):
    """Denoise noise z (N, C, H, W) for labels y with the model of `kind` ("sit"/"dit")."""
    was_training = model.training
    model.eval()
    try:
        fn = sample_dit if kind == "dit" else sample_sit
        return fn(model, z, y, cfg, generator)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N,C,H,W) -> uint8 NHWC, as the released SRA (and REPA) generate.py:
    clamp(255 * (x + 1) / 2), truncated (DiT/SiT's sample_ddp, 127.5x + 128, is one level
    higher on half the values)."""
    return torch.clamp(255.0 * ((x.float() + 1) / 2.0), 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def image_grid(images_u8: np.ndarray, nrow: int, pad: int = 2, min_tile: int = 64):
    """uint8 NHWC -> one PIL image with `nrow` images per row; small tiles are upscaled."""
    from PIL import Image
    n, h, w, c = images_u8.shape
    if c == 1:
        images_u8 = np.repeat(images_u8, 3, axis=3)
    up = max(1, -(-min_tile // max(h, w)))
    if up > 1:
        images_u8 = images_u8.repeat(up, axis=1).repeat(up, axis=2)
        h, w = h * up, w * up
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = images_u8[i]
    return Image.fromarray(grid)


def load_vae(name: str, device):
    """A diffusers AutoencoderKL from a local path or a hub name (loaded by this machine)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise RuntimeError("decoding latents needs diffusers (pip install diffusers), or pass "
                           "--vae none") from None
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:
        raise RuntimeError(f"could not load the VAE {name!r} ({' '.join(str(e).split())[:200]}); "
                           "give a local folder or a hub name reachable from this machine, "
                           "or --vae none") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, z, scale: float = 0.18215, batch: int = 64):
    out = [vae.decode(zb.to(vae.dtype) / scale).sample.float() for zb in z.split(batch)]
    return torch.cat(out)


def grid_labels(num_classes: int, per_class: int = 8, max_classes: int = 10) -> list[int]:
    """Labels for a training-time grid: one row per class (ImageNet: DiT's 8 showcase ones)."""
    if num_classes == 1000:
        classes = [207, 360, 387, 974, 88, 979, 417, 279]
    else:
        classes = list(range(min(num_classes, max_classes)))
    return [c for c in classes for _ in range(per_class)]
