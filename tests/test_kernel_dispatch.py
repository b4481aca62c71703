"""The dispatcher routes every fused op to sra_fast.kernels under the `triton` backend (CPU
tensors through the Triton interpreter, or CUDA tensors) and agrees with the `ref` backend."""
import os

import pytest
import torch

from sra_fast import ops

K = pytest.importorskip("sra_fast.kernels")

OPS = ["adaln_norm", "gated_residual", "gated_residual_adaln_norm", "projector", "mlp",
       "align_loss"]


def _args(op, device, gen):
    N, T, D = 2, 7, 64

    def r(*s, sc=1.0):
        return (torch.randn(*s, generator=gen) * sc).to(device)
    if op == "adaln_norm":
        return (r(N, T, D), r(N, D), r(N, D)), {}
    if op == "gated_residual":
        return (r(N, T, D), r(N, D), r(N, T, D)), {}
    if op == "gated_residual_adaln_norm":
        return (r(N, T, D), r(N, D), r(N, T, D), r(N, D), r(N, D)), {}
    if op in ("projector", "mlp"):
        H = (2 if op == "projector" else 4) * D
        return (r(N, T, D), r(H, D, sc=D ** -0.5), r(H), r(D, H, sc=H ** -0.5), r(D)), {}
    return (r(N, T, D), r(N, T, D)), {"kind": "cos-released"}


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_routes_to_kernels(op, kernel_device, monkeypatch):
    if kernel_device == "cpu":
        # the dispatcher reads TRITON_INTERPRET at call time (CPU tensors need it)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = getattr(K, op)

    def spy(*a, **k):
        calls.append(op)
        return real(*a, **k)

    monkeypatch.setattr(K, op, spy)
    args, kw = _args(op, kernel_device, torch.Generator().manual_seed(0))
    results = {}
    for backend in ("ref", "triton"):
        # align_loss's teacher is a no-grad target (the kernel gives it no gradient)
        leaves = [a.clone().requires_grad_(not (op == "align_loss" and i == 1))
                  for i, a in enumerate(args)]
        with ops.use_backend(backend):
            out = getattr(ops, op)(*leaves, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device)
                    .view_as(o)).sum() for o in outs)
        wrt = [t for t in leaves if t.requires_grad]
        results[backend] = [*outs, *torch.autograd.grad(loss, wrt, allow_unused=True)]
    assert calls == [op], "the triton backend did not call the kernel (or ref did)"
    for a, b in zip(results["ref"], results["triton"]):
        if a is None or b is None:
            assert a is None and b is None or not (a if a is not None else b).any()
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_env_flag_seen_by_dispatcher():
    # sanity of the premise above: the flag the conftest sets is the one ops reads
    assert ops._interpret() == (os.environ.get("TRITON_INTERPRET", "0") == "1")


# The public kernel functions take the torch.autograd.Function in eager mode (cheaper per
# call than torch.library custom-op dispatch) and the custom op while torch.compile traces.
FNS = {"adaln_norm": "AdaLNNormFn", "gated_residual": "GatedResidualFn",
       "gated_residual_adaln_norm": "GatedResidualAdaLNNormFn", "projector": "ProjectorFn",
       "mlp": "MLPFn", "align_loss": "AlignLossFn"}


def _leaves(op, args):
    return [a.clone().requires_grad_(not (op == "align_loss" and i == 1))
            for i, a in enumerate(args)]


def _loss_and_grads(op, out, leaves):
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum()
               for o in outs)
    return [*outs, *torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])]


@pytest.mark.parametrize("op", OPS)
def test_eager_path_is_the_autograd_function(op, kernel_device, monkeypatch):
    if kernel_device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    custom_calls = []
    real = torch.library.CustomOpDef.__call__

    def spy(self, *a, **k):
        custom_calls.append(self._name)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.library.CustomOpDef, "__call__", spy)
    args, kw = _args(op, kernel_device, torch.Generator().manual_seed(0))
    leaves = _leaves(op, args)
    with ops.use_backend("triton"):
        out = getattr(ops, op)(*leaves, **kw)
    first = out[0] if isinstance(out, tuple) else out
    assert isinstance(first.grad_fn, getattr(K, FNS[op])._backward_cls), type(first.grad_fn)
    _loss_and_grads(op, out, leaves)
    assert custom_calls == [], f"eager call went through custom ops {custom_calls}"


@pytest.mark.parametrize("op", OPS)
def test_compiled_path_is_the_custom_op_without_graph_breaks(op, kernel_device, monkeypatch):
    from torch._dynamo.backends.registry import lookup_backend
    if kernel_device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, recording dynamo's graph
        graphs.append(str(gm.graph))
        return lookup_backend("aot_eager")(gm, example_inputs)

    args, kw = _args(op, kernel_device, torch.Generator().manual_seed(0))
    f = getattr(K, op)  # the public kernel function: where eager/compiled paths split
    cf = torch.compile(lambda *a: f(*a, **kw), backend=backend, fullgraph=True)
    eager_leaves, comp_leaves = _leaves(op, args), _leaves(op, args)
    want = _loss_and_grads(op, f(*eager_leaves, **kw), eager_leaves)
    got = _loss_and_grads(op, cf(*comp_leaves), comp_leaves)
    assert len(graphs) == 1  # fullgraph=True already fails on a break; one graph, no recompile
    assert f"sra_fast.{op}" in graphs[0], graphs[0]
    assert "triton_kernel_wrapper" not in graphs[0]  # the tracer never saw a Triton launch
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------- normalized outputs under autocast
def _norm_case(op, gen, device):
    N, T, D = 2, 5, 48

    def r(*s):
        return torch.randn(*s, generator=gen).to(device)
    if op == "adaln_norm":
        return [r(N, T, D), r(N, D), r(N, D)]
    return [r(N, T, D), r(N, D), r(N, T, D), r(N, D), r(N, D)]


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("op", ["adaln_norm", "gated_residual_adaln_norm"])
def test_norm_output_in_autocast_dtype_same_bits(op, backend, kernel_device, monkeypatch):
    """Under autocast the normalized output comes back in bf16 (one pass less than fp32 plus
    the matmul's cast), holding exactly the bits that cast would give; the gradients that
    flow back are the same bits too. h (the residual) stays fp32."""
    if backend == "triton" and kernel_device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need the interpreter")
    import importlib
    monkeypatch.setattr(importlib.import_module("sra_fast.kernels._common"), "POISON_OUTPUTS",
                        True)   # an element the bf16-output path forgets to write stays NaN
    gen = torch.Generator().manual_seed(21)
    ins = _norm_case(op, gen, kernel_device)
    results = []
    for new in (True, False):
        if not new:   # the previous behaviour: normalized output in x's dtype
            monkeypatch.setattr(ops, "_norm_out_dtype", lambda x: None)
        leaves = [t.clone().requires_grad_() for t in ins]
        with ops.use_backend(backend), torch.autocast(kernel_device, dtype=torch.bfloat16):
            res = getattr(ops, op)(*leaves)
            out = res if op == "adaln_norm" else res[1]
            mm = out @ torch.ones(out.shape[-1], 3, device=kernel_device)   # the consumer
            loss = mm.float().square().sum() + (0 if op == "adaln_norm" else res[0].sum())
        grads = torch.autograd.grad(loss, leaves)
        results.append((out, mm, grads, None if op == "adaln_norm" else res[0]))
    (o_new, mm_new, g_new, h_new), (o_old, mm_old, g_old, h_old) = results
    assert o_new.dtype == torch.bfloat16 and o_old.dtype == torch.float32
    assert torch.equal(o_new, o_old.to(torch.bfloat16))
    assert torch.equal(mm_new, mm_old)
    for a, b in zip(g_new, g_old):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if h_new is not None:
        assert h_new.dtype == torch.float32 and torch.equal(h_new, h_old)
