"""SRA objective: losses by name against direct formulas, time sampling, teacher, EMA."""
import math
import warnings

import numpy as np
import pytest
import torch

from sra_fast import ops
from sra_fast.models import DiT_models, SiT_models
from sra_fast.objective import (GaussianDiffusion, SRAConfig, SRAObjective, Transport,
                                align_weight, ema_update, make_ema)
from sra_fast.ops.reference import align_loss_ref


def hs_ht(gen, N=3, T=5, D=7):
    return torch.randn(N, T, D, generator=gen), torch.randn(N, T, D, generator=gen)


def test_align_losses_against_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    h_s, h_t = hs_ht(gen)
    N, T, D = h_s.shape
    # cos: per token over features
    cos_tok = torch.zeros(N, T)
    for n in range(N):
        for i in range(T):
            a, b = h_s[n, i], h_t[n, i]
            cos_tok[n, i] = 1 - (a @ b) / (a.norm() * b.norm())
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "cos"), cos_tok.mean(1))
    # cos-released: over the TOKEN axis (dim=1), per channel
    cos_ch = torch.zeros(N, D)
    for n in range(N):
        for d in range(D):
            a, b = h_s[n, :, d], h_t[n, :, d]
            cos_ch[n, d] = 1 - (a @ b) / (a.norm() * b.norm())
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "cos-released"), cos_ch.mean(1))
    assert not torch.allclose(cos_ch.mean(1), cos_tok.mean(1))   # the axis matters
    # smooth-l1 beta 0.05
    d = (h_s - h_t).abs()
    sl1 = torch.where(d < 0.05, 0.5 * d ** 2 / 0.05, d - 0.025)
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "smooth-l1"), sl1.flatten(1).mean(1))
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "l1"), d.flatten(1).mean(1))
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "l2"), (d ** 2).flatten(1).mean(1))
    # batch means equal the released code's means over all elements
    torch.testing.assert_close(align_loss_ref(h_s, h_t, "cos-released").mean(),
                               (1 - torch.nn.functional.cosine_similarity(h_s, h_t)).mean())
    with pytest.raises(ValueError, match="unknown alignment loss 'cosine'.*cos-released"):
        ops.align_loss(h_s, h_t, "cosine")


def test_upcast_reference_returns_fp32_and_matches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen).bfloat16()
    sh, sc = torch.randn(2, 16, generator=gen).bfloat16(), torch.randn(2, 16, generator=gen).bfloat16()
    up = ops.reference.adaln_norm_ref(x, sh, sc, upcast=True)
    low = ops.reference.adaln_norm_ref(x, sh, sc)
    assert up.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert (up - low.float()).abs().max() < 0.1


def test_weight_schedules():
    assert align_weight("constant", 500, 0.5) == 0.5
    assert align_weight("smooth-l1-decay-sit-256", 0) == pytest.approx(0.2)
    assert align_weight("smooth-l1-decay-sit-256", 149) == pytest.approx(0.2)
    assert align_weight("smooth-l1-decay-sit-256", 1149) == pytest.approx(2 * 0.1 ** 2)
    assert align_weight("smooth-l1-decay-sit-512", 899) == pytest.approx(2 * 0.1 ** 2)
    assert align_weight("smooth-l1-decay-dit-256", 10) == pytest.approx(0.04)
    assert align_weight("smooth-l1-decay-dit-512", 499) == pytest.approx(0.4 * 0.1 ** 1.5)
    with pytest.raises(ValueError, match="unknown weight schedule"):
        align_weight("cosine-decay", 1)


def test_transport_paths_and_samplers():
    x0, eps, t = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2), torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt, v = Transport("linear").interpolate(x0, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(v, eps - x0)
    xt, v = Transport("cos").interpolate(x0, eps, t)   # released CLI spelling accepted
    a, s = torch.cos(math.pi / 2 * tt), torch.sin(math.pi / 2 * tt)
    torch.testing.assert_close(xt, a * x0 + s * eps)
    torch.testing.assert_close(v, -math.pi / 2 * s * x0 + math.pi / 2 * a * eps)
    g = torch.Generator().manual_seed(0)
    ln = Transport("linear", "lognormal").sample_t(20000, "cpu", g)
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown path type"):
        Transport("quadratic")
    with pytest.raises(ValueError, match="unknown time sampler"):
        Transport("linear", "beta")


def test_ddpm_hybrid_loss_against_direct_formula():
    diff = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 4, 2, 2, generator=gen)
    t = torch.tensor([0, 600])
    xt = diff.q_sample(x0, eps, t)
    torch.testing.assert_close(xt[1], float(np.sqrt(ac[600])) * x0[1] + float(np.sqrt(1 - ac[600])) * eps[1])
    out = torch.randn(2, 8, 2, 2, generator=gen)
    loss = diff.loss(out, x0, xt, eps, t)
    # direct: sample 1 (t=600) -> mse + KL(q(x_599|x_600,x0) || p) / log 2
    n, tt = 1, 600
    e_hat, v = out[n, :4].double(), out[n, 4:].double()
    x0d, xtd = x0[n].double(), xt[n].double()
    pv = betas * (1 - np.append(1, ac[:-1])) / (1 - ac)
    min_log, max_log = np.log(pv[tt]), np.log(betas[tt])
    logvar = (v + 1) / 2 * max_log + (1 - (v + 1) / 2) * min_log
    x0_hat = np.sqrt(1 / ac[tt]) * xtd - np.sqrt(1 / ac[tt] - 1) * e_hat
    c1 = betas[tt] * np.sqrt(ac[tt - 1]) / (1 - ac[tt])
    c2 = (1 - ac[tt - 1]) * np.sqrt(1 - betas[tt]) / (1 - ac[tt])
    mu_true, mu = c1 * x0d + c2 * xtd, c1 * x0_hat + c2 * xtd
    lv_true = math.log(pv[tt])
    kl = 0.5 * (-1 + logvar - lv_true + math.exp(lv_true) * torch.exp(-logvar)
                + (mu_true - mu) ** 2 * torch.exp(-logvar))
    expect = ((eps[n].double() - e_hat) ** 2).mean() + kl.mean() / math.log(2)
    assert loss[1].item() == pytest.approx(expect.item(), rel=1e-4)
    # t = 0 uses the discretised decoder NLL, a different (finite) term
    assert torch.isfinite(loss[0])
    # the VLB term does not move the eps prediction: grad of the mean part = MSE grad only
    o = out.clone().requires_grad_(True)
    diff.loss(o, x0, xt, eps, t).sum().backward()
    torch.testing.assert_close(o.grad[:, :4], 2 * (o[:, :4] - eps).detach() / 16)
    with pytest.raises(ValueError, match="8 output channels"):
        diff.loss(out[:, :4], x0, xt, eps, t)


def tiny(kind="sit", **kw):
    ctor = SiT_models["SiT-S/8"] if kind == "sit" else DiT_models["DiT-S/8"]
    return ctor(input_size=16, num_classes=10, **kw)


def test_teacher_time_is_earlier_and_clamped():
    g = torch.Generator().manual_seed(0)
    obj = SRAObjective(SRAConfig(block_out_s=2, block_out_t=4, t_max=0.2), "sit", 12)
    t, tt = obj.sample_times(20000, "cpu", g)
    assert (tt <= t).all() and (tt >= 0).all() and ((t - tt) <= 0.2 + 1e-6).all()
    assert (tt == 0).any()                               # clamped at 0 for small t
    assert abs((t - tt)[t > 0.3].mean().item() - 0.1) < 0.005   # delta ~ U(0, t_max)
    dobj = SRAObjective(SRAConfig(block_out_s=2, block_out_t=4, t_max=0.2), "dit", 12)
    t, tt = dobj.sample_times(20000, "cpu", g)
    assert t.dtype == torch.long and tt.dtype == torch.long
    assert tt.min() >= 1 and tt.max() <= 999
    d = (t - tt)[t > 300]
    assert d.min() == 0 and d.max() == 199                 # randint(0, 200)


def test_config_validation():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="t_max must be in"):
            SRAConfig(t_max=bad).validate(12)
    with pytest.raises(ValueError, match=r"block-out-t 13 is outside 1\.\.12"):
        SRAConfig(block_out_s=2, block_out_t=13).validate(12)
    with pytest.raises(ValueError, match="unknown alignment loss"):
        SRAConfig(block_out_s=2, block_out_t=4, loss_type="mse").validate(12)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        SRAConfig(block_out_s=9, block_out_t=4).validate(12)
        SRAConfig(block_out_s=9, block_out_t=4).validate(12)
    assert sum("not deeper" in str(x.message) for x in w) == 1   # warned once


class Recorder(torch.nn.Module):
    """Wraps a model and records what it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y, hidden_block=None):
        self.calls.append(("forward", x.clone(), t.clone(), y.clone(), torch.is_grad_enabled()))
        return self.model(x, t, y, hidden_block=hidden_block)

    def forward_hidden(self, x, t, y, k):
        self.calls.append(("hidden", x.clone(), t.clone(), y.clone(), torch.is_grad_enabled()))
        return self.model.forward_hidden(x, t, y, k)

    def drop_labels(self, y, generator=None):
        return self.model.drop_labels(y, generator)


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_student_and_teacher_share_noise_labels_and_only_student_learns(kind):
    torch.manual_seed(0)
    m = tiny(kind, class_dropout_prob=0.5)
    teacher = make_ema(m)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    s, tch = Recorder(m), Recorder(teacher)
    obj = SRAObjective(SRAConfig(block_out_s=2, block_out_t=4), kind, 12)
    x0, y = torch.randn(16, 4, 16, 16), torch.arange(16) % 10
    g = torch.Generator().manual_seed(3)
    loss, den, ali = obj(s, tch, x0, y, 0.5, generator=g)
    (_, xs, ts, ys, grad_s), = s.calls
    (_, xt, tt, yt, grad_t), = tch.calls
    assert grad_s and not grad_t
    assert torch.equal(ys, yt) and (ys == 10).any() and (ys != 10).any()   # same dropped labels
    assert (tt <= ts).all()
    # same x0 and eps: recover eps from both inputs
    if kind == "sit":
        ts4, tt4 = ts.view(-1, 1, 1, 1), tt.view(-1, 1, 1, 1)
        keep = (ts > 0.05) & (tt > 0.05)
        eps_s = (xs - (1 - ts4) * x0) / ts4
        eps_t = (xt - (1 - tt4) * x0) / tt4
        torch.testing.assert_close(eps_s[keep], eps_t[keep], rtol=1e-3, atol=1e-3)
    else:
        d = obj.diffusion
        a_s, s_s = d._gather("sqrt_alphas_cumprod", ts, x0), d._gather("sqrt_one_minus_alphas_cumprod", ts, x0)
        a_t, s_t = d._gather("sqrt_alphas_cumprod", tt, x0), d._gather("sqrt_one_minus_alphas_cumprod", tt, x0)
        torch.testing.assert_close((xs - a_s * x0) / s_s, (xt - a_t * x0) / s_t, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(loss, den.mean() + 0.5 * ali.mean())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert m.ap_head.linear1.weight.grad is not None and m.ap_head.linear1.weight.grad.abs().sum() > 0
    # adaLN-Zero: gates start at 0, so the first gradient reaches the modulation layers
    assert m.blocks[1].adaLN_modulation[1].weight.grad.abs().sum() > 0


def test_randomness_comes_from_the_generator():
    m = tiny()
    teacher = make_ema(m)
    obj = SRAObjective(SRAConfig(block_out_s=2, block_out_t=4), "sit", 12)
    x0, y = torch.randn(4, 4, 16, 16), torch.arange(4)
    a = obj(m, teacher, x0, y, 0.5, generator=torch.Generator().manual_seed(7))[0]
    torch.manual_seed(123)   # the global RNG must not matter
    b = obj(m, teacher, x0, y, 0.5, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_ema_update_foreach():
    m = tiny()
    e = make_ema(m)
    for p in e.parameters():
        assert p.data_ptr() not in {q.data_ptr() for q in m.parameters()}
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = [p.clone() for p in e.parameters()]
    ema_update(e, m, 0.9)
    for (name, p), b, q in zip(e.named_parameters(), before, m.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * q)
    ema_update(e, m, torch.tensor(0.5))   # device-scalar decay (graph capture)


def test_ema_update_device_weight_is_the_float_lerp_bitwise():
    """The graph step's EMA (a 0-d tensor weight; 0 on a skipped step) computes exactly the
    eager float lerp, with no model-sized temporary."""
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    e1, e2, e3 = make_ema(m), make_ema(m), make_ema(m)
    with torch.no_grad():
        for e in (e1, e2, e3):
            for p in e.parameters():
                p.mul_(0.5)
    ema_update(e1, m, 0.9999)
    ema_update(e2, m, weight=(1.0 - 0.9999) * torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(e1.parameters(), e2.parameters()))
    before = [p.clone() for p in e3.parameters()]
    ema_update(e3, m, weight=torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(e3.parameters(), before))
