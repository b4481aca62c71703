"""One-pass AdamW + EMA (+ bf16 shadow) (csrc/fused_adamw_ema*, sra_fast.ext.FusedAdamWEMA)
against its definition fused_adamw_ema_ref (torch._fused_adamw_, then the EMA lerp).

CPU: the extension is JIT-built (cached) and compared over several steps with moving
gradients, a skipped (found_inf) step, grad_scale on and off, weight decay on and off, frozen
tensors (EMA only) and NaN-poisoned shadows. The CPU loops use torch's double-coefficient
AdamW arithmetic (that of torch's CUDA kernel before 2.11); torch's CPU kernel rounds
differently, so parameters and moments agree to fp32 rounding there (a few ulps), not bit for
bit. The CUDA kernel copies the installed torch's CUDA arithmetic (all fp32 with fma moments
since torch 2.11: 1 - 0.999f differs from 1 - 0.999 by ~1e-5 relative, which a tight
exp_avg_sq comparison sees; csrc/fused_adamw_ema.h). Step counters, skipped steps,
frozen tensors' EMA and the shadow = bf16(EMA) relation are exact.
CUDA (marker `cuda`): against torch's own CUDA fused AdamW, inside a captured CUDA graph too.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sra_fast import ext

SHAPES = [(7,), (1000,), (33, 5), (2 * 16384 + 5,), (4, 4)]   # last: frozen (EMA only)
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture(scope="module")
def ext_mod():
    mod = ext.load(jit=True)
    if mod is None:
        pytest.skip(f"extension unavailable: {ext.unavailable_reason()}")
    return mod


def make_state(device, wd, seed=0, offset=0):
    """(params, emas, shadows, optimizer): the last tensor is frozen (not in the optimizer).
    offset > 0: parameters are views `offset` elements into a buffer (not 16-byte aligned:
    the CUDA kernel's scalar path instead of its 4-wide one)."""
    g = torch.Generator().manual_seed(seed)

    def param(shape):
        t = torch.randn(*shape, generator=g)
        buf = torch.empty(t.numel() + offset, device=device)
        view = buf[offset:].view(shape)
        view.copy_(t)
        return torch.nn.Parameter(view)
    ps = [param(s) for s in SHAPES]
    ps[-1].requires_grad_(False)
    emas = [(p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g)).to(device)
            for p in ps]
    shadows = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device=device)
               if i % 2 == 0 else None for i, p in enumerate(ps)]
    opt = torch.optim.AdamW([p for p in ps if p.requires_grad], lr=1e-3, weight_decay=wd,
                            fused=True, capturable=device != "cpu")
    return ps, emas, shadows, opt


def state_lists(ps, opt):
    out = ([], [], [])
    for p in ps:
        st = opt.state[p] if p.requires_grad else None
        if st is not None and not st:
            st["step"] = torch.zeros((), device=p.device)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        for lst, k in zip(out, ("exp_avg", "exp_avg_sq", "step")):
            lst.append(st[k] if st is not None else None)
    return out


def run_steps(device, wd, steps=5, skip_at=2, offset=0):
    """Fused vs reference over `steps` steps; returns both states."""
    A, B = make_state(device, wd, offset=offset), make_state(device, wd)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        grads = [torch.randn(p.shape, generator=g).to(device) for p in A[0]]
        for ps in (A[0], B[0]):
            for p, gr in zip(ps, grads):   # fresh gradient tensors: new addresses each step
                p.grad = gr.clone() if p.requires_grad else None
        lr = torch.tensor(1e-3 * (k + 1), device=device)
        found_inf = torch.tensor(1.0 if k == skip_at else 0.0, device=device)
        grad_scale = torch.tensor(1.7, device=device) if k % 2 else None
        w = torch.tensor(0.05, device=device)
        fused.step(lr, found_inf, grad_scale, w)
        m, v, st = state_lists(B[0], B[3])
        ext.fused_adamw_ema_ref(B[0], [p.grad for p in B[0]], m, v, st, B[1], B[2], lr=lr,
                                found_inf=found_inf, grad_scale=grad_scale, ema_weight=w,
                                weight_decay=wd, **HYPER)
    return A, B, fused


def compare(A, B, exact_adamw: bool):
    pa, ea, sa, oa = A
    pb, eb, sb, ob = B
    close = (lambda a, b: torch.equal(a, b)) if exact_adamw else \
        (lambda a, b: torch.allclose(a, b, rtol=4e-7 * 8, atol=1e-7))

    def why(what, a, b):   # one log line tells an arithmetic-form mismatch from a real bug
        d = (a.double() - b.double()).abs()
        rel = d / b.double().abs().clamp_min(1e-30)
        return (f"{what}: max abs diff {d.max().item():.3g}, max rel diff "
                f"{rel.max().item():.3g}, {int((d > 0).sum())} of {d.numel()} differ")
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert close(x.detach(), y.detach()), why(f"param {i}", x.detach(), y.detach())
        assert close(ea[i], eb[i]), why(f"ema {i}", ea[i], eb[i])
        if sa[i] is not None:   # every poisoned element written, and exactly bf16(ema)
            assert torch.equal(sa[i], ea[i].to(torch.bfloat16)), f"shadow {i}"
        if x.requires_grad:
            for k in ("exp_avg", "exp_avg_sq"):
                assert close(oa.state[x][k], ob.state[y][k]), why(
                    f"{k} {i}", oa.state[x][k], ob.state[y][k])
            assert torch.equal(oa.state[x]["step"].cpu(), ob.state[y]["step"].cpu())
    # the frozen tensor: EMA lerp only, bitwise torch.lerp (its parameter never changes)
    assert torch.equal(pa[-1], pb[-1]) and torch.equal(ea[-1], eb[-1])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cpu_matches_reference(ext_mod, wd):
    A, B, fused = run_steps("cpu", wd)
    assert fused.fused, fused
    compare(A, B, exact_adamw=False)
    assert A[3].state[A[0][0]]["step"].item() == 4.0   # 5 steps, one skipped
    # and the update did move everything
    C = make_state("cpu", wd)
    assert not torch.equal(A[0][0], C[0][0]) and not torch.equal(A[1][0], C[1][0])


def test_skipped_step_changes_nothing(ext_mod):
    A = make_state("cpu", 0.1)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    for p in A[0]:
        p.grad = torch.randn_like(p) if p.requires_grad else None
    one = torch.tensor(1.0)
    fused.step(torch.tensor(1e-3), torch.tensor(0.0), None, torch.tensor(0.1))
    before = [t.clone() for t in A[0] + A[1] + [s for s in A[2] if s is not None]]
    steps = [A[3].state[p]["step"].clone() for p in A[0] if p.requires_grad]
    fused.step(torch.tensor(1e-3), one, None, torch.tensor(0.1))
    after = A[0] + A[1] + [s for s in A[2] if s is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, A[3].state[p]["step"])
               for a, p in zip(steps, [p for p in A[0] if p.requires_grad]))


def test_new_optimizer_state_is_picked_up(ext_mod):
    """optimizer.load_state_dict (a resume) replaces the state tensors: the next step updates
    the new ones (the plan is rebuilt), not the orphaned old ones."""
    A, B, _ = run_steps("cpu", 0.0, steps=2, skip_at=-1)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    A[3].load_state_dict(copy.deepcopy(B[3].state_dict()))   # new tensors, B's values
    for ps in (A[0], B[0]):
        for p in ps:
            p.grad = torch.ones_like(p) if p.requires_grad else None
    args = dict(lr=torch.tensor(1e-3), found_inf=torch.tensor(0.0), grad_scale=None,
                ema_weight=torch.tensor(0.1))
    fused.step(**args)
    m, v, st = state_lists(B[0], B[3])
    ext.fused_adamw_ema_ref(B[0], [p.grad for p in B[0]], m, v, st, B[1], B[2],
                            weight_decay=0.0, **HYPER, **args)
    for x, y in zip(A[0], B[0]):
        if x.requires_grad:
            assert torch.allclose(A[3].state[x]["exp_avg"], B[3].state[y]["exp_avg"],
                                  rtol=1e-6, atol=1e-8)
            assert A[3].state[x]["step"].item() == B[3].state[y]["step"].item() == 3.0


def test_changed_hyperparameters_are_picked_up(ext_mod):
    """betas / eps / weight decay changed in the parameter group after the plan was built (a
    resume's load_state_dict with other values, or the user): the next step uses them."""
    A, B = make_state("cpu", 0.0), make_state("cpu", 0.0)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    args = dict(lr=torch.tensor(1e-2), found_inf=torch.tensor(0.0), grad_scale=None,
                ema_weight=torch.tensor(0.1))
    new = dict(beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.3)
    for k in range(2):
        if k == 1:
            for opt in (A[3], B[3]):
                opt.param_groups[0].update(betas=(new["beta1"], new["beta2"]), eps=new["eps"],
                                           weight_decay=new["weight_decay"])
        for ps in (A[0], B[0]):
            for p in ps:
                p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
        fused.step(**args)
        m, v, st = state_lists(B[0], B[3])
        hyper = new if k == 1 else dict(HYPER, weight_decay=0.0)
        ext.fused_adamw_ema_ref(B[0], [p.grad for p in B[0]], m, v, st, B[1], B[2], **hyper,
                                **args)
    assert fused.hyper == new
    compare(A, B, exact_adamw=False)


def test_scalars_on_another_device_are_refused(ext_mod):
    """lr / found_inf / grad_scale / ema_weight are read through their pointers by the
    kernel: the plan checks their device (a CPU scalar for a CUDA plan would fault there)."""
    A = make_state("cpu", 0.0)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    if not fused.fused:
        pytest.skip(fused.fallback_reason)
    for p in A[0]:
        p.grad = torch.randn_like(p) if p.requires_grad else None
    bad = torch.tensor(1e-3, device="meta")
    with pytest.raises(RuntimeError, match="lr must be a one-element float32 tensor on cpu"):
        fused.step(bad, torch.tensor(0.0), None, torch.tensor(0.1))


def test_refuses_what_it_cannot_run(ext_mod):
    p = torch.nn.Parameter(torch.randn(4))
    e = [p.detach().clone()]
    for opt, msg in ((torch.optim.SGD([p], lr=0.1), "not torch.optim.AdamW"),
                     (torch.optim.Adam([p], weight_decay=0.1), "coupled weight decay"),
                     (torch.optim.AdamW([p], amsgrad=True), "amsgrad"),
                     (torch.optim.AdamW([p], betas=(torch.tensor(0.9), torch.tensor(0.99))),
                      "tensor betas"),
                     (torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(
                         torch.randn(2))]}]), "parameter groups")):
        with pytest.raises(ValueError, match=msg):
            ext.FusedAdamWEMA(opt, [p], e)
    with pytest.raises(ValueError, match="not among model_params"):
        ext.FusedAdamWEMA(torch.optim.AdamW([p]), [torch.nn.Parameter(torch.randn(4))], e)
    fused = ext.FusedAdamWEMA(torch.optim.AdamW([p]), [p], e)
    p.grad = None   # a trained tensor without a gradient: a clear error, not a crash
    with pytest.raises(RuntimeError, match="has no gradient"):
        fused.step(torch.tensor(1e-3), torch.tensor(0.0), None, torch.tensor(0.1))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_cuda_matches_torch_fused_adamw(ext_mod, wd, offset):
    """The kernel uses torch's CUDA fused-AdamW arithmetic: the same values to the last ulp
    is expected; allowed: ulp-level relative differences (fma contraction may differ). Both
    the 4-wide (aligned) and the scalar (unaligned) paths, sizes with tails."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    A, B, fused = run_steps("cuda", wd, offset=offset)
    assert fused.fused, fused
    compare(A, B, exact_adamw=False)


@pytest.mark.cuda
def test_cuda_graph_capture_commit_and_replay(ext_mod):
    """Captured with the gradients a captured backward allocates: commit() after the capture
    points the kernel at them, and replays equal the eager reference step for step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    A, B = make_state("cuda", 0.1), make_state("cuda", 0.1)
    fused = ext.FusedAdamWEMA(A[3], A[0], A[1], A[2])
    xs = [torch.randn(p.shape, device="cuda") for p in A[0]]
    lr, fi = torch.tensor(1e-3, device="cuda"), torch.zeros((), device="cuda")
    w = torch.tensor(0.05, device="cuda")

    def body(ps):   # a "backward" that allocates fresh gradients (as set_to_none does)
        for p, x in zip(ps, xs):
            p.grad = (x * 2.0) if p.requires_grad else None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fi.fill_(1.0)                # warm-up step: skipped, as TrainStep's warm-up is
        body(A[0])
        fused.step(lr, fi, None, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for p in A[0]:
        p.grad = None
    with torch.cuda.graph(graph, stream=s):
        body(A[0])
        fused.step(lr, fi, None, w)
    assert fused.commit()
    fi.fill_(0.0)
    for k in range(3):
        xs_new = [torch.randn(p.shape, device="cuda") for p in A[0]]
        for x, xn in zip(xs, xs_new):
            x.copy_(xn)
        graph.replay()
        for p, x in zip(B[0], xs):
            p.grad = (x * 2.0) if p.requires_grad else None
        m, v, st = state_lists(B[0], B[3])
        ext.fused_adamw_ema_ref(B[0], [p.grad for p in B[0]], m, v, st, B[1], B[2], lr=lr,
                                found_inf=torch.zeros((), device="cuda"), grad_scale=None,
                                ema_weight=w, weight_decay=0.1, **HYPER)
    torch.cuda.synchronize()
    compare(A, B, exact_adamw=False)
