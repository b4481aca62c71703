"""EMA teacher: a frozen eval-mode copy of the student, updated with one foreach lerp."""
from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the student, equal to it, eval mode, no autograd (the SRA teacher)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    if hasattr(ema, "compile_blocks"):
        # a copy shares a compiled student's block function: the teacher runs as its step
        # compiles it (TrainStep), the sampler as it is told
        ema.compile_blocks(None)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999, *,
               weight: torch.Tensor | None = None):
    """ema = decay * ema + (1 - decay) * model = lerp(ema, model, 1 - decay), all parameters.

    Parameters the model does not train (pos_embed) are identical in both and stay so.
    `decay` may be a float or a 0-d tensor on the device (graph capture); or give the lerp
    `weight` (= 1 - decay) as a 0-d device tensor directly (0 leaves the EMA unchanged).
    A float is one foreach lerp. A tensor weight is one lerp per parameter tensor: the foreach
    fast path takes no 0-d tensor weight, and building the update from foreach mul/add would
    move 28 bytes per parameter and allocate a model-sized temporary instead of 12 bytes and
    none; the launches are free in a captured graph. Both compute the same bits for the same
    fp32 weight.
    """
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if len(e_params) != len(m_params):
        raise ValueError("EMA and model have different parameter lists")
    if weight is None:
        weight = 1.0 - decay
    if torch.is_tensor(weight):
        torch._foreach_lerp_(e_params, m_params, [weight] * len(e_params))
    else:
        torch._foreach_lerp_(e_params, m_params, weight)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
