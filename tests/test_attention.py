"""Attention backends: every backend that runs here matches the math reference (forward and
gradients), restricted backends fail loudly, the choice is announced once. CUDA checks
(cuDNN/flash/efficient, head_dim 72) are in test_step_cuda.py."""
import pytest
import torch

from sra_fast.ops import attention as A


def qkv(gen, B=2, H=3, T=17, d=72, dtype=torch.float32):
    return [torch.randn(B, H, T, d, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def runs_here(name, dtype=torch.float32, d=72):
    return A.backend_runs(name, torch.empty(1, 1, 1, d, dtype=dtype))


@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("name", A.ATTENTION_BACKENDS)
def test_backend_matches_math(name, d):
    if not runs_here(name, d=d):
        pytest.skip(f"{name} does not run on this device")
    gen = torch.Generator().manual_seed(d)
    q, k, v = qkv(gen, d=d)
    go = torch.randn(q.shape, generator=gen)
    ref = A.attention_math(q.double(), k.double(), v.double())
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    with A.use_attention_backend(name):
        out = A.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), go)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", A.ATTENTION_BACKENDS)
def test_backend_bf16_error_within_twice_torch_bf16_error(name):
    if not runs_here(name, torch.bfloat16):
        pytest.skip(f"{name} does not run bf16 on this device")
    gen = torch.Generator().manual_seed(7)
    q, k, v = qkv(gen, T=33, dtype=torch.bfloat16)
    ref = A.attention_math(q.float(), k.float(), v.float())
    torch_low = A.attention_math(q, k, v).float()
    with A.use_attention_backend(name):
        out = A.attention(q, k, v).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 2 * (torch_low - ref).abs().max() + 1e-3


def test_auto_on_cpu_is_sdpa_bitwise():
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(gen)
    assert A.resolve_backend(q) == "sdpa"
    with A.use_attention_backend("sdpa"):
        want = A.attention(q, k, v)
    assert torch.equal(A.attention(q, k, v), want)


def test_unknown_and_missing_backends_fail_clearly():
    with pytest.raises(ValueError, match="unknown attention backend 'flash2'"):
        A.set_attention_backend("flash2")
    if not A.flash_attn_available():
        with pytest.raises(RuntimeError, match="flash_attn package"):
            A.set_attention_backend("flash_attn")
    assert A.get_attention_backend() == "auto"


def test_restricted_backend_that_cannot_run_raises():
    q = torch.randn(1, 1, 8, 16)
    if runs_here("cudnn", d=16):
        pytest.skip("cudnn runs here")
    with A.use_attention_backend("cudnn"), pytest.raises(RuntimeError, match="'cudnn'.*cannot run"):
        A.attention(q, q, q)
    # the global SDPA flags are restored after the failure
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_choice_announced_once(capsys):
    q = torch.randn(1, 2, 4, 24)
    A._announced.clear()
    with A.use_attention_backend("math"):
        A.attention(q, q, q)
        A.attention(q, q, q)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "sra_fast attention" in ln]
    assert lines == ["sra_fast attention: math -> math (cpu, torch.float32, head_dim 24)"]


def test_context_restores_backend():
    with A.use_attention_backend("math"):
        assert A.get_attention_backend() == "math"
        with pytest.raises(ValueError):
            with A.use_attention_backend("nope"):
                pass
        assert A.get_attention_backend() == "math"
    assert A.get_attention_backend() == "auto"


@pytest.mark.skipif(not A.HAS_SDP_PRIORITY, reason="this torch has no SDPA priority order")
def test_prioritised_sdpa_compiles_in_one_graph_and_restores_the_order():
    """auto's SDPA priority (cuDNN first on Hopper) while torch.compile traces: a context
    dynamo understands (no graph break at each attention), the same result as SDPA, and
    PyTorch's global priority order as it was afterwards."""
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(g, d=64)
    order = ["cudnn", "flash", "efficient", "math"]
    before = list(torch._C._get_sdp_priority_order())
    f = torch.compile(lambda *a: A._sdpa_prioritised_compiled(*a, order), backend="aot_eager",
                      fullgraph=True)
    out = f(q, k, v)
    assert list(torch._C._get_sdp_priority_order()) == before
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, want)
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), go)
    torch.testing.assert_close(got, torch.autograd.grad(want, (q, k, v), go))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_attention_compiled_prefers_cudnn_on_hopper():
    """Under torch.compile, auto on sm90+ bakes cuDNN's SDPA into the graph, as the eager
    path runs it (test_step_cuda.py), rather than PyTorch's default flash kernel."""
    if torch.cuda.get_device_capability() < (9, 0) or not A.HAS_SDP_PRIORITY:
        pytest.skip("cuDNN first only on sm90+ with an SDPA priority order")
    from torch._dynamo.backends.common import aot_autograd
    seen = []

    def keep_graph(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    q, k, v = (torch.randn(2, 16, 256, 72, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    A.prepare("cuda")   # what the step does before compiling (an import cannot be traced)
    with A.use_attention_backend("auto"):
        f = torch.compile(A.attention, backend=aot_autograd(fw_compiler=keep_graph),
                          fullgraph=True)
        f(q, k, v)
    torch._dynamo.reset()
    assert any("cudnn_attention" in t for t in seen), seen
