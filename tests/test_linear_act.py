"""Linear -> activation -> Linear kernels, one parametrized suite for both ops:
  projector: Linear(D,2D) -> SiLU -> Linear(2D,D)        vs sra_fast.ops.reference.projector_ref
  mlp:       fc1 (hidden 4D) -> GELU(tanh) -> fc2        vs sra_fast.ops.reference.mlp_ref
Forward and every gradient against the reference on both GEMM paths (cuBLAS + fused
bias/activation pass, Triton GEMM with the fused epilogue), determinism, torch.compile tracing.
CPU runs through the Triton interpreter."""
import importlib
import os
from collections import namedtuple

import pytest
import torch

from sra_fast.ops import reference as R

K = pytest.importorskip("sra_fast.kernels")
from sra_fast.kernels import _common  # noqa: E402

_common.POISON_OUTPUTS = True

# name: public kernel function / module in sra_fast.kernels; fn: its autograd.Function there.
Op = namedtuple("Op", "name ref hidden fn env")
OPS = [Op("projector", R.projector_ref, 2, "ProjectorFn", "SRA_FAST_PROJECTOR_GEMM"),
       Op("mlp", R.mlp_ref, 4, "MLPFn", "SRA_FAST_MLP_GEMM")]
op_param = pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)


def kernel(op):
    return getattr(K, op.name)


# The interpreted Triton GEMM costs ~seconds per 1000-wide GEMM: it gets the small odd shapes.
CPU_CASES = [("cublas", (2, 7, 1000)), ("cublas", (2, 16, 384)), ("cublas", (1, 16, 64)),
             ("triton", (2, 7, 100)), ("triton", (1, 16, 64))]
CUDA_SHAPES = [(64, 256, 1152), (256, 256, 768), (3, 7, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(N, T, D, hidden, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    H = hidden * D
    x = torch.randn(N, T, D, generator=g)
    w1 = torch.randn(H, D, generator=g) * D ** -0.5
    b1 = torch.randn(H, generator=g) * 0.5
    w2 = torch.randn(D, H, generator=g) * H ** -0.5
    b2 = torch.randn(D, generator=g) * 0.5
    dout = torch.randn(N, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w1, b1, w2, b2, dout)]


def check_linear_act(fn, ref, hidden, N, T, D, dtype, device, check, gemm, seed=0):
    *ins, dout = make_inputs(N, T, D, hidden, dtype, device, seed)
    leaves = [t.clone().requires_grad_() for t in ins]
    out = fn(*leaves, gemm=gemm)
    grads = torch.autograd.grad(out, leaves, dout)
    lp = [t.clone().requires_grad_() for t in ins]
    out_lp = ref(*lp)
    g_lp = torch.autograd.grad(out_lp, lp, dout)
    hp = [t.double().requires_grad_() for t in ins]
    out_hp = ref(*hp)
    g_hp = torch.autograd.grad(out_hp, hp, dout.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    check("out", out, out_lp, out_hp)
    for name, a, b, c in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, g_lp, g_hp):
        check(name, a, b, c)


@op_param
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gemm,shape", CPU_CASES, ids=str)
def test_matches_reference(op, gemm, shape, dtype, kernel_device, assert_kernel_close):
    check_linear_act(kernel(op), op.ref, op.hidden, *shape, dtype, kernel_device,
                     assert_kernel_close, gemm)


@op_param
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_fp16(op, gemm, kernel_device, assert_kernel_close):
    check_linear_act(kernel(op), op.ref, op.hidden, 2, 7, 100, torch.float16,
                     kernel_device, assert_kernel_close, gemm, seed=1)


@op_param
def test_default_gemm_is_cublas(op):
    mod = importlib.import_module(f"sra_fast.kernels.{op.name}")
    assert mod.DEFAULT_GEMM in ("cublas", "triton")
    if op.env not in os.environ:
        assert mod.DEFAULT_GEMM == "cublas"
    with pytest.raises(ValueError):
        kernel(op)(*make_inputs(1, 7, 64, op.hidden, torch.float32, "cpu", 0)[:5],
                   gemm="cutlass")


def test_triton_gemm_refuses_fp32_operands():
    """fp32 never reaches the Triton GEMM (gemm='triton' sends it to cuBLAS): on a GPU tl.dot
    would round fp32 operands to TF32, which the CPU interpreter cannot show. The launcher
    refuses them rather than compute in TF32 silently."""
    from sra_fast.kernels import linear_act as LA
    a, w = torch.randn(4, 8), torch.randn(8, 16)
    out = torch.empty(4, 16)
    with pytest.raises(ValueError, match="bf16/fp16 operands only"):
        LA._launch_matmul_act(a, w, torch.zeros(16), out, out, out, out, 4, 16, 8, 0, 0)


@op_param
def test_fn_same_as_custom_op(op, kernel_device):
    *ins, dout = make_inputs(2, 7, 64, op.hidden, torch.bfloat16, kernel_device, 2)
    for gemm in ("cublas", "triton"):
        res = []
        for f in (lambda *a: kernel(op)(*a, gemm=gemm),
                  lambda *a: getattr(K, op.fn).apply(*a, gemm)):
            leaves = [t.clone().requires_grad_() for t in ins]
            out = f(*leaves)
            res.append([out, *torch.autograd.grad(out, leaves, dout)])
        for a, b in zip(*res):
            assert torch.equal(a, b)


@op_param
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_deterministic(op, gemm, kernel_device):
    N, T, D = (64, 256, 1152) if kernel_device == "cuda" else (2, 7, 64)
    *ins, dout = make_inputs(N, T, D, op.hidden, torch.bfloat16, kernel_device, 3)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in ins]
        out = kernel(op)(*leaves, gemm=gemm)
        runs.append([out, *torch.autograd.grad(out, leaves, dout)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@op_param
def test_compiles_without_graph_break(op, kernel_device):
    *ins, dout = make_inputs(2, 7, 64, op.hidden, torch.float32, kernel_device, 4)
    cf = torch.compile(kernel(op), backend="aot_eager", fullgraph=True)
    res = []
    for fn in (kernel(op), cf):
        leaves = [t.clone().requires_grad_() for t in ins]
        out = fn(*leaves)
        res.append([out, *torch.autograd.grad(out, leaves, dout)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# fp32 with gemm="triton" runs cuBLAS (the Triton GEMM takes bf16/fp16 only): not repeated
CUDA_GEMM_DTYPES = [("cublas", torch.float32), ("cublas", torch.bfloat16),
                    ("triton", torch.bfloat16)]


@pytest.mark.cuda
@op_param
@pytest.mark.parametrize("gemm,dtype", CUDA_GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_shapes(op, shape, dtype, gemm, assert_kernel_close):
    check_linear_act(kernel(op), op.ref, op.hidden, *shape, dtype, "cuda",
                     assert_kernel_close, gemm, seed=5)


MLP = OPS[1]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 1000), (1, 1, 64), (0, 3, 64)], ids=str)
def test_mlp_inference_path_matches_reference(shape, dtype, kernel_device, assert_kernel_close,
                                              monkeypatch):
    """With nothing needing a gradient (the teacher, sampling) the MLP takes the inference path
    (CUDA bf16/fp16: cuBLASLt's bias+GELU(tanh) epilogue; fp32 and CPU: addmm + tanh GELU):
    same function, checked by the house rule. An exact-erf GELU instead of tanh fails the fp32
    case (~5e-4 off)."""
    from sra_fast.kernels import linear_act as LA
    calls = []
    real = LA.gelu_mlp_inference
    monkeypatch.setattr(LA, "gelu_mlp_inference", lambda *a: calls.append(1) or real(*a))
    *ins, _ = make_inputs(*shape, MLP.hidden, dtype, kernel_device, 7)
    with torch.no_grad():
        out = K.mlp(*ins)
    assert calls, "the no-grad MLP did not take the inference path"
    assert out.dtype == dtype and out.grad_fn is None
    hp = MLP.ref(*[t.double() for t in ins])
    assert_kernel_close("out", out, MLP.ref(*ins), hp)


def test_mlp_inference_path_only_without_grad(monkeypatch):
    """Inference path iff no input needs a gradient or grad mode is off; gemm='triton' and the
    projector (SiLU) keep their own paths."""
    from sra_fast.kernels import linear_act as LA
    calls = []
    real = LA.gelu_mlp_inference
    monkeypatch.setattr(LA, "gelu_mlp_inference", lambda *a: calls.append(1) or real(*a))
    *ins, dout = make_inputs(1, 3, 64, MLP.hidden, torch.float32, "cpu", 8)
    K.mlp(*ins)                                      # grad mode on, no leaf needs grad
    assert len(calls) == 1
    leaves = [t.clone().requires_grad_() for t in ins]
    out = K.mlp(*leaves)                             # training: the autograd path
    assert len(calls) == 1 and out.grad_fn is not None
    torch.autograd.grad(out, leaves, dout)
    with torch.no_grad():
        K.mlp(*leaves)                               # leaves need grad, but grad mode is off
        assert len(calls) == 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            K.mlp(*ins, gemm="triton")
            K.projector(*make_inputs(1, 3, 64, 2, torch.float32, "cpu", 8)[:5])
            assert len(calls) == 2


@op_param
def test_under_autocast(op, kernel_device, assert_kernel_close):
    """fp32 master weights under torch.autocast: the GEMMs run in the autocast dtype, as
    F.linear's would, and the weights get fp32 gradients."""
    *ins, dout = make_inputs(2, 7, 64, op.hidden, torch.float32, kernel_device, 6)
    res = []
    for fn in (kernel(op), op.ref):
        leaves = [t.clone().requires_grad_() for t in ins]
        with torch.autocast(kernel_device, dtype=torch.bfloat16):
            out = fn(*leaves)
        res.append([out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))])
    hp = [t.double().requires_grad_() for t in ins]
    out_hp = op.ref(*hp)
    res_hp = [out_hp, *torch.autograd.grad(out_hp, hp, dout.to(torch.bfloat16).double())]
    assert res[0][0].dtype == res[1][0].dtype == torch.bfloat16
    for name, a, b, c in zip(("out", "dx", "dw1", "db1", "dw2", "db2"), *res, res_hp):
        assert a.dtype == b.dtype, name
        assert_kernel_close(name, a, b, c)
