"""adaln_norm kernel: forward and every gradient against the reference, determinism,
non-contiguous inputs, torch.compile tracing. CPU runs through the Triton interpreter."""
import pytest
import torch

from sra_fast.ops.reference import LN_EPS, adaln_norm_ref

K = pytest.importorskip("sra_fast.kernels")
from sra_fast.kernels import _common  # noqa: E402

_common.POISON_OUTPUTS = True  # every kernel buffer starts as NaN

CPU_SHAPES = [(2, 7, 1000), (1, 16, 64), (2, 16, 384)]
CUDA_SHAPES = [(4, 256, 768), (2, 256, 1152), (3, 7, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(N, T, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D, generator=g) * 2 + 0.5
    shift = torch.randn(N, D, generator=g)
    scale = torch.randn(N, D, generator=g) * 0.5
    dy = torch.randn(N, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, shift, scale, dy)]


def _check(fn, N, T, D, dtype, device, check, seed=0):
    x, shift, scale, dy = _inputs(N, T, D, dtype, device, seed)
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y = fn(*leaves, LN_EPS)
    grads = torch.autograd.grad(y, leaves, dy)
    lp = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y_lp = adaln_norm_ref(*lp, LN_EPS)
    g_lp = torch.autograd.grad(y_lp, lp, dy)
    hp = [t.double().requires_grad_() for t in (x, shift, scale)]
    y_hp = adaln_norm_ref(*hp, LN_EPS)
    g_hp = torch.autograd.grad(y_hp, hp, dy.double())
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    check("y", y, y_lp, y_hp)
    for name, a, b, c in zip(("dx", "dshift", "dscale"), grads, g_lp, g_hp):
        check(name, a, b, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_adaln_norm_matches_reference(shape, dtype, kernel_device, assert_kernel_close):
    _check(K.adaln_norm, *shape, dtype, kernel_device, assert_kernel_close)


def test_adaln_norm_fp16(kernel_device, assert_kernel_close):
    _check(K.adaln_norm, 2, 7, 1000, torch.float16, kernel_device, assert_kernel_close, seed=3)


def test_adaln_norm_fn_same_as_custom_op(kernel_device):
    x, shift, scale, dy = _inputs(2, 7, 64, torch.float32, kernel_device, 1)
    outs = []
    for f in (K.adaln_norm, lambda *a: K.AdaLNNormFn.apply(*a)):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        y = f(*leaves, LN_EPS)
        outs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_adaln_norm_noncontiguous(kernel_device, assert_kernel_close):
    def fn(x, shift, scale, eps):
        # the same values, laid out (T,N,D) and (D,N) underneath
        return K.adaln_norm(x.transpose(0, 1).contiguous().transpose(0, 1),
                            shift.t().contiguous().t(), scale.t().contiguous().t(), eps)
    _check(fn, 2, 7, 64, torch.float32, kernel_device, assert_kernel_close, seed=2)


def test_adaln_norm_backward_deterministic(kernel_device):
    N, T, D = (8, 256, 1152) if kernel_device == "cuda" else (2, 16, 64)
    x, shift, scale, dy = _inputs(N, T, D, torch.bfloat16, kernel_device, 4)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        runs.append(torch.autograd.grad(K.adaln_norm(*leaves, LN_EPS), leaves, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_adaln_norm_compiles_without_graph_break(kernel_device):
    x, shift, scale, dy = _inputs(2, 7, 64, torch.float32, kernel_device, 5)

    def f(x, shift, scale):
        return K.adaln_norm(x, shift, scale, LN_EPS)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    res = []
    for fn in (f, cf):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        y = fn(*leaves)
        res.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_adaln_norm_cuda_shapes(shape, dtype, assert_kernel_close):
    _check(K.adaln_norm, *shape, dtype, "cuda", assert_kernel_close, seed=6)


def test_adaln_norm_mixed_dtypes(kernel_device, assert_kernel_close):
    """fp32 residual stream with bf16 modulation (what autocast'd adaLN linears produce):
    output in x's dtype, each gradient in its input's dtype."""
    x, shift, scale, dy = _inputs(2, 7, 64, torch.float32, kernel_device, 7)
    shift, scale = shift.bfloat16(), scale.bfloat16()
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y = K.adaln_norm(*leaves, LN_EPS)
    grads = torch.autograd.grad(y, leaves, dy)
    lp = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y_lp = adaln_norm_ref(*lp, LN_EPS)
    g_lp = torch.autograd.grad(y_lp, lp, dy)
    hp = [t.double().requires_grad_() for t in (x, shift, scale)]
    y_hp = adaln_norm_ref(*hp, LN_EPS)
    g_hp = torch.autograd.grad(y_hp, hp, dy.double())
    assert y.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.bfloat16]
    for name, a, b, c in zip(("y", "dx", "dshift", "dscale"), (y, *grads), (y_lp, *g_lp),
                             (y_hp, *g_hp)):
        assert a.dtype == b.dtype, name
        assert_kernel_close(name, a, b, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaln_norm_row_strided_vectors(dtype, kernel_device, assert_kernel_close, row_strided):
    """shift/scale as the blocks pass them: views of one modulation, rows 2*2D apart."""
    def fn(x, shift, scale, eps):
        shift_v, scale_v = row_strided(shift, scale)
        assert shift_v.stride(0) == 4 * shift.shape[1] and not shift_v.is_contiguous()
        return K.adaln_norm(x, shift_v, scale_v, eps)
    _check(fn, 3, 7, 64, dtype, kernel_device, assert_kernel_close, seed=8)
