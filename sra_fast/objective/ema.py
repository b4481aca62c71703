"""EMA teacher: a frozen eval-mode copy of the student, updated with one foreach lerp."""
from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the student, equal to it, eval mode, no autograd (the SRA teacher)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999):
    """ema = decay * ema + (1 - decay) * model, for all parameters in one foreach call.

    Parameters the model does not train (pos_embed) are identical in both and stay so.
    `decay` may be a float or a 0-d tensor on the device (graph capture).
    """
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if len(e_params) != len(m_params):
        raise ValueError("EMA and model have different parameter lists")
    weight = 1.0 - decay
    if torch.is_tensor(weight):
        # foreach_lerp takes a Python scalar or a tensor list; scale by hand for a device weight
        torch._foreach_mul_(e_params, decay)
        torch._foreach_add_(e_params, torch._foreach_mul(m_params, weight))
    else:
        torch._foreach_lerp_(e_params, m_params, weight)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
