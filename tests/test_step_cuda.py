"""GPU checks of the step and attention (marked `cuda`, skipped without a GPU; run by
benchmarks/gpu_check.sh): the CUDA-graph step against the eager step for the same seeds,
with gradient accumulation, non-finite skip, re-capture, lr changes and the bf16 teacher
shadow; no host sync in either step; every attention backend that runs agrees with fp32 math
(head_dim 64 and DiT-XL's 72); Python threads (the peer watches) run while a rank waits in
NCCL's setup."""
import contextlib
import copy
import datetime

import pytest
import torch

from sra_fast import ops
from sra_fast.models.dit import DiT, SiT
from sra_fast.objective import SRAConfig, SRAObjective, make_ema
from sra_fast.ops import attention as A
from sra_fast.step import TrainStep, make_optimizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


def build(cls=SiT, *, precision="bf16", grad_accum=1, mode=False, gen=True, lr=1e-3,
          hidden=144, heads=2, **kw):
    torch.manual_seed(0)
    m = cls(input_size=16, patch_size=2, hidden_size=hidden, depth=4, num_heads=heads,
            num_classes=10).to(DEV)          # head_dim 72 by default, as in XL
    ema = make_ema(m)
    obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=3))
    opt = make_optimizer(m, lr=lr)
    g = torch.Generator(DEV).manual_seed(1) if gen else None
    if not gen:
        torch.cuda.manual_seed(1)
    step = TrainStep(m, ema, obj, opt, precision=precision, grad_accum=grad_accum,
                     generator=g, cuda_graph=mode, **kw)
    return m, ema, opt, step


def batches(n=3, bs=8, seed=5, bad=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x, y = torch.randn(bs, 4, 16, 16, generator=g), torch.randint(0, 10, (bs,), generator=g)
        if i == bad:
            x[0, 0, 0, 0] = float("inf")
        out.append((x.to(DEV), y.to(DEV)))
    return out


def params(m, ema):
    return [p.detach().clone() for p in list(m.parameters()) + list(ema.parameters())]


def rel_update_diff(p0, pa, pb):
    """|update_a - update_b| / |update_a| over all parameters together."""
    num = sum(((a - b).double().norm() ** 2) for a, b in zip(pa, pb)) ** 0.5
    den = sum(((a - z).double().norm() ** 2) for a, z in zip(pa, p0)) ** 0.5
    return float(num / den)


@contextlib.contextmanager
def exact_fp32():
    """No TF32, reference ops and math attention: fp32 steps comparable to rounding."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with ops.use_backend("ref"), A.use_attention_backend("math"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run(steps, data, weight=0.5):
    for x, y in data:
        steps(x, y, weight)


@pytest.mark.parametrize("cls,accum,gen", [(SiT, 1, True), (SiT, 2, False), (DiT, 2, True),
                                           (DiT, 1, False)])
def test_graph_step_matches_eager(cls, accum, gen):
    data = batches(3)
    out = []
    for mode in (False, "strict"):
        m, ema, opt, step = build(cls, grad_accum=accum, gen=gen, mode=mode)
        p0 = params(m, ema)
        run(step, data)
        out.append((params(m, ema), step.read_stats(), step))
    (pe, se, _), (pg, sg, g) = out
    assert g.graph_mode and g.captures == 1
    assert se["steps"] == sg["steps"] == 3 and se["nonfinite"] == sg["nonfinite"] == 0
    # same weights and same random draws -> the first losses agree to kernel rounding;
    # later steps only drift by non-deterministic backward reductions
    for k in ("loss", "denoise_loss", "align_loss", "grad_norm"):
        assert sg[k] == pytest.approx(se[k], rel=2e-2), k
    assert rel_update_diff(p0, pe, pg) < 5e-2


def test_graph_step_first_update_is_tight_in_fp32():
    data = batches(1)
    out = []
    with exact_fp32():
        for mode in (False, "strict"):
            m, ema, opt, step = build(precision="fp32", mode=mode, grad_accum=2)
            p0 = params(m, ema)
            run(step, data)
            out.append((params(m, ema), step.read_stats()))
    (pe, se), (pg, sg) = out
    for k in ("loss", "denoise_loss", "align_loss"):
        assert sg[k] == pytest.approx(se[k], rel=1e-5), k
    assert rel_update_diff(p0, pe, pg) < 1e-2   # Adam's first step ~ lr*sign(g)


def test_graph_nonfinite_step_is_skipped():
    m, ema, opt, step = build(mode="strict")
    data = batches(3, bad=1)
    step(*data[0], 0.5)
    before = params(m, ema)
    st_before = [v.clone() for s in opt.state.values() for v in s.values()]
    step(*data[1], 0.5)
    after = params(m, ema)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in
               zip(st_before, [v for s in opt.state.values() for v in s.values()]))
    step(*data[2], 0.5)
    assert not all(torch.equal(a, b) for a, b in zip(after, params(m, ema)))
    st = step.read_stats()
    assert st["nonfinite"] == 1 and st["steps"] == 3
    assert all(v == v for v in st.values())   # no NaN leaks into the means


def test_graph_recaptures_on_shape_change_and_follows_lr():
    runs = []
    for mode in (False, "strict"):
        m, ema, opt, step = build(mode=mode)
        p0 = params(m, ema)
        step(*batches(1, bs=8)[0], 0.5)
        opt.param_groups[0]["lr"] = 1e-4
        step(*batches(1, bs=4, seed=9)[0], 0.25)
        runs.append((params(m, ema), step))
    (pe, _), (pg, g) = runs
    assert g.captures == 2
    assert rel_update_diff(p0, pe, pg) < 5e-2


def test_graph_recaptures_after_optimizer_state_is_replaced():
    m, ema, opt, step = build(mode="strict")
    data = batches(2)
    step(*data[0], 0.5)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # new state tensors (a resume)
    before = params(m, ema)
    step(*data[1], 0.5)
    assert step.captures == 2
    after = params(m, ema)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(a).all() for a in after)
    assert step.read_stats()["nonfinite"] == 0


@pytest.mark.parametrize("mode", [False, "strict"])
def test_bf16_teacher_shadow_matches_plain_teacher(mode):
    data = batches(3)
    out = []
    for shadow in (False, True):
        m, ema, opt, step = build(mode=mode, teacher_bf16=shadow)
        p0 = params(m, ema)
        run(step, data)
        out.append((params(m, ema), step.read_stats()))
    (pa, sa), (pb, sb) = out
    assert sb["loss"] == pytest.approx(sa["loss"], rel=2e-2)
    assert rel_update_diff(p0, pa, pb) < 5e-2


@pytest.mark.parametrize("mode", [False, "strict"])
@pytest.mark.parametrize("ema_impl", ["foreach", "adamw"])
def test_step_has_no_host_sync(mode, ema_impl):
    if ema_impl == "adamw":
        _need_extension()
    m, ema, opt, step = build(mode=mode, ema_impl=ema_impl)
    data = batches(3)
    step(*data[0], 0.5)                 # first call: lazy init / capture may sync
    if ema_impl == "adamw":
        assert step._adamw_ema.fused, step._adamw_ema
    w = torch.tensor(0.5, device=DEV)   # (creating it copies from the host: outside)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*data[1], 0.5)
        step(*data[2], w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.read_stats()["steps"] == 3


def _need_extension():
    """The CUDA build of the extension, or a failure that says why (a CPU-only build, e.g.
    without nvcc, would otherwise send these tests through the PyTorch fallback)."""
    from torch.utils import cpp_extension

    from sra_fast import ext
    mod = ext.load(jit=True)
    if mod is None or not mod.with_cuda:
        why = ext.unavailable_reason() if mod is None else "it was built without CUDA"
        pytest.fail(f"the C++/CUDA extension is not available with CUDA: {why} "
                    f"(CUDA_HOME={cpp_extension.CUDA_HOME})")


@pytest.mark.parametrize("mode", [False, "strict"])
def test_adamw_ema_one_pass_matches_the_default_step(mode):
    """ema_impl="adamw": the CUDA one-pass kernel, eager and captured (gradients allocated
    by the captured backward, committed after capture), through a non-finite step, against
    fused AdamW + EMA lerp: the same updates to bf16 run-to-run noise, the same skip, the
    shadow = bf16(EMA)."""
    _need_extension()
    data = batches(4, bad=1)
    out = []
    for impl in ("foreach", "adamw"):
        m, ema, opt, step = build(mode=mode, teacher_bf16=True, ema_impl=impl)
        p0 = params(m, ema)
        run(step, data)
        out.append((params(m, ema), step.read_stats(), step, opt))
    (pa, sa, _, oa), (pb, sb, sf, ob) = out
    assert sf._adamw_ema.fused
    assert sa["nonfinite"] == sb["nonfinite"] == 1 and sa["steps"] == sb["steps"] == 4
    assert sb["loss"] == pytest.approx(sa["loss"], rel=2e-2)
    assert rel_update_diff(p0, pa, pb) < 5e-2
    assert [float(s["step"]) for s in oa.state.values()] == \
        [float(s["step"]) for s in ob.state.values()]
    for src, dst in zip(sf.shadow.src, sf.shadow.dst):
        assert torch.equal(dst, src.detach().bfloat16())


def test_adamw_ema_one_pass_first_update_is_tight_in_fp32():
    """One fp32 step: the one-pass kernel against torch's fused AdamW + lerp (the kernel
    itself is compared with identical gradients in tests/test_fused_adamw_ema.py; here the
    backward's atomic reductions may differ run to run, which Adam's first step amplifies
    where a gradient is ~eps)."""
    _need_extension()
    data = batches(1)
    out = []
    with exact_fp32():
        for impl in ("foreach", "adamw"):
            m, ema, opt, step = build(precision="fp32", ema_impl=impl)
            p0 = params(m, ema)
            run(step, data)
            out.append(params(m, ema))
            if impl == "adamw":
                assert step._adamw_ema.fused, step._adamw_ema
    assert rel_update_diff(p0, out[0], out[1]) < 1e-2


def test_graph_refuses_fp16_on_cuda():
    with pytest.raises(RuntimeError, match="GradScaler"):
        build(precision="fp16", mode="strict")
    with pytest.warns(UserWarning, match="GradScaler"):
        *_, step = build(precision="fp16", mode=True)
    assert not step.graph_mode
    run(step, batches(1))


# ------------------------------------------------------------------ attention on CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("name", A.ATTENTION_BACKENDS)
def test_attention_backend_agrees_on_cuda(name, d, dtype):
    probe = torch.empty(1, 1, 1, d, device=DEV, dtype=dtype)
    if not A.backend_runs(name, probe):
        if torch.cuda.get_device_capability() >= (9, 0) and name in ("cudnn", "flash", "efficient"):
            pytest.fail(f"SDPA {name} should run {dtype} head_dim {d} on this card")
        pytest.skip(f"{name} does not run here")
    g = torch.Generator(DEV).manual_seed(d)
    B, H, T = 4, 16, 256
    q, k, v = [torch.randn(B, H, T, d, device=DEV, generator=g).to(dtype).requires_grad_()
               for _ in range(3)]
    go = torch.randn(B, H, T, d, device=DEV, generator=g).to(dtype)
    ref = A.attention_math(*(t.float() for t in (q, k, v)))
    ref_g = torch.autograd.grad(ref, (q, k, v), go.float())
    low = A.attention_math(q, k, v)
    low_g = torch.autograd.grad(low, (q, k, v), go)
    with A.use_attention_backend(name):
        out = A.attention(q, k, v)
    out_g = torch.autograd.grad(out, (q, k, v), go)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max()
    assert err <= 2 * (low.float() - ref).abs().max() + 1e-3, (name, float(err))
    for a, lo, r in zip(out_g, low_g, ref_g):
        assert (a.float() - r).abs().max() <= 2 * (lo.float() - r).abs().max() + 1e-3


def test_auto_attention_prefers_cudnn_on_hopper():
    q = torch.empty(1, 1, 8, 72, device=DEV, dtype=torch.bfloat16)
    name = A.resolve_backend(q)
    if A.flash_attn_available():
        pytest.skip(f"flash_attn installed: auto -> {name}")
    if torch.cuda.get_device_capability() >= (9, 0) and A.HAS_SDP_PRIORITY:
        assert name == "sdpa[cudnn>flash>efficient>math]"
    fp32 = torch.empty(1, 1, 8, 72, device=DEV)
    assert A.resolve_backend(fp32) == "sdpa"


@pytest.mark.parametrize("mode", [False, "strict"], ids=["eager", "graph"])
def test_clip_folded_into_fused_adamw_equals_clip_grad_norm_cuda(mode):
    """CUDA's fused AdamW with the clip as grad_scale (the default) updates as clip_grad_norm_
    + AdamW, eagerly and captured; clip 1e-3 so the clip is active every step."""
    finals = []
    for clip_mode in ("optimizer", "foreach"):
        m, ema, opt, step = build(precision="fp32", mode=mode, grad_clip=1e-3)
        assert step._clip_mode == "optimizer"
        step._clip_mode = clip_mode
        run(step, batches(3))
        assert step.graph_mode == bool(mode) and step.captures == (1 if mode else 0)
        finals.append(params(m, ema) + [v.detach().clone() for st in opt.state.values()
                                        for k, v in st.items() if k != "step"])
        assert step.read_stats()["grad_norm"] > 1e-2
    for a, b in zip(*finals):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-12


@pytest.fixture
def nccl_world_of_one(tmp_path):
    """A one-process NCCL group: the captured all-reduce of grad_sync runs for real (more
    processes need more GPUs; their arithmetic is tested on CPU, tests/test_grad_sync.py)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
                            device_id=torch.device(DEV, torch.cuda.current_device()),
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("accum,bucket_mb", [(1, 0), (2, 0), (1, 0.05), (2, 0.05)])
def test_graph_step_with_its_own_all_reduce_matches_eager(nccl_world_of_one, accum,
                                                          bucket_mb):
    """grad_sync inside the CUDA graph (NCCL all-reduces captured with the step: one after
    the backward, or 50 KB buckets started from gradient hooks during it) gives the eager
    step's updates, skips a non-finite step, and replays without re-capturing."""
    data = batches(4, bad=2)
    out = []
    for mode in (False, "strict"):
        m, ema, opt, step = build(grad_accum=accum, mode=mode, grad_sync=nccl_world_of_one,
                                  grad_bucket_mb=bucket_mb)
        p0 = params(m, ema)
        run(step, data)
        torch.cuda.synchronize()
        out.append((params(m, ema), step.read_stats(), step))
        if mode:   # the captured optimizer reads the gradients from the summed buffer
            flat = step._grad_sync.flat.untyped_storage().data_ptr()
            assert all(p.grad.untyped_storage().data_ptr() == flat
                       for p in m.parameters() if p.requires_grad)
    (pe, se, _), (pg, sg, g) = out
    assert g.graph_mode and g.captures == 1
    if bucket_mb:
        assert len(g._grad_sync.buckets) > 3 and g._grad_sync.launched_in_backward > 3
    assert se["steps"] == sg["steps"] == 4 and se["nonfinite"] == sg["nonfinite"] == 1
    for k in ("loss", "denoise_loss", "align_loss", "grad_norm"):
        assert sg[k] == pytest.approx(se[k], rel=2e-2), k
    assert rel_update_diff(p0, pe, pg) < 5e-2


_STUCK_IN_SETUP = """
import datetime, os, sys, threading, time
import torch, torch.distributed as dist
ticks = [0]

def tick():
    while True:
        ticks[0] += 1
        time.sleep(0.05)

def report():
    time.sleep(4)
    print(f"ticks {ticks[0]}", flush=True)
    os._exit(0)

threading.Thread(target=tick, daemon=True).start()
threading.Thread(target=report, daemon=True).start()
backend = sys.argv[1]
kw = dict(device_id=torch.device("cuda", 0)) if backend == "nccl" else {}
dist.init_process_group(backend, init_method="env://", rank=0, world_size=2,
                        timeout=datetime.timedelta(seconds=60), **kw)
print("init returned", flush=True)
"""


def test_python_threads_run_while_a_rank_waits_in_nccl_setup(tmp_path):
    """The startup and peer watches (sra_fast.peer_watch) end a stuck rank from a Python
    thread: that needs the GIL free while the main thread waits in NCCL's eager setup
    (init_process_group with device_id, as init_distributed calls it) for a rank that never
    comes. Rank 1 here only joins the store, so rank 0 waits in ncclCommInitRank."""
    import socket
    import subprocess
    import sys
    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(__import__("os").environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    p = subprocess.Popen([sys.executable, "-c", _STUCK_IN_SETUP, "nccl"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # rank 1's part in the rendezvous, and no more (retries until rank 0 hosts the store)
        peer = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=30))
        out = p.communicate(timeout=60)[0]
    finally:
        p.kill()
    assert "init returned" not in out, out
    ticks = int(out.split("ticks ")[1].split()[0])
    assert ticks >= 40, out   # ~80 when the thread runs freely for 4 s
    del peer
