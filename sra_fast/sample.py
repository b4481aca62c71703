"""Generate samples from a checkpoint into the ADM evaluation format (`python -m sra_fast.sample`).

    python -m sra_fast.sample --ckpt runs/X/checkpoints/0400000.pt --num-samples 50000 \
        --sampler sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 --out samples.npz
    torchrun --nproc-per-node 8 -m sra_fast.sample --ckpt ... (same flags)

Writes OUT.npz (arr_0: uint8 NHWC images, labels: int64 classes) and OUT.json beside it with
every sampler setting, the checkpoint's SHA-256, the seed and the versions, so an FID can
be reproduced. Sample i always gets the same noise and label (they derive from (seed, i)),
whatever the number of processes. Each process writes finished batches to OUT.npz.parts/ (a
crashed run resumes there, only with the same checkpoint content and settings); rank 0
assembles the .npz, written to a temporary name and renamed. Checkpoints: ours (model built
from the stored config) or released ones (built from their args, or
--model/--resolution/--num-classes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import CheckpointError, load_model_state, state_dict_from
from .config import RawDescriptionHelpFormatter, build_model, model_kind
from .data import error_line, out_of_memory_line
from .distributed import (barrier, cleanup, derive_seed, env_ranks, init_distributed,
                          stderr_line)
from .metrics_log import progress_bar
from .peer_watch import PeerFailureWatch, StartupFailureWatch, exit_if_store_requests_linger
from .sampling import (SAMPLERS, SamplerConfig, SiTOriginalTime, decode_latents, image_grid,
                       load_vae, sample, to_uint8)
from .ops import attention
from .step import COMPILE_MODES, autocast_ctx, compile_fn, precision_dtype
from .train_state import is_released, read_checkpoint, released_args


def sha256_file(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def model_from_checkpoint(ck: dict, weights: str = "ema", name: str | None = None,
                          resolution: int | None = None, num_classes: int | None = None):
    """(model, info) for a checkpoint of ours or a released one."""
    mc = ck.get("model_config") or {}
    sd = state_dict_from(ck, weights if weights in ck else "model")
    if mc and not name:
        kw = dict(input_size=mc["input_size"], in_channels=mc["in_channels"],
                  num_classes=mc["num_classes"], class_dropout_prob=mc["class_dropout_prob"],
                  qk_norm=mc.get("qk_norm", False))
        name = mc["name"]
        info = {"data_kind": mc.get("data_kind", "moments"),
                "latent_scale": mc.get("latent_scale") or 0.18215,
                "path_type": (ck.get("config") or {}).get("path_type", "linear")}
    else:
        args = released_args(ck) if is_released(ck) else (ck.get("config") or {})
        name = name or args.get("model")
        if not name:
            raise CheckpointError("the checkpoint does not name its model; pass --model "
                                  "(e.g. SiT-XL/2)")
        pe = sd.get("pos_embed")
        w = sd.get("x_embedder.proj.weight")
        if pe is None or w is None:
            raise CheckpointError("the checkpoint's state dict has no pos_embed / "
                                  "x_embedder: not a SiT/DiT")
        p = w.shape[-1]
        in_ch = w.shape[1]
        side = int(round(pe.shape[1] ** 0.5)) * p
        if resolution:
            side = resolution // 8
        table = sd["y_embedder.embedding_table.weight"].shape[0]
        k = num_classes or args.get("num_classes") or table - 1
        drop = 0.1 if table == k + 1 else 0.0
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        kw = dict(input_size=side, in_channels=in_ch, num_classes=k, class_dropout_prob=drop,
                  qk_norm=bool(args.get("qk_norm"))
                  or any(".attn.q_norm." in key for key in sd))   # REPA/SRA --qk-norm runs
        info = {"data_kind": "moments", "latent_scale": 0.18215,
                "path_type": args.get("path_type", "linear")}
        if name.startswith("SiT") and out_ch == 2 * in_ch:
            # an original SiT checkpoint (learned-sigma head): its own time convention
            kw["learn_sigma"] = True
            info["path_type"] = _original_sit_path(args)
            info["time_convention"] = "original SiT (t=1 data), flipped to t=1 noise"
    model = build_model(name, **kw)
    try:
        load_model_state(model, sd, init_missing_head=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}") from None
    info.update(name=name, kind=model_kind(name), **kw)
    model = model.eval().requires_grad_(False)
    if "time_convention" in info:
        model = SiTOriginalTime(model)
    return model, info


def _original_sit_path(args: dict) -> str:
    """Our path name for an original SiT run's --path-type / --prediction (Linear, velocity
    when the file does not say: the released SiT-XL-2-256x256.pt)."""
    path = str(args.get("path_type", "Linear"))
    pred = str(args.get("prediction", "velocity"))
    if pred.lower() != "velocity":
        raise CheckpointError(f"original SiT checkpoint trained with prediction={pred!r}: "
                              "only velocity prediction is supported")
    ours = {"linear": "linear", "gvp": "cosine"}.get(path.lower())
    if ours is None:
        raise CheckpointError(f"original SiT checkpoint with path_type={path!r}: only "
                              "Linear and GVP (our cosine path, time-flipped) are supported")
    return ours


def build_parser():
    p = argparse.ArgumentParser(prog="python -m sra_fast.sample", description=__doc__,
                                formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (ours or released)")
    p.add_argument("--weights", default="ema", choices=("ema", "model", "student"),
                   help="which weights to sample with: the EMA, or the trained model's "
                        "(model; also spelled student, as train.py's --sample-weights)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="sde (SiT default, the released evaluation), euler, heun; ddpm (DiT)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="sampling steps (250 sde/ddpm, 50 ODE)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1: none)")
    p.add_argument("--guidance-low", type=float, default=0.0,
                   help="guidance interval start (t in [0,1], t=1 noise)")
    p.add_argument("--guidance-high", type=float, default=1.0,
                   help="guidance interval end (SRA's best: 0.7)")
    p.add_argument("--cfg-channels", default="all", choices=("all", "first3"),
                   help="guide all latent channels (REPA/SRA) or only the first 3 (original "
                        "SiT/DiT code)")
    p.add_argument("--t-min", type=float, default=0.04, help="SDE: last stochastic time")
    p.add_argument("--path-type", default=None, choices=("linear", "cosine"),
                   help="SiT path (the checkpoint's)")
    p.add_argument("--num-samples", type=int, default=50_000, help="how many to draw")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch per process")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i's noise and label derive from (seed, i)")
    p.add_argument("--classes", default="random",
                   help="'random' (uniform, as the released generate.py), 'balanced' "
                        "(i mod classes) or a comma list of class ids to cycle through")
    p.add_argument("--out", default=None, help="output .npz (next to the checkpoint, named by "
                   "the settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (otherwise refused: a finished sample set)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="decoder for latent models: local path or hub name; 'none' stores "
                        "the latents (float32, key 'latents') instead of images")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 samples")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the model's autocast precision")
    p.add_argument("--compile", default="off", choices=("off",) + COMPILE_MODES,
                   help="torch.compile the network (each batch size compiles once, with and "
                        "without guidance; reduce-overhead adds inductor's CUDA graphs). "
                        "Compiled samples may differ from uncompiled ones in the last bits: "
                        "OUT.json records it, and finished batches are resumed only with the "
                        "same setting")
    p.add_argument("--model", default=None, help="model name for released checkpoints "
                   "without args")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size, for released checkpoints without args")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes, for released checkpoints without args")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint without the allow-list (only for files "
                        "you trust)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on CUDA (as the released sampler; "
                        "--no-tf32 for true fp32)")
    p.add_argument("--peer-lost-min", type=float, default=3.0,
                   help="several processes: stop when one shows no sign of life for this "
                        "many minutes (killed, crashed; 0: never). One that fails with an "
                        "error stops the others at once either way")
    return p


def class_labels(spec: str, n: int, num_classes: int, seed: int) -> np.ndarray:
    if spec == "random":
        return np.random.default_rng([seed, 1]).integers(0, num_classes, n)
    if spec == "balanced":
        return np.arange(n) % num_classes
    try:
        ids = np.array([int(c) for c in spec.split(",")])
    except ValueError:
        raise ValueError(f"--classes {spec!r}: use random, balanced or a comma list") from None
    if (ids < 0).any() or (ids >= num_classes).any():
        raise ValueError(f"--classes {spec!r}: ids must be in 0..{num_classes - 1}")
    return ids[np.arange(n) % len(ids)]


def _atomic_savez(path: Path, **arrays):
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_args(a):
    """Settings that need no checkpoint, checked before anything is loaded or drawn."""
    for flag, v in (("--cfg-scale", a.cfg_scale), ("--guidance-low", a.guidance_low),
                    ("--guidance-high", a.guidance_high), ("--t-min", a.t_min)):
        if not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v}")
    if a.num_samples < 1 or a.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    if a.weights == "student":   # train.py's name for them
        a.weights = "model"
    if a.grid:
        grid = Path(a.grid)
        _check_output_file(grid, "--grid", create_parents=False)
        from PIL import Image
        Image.init()
        if grid.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"--grid {grid}: unknown image file extension "
                             f"{grid.suffix or '(none)'!r}; use e.g. .png")


def _check_output_file(path: Path, flag: str, create_parents: bool):
    """Fail now, not after hours of sampling, if `path` cannot be written as a file."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    if not create_parents and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{flag} {path}: folder {folder} {what}")
    while not folder.exists() and folder != folder.parent:   # the folder that would hold it
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")


def _file_id(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _short(v):
    return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)


def _claim_parts(parts: Path, settings: dict):
    """Create OUT.npz.parts/ or resume in it: finished batches are reused only when they were
    drawn from the same checkpoint content (SHA-256) with the same settings; anything else
    is refused, never mixed in or silently deleted."""
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {parts} ({e.strerror or e})") from None
    meta = parts / "settings.json"
    done = len(list(parts.glob("part-*.npz")))
    try:
        old = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        old = None
    if done and not isinstance(old, dict):
        raise ValueError(f"{parts} holds {done} finished batches but no readable settings.json, "
                         "so which checkpoint and settings drew them is unknown; delete that "
                         "folder to start over, or choose another --out")
    if done:
        # the path may differ (a moved or copied file): the content decides
        diff = [k for k in sorted(set(old) | set(settings))
                if k != "checkpoint" and old.get(k) != settings.get(k)]
        if diff:
            what = "; ".join(
                ("the checkpoint's content (SHA-256 " if k == "checkpoint_sha256" else f"{k} (")
                + f"{_short(old.get(k))} there, {_short(settings.get(k))} now)" for k in diff)
            raise ValueError(f"{parts} holds {done} finished batches drawn with other settings: "
                             f"{what}; delete that folder to start over, or choose another "
                             "--out")
    if old != settings:   # new, or a run that stopped before its first batch
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, meta)


class _Reported(Exception):
    """An error already printed (and told to the other processes): exit status 2."""


def _who() -> str:
    """'(rank R) ' in front of a line, except for rank 0 and a single process."""
    try:
        rank = env_ranks()[0]
    except (KeyError, ValueError):
        return ""
    return f"(rank {rank}) " if rank else ""


def run(a) -> Path | None:
    # Several processes: one that fails tells the others, which would otherwise sample on and
    # then wait at the last barrier for the 3-hour timeout (or in the rendezvous, when it
    # fails while starting); one that dies without a word is announced by its neighbour
    # (sra_fast.peer_watch). Finished batches are kept either way.
    if not 0 <= a.peer_lost_min < math.inf:
        raise ValueError(f"--peer-lost-min must be >= 0 (0: never), got {a.peer_lost_min}")
    startup = StartupFailureWatch(wait_s=60 * (a.peer_lost_min or 3)).start()
    try:
        env = init_distributed(a.device, timeout_min=180)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):   # every rank got it: no long wait
            startup.announce("interrupted (Ctrl-C)", wait_s=5.0)
            raise
        if not isinstance(e, (RuntimeError, ValueError)):   # a bug: its traceback follows
            startup.announce(f"error: {error_line(e)}")
            raise
        # --device cuda without CUDA, more ranks than GPUs: said first, since telling the
        # others may take minutes (their store may not exist yet)
        line = f"error: {error_line(e)}"
        stderr_line(_who() + line)
        startup.announce(line)
        raise _Reported() from None
    watch = PeerFailureWatch(env, lost_after_s=60 * a.peer_lost_min).start()
    startup.stop()   # after start()'s one collective, which both watch
    try:
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = a.tf32
            torch.backends.cudnn.allow_tf32 = a.tf32
        out = _run(a, env, watch)
        barrier(env)   # watched: rank 0 failing while it assembles still stops the others
    except BaseException as e:
        watch.announce("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt)
                       else f"error: {error_line(e)}")
        raise
    watch.stop()
    barrier(env)       # no rank watches when rank 0 (maybe the store's host) leaves
    cleanup(env)   # only on success: see trainer.main
    return out


def _run(a, env, watch: PeerFailureWatch) -> Path | None:
    dev = env.device
    _check_args(a)
    ckpt_path = Path(a.ckpt)
    before = _file_id(ckpt_path)
    ck = read_checkpoint(ckpt_path, a.trust_checkpoint)
    # the content identifies the run (resume in OUT.npz.parts/, OUT.json): hashed now, so the
    # record is of the file that was loaded
    ckpt_sha = sha256_file(ckpt_path) if env.is_main else None
    if _file_id(ckpt_path) != before:
        raise ValueError(f"checkpoint {ckpt_path} changed while it was being read; run again "
                         "once it is complete")
    model, info = model_from_checkpoint(ck, a.weights, a.model, a.resolution, a.num_classes)
    model.to(dev)
    if a.compile != "off":
        # attention's one-time setup outside the traced code, and its choice announced
        attention.prepare(dev, precision_dtype(a.precision), model.head_dim)
        model = compile_fn(model, a.compile)   # the module's attributes pass through
    kind = info["kind"]
    sampler = a.sampler or ("ddpm" if kind == "dit" else "sde")
    steps = a.num_steps if a.num_steps is not None else (250 if sampler in ("sde", "ddpm")
                                                          else 50)
    scfg = SamplerConfig(sampler=sampler, steps=steps, cfg_scale=a.cfg_scale,
                         guidance_low=a.guidance_low, guidance_high=a.guidance_high,
                         cfg_channels=a.cfg_channels, t_min=a.t_min,
                         path_type=a.path_type or info["path_type"]).validate(kind)
    out = Path(a.out) if a.out else ckpt_path.with_name(
        f"{ckpt_path.stem}-{sampler}{steps}-cfg{a.cfg_scale}-n{a.num_samples}-s{a.seed}.npz")
    _check_output_file(out, "--out", create_parents=True)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: must end in .npz (its settings go to "
                         f"{out.with_suffix('.json').name} beside it)")
    for path in (out, out.with_suffix(".json")):
        if path.exists() and path.resolve() == ckpt_path.resolve():
            raise ValueError(f"--out {out} would overwrite the checkpoint {ckpt_path}")
    _check_output_file(out.with_suffix(".json"), "--out", create_parents=True)
    if out.exists() and not a.overwrite:
        raise ValueError(f"--out {out} already exists (a finished sample set); pass --overwrite "
                         "to replace it, or choose another --out")
    parts = out.with_name(out.name + ".parts")
    labels = class_labels(a.classes, a.num_samples, info["num_classes"], a.seed)
    decode = info["data_kind"] == "moments" and a.vae != "none"
    if a.grid and info["data_kind"] == "moments" and not decode and env.is_main:
        stderr_line(f"warning: --grid {a.grid} is not written: --vae none stores latents, "
                    "not images")
    settings = {
        "checkpoint": str(ckpt_path.resolve()), "weights": a.weights, "model": info["name"],
        "kind": kind, "sampler": sampler, "num_steps": steps, "cfg_scale": a.cfg_scale,
        "guidance_low": a.guidance_low, "guidance_high": a.guidance_high,
        "cfg_channels": a.cfg_channels, "t_min": a.t_min if sampler == "sde" else None,
        "path_type": scfg.path_type, "num_samples": a.num_samples, "seed": a.seed,
        "classes": a.classes, "batch_size": a.batch_size, "precision": a.precision,
        "vae": a.vae if info["data_kind"] == "moments" else None,
        "latent_scale": info["latent_scale"] if info["data_kind"] == "moments" else None,
        "num_classes": info["num_classes"], "input_size": info["input_size"],
        "tf32": a.tf32 if dev.type == "cuda" else None, "checkpoint_sha256": ckpt_sha,
    }
    if "time_convention" in info:
        settings["time_convention"] = info["time_convention"]
    if a.compile != "off":   # (absent when off: parts from before the flag still resume)
        settings["compile"] = a.compile
    if env.is_main:
        _claim_parts(parts, settings)
    barrier(env)
    vae = load_vae(a.vae, dev) if decode else None
    C, S = info["in_channels"], info["input_size"]
    n_batches = -(-a.num_samples // a.batch_size)
    mine = [b for b in range(n_batches) if b % env.world_size == env.rank]
    for b in progress_bar(mine, desc=f"sampling (rank {env.rank})", disable=not env.is_main):
        part = parts / f"part-{b:06d}.npz"
        if part.is_file():
            continue   # done before a crash
        idx = np.arange(b * a.batch_size, min((b + 1) * a.batch_size, a.num_samples))
        z = torch.stack([torch.randn((C, S, S), generator=torch.Generator().manual_seed(
            derive_seed(a.seed, 0, int(i)))) for i in idx]).to(dev)
        y = torch.from_numpy(labels[idx]).to(dev)
        g = torch.Generator(dev)
        g.manual_seed(derive_seed(a.seed, 2, b))
        with autocast_ctx(a.precision, dev):
            x = sample(model, z, y, scfg, kind, generator=g)
        if info["data_kind"] == "moments" and not decode:
            _atomic_savez(part, latents=x.float().cpu().numpy(), labels=labels[idx])
            watch.mark_progress()
            continue
        if decode:
            x = decode_latents(vae, x, info["latent_scale"])
        img = to_uint8(x).cpu().numpy()
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)   # the ADM evaluator expects RGB
        _atomic_savez(part, images=img, labels=labels[idx])
        watch.mark_progress()
    barrier(env)
    if not env.is_main:
        return None
    # assemble (rank 0)
    key = "images" if (decode or info["data_kind"] != "moments") else "latents"
    first = np.load(parts / "part-000000.npz")[key]
    total = np.empty((a.num_samples, *first.shape[1:]), dtype=first.dtype)
    for b in range(n_batches):
        p = parts / f"part-{b:06d}.npz"
        if not p.is_file():
            raise RuntimeError(f"{p} is missing after all processes finished")
        arr = np.load(p)[key]
        total[b * a.batch_size: b * a.batch_size + len(arr)] = arr
    settings.update(world_size=env.world_size,
                    sra_fast_version=__version__, torch_version=torch.__version__,
                    device=str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    format=("ADM npz: arr_0 uint8 NHWC images, labels int64" if key == "images"
                            else "latents float32 NCHW (no VAE), labels int64"))
    arrays = {"arr_0": total, "labels": labels} if key == "images" else \
        {"latents": total, "labels": labels}
    _atomic_savez(out, **arrays)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    if a.grid and key == "images":
        n = min(64, len(total))
        image_grid(total[:n], nrow=int(np.ceil(np.sqrt(n)))).save(a.grid)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"[sra-fast] wrote {a.num_samples} samples to {out} ({total.shape}, "
          f"{total.dtype}) and settings to {out.with_suffix('.json')}", flush=True)
    return out


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        run(a)
    except _Reported:
        return 2
    except torch.OutOfMemoryError as e:
        stderr_line(_who() + "error: " + out_of_memory_line(
            e, "while sampling", f"--batch-size {a.batch_size} per process; pass a smaller "
            "one"))
        return 2
    except (CheckpointError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not str(e).startswith(("could not load the VAE",
                                                                  "decoding latents")):
            raise
        stderr_line(f"{_who()}error: {' '.join(str(e).split())}")
        return 2
    return 0


if __name__ == "__main__":
    status = main()
    exit_if_store_requests_linger(status)
    sys.exit(status)
