"""The one place that picks the attention implementation used by every block.

Backends (select with `set_attention_backend`):
  auto      - flash_attn package if importable and the tensors are CUDA fp16/bf16, else
              PyTorch SDPA (which picks its fastest fused kernel), else math.
  sdpa      - torch.nn.functional.scaled_dot_product_attention, PyTorch's own choice.
  flash_attn- the flash_attn package (FlashAttention-2 `flash_attn_func`); error if missing.
  math      - plain softmax(q k^T / sqrt(d)) v, the reference.
q, k, v are (B, H, T, head_dim); the result is (B, H, T, head_dim).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "math")
_state = {"backend": "auto", "announced": False}

try:  # optional accelerator, never required
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a build that does not match this torch/CUDA
    _flash_attn_func = None


def set_attention_backend(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    if name == "flash_attn" and _flash_attn_func is None:
        raise RuntimeError("attention backend 'flash_attn' needs the flash_attn package, which "
                           "is not importable here; use --attn sdpa")
    _state["backend"] = name


def get_attention_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_attention_backend(name: str):
    old = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


def attention_math(q, k, v):
    """Reference attention in the inputs' dtype."""
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return s.softmax(-1) @ v


def resolve_backend(q: torch.Tensor) -> str:
    """What `auto` (or the selected backend) runs for tensors like q."""
    name = _state["backend"]
    if name != "auto":
        return name
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash_attn"
    return "sdpa"


def attention(q, k, v):
    name = resolve_backend(q)
    if name == "flash_attn":
        # flash_attn wants (B, T, H, d)
        o = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return attention_math(q, k, v)
