"""Fused Triton kernels for sra-fast, imported as `sra_fast.kernels` (never as `kernels`).

Each public function is a torch custom op (torch.library.custom_op with a fake impl and
register_autograd, so torch.compile traces it without a graph break) over Triton forward and
backward kernels; an equivalent torch.autograd.Function (`...Fn`) is exported beside it. The
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
