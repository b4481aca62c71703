"""Fused adaLN norm: y = LayerNorm(x) * (1 + scale[n]) + shift[n], forward and backward.

The chain every DiT/SiT sub-layer starts with (norm1/norm2 + modulate). One read of x and one
write of y in the forward; the backward reads x and dy once, writes dx, and reduces
dscale/dshift over tokens deterministically (fp32 partial per program, then a sum).
Mean and rstd are recomputed in the backward rather than saved: the row is loaded anyway, so
it costs no memory traffic and saves two (N*T) buffers.
`out_dtype` sets y's dtype (default x's): the dispatcher asks for the autocast dtype under
autocast, since y only feeds a matmul that would cast it there (same bits, one pass less).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (cast_to, check_3d, check_nd, compiling, layer_norm_rows,
                      modulated_norm_bwd, new_empty, row_launch, row_program, sample_vector,
                      split_cast, token_tile, vector_arg)


@triton.jit
def _adaln_norm_fwd_kernel(X, SHIFT, SCALE, Y, T, D, rows_per_prog, eps, s_shift, s_scale,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (n, c): tokens [c*rows_per_prog, (c+1)*rows_per_prog) of sample n, so the
    # sample's shift/scale are loaded once and reused for every row.
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    shift = sample_vector(SHIFT, n, s_shift, cols, cmask)
    scale1 = 1.0 + sample_vector(SCALE, n, s_scale, cols, cmask)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xc, rstd = layer_norm_rows(x, mask, D, eps)
        y = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
        tl.store(Y + offs, cast_to(y, Y), mask=mask)


@triton.jit
def _adaln_norm_bwd_kernel(X, SCALE, DY, DX, PART, N, T, D, C, rows_per_prog, eps, s_scale,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # PART is (2, N, C, D) fp32: this program's sums over its tokens of dy*xhat (dscale) and
    # dy (dshift). Summed over C on the host: deterministic, no atomics.
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    scale1 = 1.0 + sample_vector(SCALE, n, s_scale, cols, cmask)
    acc_dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = modulated_norm_bwd(x, dy, mask, D, eps, scale1)
        acc_dscale += tl.sum(dy * xhat, axis=0)
        acc_dshift += tl.sum(dy, axis=0)
        tl.store(DX + offs, cast_to(dx, DX), mask=mask)
    p = (n * C + c) * D + cols
    tl.store(PART + p, acc_dscale, mask=cmask)
    tl.store(PART + N * C * D + p, acc_dshift, mask=cmask)


def adaln_norm_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    check_3d("adaln_norm", x)
    N, T, D = x.shape
    check_nd("adaln_norm", shift, N, D, "shift")
    check_nd("adaln_norm", scale, N, D, "scale")
    x = x.contiguous()
    (shift, s_shift), (scale, s_scale) = vector_arg(shift), vector_arg(scale)
    y = new_empty(x.shape, out_dtype or x.dtype, x.device)
    if x.numel() == 0:
        return y
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, x.device, 8)
    _adaln_norm_fwd_kernel[(N, C)](x, shift, scale, y, T, D, rows, eps, s_shift, s_scale,
                                   BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return y


def adaln_norm_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, dmod) with dmod = stack(dscale, dshift), (2,N,D) fp32 (one tensor, so the custom
    op below returns no two outputs that alias each other; the glue casts each part)."""
    N, T, D = x.shape
    x, dy = x.contiguous(), dy.contiguous()
    scale, s_scale = vector_arg(scale)
    dx = new_empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx, torch.zeros((2, N, D), dtype=torch.float32, device=x.device)
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, x.device, 4)
    part = new_empty((2, N, C, D), torch.float32, x.device)
    _adaln_norm_bwd_kernel[(N, C)](x, scale, dy, dx, part, N, T, D, C, rows, eps, s_scale,
                                   BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dx, part.sum(dim=2)


class AdaLNNormFn(torch.autograd.Function):
    """autograd.Function over the host functions: what `adaln_norm` runs in eager mode (the
    custom op below, under torch.compile). Cheaper per call than the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype=None):
        ctx.save_for_backward(x, scale)
        ctx.eps = eps
        ctx.dtypes = (shift.dtype, scale.dtype)
        return adaln_norm_fwd(x, shift, scale, eps, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, dmod = adaln_norm_bwd(dy, x, scale, ctx.eps)
        dscale, dshift = split_cast(dmod, (ctx.dtypes[1], ctx.dtypes[0]))
        return dx, dshift, dscale, None, None


# torch.compile sees these as opaque ops (fake impls give the shapes) instead of graph-breaking
# on a Triton launch; the backward is itself a custom op so the compiled backward traces too.
@torch.library.custom_op("sra_fast::adaln_norm", mutates_args=())
def _adaln_norm_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return adaln_norm_fwd(x, shift, scale, eps, out_dtype)


@_adaln_norm_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("sra_fast::adaln_norm_bwd", mutates_args=())
def _adaln_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return adaln_norm_bwd(dy, x, scale, eps)


@_adaln_norm_bwd_op.register_fake
def _(dy, x, scale, eps):
    N, T, D = x.shape
    return x.new_empty(x.shape), scale.new_empty((2, N, D), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, shift, scale, eps, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.dtypes = (shift.dtype, scale.dtype)


def _backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dmod = _adaln_norm_bwd_op(dy, x, scale, ctx.eps)
    return dx, dmod[1].to(ctx.dtypes[0]), dmod[0].to(ctx.dtypes[1]), None, None


_adaln_norm_op.register_autograd(_backward, setup_context=_setup_context)


def adaln_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
               eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale[:, None]) + shift[:, None]; x (N,T,D),
    shift/scale (N,D). Output in out_dtype (default x's dtype); statistics in fp32.
    Eager: the autograd.Function; under torch.compile: the custom op."""
    if compiling():
        return _adaln_norm_op(x, shift, scale, float(eps), out_dtype or x.dtype)
    return AdaLNNormFn.apply(x, shift, scale, float(eps), out_dtype)
