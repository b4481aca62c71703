"""NVTX ranges for Nsight Systems, free when no profiler is asked for.

`nvtx_range("student forward")` marks a region on the CUDA timeline when profiling is on
(environment SRA_FAST_NVTX=1 at import, or `set_nvtx(True)`) and CUDA is available; otherwise
it returns a shared no-op context, so the training step pays one function call per range.
Ranges are host-side markers: inside a captured CUDA graph they mark the capture, not the
replays (profile the eager step to see per-phase times).

    SRA_FAST_NVTX=1 nsys profile -t cuda,nvtx python benchmarks/bench_step.py --models SiT-B/2
"""
from __future__ import annotations

import contextlib
import os

import torch

_NULL = contextlib.nullcontext()
_state = {"on": os.environ.get("SRA_FAST_NVTX", "0") == "1"}


def set_nvtx(on: bool) -> None:
    _state["on"] = bool(on)


def nvtx_enabled() -> bool:
    return _state["on"] and torch.cuda.is_available()


@contextlib.contextmanager
def _range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """Context manager: an NVTX range named `name` when profiling is on, else a no-op."""
    if _state["on"] and torch.cuda.is_available():
        return _range(name)
    return _NULL


__all__ = ["nvtx_range", "nvtx_enabled", "set_nvtx"]
