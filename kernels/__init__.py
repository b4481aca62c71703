"""Fused Triton kernels for sra-fast, imported as `sra_fast.kernels` (never as `kernels`).

Each op has two equivalent autograd wrappers over the same Triton forward and backward host
functions: a torch custom op (torch.library.custom_op with a fake impl and register_autograd,
so torch.compile traces it without a graph break) and a torch.autograd.Function (`...Fn`,
exported). The public functions pick between them: the custom op while torch.compile/export
traces (torch.compiler.is_compiling()), the autograd.Function in eager mode, where the custom
op's dispatch would cost tens of microseconds of host time per call (CPU-measured in
benchmarks/bench_host_overhead.py). The choice lives here, not in the dispatcher, so every
caller of the kernels (dispatcher, benchmarks, tests) gets the same path. The
dispatcher (sra_fast.ops) calls these by name for CUDA tensors, and for CPU tensors under
TRITON_INTERPRET=1. What each op computes is defined by sra_fast.ops.reference.
"""
from .adaln_norm import AdaLNNormFn, adaln_norm
from .align_loss import AlignLossFn, align_loss
from .gated_residual import (GatedResidualAdaLNNormFn, GatedResidualFn, gated_residual,
                             gated_residual_adaln_norm)
from .mlp import MLPFn, mlp
from .projector import ProjectorFn, projector

__all__ = ["adaln_norm", "gated_residual", "gated_residual_adaln_norm", "projector", "mlp",
           "align_loss", "AdaLNNormFn", "GatedResidualFn", "GatedResidualAdaLNNormFn",
           "ProjectorFn", "MLPFn", "AlignLossFn"]
