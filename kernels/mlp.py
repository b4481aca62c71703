"""DiT/SiT block MLP: fc1 -> GELU(tanh) -> fc2, GELU fused (see linear_act.py).

DEFAULT_GEMM says how fc1 runs: "cublas" (torch.matmul, then one fused Triton bias+GELU
pass) or "triton" (a Triton GEMM with the bias+GELU epilogue). cuBLAS stays the default until
a GPU benchmark (benchmarks/bench_ops.py --op mlp) shows the Triton GEMM winning; override
per call with gemm=..., or with SRA_FAST_MLP_GEMM=triton.
"""
import os
from typing import Optional

import torch

from ._common import compiling
from .linear_act import (ACT_GELU_TANH, GEMMS, autocast_inputs, make_autograd_fn,
                         register_custom_op)

DEFAULT_GEMM = os.environ.get("SRA_FAST_MLP_GEMM", "cublas")

MLPFn = make_autograd_fn(
    ACT_GELU_TANH, "autograd.Function for the block MLP "
    "(`mlp` runs it in eager mode; the custom op under torch.compile).")

_mlp_op = register_custom_op("mlp", ACT_GELU_TANH)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
        b2: torch.Tensor, gemm: Optional[str] = None) -> torch.Tensor:
    """gelu_tanh(x @ w1^T + b1) @ w2^T + b2 over the last dim of x."""
    gemm = DEFAULT_GEMM if gemm is None else gemm
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}; choose one of {GEMMS}")
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    if compiling():  # opaque custom op for the tracer
        return _mlp_op(x, w1, b1, w2, b2, gemm)[0]
    return MLPFn.apply(x, w1, b1, w2, b2, gemm)  # eager: cheaper than custom-op dispatch
