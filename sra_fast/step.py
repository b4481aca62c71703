"""One SRA training step: student + teacher forward, loss, backward, clip, AdamW, EMA.

Host-sync free: statistics accumulate in device buffers read by `read_stats()` every N steps;
gradient clipping never reads the norm on the host: with torch's fused AdamW (and no
GradScaler) the clip is folded into the optimizer kernel as its `grad_scale` (the gradients are
divided in the pass that reads them; clip_grad_norm_ would read and write them once more, and
the kernel writes them back, so one read of every gradient is saved); otherwise
clip_grad_norm_. A non-finite loss or gradient norm skips
the optimizer and EMA update through the optimizer's `found_inf` input and a zero EMA weight
(no Python branch on tensor values), and is counted.

Two ways to run it, same arithmetic:
  eager (default)   - Python issues every kernel each step.
  cuda_graph=True   - the whole step (all micro-batches of gradient accumulation, student
                      forward+backward, teacher forward, loss, clipping, fused capturable
                      AdamW, EMA update, statistics) is captured once into one CUDA graph
                      and replayed: inputs are copied into static buffers, the alignment
                      weight and learning rate live in device scalars, t/t'/eps/label
                      dropout are drawn on the device inside the graph (the step's
                      torch.Generator is registered with the graph, or the default CUDA
                      generator is used). Where capture is impossible (CPU, fp16 with its
                      GradScaler, a DDP/compiled student, a non-fused optimizer) the step says
                      why once and runs eagerly; cuda_graph="strict" raises instead. Several
                      processes: pass grad_sync (the gradient all-reduce is then captured
                      too) and the model itself as the student, not DDP.
Graph warm-up runs real steps whose update is forced to be skipped (the same found_inf path
as a non-finite step), and the RNG and statistics are restored afterwards, so capturing
changes no weight, optimizer state, EMA or random stream: the graph step's first update is
the eager step's first update.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed

from .objective import SRAObjective, ema_update
from .ops import attention
from .profiling import nvtx_enabled, nvtx_range
from .teacher import BF16Shadow, StudentView, TeacherView

PRECISIONS = ("bf16", "fp16", "fp32")
# torch.compile modes the step takes (torch's own names). "max-autotune-no-cudagraphs" and
# "default" leave CUDA graphs to the step's own capture; "reduce-overhead" is inductor's
# CUDA graphs around what is compiled (eager step only): with compile_scope "blocks" one per
# block call, the modulations, embeddings and final layer eager between them (unmeasured).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# what of the student is compiled: "blocks" (regional: one compiled function for every block,
# DiffusionTransformer.compile_blocks) or "model" (the whole student, as torch.compile(model))
COMPILE_SCOPES = ("blocks", "model")


def compile_fn(fn, mode: str, backend: str = "inductor"):
    """torch.compile(fn) in `mode`, shapes static (a step's batch is fixed; a new shape
    recompiles). A backend other than inductor takes no mode (tests use "aot_eager")."""
    if backend == "inductor":
        return torch.compile(fn, mode=mode, dynamic=False)
    return torch.compile(fn, backend=backend, dynamic=False)


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype activations run in under a precision ("bf16", "fp16" or "fp32")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast_ctx(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision_dtype(precision))


def make_optimizer(model, lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 0.0,
                   eps: float = 1e-8, capturable: bool = False):
    """AdamW as in the released runs; fused where the device supports it.

    capturable=True prepares it for the CUDA-graph step (the step also converts an existing
    fused optimizer itself, so this is optional)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                 fused=True, capturable=capturable)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                 foreach=True)


def _is_wrapper(student, model) -> str | None:
    if student is model:
        return None
    name = type(student).__name__
    if isinstance(student, torch.nn.parallel.DistributedDataParallel) or hasattr(student, "no_sync"):
        return (f"the student is a {name} (DDP): its gradient all-reduce runs in autograd hooks "
                "on a side stream with bucket state that a replayed graph would not refresh, so "
                "graph mode could average stale gradients; run DDP eagerly")
    return (f"the student is a {name} wrapper, not the model itself (torch.compile or another "
            "wrapper cannot be captured by this step)")


class GraphCaptureError(RuntimeError):
    """The CUDA graph could not be captured where no eager fallback is safe (several
    processes): the message is one line for the user."""


def graph_refusal(model, optimizer, *, student=None, precision: str = "bf16", generator=None,
                  grad_sync=None, emulate: bool = False) -> str | None:
    """Why a TrainStep with these settings could not be captured in a CUDA graph (every
    reason, '; '-joined), or None. The trainer asks before it chooses DDP or grad_sync."""
    student = model if student is None else student
    device = next(model.parameters()).device
    why = []
    if not emulate and (device.type != "cuda" or not torch.cuda.is_available()):
        why.append(f"the model is on {device.type}, CUDA graphs need a CUDA device")
    if precision == "fp16":
        why.append("precision fp16 uses a GradScaler, whose skip/rescale logic syncs with "
                   "the host; use bf16 (no scaler needed) for graph mode")
    wrapper = _is_wrapper(student, model)
    dist = torch.distributed
    if wrapper:
        why.append(wrapper)
    elif grad_sync is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            why.append("torch.distributed runs several processes and the step was given no "
                       "grad_sync group, so nothing would all-reduce the gradients; run "
                       "eagerly (or pass grad_sync)")
    elif not emulate and dist.get_world_size(grad_sync) > 1 \
            and dist.get_backend(grad_sync) != "nccl":
        why.append(f"the gradient all-reduce runs on {dist.get_backend(grad_sync)}, which a "
                   "CUDA graph cannot capture (NCCL can)")
    if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) or \
            not all(g.get("fused") for g in optimizer.param_groups):
        why.append("the optimizer is not a fused Adam/AdamW (fused=True): graph mode needs "
                   "its device-side found_inf skip and capturable state")
    if generator is not None and not emulate:
        if generator.device.type != "cuda":
            why.append("the step's generator is not a CUDA generator")
        elif not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            why.append("this torch cannot register a user torch.Generator with a CUDA "
                       "graph; pass generator=None to use the default CUDA generator")
    return "; ".join(why) or None


class TrainStep:
    """SRA step. `student` may be a DDP wrapper of `model`; `ema` is the teacher.

    Options beyond the trainer's (model, ema, objective, optimizer, student, precision,
    grad_clip (None or inf: no clipping, the norm is still reported), ema_decay, grad_accum,
    generator):
      cuda_graph   False | True | "strict" | "emulate": capture the whole step in one CUDA
                   graph (True falls back to eager with a message where impossible; "strict"
                   raises). "emulate" runs the graph code path (static buffers, device-scalar
                   weight and lr, skip-forced warm-up) without capturing, on any device: the
                   CPU tests check the captured arithmetic with it.
      teacher_bf16 keep bf16 copies of the teacher's matmul weights, refreshed right after
                   the EMA update (see sra_fast.teacher.BF16Shadow); bf16 precision only.
      teacher_full run the whole teacher network as the released code does (baselines).
      teacher_fp32 run the teacher outside the student's autocast, in fp32 (TF32 where
                   allowed), as the released teacher ran; not with teacher_bf16.
      graph_warmup eager warm-up iterations before capture (updates forced to skip; with
                   compile, more while a run still compiles something new).
      ema_impl     "foreach" (default: objective.ema_update, a lerp of every parameter,
                   12 bytes of traffic each, then the bf16 shadow's copy when teacher_bf16)
                   or "fused": sra_fast.ext.FusedEMA, one pass that lerps the EMA and writes
                   the shadow (the C++/CUDA extension when built, else the same lerps and
                   copy), saving the copy's re-read of the EMA. Same bits either way.
                   Or "adamw": sra_fast.ext.FusedAdamWEMA, torch's fused-AdamW update, the
                   EMA lerp and the shadow in ONE pass over the parameters (the extension
                   when built, else fused_adamw_ema_ref: the same two passes as "foreach"),
                   saving the EMA's re-read of every parameter and AdamW's write-back of the
                   unscaled gradient (8 bytes per trained parameter; the shadow's re-read
                   of the EMA too, 4 more per shadowed one). Needs torch's fused AdamW with
                   one parameter group and bf16/fp32 precision. Same AdamW arithmetic as
                   the installed torch's fused AdamW on the device (to fp32 rounding; the
                   EMA/shadow as "foreach").
      grad_sync    None, or a torch.distributed process group (dist.group.WORLD for all):
                   the step averages the gradients over it itself (sra_fast.grad_sync:
                   bucketed all-reduces of a flat buffer, started during the backward),
                   eagerly or inside the captured graph. For several processes in graph mode; `student` must
                   then be the model itself, not a DDP wrapper.
      grad_bucket_mb with grad_sync: megabytes per bucket whose all-reduce starts during
                   the backward (0: one all-reduce after it).
      compile      None or a torch.compile mode (COMPILE_MODES): the student (see
                   compile_scope) and the teacher's forward run compiled; sampling of t,
                   noise and labels, the loss's reduction, the optimizer and the EMA stay as
                   they are. The sra_fast fused ops (kernels
                   "triton"/"auto") are custom ops that inductor keeps opaque and fuses
                   around; with kernels "ref" inductor fuses the reference chains itself.
                   With cuda_graph the compiled code is captured in the step's one graph
                   (compiled during the warm-up). "reduce-overhead" (inductor's own CUDA
                   graphs) needs cuda_graph=False and grad_accum=1. compile_backend: the
                   dynamo backend (tests: "aot_eager").
      compile_scope "blocks" (regional): one compiled function runs every student block
                   (compiled once, whatever the depth), the embeddings and final layer stay
                   eager; each block's backward is its own autograd node, so the gradient
                   all-reduce (DDP's or grad_sync's) overlaps the backward block by block.
                   "model": the whole student compiled (the off-the-shelf torch.compile(model),
                   the benchmark's baseline): cross-block fusion of the reference ops, a
                   compile time that grows with depth, and with grad_sync no overlap (every
                   gradient comes at the end of the one compiled backward; DDP's graph is
                   split at its buckets by dynamo; under "blocks" the step keeps dynamo from
                   splitting each block again). The teacher alike: its blocks through a
                   compiled function of its own (the EMA module, which sampling runs, stays
                   eager), or its whole forward. Blocks with hooks (theirs or their modules')
                   run eagerly, said once: dynamo does not guard on hooks.
    """

    STATS = ("loss", "denoise", "align", "grad_norm", "nonfinite", "steps")

    def __init__(self, model, ema, objective: SRAObjective, optimizer, *, student=None,
                 precision: str = "bf16", grad_clip: float = 1.0, ema_decay: float = 0.9999,
                 grad_accum: int = 1, generator: torch.Generator | None = None,
                 cuda_graph: bool | str = False, teacher_bf16: bool = False,
                 teacher_full: bool = False, teacher_fp32: bool = False,
                 graph_warmup: int = 2, ema_impl: str = "foreach",
                 grad_sync=None, grad_bucket_mb: float = 25.0, compile: str | None = None,
                 compile_backend: str = "inductor", compile_scope: str = "blocks"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if grad_clip is None:
            grad_clip = float("inf")
        if not isinstance(grad_clip, (int, float)) or not grad_clip > 0:
            # also catches NaN; clip_grad_norm_(0) would zero every gradient
            raise ValueError(f"grad_clip must be a number > 0 (None or float('inf') turns "
                             f"clipping off), got {grad_clip!r}")
        if cuda_graph not in (False, True, "strict", "emulate"):
            raise ValueError("cuda_graph must be False, True, 'strict' or 'emulate', got "
                             f"{cuda_graph!r}")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {compile!r}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got "
                             f"{compile_scope!r}")
        if compile and compile_scope == "blocks" and not hasattr(model, "compile_blocks"):
            raise ValueError(f"compile_scope 'blocks' compiles the blocks of a sra_fast SiT/DiT; "
                             f"a {type(model).__name__} has none: use compile_scope 'model'")
        if compile == "reduce-overhead" and cuda_graph:
            raise ValueError("compile mode reduce-overhead records CUDA graphs of its own, "
                             "which cannot run inside the captured step: use compile mode "
                             "default with the CUDA-graph step (the whole step in one graph)")
        if compile == "reduce-overhead" and grad_accum > 1:
            raise ValueError("compile mode reduce-overhead replays one forward and backward per "
                             "step; with gradient accumulation use compile mode default")
        self.model, self.ema, self.objective, self.opt = model, ema, objective, optimizer
        self.student = student if student is not None else model
        self.precision, self.grad_clip, self.ema_decay = precision, grad_clip, ema_decay
        self.grad_accum, self.generator = grad_accum, generator
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._grad_sync = None
        if grad_sync is not None:
            if self.student is not model:
                raise ValueError("grad_sync averages the gradients itself: pass the model as "
                                 "the student, not a DDP (or other) wrapper")
            from .grad_sync import FlatGradSync
            self._grad_sync = FlatGradSync(self.params, grad_sync,
                                           bucket_mb=grad_bucket_mb)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._stats = torch.zeros(len(self.STATS), device=self.device)
        self._found_inf = torch.zeros((), device=self.device)
        self._opt_fused = all(g.get("fused") for g in optimizer.param_groups)
        # how the clip is applied (see the module docstring): "optimizer" folds it into the
        # fused optimizer's grad_scale (torch's fused AdamW/Adam/SGD read opt.grad_scale),
        # "foreach" is clip_grad_norm_, "off" (grad_clip=inf) only measures the norm
        self._clip_mode = ("off" if grad_clip == float("inf") else
                           "optimizer" if self._opt_fused and self.scaler is None else "foreach")
        self._grad_scale = torch.ones((), device=self.device)

        # teacher variants
        if teacher_bf16 and precision != "bf16":
            raise ValueError("teacher_bf16 needs precision='bf16' (the shadow holds the "
                             "weights autocast would cast to bf16)")
        if teacher_bf16 and teacher_full:
            raise ValueError("teacher_bf16 shadows only blocks 1..block_out_t; it cannot be "
                             "combined with teacher_full")
        if teacher_bf16 and teacher_fp32:
            raise ValueError("teacher_bf16 (a bf16 teacher) and teacher_fp32 exclude each other")
        self.shadow = (BF16Shadow(ema, objective.cfg.block_out_t) if teacher_bf16 else None)
        self.teacher_full, self.teacher_fp32 = teacher_full, teacher_fp32
        tmod = self.shadow.module if self.shadow is not None else ema
        self.compile = compile
        self.compile_scope = compile_scope if compile else None
        compiler = ((lambda fn: compile_fn(fn, compile, compile_backend)) if compile
                    else None)
        self._teacher_nvtx = TeacherView(tmod, full=teacher_full, fp32=teacher_fp32,
                                         compiler=compiler,
                                         blocks=(compile_scope == "blocks"
                                                 and hasattr(tmod, "compile_blocks")))
        # uncompiled and without a variant, the module itself: one Python layer less per call
        self._teacher = (self._teacher_nvtx if teacher_full or teacher_fp32 or compile
                         else tmod)
        # what _micro calls as the student (self.student stays the module or DDP wrapper
        # given, for no_sync and the graph checks)
        block_compiler = compiler if compile_scope == "blocks" else None
        self._student_fn = (compiler(self.student) if compiler and not block_compiler
                            else self.student)
        if block_compiler and self.student is not model:
            # DDP: dynamo would hand every block's graph to its DDPOptimizer, which splits a
            # graph at DDP's buckets (1 MiB, then 25) so that the all-reduce overlaps it: 2-3
            # pieces per XL block for nothing, the blocks already are the pieces
            student = self.student

            def _student_fn(*args, **kwargs):
                with torch._dynamo.config.patch(optimize_ddp=False):
                    return student(*args, **kwargs)
            self._student_fn = _student_fn
        if compile:   # attention's one-time setup, outside the traced code
            attention.prepare(self.device, precision_dtype(precision),
                              getattr(model, "head_dim", None))
        if ema_impl not in ("foreach", "fused", "adamw"):
            raise ValueError(f"ema_impl must be 'foreach', 'fused' or 'adamw', got "
                             f"{ema_impl!r}")
        self.ema_impl = ema_impl
        self._fused_ema = None
        self._adamw_ema = None
        if ema_impl == "adamw" and (self.scaler is not None or not self._opt_fused):
            raise ValueError("ema_impl='adamw' runs torch's fused AdamW arithmetic: it needs "
                             "an AdamW with fused=True and bf16 or fp32 precision (no "
                             "GradScaler)")
        if ema_impl in ("fused", "adamw"):
            from .ext import FusedAdamWEMA, FusedEMA
            e_params = list(ema.parameters())
            shadow = None   # aligned with e_params: the bf16 copy of each, where there is one
            if self.shadow is not None:
                dst = {id(p): q for p, q in zip(self.shadow.src, self.shadow.dst)}
                shadow = [dst.get(id(p)) for p in e_params]
            if ema_impl == "adamw":
                self._adamw_ema = FusedAdamWEMA(optimizer, list(model.parameters()), e_params,
                                                shadow)
                self._lr32 = torch.zeros((), dtype=torch.float32, device=self.device)
            else:
                self._fused_ema = FusedEMA(e_params, list(model.parameters()), shadow)
            self._ema_w = torch.full((), 1.0 - ema_decay, device=self.device)

        # CUDA graph
        self.cuda_graph = cuda_graph
        self.graph_warmup = max(1, int(graph_warmup))
        self.graph_refusal = self._graph_refusal() if cuda_graph else None
        if cuda_graph and self.graph_refusal:
            msg = f"CUDA-graph step unavailable, running eagerly: {self.graph_refusal}"
            if cuda_graph in ("strict", "emulate"):
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=2)
            print(f"sra_fast step: {msg}", flush=True)
        # the model changed last, once nothing can refuse the step any more
        if hasattr(model, "compile_blocks"):   # also undoes an earlier step's
            model.compile_blocks(block_compiler)
            if block_compiler and not model._fusable(model.depth, False, compiled=True):
                warnings.warn("compile_scope 'blocks': the model's blocks (or modules in "
                              "them) carry hooks or are wrapped, so they run eagerly (dynamo "
                              "does not guard on hooks); compile_scope 'model' compiles them",
                              stacklevel=2)
        self._graph = None
        self._graph_key = None
        self.captures = 0

    # ------------------------------------------------------------------ common pieces
    @property
    def graph_mode(self) -> bool:
        """Whether calls run the captured graph (True after a successful request)."""
        return bool(self.cuda_graph) and self.graph_refusal is None

    def _micro(self, x0, y, weight):
        student, teacher = self._student_fn, self._teacher
        if nvtx_enabled():
            student, teacher = StudentView(student), self._teacher_nvtx
        with autocast_ctx(self.precision, self.device):
            loss, denoise, align = self.objective(student, teacher, x0, y, weight,
                                                  generator=self.generator)
        return loss, denoise, align

    @property
    def _loss_divisor(self) -> int:
        """What the loss is divided by before backward: grad_accum averages the micro-batches;
        with grad_sync also the world size, so the all-reduced sum is the mean."""
        w = self._grad_sync.world_size if self._grad_sync is not None else 1
        return self.grad_accum * w

    def _begin_grad_sync(self, loss_sum, first: bool, last: bool):
        """With grad_sync, before every micro-batch's backward: its gradients go into the
        flat buffer as they become ready; on the last, buckets of ready gradients start their
        all-reduce, and `loss_sum` (this process's losses) tells the others whether to skip
        the step."""
        if self._grad_sync is not None:
            self._grad_sync.begin(~torch.isfinite(loss_sum) if last else None,
                                  first=first, last=last)

    def _finish_grad_sync(self, last: bool):
        """With grad_sync, after every micro-batch's backward; after the last, the summed
        gradients are in place and it returns whether any process's loss was not finite
        (0-d bool). Otherwise None."""
        if self._grad_sync is None:
            return None
        with nvtx_range("all-reduce wait" if last else "gradient accumulate"):
            return self._grad_sync.finish()

    def _grad_norm_and_clip(self) -> torch.Tensor:
        """Total gradient norm (device scalar), with the clip applied or prepared: mode
        "foreach" scales the gradients now (clip_grad_norm_); mode "optimizer" only sets
        _grad_scale = max(1, (norm + 1e-6) / grad_clip), clip_grad_norm_'s coefficient
        inverted, which the fused AdamW divides every gradient by as it reads it."""
        if self._clip_mode == "foreach":
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self._clip_mode == "optimizer":
            self._grad_scale.copy_(torch.clamp((norm + 1e-6) / self.grad_clip, min=1.0))
        return norm

    def _fused_opt_step(self):
        """torch's fused AdamW step with its device-side inputs: found_inf (1 skips the
        update) and, when the clip is folded in, grad_scale. Both are optimizer attributes
        that its step() reads; they are removed afterwards so no other caller of opt.step()
        inherits them (a captured graph keeps the tensors it was given)."""
        self.opt.found_inf = self._found_inf
        if self._clip_mode == "optimizer":
            self.opt.grad_scale = self._grad_scale
        try:
            self.opt.step()
        finally:
            self.opt.found_inf = None
            self.opt.grad_scale = None

    @staticmethod
    def _set_scalar(dst: torch.Tensor, value):
        """dst (a 0-d device tensor) = value, a float or a tensor, without a host sync: a
        device tensor is copied on the device, a CPU one read on the host (a copy from
        pageable host memory would wait for the GPU)."""
        if torch.is_tensor(value) and value.device.type != "cpu":
            dst.copy_(value)
        else:
            dst.fill_(float(value))

    def _adamw_ema_step(self):
        """AdamW + EMA (+ shadow) in one pass (ema_impl="adamw"); found_inf skips it all."""
        with nvtx_range("optimizer+EMA"):
            # the group's lr is a device scalar while capturing
            self._set_scalar(self._lr32, self.opt.param_groups[0]["lr"])
            self._adamw_ema.step(self._lr32, self._found_inf,
                                 self._grad_scale if self._clip_mode == "optimizer" else None,
                                 self._ema_w)
        if self.shadow is not None:
            self.shadow.mark_synced()

    def _ema(self, finite=None):
        """EMA update (and bf16 shadow refresh); skipped (weight 0) where `finite` is False."""
        with nvtx_range("EMA"):
            if self._fused_ema is not None:
                self._fused_ema.step(self._ema_w if finite is None
                                     else (1.0 - self.ema_decay) * finite.float())
                if self.shadow is not None:
                    self.shadow.mark_synced()
                return
            if finite is None:
                ema_update(self.ema, self.model, self.ema_decay)
            else:   # weight 0 where the step was skipped
                ema_update(self.ema, self.model,
                           weight=(1.0 - self.ema_decay) * finite.float())
            if self.shadow is not None:
                self.shadow.sync()

    def __call__(self, x0, y, weight):
        """One optimizer step on a batch (split into grad_accum micro-batches)."""
        if self.shadow is not None:
            self.shadow.refresh_if_stale()
        if self.graph_mode:
            return self._graph_call(x0, y, weight)
        self.model.train()
        if self.compile == "reduce-overhead":
            # the previous step's graph outputs are consumed: its buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        xs, ys = x0.chunk(self.grad_accum), y.chunk(self.grad_accum)
        if len(xs) != self.grad_accum:
            raise ValueError(f"batch of {x0.shape[0]} cannot be split into "
                             f"{self.grad_accum} accumulation steps")
        tot = torch.zeros(3, device=self.device)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            sync = i == self.grad_accum - 1
            ctx = (self.student.no_sync() if (not sync and hasattr(self.student, "no_sync"))
                   else contextlib.nullcontext())
            with ctx:
                loss, denoise, align = self._micro(xb, yb, weight)
                tot += torch.stack([loss.detach().float(), denoise.mean(), align.mean()])
                self._begin_grad_sync(tot[0], first=i == 0, last=sync)
                scaled = loss / self._loss_divisor
                with nvtx_range("backward"):
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                any_nonfinite = self._finish_grad_sync(last=sync)
        tot /= self.grad_accum
        with nvtx_range("optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.opt)
            gnorm = self._grad_norm_and_clip()
            if any_nonfinite is not None:   # every process's loss, through the all-reduce
                finite = ~any_nonfinite & torch.isfinite(gnorm)
            else:
                finite = torch.isfinite(tot[0]) & torch.isfinite(gnorm)
            if getattr(self.student, "process_group", None) is not None:
                # DDP: the loss is this rank's own; every rank must skip the same steps, or
                # the replicas (and their EMAs) drift apart, never to be re-synced
                f = finite.float()
                torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MIN,
                                             group=self.student.process_group)
                finite = f > 0
            if self.scaler:
                self.scaler.step(self.opt)   # skips on inf/nan grads itself (fp16 path)
                self.scaler.update()
            elif self._adamw_ema is not None or self._opt_fused:
                self._found_inf.copy_((~finite).float())
                if self._adamw_ema is None:   # (the one-pass update runs after zero_grad)
                    self._fused_opt_step()
            elif bool(finite):
                # a non-fused optimizer has no device-side skip: this path syncs the host once
                # per step (graph mode refuses such optimizers)
                self.opt.step()
        if self._adamw_ema is not None:
            self._adamw_ema_step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.zero_grad(set_to_none=True)
            self._ema(None if self.scaler else finite)
        self._stats += torch.cat([torch.where(finite, tot, torch.zeros_like(tot)),
                                  torch.where(finite, gnorm.float(), gnorm.new_zeros(())).reshape(1),
                                  (~finite).float().reshape(1), torch.ones(1, device=self.device)])

    # the trainer's name for a step
    step = __call__

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """Device scalar: non-finite (skipped) steps since the last read_stats(). A view,
        updated in place by every step (eager or replayed), read without a host sync."""
        return self._stats[self.STATS.index("nonfinite")]

    def read_stats(self) -> dict:
        """Means since the last call over finite steps, and the non-finite count (host sync)."""
        s = self._stats.tolist()
        self._stats.zero_()
        n_ok = max(s[5] - s[4], 1.0)
        return {"loss": s[0] / n_ok, "denoise_loss": s[1] / n_ok, "align_loss": s[2] / n_ok,
                "grad_norm": s[3] / n_ok, "nonfinite": int(s[4]), "steps": int(s[5])}

    # ------------------------------------------------------------------ CUDA graph
    def _graph_refusal(self) -> str | None:
        """Why this step cannot be captured (every reason, '; '-joined), or None."""
        return graph_refusal(self.model, self.opt, student=self.student,
                             precision=self.precision, generator=self.generator,
                             grad_sync=self._grad_sync.group if self._grad_sync else None,
                             emulate=self.cuda_graph == "emulate")

    def _prepare_optimizer(self):
        """Fused AdamW -> capturable, with the learning rate in a device scalar per group
        (swapped in only while capturing; the trainer keeps seeing floats). Run before every
        capture: a resumed optimizer state_dict may have brought capturable=False back."""
        if not hasattr(self, "_lr_dev") or len(self._lr_dev) != len(self.opt.param_groups):
            self._lr_dev, self._lr_host = [], []
            # CUDA's fused AdamW reads a tensor lr as fp32 (a relative 3e-8 rounding of the
            # float it would otherwise get); the CPU kernel reads fp64
            dt = torch.float32 if self.device.type == "cuda" else torch.float64
            for _ in self.opt.param_groups:
                self._lr_dev.append(torch.zeros((), device=self.device, dtype=dt))
                self._lr_host.append(None)
        for i, g in enumerate(self.opt.param_groups):
            g["capturable"] = True
            self._set_scalar(self._lr_dev[i], g["lr"])
            self._lr_host[i] = g["lr"]
        for st in self.opt.state.values():  # state from an eager optimizer: steps on device
            if "step" in st and st["step"].device != self.device:
                st["step"] = st["step"].to(self.device)

    def _sync_lr(self):
        for i, g in enumerate(self.opt.param_groups):
            lr = g["lr"]
            # a tensor lr every step (schedulers update it in place), a float when it changed
            if torch.is_tensor(lr) or lr is not self._lr_host[i]:
                self._set_scalar(self._lr_dev[i], lr)
                self._lr_host[i] = lr

    def _graph_body(self):
        """The captured step: reads only static buffers, writes only persistent state."""
        A = self.grad_accum
        tot = torch.zeros(3, device=self.device)
        for i, (xb, yb) in enumerate(zip(self._x.chunk(A), self._y.chunk(A))):
            loss, denoise, align = self._micro(xb, yb, self._w)
            tot += torch.stack([loss.detach().float(), denoise.mean(), align.mean()])
            self._begin_grad_sync(tot[0], first=i == 0, last=i == A - 1)
            with nvtx_range("backward"):
                (loss / self._loss_divisor).backward()
            any_nonfinite = self._finish_grad_sync(last=i == A - 1)
        tot /= A
        with nvtx_range("optimizer"):
            gnorm = self._grad_norm_and_clip()
            if any_nonfinite is None:
                any_nonfinite = ~torch.isfinite(tot[0])
            finite = ~any_nonfinite & torch.isfinite(gnorm) & (self._skip == 0)
            self._found_inf.copy_((~finite).float())
            if self._adamw_ema is None:
                self._fused_opt_step()
        if self._adamw_ema is not None:
            self._adamw_ema_step()
        else:
            self._ema(finite)
        self._stats += torch.cat([torch.where(finite, tot, torch.zeros_like(tot)),
                                  torch.where(finite, gnorm.float(), gnorm.new_zeros(())).reshape(1),
                                  (~finite).float().reshape(1), torch.ones(1, device=self.device)])

    def _rng_get(self):
        if self.generator is not None:
            return self.generator.get_state()
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _rng_set(self, state):
        if self.generator is not None:
            self.generator.set_state(state)
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    # with compile: warm-ups beyond graph_warmup while one still compiles something new
    COMPILE_SETTLE_MAX = 4

    def _warm_up(self):
        """graph_warmup eager runs of the captured body; with compile, more while a run still
        compiled a graph (a recompile inside the capture would fail it: compiling syncs)."""
        from torch._dynamo.utils import counters
        for i in range(self.graph_warmup + (self.COMPILE_SETTLE_MAX if self.compile else 0)):
            graphs = counters["stats"]["unique_graphs"]
            self.opt.zero_grad(set_to_none=True)
            self._graph_body()
            settled = not self.compile or counters["stats"]["unique_graphs"] == graphs
            if i + 1 >= self.graph_warmup and settled:
                return

    def _capture(self, x0, y):
        n = x0.shape[0]
        if n % self.grad_accum:
            raise ValueError(f"batch of {n} cannot be split into {self.grad_accum} "
                             "accumulation steps")
        emulate = self.cuda_graph == "emulate"
        cuda = self.device.type == "cuda"
        self._graph = None
        if cuda:
            torch.cuda.synchronize(self.device)
        self._prepare_optimizer()
        self._x = torch.empty_like(x0, device=self.device)
        self._y = torch.empty_like(y, device=self.device)
        self._x.copy_(x0)
        self._y.copy_(y)
        if not hasattr(self, "_w"):
            self._w = torch.zeros((), device=self.device)
            self._skip = torch.zeros((), device=self.device)
        rng, stats = self._rng_get(), self._stats.clone()
        groups_lr = [g["lr"] for g in self.opt.param_groups]
        graph = "emulated"
        caller_stream = torch.cuda.current_stream(self.device) if cuda else None
        try:
            for g, lr in zip(self.opt.param_groups, self._lr_dev):
                g["lr"] = lr
            self._skip.fill_(1.0)   # warm-up and capture: every update is skipped
            side = torch.cuda.Stream(self.device) if cuda else None
            if cuda:
                side.wait_stream(torch.cuda.current_stream(self.device))
            with (torch.cuda.stream(side) if cuda else contextlib.nullcontext()):
                self._warm_up()
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(side)
            self.opt.zero_grad(set_to_none=True)   # backward allocates grads in the graph pool
            if not emulate:
                graph = torch.cuda.CUDAGraph()
                if self.generator is not None:
                    graph.register_generator_state(self.generator)
                # capture on the warm-up stream (its cuBLAS/cuDNN workspaces exist); other
                # threads (data loader pinning) may keep using CUDA meanwhile
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    self._graph_body()
                if self._adamw_ema is not None:   # the captured gradients' addresses
                    self._adamw_ema.commit()
                torch.cuda.synchronize(self.device)
        finally:
            # a capture that failed in capture_end leaves its stream current (torch.cuda.graph
            # restores the stream only after capture_end succeeds)
            if cuda and torch.cuda.current_stream(self.device) != caller_stream:
                torch.cuda.set_stream(caller_stream)
            for g, lr in zip(self.opt.param_groups, groups_lr):
                g["lr"] = lr
            self._skip.fill_(0.0)
            self._rng_set(rng)
            self._stats.copy_(stats)
        self._graph = graph
        self._graph_key = (tuple(x0.shape), x0.dtype, tuple(y.shape), y.dtype)
        self._graph_state = self._state_fingerprint()
        self.captures += 1
        if self.shadow is not None:
            self.shadow.mark_synced()

    def _state_fingerprint(self):
        """Host-side identity of what the graph baked in: parameters' storage and the
        optimizer's state tensors (first and last parameter), and the settings captured as
        launch arguments (betas, eps, weight decay..., grad_clip, ema_decay; lr is not one: it
        is a device scalar refreshed every step). A trainer that replaces the tensors
        (optimizer.load_state_dict, load_state_dict(assign=True)) or changes a setting forces
        a re-capture; eager steps see such changes at once, so must the graph."""
        ps = [self.params[0], self.params[-1]]
        e = list(self.ema.parameters())
        fp = [p.data_ptr() for p in ps] + [e[0].data_ptr(), e[-1].data_ptr()]
        for p in ps:
            fp += [id(v) for v in self.opt.state.get(p, {}).values()]
        settings = [self.grad_clip, self.ema_decay]
        for g in self.opt.param_groups:   # tensors by identity: reading them would sync
            settings += [(k, id(v) if torch.is_tensor(v) else repr(v))
                         for k, v in sorted(g.items()) if k not in ("params", "lr")]
        return tuple(fp), tuple(settings)

    def _graph_call(self, x0, y, weight):
        key = (tuple(x0.shape), x0.dtype, tuple(y.shape), y.dtype)
        self.model.train()
        now = self._state_fingerprint() if self._graph is not None else None
        stale = now is not None and now != self._graph_state
        if self._graph is None or key != self._graph_key or stale:
            if stale and now[0] != self._graph_state[0]:
                print("sra_fast step: parameters or optimizer state were replaced (a "
                      "checkpoint load?); re-capturing the CUDA graph", flush=True)
            elif stale:
                print("sra_fast step: optimizer settings, grad_clip or ema_decay changed; "
                      "re-capturing the CUDA graph", flush=True)
            elif self._graph is not None:
                print(f"sra_fast step: batch shape changed {self._graph_key} -> {key}; "
                      "re-capturing the CUDA graph", flush=True)
            try:
                self._capture(x0, y)
            except Exception as e:
                if self.cuda_graph in ("strict", "emulate"):
                    raise
                if self._grad_sync is not None and self._grad_sync.world_size > 1:
                    # NCCL needs every process to capture its collectives or none: an
                    # eager fallback here could pair with the others' captured all-reduce
                    first = (str(e).strip().splitlines() or [""])[0]
                    raise GraphCaptureError(
                        f"CUDA-graph capture failed on this process ({type(e).__name__}: "
                        f"{first}); with several processes all must run the captured step "
                        "or none, so the run stops here: run without --cuda-graph") from e
                self.graph_refusal = f"capture failed ({type(e).__name__}: {e})"
                self._graph = None
                self.opt.zero_grad(set_to_none=True)
                msg = f"CUDA-graph step unavailable, running eagerly: {self.graph_refusal}"
                warnings.warn(msg, stacklevel=3)
                print(f"sra_fast step: {msg}", flush=True)
                return self(x0, y, weight)
        else:
            self._x.copy_(x0, non_blocking=True)
            self._y.copy_(y, non_blocking=True)
        if torch.is_tensor(weight):
            self._w.copy_(weight)
        else:
            self._w.fill_(float(weight))
        self._sync_lr()
        if self._graph == "emulated":   # the captured body, run eagerly (tests, debugging)
            for g, lr in zip(self.opt.param_groups, self._lr_dev):
                g["lr"] = lr
            try:
                self.opt.zero_grad(set_to_none=True)
                self._graph_body()
            finally:
                for g, lr in zip(self.opt.param_groups, self._lr_host):
                    g["lr"] = lr
        else:
            self._graph.replay()
