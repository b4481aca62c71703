"""SRA projector head: Linear(D, 2D) -> SiLU -> Linear(2D, D), SiLU fused (see linear_act.py).

DEFAULT_GEMM says how the first GEMM runs: "cublas" (torch.matmul, then one fused Triton
bias+SiLU pass) or "triton" (a Triton GEMM with the bias+SiLU epilogue). cuBLAS stays the
default until a GPU benchmark (benchmarks/bench_ops.py --op projector) shows the Triton GEMM
winning; override per call with gemm=..., or with SRA_FAST_PROJECTOR_GEMM=triton.
"""
import os
from typing import Optional

import torch

from ._common import compiling
from .linear_act import (ACT_SILU, GEMMS, autocast_inputs, make_autograd_fn,
                         register_custom_op)

DEFAULT_GEMM = os.environ.get("SRA_FAST_PROJECTOR_GEMM", "cublas")

ProjectorFn = make_autograd_fn(
    ACT_SILU, "autograd.Function for the projector "
    "(`projector` runs it in eager mode; the custom op under torch.compile).")

_projector_op = register_custom_op("projector", ACT_SILU)


def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, gemm: Optional[str] = None) -> torch.Tensor:
    """silu(x @ w1^T + b1) @ w2^T + b2 over the last dim of x (bf16 in, fp32 accumulation)."""
    gemm = DEFAULT_GEMM if gemm is None else gemm
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}; choose one of {GEMMS}")
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    if compiling():  # opaque custom op for the tracer
        return _projector_op(x, w1, b1, w2, b2, gemm)[0]
    return ProjectorFn.apply(x, w1, b1, w2, b2, gemm)  # eager: cheaper than custom-op dispatch
