"""pytest setup shared by all tests.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. Triton
picks interpreted vs compiled when a kernel is decorated (and again in some lazy imports at
launch), so TRITON_INTERPRET must be set before anything imports triton and stay set: hence
here, at conftest import. With a GPU it is left alone so the compiled kernels are tested.
Note the dispatcher (sra_fast.ops) then also routes CPU tensors to the kernels under the
default `auto` backend; tests that want the reference say `ops.use_backend("ref")`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # the `cuda` marker is declared in pytest.ini
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
