"""gated_residual and gated_residual_adaln_norm kernels: forward and every gradient against
the reference (including only-h / only-out gradients of the fused op), determinism,
non-contiguous inputs, torch.compile tracing. CPU runs through the Triton interpreter."""
import pytest
import torch

from sra_fast.ops.reference import LN_EPS, gated_residual_adaln_norm_ref, gated_residual_ref

K = pytest.importorskip("sra_fast.kernels")
from sra_fast.kernels import _common  # noqa: E402

_common.POISON_OUTPUTS = True

CPU_SHAPES = [(2, 7, 1000), (1, 16, 64), (2, 16, 384)]
CUDA_SHAPES = [(4, 256, 768), (2, 256, 1152), (3, 7, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(N, T, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D, generator=g) * 2 + 0.3
    gate = torch.randn(N, D, generator=g)
    y = torch.randn(N, T, D, generator=g)
    shift = torch.randn(N, D, generator=g)
    scale = torch.randn(N, D, generator=g) * 0.5
    dh = torch.randn(N, T, D, generator=g)
    dout = torch.randn(N, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, gate, y, shift, scale, dh, dout)]


def _grads(outs, leaves, gouts):
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                               allow_unused=True)


def _check_residual(fn, N, T, D, dtype, device, check, seed=0):
    x, gate, y, _, _, dh, _ = _inputs(N, T, D, dtype, device, seed)
    leaves = [t.clone().requires_grad_() for t in (x, gate, y)]
    h = fn(*leaves)
    grads = torch.autograd.grad(h, leaves, dh)
    lp = [t.clone().requires_grad_() for t in (x, gate, y)]
    h_lp = gated_residual_ref(*lp)
    g_lp = torch.autograd.grad(h_lp, lp, dh)
    hp = [t.double().requires_grad_() for t in (x, gate, y)]
    h_hp = gated_residual_ref(*hp)
    g_hp = torch.autograd.grad(h_hp, hp, dh.double())
    assert h.dtype == dtype and all(g.dtype == dtype for g in grads)
    check("h", h, h_lp, h_hp)
    for name, a, b, c in zip(("dx", "dgate", "dy"), grads, g_lp, g_hp):
        check(name, a, b, c)


def _check_fused(fn, N, T, D, dtype, device, check, seed=0, use=("h", "out")):
    x, gate, y, shift, scale, dh, dout = _inputs(N, T, D, dtype, device, seed)
    gouts = (dh if "h" in use else None, dout if "out" in use else None)
    leaves = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
    h, out = fn(*leaves, LN_EPS)
    grads = _grads((h, out), leaves, gouts)
    lp = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
    outs_lp = gated_residual_adaln_norm_ref(*lp, LN_EPS)
    g_lp = _grads(outs_lp, lp, gouts)
    hp = [t.double().requires_grad_() for t in (x, gate, y, shift, scale)]
    outs_hp = gated_residual_adaln_norm_ref(*hp, LN_EPS)
    g_hp = _grads(outs_hp, hp, [None if g is None else g.double() for g in gouts])
    assert h.dtype == dtype and out.dtype == dtype
    check("h", h, outs_lp[0], outs_hp[0])
    check("out", out, outs_lp[1], outs_hp[1])
    for name, a, b, c in zip(("dx", "dgate", "dy", "dshift", "dscale"), grads, g_lp, g_hp):
        if c is None:  # shift/scale do not reach h
            assert a is None or not a.any(), name
            continue
        assert a.dtype == dtype, name
        check(name, a, b, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_gated_residual_matches_reference(shape, dtype, kernel_device, assert_kernel_close):
    _check_residual(K.gated_residual, *shape, dtype, kernel_device, assert_kernel_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_gated_residual_adaln_norm_matches_reference(shape, dtype, kernel_device,
                                                     assert_kernel_close):
    _check_fused(K.gated_residual_adaln_norm, *shape, dtype, kernel_device, assert_kernel_close)


@pytest.mark.parametrize("use", [("h",), ("out",)], ids=str)
def test_gated_residual_adaln_norm_one_output_used(use, kernel_device, assert_kernel_close):
    _check_fused(K.gated_residual_adaln_norm, 2, 7, 1000, torch.float32, kernel_device,
                 assert_kernel_close, seed=1, use=use)


def test_gated_residual_fp16(kernel_device, assert_kernel_close):
    _check_residual(K.gated_residual, 2, 7, 1000, torch.float16, kernel_device,
                    assert_kernel_close, seed=2)
    _check_fused(K.gated_residual_adaln_norm, 2, 7, 1000, torch.float16, kernel_device,
                 assert_kernel_close, seed=2)


def test_fns_same_as_custom_ops(kernel_device):
    x, gate, y, shift, scale, dh, dout = _inputs(2, 7, 64, torch.float32, kernel_device, 3)
    res = []
    for f in (K.gated_residual, lambda *a: K.GatedResidualFn.apply(*a)):
        leaves = [t.clone().requires_grad_() for t in (x, gate, y)]
        h = f(*leaves)
        res.append([h, *torch.autograd.grad(h, leaves, dh)])
    for a, b in zip(*res):
        assert torch.equal(a, b)
    res = []
    for f in (K.gated_residual_adaln_norm, lambda *a: K.GatedResidualAdaLNNormFn.apply(*a)):
        leaves = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
        h, out = f(*leaves, LN_EPS)
        res.append([h, out, *torch.autograd.grad((h, out), leaves, (dh, dout))])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_noncontiguous(kernel_device, assert_kernel_close):
    def nc(t):  # same values, a transposed layout underneath
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    _check_residual(lambda x, g, y: K.gated_residual(nc(x), nc(g), nc(y)), 2, 7, 64,
                    torch.float32, kernel_device, assert_kernel_close, seed=4)
    _check_fused(lambda x, g, y, sh, sc, eps: K.gated_residual_adaln_norm(
        nc(x), nc(g), nc(y), nc(sh), nc(sc), eps), 2, 7, 64, torch.float32, kernel_device,
        assert_kernel_close, seed=4)


def test_backward_deterministic(kernel_device):
    N, T, D = (8, 256, 1152) if kernel_device == "cuda" else (2, 16, 64)
    x, gate, y, shift, scale, dh, dout = _inputs(N, T, D, torch.bfloat16, kernel_device, 5)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
        h, out = K.gated_residual_adaln_norm(*leaves, LN_EPS)
        g_fused = torch.autograd.grad((h, out), leaves, (dh, dout))
        leaves = [t.clone().requires_grad_() for t in (x, gate, y)]
        g_res = torch.autograd.grad(K.gated_residual(*leaves), leaves, dh)
        runs.append([*g_fused, *g_res])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_compiles_without_graph_break(kernel_device):
    x, gate, y, shift, scale, dh, dout = _inputs(2, 7, 64, torch.float32, kernel_device, 6)

    def f(x, gate, y, shift, scale):
        h, out = K.gated_residual_adaln_norm(x, gate, y, shift, scale, LN_EPS)
        return K.gated_residual(h, gate, out)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    res = []
    for fn in (f, cf):
        leaves = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
        o = fn(*leaves)
        res.append([o, *torch.autograd.grad(o, leaves, dh)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_shapes(shape, dtype, assert_kernel_close):
    _check_residual(K.gated_residual, *shape, dtype, "cuda", assert_kernel_close, seed=7)
    _check_fused(K.gated_residual_adaln_norm, *shape, dtype, "cuda", assert_kernel_close,
                 seed=7)


def test_mixed_dtypes(kernel_device, assert_kernel_close):
    """fp32 residual stream, bf16 branch output and modulation: outputs in x's dtype, each
    gradient in its input's dtype."""
    x, gate, y, shift, scale, dh, dout = _inputs(2, 7, 64, torch.float32, kernel_device, 8)
    gate, y, shift, scale = gate.bfloat16(), y.bfloat16(), shift.bfloat16(), scale.bfloat16()
    ins = (x, gate, y, shift, scale)
    leaves = [t.clone().requires_grad_() for t in ins]
    h, out = K.gated_residual_adaln_norm(*leaves, LN_EPS)
    grads = torch.autograd.grad((h, out), leaves, (dh, dout))
    lp = [t.clone().requires_grad_() for t in ins]
    outs_lp = gated_residual_adaln_norm_ref(*lp, LN_EPS)
    g_lp = torch.autograd.grad(outs_lp, lp, (dh, dout))
    hp = [t.double().requires_grad_() for t in ins]
    outs_hp = gated_residual_adaln_norm_ref(*hp, LN_EPS)
    g_hp = torch.autograd.grad(outs_hp, hp, (dh.double(), dout.double()))
    assert h.dtype == out.dtype == torch.float32
    names = ("h", "out", "dx", "dgate", "dy", "dshift", "dscale")
    for name, a, b, c in zip(names, (h, out, *grads), (*outs_lp, *g_lp), (*outs_hp, *g_hp)):
        assert a.dtype == b.dtype, name
        assert_kernel_close(name, a, b, c)
    leaves = [t.clone().requires_grad_() for t in ins[:3]]
    h = K.gated_residual(*leaves)
    assert h.dtype == torch.float32
    assert [g.dtype for g in torch.autograd.grad(h, leaves, dh)] == [t.dtype for t in ins[:3]]


@pytest.mark.parametrize("row_config", [(4096, 16), (1024, 4), (256, 2)], ids=str)
def test_every_row_launch_shape(row_config, kernel_device, assert_kernel_close):
    """Any launch shape set_row_config allows (bench_ops --row-configs times several) computes
    the same ops: tile rows and warps change only how the reductions are grouped."""
    default = (_common.TILE_ELEMS, _common.ELEMS_PER_THREAD)
    _common.set_row_config(*row_config)
    try:
        _check_fused(K.gated_residual_adaln_norm, 2, 9, 200, torch.float32, kernel_device,
                     assert_kernel_close, seed=4)
        _check_residual(K.gated_residual, 2, 9, 200, torch.float32, kernel_device,
                        assert_kernel_close, seed=5)
    finally:
        _common.set_row_config(*default)


def test_set_row_config_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="not a power of 2"):
        _common.set_row_config(3000, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strided_vectors(dtype, kernel_device, assert_kernel_close, row_strided):
    """gate/shift/scale as the blocks pass them: views of one modulation tensor."""
    def fused(x, gate, y, shift, scale, eps):
        return K.gated_residual_adaln_norm(x, *row_strided(gate)[:1], y,
                                           *row_strided(shift, scale), eps)

    def fused_one_tensor(x, gate, y, shift, scale, eps):
        gate_v, shift_v, scale_v = row_strided(gate, shift, scale)
        return K.gated_residual_adaln_norm(x, gate_v, y, shift_v, scale_v, eps)

    _check_residual(lambda x, g, y: K.gated_residual(x, row_strided(g)[0], y), 3, 7, 64,
                    dtype, kernel_device, assert_kernel_close, seed=9)
    for fn in (fused, fused_one_tensor):
        _check_fused(fn, 3, 7, 64, dtype, kernel_device, assert_kernel_close, seed=10)
