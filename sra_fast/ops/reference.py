"""Plain-PyTorch reference ops: the one definition of what every fused op computes.

The Triton kernels (sra_fast.kernels) are tested against these, the benchmarks use them as
their "torch" provider, and the models fall back to them when the `ref` backend is selected
(or no kernel applies, e.g. CPU tensors). Keep them simple and obviously right.

`upcast=True` computes in fp32 from fp32 copies of the inputs and returns fp32 results: the
high-precision answer the tolerance rule of the tests compares against. `upcast=False`
computes in the inputs' dtype (LayerNorm statistics are accumulated in fp32 by PyTorch's own
kernels either way) and returns that dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LN_EPS = 1e-6          # LayerNorm eps of SiT/DiT blocks (no affine)
SMOOTH_L1_BETA = 0.05  # released DiT-SRA smooth-L1 beta
COS_EPS = 1e-8         # eps of torch.nn.functional.cosine_similarity

ALIGN_LOSSES = ("cos", "cos-released", "smooth-l1", "l1", "l2")


def _up(upcast: bool, *ts):
    return tuple(t.float() if (upcast and t is not None) else t for t in ts)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's modulate: x (N,T,D), shift/scale (N,D) broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_norm_ref(x, shift, scale, eps: float = LN_EPS, upcast: bool = False,
                   out_dtype=None):
    """y = LayerNorm(x) * (1 + scale[n]) + shift[n]; LayerNorm without affine. `out_dtype`
    (e.g. the autocast dtype; None keeps what the arithmetic gives) is y's dtype."""
    x, shift, scale = _up(upcast, x, shift, scale)
    y = modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)
    return y if out_dtype is None else y.to(out_dtype)


def gated_residual_ref(x, gate, y, upcast: bool = False):
    """h = x + gate[n] * y: the adaLN-Zero gated residual."""
    x, gate, y = _up(upcast, x, gate, y)
    return x + gate.unsqueeze(1) * y


def gated_residual_adaln_norm_ref(x, gate, y, shift, scale, eps: float = LN_EPS,
                                  upcast: bool = False, out_dtype=None):
    """The block's middle: h = x + gate*y, then out = LayerNorm(h)*(1+scale)+shift.

    Returns (h, out): h is the new residual stream, out the next sub-layer's input (in
    out_dtype when given).
    """
    h = gated_residual_ref(x, gate, y, upcast=upcast)
    return h, adaln_norm_ref(h, shift, scale, eps=eps, upcast=upcast, out_dtype=out_dtype)


def projector_ref(x, w1, b1, w2, b2, upcast: bool = False):
    """SRA projector head: Linear(D,2D) -> SiLU -> Linear(2D,D)."""
    x, w1, b1, w2, b2 = _up(upcast, x, w1, b1, w2, b2)
    return F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)


def mlp_ref(x, w1, b1, w2, b2, upcast: bool = False):
    """Block MLP: fc1 -> GELU(tanh) -> fc2."""
    x, w1, b1, w2, b2 = _up(upcast, x, w1, b1, w2, b2)
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def align_loss_ref(h_s: torch.Tensor, h_t: torch.Tensor, kind: str = "cos",
                   upcast: bool = False) -> torch.Tensor:
    """Per-sample alignment loss (N,) between student h_s and teacher h_t, both (N,T,D).

    cos:          1 - cos(h_s[n,i,:], h_t[n,i,:]) over features, mean over tokens.
    cos-released: the released SiT-SRA code, `1 - F.cosine_similarity(h_s, h_t)` with the
                  default dim=1, i.e. over the TOKEN axis, giving (N,D), then the mean.
    smooth-l1:    smooth_l1(beta=0.05), mean over tokens and features.
    l1, l2:       mean absolute / mean squared difference.
    The batch mean of these equals the released code's mean over all elements.
    """
    if h_s.shape != h_t.shape or h_s.dim() != 3:
        raise ValueError(f"align loss needs two (N,T,D) tensors of one shape, got "
                         f"{tuple(h_s.shape)} and {tuple(h_t.shape)}")
    h_s, h_t = _up(upcast, h_s, h_t)
    if kind == "cos":
        per = 1 - F.cosine_similarity(h_s, h_t, dim=-1, eps=COS_EPS)      # (N,T)
    elif kind == "cos-released":
        per = 1 - F.cosine_similarity(h_s, h_t, dim=1, eps=COS_EPS)       # (N,D)
    elif kind == "smooth-l1":
        per = F.smooth_l1_loss(h_s, h_t, beta=SMOOTH_L1_BETA, reduction="none")
    elif kind == "l1":
        per = (h_s - h_t).abs()
    elif kind == "l2":
        per = (h_s - h_t).square()
    else:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {ALIGN_LOSSES}")
    return per.flatten(1).float().mean(1)
