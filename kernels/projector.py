"""SRA projector head: Linear(D, 2D) -> SiLU -> Linear(2D, D), SiLU fused (see linear_act.py).

DEFAULT_GEMM says how the first GEMM runs: "cublas" (torch.matmul, then one fused Triton
bias+SiLU pass) or "triton" (a Triton GEMM with the bias+SiLU epilogue). cuBLAS stays the
default until a GPU benchmark (benchmarks/bench_ops.py --op projector) shows the Triton GEMM
winning; override per call with gemm=..., or with SRA_FAST_PROJECTOR_GEMM=triton.
"""
import os

from .linear_act import ACT_SILU, make_linear_act

DEFAULT_GEMM = os.environ.get("SRA_FAST_PROJECTOR_GEMM", "cublas")

ProjectorFn, _projector_op, projector = make_linear_act(
    "projector", ACT_SILU, lambda: DEFAULT_GEMM,
    "autograd.Function for the projector "
    "(`projector` runs it in eager mode; the custom op under torch.compile).",
    "silu(x @ w1^T + b1) @ w2^T + b2 over the last dim of x (bf16 in, fp32 accumulation).",
    __name__)
