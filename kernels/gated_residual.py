"""Fused adaLN-Zero gated residual, alone and fused with the next adaLN norm.

gated_residual:            h = x + gate[n] * y
gated_residual_adaln_norm: h = x + gate[n] * y;  out = LayerNorm(h) * (1 + scale[n]) + shift[n]
The second is the middle of every DiT block (attention branch's residual, then norm2 +
modulate for the MLP): fused, x and y are read once and h and out written once, instead of
h being written, read back by the norm, and the norm's output read again by modulate.
Per-sample gradients (dgate, dscale, dshift) are sums over tokens, reduced deterministically:
one fp32 partial per program, then a sum on the host. No atomics.
`out_dtype` sets out's dtype (default x's; h always has x's): see adaln_norm.py.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (cast_to, check_3d, check_nd, compiling, layer_norm_rows,
                      modulated_norm_bwd, new_empty, row_launch, row_program, sample_vector,
                      split_cast, token_tile, vector_arg)


@triton.jit
def _gated_residual_fwd_kernel(X, GATE, Y, H, T, D, rows_per_prog, s_gate,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    gate = sample_vector(GATE, n, s_gate, cols, cmask)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + offs, cast_to(x + gate[None, :] * y, H), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(GATE, Y, DH, DY, PART, T, D, C, rows_per_prog, s_gate,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dx is dh itself (returned by the autograd glue); here dy = gate*dh and the
    # per-program partial of dgate = sum_t dh*y into PART (N, C, D) fp32.
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    gate = sample_vector(GATE, n, s_gate, cols, cmask)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dh * y, axis=0)
        tl.store(DY + offs, cast_to(gate[None, :] * dh, DY), mask=mask)
    tl.store(PART + (n * C + c) * D + cols, acc, mask=cmask)


@triton.jit
def _gated_residual_adaln_norm_fwd_kernel(X, GATE, Y, SHIFT, SCALE, H, OUT, T, D, rows_per_prog,
                                          eps, s_gate, s_shift, s_scale,
                                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    gate = sample_vector(GATE, n, s_gate, cols, cmask)
    shift = sample_vector(SHIFT, n, s_shift, cols, cmask)
    scale1 = 1.0 + sample_vector(SCALE, n, s_scale, cols, cmask)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        # The norm uses h in fp32 (before rounding to H's dtype); the backward recomputes the
        # very same fp32 h from x, gate, y, so forward and backward see one function.
        h = x + gate[None, :] * y
        tl.store(H + offs, cast_to(h, H), mask=mask)
        hc, rstd = layer_norm_rows(h, mask, D, eps)
        out = hc * rstd[:, None] * scale1[None, :] + shift[None, :]
        tl.store(OUT + offs, cast_to(out, OUT), mask=mask)


@triton.jit
def _gated_residual_adaln_norm_bwd_kernel(X, GATE, Y, SCALE, DOUT, DH, DX, DY, PART,
                                          N, T, D, C, rows_per_prog, eps, s_gate, s_scale,
                                          HAS_DH: tl.constexpr,
                                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # PART is (3, N, C, D) fp32: partial sums over this program's tokens of
    # dh*y (dgate), dout*hhat (dscale), dout (dshift).
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    gate = sample_vector(GATE, n, s_gate, cols, cmask)
    scale1 = 1.0 + sample_vector(SCALE, n, s_scale, cols, cmask)
    acc_dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        h = x + gate[None, :] * y
        dh, hhat = modulated_norm_bwd(h, dout, mask, D, eps, scale1)
        acc_dscale += tl.sum(dout * hhat, axis=0)
        acc_dshift += tl.sum(dout, axis=0)
        if HAS_DH:
            dh += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dgate += tl.sum(dh * y, axis=0)
        tl.store(DX + offs, cast_to(dh, DX), mask=mask)
        tl.store(DY + offs, cast_to(gate[None, :] * dh, DY), mask=mask)
    p = (n * C + c) * D + cols
    tl.store(PART + p, acc_dgate, mask=cmask)
    tl.store(PART + N * C * D + p, acc_dscale, mask=cmask)
    tl.store(PART + 2 * N * C * D + p, acc_dshift, mask=cmask)


def _check(name, x, y, **vecs):
    check_3d(name, x)
    N, T, D = x.shape
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"{name}: y must match x {tuple(x.shape)}, got {tuple(y.shape)}")
    for k, v in vecs.items():
        check_nd(name, v, N, D, k)


# ---------------------------------------------------------------- gated_residual (host)
def gated_residual_fwd(x, gate, y):
    _check("gated_residual", x, y, gate=gate)
    N, T, D = x.shape
    x, y = x.contiguous(), y.contiguous()
    gate, s_gate = vector_arg(gate)
    h = new_empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return h
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, x.device, 8)
    _gated_residual_fwd_kernel[(N, C)](x, gate, y, h, T, D, rows, s_gate,
                                       BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return h


def gated_residual_bwd(dh, gate, y):
    """(dgate, dy); dx is dh itself."""
    N, T, D = y.shape
    y, dh = y.contiguous(), dh.contiguous()
    gate, s_gate = vector_arg(gate)
    dy = new_empty(y.shape, y.dtype, y.device)
    if y.numel() == 0:
        return torch.zeros((N, D), dtype=gate.dtype, device=y.device), dy
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, y.device, 4)
    part = new_empty((N, C, D), torch.float32, y.device)
    _gated_residual_bwd_kernel[(N, C)](gate, y, dh, dy, part, T, D, C, rows, s_gate,
                                       BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return part.sum(dim=1).to(gate.dtype), dy


# ---------------------------------------------------- gated_residual_adaln_norm (host)
def gated_residual_adaln_norm_fwd(x, gate, y, shift, scale, eps, out_dtype=None):
    _check("gated_residual_adaln_norm", x, y, gate=gate, shift=shift, scale=scale)
    N, T, D = x.shape
    x, y = x.contiguous(), y.contiguous()
    (gate, s_gate), (shift, s_shift), (scale, s_scale) = map(vector_arg, (gate, shift, scale))
    h = new_empty(x.shape, x.dtype, x.device)
    out = new_empty(x.shape, out_dtype or x.dtype, x.device)
    if x.numel() == 0:
        return h, out
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, x.device, 8)
    _gated_residual_adaln_norm_fwd_kernel[(N, C)](
        x, gate, y, shift, scale, h, out, T, D, rows, eps, s_gate, s_shift, s_scale,
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return h, out


def gated_residual_adaln_norm_bwd(dh, dout, x, gate, y, scale, eps):
    """(dx, dy, dmod) with dmod = stack(dgate, dscale, dshift), (3,N,D) fp32.
    dh (the gradient of h from its other users) may be None."""
    N, T, D = x.shape
    x, y, dout = x.contiguous(), y.contiguous(), dout.contiguous()
    (gate, s_gate), (scale, s_scale) = vector_arg(gate), vector_arg(scale)
    has_dh = dh is not None
    dh = dh.contiguous() if has_dh else dout  # placeholder pointer, never read
    dx = new_empty(x.shape, x.dtype, x.device)
    dy = new_empty(y.shape, y.dtype, y.device)
    if x.numel() == 0:
        return dx, dy, torch.zeros((3, N, D), dtype=torch.float32, device=x.device)
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, x.device, 4)
    part = new_empty((3, N, C, D), torch.float32, x.device)
    _gated_residual_adaln_norm_bwd_kernel[(N, C)](
        x, gate, y, scale, dout, dh, dx, dy, part, N, T, D, C, rows, eps, s_gate, s_scale,
        HAS_DH=has_dh,
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dx, dy, part.sum(dim=2)


# ------------------------------------------------------------------ autograd.Functions
class GatedResidualFn(torch.autograd.Function):
    """autograd.Function over the host functions: what `gated_residual` runs in eager mode
    (the custom op, under torch.compile)."""

    @staticmethod
    def forward(ctx, x, gate, y):
        ctx.save_for_backward(gate, y)
        return gated_residual_fwd(x, gate, y)

    @staticmethod
    def backward(ctx, dh):
        gate, y = ctx.saved_tensors
        dgate, dy = gated_residual_bwd(dh, gate, y)
        return dh, dgate, dy


class GatedResidualAdaLNNormFn(torch.autograd.Function):
    """autograd.Function over the host functions: what the public function runs in eager mode
    (the custom op, under torch.compile)."""

    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps, out_dtype=None):
        ctx.save_for_backward(x, gate, y, scale)
        ctx.eps = eps
        ctx.dtypes = (gate.dtype, shift.dtype, scale.dtype)
        ctx.set_materialize_grads(False)
        return gated_residual_adaln_norm_fwd(x, gate, y, shift, scale, eps, out_dtype)

    @staticmethod
    def backward(ctx, dh, dout):
        return _grad_fused(ctx, dh, dout, gated_residual_adaln_norm_bwd, gated_residual_bwd,
                           split_cast)


def _cast_each(dmod, dtypes):
    return tuple(m.to(d) for m, d in zip(dmod.unbind(0), dtypes))


def _grad_fused(ctx, dh, dout, fused_bwd, residual_bwd, cast):
    x, gate, y, scale = ctx.saved_tensors
    if dout is None:
        if dh is None:
            return None, None, None, None, None, None, None
        # only h was used: the norm contributes nothing, h's gradient is a plain gated residual
        dgate, dy = residual_bwd(dh, gate, y)
        return dh, dgate, dy, None, None, None, None
    dx, dy, dmod = fused_bwd(dh, dout, x, gate, y, scale, ctx.eps)
    gate_dtype, shift_dtype, scale_dtype = ctx.dtypes
    dgate, dscale, dshift = cast(dmod, (gate_dtype, scale_dtype, shift_dtype))
    return dx, dgate, dy, dshift, dscale, None, None


# ------------------------------------------------------------------------- custom ops
# Opaque to torch.compile (fake impls give shapes), so it neither graph-breaks nor tries to
# trace a Triton launch; the backward ops are custom ops too so the compiled backward traces.
@torch.library.custom_op("sra_fast::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_fwd(x, gate, y)


@_gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("sra_fast::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(dh: torch.Tensor, gate: torch.Tensor,
                           y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dh, gate, y)


@_gated_residual_bwd_op.register_fake
def _(dh, gate, y):
    return gate.new_empty(gate.shape), y.new_empty(y.shape)


def _gr_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gr_backward(ctx, dh):
    gate, y = ctx.saved_tensors
    dgate, dy = _gated_residual_bwd_op(dh, gate, y)
    return dh, dgate, dy


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)


@torch.library.custom_op("sra_fast::gated_residual_adaln_norm", mutates_args=())
def _gr_adaln_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                 scale: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_adaln_norm_fwd(x, gate, y, shift, scale, eps, out_dtype)


@_gr_adaln_op.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("sra_fast::gated_residual_adaln_norm_bwd", mutates_args=())
def _gr_adaln_bwd_op(dh: Optional[torch.Tensor], dout: torch.Tensor, x: torch.Tensor,
                     gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_adaln_norm_bwd(dh, dout, x, gate, y, scale, eps)


@_gr_adaln_bwd_op.register_fake
def _(dh, dout, x, gate, y, scale, eps):
    N, T, D = x.shape
    return x.new_empty(x.shape), y.new_empty(y.shape), gate.new_empty((3, N, D),
                                                                      dtype=torch.float32)


def _gra_setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps, _ = inputs
    ctx.save_for_backward(x, gate, y, scale)
    ctx.eps = eps
    ctx.dtypes = (gate.dtype, shift.dtype, scale.dtype)
    ctx.set_materialize_grads(False)


def _gra_backward(ctx, dh, dout):
    return _grad_fused(ctx, dh, dout, _gr_adaln_bwd_op, _gated_residual_bwd_op, _cast_each)


_gr_adaln_op.register_autograd(_gra_backward, setup_context=_gra_setup)


# ---------------------------------------------------------------------- public API
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h = x + gate[:, None] * y; x, y (N,T,D), gate (N,D). Output in x's dtype.
    Eager: the autograd.Function; under torch.compile: the custom op."""
    if compiling():
        return _gated_residual_op(x, gate, y)
    return GatedResidualFn.apply(x, gate, y)


def gated_residual_adaln_norm(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                              shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                              out_dtype: Optional[torch.dtype] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, out): h = x + gate*y, out = LayerNorm(h)*(1+scale)+shift, in one pass; h in x's
    dtype, out in out_dtype (default x's).
    Eager: the autograd.Function; under torch.compile: the custom op."""
    if compiling():
        return _gr_adaln_op(x, gate, y, shift, scale, float(eps), out_dtype or x.dtype)
    return GatedResidualAdaLNNormFn.apply(x, gate, y, shift, scale, float(eps), out_dtype)
