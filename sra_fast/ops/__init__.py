"""The one place that picks the implementation of every fused op.

Backends:
  ref    - the plain-PyTorch reference ops (sra_fast.ops.reference); runs anywhere.
  triton - the fused Triton kernels (sra_fast.kernels) for CUDA tensors, and for CPU tensors
           under TRITON_INTERPRET=1; other tensors fall back to the reference.
  auto   - triton where it applies (CUDA tensors, triton installed), ref otherwise (default).

Models and the objective call these functions only; they never import a kernel directly.
Select with `set_backend(name)` or `with use_backend(name): ...`.

Under autocast, the normalized activation of adaln_norm (and the `out` of
gated_residual_adaln_norm) comes back in the autocast dtype, whatever the backend: in SiT/DiT
it only feeds a matmul, which autocast would cast it for. The values reaching that matmul are
the same (the reference: the same bits; a Triton kernel may sum its fp32 row statistics in
another order when it stores bf16, so to fp32 rounding); what is saved is the fp32 write,
its re-read and the cast's write (the residual stream under autocast is fp32, since
pos_embed is).
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from . import reference
from .reference import ALIGN_LOSSES, LN_EPS

BACKENDS = ("auto", "ref", "triton")
_state = {"backend": "auto"}
_kernels = {"module": None, "error": None, "loaded": False}


def _interpret() -> bool:
    # Read on every call on purpose: tests flip TRITON_INTERPRET per test (conftest.py uses
    # monkeypatch.setenv). Only non-CUDA tensors ever reach this (see _kernel), so the
    # lookup costs nothing on the GPU path.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_kernels():
    global _K
    if not _kernels["loaded"]:
        _kernels["loaded"] = True
        try:
            _kernels["module"] = importlib.import_module("sra_fast.kernels")
        except Exception as e:  # triton missing or broken: the reference path still runs
            _kernels["error"] = f"{type(e).__name__}: {e}"
        _K = _kernels["module"]
    return _kernels["module"]


_K = None  # sra_fast.kernels once loaded (the per-call fast path reads this global)


def triton_available() -> bool:
    return _load_kernels() is not None


def _load_kernels_for_cuda():
    # Load the kernels now rather than at the first op call on a CUDA tensor: that call may
    # come while torch.compile traces a model, and an import there is a graph break.
    if torch.cuda.is_available():
        _load_kernels()


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' needs the Triton kernels, which failed to "
                           f"import ({_kernels['error']}); install triton or use --kernels ref")
    _state["backend"] = name
    if name == "auto":
        _load_kernels_for_cuda()


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


def _kernel(op: str, t):
    """The Triton implementation of `op` for tensor t, or None for the reference.

    Called once per op call, so kept to a few attribute reads. The function is looked up by
    name on the module each time (a getattr, ~50 ns) rather than cached, so a test that
    monkeypatches sra_fast.kernels.<op> is seen."""
    if _state["backend"] == "ref":
        return None
    if not (t.is_cuda or _interpret()):
        return None
    mod = _K if _K is not None else _load_kernels()
    return None if mod is None else getattr(mod, op, None)


def _norm_out_dtype(x):
    """The dtype a normalized activation is produced in: the autocast dtype under autocast
    (see the module docstring), else None (x's dtype)."""
    dev = x.device.type
    if dev not in ("cuda", "cpu"):   # meta tensors (shape checks) and devices without autocast
        return None
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def adaln_norm(x, shift, scale, eps: float = LN_EPS):
    k = _kernel("adaln_norm", x)
    out_dtype = _norm_out_dtype(x)
    if k:
        return k(x, shift, scale, eps, out_dtype=out_dtype)
    return reference.adaln_norm_ref(x, shift, scale, eps, out_dtype=out_dtype)


def gated_residual(x, gate, y):
    k = _kernel("gated_residual", x)
    return k(x, gate, y) if k else reference.gated_residual_ref(x, gate, y)


def gated_residual_adaln_norm(x, gate, y, shift, scale, eps: float = LN_EPS):
    k = _kernel("gated_residual_adaln_norm", x)
    out_dtype = _norm_out_dtype(x)
    if k:
        return k(x, gate, y, shift, scale, eps, out_dtype=out_dtype)
    return reference.gated_residual_adaln_norm_ref(x, gate, y, shift, scale, eps,
                                                   out_dtype=out_dtype)


def projector(x, w1, b1, w2, b2):
    k = _kernel("projector", x)
    return k(x, w1, b1, w2, b2) if k else reference.projector_ref(x, w1, b1, w2, b2)


def mlp(x, w1, b1, w2, b2):
    k = _kernel("mlp", x)
    return k(x, w1, b1, w2, b2) if k else reference.mlp_ref(x, w1, b1, w2, b2)


def align_loss(h_s, h_t, kind: str = "cos"):
    if kind not in ALIGN_LOSSES:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {ALIGN_LOSSES}")
    k = _kernel("align_loss", h_s)
    return k(h_s, h_t, kind) if k else reference.align_loss_ref(h_s, h_t, kind)


__all__ = ["BACKENDS", "ALIGN_LOSSES", "set_backend", "get_backend", "use_backend",
           "triton_available", "adaln_norm", "gated_residual", "gated_residual_adaln_norm",
           "projector", "mlp", "align_loss", "reference"]


_load_kernels_for_cuda()   # the default backend is "auto"
