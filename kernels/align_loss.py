"""Fused SRA alignment loss: per-sample loss (N,) between student h_s and teacher h_t.

One pass over h_s and h_t computes the loss in fp32 (inputs in any float dtype); the backward
is one more pass writing dL/dh_s (the teacher is a no-grad target: its gradient is None).
Kinds, exactly as sra_fast.ops.reference.align_loss_ref defines them:
  cos           1 - cos over features (per token), mean over tokens
  cos-released  1 - cos over the TOKEN axis (per feature; the released code's dim=1), mean
                over features
  smooth-l1     smooth_l1(beta=0.05), mean over tokens and features
  l1, l2        mean |d|, mean d^2
Cosine follows torch.nn.functional.cosine_similarity: each vector is divided by its norm
clamped at eps (1e-8); the clamp is applied under no_grad there, so the gradient flows
through the unclamped norm, and we differentiate the same way.
Per-sample sums are reduced deterministically: one fp32 partial per program, then a sum.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import (cast_to, check_3d, compiling, new_empty, row_launch, row_program,
                      token_chunks, token_tile)

# Duplicated from the reference module (kernels may not import it); a test checks they agree.
COS_EPS = 1e-8
SMOOTH_L1_BETA = 0.05
KINDS = {"cos": 0, "cos-released": 1, "smooth-l1": 2, "l1": 3, "l2": 4}
_COS, _COS_RELEASED, _SMOOTH_L1, _L1, _L2 = 0, 1, 2, 3, 4


@triton.jit
def _align_loss_fwd_kernel(S, TT, PART, T, D, C, rows_per_prog, inv_count, eps, beta,
                           KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Row-wise kinds (all but cos-released). PART (N, C) fp32: this program's sum over its
    # tokens of (1 - cos) for cos, or of the element losses for the others, times inv_count
    # (1/T or 1/(T*D)), so the host's sum over C is the per-sample mean.
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        rmask = t < t_end
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        tg = tl.load(TT + offs, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:
            dot = tl.sum(s * tg, axis=1)
            ns = tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), eps)
            nt = tl.maximum(tl.sqrt(tl.sum(tg * tg, axis=1)), eps)
            acc += tl.where(rmask, 1.0 - dot / (ns * nt), 0.0)
        else:
            d = s - tg  # masked elements are 0 - 0: they add nothing below
            ad = tl.abs(d)
            if KIND == 2:
                e = tl.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)
            elif KIND == 3:
                e = ad
            else:
                e = d * d
            acc += tl.sum(e, axis=1)
    tl.store(PART + n * C + c, tl.sum(acc, axis=0) * inv_count)


@triton.jit
def _align_loss_bwd_kernel(S, TT, G, DS, T, D, rows_per_prog, inv_count, eps, beta,
                           KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    n, c, cols, cmask, t_begin, t_end = row_program(T, D, rows_per_prog, BLOCK_D)
    coef = tl.load(G + n).to(tl.float32) * inv_count
    for r0 in range(0, rows_per_prog, BLOCK_R):
        t = t_begin + r0 + tl.arange(0, BLOCK_R)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        tg = tl.load(TT + offs, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:
            # d(1 - cos)/ds = -(t / (ns*nt) - (s.t / (ns*nt)) / (ns*|s|) * s), where
            # ns = max(|s|, eps) and d ns/ds = s/|s| (0 when s = 0, as torch's norm backward).
            dot = tl.sum(s * tg, axis=1)
            norm_s = tl.sqrt(tl.sum(s * s, axis=1))
            ns = tl.maximum(norm_s, eps)
            nt = tl.maximum(tl.sqrt(tl.sum(tg * tg, axis=1)), eps)
            a = 1.0 / (ns * nt)
            b = tl.where(norm_s > 0, (dot * a) / (ns * tl.maximum(norm_s, 1e-30)), 0.0)
            ds = -coef * (tg * a[:, None] - s * b[:, None])
        else:
            d = s - tg
            if KIND == 2:
                sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                ds = coef * tl.where(tl.abs(d) < beta, d / beta, sgn)
            elif KIND == 3:
                ds = coef * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            else:
                ds = (2.0 * coef) * d
        tl.store(DS + offs, cast_to(ds, DS), mask=mask)


@triton.jit
def _align_loss_cols_fwd_kernel(S, TT, PART, STATS, N, T, D, NB, inv_count, eps,
                                BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr):
    # cos-released: cosine over tokens for each feature column. Program (n, b) owns columns
    # [b*BLOCK_DC, (b+1)*BLOCK_DC) of sample n and walks all T tokens. STATS (3, N, D) fp32
    # keeps s.t, |s|^2, |t|^2 per column so the backward is a single pass.
    n = tl.program_id(0)
    b = tl.program_id(1)
    cols = b * BLOCK_DC + tl.arange(0, BLOCK_DC)
    cmask = cols < D
    acc_st = tl.zeros([BLOCK_T, BLOCK_DC], dtype=tl.float32)
    acc_ss = tl.zeros([BLOCK_T, BLOCK_DC], dtype=tl.float32)
    acc_tt = tl.zeros([BLOCK_T, BLOCK_DC], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & cmask[None, :]
        offs = (n * T + t).to(tl.int64)[:, None] * D + cols[None, :]
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        tg = tl.load(TT + offs, mask=mask, other=0.0).to(tl.float32)
        acc_st += s * tg
        acc_ss += s * s
        acc_tt += tg * tg
    dot = tl.sum(acc_st, axis=0)
    ss = tl.sum(acc_ss, axis=0)
    tt = tl.sum(acc_tt, axis=0)
    tl.store(STATS + n * D + cols, dot, mask=cmask)
    tl.store(STATS + (N + n) * D + cols, ss, mask=cmask)
    tl.store(STATS + (2 * N + n) * D + cols, tt, mask=cmask)
    ns = tl.maximum(tl.sqrt(ss), eps)
    nt = tl.maximum(tl.sqrt(tt), eps)
    loss = tl.sum(tl.where(cmask, 1.0 - dot / (ns * nt), 0.0), axis=0)
    tl.store(PART + n * NB + b, loss * inv_count)


@triton.jit
def _align_loss_cols_bwd_kernel(S, TT, G, STATS, DS, N, T, D, rows_per_prog, inv_count, eps,
                                BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr):
    # Program (n, b, c): columns block b, tokens chunk c of sample n.
    n = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    cols = b * BLOCK_DC + tl.arange(0, BLOCK_DC)
    cmask = cols < D
    dot = tl.load(STATS + n * D + cols, mask=cmask, other=0.0)
    norm_s = tl.sqrt(tl.load(STATS + (N + n) * D + cols, mask=cmask, other=0.0))
    nt = tl.maximum(tl.sqrt(tl.load(STATS + (2 * N + n) * D + cols, mask=cmask, other=0.0)), eps)
    ns = tl.maximum(norm_s, eps)
    coef = tl.load(G + n).to(tl.float32) * inv_count
    a = 1.0 / (ns * nt)
    bb = tl.where(norm_s > 0, (dot * a) / (ns * tl.maximum(norm_s, 1e-30)), 0.0)
    t_begin = c * rows_per_prog
    t_end = tl.minimum(t_begin + rows_per_prog, T)
    for r0 in range(0, rows_per_prog, BLOCK_T):
        t = t_begin + r0 + tl.arange(0, BLOCK_T)
        offs, mask = token_tile(n, t, t_end, T, D, cols, cmask)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        tg = tl.load(TT + offs, mask=mask, other=0.0).to(tl.float32)
        ds = -coef * (tg * a[None, :] - s * bb[None, :])
        tl.store(DS + offs, cast_to(ds, DS), mask=mask)


def _col_block(D):
    block_dc = min(triton.next_power_of_2(D), 128)
    return block_dc, 8, 4  # BLOCK_DC, BLOCK_T, num_warps


def _kind(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {tuple(KINDS)}")
    return KINDS[kind]


def align_loss_fwd(h_s: torch.Tensor, h_t: torch.Tensor, kind: str):
    """(loss (N,) fp32, stats): stats is (3,N,D) fp32 for cos-released, empty otherwise."""
    k = _kind(kind)
    check_3d("align_loss", h_s)
    if h_s.shape != h_t.shape:
        raise ValueError(f"align loss needs two (N,T,D) tensors of one shape, got "
                         f"{tuple(h_s.shape)} and {tuple(h_t.shape)}")
    N, T, D = h_s.shape
    h_s, h_t = h_s.contiguous(), h_t.contiguous()
    dev = h_s.device
    if k == _COS_RELEASED:
        stats = new_empty((3, N, D), torch.float32, dev)
        if h_s.numel() == 0:
            return torch.full((N,), float("nan"), device=dev), stats.zero_()
        BLOCK_DC, BLOCK_T, num_warps = _col_block(D)
        NB = triton.cdiv(D, BLOCK_DC)
        part = new_empty((N, NB), torch.float32, dev)
        _align_loss_cols_fwd_kernel[(N, NB)](h_s, h_t, part, stats, N, T, D, NB, 1.0 / D,
                                             COS_EPS, BLOCK_T=BLOCK_T, BLOCK_DC=BLOCK_DC,
                                             num_warps=num_warps)
        return part.sum(dim=1), stats
    stats = torch.empty((0,), dtype=torch.float32, device=dev)
    if h_s.numel() == 0:
        return torch.full((N,), float("nan"), device=dev), stats
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, dev, 4)
    part = new_empty((N, C), torch.float32, dev)
    inv_count = 1.0 / (T if k == _COS else T * D)
    _align_loss_fwd_kernel[(N, C)](h_s, h_t, part, T, D, C, rows, inv_count, COS_EPS,
                                   SMOOTH_L1_BETA, KIND=k, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                   num_warps=num_warps)
    return part.sum(dim=1), stats


def align_loss_bwd(g: torch.Tensor, h_s: torch.Tensor, h_t: torch.Tensor, stats: torch.Tensor,
                   kind: str) -> torch.Tensor:
    """dL/dh_s for the per-sample loss with upstream gradient g (N,)."""
    k = _kind(kind)
    N, T, D = h_s.shape
    h_s, h_t = h_s.contiguous(), h_t.contiguous()
    g = g.contiguous()  # the kernels load it as fp32 whatever its dtype
    ds = new_empty(h_s.shape, h_s.dtype, h_s.device)
    if h_s.numel() == 0:
        return ds
    if k == _COS_RELEASED:
        BLOCK_DC, BLOCK_T, num_warps = _col_block(D)
        NB = triton.cdiv(D, BLOCK_DC)
        C, rows = token_chunks(N * NB, T, BLOCK_T, h_s.device, per_sm=8)
        _align_loss_cols_bwd_kernel[(N, NB, C)](h_s, h_t, g, stats, ds, N, T, D, rows, 1.0 / D,
                                                COS_EPS, BLOCK_T=BLOCK_T, BLOCK_DC=BLOCK_DC,
                                                num_warps=num_warps)
        return ds
    BLOCK_D, BLOCK_R, num_warps, C, rows = row_launch(N, T, D, h_s.device, 8)
    inv_count = 1.0 / (T if k == _COS else T * D)
    _align_loss_bwd_kernel[(N, C)](h_s, h_t, g, ds, T, D, rows, inv_count, COS_EPS,
                                   SMOOTH_L1_BETA, KIND=k, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                   num_warps=num_warps)
    return ds


class AlignLossFn(torch.autograd.Function):
    """autograd.Function over the host functions: what `align_loss` runs in eager mode (the
    custom op, under torch.compile)."""

    @staticmethod
    def forward(ctx, h_s, h_t, kind):
        loss, stats = align_loss_fwd(h_s, h_t, kind)
        ctx.save_for_backward(h_s, h_t, stats)
        ctx.kind = kind
        return loss

    @staticmethod
    def backward(ctx, g):
        h_s, h_t, stats = ctx.saved_tensors
        ds = align_loss_bwd(g, h_s, h_t, stats, ctx.kind) if ctx.needs_input_grad[0] else None
        return ds, None, None


# Opaque to torch.compile through the fake impls; the backward is a custom op as well.
@torch.library.custom_op("sra_fast::align_loss", mutates_args=())
def _align_loss_op(h_s: torch.Tensor, h_t: torch.Tensor,
                   kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return align_loss_fwd(h_s, h_t, kind)


@_align_loss_op.register_fake
def _(h_s, h_t, kind):
    N, T, D = h_s.shape
    stats_shape = (3, N, D) if kind == "cos-released" else (0,)
    return (h_s.new_empty((N,), dtype=torch.float32),
            h_s.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("sra_fast::align_loss_bwd", mutates_args=())
def _align_loss_bwd_op(g: torch.Tensor, h_s: torch.Tensor, h_t: torch.Tensor,
                       stats: torch.Tensor, kind: str) -> torch.Tensor:
    return align_loss_bwd(g, h_s, h_t, stats, kind)


@_align_loss_bwd_op.register_fake
def _(g, h_s, h_t, stats, kind):
    return h_s.new_empty(h_s.shape)


def _setup_context(ctx, inputs, output):
    h_s, h_t, kind = inputs
    loss, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(h_s, h_t, stats)
    ctx.kind = kind


def _backward(ctx, g, _gstats):
    h_s, h_t, stats = ctx.saved_tensors
    ds = _align_loss_bwd_op(g, h_s, h_t, stats, ctx.kind) if ctx.needs_input_grad[0] else None
    return ds, None, None


_align_loss_op.register_autograd(_backward, setup_context=_setup_context)


def align_loss(h_s: torch.Tensor, h_t: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """Per-sample alignment loss (N,) in fp32 between h_s and h_t, both (N,T,D)."""
    _kind(kind)
    if compiling():
        return _align_loss_op(h_s, h_t, kind)[0]
    return AlignLossFn.apply(h_s, h_t, kind)
