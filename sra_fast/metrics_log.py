"""Metrics: a JSONL file always, TensorBoard when it is installed, and the MFU estimate.

One JSON object per line ({"step": ..., "loss": ..., ...}); appending keeps a resumed run's
history in one file. A run that starts at step S (resumed, or fresh) first drops the records
after S: they belong to a run that died before its next checkpoint, and the steps are about
to be trained again. Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

def progress_bar(*args, **kw):
    """tqdm, redrawn at most once a minute when stderr is no terminal: a batch job's log file
    keeps every redraw (tqdm's default is ten a second)."""
    from tqdm import tqdm
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 60.0)
    return tqdm(*args, **kw)


# Dense peak TFLOP/s of common accelerators (datasheets: tensor cores, no sparsity) by
# precision; fp32 is TF32 on tensor cores, fp32-ieee the plain fp32 rate (--no-tf32).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "fp32-ieee": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "fp32-ieee": 66.9},   # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "fp32-ieee": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0, "fp32-ieee": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5, "fp32-ieee": 31.2},
}


def peak_tflops(device: torch.device, precision: str, override: float | None = None,
                tf32: bool = True):
    """Peak TFLOP/s of `device` for `precision` (fp32: with TF32 matmuls or without), or None
    when unknown (CPU, other GPUs)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    if precision == "fp32" and not tf32:
        precision = "fp32-ieee"
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return table[precision] * 756 / 989.4
            return table[precision]
    return None


def flops_per_image(model, cfg) -> float | None:
    """Training FLOPs per image of one SRA step, from sra_fast.flops when it exists."""
    try:
        from . import flops as _flops
    except ImportError:
        return None
    fn = getattr(_flops, "sra_step_flops_per_image", None)
    if fn is None:
        return None
    for args in ((model, cfg.block_out_s, cfg.block_out_t), (cfg.model, cfg.block_out_s,
                                                              cfg.block_out_t)):
        try:
            v = fn(*args)
            return float(v) if v else None
        except Exception:
            continue
    return None


class MetricsLogger:
    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True,
                 start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_after(start_step)
        self._fh = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard hides the lost run's events from that step on
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
            except Exception:   # tensorboard not installed: JSONL only
                self.tb = None

    def _drop_after(self, step: int):
        """Rewrite the file (atomically) without records after `step` or torn lines."""
        if not self.path.is_file():
            return
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
                ok = not (isinstance(rec, dict) and int(rec.get("step", 0)) > step)
            except (ValueError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(self.path)

    def log(self, step: int, **values):
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)   # JSON has no NaN/inf
            rec[k] = v
        self._fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def event(self, step: int, event: str, **info):
        """A non-metric record (resume, stop, checkpoint) in the same file."""
        self.log(step, event=event, **info)

    def close(self):
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
