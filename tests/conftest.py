"""pytest setup shared by all tests.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. Triton
picks interpreted vs compiled when a kernel is decorated (and again in some lazy imports at
launch), so TRITON_INTERPRET must be set before anything imports triton: hence here, at
conftest import, followed by importing the kernels so they are decorated for the interpreter
whichever test reaches them first. With a GPU it is left alone so the compiled kernels run.

The dispatcher (sra_fast.ops) also routes CPU tensors to the kernels whenever
TRITON_INTERPRET=1, which makes model/objective tests ~3.6x slower on 2 CPU cores (every
norm, residual and loss interpreted). So when this file set the flag, tests see it only if
they use the `kernel_device` fixture or carry the `triton_interpret` marker; everything else
sees TRITON_INTERPRET=0 (the reference path, as on a machine without the flag). Running
`TRITON_INTERPRET=1 pytest` sets it yourself and sends every test through the kernels.
"""
import os

import pytest
import torch

_INTERPRET_SET_HERE = False
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    _INTERPRET_SET_HERE = True
    try:
        import sra_fast.kernels  # noqa: F401  (decorate the kernels for the interpreter now)
    except Exception:  # no triton: the kernel tests skip themselves
        pass


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton_interpret: let the dispatcher route CPU tensors to the Triton "
        "kernels (interpreter) in this test even when conftest set TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _restore_tf32():
    """A Trainer (setup_backends, cfg.tf32) turns TF32 on process-wide; on a GPU every later
    fp32 reference would then be TF32. Each test gets the flags back as it found them."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(autouse=True)
def _scope_triton_interpret(request, monkeypatch):
    if _INTERPRET_SET_HERE and "kernel_device" not in request.fixturenames \
            and request.node.get_closest_marker("triton_interpret") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection sees the markers
def pytest_collection_modifyitems(config, items):
    # the `cuda` marker is declared in pytest.ini. A kernel test's CUDA instance (fixture
    # kernel_device="cuda") gets it too, so `pytest -m cuda` (the GPU check) runs it.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("kernel_device") == "cuda":
            item.add_marker(pytest.mark.cuda)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------- kernel-test helpers
def _kernel_devices():
    """Devices the Triton kernels can run on here: CPU through the interpreter, and CUDA."""
    devs = []
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        devs.append("cpu")
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(params=_kernel_devices() or ["none"])
def kernel_device(request):
    if request.param == "none":
        pytest.skip("no device the Triton kernels can run on (no GPU, TRITON_INTERPRET unset)")
    return request.param


def _assert_kernel_close(name, out, ref_lp, ref_hp, atol=None):
    """The house tolerance rule: the kernel's max error against a high-precision reference
    (ref_hp, fp64) is at most 2x PyTorch's own error in the kernel's dtype (ref_lp) plus a
    small atol relative to the reference's scale (1e-5 for fp32, 1e-3 for 16-bit). NaN (an
    unwritten element of a poisoned buffer) never passes."""
    assert out is not None, f"{name}: no result"
    assert out.shape == ref_hp.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hp.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten element?)"
    hp = ref_hp.detach().double()
    scale = hp.abs().max().item() if hp.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    if atol is None:
        atol = 1e-5 if out.dtype in (torch.float32, torch.float64) else 1e-3
    err_k = (out.detach().double() - hp).abs().max().item() if hp.numel() else 0.0
    err_t = (ref_lp.detach().double() - hp).abs().max().item() if hp.numel() else 0.0
    bound = 2 * err_t + atol * scale
    assert err_k <= bound, (f"{name}: max err {err_k:.3g} > bound {bound:.3g} "
                            f"(torch {out.dtype} err {err_t:.3g}, scale {scale:.3g})")


@pytest.fixture
def assert_kernel_close():
    return _assert_kernel_close


def _row_strided_views(*vectors):
    """The same (N, D) values as row-strided views of one (N, 2kD) tensor, laid out as the
    blocks pass shift/scale/gate (chunks of the modulation), with NaN between them: a kernel
    that read the rows D apart instead of at their stride would pick up NaN."""
    junk = torch.full_like(vectors[0], float("nan"))
    whole = torch.cat([t for v in vectors for t in (v, junk)], dim=1)
    return whole.chunk(2 * len(vectors), dim=1)[0::2]


@pytest.fixture
def row_strided():
    return _row_strided_views
