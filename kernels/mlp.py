"""DiT/SiT block MLP: fc1 -> GELU(tanh) -> fc2, GELU fused (see linear_act.py).

DEFAULT_GEMM says how fc1 runs: "cublas" (torch.matmul, then one fused Triton bias+GELU
pass) or "triton" (a Triton GEMM with the bias+GELU epilogue). cuBLAS stays the default until
a GPU benchmark (benchmarks/bench_ops.py --op mlp) shows the Triton GEMM winning; override
per call with gemm=..., or with SRA_FAST_MLP_GEMM=triton.
With "cublas" and nothing needing a gradient (the teacher, sampling), fc1 + bias + GELU run
as one GEMM with cuBLASLt's GELU epilogue on CUDA (linear_act.gelu_mlp_inference).
"""
import os

from .linear_act import ACT_GELU_TANH, make_linear_act

DEFAULT_GEMM = os.environ.get("SRA_FAST_MLP_GEMM", "cublas")

MLPFn, _mlp_op, mlp = make_linear_act(
    "mlp", ACT_GELU_TANH, lambda: DEFAULT_GEMM,
    "autograd.Function for the block MLP "
    "(`mlp` runs it in eager mode; the custom op under torch.compile).",
    "gelu_tanh(x @ w1^T + b1) @ w2^T + b2 over the last dim of x.", __name__)
