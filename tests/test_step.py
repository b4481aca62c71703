"""The training step on CPU: non-finite skip, gradient accumulation, teacher without autograd,
graph-mode refusal, the captured code path (cuda_graph="emulate") against the eager step,
the bf16 teacher shadow and the full (released-style) teacher."""
import contextlib
import warnings

import pytest
import torch

from sra_fast import ops
from sra_fast.models.dit import DiT, SiT
from sra_fast.objective import SRAConfig, SRAObjective, make_ema
from sra_fast.step import TrainStep, make_optimizer


@pytest.fixture(autouse=True)
def _ref_ops():
    with ops.use_backend("ref"):   # plain PyTorch: fast on CPU, no Triton interpreter
        yield


def build(cls=SiT, *, precision="bf16", grad_accum=1, mode=False, opt="adamw", lr=1e-3,
          seed=0, gen_seed=1, **step_kw):
    torch.manual_seed(seed)
    m = cls(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    ema = make_ema(m)
    obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
    if opt == "adamw":
        o = make_optimizer(m, lr=lr)
    else:
        o = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, fused=True)
    g = torch.Generator().manual_seed(gen_seed)
    step = TrainStep(m, ema, obj, o, precision=precision, grad_accum=grad_accum, generator=g,
                     cuda_graph=mode, **step_kw)
    return m, ema, o, step


def batches(n=3, bs=4, seed=5, bad=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x, y = torch.randn(bs, 4, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)
        if i == bad:
            x[0, 0, 0, 0] = float("inf")
        out.append((x, y))
    return out


def snapshot(m, ema, opt):
    s = [p.detach().clone() for p in list(m.parameters()) + list(ema.parameters())]
    for st in opt.state.values():
        s += [v.detach().clone() for v in st.values()]
    return s


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ eager behaviour
@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_nonfinite_step_skips_update_and_counts(bad_value):
    m, ema, opt, step = build()
    (x, y), = batches(1)
    step(x, y, 0.5)                               # a normal step creates optimizer state
    before = snapshot(m, ema, opt)
    x_bad = x.clone()
    x_bad[1, 2, 3, 4] = bad_value
    step(x_bad, y, 0.5)
    assert same(before, snapshot(m, ema, opt))    # weights, EMA, Adam moments and step count
    st = step.read_stats()
    assert st["nonfinite"] == 1 and st["steps"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in st.values())
    step(x, y, 0.5)                               # and training goes on
    assert not same(before, snapshot(m, ema, opt))
    assert step.read_stats()["nonfinite"] == 0


class FixedDraw(SRAObjective):
    """Draws t, t', eps and dropped labels from fixed full-batch tensors, micro-batch by
    micro-batch in order: the same randomness whatever the accumulation split."""

    def set(self, t, tt, eps, y):
        self.t, self.tt, self.eps, self.y, self.pos = t, tt, eps, y, 0

    def draw(self, x0, y, model, generator=None):
        sl = slice(self.pos, self.pos + x0.shape[0])
        self.pos += x0.shape[0]
        return self.t[sl], self.tt[sl], self.eps[sl], self.y[sl]


@pytest.mark.parametrize("cls", [SiT, DiT])
def test_grad_accumulation_equals_full_batch(cls):
    # fused SGD: the update is linear in the gradient, so it compares the gradients
    # themselves (Adam's first step is ~lr*sign(g) and would hide or amplify rounding)
    results = []
    n = 8
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    t = torch.rand(n, generator=g)
    if cls is DiT:
        t = (t * 999).long()
    tt = (t - 1).clamp(min=0) if cls is DiT else (t - 0.1).clamp(min=0)
    eps = torch.randn(x.shape, generator=g)
    y_drop = torch.where(torch.arange(n) % 5 == 0, torch.full_like(y, 10), y)
    for accum in (1, 2):
        m, ema, opt, step = build(cls, precision="fp32", grad_accum=accum, opt="sgd", lr=0.5)
        step.objective = FixedDraw.for_model(m, step.objective.cfg)
        step.objective.set(t, tt, eps, y_drop)
        p0 = [p.detach().clone() for p in m.parameters()]
        step(x, y, 0.5)
        results.append(([p.detach() - q for p, q in zip(m.parameters(), p0)],
                        [p.detach().clone() for p in ema.parameters()], step.read_stats()))
    (d1, e1, s1), (d2, e2, s2) = results
    assert any(d.abs().max() > 0 for d in d1)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(e1, e2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for k in ("loss", "denoise_loss", "align_loss", "grad_norm"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-5)


def test_batch_not_divisible_by_accumulation():
    *_, step = build(grad_accum=3)
    (x, y), = batches(1, bs=4)
    with pytest.raises(ValueError, match="cannot be split into 3"):
        step(x, y, 0.5)


def test_teacher_gets_no_grad_and_is_not_updated_by_autograd():
    m, ema, opt, step = build()
    seen = []
    orig = ema.forward_hidden

    def spy(*a, **k):
        h = orig(*a, **k)
        seen.append((h.requires_grad, torch.is_grad_enabled()))
        return h

    ema.forward_hidden = spy
    for x, y in batches(2):
        step(x, y, 0.5)
    assert seen == [(False, False), (False, False)]
    assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
    assert all(p.grad is None for p in m.parameters())   # set_to_none after the step


# ------------------------------------------------------------------ graph mode
def test_graph_mode_on_cpu_refuses_clearly_and_runs_eagerly(capsys):
    m1, e1, o1, eager = build()
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        m2, e2, o2, graph = build(mode=True)
    assert "running eagerly" in capsys.readouterr().out
    assert not graph.graph_mode and "cpu" in graph.graph_refusal
    for x, y in batches(2):
        eager(x, y, 0.5)
        graph(x, y, 0.5)
    assert same(snapshot(m1, e1, o1), snapshot(m2, e2, o2))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        build(mode="strict")
    with pytest.raises(ValueError, match="cuda_graph must be"):
        build(mode="yes")


def test_graph_mode_refuses_fp16_and_wrappers():
    with pytest.raises(RuntimeError, match="GradScaler"):
        build(precision="fp16", mode="emulate")

    class FakeDDP(torch.nn.Module):      # anything with no_sync is treated as DDP
        def __init__(self, m):
            super().__init__()
            self.module = m

        def no_sync(self):
            return contextlib.nullcontext()

    m, ema, opt, _ = build()
    obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
    with pytest.raises(RuntimeError, match="DDP"):
        TrainStep(m, ema, obj, opt, student=FakeDDP(m), cuda_graph="emulate")
    foreach = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
    with pytest.raises(RuntimeError, match="fused"):
        TrainStep(m, ema, obj, foreach, cuda_graph="emulate")


def test_graph_mode_refuses_real_ddp(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        m, ema, opt, _ = build()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
        with pytest.raises(RuntimeError, match="DDP"):
            TrainStep(m, ema, obj, opt, student=ddp, cuda_graph="emulate")
        with pytest.warns(UserWarning, match="DDP"):
            step = TrainStep(m, ema, obj, opt, student=ddp, cuda_graph=True)
        assert not step.graph_mode
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls,precision,accum", [(SiT, "bf16", 1), (SiT, "fp32", 2),
                                                 (DiT, "bf16", 2), (DiT, "fp32", 1)])
def test_captured_code_path_is_bitwise_the_eager_step(cls, precision, accum):
    """cuda_graph="emulate" runs exactly what gets captured (static buffers, device-scalar
    weight and lr, skip-forced warm-up, RNG restore) without a GPU: bitwise = eager, through
    a non-finite step and an lr change."""
    runs = []
    for mode in (False, "emulate"):
        m, ema, opt, step = build(cls, precision=precision, grad_accum=accum, mode=mode)
        for i, (x, y) in enumerate(batches(4, bad=1)):
            if i == 3:
                opt.param_groups[0]["lr"] = 3e-4
            step(x, y, torch.tensor(0.25) if i == 2 else 0.5)
        runs.append((snapshot(m, ema, opt), step.read_stats(), step))
    (s1, st1, _), (s2, st2, graph) = runs
    assert graph.graph_mode and graph.captures == 1
    assert st1 == st2 and st1["nonfinite"] == 1 and st1["steps"] == 4
    assert same(s1, s2)
    assert opt.param_groups[0]["lr"] == 3e-4      # the trainer keeps seeing floats


def test_replaced_optimizer_state_forces_recapture_and_stays_exact():
    import copy
    runs = []
    for mode in (False, "emulate"):
        m, ema, opt, step = build(mode=mode)
        data = batches(3)
        step(*data[0], 0.5)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # a resume: new state tensors
        step(*data[1], 0.5)
        step(*data[2], 0.5)
        runs.append((snapshot(m, ema, opt), step))
    assert runs[1][1].captures == 2
    assert same(runs[0][0], runs[1][0])


def test_changed_settings_force_recapture_and_stay_exact():
    """betas / weight decay / grad_clip / ema_decay are launch arguments of a captured step:
    changing one re-captures (an eager step sees it at once, so must the graph); lr is a
    device scalar and does not."""
    runs = []
    for mode in (False, "emulate"):
        m, ema, opt, step = build(mode=mode)
        data = batches(5)
        step(*data[0], 0.5)
        opt.param_groups[0]["lr"] = 2e-4                 # no re-capture
        step(*data[1], 0.5)
        opt.param_groups[0]["weight_decay"] = 0.05
        opt.param_groups[0]["betas"] = (0.8, 0.99)
        step(*data[2], 0.5)
        step.grad_clip = 0.5
        step(*data[3], 0.5)
        step.ema_decay = 0.9
        step(*data[4], 0.5)
        runs.append((snapshot(m, ema, opt), step))
    assert runs[1][1].captures == 4
    assert same(runs[0][0], runs[1][0])


def test_a_tensor_lr_changed_in_place_reaches_the_captured_step():
    """LR schedulers update a tensor lr in place (same object): the captured step must see
    the new value, and the group keeps the user's tensor."""
    m, ema, opt, step = build(mode="emulate")
    lr = torch.tensor(1e-3)
    opt.param_groups[0]["lr"] = lr
    data = batches(3)
    step(*data[0], 0.5)
    assert step._lr_dev[0].item() == pytest.approx(1e-3)
    lr.fill_(5e-4)
    step(*data[1], 0.5)
    assert step._lr_dev[0].item() == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] is lr


def test_emulated_warmup_changes_nothing():
    m, ema, opt, step = build(mode="emulate", graph_warmup=3)
    before = snapshot(m, ema, opt)
    rng = step.generator.get_state()
    (x, y), = batches(1)
    step._capture(x, y)
    assert same(before, snapshot(m, ema, opt)[:len(before)])
    assert all(int(st["step"]) == 0 for st in opt.state.values())
    assert torch.equal(step.generator.get_state(), rng)
    assert step.read_stats()["steps"] == 0


# ------------------------------------------------------------------ teacher variants
def test_bf16_shadow_teacher_is_bitwise_autocast_teacher():
    m, ema, opt, step = build(teacher_bf16=True)
    shadow = step.shadow
    assert shadow.nbytes() > 0
    assert all(q.dtype == torch.bfloat16 for q in shadow.dst)
    # shared, not copied: embedding table and blocks past block_out_t are the EMA's tensors
    assert shadow.module.y_embedder.embedding_table.weight is ema.y_embedder.embedding_table.weight
    assert shadow.module.blocks[3].mlp.fc1.weight is ema.blocks[3].mlp.fc1.weight
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 10, (3,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ema.forward_hidden(x, t, y, 3)
        got = shadow.module.forward_hidden(x, t, y, 3)
    assert torch.equal(want, got)


def test_bf16_shadow_step_is_bitwise_the_plain_step_and_resyncs():
    runs = []
    for shadow in (False, True):
        m, ema, opt, step = build(teacher_bf16=shadow)
        for x, y in batches(3):
            step(x, y, 0.5)
        runs.append((m, ema, opt, step))
    assert same(snapshot(*runs[0][:3]), snapshot(*runs[1][:3]))
    # a checkpoint loaded into the EMA outside the step is picked up by the shadow
    _, ema, _, step = runs[1]
    with torch.no_grad():
        ema.blocks[0].attn.qkv.weight.mul_(2)
    assert step.shadow.refresh_if_stale()
    assert torch.equal(step.shadow.module.blocks[0].attn.qkv.weight,
                       ema.blocks[0].attn.qkv.weight.bfloat16())
    assert not step.shadow.refresh_if_stale()
    with pytest.raises(ValueError, match="bf16"):
        build(precision="fp32", teacher_bf16=True)


def test_fused_ema_option():
    """ema_impl="fused" (FusedEMA: the extension when built, else the same lerps) gives the
    default's weights, EMA and Adam state bit for bit (both lerp; a skipped step has weight
    0), refreshes the shadow in the same pass, and its captured code path is bitwise its
    eager path."""
    runs = []
    for impl, mode in (("foreach", False), ("fused", False), ("fused", "emulate")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "FusedEMA: using the PyTorch reference"
            m, ema, opt, step = build(teacher_bf16=True, ema_impl=impl, mode=mode)
        for x, y in batches(3, bad=1):
            step(x, y, 0.5)
        runs.append((m, ema, opt, step))
    (m0, e0, o0, _), (m1, e1, o1, s1), (m2, e2, o2, _) = runs
    assert same(snapshot(m1, e1, o1), snapshot(m2, e2, o2))
    assert same(snapshot(m0, e0, o0), snapshot(m1, e1, o1))
    for src, dst in zip(s1.shadow.src, s1.shadow.dst):
        assert torch.equal(dst, src.detach().bfloat16())
    assert not s1.shadow.refresh_if_stale()
    with pytest.raises(ValueError, match="ema_impl"):
        build(ema_impl="cuda")


def close_snapshots(a, b, rtol=2e-6, atol=1e-7):
    return len(a) == len(b) and all(torch.allclose(x.float(), y.float(), rtol=rtol, atol=atol)
                                    for x, y in zip(a, b))


def test_adamw_ema_one_pass_option():
    """ema_impl="adamw" (AdamW + EMA + shadow in one pass of the C++ extension, JIT-built
    here): in fp32, the default's weights, EMA and Adam state to fp32 rounding (torch's CUDA
    AdamW arithmetic vs its CPU kernel) through a non-finite step and an lr change; in bf16
    with the teacher shadow, the captured code path is bitwise its eager path and the shadow
    is bf16(EMA); after a resume (new optimizer state tensors) the step is bitwise the one
    without the reload."""
    import copy

    from sra_fast import ext
    if ext.load(jit=True) is None:
        pytest.skip(f"extension unavailable: {ext.unavailable_reason()}")

    def run(impl, mode=False, reload=False, **kw):
        m, ema, opt, step = build(ema_impl=impl, mode=mode, **kw)
        for i, (x, y) in enumerate(batches(5, bad=1)):
            if i == 3:
                opt.param_groups[0]["lr"] = 3e-4
                if reload:   # a resume: new state tensors with the same values
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            step(x, y, 0.5)
        return snapshot(m, ema, opt), step.read_stats(), step, opt

    ref, st_ref, _, _ = run("foreach", precision="fp32")
    one, st_one, step, opt = run("adamw", precision="fp32")
    assert step._adamw_ema.fused
    assert st_ref["nonfinite"] == st_one["nonfinite"] == 1
    assert close_snapshots(ref, one)
    assert all(int(st["step"]) == 4 for st in opt.state.values())   # 5 steps, one skipped
    untrained = [p.detach().clone() for p in build(precision="fp32")[0].parameters()]
    assert not close_snapshots(one[:len(untrained)], untrained)   # it did train

    eager, st_e, s_e, _ = run("adamw", teacher_bf16=True)
    graph, st_g, s_g, _ = run("adamw", mode="emulate", teacher_bf16=True)
    reloaded, _, _, _ = run("adamw", teacher_bf16=True, reload=True)
    assert s_g.graph_mode and st_e == st_g
    assert same(eager, graph) and same(eager, reloaded)
    for src, dst in zip(s_e.shadow.src, s_e.shadow.dst):
        assert torch.equal(dst, src.detach().bfloat16())
    assert not s_e.shadow.refresh_if_stale()
    with pytest.raises(ValueError, match="fused=True"):
        build(precision="fp16", ema_impl="adamw")
    with pytest.raises(ValueError, match="not torch.optim.AdamW"):
        build(opt="sgd", ema_impl="adamw")


def test_full_teacher_gives_the_same_step():
    runs = []
    for full in (False, True):
        m, ema, opt, step = build(DiT, teacher_full=full)
        for x, y in batches(2):
            step(x, y, 0.5)
        runs.append(snapshot(m, ema, opt))
    assert same(*runs)


def test_fp32_teacher_runs_outside_the_students_autocast(monkeypatch):
    """teacher_fp32: the released teacher (outside accelerate's autocast): its hidden state
    is bitwise the EMA's fp32 forward, while the student still runs in bf16."""
    seen = []
    real = ops.align_loss
    monkeypatch.setattr(ops, "align_loss", lambda h_s, h_t, kind: (seen.append((h_s, h_t)),
                                                                  real(h_s, h_t, kind))[1])
    m, ema, opt, step = build(teacher_fp32=True)
    x, y = batches(1)[0]
    g_state = step.generator.get_state()
    step(x, y, 0.5)
    h_s, h_t = seen[-1]
    assert h_s.dtype == torch.bfloat16 and h_t.dtype == torch.float32
    # the same draws, the teacher's forward by hand in fp32 (the EMA has moved: use a copy
    # taken before the update)
    m2, ema2, _, step2 = build(teacher_fp32=True)
    step2.generator.set_state(g_state)
    obj = step2.objective
    t, t_teacher, eps, y2 = obj.draw(x, y, ema2, step2.generator)
    x_tt, _ = obj.noisy(x, eps, t_teacher)
    with torch.no_grad():
        want = ema2.forward_hidden(x_tt, t_teacher, y2, obj.cfg.block_out_t)
    assert torch.equal(h_t, want)
    # under the step's autocast (the default) the teacher's matmuls are bf16: it differs
    m3, ema3, _, step3 = build()
    seen.clear()
    step3(x, y, 0.5)
    assert not torch.equal(seen[-1][1], h_t)
    with pytest.raises(ValueError, match="exclude each other"):
        build(teacher_fp32=True, teacher_bf16=True)


def test_nvtx_views_do_not_change_the_step(monkeypatch):
    import sra_fast.step as step_mod
    runs = []
    for on in (False, True):
        monkeypatch.setattr(step_mod, "nvtx_enabled", lambda on=on: on)
        m, ema, opt, step = build()
        for x, y in batches(2):
            step(x, y, 0.5)
        runs.append(snapshot(m, ema, opt))
    assert same(*runs)


def test_profiling_helper_is_a_noop_without_cuda():
    from sra_fast.profiling import nvtx_enabled, nvtx_range, set_nvtx
    set_nvtx(True)
    try:
        with nvtx_range("x"):
            pass
        assert nvtx_enabled() == torch.cuda.is_available()
    finally:
        set_nvtx(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with nvtx_range("y"):
            pass


def test_non_fused_optimizer_steps_and_skips_non_finite():
    """A non-fused AdamW has no device-side found_inf skip: the step must still update on
    finite steps and skip non-finite ones (with a host sync, outside graph mode)."""
    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    ema = make_ema(m)
    obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
    o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    step = TrainStep(m, ema, obj, o, precision="fp32", generator=torch.Generator().manual_seed(1))
    (x, y), (xb, yb) = batches(2, bad=1)
    before = snapshot(m, ema, o)
    step(x, y, 0.5)
    after = snapshot(m, ema, o)
    assert not same(before, after)
    step(xb, yb, 0.5)
    assert same(after, snapshot(m, ema, o))
    stats = step.read_stats()
    assert stats["nonfinite"] == 1 and stats["steps"] == 2


# ------------------------------------------------------------------ gradient clipping
@pytest.mark.parametrize("clip", [1e-3, 1e3], ids=["clipping", "not-clipping"])
def test_clip_folded_into_fused_adamw_equals_clip_grad_norm(clip):
    """With torch's fused AdamW the clip is the optimizer's grad_scale (no extra pass over the
    gradients): weights, EMA and Adam moments as clip_grad_norm_ + AdamW give them. The first
    moment is (1-beta1) * the clipped gradient, so a clip not applied would show at once."""
    results = []
    for mode in ("optimizer", "foreach"):
        m, ema, opt, step = build(precision="fp32", grad_clip=clip)
        assert step._clip_mode == "optimizer"          # fused AdamW, no GradScaler
        step._clip_mode = mode
        for x, y in batches(3):
            step(x, y, 0.5)
        assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
        results.append((snapshot(m, ema, opt), step.read_stats()))
    (a, sa), (b, sb) = results
    assert len(a) == len(b)
    for x, y in zip(a, b):   # normwise: rounding differs (x * c vs x / (1/c)) and feeds on
        assert (x - y).abs().max() <= 1e-5 * y.abs().max() + 1e-12   # through later steps
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-6)
    if clip < 1:
        assert sa["grad_norm"] > 10 * clip        # the clip was active


def test_grad_clip_inf_turns_clipping_off_and_zero_is_refused():
    m, ema, opt, step = build(precision="fp32", grad_clip=float("inf"))
    assert step._clip_mode == "off"
    (x, y), = batches(1)
    step(x, y, 0.5)
    assert step.read_stats()["grad_norm"] > 0
    assert build(precision="fp32", grad_clip=None)[3]._clip_mode == "off"
    for bad in (0.0, -1.0, float("nan"), "1.0"):
        with pytest.raises(ValueError, match="grad_clip must be a number > 0"):
            build(grad_clip=bad)
