"""Training configuration: one dataclass, its command line, its presets, and model building.

Every field is a kebab-case flag (`block_out_s` -> `--block-out-s`). Fields left at None are
filled by `resolve()` from a preset: "digits" (no --data-dir: the embedded small pixel-space
run on scikit-learn's handwritten digits) or "latents" (a --data-dir of SD-VAE latents: the
released SiT-XL/2 + SRA recipe). The resolved config is what runs, what is printed, and what
is saved (as plain data) in the run folder and in every checkpoint.

Model names: everything in sra_fast.models.ALL_MODELS (SiT-XL/2, DiT-B/4, ...) plus the tiny
sizes below (SiT-T/2, SiT-T/4, DiT-T/2, ...), used by the embedded run and the tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from .models import ALL_MODELS, DiT, SiT
from .objective import SRAConfig
from .ops import BACKENDS
from .ops.attention import ATTENTION_BACKENDS
from .step import COMPILE_MODES, COMPILE_SCOPES

# Tiny sizes for CPU runs and tests: depth, width, heads. Not a released size.
TINY_SIZES = {"T": (6, 128, 4)}
TINY_MODELS = {f"{arch}-{s}/{p}": (cls, *TINY_SIZES[s], p)
               for arch, cls in (("SiT", SiT), ("DiT", DiT)) for s in TINY_SIZES
               for p in (1, 2, 4, 8)}
MODEL_NAMES = sorted(ALL_MODELS) + sorted(TINY_MODELS)

# Layer pairs the authors used (student block, teacher block); others follow their rule of
# thumb: student at ~1/4 of the depth, teacher at ~3/4.
BLOCK_OUT_DEFAULTS = {"SiT-XL": (8, 20), "DiT-XL": (8, 16), "SiT-B": (4, 8), "DiT-B": (4, 8),
                      "SiT-T": (2, 4), "DiT-T": (2, 4)}


def model_family(name: str) -> str:
    return name.split("/")[0]


def model_kind(name: str) -> str:
    return "dit" if name.startswith("DiT") else "sit"


def build_model(name: str, **kwargs):
    """A SiT/DiT by name (released sizes or the tiny ones); kwargs go to the constructor."""
    if name in ALL_MODELS:
        return ALL_MODELS[name](**kwargs)
    if name in TINY_MODELS:
        cls, depth, hidden, heads, patch = TINY_MODELS[name]
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def model_depth(name: str) -> int:
    if name in TINY_MODELS:
        return TINY_MODELS[name][1]
    size = model_family(name).split("-")[1]
    return {"S": 12, "B": 12, "L": 24, "XL": 28}[size]


def default_block_outs(name: str) -> tuple[int, int]:
    fam = model_family(name)
    if fam in BLOCK_OUT_DEFAULTS:
        return BLOCK_OUT_DEFAULTS[fam]
    d = model_depth(name)
    return max(1, round(d / 4)), max(2, round(3 * d / 4))


def _f(default=None, help: str = "", aliases: tuple = (), choices=None, runtime: bool = False):
    """A config field with its command-line help. runtime=True: may differ on resume."""
    return dataclasses.field(default=default, metadata={
        "help": help, "aliases": aliases, "choices": choices, "runtime": runtime})


@dataclasses.dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and method
    model: str | None = _f(None, "model name, e.g. SiT-XL/2, SiT-B/2, DiT-XL/2 "
                           "(preset: SiT-T/2 for the digits run, SiT-XL/2 for latents)")
    block_out_s: int | None = _f(None, "student block whose output is aligned (1-based; "
                                 "default from the model: SiT-XL 8, DiT-XL 8, B 4, T 2)")
    block_out_t: int | None = _f(None, "teacher (EMA) block aligned to (SiT-XL 20, DiT-XL 16, "
                                 "B 8, T 4)")
    t_max: float = _f(0.2, "teacher time offset: t' = t - U(0, t_max)")
    loss_type: str | None = _f(None, "alignment loss: cos (token-wise cosine over the "
                               "features, recommended; NOT the released code's 'cos', which "
                               "is cos-released here), cos-released (the released dim=1 "
                               "cosine, over the tokens), smooth-l1, l1, l2 (default: cos for "
                               "SiT; smooth-l1 for DiT, the released DiT-SRA's only loss; "
                               "the released spelling sml1 is smooth-l1)",
                               choices=("cos", "cos-released", "smooth-l1", "sml1", "l1", "l2"))
    align_weight: float = _f(0.5, "alignment weight lambda of the constant schedule")
    weight_schedule: str = _f("auto", "alignment weight over epochs; auto: as the released "
                              "code ties it to the loss (constant --align-weight for cos and "
                              "cos-released; otherwise the smooth-L1 decay of the model kind "
                              "at 256 or 512 px, from --resolution or the data)",
                              choices=("auto", "constant", "smooth-l1-decay-sit-256",
                                       "smooth-l1-decay-sit-512", "smooth-l1-decay-dit-256",
                                       "smooth-l1-decay-dit-512"))
    path_type: str = _f("linear", "SiT interpolation path", choices=("linear", "cosine", "cos"))
    time_sampler: str = _f("uniform", "SiT training-time distribution",
                           choices=("uniform", "lognormal"))
    cfg_prob: float = _f(0.1, "label dropout probability (classifier-free guidance)")
    num_classes: int | None = _f(None, "number of classes (default: from the data: a packed "
                                 "folder's count stored when it was made; the released "
                                 "latent layout: 1000 as the released trainers, or the "
                                 "largest label + 1 when that is larger; digits: 10)")
    qk_norm: bool = _f(False, "LayerNorm on q and k (REPA option)")
    # ---------------------------------------------------------------- data
    data_dir: str | None = _f(None, "latent data: a folder in the released layout (with "
                              "vae-sd/) or a packed folder (meta.json). Omitted: the "
                              "embedded digits run", aliases=("--data-dir-train",),
                              runtime=True)
    resolution: int | None = _f(None, "image resolution the latents come from (checked "
                                "against the data: latent size = resolution / 8)")
    latent_scale: float = _f(0.18215, "SD-VAE latent scale")
    num_workers: int | None = _f(None, "data-loader workers per process (preset: 0 digits, "
                                 "4 latents)", runtime=True)
    # ---------------------------------------------------------------- optimisation
    batch_size: int | None = _f(None, "batch size per process (GPU); the global batch is "
                                "printed (preset: 64 digits, 32 latents)", runtime=True)
    global_batch_size: int | None = _f(None, "alternative to --batch-size: the global batch, "
                                       "which must divide across the processes",
                                       runtime=True)
    grad_accum: int = _f(1, "gradient-accumulation micro-steps per optimizer step (each "
                         "process's batch is split into this many)", runtime=True)
    lr: float | None = _f(None, "AdamW learning rate (preset: 1e-3 digits, 1e-4 latents)",
                          aliases=("--learning-rate",))
    lr_warmup_steps: int | None = _f(None, "linear learning-rate warm-up steps (preset: 100 "
                                     "digits, 0 latents)")
    weight_decay: float = _f(0.0, "AdamW weight decay", aliases=("--adam-weight-decay",))
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon", aliases=("--adam-epsilon",))
    grad_clip: float = _f(1.0, "gradient-norm clip (inf: off)", aliases=("--max-grad-norm",))
    ema_decay: float | None = _f(None, "EMA (teacher) decay (preset: 0.995 for the short digits "
                                 "run, 0.9999 latents)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (preset: 1200 "
                               "digits, 4,100,000 latents)", aliases=("--max-train-steps",),
                               runtime=True)
    epochs: int | None = _f(None, "stop after this many epochs (preset: none digits, 801 "
                            "latents); training stops at whichever limit comes first",
                            runtime=True)
    precision: str | None = _f(None, "autocast precision of the student (preset: fp32 digits, "
                               "bf16 latents; 'no' means fp32)",
                               aliases=("--mixed-precision",),
                               choices=("bf16", "fp16", "fp32", "no"))
    tf32: bool = _f(True, "allow TF32 matmuls on GPUs", runtime=True)
    cuda_graph: bool = _f(False, "capture the whole step in one CUDA graph (bf16/fp32; with "
                          "several processes the step all-reduces the gradients itself, in the "
                          "graph, instead of DDP; where impossible it says why and runs "
                          "eagerly)",
                          runtime=True)
    teacher_bf16: bool = _f(False, "keep bf16 copies of the EMA teacher's weights for its "
                            "forward (bf16 precision only)", runtime=True)
    teacher_fp32: bool = _f(False, "run the EMA teacher in fp32 outside the student's "
                            "autocast, as the released code's teacher ran (slower; exact "
                            "reproduction)")
    ema_impl: str = _f("foreach", "how the optimizer + EMA update runs: foreach (fused AdamW, "
                       "then a lerp of every EMA tensor), fused (EMA + teacher shadow in one "
                       "pass), adamw (AdamW + EMA + shadow in one pass; C++/CUDA extension)",
                       choices=("foreach", "fused", "adamw"), runtime=True)
    grad_bucket_mb: float = _f(25.0, "with --cuda-graph across processes: megabytes of "
                               "gradients per all-reduce started during the backward (0: one "
                               "all-reduce after it); eager DDP keeps its own buckets",
                               runtime=True)
    # ---------------------------------------------------------------- run
    out_dir: str = _f("runs", "folder that holds run folders", aliases=("--output-dir",),
                      runtime=True)
    exp_name: str | None = _f(None, "run folder name inside --out-dir (preset: 'digits', or "
                              "the model and data folder names)", runtime=True)
    seed: int = _f(0, "global seed (per-process streams derive from it and the rank)")
    log_every: int | None = _f(None, "read losses from the device and log every N steps "
                               "(preset: 25 digits, 100 latents)", runtime=True)
    ckpt_every: int | None = _f(None, "checkpoint every N steps (and at the end) (preset: 600 "
                                "digits, 50,000 latents)", aliases=("--checkpoint-steps",),
                                runtime=True)
    keep_ckpts: int = _f(0, "keep only the newest N checkpoints (0: keep all)", runtime=True)
    sample_every: int | None = _f(None, "write a sample grid every N steps (and at the end; 0: "
                                  "only at the end) (preset: 600 digits, 10,000 latents)",
                                  aliases=("--sample-steps",), runtime=True)
    resume: str | None = _f(None, "'auto' (newest complete checkpoint of this run, if any) or a "
                            "checkpoint path / folder (ours or a released one)",
                            aliases=("--resume-ckpt",), runtime=True)
    init_from: str | None = _f(None, "initialise the weights (model and EMA) from a checkpoint "
                               "(ours or released); optimizer and step start fresh",
                               runtime=True)
    init_missing_head: bool = _f(False, "with --init-from/--resume of a plain SiT/DiT/REPA "
                                 "checkpoint: start the SRA projector head from scratch",
                                 runtime=True)
    trust_checkpoint: bool = _f(False, "unpickle checkpoints without the allow-list (only for "
                                "files you trust)", runtime=True)
    save_on_signal: bool = _f(True, "on SIGTERM or SIGUSR1 (scheduler time limit or "
                              "preemption, torchrun shutdown) finish the step, write a "
                              "checkpoint and exit with 128 + the signal number", runtime=True)
    hang_report_min: float = _f(10.0, "when one step (with its logging, checkpoint and grid) "
                                "takes longer than this many minutes, print every thread's "
                                "Python stack to stderr (the run goes on; 0: never)",
                                runtime=True)
    hang_exit_min: float = _f(20.0, "when one step (with its logging, checkpoint and grid; "
                              "the first step: 3x) takes longer than this many minutes, tell "
                              "the other ranks, print every thread's stack and exit with "
                              "status 4, so a job script can requeue the run (a stalled file "
                              "system, a stuck device or peer; before NCCL's 30-min timeout "
                              "aborts the process without a word; 0: never)", runtime=True)
    peer_lost_min: float = _f(3.0, "stop the run when a rank shows no sign of life for this "
                              "many minutes (killed, crashed or its node lost, without a word; "
                              "the rendezvous store's host likewise) and no step finished "
                              "meanwhile, instead of waiting out --hang-exit-min or NCCL's "
                              "timeout. Signs of life come from a thread, so long steps and "
                              "checkpoints never count; a rank held stopped by a debugger "
                              "does (0: never)", runtime=True)
    max_nonfinite: int = _f(20, "stop after this many consecutive non-finite losses (each "
                            "one skips its update)", runtime=True)
    kernels: str = _f("auto", "fused-op backend", choices=BACKENDS,
                      runtime=True)
    compile: str = _f("off", "torch.compile the student and the teacher's forward "
                      "(inductor; the first steps compile): off, "
                      "default, max-autotune-no-cudagraphs (also tunes inductor's GEMMs), "
                      "reduce-overhead (inductor's CUDA graphs; not with --cuda-graph or "
                      "--grad-accum > 1). With --cuda-graph the compiled code is captured in "
                      "the step's one graph; the --kernels fused ops stay custom ops that "
                      "inductor fuses around", choices=("off",) + COMPILE_MODES,
                      runtime=True)
    compile_scope: str = _f("blocks", "with --compile, what of the student is compiled: "
                            "blocks (one compiled function runs every block: compile time "
                            "independent of depth, and the gradient all-reduce overlaps the "
                            "backward block by block, also with --cuda-graph across "
                            "processes) or model (the whole student, as torch.compile(model): "
                            "fusion across blocks, a longer compile, and with --cuda-graph "
                            "across processes no overlap of the all-reduce)",
                            choices=COMPILE_SCOPES, runtime=True)
    attn: str = _f("auto", "attention backend", choices=ATTENTION_BACKENDS,
                   runtime=True)
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or "
                     "cuda", choices=("auto", "cpu", "cuda"), runtime=True)
    threads: int | None = _f(None, "CPU threads per process (default: cores / local "
                             "processes)", runtime=True)
    peak_tflops: float | None = _f(None, "the accelerator's peak TFLOP/s for the MFU printout "
                                   "(default: known GPUs only)", runtime=True)
    # ---------------------------------------------------------------- sample grids
    sample_sampler: str = _f("heun", "sampler for training-time grids (a DiT's: always ddpm)",
                             choices=("euler", "heun", "sde", "ddpm"), runtime=True)
    sample_num_steps: int | None = _f(None, "steps of the grid sampler (preset: 30 digits, 50 "
                                      "latents)", runtime=True)
    sample_cfg_scale: float | None = _f(None, "CFG scale of the grids (preset: 3.0 digits, 4.0 "
                                        "latents as in the released code)", runtime=True)
    sample_weights: str | None = _f(None, "weights the grids are drawn with: ema or student "
                                    "(preset: ema)", choices=("ema", "student"), runtime=True)
    vae: str = _f("stabilityai/sd-vae-ft-ema", "VAE (local path or hub name) that decodes "
                  "latent grids; 'none' skips decoding", runtime=True)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            print(f"[sra-fast] warning: ignoring unknown config keys {unknown}", file=sys.stderr)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def preset(self) -> str:
        return "digits" if self.data_dir is None else "latents"

    def sra_config(self) -> SRAConfig:
        return SRAConfig(block_out_s=self.block_out_s, block_out_t=self.block_out_t,
                         t_max=self.t_max, loss_type=self.loss_type,
                         weight_schedule=self.weight_schedule, align_weight=self.align_weight,
                         path_type=self.path_type, time_sampler=self.time_sampler)

    def resolve(self) -> "TrainConfig":
        """Fill preset fields and check values; returns a new config."""
        c = dataclasses.replace(self)
        grid_cfg_given = c.sample_cfg_scale is not None
        preset = PRESETS[c.preset]
        for k, v in preset.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.precision == "no":
            c.precision = "fp32"
        if c.model not in ALL_MODELS and c.model not in TINY_MODELS:
            raise ValueError(f"unknown model {c.model!r}; choose one of {MODEL_NAMES}")
        s, t = default_block_outs(c.model)
        c.block_out_s = s if c.block_out_s is None else c.block_out_s
        c.block_out_t = t if c.block_out_t is None else c.block_out_t
        if c.exp_name is None:
            if c.preset == "digits":
                c.exp_name = "digits"
            else:
                from pathlib import Path
                c.exp_name = (c.model.replace("/", "-") + "-"
                              + (Path(c.data_dir).resolve().name or "data"))
        if c.path_type == "cos":
            c.path_type = "cosine"
        if c.sample_every < 0:
            raise ValueError("--sample-every must be >= 0")
        if not c.hang_report_min >= 0:
            raise ValueError(f"--hang-report-min must be >= 0 (0: never), got "
                             f"{c.hang_report_min}")
        if not c.hang_exit_min >= 0:
            raise ValueError(f"--hang-exit-min must be >= 0 (0: never), got {c.hang_exit_min}")
        if not c.peer_lost_min >= 0:
            raise ValueError(f"--peer-lost-min must be >= 0 (0: never), got {c.peer_lost_min}")
        if not c.grad_clip > 0:   # NaN too; a clip of 0 would zero every gradient
            raise ValueError(f"--grad-clip must be > 0 (inf turns clipping off), got {c.grad_clip}")
        if c.batch_size is not None and c.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {c.batch_size}")
        _check_numbers(c)
        if not c.grad_bucket_mb >= 0:
            raise ValueError(f"--grad-bucket-mb must be >= 0 (0: one all-reduce after the "
                             f"backward), got {c.grad_bucket_mb}")
        if not 0.0 <= c.cfg_prob < 1.0:
            raise ValueError(f"--cfg-prob must be in [0, 1), got {c.cfg_prob}")
        # combinations the step refuses, said before anything is built
        if c.teacher_bf16 and c.precision != "bf16":
            raise ValueError(f"--teacher-bf16 needs --precision bf16 (the shadow holds the "
                             f"weights autocast casts to bf16), got --precision {c.precision}")
        if c.teacher_bf16 and c.teacher_fp32:
            raise ValueError("--teacher-bf16 and --teacher-fp32 exclude each other")
        if c.ema_impl == "adamw" and c.precision == "fp16":
            raise ValueError("--ema-impl adamw runs torch's fused AdamW arithmetic, which a "
                             "GradScaler (--precision fp16) cannot drive; use bf16 or fp32")
        if c.loss_type == "sml1":   # the released DiT-SRA's name
            c.loss_type = "smooth-l1"
        if c.loss_type is None:   # the released default of the model's code base
            c.loss_type = "smooth-l1" if model_kind(c.model) == "dit" else "cos"
        if c.weight_schedule == "auto" and c.loss_type.startswith("cos"):
            c.weight_schedule = "constant"
        if c.weight_schedule != "constant" and c.align_weight != 0.5:
            raise ValueError(f"--align-weight {c.align_weight} has no effect: the weight of "
                             f"--loss-type {c.loss_type} follows the released smooth-L1 decay "
                             f"(--weight-schedule {c.weight_schedule}); pass --weight-schedule "
                             "constant to use a constant weight")
        # "auto" with a non-cosine loss needs the resolution (the trainer settles it once
        # the data is open); the rest is checked now
        sra = c.sra_config()
        if sra.weight_schedule == "auto":
            sra.weight_schedule = "constant"
        sra.validate(model_depth(c.model))
        if c.sample_sampler == "ddpm" and model_kind(c.model) != "dit":
            raise ValueError("--sample-sampler ddpm is for DiT models; SiT uses euler, heun or sde")
        if model_kind(c.model) == "dit" and c.sample_sampler != "ddpm":
            c.sample_sampler = "ddpm"
        # the grids' settings, checked now rather than at the first grid, thousands of steps in
        if c.cfg_prob == 0 and c.sample_cfg_scale != 1.0:
            if grid_cfg_given:
                raise ValueError(f"--sample-cfg-scale {c.sample_cfg_scale} needs the null class, "
                                 "which --cfg-prob 0 leaves out of the model: pass "
                                 "--sample-cfg-scale 1")
            c.sample_cfg_scale = 1.0   # no guidance without the null class
        from .sampling import SamplerConfig
        try:
            SamplerConfig(sampler=c.sample_sampler, steps=c.sample_num_steps,
                          cfg_scale=c.sample_cfg_scale, path_type=c.path_type).validate(
                              model_kind(c.model))
        except ValueError as e:   # the sampler's words, said of the grids' flags
            raise ValueError(f"the sample grids (--sample-*): {e}") from None
        return c

    def identity(self) -> dict:
        """The fields that define a run (not the runtime ones): two configs that differ here
        are two different runs. The data folder, batch split and step limits may change
        when a run is continued (moved data, another GPU count); a changed dataset size or
        global batch is reported on resume."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("runtime")}


def _check_numbers(c: TrainConfig):
    """Values that would otherwise train nonsense, or fail deep inside, thousands of steps in."""
    def bad(flag, want, got):
        raise ValueError(f"--{flag} must be {want}, got {got}")
    fin = math.isfinite
    if not (fin(c.lr) and c.lr > 0):
        bad("lr", "a finite number > 0", c.lr)
    for flag, v in (("adam-beta1", c.adam_beta1), ("adam-beta2", c.adam_beta2)):
        if not 0.0 <= v < 1.0:
            bad(flag, "in [0, 1)", v)
    if not (fin(c.adam_eps) and c.adam_eps > 0):
        bad("adam-eps", "a finite number > 0", c.adam_eps)
    if not (fin(c.weight_decay) and c.weight_decay >= 0):
        bad("weight-decay", "a finite number >= 0", c.weight_decay)
    if not 0.0 <= c.ema_decay <= 1.0:
        bad("ema-decay", "in [0, 1]", c.ema_decay)
    if not (fin(c.align_weight) and c.align_weight >= 0):
        bad("align-weight", "a finite number >= 0", c.align_weight)
    for flag, v, lo in (("grad-accum", c.grad_accum, 1), ("log-every", c.log_every, 1),
                        ("ckpt-every", c.ckpt_every, 1), ("max-nonfinite", c.max_nonfinite, 1),
                        ("global-batch-size", c.global_batch_size, 1),
                        ("max-steps", c.max_steps, 1), ("epochs", c.epochs, 1),
                        ("threads", c.threads, 1), ("num-workers", c.num_workers, 0),
                        ("lr-warmup-steps", c.lr_warmup_steps, 0),
                        ("keep-ckpts", c.keep_ckpts, 0),
                        ("sample-num-steps", c.sample_num_steps, 1)):
        if v is not None and v < lo:
            bad(flag, f">= {lo}", v)
    if c.peak_tflops is not None and not (fin(c.peak_tflops) and c.peak_tflops > 0):
        bad("peak-tflops", "a finite number > 0", c.peak_tflops)
    if c.exp_name in ("", ".", ".."):
        bad("exp-name", "a folder name", repr(c.exp_name))


# config keys of earlier versions -> their names now (config.json, checkpoints, --config)
RENAMED = {"sample_steps": "sample_num_steps"}

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded run: 1200 steps of a 1.9M-parameter SiT (patch 2 on the 8x8 digits: 16
    # tokens), about 2 minutes on 2 CPU cores. The EMA decay is short (0.995) because the
    # run is short: with 0.9999 (or even 0.999) the EMA -- the SRA teacher and the weights
    # the grids are drawn with -- would still be mostly its random initialisation.
    "digits": dict(model="SiT-T/2", batch_size=64, lr=1e-3, lr_warmup_steps=100,
                   ema_decay=0.995, max_steps=1200, precision="fp32", num_workers=0,
                   log_every=25, ckpt_every=600, sample_every=600, sample_num_steps=30,
                   sample_cfg_scale=3.0, sample_weights="ema"),
    # The released SiT-XL/2 + SRA recipe (per-GPU batch 32, 8 GPUs -> 256).
    "latents": dict(model="SiT-XL/2", batch_size=32, lr=1e-4, lr_warmup_steps=0,
                    ema_decay=0.9999, max_steps=4_100_000, epochs=801, precision="bf16",
                    num_workers=4, log_every=100, ckpt_every=50_000, sample_every=10_000,
                    sample_num_steps=50, sample_cfg_scale=4.0, sample_weights="ema"),
}


# ---------------------------------------------------------------------- command line
def _arg_type(field: dataclasses.Field):
    ann = str(field.type)
    if "bool" in ann:
        return bool
    if "int" in ann:
        return int
    if "float" in ann:
        return float
    return str


def add_config_args(parser: argparse.ArgumentParser, cls=TrainConfig) -> argparse.ArgumentParser:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *f.metadata.get("aliases", ())]
        typ = _arg_type(f)
        help_ = f.metadata.get("help", "")
        if typ is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_)
        else:
            parser.add_argument(*names, dest=f.name, type=typ, default=f.default,
                                choices=f.metadata.get("choices"), help=help_,
                                metavar=None if f.metadata.get("choices") else f.name.upper())
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where none would say anything: None (a preset
    or a rule decides, as the flag's help says) and on/off switches (their help says what
    turning them on does)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction,
                                                         argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The same, with the description (a module docstring) kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train SiT/DiT with Self-Representation Alignment (SRA). Without "
                    "--data-dir: a small class-conditional SiT on scikit-learn's digits "
                    "(a few minutes on a CPU). Launch multi-GPU runs with torchrun.",
        epilog="Exit status: 0 trained to the end; 1 an unanticipated error (traceback), or "
               "stopped because another rank failed or fell silent (--peer-lost-min); 2 bad "
               "input, a checkpoint that cannot be written or out of device memory (one line "
               "on stderr); 3 stopped after "
               "--max-nonfinite non-finite losses; 4 no step finished in --hang-exit-min "
               "minutes (142, SIGALRM, if even its stack dump blocked); 128+N stopped by "
               "signal N (143 SIGTERM, 138 SIGUSR1), after writing a checkpoint once training "
               "has begun (not during setup, a run of non-finite losses, or with "
               "--no-save-on-signal); 130 Ctrl-C, without one.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of config values (flags given "
                   "on the command line override it)")
    # a released spelling whose meaning differs here: refused rather than silently changed
    p.add_argument("--gradient-accumulation-steps", dest="released_grad_accum", type=int,
                   metavar="K", default=None, help="refused: the released code's K "
                   "micro-batches of --batch-size each; here --grad-accum K splits --batch-size into K (pass "
                   "--batch-size B*K --grad-accum K for the released meaning)")
    return add_config_args(p)


def parse_config(argv=None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    k = values.pop("released_grad_accum")
    if k is not None:
        parser.error(f"--gradient-accumulation-steps {k}: in the released code each of the {k} "
                     f"micro-steps loads a whole --batch-size batch; here --grad-accum splits "
                     f"--batch-size into micro-batches. For the released meaning pass "
                     f"--batch-size <B*{k}> --grad-accum {k}")
    cfg_file = values.pop("config")
    if cfg_file:
        try:
            with open(cfg_file) as fh:
                base = json.load(fh)
        except (OSError, ValueError) as e:
            parser.error(f"--config {cfg_file}: {getattr(e, 'strerror', None) or e}")
        if not isinstance(base, dict):
            parser.error(f"--config {cfg_file}: a JSON object of config values is needed, got "
                         f"a {type(base).__name__}")
        base = {RENAMED.get(k, k): v for k, v in base.items()}
        wrong = _wrong_types(base)
        if wrong:
            parser.error(f"--config {cfg_file}: {wrong}")
        # the flags given on the command line win, also where they equal their default
        given = _given_dests(parser, argv)
        base.update({k: v for k, v in values.items() if k in given})
        return TrainConfig.from_dict(base)
    return TrainConfig(**values)


def _given_dests(parser: argparse.ArgumentParser, argv) -> set:
    """The config fields set on the command line (parsed again with no defaults)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.dest == "help":
            continue
        kw = dict(dest=a.dest, default=argparse.SUPPRESS)
        if isinstance(a, argparse.BooleanOptionalAction):
            quiet.add_argument(*a.option_strings, action=argparse.BooleanOptionalAction, **kw)
        else:
            quiet.add_argument(*a.option_strings, type=a.type, **kw)
    return set(vars(quiet.parse_args(argv)))


def _wrong_types(values: dict) -> str | None:
    """'KEY: want TYPE, got VALUE' for the first value of the wrong type, else None."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for k, v in values.items():
        if k not in fields or v is None:
            continue
        typ = _arg_type(fields[k])
        ok = (isinstance(v, bool) if typ is bool else
              isinstance(v, int) and not isinstance(v, bool) if typ is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else
              isinstance(v, str))
        if not ok:
            return f"{k} must be {typ.__name__}, got {v!r}"
    return None
