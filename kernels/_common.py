"""Helpers shared by the kernel files: output allocation, launch heuristics, custom-op glue.

Kept free of anything else in the package (kernels import nothing of ours but each other).
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

# Tests set this (or SRA_FAST_POISON=1) so every buffer a kernel should fill starts as NaN:
# an element a kernel forgets to write then fails the comparison instead of passing by luck
# on recycled memory.
POISON_OUTPUTS = os.environ.get("SRA_FAST_POISON", "0") == "1"

_SM_COUNT = {}

# Triton's CPU interpreter (3.9) converts fp32 -> bf16 by truncation, not round-to-nearest-even
# as the GPU does: every bf16 output then carries twice the rounding error and the tests'
# "at most 2x PyTorch's bf16 error" rule measures the interpreter instead of the kernel. Under
# the interpreter, cast_to rounds explicitly first; compiled kernels never see this branch.
FIX_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast_to(x, PTR):
    """x converted to the element type of pointer PTR (round to nearest even)."""
    if FIX_BF16_ROUNDING:
        if PTR.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(PTR.dtype.element_ty)


@triton.jit
def token_tile(n, t, t_end, T, D, cols, cmask):
    """(offsets, mask) of the tile of tokens t (< t_end) of sample n in an (N, T, D) tensor;
    int64 offsets, since N*T*D passes 2**31 at large batches."""
    mask = (t < t_end)[:, None] & cmask[None, :]
    offs = (n * T + t).to(tl.int64)[:, None] * D + cols[None, :]
    return offs, mask


@triton.jit
def row_program(T, D, rows_per_prog, BLOCK_D: tl.constexpr):
    """Where program (n, c) of a row kernel's (N, C) grid works: sample n, its tokens
    [t_begin, t_end) (chunk c), columns `cols` (masked by cmask = cols < D).
    Returns (n, c, cols, cmask, t_begin, t_end)."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    t_begin = c * rows_per_prog
    t_end = tl.minimum(t_begin + rows_per_prog, T)
    return n, c, cols, cmask, t_begin, t_end


@triton.jit
def sample_vector(PTR, n, stride, cols, cmask):
    """Sample n's (D,) conditioning vector (shift, scale or gate; rows `stride` apart) in
    fp32."""
    return tl.load(PTR + n * stride + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def layer_norm_rows(x, mask, D, eps):
    """(x - mean, 1/std) per row of a masked fp32 tile: the one LayerNorm (no affine) that
    every forward and backward kernel recomputes, so they cannot drift apart."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc, rstd


@triton.jit
def modulated_norm_bwd(v, dout, mask, D, eps, scale1):
    """Backward of out = LayerNorm(v) * scale1 + shift over a tile (LayerNorm recomputed):
    (dv, vhat). The token sums of dout * vhat and of dout are dscale and dshift."""
    vc, rstd = layer_norm_rows(v, mask, D, eps)
    vhat = vc * rstd[:, None]
    g = dout * scale1[None, :]
    c1 = tl.sum(g * vhat, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    dv = (g - vhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    return dv, vhat


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Eager calls go through the kernels' autograd.Functions, torch.compile/export through the
# custom ops (opaque to the tracer; no graph break). Dynamo folds this call to True while it
# traces, so the branch costs one Python call in eager and nothing in a compiled graph.
compiling = torch.compiler.is_compiling


def new_empty(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 132  # nominal (H100), keeps the CPU-interpreter grids shaped like the GPU's
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Launch shape of the row kernels: a tile of ~TILE_ELEMS elements (BLOCK_R whole rows), with
# ELEMS_PER_THREAD of them per thread per tensor (8 = one 16-byte bf16 vector). Register use
# grows with the elements per thread: at 16 (4096-element tiles, 8 warps) the fused backward
# kernels took 148-193 registers on sm_90, i.e. a single 8-warp block per SM that leaves the
# memory pipe idle while it reduces; at 8 they take ~90-125 and every row kernel keeps >= 16
# resident warps per SM (benchmarks/kernel_resources.py compiles them for sm_90 and tells;
# tests/test_kernel_resources.py holds the line). bench_ops.py --row-configs times the
# alternatives on a GPU via set_row_config.
TILE_ELEMS = 2048
ELEMS_PER_THREAD = 8


def set_row_config(tile_elems: int, elems_per_thread: int) -> None:
    """Change the row kernels' launch shape (for benchmarks sweeping it; both powers of 2).
    Reduction order follows the tile, so results are bitwise reproducible per setting."""
    global TILE_ELEMS, ELEMS_PER_THREAD
    for v in (tile_elems, elems_per_thread):
        if v < 1 or v & (v - 1):
            raise ValueError(f"set_row_config: {v} is not a power of 2")
    TILE_ELEMS, ELEMS_PER_THREAD = tile_elems, elems_per_thread
    row_launch.cache_clear()


def tile_warps(tile: int) -> int:
    """num_warps giving ELEMS_PER_THREAD elements per thread for a tile of `tile` elements."""
    return max(4, min(16, tile // (32 * ELEMS_PER_THREAD)))


def row_block(D: int):
    """(BLOCK_D, BLOCK_R, num_warps) for kernels that hold BLOCK_R whole rows of width D:
    several rows per tile for small D, so each program keeps enough bytes in flight."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(8, TILE_ELEMS // block_d))
    return block_d, block_r, tile_warps(block_r * block_d)


def token_chunks(N: int, T: int, block_r: int, device, per_sm: int = 4) -> tuple:
    """Split each sample's T tokens into C chunks of `rows` tokens, one program per chunk.

    Per-sample reductions over tokens (dscale, dshift, dgate) are written as one fp32 partial
    per program and summed afterwards, so C trades parallelism (N*C programs, aim ~per_sm per
    SM) against the partials' traffic (~C/T of the op's own bytes). Chunks never go below
    4 tiles of rows, so each program amortises loading its per-sample vectors.
    """
    want = max(1, math.ceil(per_sm * sm_count(device) / max(N, 1)))
    c_max = max(1, T // (4 * block_r))
    C = max(1, min(want, c_max))
    rows = math.ceil(T / C)
    rows = math.ceil(rows / block_r) * block_r
    C = math.ceil(T / rows)
    return C, rows


@functools.lru_cache(maxsize=512)
def row_launch(N: int, T: int, D: int, device: torch.device, per_sm: int = 4) -> tuple:
    """(BLOCK_D, BLOCK_R, num_warps, C, rows) of row_block + token_chunks, cached per shape
    and device so a call pays one dict lookup instead of recomputing them."""
    block_d, block_r, num_warps = row_block(D)
    C, rows = token_chunks(N, T, block_r, device, per_sm)
    return block_d, block_r, num_warps, C, rows


def split_cast(dmod: torch.Tensor, dtypes: tuple) -> tuple:
    """The k (N,D) slices of an fp32 (k,N,D) reduction, each in its own dtype: one cast (or
    none) when the dtypes agree, so per-sample gradients cost one kernel launch less per
    tensor than casting slice by slice."""
    d0 = dtypes[0]
    if all(d == d0 for d in dtypes):
        return dmod.to(d0).unbind(0)
    return tuple(m.to(d) for m, d in zip(dmod.unbind(0), dtypes))


def vector_arg(v: torch.Tensor) -> tuple:
    """(v, its row stride) for a kernel's (N, D) per-sample vector argument. The kernels read
    the rows with a stride, so the blocks' shift/scale/gate, views of one (N, 6D) modulation
    (row stride 6D), pass as they are: a copy each would be ~10 tiny kernels per block."""
    if v.stride(-1) != 1:
        v = v.contiguous()
    return v, v.stride(0)


def check_3d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} needs x of shape (N,T,D), got {tuple(x.shape)}")


def check_nd(name: str, v: torch.Tensor, N: int, D: int, what: str) -> None:
    if tuple(v.shape) != (N, D):
        raise ValueError(f"{name}: {what} must be (N,D)=({N},{D}), got {tuple(v.shape)}")
