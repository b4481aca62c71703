"""align_loss kernel: per-sample loss and its gradient for h_s against the reference for
every kind, degenerate (zero-norm) rows, the teacher getting no gradient, determinism,
torch.compile tracing. CPU runs through the Triton interpreter."""
import importlib

import pytest
import torch

from sra_fast.ops import reference as R

K = pytest.importorskip("sra_fast.kernels")
from sra_fast.kernels import _common  # noqa: E402
# the package's `align_loss` attribute is the function; the module is reached by name
align_mod = importlib.import_module("sra_fast.kernels.align_loss")

_common.POISON_OUTPUTS = True

CPU_SHAPES = [(2, 7, 1000), (1, 16, 64), (2, 16, 384)]
CUDA_SHAPES = [(64, 256, 1152), (16, 256, 768), (3, 7, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(N, T, D, kind, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, T, D, generator=g)
    noise = torch.randn(N, T, D, generator=g)
    if kind == "smooth-l1":
        t = s + 0.05 * noise  # |s - t| around beta: both branches of smooth-l1 are used
    else:
        t = 0.5 * s + noise  # partly aligned, so the cosine is not ~0
    gl = torch.rand(N, generator=g) + 0.5  # upstream gradient of the per-sample loss
    return s.to(device, dtype), t.to(device, dtype), gl.to(device)


def _check(N, T, D, kind, dtype, device, check, seed=0, inputs=None):
    s, t, gl = inputs if inputs is not None else _inputs(N, T, D, kind, dtype, device, seed)
    s_k = s.clone().requires_grad_()
    loss = K.align_loss(s_k, t, kind)
    ds, = torch.autograd.grad(loss, s_k, gl)
    s_lp = s.clone().requires_grad_()
    loss_lp = R.align_loss_ref(s_lp, t, kind)
    ds_lp, = torch.autograd.grad(loss_lp, s_lp, gl)
    s_hp = s.double().requires_grad_()
    loss_hp = R.align_loss_ref(s_hp, t.double(), kind)
    ds_hp, = torch.autograd.grad(loss_hp, s_hp, gl.double())
    assert loss.dtype == torch.float32 and loss.shape == (s.shape[0],)
    assert ds.dtype == dtype
    check(f"{kind} loss", loss, loss_lp, loss_hp)
    check(f"{kind} ds", ds, ds_lp, ds_hp)


def test_constants_match_reference():
    assert align_mod.COS_EPS == R.COS_EPS
    assert align_mod.SMOOTH_L1_BETA == R.SMOOTH_L1_BETA
    assert tuple(align_mod.KINDS) == tuple(R.ALIGN_LOSSES)


@pytest.mark.parametrize("kind", R.ALIGN_LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_align_loss_matches_reference(shape, dtype, kind, kernel_device, assert_kernel_close):
    _check(*shape, kind, dtype, kernel_device, assert_kernel_close)


@pytest.mark.parametrize("kind", R.ALIGN_LOSSES)
def test_align_loss_bf16_student_fp32_teacher(kind, kernel_device, assert_kernel_close):
    """What the step passes: the student's bf16 head output against the teacher's fp32
    hidden state, uncast (a bf16 cast would round the target and cost a pass)."""
    s, t, gl = _inputs(2, 7, 1000, kind, torch.bfloat16, kernel_device, 3)
    g = torch.Generator().manual_seed(4)
    t = t.float() + 1e-3 * torch.randn(t.shape, generator=g).to(kernel_device)  # not bf16 values
    _check(2, 7, 1000, kind, torch.bfloat16, kernel_device, assert_kernel_close,
           inputs=(s, t, gl))


@pytest.mark.parametrize("kind", ["cos", "cos-released"])
def test_align_loss_fp16(kind, kernel_device, assert_kernel_close):
    _check(2, 7, 1000, kind, torch.float16, kernel_device, assert_kernel_close, seed=1)


@pytest.mark.parametrize("kind", ["cos", "cos-released"])
def test_align_loss_zero_norm(kind, kernel_device, assert_kernel_close):
    """Zero vectors hit the eps clamp: the gradient must follow F.cosine_similarity's."""
    s, t, gl = _inputs(2, 7, 64, kind, torch.float32, kernel_device, 2)
    if kind == "cos":
        s[0, 3] = 0       # a zero student token
        t[1, 2] = 0       # a zero teacher token
        s[1, 5] *= 1e-9   # a student token with norm below eps
    else:
        s[0, :, 5] = 0
        t[1, :, 7] = 0
        s[1, :, 9] *= 1e-9
    _check(2, 7, 64, kind, torch.float32, kernel_device, assert_kernel_close,
           inputs=(s, t, gl))


def test_align_loss_teacher_gets_no_grad(kernel_device):
    s, t, _ = _inputs(2, 7, 64, "cos", torch.float32, kernel_device, 3)
    s = s.requires_grad_()
    t = t.requires_grad_()
    loss = K.align_loss(s, t, "cos")
    ds, dt = torch.autograd.grad(loss.sum(), (s, t), allow_unused=True)
    assert ds is not None and dt is None


def test_align_loss_unknown_kind(kernel_device):
    s, t, _ = _inputs(1, 7, 64, "cos", torch.float32, kernel_device, 3)
    with pytest.raises(ValueError):
        K.align_loss(s, t, "cosine")


@pytest.mark.parametrize("kind", R.ALIGN_LOSSES)
def test_align_loss_fn_same_as_custom_op(kind, kernel_device):
    s, t, gl = _inputs(2, 7, 64, kind, torch.float32, kernel_device, 4)
    res = []
    for f in (K.align_loss, lambda a, b, k: K.AlignLossFn.apply(a, b, k)):
        leaf = s.clone().requires_grad_()
        loss = f(leaf, t, kind)
        res.append([loss, *torch.autograd.grad(loss, leaf, gl)])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_align_loss_deterministic(kernel_device):
    N, T, D = (64, 256, 1152) if kernel_device == "cuda" else (2, 16, 64)
    for kind in R.ALIGN_LOSSES:
        s, t, gl = _inputs(N, T, D, kind, torch.bfloat16, kernel_device, 5)
        runs = []
        for _ in range(2):
            leaf = s.clone().requires_grad_()
            loss = K.align_loss(leaf, t, kind)
            runs.append([loss, *torch.autograd.grad(loss, leaf, gl)])
        for a, b in zip(*runs):
            assert torch.equal(a, b), kind


@pytest.mark.parametrize("kind", ["cos", "cos-released"])
def test_align_loss_compiles_without_graph_break(kind, kernel_device):
    s, t, gl = _inputs(2, 7, 64, kind, torch.float32, kernel_device, 6)

    def f(s, t):
        return K.align_loss(s, t, kind).mean()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    res = []
    for fn in (f, cf):
        leaf = s.clone().requires_grad_()
        loss = fn(leaf, t)
        res.append([loss, *torch.autograd.grad(loss, leaf)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", R.ALIGN_LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_align_loss_cuda_shapes(shape, dtype, kind, assert_kernel_close):
    _check(*shape, kind, dtype, "cuda", assert_kernel_close, seed=7)
