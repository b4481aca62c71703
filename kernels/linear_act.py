"""Linear -> activation -> Linear with the activation fused, shared by projector.py and mlp.py
(each builds its autograd.Function, custom op and public function with make_linear_act).

Two ways to run the first GEMM and the activation (the `gemm` switch):
  "cublas": a = x @ w1^T by torch.matmul (cuBLAS), then one Triton pass h = act(a + b1).
  "triton": a Triton GEMM whose epilogue adds b1 and applies the activation, writing a and h.
Either way the saved tensor is a = x @ w1^T (no bias): h is recomputed in the backward instead
of being kept alive, and the backward pass over `a` fuses bias, activation derivative, the
recomputed h (needed for dw2) and the b1 gradient (deterministic per-program partials).
The second GEMM and the weight-gradient GEMMs stay on cuBLAS. The Triton GEMM needs bf16/fp16
inputs (fp32 inputs fall back to cuBLAS: tl.dot would silently use TF32).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_to, compiling, interpreting, new_empty, sm_count, tile_warps

ACT_SILU = 0
ACT_GELU_TANH = 1
GEMMS = ("cublas", "triton")


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:  # SiLU
        out = z / (1.0 + tl.exp(-z))
    else:  # GELU, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1) (saturates cleanly)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return out


@triton.jit
def _act_fwd_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)), the derivative written as PyTorch's silu/gelu(tanh) backward."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = z * s
        grad = s * (1.0 + z * (1.0 - s))
    else:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        th = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * z * (1.0 + th)
        grad = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * du
    return out, grad


@triton.jit
def _bias_act_fwd_kernel(A, BIAS, OUT, M, H, ACT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    tl.store(OUT + offs, cast_to(_act_fwd(z, ACT), OUT), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(A, BIAS, DACT, DPRE, HOUT, PART, M, H, rows_per_prog,
                         ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    # dpre = dact * act'(a + b1); h = act(a + b1) recomputed for dw2; PART (P, H) fp32 holds
    # this program's column sums of dpre (the b1 gradient's first stage).
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    r_begin = pid_m * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, M)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        rows = r_begin + r0 + tl.arange(0, BLOCK_M)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        z = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        g = tl.load(DACT + offs, mask=mask, other=0.0).to(tl.float32)
        h, dh = _act_fwd_and_grad(z, ACT)
        dpre = g * dh
        acc += dpre
        tl.store(DPRE + offs, cast_to(dpre, DPRE), mask=mask)
        tl.store(HOUT + offs, cast_to(h, HOUT), mask=mask)
    tl.store(PART + pid_m * H + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _matmul_act_kernel(A, B, BIAS, ZIN, OUT0, OUT1, PART, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn,
                       MODE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       DOT_FP32: tl.constexpr = False):
    # acc = A @ B (fp32 accumulation), then the epilogue:
    #   MODE 0 (forward):  OUT0 = acc (= a, saved), OUT1 = act(acc + bias)     (h)
    #   MODE 1 (backward): acc is dact; z = ZIN + bias; OUT0 = acc * act'(z)   (dpre),
    #                      OUT1 = act(z) (h, for dw2), PART[pid_m] = column sums of dpre.
    # Outputs are row-major (M, N). Grouped ordering keeps a band of A rows in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mmask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & nmask[None, :], other=0.0)
        if DOT_FP32:
            # Triton's CPU interpreter (3.9) gets tl.dot wrong on bf16 operands; bf16 products
            # are exact in fp32, so upcasting there computes what the GPU's bf16 dot does.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")   # a GPU's default would be TF32
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = mmask[:, None] & nmask[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if MODE == 0:
        tl.store(OUT0 + offs, cast_to(acc, OUT0), mask=mask)
        tl.store(OUT1 + offs, cast_to(_act_fwd(acc + bias[None, :], ACT), OUT1),
                 mask=mask)
    else:
        z = tl.load(ZIN + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        h, dh = _act_fwd_and_grad(z, ACT)
        dpre = tl.where(mask, acc * dh, 0.0)
        tl.store(OUT0 + offs, cast_to(dpre, OUT0), mask=mask)
        tl.store(OUT1 + offs, cast_to(h, OUT1), mask=mask)
        tl.store(PART + pid_m * N + offs_n, tl.sum(dpre, axis=0), mask=nmask)


# Tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the GEMM.
_GEMM_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
               (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3),
               (128, 128, 32, 4, 4), (128, 64, 64, 4, 4)]
# Accumulator elements per thread each epilogue affords without spilling on sm_90: the
# backward epilogue holds four more fp32 tiles (z, act, act', dpre) beside the accumulator.
# Compiled for sm_90 (benchmarks/kernel_resources.py --gemm): 128x256/8 warps and
# 128x128/4 warps (128 per thread) spill 8-32 B in the forward, 1.4-1.7 KB in the backward;
# 64 per thread spills 24-144 B in the backward, and in the forward as 128x64/4 warps when K
# is not a multiple of 16 (64 B at K=1000); 32 never. Candidates past the limit stay listed
# (with the reason) so a later compiler can be re-checked with the same tool.
_GEMM_ACC_PER_THREAD = {0: 64, 1: 32}
_GEMM_SPILLS = {(128, 64, 64, 4, 4): "forward spills 64 B at K=1000 (sm_90, triton 3.9)"}


def _gemm_configs(mode: int):
    """Autotune candidates for one epilogue (MODE 0 forward, 1 backward)."""
    limit = _GEMM_ACC_PER_THREAD[mode]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in _GEMM_TILES
            if bm * bn // (32 * w) <= limit and (bm, bn, bk, w, st) not in _GEMM_SPILLS]


# On a GPU the tile shape is autotuned per (M, N, K, ACT), one tuner per epilogue; the
# interpreter gets one small fixed tile (autotuning there would only time numpy). The choice
# is kept in Triton's cache (cache_results): later processes on the machine reuse it instead
# of re-timing, so their results are bitwise those of the first (a fresh tune could pick
# another tile, i.e. another summation order).
_matmul_act_autotuned = {
    mode: triton.autotune(configs=_gemm_configs(mode), key=["M", "N", "K", "MODE", "ACT"],
                          cache_results=True)(_matmul_act_kernel) for mode in (0, 1)}


def _launch_matmul_act(a, b, bias, zin, out0, out1, part, M, N, K, mode, act):
    """a (M,K) row-major; b given as a (K,N) view (any strides). Returns the BLOCK_M used: in
    MODE 1 rows [0, cdiv(M, BLOCK_M)) of part (N columns) hold the column-sum partials."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"Triton GEMM: bf16/fp16 operands only, got {a.dtype} (fp32 takes "
                         "cuBLAS: on a GPU tl.dot would round fp32 operands to TF32)")
    args = (a, b, bias, zin, out0, out1, part, M, N, K, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1))
    if interpreting() or a.device.type != "cuda":
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        _matmul_act_kernel[grid](*args, MODE=mode, ACT=act, BLOCK_M=32, BLOCK_N=32,
                                 BLOCK_K=32, GROUP_M=4, DOT_FP32=True)
        return 32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    tuner = _matmul_act_autotuned[mode]
    tuner[grid](*args, MODE=mode, ACT=act)
    # The last run used best_config; rows past cdiv(M, its BLOCK_M) may hold leftovers from
    # benchmarking other tile shapes, so the caller sums only the rows this run wrote.
    return tuner.best_config.kwargs["BLOCK_M"]


def _min_block_m(device):
    """Smallest BLOCK_M the backward GEMM may use: sizes its column-sum partials."""
    if interpreting() or device.type != "cuda":
        return 32
    return min(c.kwargs["BLOCK_M"] for c in _gemm_configs(1))


def _elementwise_block(H):
    """(BLOCK_M, BLOCK_H, num_warps): the row kernels' tile rule (_common.row_block), with H
    split into column blocks of at most 1024."""
    block_h = min(triton.next_power_of_2(H), 1024)
    block_m = max(1, min(16, _common.TILE_ELEMS // block_h))
    return block_m, block_h, tile_warps(block_m * block_h)


def bias_act_fwd(a, bias, act):
    M, H = a.shape
    out = new_empty((M, H), a.dtype, a.device)
    if out.numel() == 0:
        return out
    BM, BH, nw = _elementwise_block(H)
    _bias_act_fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(H, BH))](
        a, bias, out, M, H, ACT=act, BLOCK_M=BM, BLOCK_H=BH, num_warps=nw)
    return out


def bias_act_bwd(a, bias, dact, act):
    """(dpre, h, db) from the saved a = x @ w1^T and the incoming gradient of h."""
    M, H = a.shape
    dact = dact.contiguous()
    dpre = new_empty((M, H), a.dtype, a.device)
    h = new_empty((M, H), a.dtype, a.device)
    if M == 0:
        return dpre, h, torch.zeros((H,), dtype=torch.float32, device=a.device)
    BM, BH, nw = _elementwise_block(H)
    nh = triton.cdiv(H, BH)
    # enough row-chunks for ~4 programs per SM, each at least 4 tiles tall
    P = max(1, min(triton.cdiv(4 * sm_count(a.device), nh), triton.cdiv(M, 4 * BM)))
    rows = triton.cdiv(triton.cdiv(M, P), BM) * BM
    P = triton.cdiv(M, rows)
    part = new_empty((P, H), torch.float32, a.device)
    _bias_act_bwd_kernel[(P, nh)](a, bias, dact, dpre, h, part, M, H, rows, ACT=act,
                                  BLOCK_M=BM, BLOCK_H=BH, num_warps=nw)
    return dpre, h, part.sum(dim=0)


def _use_triton_gemm(gemm, x):
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}; choose one of {GEMMS}")
    return gemm == "triton" and x.dtype in (torch.float16, torch.bfloat16)


def _check_shapes(x, w1, b1, w2, b2):
    D, H = x.shape[-1], w1.shape[0]
    if tuple(w1.shape) != (H, D) or tuple(b1.shape) != (H,) or w2.shape[1] != H \
            or tuple(b2.shape) != (w2.shape[0],):
        raise ValueError(f"linear_act: bad shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")


def linear_act_fwd(x, w1, b1, w2, b2, act, gemm):
    """(out, a): out = act(x @ w1^T + b1) @ w2^T + b2 over the last dim of x; a = x @ w1^T
    (2-D, no bias) is what the backward needs. Weights are used in x's dtype."""
    _check_shapes(x, w1, b1, w2, b2)
    D = x.shape[-1]
    H = w1.shape[0]
    dt = x.dtype
    x2 = x.reshape(-1, D).contiguous()
    w1c, b1c = w1.to(dt).contiguous(), b1.to(dt).contiguous()
    w2c, b2c = w2.to(dt), b2.to(dt)
    M = x2.shape[0]
    if _use_triton_gemm(gemm, x) and M > 0:
        a = new_empty((M, H), dt, x.device)
        h = new_empty((M, H), dt, x.device)
        _launch_matmul_act(x2, w1c.t(), b1c, a, a, h, a, M, H, D, 0, act)
    else:
        a = torch.matmul(x2, w1c.t())
        h = bias_act_fwd(a, b1c, act)
    out = torch.nn.functional.linear(h, w2c, b2c)
    return out.reshape(*x.shape[:-1], w2.shape[0]), a


def gelu_mlp_inference(x, w1, b1, w2, b2):
    """gelu_tanh(x @ w1^T + b1) @ w2^T + b2 when nothing needs a gradient (the teacher,
    sampling). On CUDA in bf16/fp16, fc1, bias and GELU(tanh) are one
    torch._addmm_activation, which runs cuBLASLt's GELU_BIAS epilogue where cuBLASLt takes the
    shapes: GELU applied to the fp32 accumulator and h written once, with no pre-activation `a`
    kept for a backward. That saves the training path's write and re-read of `a`. Elsewhere it
    is addmm + tanh GELU, the same traffic as the training path: in fp32 the epilogue's tanh
    approximation (~1e-5..1e-4 relative, PyTorch's own test allows 1e-4) is coarser than fp32
    asks for, and CPU's _addmm_activation applies the exact erf GELU, not the tanh form."""
    _check_shapes(x, w1, b1, w2, b2)
    D, dt = x.shape[-1], x.dtype
    x2 = x.reshape(-1, D)
    b1c, w1t = b1.to(dt), w1.to(dt).t()
    if x.is_cuda and dt in (torch.bfloat16, torch.float16) and x2.shape[0] > 0:
        h = torch._addmm_activation(b1c, x2, w1t, use_gelu=True)
    else:
        h = torch.nn.functional.gelu(torch.addmm(b1c, x2, w1t), approximate="tanh")
    out = torch.nn.functional.linear(h, w2.to(dt), b2.to(dt))
    return out.reshape(*x.shape[:-1], w2.shape[0])


def linear_act_bwd(dout, x, w1, b1, w2, a, act, gemm):
    """(dx, dw1, db1, dw2, db2) in the dtypes of x, w1, b1, w2 and w2 (b2 takes w2's dtype;
    the autograd glue casts it if b2 differs)."""
    D = x.shape[-1]
    H, Dout = w1.shape[0], w2.shape[0]
    dt = x.dtype
    x2 = x.reshape(-1, D).contiguous()
    g = dout.reshape(-1, Dout).to(dt).contiguous()
    w1c, b1c, w2c = w1.to(dt), b1.to(dt).contiguous(), w2.to(dt).contiguous()
    M = x2.shape[0]
    if _use_triton_gemm(gemm, x) and M > 0:
        dpre = new_empty((M, H), dt, x.device)
        h = new_empty((M, H), dt, x.device)
        part = new_empty((triton.cdiv(M, _min_block_m(x.device)), H), torch.float32, x.device)
        bm = _launch_matmul_act(g, w2c, b1c, a, dpre, h, part, M, H, Dout, 1, act)
        db1 = part[:triton.cdiv(M, bm)].sum(dim=0)
    else:
        dact = torch.matmul(g, w2c)
        dpre, h, db1 = bias_act_bwd(a, b1c, dact, act)
    dx = torch.matmul(dpre, w1c).reshape(x.shape)
    dw1 = torch.matmul(dpre.t(), x2)
    dw2 = torch.matmul(g.t(), h)
    db2 = g.sum(dim=0, dtype=torch.float32)
    return dx, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)


def autocast_inputs(*tensors):
    """Under torch.autocast, cast the inputs the way F.linear would (custom ops get no autocast
    treatment of their own and would otherwise run fp32 GEMMs on fp32 master weights); the
    casts are differentiable, so the weights' gradients come back in their own dtype."""
    dev = tensors[0].device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) for t in tensors)
    return tensors


def make_autograd_fn(act, doc):
    """An autograd.Function for one activation over the host functions above."""

    class LinearActFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w1, b1, w2, b2, gemm):
            out, a = linear_act_fwd(x, w1, b1, w2, b2, act, gemm)
            ctx.save_for_backward(x, w1, b1, w2, a)
            ctx.gemm, ctx.b2_dtype = gemm, b2.dtype
            return out

        @staticmethod
        def backward(ctx, dout):
            x, w1, b1, w2, a = ctx.saved_tensors
            dx, dw1, db1, dw2, db2 = linear_act_bwd(dout, x, w1, b1, w2, a, act, ctx.gemm)
            return dx, dw1, db1, dw2, db2.to(ctx.b2_dtype), None

    LinearActFn.__doc__ = doc
    return LinearActFn


def register_custom_op(name, act):
    """Register sra_fast::<name> (+ <name>_bwd) for one activation; returns the forward op.

    The forward returns (out, a) so the autograd glue can save a; torch.compile treats both
    ops as opaque (shapes from the fake impls) and traces the backward through the _bwd op.
    """
    from typing import Tuple

    Tensor = torch.Tensor

    def fwd(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
            gemm: str) -> Tuple[Tensor, Tensor]:
        return linear_act_fwd(x, w1, b1, w2, b2, act, gemm)

    fwd_op = torch.library.custom_op(f"sra_fast::{name}", fwd, mutates_args=())

    def fwd_fake(x, w1, b1, w2, b2, gemm):
        M = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return (x.new_empty((*x.shape[:-1], w2.shape[0])), x.new_empty((M, w1.shape[0])))

    fwd_op.register_fake(fwd_fake)

    def bwd(dout: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, a: Tensor,
            gemm: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return linear_act_bwd(dout, x, w1, b1, w2, a, act, gemm)

    bwd_op = torch.library.custom_op(f"sra_fast::{name}_bwd", bwd, mutates_args=())

    def bwd_fake(dout, x, w1, b1, w2, a, gemm):
        return (x.new_empty(x.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
                w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],)))

    bwd_op.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, gemm = inputs
        out, a = output
        ctx.mark_non_differentiable(a)
        ctx.save_for_backward(x, w1, b1, w2, a)
        ctx.gemm, ctx.b2_dtype = gemm, b2.dtype

    def backward(ctx, dout, _da):
        x, w1, b1, w2, a = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = bwd_op(dout, x, w1, b1, w2, a, ctx.gemm)
        return dx, dw1, db1, dw2, db2.to(ctx.b2_dtype), None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op


def make_linear_act(name, act, default_gemm, fn_doc, doc, module):
    """(autograd.Function, custom op sra_fast::<name>, public function <name>) for one activation.

    default_gemm() gives the first GEMM's path when a call passes gemm=None; it is called per
    call, so the op module's DEFAULT_GEMM stays the one setting that counts. module: the op
    module's __name__, given to the public function.
    """
    fn = make_autograd_fn(act, fn_doc)
    op = register_custom_op(name, act)

    def linear_act(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor, gemm: Optional[str] = None) -> torch.Tensor:
        gemm = default_gemm() if gemm is None else gemm
        if gemm not in GEMMS:
            raise ValueError(f"unknown gemm {gemm!r}; choose one of {GEMMS}")
        x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
        if compiling():  # opaque custom op for the tracer
            return op(x, w1, b1, w2, b2, gemm)[0]
        if (act == ACT_GELU_TANH and gemm == "cublas"
                and not (torch.is_grad_enabled()
                         and any(t.requires_grad for t in (x, w1, b1, w2, b2)))):
            return gelu_mlp_inference(x, w1, b1, w2, b2)
        return fn.apply(x, w1, b1, w2, b2, gemm)  # eager: cheaper than custom-op dispatch

    linear_act.__name__ = linear_act.__qualname__ = name
    linear_act.__doc__, linear_act.__module__ = doc, module
    return fn, op, linear_act
