"""The training loop: data -> SRA step -> logs, checkpoints, sample grids; resumable, DDP.

`python train.py [flags]` and `torchrun ... train.py [flags]` call `main`. The loop itself
never waits on the device: the step accumulates its losses in device buffers
(TrainStep.read_stats), and the host reads them every --log-every steps (plus at
checkpoints and sample grids). The alignment weight of the smooth-L1 decay schedules is a
Python float computed once per epoch.

Randomness: every process draws t, t', eps, label dropout and the latent posterior sample
from its own device generator seeded from (seed, rank); batches come from a permutation of
(seed, epoch) (see data.ShardedBatchSampler). Checkpoints keep every rank's generator and
the position in the epoch, so a resumed run continues bit-for-bit on a CPU and closely on
GPUs (whose kernels need not be deterministic; docs/training.md).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from . import ops
from .checkpoint import CheckpointError, load_model_state, state_dict_from
from .config import TrainConfig, build_model, model_kind, parse_config
from .data import (DataError, ShardedBatchSampler, error_line, make_loader, open_dataset,
                   out_of_memory_line, sample_posterior)
from .distributed import (DistEnv, all_gather_objects, all_reduce_, barrier,
                          broadcast_object, cleanup, derive_seed, init_distributed, stderr_line)
from .grad_sync import broadcast_module_
from .metrics_log import MetricsLogger, flops_per_image, peak_tflops
from .objective import SRAObjective, align_weight, make_ema, released_weight_schedule
from .ops.attention import set_attention_backend
from .peer_watch import PeerFailureWatch, StartupFailureWatch
from .run_lock import RunFolderBusy, lock_run_folder
from .sampling import (SamplerConfig, decode_latents, grid_labels, image_grid, load_vae,
                       sample, to_uint8)
from .step import GraphCaptureError, TrainStep, graph_refusal, make_optimizer
from .stop_signals import StopSignals, ignore_stop_signals, signal_name
from .train_state import (adapt_released_optimizer, capture_rng, checkpoint_step,
                          find_resume_checkpoint,
                          generator_state_fits, is_released, list_checkpoints,
                          read_checkpoint, restore_rng,
                          save_training_checkpoint, ckpt_dir, atomic_write_text)


class RunError(RuntimeError):
    """A problem with the run's inputs, stated in one line (no traceback)."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many consecutive non-finite losses)."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def setup_backends(cfg: TrainConfig, env: DistEnv):
    if env.device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, _cpu_count() // max(env.local_world_size, 1)))
    else:   # both ways: cuDNN's TF32 is on by default, --no-tf32 turns it off too
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    ops.set_backend(cfg.kernels)
    set_attention_backend(cfg.attn)


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None, dataset=None,
                 objective_factory=None, quiet: bool = False,
                 peer_watch: PeerFailureWatch | None = None):
        try:
            self.cfg = cfg = cfg.resolve()
        except ValueError as e:
            raise RunError(str(e)) from None
        self.env = env = env or init_distributed(cfg.device)
        self.quiet = quiet
        self.peer_watch = peer_watch   # told when this rank stops on a hang (_hang_exit)
        self.main = env.is_main
        try:
            setup_backends(cfg, env)
        except (RuntimeError, ValueError) as e:   # e.g. --attn flash_attn, not installed
            raise RunError(str(e)) from None
        self.device = env.device
        self.run_dir = Path(cfg.out_dir) / cfg.exp_name

        # ------------------------------------------------------------ data
        self.ds = ds = dataset if dataset is not None else open_dataset(cfg.data_dir,
                                                                        cfg.num_classes)
        self.num_classes = ds.num_classes
        C, H, W = ds.sample_shape
        if H != W:
            raise RunError(f"the data is {H}x{W}; SiT/DiT need square inputs")
        if cfg.resolution and ds.kind == "moments" and cfg.resolution // 8 != H:
            raise RunError(f"--resolution {cfg.resolution} implies {cfg.resolution // 8}x"
                           f"{cfg.resolution // 8} latents, but the data holds {H}x{W}")
        if cfg.global_batch_size is not None:
            if cfg.global_batch_size % env.world_size:
                raise RunError(f"--global-batch-size {cfg.global_batch_size} does not divide "
                               f"across {env.world_size} processes")
            cfg.batch_size = cfg.global_batch_size // env.world_size
        if cfg.batch_size % cfg.grad_accum:
            raise RunError(f"--batch-size {cfg.batch_size} (per process) does not split into "
                           f"--grad-accum {cfg.grad_accum} equal micro-batches")
        self.global_batch = cfg.batch_size * env.world_size
        self.sampler = ShardedBatchSampler(len(ds), cfg.batch_size, env.world_size, env.rank,
                                           cfg.seed)
        self.loader = make_loader(ds, self.sampler, cfg.num_workers,
                                  pin_memory=self.device.type == "cuda",
                                  worker_init_fn=ignore_stop_signals if cfg.save_on_signal
                                  else None)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.max_steps = cfg.max_steps
        if cfg.epochs is not None:
            self.max_steps = min(self.max_steps, cfg.epochs * self.steps_per_epoch)

        # ------------------------------------------------------------ model, teacher, step
        torch.manual_seed(cfg.seed)
        self.kind = model_kind(cfg.model)
        if cfg.weight_schedule == "auto":   # the released decay of a non-cosine loss
            res = cfg.resolution or (8 * H if ds.kind == "moments" else 256)
            cfg.weight_schedule = released_weight_schedule(cfg.loss_type, self.kind, res)
        self.model_config = dict(name=cfg.model, input_size=H, in_channels=C,
                                 num_classes=self.num_classes, class_dropout_prob=cfg.cfg_prob,
                                 qk_norm=cfg.qk_norm, kind=self.kind, data_kind=ds.kind,
                                 latent_scale=cfg.latent_scale if ds.kind == "moments" else None)
        self.model = build_model(cfg.model, input_size=H, in_channels=C,
                                 num_classes=self.num_classes,
                                 class_dropout_prob=cfg.cfg_prob, qk_norm=cfg.qk_norm)
        self.model.to(self.device)
        self.ema = make_ema(self.model)
        sra = cfg.sra_config()
        self.objective = (objective_factory(self.model, sra) if objective_factory
                          else SRAObjective.for_model(self.model, sra))
        self.opt = make_optimizer(self.model, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self._opt_flags = {k: v for k, v in self.opt.param_groups[0].items() if k != "params"}
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(derive_seed(cfg.seed, env.rank))

        # ------------------------------------------------------------ run folder, resume
        self.step = 0
        self._saved_step = None   # the step of the newest checkpoint this process wrote
        self.epoch = 0
        self.pos = 0
        self.nonfinite_total = 0
        self.resumed_from = None
        self._run_dir_locked = False   # rank 0, once _claim_run_dir holds the lock
        self._claim_run_dir()
        failed = None
        try:
            self._check_run_dir()
            self._resume_or_init()
        except (RunError, CheckpointError) as e:
            failed = e
        self._agree_on_start(failed)

        self.student, grad_sync = self._gradient_sync()
        try:
            self.train_step = TrainStep(self.model, self.ema, self.objective, self.opt,
                                        student=self.student, precision=cfg.precision,
                                        grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                                        grad_accum=cfg.grad_accum, generator=self.generator,
                                        cuda_graph=cfg.cuda_graph,
                                        teacher_bf16=cfg.teacher_bf16,
                                        teacher_fp32=cfg.teacher_fp32, ema_impl=cfg.ema_impl,
                                        grad_sync=grad_sync,
                                        grad_bucket_mb=cfg.grad_bucket_mb,
                                        compile=None if cfg.compile == "off" else cfg.compile,
                                        compile_scope=cfg.compile_scope)
        except ValueError as e:   # a combination of settings the step cannot run
            raise RunError(str(e)) from e
        if self._scaler_state is not None and self.train_step.scaler is not None:
            self.train_step.scaler.load_state_dict(self._scaler_state)
        # consecutive non-finite steps, tracked on the device (no per-step sync)
        self._consec = torch.zeros((), device=self.device)
        self._max_consec = torch.zeros((), device=self.device)
        self.logger = MetricsLogger(self.run_dir, enabled=self.main, start_step=self.step)
        self._flops = flops_per_image(self.model, cfg)
        self._peak = peak_tflops(self.device, cfg.precision, cfg.peak_tflops, tf32=cfg.tf32)
        self._vae = None
        self._vae_failed = False
        if self.main:   # (the run folder exists: _check_run_dir made it)
            atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
        self._announce()
        if self.main:   # model + EMA + AdamW's two moments, fp32
            n = sum(p.numel() for p in self.model.parameters())
            n_trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self._check_free_space(4 * (2 * n + 2 * n_trained), "a checkpoint")

    def _gradient_sync(self):
        """(student, grad_sync) for TrainStep. One process: the model, nothing to sync.
        Several: DDP (its all-reduce overlaps the backward), unless --cuda-graph can capture
        the step, whose own all-reduce (sra_fast.grad_sync) then replaces DDP's, which a
        replayed graph cannot run. Chosen from settings that are the same on every process,
        so all make the same choice."""
        if not self.env.distributed:
            return self.model, None
        world = torch.distributed.group.WORLD
        if self.cfg.cuda_graph and graph_refusal(
                self.model, self.opt, precision=self.cfg.precision, generator=self.generator,
                grad_sync=world) is None:
            broadcast_module_(self.model)   # what DDP would do when wrapping it
            mb = self.cfg.grad_bucket_mb
            how = (f"in {mb:g} MB buckets started during the backward" if mb
                   else "in one all-reduce after the backward")
            self.print(f"[sra-fast] CUDA-graph step across processes: the step all-reduces "
                       f"the gradients itself, inside the graph, {how}")
            return self.model, world
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(self.model, device_ids=[self.device.index]
                   if self.device.type == "cuda" else None, gradient_as_bucket_view=True), None

    # ---------------------------------------------------------------- printing
    def print(self, *a, **k):
        if self.main and not self.quiet:
            print(*a, **k, flush=True)

    def warn(self, msg: str):
        if self.main:
            stderr_line(f"[sra-fast] {msg}")

    def _check_free_space(self, need: int, what: str):
        """Warn while there is time to act: a checkpoint that does not fit stops the run and
        loses the steps since the previous one."""
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            return
        if free < need:
            self.warn(f"warning: {self.run_dir} has {free / 2**30:.2f} GiB free, {what} "
                      f"takes ~{need / 2**30:.2f} GiB: make room"
                      + (" (--keep-ckpts N keeps only the newest N)"
                         if not self.cfg.keep_ckpts else ""))

    def _announce(self):
        cfg, env = self.cfg, self.env
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        accum = (f", {cfg.grad_accum} micro-batches of {cfg.batch_size // cfg.grad_accum}"
                 if cfg.grad_accum > 1 else "")
        self.print(f"[sra-fast] run {self.run_dir} | {self.ds.describe()}")
        self.print(f"[sra-fast] {cfg.model} ({n_params / 1e6:.2f}M params), SRA block "
                   f"{cfg.block_out_s} -> EMA block {cfg.block_out_t}, t_max {cfg.t_max}, "
                   f"loss {cfg.loss_type} x {cfg.align_weight} ({cfg.weight_schedule}), "
                   f"{cfg.precision}, {self.device}, kernels {ops.get_backend()}"
                   + ("" if cfg.compile == "off" else
                      f", torch.compile {cfg.compile} of the {cfg.compile_scope} scope (the "
                      "first steps compile)"))
        self.print(f"[sra-fast] global batch {self.global_batch} = {cfg.batch_size} per "
                   f"process x {env.world_size} process(es){accum}; {self.steps_per_epoch} "
                   f"steps/epoch; training to step {self.max_steps} (lr {cfg.lr}, EMA "
                   f"{cfg.ema_decay})")
        if cfg.preset == "digits" and cfg.ema_decay < 0.9999:
            self.print(f"[sra-fast] short run: EMA decay {cfg.ema_decay}, not the released "
                       "0.9999, which would leave the EMA (the SRA teacher, and the weights the "
                       f"grids use: {cfg.sample_weights}) near its random initialisation")

    # ---------------------------------------------------------------- run folder
    def _claim_run_dir(self):
        """Rank 0 makes the run folder (now, not at the first checkpoint or grid) and locks
        it for this job (sra_fast.run_lock) before any rank reads what is in it: waiting for a
        predecessor to end could otherwise leave the ranks with different views of it. Every
        rank stops when rank 0 cannot."""
        failed = None
        if self.main:
            try:
                self._make_and_lock_run_dir()
            except RunError as e:
                failed = str(e)
        failed = broadcast_object(failed, self.env)
        if failed is not None:
            raise RunError(failed if self.main else f"rank 0 could not start: {failed}")

    def _make_and_lock_run_dir(self):
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the run folder {self.run_dir}: "
                           f"{e.strerror or e}") from None
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise RunError(f"the run folder {self.run_dir} is not writable")
        try:
            note = lock_run_folder(self.run_dir, say=self.warn)
        except RunFolderBusy as e:
            raise RunError(str(e)) from None
        except OSError as e:   # the lock file cannot be made
            raise RunError(f"cannot lock the run folder {self.run_dir}: "
                           f"{e.strerror or e}") from None
        if note:
            self.warn(note)
        self._run_dir_locked = note is None

    def _check_run_dir(self):
        cfg = self.cfg
        cfg_file = self.run_dir / "config.json"
        if cfg_file.is_file():
            try:
                saved = json.loads(cfg_file.read_text())
                if not isinstance(saved, dict):
                    raise TypeError(f"a JSON object is needed, got a {type(saved).__name__}")
                old = TrainConfig.from_dict(saved)
            except (json.JSONDecodeError, TypeError, OSError) as e:
                raise RunError(f"{cfg_file}: unreadable run config ({e})") from None
            diff = _diff_keys(old.identity(), cfg.identity())
            if diff:
                shown = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}"
                                  for k in diff[:4])
                raise RunError(f"{self.run_dir} holds another run (config differs in {shown}"
                               f"{'...' if len(diff) > 4 else ''}); choose another --exp-name "
                               "or --out-dir")
        complete, partial = list_checkpoints(ckpt_dir(self.run_dir))
        if self.main and partial:
            self._remove_stale_partials(partial)
        if complete and cfg.resume is None:
            raise RunError(f"{self.run_dir} already has checkpoints (newest "
                           f"{complete[0].name}); pass --resume auto to continue it, or "
                           "another --exp-name for a new run")

    STALE_PARTIAL_S = 600.0

    def _remove_stale_partials(self, partial):
        """Remove what killed checkpoint writes left (`NNNNNNN.pt.tmp-PID`, a full-size file:
        ~11 GB at SiT-XL/2): a preemption that hits a write leaves one more each time, until the
        disk is full. With the run folder locked, every one: no other job can be writing here.
        Without (a file system without flock), only files unchanged for STALE_PARTIAL_S: a write
        going on keeps changing its file (another job writing here is warned about instead)."""
        removed, size, now = 0, 0, time.time()
        for p in partial:
            try:
                st = p.stat()
                if not self._run_dir_locked and now - st.st_mtime < self.STALE_PARTIAL_S:
                    self.warn(f"warning: {p} is being written ({now - st.st_mtime:.0f} s ago); "
                              f"is another job training in {self.run_dir}?")
                    continue
                p.unlink()
            except OSError:   # gone meanwhile, or not ours to remove: leave it
                continue
            removed, size = removed + 1, size + st.st_size
        if removed:
            self.print(f"[sra-fast] removed {removed} partial checkpoint file(s) left by "
                       f"interrupted writes ({size / 2 ** 30:.2f} GiB)")

    def _agree_on_start(self, failed):
        """Every process starts from the same state or none starts: each lists and reads the
        checkpoints on its own (a read error on one, or nodes that do not share --out-dir,
        would otherwise give ranks different steps, EMA and optimizer state, whose
        collectives then pair up wrongly: a hang or a silent divergence)."""
        if not self.env.distributed:
            if failed is not None:
                raise failed
            return
        # what each rank's data looks like: ranks that opened different copies (latents
        # staged to node-local disks, one incomplete) would shard different permutations,
        # count epochs differently and skip or repeat samples, silently
        data = (len(self.ds), self.num_classes, tuple(self.ds.sample_shape), self.ds.kind)
        mine = (error_line(failed) if failed is not None else None,
                str(self.resumed_from) if self.resumed_from is not None else None, data)
        views = all_gather_objects(mine, self.env)
        if failed is not None:
            raise failed
        bad = [(r, msg) for r, (msg, _, _) in enumerate(views) if msg is not None]
        if bad:
            r, msg = bad[0]
            raise RunError(f"rank {r} could not start: {msg}")
        if len({d for _, _, d in views}) > 1:
            r = next(r for r, (_, _, d) in enumerate(views) if d != views[0][2])

            def said(d):
                return f"{d[0]:,} items, {d[1]} classes, shape {d[2]}"
            raise RunError(f"the processes opened different data (rank 0: {said(views[0][2])}; "
                           f"rank {r}: {said(views[r][2])}); every node must see the same "
                           "--data-dir")
        if len({p for _, p, _ in views}) > 1:
            shown = ", ".join(f"rank {r}: {p or 'no checkpoint'}"
                              for r, (_, p, _) in enumerate(views))
            raise RunError(f"the processes would resume from different checkpoints ({shown}); "
                           "every node must see the same --out-dir (a shared file system)")

    def _resume_or_init(self):
        cfg = self.cfg
        self._scaler_state = None
        cands, note = find_resume_checkpoint(cfg.resume, self.run_dir)
        if note:
            self.warn(note) if note.startswith("warning") else self.print(f"[sra-fast] {note}")
        ck, path = None, None
        for i, p in enumerate(cands):
            try:
                ck, path = read_checkpoint(p, cfg.trust_checkpoint), p
                break
            except CheckpointError as e:
                if cfg.resume == "auto" and i + 1 < len(cands):
                    self.warn(f"warning: skipping unreadable checkpoint {p} ({e})")
                    continue
                raise
        if ck is not None:
            self._restore(ck, path)
            self.resumed_from = Path(path).resolve()
            if cfg.resume != "auto":
                self._refuse_branching()
        elif cfg.init_from:
            self._init_from(cfg.init_from)

    def _refuse_branching(self):
        """An explicit --resume from an older step than this run folder's newest checkpoint
        would write a second history beside the first: its checkpoints interleave by step,
        --keep-ckpts prunes by step, and a later --resume auto picks the abandoned newest."""
        complete, _ = list_checkpoints(ckpt_dir(self.run_dir))
        newer = [c for c in complete if checkpoint_step(c) > self.step]
        if newer:
            raise RunError(f"{self.run_dir} already has checkpoints after step {self.step} "
                           f"(newest {newer[0].name}); continuing from {self.resumed_from} "
                           "would mix two histories in one folder: move the newer ones away, "
                           "or resume into another --exp-name")

    def _load_weights(self, ck: dict, path):
        head = self.cfg.init_missing_head
        try:
            has_model = isinstance(ck.get("model"), dict)
            has_ema = isinstance(ck.get("ema"), dict)
            if not (has_model or has_ema):
                sd = state_dict_from(ck, "model")   # a bare state dict
                load_model_state(self.model, sd, head)
                load_model_state(self.ema, sd, head)
                return
            load_model_state(self.model, state_dict_from(ck, "model" if has_model else "ema"),
                             head)
            if has_ema:
                load_model_state(self.ema, state_dict_from(ck, "ema"), head)
            else:
                self.ema.load_state_dict(self.model.state_dict())
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def _init_from(self, path):
        ck = read_checkpoint(path, self.cfg.trust_checkpoint)
        self._load_weights(ck, path)
        self.print(f"[sra-fast] initialised model and EMA weights from {path}; optimizer and "
                   "step start fresh")

    def _load_opt(self, sd: dict):
        self.opt.load_state_dict(sd)
        for g in self.opt.param_groups:   # keep our implementation flags (fused, foreach)
            for k in ("fused", "foreach", "capturable", "differentiable", "lr", "betas",
                      "weight_decay", "eps"):
                if k in self._opt_flags:
                    g[k] = self._opt_flags[k]
        for st in self.opt.state.values():   # fused AdamW wants its step on the device
            for k, v in st.items():
                if torch.is_tensor(v) and v.device != self.device:
                    st[k] = v.to(self.device)

    def _own_optimizer_state(self, ck: dict, path) -> dict:
        """Our checkpoint's optimizer state for self.opt: files are in the released layout
        (every parameter indexed, the frozen ones without state); files written before that
        change index the trainable parameters only and load as they are."""
        opt = ck["opt"]
        groups = opt.get("param_groups") or [{}]
        n_train = sum(1 for p in self.model.parameters() if p.requires_grad)
        if len(groups) == 1 and len(groups[0].get("params", ())) == n_train:
            return opt
        adapted = (adapt_released_optimizer(opt, ck["model"], self.model)
                   if isinstance(ck.get("model"), dict) else None)
        if adapted is None:
            raise CheckpointError(f"{path}: its optimizer state does not match this model's "
                                  "parameters")
        return adapted

    def _restore(self, ck: dict, path):
        cfg, env = self.cfg, self.env
        theirs = (ck.get("model_config") or {}).get("name") if not is_released(ck) else None
        if theirs and theirs != cfg.model:   # say so before a key/shape mismatch list does
            raise RunError(f"{path} is a {theirs} checkpoint, but this run builds {cfg.model}: "
                           f"pass --model {theirs} to continue it")
        self._load_weights(ck, path)
        if is_released(ck):
            self.step = int(ck.get("steps", 0))
            self.epoch = max(int(ck.get("epoch", 0)), 0)
            self.pos = 0
            opt = ck.get("opt")
            adapted = (adapt_released_optimizer(opt, ck["model"], self.model)
                       if isinstance(opt, dict) and isinstance(ck.get("model"), dict) else None)
            if adapted is not None:
                self._load_opt(adapted)
                opt_note = "optimizer state included"
            else:
                opt_note = "no matching optimizer state: a fresh optimizer"
            self.generator.manual_seed(derive_seed(cfg.seed, env.rank, self.step))
            self.print(f"[sra-fast] resumed from released checkpoint {path}: step {self.step}, "
                       f"epoch {self.epoch} ({opt_note}); its data position is unknown, so "
                       "the epoch restarts from its first batch")
            return
        # ours
        old_cfg = ck.get("config") or {}
        diff = _diff_keys({k: old_cfg.get(k) for k in cfg.identity()}, cfg.identity())
        if diff:
            self.warn(f"warning: resuming {path} with a config that differs in {diff[:6]}")
        self._load_opt(self._own_optimizer_state(ck, path))
        self.step = int(ck["steps"])
        dp = ck.get("data_position") or {}
        self.epoch = int(dp.get("epoch", ck.get("epoch", 0)))
        pos = int(dp.get("batch", 0))
        if dp.get("global_batch", self.global_batch) != self.global_batch:
            samples = pos * int(dp["global_batch"])
            pos = samples // self.global_batch
            self.warn(f"warning: global batch changed {dp['global_batch']} -> "
                      f"{self.global_batch}: continuing epoch {self.epoch} at batch {pos}")
        if dp.get("num_items", len(self.ds)) != len(self.ds) or dp.get("seed", cfg.seed) != cfg.seed:
            self.warn("warning: the dataset size or seed changed since the checkpoint; the "
                      "epoch order is not the one the run started with")
        self.pos = min(pos, self.steps_per_epoch)
        if self.pos >= self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        rng = ck.get("rng") or {}
        ranks = rng.get("ranks") or []
        if len(ranks) == env.world_size and generator_state_fits(ranks[env.rank],
                                                                 self.generator):
            restore_rng(ranks[env.rank], self.generator)
            rng_note = "RNG restored"
        else:
            self.generator.manual_seed(derive_seed(cfg.seed, env.rank, self.step))
            rng_note = (f"RNG re-seeded (checkpoint had {len(ranks)} processes, now "
                        f"{env.world_size})" if len(ranks) != env.world_size else
                        "RNG re-seeded (the checkpoint's step generator was on "
                        f"{ranks[env.rank].get('generator_device') or 'another device type'}"
                        f", this run's is on {self.generator.device.type})")
        self._scaler_state = ck.get("scaler")
        self.nonfinite_total = int((ck.get("nonfinite") or {}).get("total", 0))
        self.print(f"[sra-fast] resumed from {path}: step {self.step}, epoch {self.epoch}, "
                   f"batch {self.pos}/{self.steps_per_epoch} of the epoch ({rng_note})")

    # ---------------------------------------------------------------- the loop
    def _set_lr(self):
        cfg = self.cfg
        if cfg.lr_warmup_steps and self.step < cfg.lr_warmup_steps:
            lr = cfg.lr * (self.step + 1) / cfg.lr_warmup_steps
        else:
            lr = cfg.lr
        if lr != self._lr:
            for g in self.opt.param_groups:
                g["lr"] = lr
            self._lr = lr

    def _device_batch(self, x, y):
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.ds.kind == "moments":
            x = sample_posterior(x, self.cfg.latent_scale, self.generator)
        elif x.dtype != torch.float32:
            x = x.float()
        return x, y

    def one_step(self, x, y, weight: float):
        ts = self.train_step
        before = ts.nonfinite_count.clone()
        ts(x, y, weight)
        flag = ts.nonfinite_count - before             # 1 if this step was skipped
        self._consec.mul_(flag).add_(flag)             # run length of skipped steps
        torch.maximum(self._max_consec, self._consec, out=self._max_consec)

    def train(self) -> dict:
        """Train to max_steps. Returns {"step", "stopped", "signal", last log record...};
        "signal" is the number of the stop signal that ended the run early (else 0)."""
        try:
            with StopSignals(self.cfg.save_on_signal) as signals, self._hang_reports():
                return self._train(signals)
        finally:
            self.close_loader()

    def close_loader(self):
        """Stop the data-loader worker processes now. They ignore the stop signals (see
        ignore_stop_signals), so multiprocessing's exit handler, which terminates them and then
        waits, would wait forever: after an error, a process and with it every rank waiting in
        a collective would hang instead of exiting. Iterating the loader again starts new ones."""
        it = getattr(self.loader, "_iterator", None)
        if it is None:
            return
        if hasattr(it, "_shutdown_workers"):   # the multi-process iterator
            it._shutdown_workers()
        self.loader._iterator = None

    @contextlib.contextmanager
    def _hang_reports(self):
        """A run that hangs (a stalled file system, a lost peer, a stuck device) otherwise
        sits silent until a timeout, if any: after --hang-report-min minutes without a step,
        every thread's Python stack goes to stderr, again every as many minutes. Re-armed
        after every step (_step_done); a C-level timer, nothing on the device. After
        --hang-exit-min minutes the process exits (_hang_exit), before NCCL's own timeout
        would abort it without a word, and where no timeout watches (a stalled file system):
        a job that ends can be requeued."""
        self._hang_s, self._hang_file = 60.0 * self.cfg.hang_report_min, None
        self._progress_t, self._first_step = time.monotonic(), True
        exit_s = 60.0 * self.cfg.hang_exit_min
        done, watch = threading.Event(), None
        if exit_s:   # a Python thread: the main thread waits in calls that release the GIL
            watch = threading.Thread(target=self._hang_exit_watch, args=(exit_s, done),
                                     name="sra-fast-hang-exit", daemon=True)
            watch.start()
        for f in (sys.stderr, sys.__stderr__):   # the first with a file descriptor
            try:
                f.fileno()
                self._hang_file = f
                break
            except (AttributeError, OSError, ValueError):   # a stream in memory, or None
                continue
        if self._hang_file is None:
            self._hang_s = 0.0
        self._step_done(first=True)   # the first step too (compilation, capture, cold data)
        try:
            yield
        finally:
            done.set()
            if watch is not None:   # a daemon thread alive at the interpreter's end can
                watch.join()        # abort it (status 134, "terminate called ...")
            if self._hang_s:
                faulthandler.cancel_dump_traceback_later()

    def _step_done(self, first: bool = False):
        self._progress_t, self._first_step = time.monotonic(), first
        if self.peer_watch is not None:   # silences are judged only while no step ends
            self.peer_watch.mark_progress()
        if self._hang_s:
            faulthandler.dump_traceback_later(self._hang_s, repeat=True, file=self._hang_file)

    FIRST_STEP_FACTOR = 3   # the first step also compiles, captures and reads cold data
    HANG_EXIT_GRACE_S = 60.0   # the most the exit's own writes (stacks, line) may take

    def _hang_exit_watch(self, exit_s: float, done: threading.Event):
        poll = min(10.0, exit_s / 10)
        last = time.monotonic()
        while not done.wait(poll):
            now = time.monotonic()
            if now - last > 3 * poll:
                # this thread slept far past its poll: the process was stopped (a SLURM
                # suspend, SIGSTOP), which is no hang; do not count that time
                self._progress_t += now - last - poll
            last = now
            waited = now - self._progress_t
            if waited > exit_s * (self.FIRST_STEP_FACTOR if self._first_step else 1):
                self._hang_exit(waited)

    def _hang_exit(self, waited: float):
        """The other ranks told, every thread's stack, one line (said by every rank), exit 4.
        Nothing that touches the run folder, and the writes to stderr last, under a backstop:
        a stalled file system, maybe the one that holds the log, may be what hangs."""
        threading.Timer(self.HANG_EXIT_GRACE_S, os._exit, args=(4,)).start()
        # That timer needs the GIL, which faulthandler holds for as long as its write below
        # blocks (stderr on the stalled file system): the kernel's alarm needs nothing, and
        # SIGALRM's default action ends the process (status 142, -14 under torchrun). Only
        # where nobody handles SIGALRM; setitimer works from any thread.
        if signal.getsignal(signal.SIGALRM) == signal.SIG_DFL:
            signal.setitimer(signal.ITIMER_REAL, self.HANG_EXIT_GRACE_S + 5.0)
        line = (f"[sra-fast] no step finished in {waited / 60:.1f} min (--hang-exit-min "
                f"{self.cfg.hang_exit_min:g}; stacks above): stopping at step {self.step} with "
                "exit status 4; continue with --resume auto from the newest checkpoint")
        if self.peer_watch is not None:
            self.peer_watch.announce(line)
        if self._hang_file is not None:
            faulthandler.dump_traceback(file=self._hang_file, all_threads=True)
        who = f"(rank {self.env.rank}) " if self.env.distributed and not self.main else ""
        stderr_line(who + line)
        os._exit(4)

    def _train(self, signals: StopSignals) -> dict:
        from tqdm import tqdm
        if self.step >= self.max_steps:
            self.print(f"[sra-fast] already at step {self.step} >= {self.max_steps}: nothing "
                       "to train")
            self.logger.close()
            return {"step": self.step, "stopped": None, "signal": 0}
        self._lr = None
        self.logger.event(self.step, "start", resumed=bool(self.step), world_size=self.env.world_size,
                          global_batch=self.global_batch)
        # a live bar on a terminal; in a log file (a batch job) its redraws would pile up into
        # one huge line, so there a plain line per log point instead, at most every
        # PROGRESS_LINE_S (see _progress_line)
        self._lines = not sys.stderr.isatty()
        self._last_line = 0.0
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.main or self.quiet or self._lines, smoothing=0.05,
                   mininterval=1.0)
        self._win_t0, self._win_steps = time.perf_counter(), 0
        try:
            stop, last, signum = self._loop(signals, bar)
        finally:
            bar.close()   # before any error line, which would otherwise join the bar's
        saved = self._saved_step == self.step
        if signum and not stop:
            self.logger.event(self.step, "stopped", signal=signal_name(signum), saved=saved)
        self.logger.close()
        if stop:
            newest, _ = list_checkpoints(ckpt_dir(self.run_dir))
            msg = (f"{stop}; stopped at step {self.step}. The last good checkpoint is "
                   f"{newest[0] if newest else '(none written yet)'}")
            raise TrainingStopped(msg)
        if signum:
            self.print(f"[sra-fast] {signal_name(signum)}: stopped after step {self.step}, "
                       + ("checkpoint written" if saved else "no checkpoint (a run of "
                          "non-finite losses; the newest one stays)")
                       + "; continue with --resume auto")
            return {"step": self.step, "stopped": signal_name(signum), "signal": signum, **last}
        self.print(f"[sra-fast] done: step {self.step}, epoch {self.epoch}; run folder "
                   f"{self.run_dir}")
        return {"step": self.step, "stopped": None, "signal": 0, **last}

    def _loop(self, signals: StopSignals, bar):
        """Steps until max_steps, a stop (non-finite run) or an agreed stop signal; returns
        (stop message, last log record, signal number)."""
        cfg = self.cfg
        stop, last, signum = None, {}, 0
        while self.step < self.max_steps and stop is None and not signum:
            weight = align_weight(cfg.weight_schedule, self.epoch, cfg.align_weight)
            self.sampler.set_epoch(self.epoch, self.pos)
            consumed = 0
            for xb, yb in self.loader:
                x, y = self._device_batch(xb, yb)
                self._set_lr()
                self.one_step(x, y, weight)
                consumed += 1
                self.step += 1
                self.pos += 1
                self._win_steps += 1
                if self.pos >= self.steps_per_epoch:
                    self.epoch, self.pos = self.epoch + 1, 0
                bar.update(1)
                end = self.step >= self.max_steps
                if self.step % cfg.log_every == 0 or end:
                    stop, rec = self._log(weight)
                    last = rec or last
                    if rec and self._lines:
                        self._progress_line(rec, end)
                    if rec:
                        bar.set_postfix_str(
                            f"loss {rec['loss']:.4f} align {rec['align_loss']:.4f} "
                            f"{rec['img_per_s']:.0f} img/s" if rec.get("loss") is not None
                            else "all steps non-finite", refresh=False)
                    if stop:
                        break
                if self.step % cfg.ckpt_every == 0 or end:
                    stop = self._checkpoint(weight)
                    if stop:
                        break
                if cfg.sample_every and self.step % cfg.sample_every == 0 or end:
                    self.sample_grid()
                if end:
                    break
                self._step_done()
                signum = signals.agreed(self.env, self.step)
                if signum:
                    stop = self._checkpoint(weight)
                    break
            if consumed == 0 and stop is None:   # defensive: never spin on an empty epoch
                self.epoch, self.pos = self.epoch + 1, 0
        return stop, last, signum

    PROGRESS_LINE_S = 60.0

    def _progress_line(self, rec: dict, end: bool):
        """One plain progress line (log files): step, losses, throughput, ETA."""
        now = time.perf_counter()
        if not end and now - self._last_line < self.PROGRESS_LINE_S:
            return
        self._last_line = now
        eta = int((self.max_steps - self.step) * rec["sec_per_step"])
        d, h, m, sec = eta // 86400, eta // 3600 % 24, eta // 60 % 60, eta % 60
        losses = (f"loss {rec['loss']:.4f} align {rec['align_loss']:.4f} grad norm "
                  f"{rec['grad_norm']:.3f}" if rec.get("loss") is not None
                  else "all steps non-finite")
        mfu = f", MFU {100 * rec['mfu']:.0f}%" if rec.get("mfu") else ""
        self.print(f"[sra-fast] step {self.step}/{self.max_steps} (epoch {self.epoch}): "
                   f"{losses} | {rec['img_per_s']:.0f} img/s{mfu} | ETA "
                   + (f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {sec}s"))

    def _checkpoint(self, weight: float):
        """Save (unless this step already is saved, or a run of non-finite losses is going
        on); returns the stop message when that run has reached --max-nonfinite. Off a log
        step, the open log window is logged first: a run resumed from here never replays
        those steps, so their losses and skipped-step count would be lost."""
        stop, streak = self._check_nonfinite_now()
        if stop:
            return stop
        if streak:   # weights are pre-streak, but resuming here would replay it
            self.warn(f"step {self.step}: checkpoint skipped during a run of {streak} "
                      f"non-finite losses; the last one stays the good one")
        elif self._saved_step != self.step:
            if self._win_steps:
                stop, _ = self._log(weight)
                if stop:
                    return stop
            self.save()
        return None

    def _read_consec(self):
        return [int(v) for v in torch.stack([self._consec, self._max_consec]).tolist()]

    def _check_nonfinite_now(self):
        """(stop message or None, length of the current run of non-finite steps)."""
        consec, mx = self._read_consec()
        if max(consec, mx) >= self.cfg.max_nonfinite:
            return (f"{max(consec, mx)} consecutive non-finite losses (limit --max-nonfinite "
                    f"{self.cfg.max_nonfinite})"), consec
        return None, consec

    def _log(self, weight: float):
        cfg, env = self.cfg, self.env
        s = self.train_step.read_stats()              # the one host sync of the window
        consec, mx = self._read_consec()
        self._max_consec.copy_(self._consec)
        vec = torch.tensor([s["loss"], s["denoise_loss"], s["align_loss"], s["grad_norm"],
                            float(s["nonfinite"]), float(s["steps"] - s["nonfinite"]),
                            float(mx)], dtype=torch.float64)
        if env.distributed:
            vec = vec.to(self.device)
            all_reduce_(vec, env)
            vec = vec.cpu() / env.world_size
        loss, den, ali, gn, nf, ok, mx = vec.tolist()
        now = time.perf_counter()
        dt = max(now - self._win_t0, 1e-9)
        img_s = self.global_batch * self._win_steps / dt
        self._win_t0, self._win_steps = now, 0
        nf = int(round(nf))
        self.nonfinite_total += nf
        finite = ok > 0
        rec = {"epoch": self.epoch, "loss": loss if finite else None,
               "denoise_loss": den if finite else None, "align_loss": ali if finite else None,
               "grad_norm": gn if finite else None, "nonfinite": nf,
               "nonfinite_total": self.nonfinite_total, "lr": self._lr,
               "align_weight": float(weight), "img_per_s": img_s, "sec_per_step": dt / max(
                   s["steps"], 1)}
        if self._flops and self._peak:
            rec["mfu"] = self._flops * img_s / (self._peak * 1e12 * env.world_size)
        if self.device.type == "cuda":   # allocator counters: host-side, no sync
            rec["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            rec["gpu_reserved_gib"] = torch.cuda.memory_reserved(self.device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(self.device)   # the next window's own peak
        self.logger.log(self.step, **rec)
        if nf:
            self.warn(f"step {self.step}: {nf} non-finite loss(es) in the last {s['steps']} "
                      f"steps; their updates were skipped ({self.nonfinite_total} in total)")
        if mx >= cfg.max_nonfinite:
            return (f"{int(mx)} consecutive non-finite losses (limit --max-nonfinite "
                    f"{cfg.max_nonfinite})"), rec
        return None, rec

    # ---------------------------------------------------------------- checkpoints
    def data_position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.pos, "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.global_batch, "num_items": len(self.ds),
                "seed": self.cfg.seed, "world_size": self.env.world_size}

    def save(self) -> Path | None:
        with self._untimed():
            rngs = all_gather_objects(capture_rng(self.generator), self.env)
            path = None
            if self.main:
                path = save_training_checkpoint(
                    self.run_dir, step=self.step, epoch=self.epoch, model=self.model,
                    ema=self.ema, opt=self.opt, config=self.cfg.to_dict(),
                    data_position=self.data_position(),
                    rng={"world_size": self.env.world_size, "ranks": rngs},
                    scaler=self.train_step.scaler, model_config=self.model_config,
                    nonfinite={"total": self.nonfinite_total}, keep=self.cfg.keep_ckpts)
                self.logger.event(self.step, "checkpoint", path=str(path))
                self._check_free_space(path.stat().st_size, "the next checkpoint")
            barrier(self.env)
        self._saved_step = self.step
        return path

    @contextlib.contextmanager
    def _untimed(self):
        """Leave the enclosed time (a checkpoint, a sample grid) out of the logged img/s and
        MFU. The device is drained on entry, so the steps queued before stay counted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if hasattr(self, "_win_t0"):
                self._win_t0 += time.perf_counter() - t0

    # ---------------------------------------------------------------- sample grids
    @torch.no_grad()
    def sample_grid(self, per_class: int = 8):
        """A grid (one row per class) from fixed noise, written by rank 0; the other ranks
        wait for it. Out of GPU memory (the grid on top of the training state) costs the
        grid, not the run."""
        out = None
        with self._untimed():
            try:
                if self.main:
                    out = self._write_grid(per_class)
            except torch.OutOfMemoryError as e:
                self.warn("warning: no sample grid: " + out_of_memory_line(
                    e, f"at step {self.step}", "training goes on"))
                torch.cuda.empty_cache()
            except OSError as e:   # a full disk, a read-only folder: costs the grid only
                self.warn(f"warning: no sample grid at step {self.step}: could not write it "
                          f"({e.strerror or e}); training goes on")
            barrier(self.env)
        return out

    def _write_grid(self, per_class: int):
        cfg = self.cfg
        if self.ds.kind == "moments" and (cfg.vae == "none" or self._vae_failed):
            return None   # nothing to decode latents with: no grid
        net = self.ema if cfg.sample_weights == "ema" else self.model
        labels = grid_labels(self.num_classes, per_class)
        g = torch.Generator(self.device)
        g.manual_seed(derive_seed(cfg.seed, 7919))   # fixed noise: grids comparable over time
        C, H, W = self.ds.sample_shape
        z = torch.randn((len(labels), C, H, W), device=self.device, generator=g)
        y = torch.tensor(labels, device=self.device)
        scfg = SamplerConfig(sampler=cfg.sample_sampler, steps=cfg.sample_num_steps,
                             cfg_scale=cfg.sample_cfg_scale, path_type=cfg.path_type)
        from .step import autocast_ctx
        eager = net.blocks_eager() if hasattr(net, "blocks_eager") else contextlib.nullcontext()
        with eager, autocast_ctx(cfg.precision, self.device):
            x = sample(net, z, y, scfg, self.kind, generator=g)
        if self.ds.kind == "moments":
            x = self._decode(x)
            if x is None:
                return None
        img = image_grid(to_uint8(x).cpu().numpy(), nrow=per_class)
        out = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.png")
        img.save(tmp)
        os.replace(tmp, out)
        img.save(self.run_dir / "samples.png.tmp.png")
        os.replace(self.run_dir / "samples.png.tmp.png", self.run_dir / "samples.png")
        self.logger.event(self.step, "samples", path=str(out), sampler=cfg.sample_sampler,
                          steps=cfg.sample_num_steps, cfg_scale=cfg.sample_cfg_scale,
                          weights=cfg.sample_weights)
        return out

    def _decode(self, z):
        if self.cfg.vae == "none" or self._vae_failed:
            return None
        if self._vae is None:
            try:
                self._vae = load_vae(self.cfg.vae, self.device)
            except RuntimeError as e:
                self._vae_failed = True
                self.warn(f"warning: no sample grids: {e}")
                return None
        # 16 at a time: the VAE decoder's activations at 256 px are GBs per 64 images, on top
        # of the training state
        return decode_latents(self._vae, z, self.cfg.latent_scale, batch=16)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    env = None

    def say(msg):
        # every rank says it: an error may be one rank's own (its data shard, a file only it
        # cannot read), and torchrun shows nothing but an exit code otherwise
        rank = env.rank if env is not None else startup.rank   # (before the process group)
        stderr_line(f"{f'(rank {rank}) ' if rank else ''}{msg}")

    def failed(msg, status, startup_wait_s=None):
        """Say it, and stop the other ranks now (they may wait in a collective, or in the
        rendezvous, until the process-group timeout otherwise: sra_fast.peer_watch)."""
        say(msg)
        if watch is not None:
            watch.announce(msg)
        else:
            startup.announce(msg, wait_s=startup_wait_s)
        return status

    trainer, watch = None, None
    # from the first moment: a rank that fails before the process group exists (no GPU for
    # its local rank, the group's creation) would leave the others in the rendezvous
    startup = StartupFailureWatch(wait_s=60 * (cfg.peer_lost_min or 3)).start()
    try:
        try:
            env = init_distributed(cfg.device)
        except RuntimeError as e:   # --device cuda without CUDA, more ranks than GPUs...
            raise RunError(error_line(e)) from None
        watch = PeerFailureWatch(env, lost_after_s=60 * cfg.peer_lost_min).start()
        startup.stop()   # after start()'s one collective, which both watch
        trainer = Trainer(cfg, env, peer_watch=watch)
        result = trainer.train()
        barrier(env)    # watched: a rank failing after the last collective (its final
        watch.stop()    # checkpoint) still stops the others; then no rank watches any more
        barrier(env)    # when rank 0 (maybe the store's host) leaves
        cleanup(env)   # only on success: destroying the process group while other ranks
        # may still wait in a collective can hang. Stopped by a signal (with a checkpoint):
        # 128 + its number, what a shell reports for a process that signal ended.
        return 128 + result["signal"] if result["signal"] else 0
    except TrainingStopped as e:
        return failed(f"[sra-fast] training stopped: {e}", 3)
    except (RunError, DataError, CheckpointError, GraphCaptureError) as e:
        return failed(f"error: {error_line(e)}", 2)
    except torch.OutOfMemoryError as e:
        set_up = trainer is not None
        c = trainer.cfg if set_up else cfg        # with the presets filled in
        return failed("error: " + out_of_memory_line(
            e, f"at step {trainer.step + 1}" if set_up else "while setting up",
            f"{c.model or 'the model preset'} with --batch-size {c.batch_size or 'preset'} per "
            f"process and --grad-accum {c.grad_accum}; a larger --grad-accum (the batch in "
            f"that many micro-batches) keeps the batch and needs less"), 2)
    except Exception as e:   # a bug or a failure nobody anticipated: the whole story, then
        # exit 1 (caught here, so no traceback kept for the interpreter's exit holds on to the
        # run)
        traceback.print_exc()
        return failed(f"error: unexpected failure: {error_line(e)} (traceback above)", 1)
    except KeyboardInterrupt:   # Ctrl-C (SIGINT): no checkpoint, as documented; say which is
        newest = None           # left (a checkpoint being written is never left half-done)
        if trainer is not None:
            complete, _ = list_checkpoints(ckpt_dir(trainer.run_dir))
            newest = complete[0] if complete else None
        if trainer is None:   # (its run folder, if any, not opened yet: nothing to name)
            # before the process group: every rank got the Ctrl-C, so no long wait to tell
            return failed("[sra-fast] interrupted (Ctrl-C) while setting up: nothing written",
                          130, startup_wait_s=5.0)
        return failed(f"[sra-fast] interrupted (Ctrl-C): no checkpoint written; the newest "
                      f"complete one is {newest or '(none)'}", 130)
