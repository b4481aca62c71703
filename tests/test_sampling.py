"""Samplers: ODE/SDE/DDPM against exact answers, CFG semantics, respacing, image helpers."""
import numpy as np
import pytest
import torch

from sra_fast.objective import GaussianDiffusion
from sra_fast.objective.ddpm import linear_betas
from sra_fast.sampling import (GuidedModel, SamplerConfig, SiTOriginalTime, SpacedDDPM,
                               image_grid, sample_dit, sample_sit, score_from_velocity,
                               space_timesteps, to_uint8)


class _Embed(torch.nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.embedding_table = torch.nn.Embedding(rows, 1)


class DeltaVelocity(torch.nn.Module):
    """The exact SiT velocity when the data is a point mass at c (linear path):
    x_t = (1-t) c + t eps  =>  v = eps - c = (x_t - c) / t."""

    def __init__(self, c, num_classes=3):
        super().__init__()
        self.c, self.num_classes = c, num_classes
        self.y_embedder = _Embed(num_classes + 1)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        return (x - self.c) / t.reshape(-1, 1, 1, 1).clamp_min(1e-12)


class DeltaEps(torch.nn.Module):
    """The exact DDPM eps for a point mass at c, with a zero variance output (2C channels);
    called with ORIGINAL timesteps, as the respaced sampler must do."""

    def __init__(self, c, num_classes=3):
        super().__init__()
        self.c, self.num_classes = c, num_classes
        self.y_embedder = _Embed(num_classes + 1)
        self.ac = torch.from_numpy(np.cumprod(1 - linear_betas(1000)))
        self.ts = []

    def forward(self, x, t, y):
        self.ts.append(int(t[0]))
        a = self.ac[t].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ode_reaches_the_data_point(sampler):
    c = 0.7
    m = DeltaVelocity(c)
    z = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x = sample_sit(m, z, torch.zeros(4, dtype=torch.long), SamplerConfig(sampler, steps=10))
    assert torch.allclose(x, torch.full_like(x, c), atol=1e-5)
    n_eval = 10 if sampler == "euler" else 19    # Heun skips its 2nd evaluation at the end
    assert len(m.calls) == n_eval
    assert m.calls[0][1] == 1.0


class DeltaVelocitySiTTime(DeltaVelocity):
    """The same point mass under the original SiT convention (s = 1 is data):
    x_s = s c + (1-s) eps  =>  v_SiT = c - eps = (c - x_s) / (1 - s)."""

    def forward(self, x, s, y):
        self.calls.append((x.shape[0], float(s[0])))
        return (self.c - x) / (1 - s).reshape(-1, 1, 1, 1).clamp_min(1e-12)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_original_sit_time_convention_is_flipped(sampler):
    """An original-SiT-convention network sampled through SiTOriginalTime gives what the same
    field in our convention gives (same noise); the ODEs reach the data. Without the flip the
    sampler runs away from it."""
    c = 0.7
    m = DeltaVelocitySiTTime(c)
    z = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    cfg = SamplerConfig(sampler, steps=10)
    x = sample_sit(SiTOriginalTime(m), z, y, cfg, generator=torch.Generator().manual_seed(1))
    x_ours = sample_sit(DeltaVelocity(c), z, y, cfg, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x_ours, rtol=1e-5, atol=1e-5)
    if sampler != "sde":
        assert torch.allclose(x, torch.full_like(x, c), atol=1e-4)
    assert m.calls[0][1] == 0.0     # our t = 1 (noise) is SiT's s = 0
    x_bad = sample_sit(m, z, y, SamplerConfig("euler", steps=10))
    assert not torch.allclose(x_bad, torch.full_like(x_bad, c), atol=1e-2)


def test_sde_released_schedule_and_convergence():
    c = -0.4
    m = DeltaVelocity(c)
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x = sample_sit(m, z, torch.zeros(64, dtype=torch.long), SamplerConfig("sde", steps=50),
                   generator=torch.Generator().manual_seed(2))
    # 49 stochastic steps on linspace(1, 0.04, 50), then one deterministic step from 0.04 to 0
    ts = [t for _, t in m.calls]
    assert len(ts) == 50
    assert np.allclose(ts, np.linspace(1, 0.04, 50), atol=1e-7)
    # the reverse SDE ends at t_min with p_t = N((1-t) c, t^2); the final deterministic
    # step maps it to c - t_min * z: mean c, spread ~0.04 (a wrong sign would diverge)
    err = x - c
    assert abs(err.mean().item()) < 0.01
    assert 0.02 < err.std().item() < 0.07, err.std()


def test_score_from_velocity_matches_gaussian_score():
    # point mass at c: p_t = N((1-t) c, t^2) -> score = -(x - (1-t) c) / t^2
    c, t = 0.3, 0.37
    x = torch.randn(5, dtype=torch.float64)
    v = (x - c) / t
    assert torch.allclose(score_from_velocity(v, x, t), -(x - (1 - t) * c) / t ** 2)


def test_ddpm_respaced_reaches_the_data_point():
    c = 0.25
    m = DeltaEps(c)
    z = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x = sample_dit(m, z, torch.zeros(8, dtype=torch.long), SamplerConfig("ddpm", steps=50),
                   generator=torch.Generator().manual_seed(1))
    assert (x - c).abs().max() < 1e-3
    assert m.ts[0] == 999 and m.ts[-1] == 0 and len(m.ts) == 50


def _improved_ddpm_single_section(num_timesteps, count):
    """improved-diffusion's space_timesteps(num_timesteps, [count]), as its loop runs it."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return set(taken)


def test_space_timesteps_like_improved_ddpm():
    s = space_timesteps(1000, 250)
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    assert space_timesteps(1000, 1000) == list(range(1000))
    # every count: a running sum of the stride (round(i * stride) differs at 21, 23, 31...)
    for n in range(1, 1001):
        assert space_timesteps(1000, n) == sorted(_improved_ddpm_single_section(1000, n)), n
    assert 499 in space_timesteps(1000, 21) and 500 not in space_timesteps(1000, 21)


def test_unrespaced_tables_match_training_diffusion():
    d, g = SpacedDDPM(1000), GaussianDiffusion()
    out = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    for i in (0, 1, 500, 999):
        mean, logv = d.p_mean_logvar(out, x, i, 4)
        gm, glogv, _ = g.p_mean_variance(out, x, torch.full((3,), i))
        assert torch.allclose(mean, gm) and torch.allclose(logv, glogv)


class Const(torch.nn.Module):
    """cond output = 2 for real classes, 0 for the null class; counts batch sizes."""

    def __init__(self, channels, num_classes=5):
        super().__init__()
        self.num_classes, self.c = num_classes, channels
        self.y_embedder = _Embed(num_classes + 1)
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        val = (y != self.num_classes).to(x.dtype).reshape(-1, 1, 1, 1) * 2.0
        return val.expand(-1, self.c, *x.shape[2:]) + 0 * x


def test_cfg_all_channels_and_first3_and_interval():
    m = Const(4)
    x = torch.zeros(2, 4, 2, 2)
    y = torch.tensor([1, 2])
    g = GuidedModel(m, SamplerConfig("euler", cfg_scale=3.0, guidance_high=0.7), 4)
    out = g(x, torch.full((2,), 0.5), y, 0.5)
    assert torch.all(out == 6.0) and m.batches[-1] == 4          # uncond 0 + 3 * (2 - 0)
    out = g(x, torch.full((2,), 0.9), y, 0.9)                       # outside [0, 0.7]
    assert torch.all(out == 2.0) and m.batches[-1] == 2
    g3 = GuidedModel(m, SamplerConfig("euler", cfg_scale=3.0, cfg_channels="first3"), 4)
    out = g3(x, torch.full((2,), 0.5), y, 0.5)
    assert torch.all(out[:, :3] == 6.0) and torch.all(out[:, 3:] == 2.0)


def test_cfg_needs_a_null_class():
    m = Const(4)
    m.y_embedder = _Embed(m.num_classes)
    with pytest.raises(ValueError, match="null class"):
        GuidedModel(m, SamplerConfig("euler", cfg_scale=2.0), 4)


@pytest.mark.parametrize("sampler,steps,low", [("euler", 50, 0.2), ("heun", 50, 0.2),
                                                ("sde", 25, 0.2)])
def test_time_grids_are_the_released_torch_grids(sampler, steps, low):
    """Grid points equal torch.linspace's in float64 (as the released samplers build them):
    here one lands exactly on the guidance bound 0.2 (numpy's linspace gives 0.19999...96
    there), so the step at 0.2 is guided, as in the released code."""
    m = Const(2)
    cfg = SamplerConfig(sampler, steps=steps, cfg_scale=2.0, guidance_low=low)
    sample_sit(m, torch.zeros(1, 2, 2, 2), torch.tensor([1]), cfg,
               generator=torch.Generator().manual_seed(0))
    if sampler == "sde":
        grid = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist()
    else:
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    k = grid.index(0.2)                       # the bound itself is a grid point
    # the evaluation(s) of the step starting at grid[k] (Heun: two per step)
    first = 2 * k if sampler == "heun" else k
    assert m.batches[first] == 2, m.batches   # guided: batch doubled
    assert m.batches[first + (2 if sampler == "heun" else 1)] == 1   # the next one: not


def test_heun_guides_both_evaluations_of_a_step_by_its_start_time():
    """REPA's Heun decides guidance once per step, by t_cur: the step from 0.72 to 0.70 is
    unguided (0.72 > 0.7) in both of its evaluations, though the second runs at 0.70."""
    m = Const(2)
    cfg = SamplerConfig("heun", steps=50, cfg_scale=2.0, guidance_high=0.7)
    sample_sit(m, torch.zeros(1, 2, 2, 2), torch.tensor([1]), cfg)
    grid = torch.linspace(1.0, 0.0, 51, dtype=torch.float64).tolist()
    assert len(m.batches) == 99
    for i in range(50):   # evaluations 2i (at t_i) and 2i+1 (at t_{i+1}, not after the last)
        want = 2 if grid[i] <= 0.7 else 1
        pair = m.batches[2 * i:2 * i + 2]
        assert pair == [want] * len(pair), (grid[i], pair)


def test_sampler_config_validation():
    for bad in (0.0, -0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="t-min"):
            SamplerConfig("sde", t_min=bad).validate("sit")
    SamplerConfig("euler", t_min=0.0).validate("sit")   # the ODEs do not use it
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        SamplerConfig("sde", cfg_scale=float("nan")).validate("sit")
    with pytest.raises(ValueError, match="unknown path_type 'Linear'"):
        SamplerConfig("sde", path_type="Linear").validate("sit")
    with pytest.raises(ValueError, match="DiT models sample with ddpm"):
        SamplerConfig("sde").validate("dit")
    with pytest.raises(ValueError, match="SiT models"):
        SamplerConfig("ddpm").validate("sit")
    with pytest.raises(ValueError, match="guidance interval"):
        SamplerConfig("sde", guidance_low=0.8, guidance_high=0.2).validate("sit")


def test_image_helpers():
    x = torch.tensor([[-1.0, 0.0], [1.0, 2.0]]).reshape(1, 1, 2, 2)
    u8 = to_uint8(x)
    # the released SRA/REPA generate.py: clamp(255 * (x + 1) / 2), truncated
    assert u8.shape == (1, 2, 2, 1) and u8.flatten().tolist() == [0, 127, 255, 255]
    img = image_grid(np.zeros((10, 16, 16, 1), np.uint8), nrow=4, pad=2, min_tile=16)
    assert img.size == (4 * 18 + 2, 3 * 18 + 2) and img.mode == "RGB"
