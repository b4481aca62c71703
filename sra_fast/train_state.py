"""Training checkpoints: what they hold, how they are written, how a run finds them.

File (torch.save'd dict; the released keys first, so released tooling reads ours):
  model, ema, opt (in the released layout: one AdamW group over model.parameters(), the
  frozen pos_embed included with no state, so the released train.py resumes from it),
  args (the config as a plain dict), steps, epoch,
  config (same dict), data_position, rng (per rank), scaler, nonfinite, model_config,
  sra_fast_version.
Everything is tensors and plain containers: it loads with weights_only=True. A checkpoint
is written to `<name>.tmp-<pid>` and renamed: a file named `NNNNNNN.pt` is complete. Its
config is also written beside it as `NNNNNNN.json`.

Released checkpoints ({model, ema, opt, args: Namespace, steps, epoch}) are read through
sra_fast.checkpoint.load_checkpoint (allow-list) and can initialise or resume a run; their
optimizer state (and ours, in the same layout) is re-indexed to our in-memory optimizer,
which holds only the trainable parameters. Files from before that layout (our group over
the trainable parameters only) still load as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint

CKPT_RE = re.compile(r"^(\d+)\.pt$")


# ---------------------------------------------------------------------------- RNG
def capture_rng(generator: torch.Generator | None) -> dict:
    st = np.random.get_state()
    py = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": (torch.cuda.get_rng_state() if torch.cuda.is_available()
                       and torch.cuda.is_initialized() else None),
        "numpy": {"name": st[0], "key": torch.from_numpy(st[1].astype(np.int64)),
                  "pos": int(st[2]), "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "python": [py[0], list(py[1]), py[2]],
        "generator": generator.get_state() if generator is not None else None,
        "generator_device": generator.device.type if generator is not None else None,
    }


def generator_state_fits(state: dict, generator: torch.Generator | None) -> bool:
    """Whether `state`'s step generator can be restored into `generator`: a CUDA generator's
    state (16 bytes: seed, offset) and a CPU one's (5056 bytes) do not mix, and --device may
    change on resume. Checkpoints written before the device was recorded: by size."""
    saved = state.get("generator")
    if generator is None or saved is None:
        return True
    dev = state.get("generator_device")
    if dev is not None and dev != generator.device.type:
        return False
    return saved.numel() == generator.get_state().numel()


def restore_rng(state: dict, generator: torch.Generator | None):
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    n = state.get("numpy")
    if n:
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
    p = state.get("python")
    if p:
        random.setstate((p[0], tuple(p[1]), p[2]))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


# ---------------------------------------------------------------------------- files
def ckpt_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def ckpt_path(run_dir, step: int) -> Path:
    return ckpt_dir(run_dir) / f"{step:07d}.pt"


def checkpoint_step(path) -> int:
    """The step in a checkpoint's file name (0000020.pt -> 20)."""
    return int(CKPT_RE.match(Path(path).name).group(1))


def list_checkpoints(folder) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints newest first, partial leftovers) in a checkpoints folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    complete = sorted((p for p in folder.iterdir() if CKPT_RE.match(p.name)),
                      key=checkpoint_step, reverse=True)
    partial = sorted(p for p in folder.iterdir() if ".pt.tmp" in p.name)
    return complete, partial


def atomic_torch_save(obj, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_training_checkpoint(run_dir, *, step, epoch, model, ema, opt, config: dict,
                             data_position: dict, rng: dict, scaler=None, nonfinite=None,
                             model_config: dict | None = None, keep: int = 0) -> Path:
    """Write checkpoint `step` atomically (rank 0 only); prune to the newest `keep`."""
    ckpt = {
        "model": model.state_dict(), "ema": ema.state_dict(),
        "opt": optimizer_state_released_layout(opt.state_dict(), model),
        "args": dict(config), "steps": int(step), "epoch": int(epoch),
        "config": dict(config), "data_position": dict(data_position), "rng": rng,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "nonfinite": dict(nonfinite or {}), "model_config": dict(model_config or {}),
        "sra_fast_version": __version__,
    }
    path = ckpt_path(run_dir, step)
    try:
        atomic_torch_save(ckpt, path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"steps": int(step), "epoch": int(epoch), "data_position": data_position,
             "config": config}, indent=1))
    except (OSError, RuntimeError) as e:
        # disk full, quota, permissions: say so in one line, keep the rest (torch.save
        # reports a failed write as a RuntimeError of its stream writer)
        complete, _ = list_checkpoints(path.parent)
        newest = next((c for c in complete if c != path), None)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [repr(e)])[0]
        raise CheckpointError(f"could not write checkpoint {path}: {why}. The "
                              f"newest complete checkpoint is {newest or '(none)'}") from e
    if keep > 0:   # the newest `keep` by step, never the one just written
        complete, _ = list_checkpoints(path.parent)
        for old in [c for c in complete if c != path][keep - 1:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def is_released(ckpt: dict) -> bool:
    """A checkpoint written by the released SRA/REPA/SiT/DiT code (not by sra-fast)."""
    return "sra_fast_version" not in ckpt


def released_args(ckpt: dict) -> dict:
    a = ckpt.get("args")
    if isinstance(a, argparse.Namespace):
        return vars(a)
    return dict(a) if isinstance(a, dict) else {}


def find_resume_checkpoint(resume: str | None, run_dir) -> tuple[list[Path], str]:
    """Candidate checkpoints to resume from, newest first, and a note for the log.

    resume None: none. "auto": the run folder's complete checkpoints (none: start fresh,
    with a warning naming partial files if that is all there is). A path: that file, or the
    newest complete checkpoint in that folder (or its checkpoints/); an error if none.
    """
    if resume is None:
        return [], ""
    if resume == "auto":
        complete, partial = list_checkpoints(ckpt_dir(run_dir))
        if complete:
            return complete, ""
        if partial:
            return [], (f"warning: {ckpt_dir(run_dir)} holds only partial checkpoints "
                        f"({', '.join(p.name for p in partial[:3])}); starting from scratch")
        return [], f"no checkpoint in {ckpt_dir(run_dir)}; starting from scratch"
    p = Path(resume)
    if p.is_file():
        return [p], ""
    if p.is_dir():
        for folder in (p, p / "checkpoints"):
            complete, partial = list_checkpoints(folder)
            if complete:
                return complete, ""
        _, partial = list_checkpoints(p)
        _, partial2 = list_checkpoints(p / "checkpoints")
        partial = partial + partial2
        if partial:
            raise CheckpointError(f"--resume {p}: only partial checkpoints "
                                  f"({', '.join(x.name for x in partial[:3])}), none complete")
        raise CheckpointError(f"--resume {p}: no checkpoint (NNNNNNN.pt) in this folder")
    raise CheckpointError(f"--resume {p}: no such file or folder")


def optimizer_state_released_layout(opt_sd: dict, model) -> dict:
    """Our optimizer state (one group over the trainable parameters) re-indexed the way the
    released code's AdamW over model.parameters() numbers it: frozen parameters (pos_embed)
    get an index and no state. A state dict of another shape is returned unchanged."""
    groups = opt_sd.get("param_groups", [])
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(groups) != 1 or len(groups[0]["params"]) != len(trainable) \
            or len(trainable) == len(names):
        return opt_sd
    at = {n: i for i, n in enumerate(names)}
    src = groups[0]["params"]
    state = {at[n]: opt_sd["state"][pid] for pid, n in zip(src, trainable)
             if pid in opt_sd["state"]}
    g = {k: v for k, v in groups[0].items() if k != "params"}
    g["params"] = list(range(len(names)))
    return {"state": state, "param_groups": [g]}


def adapt_released_optimizer(opt_sd: dict, ckpt_model_sd: dict, model) -> dict | None:
    """Re-index a released AdamW state dict onto our trainable-parameter list.

    The released code builds AdamW over model.parameters(), which includes the frozen
    pos_embed; our optimizer holds only trainable parameters. Parameter order follows the
    saving model's state-dict order. Returns None when the state cannot be matched safely.
    """
    groups = opt_sd.get("param_groups", [])
    if len(groups) != 1:
        return None
    src_params = groups[0]["params"]
    names = list(ckpt_model_sd.keys())
    if len(src_params) != len(names):
        return None
    own = dict(model.named_parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    new_index = {n: i for i, n in enumerate(trainable)}
    state = {}
    for pid, name in zip(src_params, names):
        st = opt_sd["state"].get(pid)
        if name not in own:
            return None
        if name not in new_index:
            continue   # frozen (pos_embed): no optimizer state needed
        if st is not None:
            if "exp_avg" in st and tuple(st["exp_avg"].shape) != tuple(own[name].shape):
                return None
            state[new_index[name]] = st
    g = {k: v for k, v in groups[0].items() if k != "params"}
    g["params"] = list(range(len(trainable)))
    return {"state": state, "param_groups": [g]}


def read_checkpoint(path, trust: bool = False) -> dict:
    return load_checkpoint(path, trust=trust, map_location="cpu")
