"""The optional C++/CUDA extension (csrc/): loader, fused EMA update and its reference.

Loading order: an installed `sra_fast._C` (pip with SRA_FAST_BUILD_EXT=1, or CMake); else,
with SRA_FAST_JIT_EXT=1, a JIT build of csrc/ next to the package (source checkout only)
through torch.utils.cpp_extension.load; else nothing, and `unavailable_reason()` says why.

`FusedEMA(ema_params, model_params, shadow_params=None)` prepares the update once (checks,
pointer table on the device) and `.step(weight)` runs it: one kernel launch over all tensors,
no allocation, no host sync, capturable in a CUDA graph when the plan is built before capture
and `weight` is a 0-d float32 tensor on the device (its value is read at run time).
`fused_ema_ref` is the definition tests compare against and the fallback without the
extension: ema = lerp(ema, model, weight); shadow = bf16(ema) where a shadow is given.

`FusedAdamWEMA(optimizer, model_params, ema_params, shadow_params=None)` runs torch's fused
AdamW update, the EMA lerp toward the updated parameters and the bf16 shadow in ONE pass over
the parameters (`.step(lr, found_inf, grad_scale, ema_weight)`, all device scalars); its
definition and fallback is `fused_adamw_ema_ref`: torch._fused_adamw_, then fused_ema_ref.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "load", "jit_build", "FusedEMA",
           "fused_ema_ref", "FusedAdamWEMA", "fused_adamw_ema_ref"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES_CPU = ("bindings.cpp", "fused_ema_cpu.cpp", "fused_adamw_ema_cpu.cpp")
_SOURCES_CUDA = ("fused_ema.cu", "fused_adamw_ema.cu")
_state = {"module": None, "reason": None, "tried": False}
_said: set[str] = set()


def _say_once(msg: str):
    if msg not in _said:
        _said.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _build_dir(name: str) -> Path:
    """SRA_FAST_EXT_BUILD_DIR, else ~/.cache/sra_fast/ext/<torch version>/<name>, else tmp."""
    tag = torch.__version__.replace("+", "_")
    candidates = []
    if os.environ.get("SRA_FAST_EXT_BUILD_DIR"):
        candidates.append(Path(os.environ["SRA_FAST_EXT_BUILD_DIR"]) / name)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    candidates.append(cache / "sra_fast" / "ext" / tag / name)
    candidates.append(Path(tempfile.gettempdir()) / f"sra_fast_ext_{os.getuid()}" / tag / name)
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".write_probe"
            probe.touch()
            probe.unlink()
            return d
        except OSError:
            continue
    raise OSError(f"no writable build directory among {[str(c) for c in candidates]}")


def jit_build(verbose: bool = False, with_cuda: bool | None = None):
    """Compile csrc/ with torch.utils.cpp_extension.load and return the module.

    CUDA sources and -DWITH_CUDA are added when `with_cuda` (default: torch.cuda.is_available()
    and a CUDA toolkit is found). Rebuilds only when sources or flags changed. Raises on failure.
    """
    from torch.utils import cpp_extension

    if not (_CSRC / "bindings.cpp").is_file():
        raise FileNotFoundError(f"csrc/ sources not found at {_CSRC} (the JIT build needs the "
                                "source checkout; an installed package carries no csrc/)")
    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    name = "sra_fast_C_cuda" if with_cuda else "sra_fast_C_cpu"
    sources = [str(_CSRC / s) for s in _SOURCES_CPU + (_SOURCES_CUDA if with_cuda else ())]
    defines = ["-DWITH_CUDA"] if with_cuda else []
    return cpp_extension.load(
        name=name, sources=sources, build_directory=str(_build_dir(name)),
        extra_cflags=["-O3"] + defines,
        # no --use_fast_math: it implies -ftz=true, and torch keeps fp32 denormals
        extra_cuda_cflags=["-O3"] + defines if with_cuda else None,
        extra_include_paths=[str(_CSRC)], with_cuda=with_cuda, verbose=verbose)


def load(jit: bool | None = None):
    """The extension module, or None. `jit` (default: env SRA_FAST_JIT_EXT == "1") allows a
    JIT build when no installed sra_fast._C imports. The outcome is cached."""
    if _state["module"] is not None:
        return _state["module"]
    if jit is None:
        if _state["tried"]:
            return None
        jit = os.environ.get("SRA_FAST_JIT_EXT", "0") == "1"
    _state["tried"] = True
    try:
        from . import _C  # noqa: F401  (built by setup.py / CMake)
        _state["module"] = _C
        return _C
    except ImportError as e:
        reason = f"sra_fast._C is not built ({e})"
    if not jit:
        _state["reason"] = (reason + "; install with SRA_FAST_BUILD_EXT=1 or set "
                            "SRA_FAST_JIT_EXT=1 to JIT-build it")
        return None
    try:
        _state["module"] = jit_build()
        _state["reason"] = None
        return _state["module"]
    except Exception as e:  # compiler/toolkit missing or build error: the reference still runs
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _state["reason"] = f"JIT build of csrc/ failed: {type(e).__name__}: {first}"
        return None


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    """One line saying why the extension is not available (None when it is)."""
    return None if load() is not None else _state["reason"]


@torch.no_grad()
def fused_ema_ref(ema_params, model_params, weight, shadow_params=None):
    """ema = lerp(ema, model, weight) for every pair (one foreach call); then, where
    shadow_params (a list aligned with ema_params, None entries allowed) has a tensor,
    shadow.copy_(ema). `weight` is a float or a one-element tensor on the device."""
    ema = list(ema_params)
    model = [p.detach() for p in model_params]
    if len(ema) != len(model):
        raise ValueError(f"{len(ema)} EMA tensors but {len(model)} model tensors")
    if not ema:
        return
    if torch.is_tensor(weight):
        w = weight.reshape(())
        torch._foreach_lerp_(ema, model, [w] * len(ema))   # broadcasts the 0-d weight
    else:
        torch._foreach_lerp_(ema, model, float(weight))
    if shadow_params is not None:
        shadow = list(shadow_params)
        if len(shadow) != len(ema):
            raise ValueError(f"{len(shadow)} shadow entries for {len(ema)} EMA tensors")
        pairs = [(s, e) for s, e in zip(shadow, ema) if s is not None]
        if pairs:
            torch._foreach_copy_([s for s, _ in pairs], [e for _, e in pairs])


def _unsupported(ema, model, shadow, mod) -> str | None:
    """Why the extension cannot take these (valid) inputs, or None."""
    tensors = ema + model + [s for s in (shadow or []) if s is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    dev = next(iter(devices), torch.device("cpu"))
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev} is not supported"
    if dev.type == "cuda" and not mod.with_cuda:
        return "the extension was built without CUDA"
    if any(t.dtype != torch.float32 for t in ema + model):
        return "EMA and model tensors must be float32"
    if any(s is not None and s.dtype != torch.bfloat16 for s in (shadow or [])):
        return "shadow tensors must be bfloat16"
    if any(not t.is_contiguous() for t in tensors):
        return "non-contiguous tensors"
    return None


def _extension_for(ema, model, shadow):
    """(extension module, None) when it can run on these tensors, else (None, why not)."""
    mod = load()
    if mod is None:
        return None, unavailable_reason()
    why = _unsupported(ema, model, shadow, mod)
    return (None, why) if why else (mod, None)


class FusedEMA:
    """One-launch EMA update of `ema_params` toward `model_params` (and bf16 `shadow_params`,
    a list aligned with ema_params, None where a tensor has no shadow).

    Build it once, before any CUDA graph capture; call `.step(weight)` each training step
    with `weight` = 1 - decay as a 0-d float32 tensor on the parameters' device (a float
    works too but allocates a tensor each call, so it is not capturable). Without the
    extension, or for inputs it does not take, `.step` runs `fused_ema_ref` (said once).
    """

    def __init__(self, ema_params, model_params, shadow_params=None):
        # the tensors themselves, not detached aliases: the plan then notices a later
        # `param.data = ...` (it checks storage pointers host-side on every step)
        self.ema = list(ema_params)
        self.model = list(model_params)
        self.shadow = None if shadow_params is None else list(shadow_params)
        if len(self.ema) != len(self.model):
            raise ValueError(f"{len(self.ema)} EMA tensors but {len(self.model)} model tensors")
        if self.shadow is not None and len(self.shadow) != len(self.ema):
            raise ValueError(f"{len(self.shadow)} shadow entries for {len(self.ema)} EMA "
                             "tensors (use None where a tensor has no shadow)")
        for i, (e, m) in enumerate(zip(self.ema, self.model)):
            if e.shape != m.shape:
                raise ValueError(f"tensor {i}: EMA shape {tuple(e.shape)} != model shape "
                                 f"{tuple(m.shape)}")
            s = self.shadow[i] if self.shadow is not None else None
            if s is not None and s.shape != e.shape:
                raise ValueError(f"tensor {i}: shadow shape {tuple(s.shape)} != EMA shape "
                                 f"{tuple(e.shape)}")
        self.device = self.ema[0].device if self.ema else torch.device("cpu")
        self._plan = None
        mod, self.fallback_reason = _extension_for(self.ema, self.model, self.shadow)
        if mod is not None:
            self._plan = mod.FusedEMAPlan(self.ema, self.model, self.shadow)
        if self._plan is None:
            _say_once(f"FusedEMA: using the PyTorch reference ({self.fallback_reason})")

    @property
    def fused(self) -> bool:
        """True when `.step` runs the extension."""
        return self._plan is not None

    def step(self, weight):
        """ema = lerp(ema, model, weight); shadow = bf16(ema)."""
        if not torch.is_tensor(weight):
            weight = torch.tensor(float(weight), dtype=torch.float32, device=self.device)
        if self._plan is None:
            fused_ema_ref(self.ema, self.model, weight, self.shadow)
        else:
            if weight.dtype != torch.float32:
                raise TypeError(f"weight must be float32, got {weight.dtype}")
            self._plan.step(weight)

    def __repr__(self):
        n = sum(e.numel() for e in self.ema)
        ns = sum(s is not None for s in (self.shadow or []))
        how = "fused" if self.fused else f"reference: {self.fallback_reason}"
        return (f"FusedEMA({len(self.ema)} tensors, {n} elements, {ns} bf16 shadows, "
                f"{self.device}, {how})")


@torch.no_grad()
def fused_adamw_ema_ref(params, grads, exp_avgs, exp_avg_sqs, steps, ema_params, shadow_params,
                        *, lr, beta1, beta2, eps, weight_decay, found_inf, grad_scale,
                        ema_weight):
    """The one-pass update's definition, in two passes of PyTorch ops: torch.optim's fused
    AdamW path (steps += 1; torch._fused_adamw_ with found_inf / grad_scale; steps -=
    found_inf) on the tensors that have optimizer state (exp_avgs[i] is not None), then the
    EMA lerp of every tensor toward its parameter with weight ema_weight * (1 - found_inf)
    (a skipped step leaves the EMA as it is) and the shadow copy. Lists are aligned by tensor.
    """
    tr = [i for i, m in enumerate(exp_avgs) if m is not None]
    if tr:
        sts = [steps[i] for i in tr]
        torch._foreach_add_(sts, 1)
        torch._fused_adamw_([params[i].detach() for i in tr], [grads[i] for i in tr],
                            [exp_avgs[i] for i in tr], [exp_avg_sqs[i] for i in tr], [], sts,
                            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                            eps=eps, amsgrad=False, maximize=False, grad_scale=grad_scale,
                            found_inf=found_inf)
        torch._foreach_sub_(sts, [found_inf] * len(sts))
    fused_ema_ref(ema_params, params, ema_weight * (1.0 - found_inf), shadow_params)


def _adamw_ema_unsupported(opt) -> str | None:
    """Why `opt` cannot be run by the one-pass update (None when it can)."""
    if type(opt) not in (torch.optim.AdamW, torch.optim.Adam):
        return f"{type(opt).__name__} is not torch.optim.AdamW"
    if len(opt.param_groups) != 1:
        return f"{len(opt.param_groups)} parameter groups (one is supported)"
    g = opt.param_groups[0]
    if g.get("amsgrad") or g.get("maximize"):
        return "amsgrad / maximize are not supported"
    if type(opt) is torch.optim.Adam and g.get("weight_decay", 0) != 0 \
            and not g.get("decoupled_weight_decay", False):
        return "Adam's coupled weight decay is not supported (use AdamW)"
    if any(p.dtype != torch.float32 for p in g["params"]):
        return "parameters must be float32"
    if any(torch.is_tensor(v) for v in (*g["betas"], g["eps"], g["weight_decay"])):
        # read on the host as kernel arguments: a tensor would sync every step
        return "tensor betas / eps / weight_decay are not supported (use floats)"
    return None


class FusedAdamWEMA:
    """torch AdamW (`optimizer`, one parameter group) + EMA (+ bf16 shadow) in one pass.

    model_params / ema_params / shadow_params (None entries allowed) are aligned lists over
    ALL model parameters; the ones not in the optimizer (frozen, e.g. pos_embed) get the EMA
    lerp only. The optimizer's own state tensors (exp_avg, exp_avg_sq, step) are updated in
    place, so its state_dict and checkpoints are unchanged. `.step(lr, found_inf, grad_scale,
    ema_weight)`: 0-d float32 device tensors (grad_scale may be None); found_inf = 1 skips the
    step entirely (torch's step counters are rolled back, as torch's fused path does).
    Capturable: build it before capture, and call `.commit()` right after the capture (the
    gradients of a captured backward have addresses the pointer array learns only then).
    Without the extension (or for inputs it does not take) `.step` runs fused_adamw_ema_ref.
    """

    def __init__(self, optimizer, model_params, ema_params, shadow_params=None):
        self.opt = optimizer
        self.model = list(model_params)
        self.ema = list(ema_params)
        self.shadow = list(shadow_params) if shadow_params is not None else [None] * len(self.ema)
        if not (len(self.model) == len(self.ema) == len(self.shadow)):
            raise ValueError(f"{len(self.model)} model, {len(self.ema)} EMA and "
                             f"{len(self.shadow)} shadow entries: the lists must be aligned")
        for i, (p, e) in enumerate(zip(self.model, self.ema)):
            if p.shape != e.shape:
                raise ValueError(f"tensor {i}: EMA shape {tuple(e.shape)} != model shape "
                                 f"{tuple(p.shape)}")
        why = _adamw_ema_unsupported(optimizer)
        if why:
            raise ValueError(f"FusedAdamWEMA: {why}")
        group = optimizer.param_groups[0]
        in_opt = {id(p) for p in group["params"]}
        missing = len(in_opt - {id(p) for p in self.model})
        if missing:
            raise ValueError(f"FusedAdamWEMA: {missing} optimizer parameters are not among "
                             "model_params")
        self.trained = [id(p) in in_opt for p in self.model]
        self.device = self.model[0].device if self.model else torch.device("cpu")
        self.hyper = self._group_hyper()
        self._plan, self._plan_state = None, None
        _, self.fallback_reason = _extension_for(self.ema, self.model, self.shadow)
        if self.fallback_reason is None:
            self._build_plan()
        else:
            _say_once(f"FusedAdamWEMA: using the PyTorch reference ({self.fallback_reason})")

    def _group_hyper(self) -> dict:
        """betas, eps and weight decay as the parameter group says now (a resume's
        optimizer.load_state_dict, or the user, may change them; lr comes with each step)."""
        g = self.opt.param_groups[0]
        return dict(beta1=float(g["betas"][0]), beta2=float(g["betas"][1]), eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]))

    def _build_plan(self):
        """(Re)build the extension's plan over the optimizer state as it is now."""
        self._init_state()
        m, v, st = self._state_lists()
        self._plan = load().FusedAdamWEMAPlan(self.model, m, v, st, self.ema, self.shadow,
                                              **self.hyper)
        self._plan_state = [id(t) for t in m + v + st]

    def _init_state(self):
        """Create missing AdamW state the way torch's fused, capturable AdamW does (0-d fp32
        step on the device, zero moments), and move a CPU step counter to the device."""
        for p, t in zip(self.model, self.trained):
            if not t:
                continue
            st = self.opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif st["step"].device != p.device or st["step"].dtype != torch.float32:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    def _state_lists(self):
        m, v, st = [], [], []
        for p, t in zip(self.model, self.trained):
            s = self.opt.state[p] if t else None
            m.append(s["exp_avg"] if t else None)
            v.append(s["exp_avg_sq"] if t else None)
            st.append(s["step"] if t else None)
        return m, v, st

    @property
    def fused(self) -> bool:
        return self._plan is not None

    def step(self, lr, found_inf, grad_scale, ema_weight):
        grads = [p.grad if t else None for p, t in zip(self.model, self.trained)]
        hyper = self._group_hyper()
        changed = hyper != self.hyper
        self.hyper = hyper
        if self._plan is None:
            self._init_state()
            m, v, st = self._state_lists()
            fused_adamw_ema_ref(self.model, grads, m, v, st, self.ema, self.shadow, lr=lr,
                                found_inf=found_inf, grad_scale=grad_scale,
                                ema_weight=ema_weight, **self.hyper)
            return
        m, v, st = self._state_lists()
        if changed or [id(t) for t in m + v + st] != self._plan_state:
            # optimizer.load_state_dict (a resume) brought new state tensors or hyperparameters
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("FusedAdamWEMA: the optimizer state or its betas / eps / "
                                   "weight decay changed; step once outside CUDA-graph capture "
                                   "first")
            self._build_plan()
            m, v, st = self._state_lists()
        sts = [s for s in st if s is not None]
        if sts:
            torch._foreach_add_(sts, 1)
        self._plan.step(grads, lr, found_inf, grad_scale, ema_weight)
        if sts:
            torch._foreach_sub_(sts, [found_inf] * len(sts))

    def commit(self) -> bool:
        """After a CUDA-graph capture: upload the captured gradients' addresses."""
        return self._plan.commit() if self._plan is not None else False

    def __repr__(self):
        how = "fused" if self.fused else f"reference: {self.fallback_reason}"
        return (f"FusedAdamWEMA({len(self.model)} tensors, {sum(self.trained)} trained, "
                f"{sum(s is not None for s in self.shadow)} bf16 shadows, {self.device}, {how})")


if __name__ == "__main__":  # python -m sra_fast.ext : report what is available
    mod = load()
    print("sra_fast extension:", "available" if mod is not None else "unavailable",
          f"({mod.__name__}, with_cuda={mod.with_cuda})" if mod is not None
          else f"({unavailable_reason()})", file=sys.stdout)
