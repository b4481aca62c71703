"""Reading released SRA/REPA/SiT/DiT checkpoints and loading their state dicts.

Released `.pt` files are pickled dicts {model, ema, opt, args (argparse.Namespace), steps,
epoch}. torch >= 2.6 loads with weights_only=True by default, which refuses the Namespace;
we allow exactly the globals such files hold instead of unpickling arbitrary code. Anything
else is refused with a message unless the caller passes trust=True.
"""
from __future__ import annotations

import argparse
import pathlib
from collections import OrderedDict

import torch

# Globals that released checkpoints hold besides tensors and plain containers.
ALLOWED_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, OrderedDict]


class CheckpointError(ValueError):
    pass


def _load(path, map_location, weights_only):
    # memory-mapped: the file's tensors are paged in as load_state_dict copies them, so the
    # ranks of a node resuming together share one copy in the page cache instead of holding
    # one each (SiT-XL/2 with optimizer state: ~11 GB per rank). Files in the old (non-zip)
    # format cannot be mapped: read whole.
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only,
                          mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (its weights-only errors open with a
    paragraph of advice; the unpickler's own words come after 'WeightsUnpickler error:')."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        tail = [ln.strip() for ln in msg.split("WeightsUnpickler error:", 1)[1].splitlines()]
        msg = next((ln for ln in tail if ln), msg)
    return msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__


def load_checkpoint(path, trust: bool = False, map_location="cpu") -> dict:
    """Load a checkpoint file to CPU memory (never to the GPU it was saved from)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if trust:
        return _a_dict(_load(path, map_location, weights_only=False), path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ck = _load(path, map_location, weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):   # (not a damaged file)
            raise CheckpointError(
                f"{path}: refusing to unpickle an object outside the allow-list "
                f"({_reason(e)}). Only load files you trust; to do so, pass "
                "trust=True (--trust-checkpoint).") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(e)})") \
            from None
    return _a_dict(ck, path)


def _a_dict(ck, path) -> dict:
    """Every checkpoint (ours, released, a bare state dict) is a dict; torch.save of a bare
    tensor or list loads fine but is none of them."""
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: holds a {type(ck).__name__}, not a checkpoint (a dict "
                              "of state dicts or a state dict)")
    return ck


def state_dict_from(ckpt: dict, which: str = "ema") -> dict:
    """Pick the model state dict out of a checkpoint dict (or accept a bare state dict)."""
    if which in ckpt and isinstance(ckpt[which], dict):
        sd = ckpt[which]
    elif all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt
    else:
        raise CheckpointError(f"checkpoint has no {which!r} entry; it has {sorted(ckpt)}")
    # DDP / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _mismatch_hints(own: dict, sd: dict) -> str:
    """What a key or shape mismatch most likely means, for the ones a setting explains."""
    hints = []
    has_qk = any(".attn.q_norm." in k for k in sd)
    if has_qk != any(".attn.q_norm." in k for k in own):
        hints.append("the checkpoint was trained with qk_norm: build the model with it "
                     "(--qk-norm)" if has_qk else "this model has qk_norm and the checkpoint "
                     "does not: build it without (no --qk-norm)")
    key = "y_embedder.embedding_table.weight"
    if key in sd and key in own and sd[key].ndim == 2 and own[key].ndim == 2:
        rows, ours = sd[key].shape[0], own[key].shape[0]
        if rows == ours + 1:
            hints.append(f"the checkpoint's label table has {rows} rows, the classes plus the "
                         "null class that label dropout uses (every released REPA/SRA/DiT "
                         "checkpoint has it); this model was built with class dropout 0: use "
                         "--cfg-prob > 0 (released: 0.1)")
        elif rows + 1 == ours:
            hints.append(f"the checkpoint's label table has {rows} rows, no null-class row "
                         "(trained with class dropout 0): build the model with --cfg-prob 0")
    key = "final_layer.linear.weight"
    if key in sd and key in own and sd[key].shape[0] == 2 * own[key].shape[0]:
        hints.append("the checkpoint predicts twice the channels (learn_sigma: an original "
                     "SiT/DiT checkpoint), which this model does not")
    return ("; likely: " + "; ".join(hints)) if hints else ""


def load_model_state(model: torch.nn.Module, sd: dict, init_missing_head: bool = False) -> list:
    """Load a released state dict with strict key and shape checks.

    A state dict without SRA's projector head (plain SiT/DiT/REPA checkpoints) loads only with
    init_missing_head=True, keeping the head freshly initialised. Returns the keys that were
    left initialised. Any other mismatch raises CheckpointError naming the keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # REPA checkpoints carry REPA's projectors: not part of an SRA model
    unexpected = [k for k in unexpected if not k.startswith("projectors.")]
    head_missing = [k for k in missing if k.startswith("ap_head.")]
    other_missing = [k for k in missing if not k.startswith("ap_head.")]
    if other_missing or unexpected:
        raise CheckpointError(
            "state dict does not match this model "
            f"({type(model).__name__}, depth {getattr(model, 'depth', '?')}, width "
            f"{getattr(model, 'hidden_size', '?')}): missing {other_missing[:6]}"
            f"{'...' if len(other_missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}{_mismatch_hints(own, sd)}")
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise CheckpointError("state dict shapes do not match this model (another model size, "
                              "patch size, input size or class count?): " + "; ".join(bad[:4])
                              + _mismatch_hints(own, sd))
    if head_missing and not init_missing_head:
        raise CheckpointError("state dict has no SRA projector head (ap_head.*): it is a plain "
                              "SiT/DiT/REPA checkpoint. Pass init_missing_head=True "
                              "(--init-missing-head) to start the head from scratch.")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=not head_missing)
    if head_missing:
        print(f"[sra-fast] checkpoint has no projector head: {len(head_missing)} ap_head "
              "tensors keep their fresh initialisation")
    return head_missing
