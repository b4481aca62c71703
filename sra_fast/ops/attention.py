"""The one place that picks the attention implementation used by every block.

Backends (select with `set_attention_backend` / `use_attention_backend`):
  auto       - CUDA fp16/bf16: the flash_attn package when one of its builds imports and
               supports the card (FA3 `flash_attn_interface` on Hopper, FA4 `flash_attn.cute`
               on Hopper/Blackwell, FA2 `flash_attn` on Ampere and newer), else PyTorch SDPA
               with its fused kernels in the priority order that is fastest for the card
               (cuDNN > flash > mem-efficient on sm90+, where PyTorch's cuDNN kernel beats its
               flash kernel by ~1.35x for DiT shapes; flash > mem-efficient > cuDNN below).
               Elsewhere (CPU, fp32): PyTorch SDPA, its own choice (bit-identical to `sdpa`).
  sdpa       - torch.nn.functional.scaled_dot_product_attention, PyTorch's own choice.
  cudnn, flash, efficient
             - SDPA restricted to that one fused kernel: an error, not a silent fallback,
               when it cannot run these tensors (benchmarks and tests use them).
  flash_attn - the flash_attn package (best importable build, as in auto); error if missing.
  math       - plain softmax(q k^T / sqrt(d)) v in the inputs' dtype: the reference.
q, k, v are (B, H, T, head_dim); the result is (B, H, T, head_dim). Any head_dim that is a
multiple of 8 runs on every fused backend (DiT-XL's 72 included).
The backend actually used is printed once, one line, the first time it runs.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "flash_attn", "math")
SDPA_RESTRICTED = ("cudnn", "flash", "efficient")
_state = {"backend": "auto", "quiet": False}
_announced: set = set()

# --------------------------------------------------------------------------- SDPA control
# torch._C setters are used directly (not torch.nn.attention.sdpa_kernel): entering that
# context costs ~30 us of Python per call, the raw setters ~0.5 us, and attention runs
# (depth_student + depth_teacher) times per step. Backward follows the forward's kernel, so
# only the forward call needs the setting.
_C = torch._C
_SDP_ID = {"math": 0, "flash": 1, "efficient": 2, "cudnn": 3}
_SDP_FLAG = {  # name -> (getter, setter) of PyTorch's global enable flags
    "math": ("_get_math_sdp_enabled", "_set_sdp_use_math"),
    "flash": ("_get_flash_sdp_enabled", "_set_sdp_use_flash"),
    "efficient": ("_get_mem_efficient_sdp_enabled", "_set_sdp_use_mem_efficient"),
    "cudnn": ("_get_cudnn_sdp_enabled", "_set_sdp_use_cudnn"),
}
HAS_SDP_PRIORITY = hasattr(_C, "_get_sdp_priority_order") and hasattr(_C, "_set_sdp_priority_order")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # very old torch
        return False


_SM: dict = {}


def _is_gpu(t: torch.Tensor) -> bool:
    """Whether `auto` takes the GPU route for t (a function, so CPU tests can take it)."""
    return t.is_cuda


def _capability(idx: int) -> tuple:
    return torch.cuda.get_device_capability(idx)


def _sm(device) -> tuple:
    idx = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else 0)
    if idx not in _SM:
        _SM[idx] = _capability(idx)
    return _SM[idx]


def prepare(device, dtype=None, head_dim=None) -> None:
    """Run attention's one-time setup now: the flash_attn imports and the card's capability,
    otherwise done by the first call on the GPU route. Call it before torch.compile traces a
    model: dynamo cannot trace an import (a graph break), and the code it compiles around one
    keeps that break for the whole run, since its guards do not cover these caches. Given the
    dtype and head_dim the model will run with, it also announces the choice (compiled calls
    do not print)."""
    device = torch.device(device)
    _fa_candidates()
    if _is_gpu(torch.empty(0, device=device)):
        _sm(device)
    if dtype is not None and head_dim is not None:
        q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
        _announce(resolve_backend(q), q)


def sdpa_priority(device) -> list[str]:
    """SDPA kernel priority used by `auto` for a CUDA device."""
    if _sm(device) >= (9, 0):
        return ["cudnn", "flash", "efficient", "math"]
    return ["flash", "efficient", "cudnn", "math"]


def _sdpa_prioritised(q, k, v, order: list[str]):
    want = [_SDP_ID[n] for n in order]
    old = _C._get_sdp_priority_order()
    new = want + [b for b in old if b not in want]
    if list(old) == new:
        return F.scaled_dot_product_attention(q, k, v)
    _C._set_sdp_priority_order(new)
    try:
        return F.scaled_dot_product_attention(q, k, v)
    finally:
        _C._set_sdp_priority_order(old)


def _sdpa_only(q, k, v, name: str):
    old = {n: getattr(_C, g)() for n, (g, _) in _SDP_FLAG.items()}
    for n, (_, s) in _SDP_FLAG.items():
        getattr(_C, s)(n == name)
    try:
        return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:
        raise RuntimeError(
            f"attention backend {name!r} (SDPA restricted to its {name} kernel) cannot run "
            f"q {tuple(q.shape)} {q.dtype} on {q.device}: {e}. Use --attn auto or sdpa."
        ) from e
    finally:
        for n, (_, s) in _SDP_FLAG.items():
            getattr(_C, s)(old[n])


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


# While torch.compile traces, the raw setters above would be opaque calls (a graph break at
# every attention); sdpa_kernel is a context dynamo understands: it applies the setting while
# the graph is traced, which is when SDPA's kernel is chosen and baked into the graph.
def _sdpa_only_compiled(q, k, v, name: str):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(_sdp_backend(name)):
        return F.scaled_dot_product_attention(q, k, v)


def _sdpa_prioritised_compiled(q, k, v, order: list[str]):
    # unlike _sdpa_prioritised, sdpa_kernel also enables every backend it lists (one turned
    # off with torch.backends.cuda.enable_*_sdp(False) is back on in the traced graph)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([_sdp_backend(n) for n in order], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------- flash_attn package
_FA = {"loaded": False, "impls": [], "errors": {}}
_fa_failed: set = set()   # (impl, device capability, head_dim, dtype) that raised once


def _fa_candidates():
    """Importable flash_attn builds: [(name, fn, min_sm, max_sm)], loaded on first use."""
    if _FA["loaded"]:
        return _FA["impls"]
    _FA["loaded"] = True
    for name, mod, attr, lo, hi in (
            ("fa3", "flash_attn_interface", "flash_attn_func", (9, 0), (9, 0)),
            ("fa4", "flash_attn.cute", "flash_attn_func", (9, 0), (10, 3)),
            ("fa2", "flash_attn", "flash_attn_func", (8, 0), (12, 9))):
        try:
            fn = getattr(importlib.import_module(mod), attr)
            _FA["impls"].append((name, fn, lo, hi))
        except Exception as e:  # missing, or a build that does not match this torch/CUDA
            _FA["errors"][name] = f"{type(e).__name__}: {e}"
    return _FA["impls"]


def flash_attn_available() -> bool:
    return bool(_fa_candidates())


def _fa_pick(q):
    """The first flash_attn build that supports q's card, head_dim and dtype, or None."""
    if not _is_gpu(q) or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    sm = _sm(q.device)
    d = q.shape[-1]
    if d % 8 or d > 256:
        return None
    for name, fn, lo, hi in _fa_candidates():
        if lo <= sm <= hi and (name, sm, d, q.dtype) not in _fa_failed:
            return name, fn
    return None


def _run_fa(name, fn, q, k, v):
    # flash_attn wants (B, T, H, d); the transposes are views of the qkv projection's layout
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(o, (tuple, list)):  # FA3/FA4 versions that also return the log-sum-exp
        o = o[0]
    return o.transpose(1, 2)


# --------------------------------------------------------------------------- public API
def set_attention_backend(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    if name == "flash_attn" and not flash_attn_available():
        raise RuntimeError("attention backend 'flash_attn' needs the flash_attn package "
                           f"(FA2, FA3 or FA4), none imports here ({_FA['errors']}); use "
                           "--attn auto or sdpa")
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
    """What runs for tensors like q: 'flash_attn:<fa2|fa3|fa4>', 'sdpa',
    'sdpa[cudnn>flash>efficient>math]', 'cudnn', 'flash', 'efficient' or 'math'."""
    name = _state["backend"]
    if name == "flash_attn":
        pick = _fa_pick(q)
        if pick is None:
            raise RuntimeError(f"attention backend 'flash_attn' has no build for q "
                               f"{tuple(q.shape)} {q.dtype} on {q.device} (available: "
                               f"{[c[0] for c in _fa_candidates()]}); use --attn auto")
        return f"flash_attn:{pick[0]}"
    if name != "auto":
        return name
    if not _is_gpu(q) or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    pick = _fa_pick(q)
    if pick is not None:
        return f"flash_attn:{pick[0]}"
    if HAS_SDP_PRIORITY:
        return "sdpa[" + ">".join(sdpa_priority(q.device)) + "]"
    return "sdpa"


def _announce(resolved: str, q) -> None:
    key = (_state["backend"], resolved, q.device.type)
    if key in _announced or _state["quiet"]:
        return
    _announced.add(key)
    where = torch.cuda.get_device_name(q.device) if q.is_cuda else q.device.type
    print(f"sra_fast attention: {_state['backend']} -> {resolved} ({where}, {q.dtype}, "
          f"head_dim {q.shape[-1]})", flush=True)


def attention(q, k, v):
    name = resolve_backend(q)
    if not _compiling():
        _announce(name, q)
    if name.startswith("flash_attn:"):
        impl = name.split(":", 1)[1]
        fn = dict((c[0], c[1]) for c in _fa_candidates())[impl]
        if _state["backend"] == "flash_attn":
            return _run_fa(impl, fn, q, k, v)
        try:
            return _run_fa(impl, fn, q, k, v)
        except Exception as e:  # auto: a build that rejects this shape/card -> next choice
            _fa_failed.add((impl, _sm(q.device), q.shape[-1], q.dtype))
            print(f"sra_fast attention: flash_attn {impl} failed ({type(e).__name__}: {e}); "
                  "falling back", flush=True)
            return attention(q, k, v)
    if name.startswith("sdpa["):
        if _compiling():
            return _sdpa_prioritised_compiled(q, k, v, name[5:-1].split(">"))
        return _sdpa_prioritised(q, k, v, name[5:-1].split(">"))
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if name in SDPA_RESTRICTED:
        if _compiling():
            return _sdpa_only_compiled(q, k, v, name)
        return _sdpa_only(q, k, v, name)
    return attention_math(q, k, v)


def backend_runs(name: str, q: torch.Tensor) -> bool:
    """Whether backend `name` can run (forward and backward) tensors like q (B,H,T,d):
    tries a tiny problem of q's device, dtype and head_dim. For tests and benchmarks."""
    if name == "flash_attn" and not flash_attn_available():
        return False
    x = torch.randn(1, 1, 8, q.shape[-1], device=q.device, dtype=q.dtype, requires_grad=True)
    quiet, _state["quiet"] = _state["quiet"], True
    try:
        with use_attention_backend(name):
            attention(x, x, x).sum().backward()
        return True
    except RuntimeError:
        return False
    finally:
        _state["quiet"] = quiet


__all__ = ["ATTENTION_BACKENDS", "SDPA_RESTRICTED", "HAS_SDP_PRIORITY", "set_attention_backend",
           "get_attention_backend", "use_attention_backend", "attention", "attention_math",
           "resolve_backend", "backend_runs", "flash_attn_available", "sdpa_priority", "prepare"]
