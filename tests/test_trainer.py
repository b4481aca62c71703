"""The trainer: config and flags, what a run leaves behind, logging without per-step syncs,
non-finite handling, run-folder and checkpoint errors, released checkpoints."""
import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sra_fast.checkpoint import CheckpointError
from sra_fast.config import TrainConfig, build_parser, parse_config
from sra_fast.objective import released_weight_schedule
from sra_fast.data import DigitsDataset
from sra_fast.distributed import DistEnv
from sra_fast.metrics_log import read_metrics
from sra_fast.step import TrainStep
from sra_fast.trainer import RunError, Trainer, TrainingStopped
from trainer_fixtures import make_released_latents, restore_backends, tiny_latent_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("restore_backends")


class SmallDigits(DigitsDataset):
    """The first n digits: small epochs for short tests."""

    def __init__(self, n=64):
        super().__init__()
        self.x, self.y, self.labels = self.x[:n], self.y[:n], self.labels[:n]


def digits_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "runs"), batch_size=16, max_steps=4, log_every=2,
                ckpt_every=100, sample_every=0, sample_num_steps=2, kernels="ref", threads=1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------ config
def test_flags_are_kebab_case_and_released_names_work(tmp_path):
    cfg = parse_config(["--model", "SiT-XL/2", "--block-out-s", "8", "--block-out-t", "20",
                        "--t-max", "0.2", "--loss-type", "cos", "--align-weight", "0.5",
                        "--batch-size", "32", "--grad-accum", "2", "--lr", "1e-4",
                        "--ema-decay", "0.9999", "--max-steps", "10", "--epochs", "3",
                        "--precision", "bf16", "--data-dir", str(tmp_path), "--out-dir", "o",
                        "--exp-name", "e", "--seed", "3", "--ckpt-every", "5",
                        "--sample-every", "5", "--resume", "auto", "--kernels", "ref",
                        "--attn", "math", "--num-workers", "2"])
    assert (cfg.model, cfg.block_out_s, cfg.block_out_t, cfg.grad_accum, cfg.resume,
            cfg.attn) == ("SiT-XL/2", 8, 20, 2, "auto", "math")
    rel = parse_config(["--learning-rate", "3e-4", "--mixed-precision", "no",
                        "--max-train-steps", "7", "--sample-steps", "500"]).resolve()
    assert (rel.lr, rel.precision, rel.max_steps) == (3e-4, "fp32", 7)
    assert rel.sample_every == 500   # the released --sample-steps: how often grids are drawn
    assert rel.sample_num_steps == 30   # (the grid sampler's steps are --sample-num-steps)


def test_released_spellings_that_mean_something_else_here_are_refused(capsys):
    """The released --gradient-accumulation-steps K takes K whole --batch-size batches per
    step; our --grad-accum splits --batch-size. Accepting it as an alias would silently train
    with a K times smaller batch."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--batch-size", "64", "--gradient-accumulation-steps", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size <B*4> --grad-accum 4" in err


def test_the_weight_follows_the_loss_as_in_the_released_code():
    """auto: constant --align-weight for the cosine losses; the released smooth-L1 decay of
    the model kind for the others (SiT prefactor 2, DiT 0.4), 512px form at 512px; DiT's
    default loss is smooth-L1, the released DiT-SRA's only one."""
    sit = TrainConfig(data_dir="x").resolve()
    assert (sit.loss_type, sit.weight_schedule, sit.align_weight) == ("cos", "constant", 0.5)
    assert TrainConfig(data_dir="x", loss_type="cos-released").resolve().weight_schedule == \
        "constant"
    assert TrainConfig(data_dir="x", model="DiT-XL/2", loss_type="sml1").resolve().loss_type \
        == "smooth-l1"   # the released DiT-SRA spelling
    dit = TrainConfig(data_dir="x", model="DiT-XL/2").resolve()
    assert (dit.loss_type, dit.weight_schedule) == ("smooth-l1", "auto")   # res: from the data
    with pytest.raises(ValueError, match="--align-weight 1.0 has no effect"):
        TrainConfig(data_dir="x", loss_type="smooth-l1", align_weight=1.0).resolve()
    TrainConfig(data_dir="x", loss_type="smooth-l1", align_weight=1.0,
                weight_schedule="constant").resolve()
    assert released_weight_schedule("smooth-l1", "sit", 256) == "smooth-l1-decay-sit-256"
    assert released_weight_schedule("l2", "sit", 512) == "smooth-l1-decay-sit-512"
    assert released_weight_schedule("smooth-l1", "dit", 256) == "smooth-l1-decay-dit-256"
    assert released_weight_schedule("cos", "dit", 512) == "constant"


def test_a_dit_run_settles_auto_on_the_released_dit_decay(tmp_path):
    tr = Trainer(digits_cfg(tmp_path, model="DiT-T/2"), dataset=SmallDigits(), quiet=True)
    assert (tr.cfg.loss_type, tr.cfg.weight_schedule) == ("smooth-l1", "smooth-l1-decay-dit-256")
    saved = json.loads((tr.run_dir / "config.json").read_text())
    assert saved["weight_schedule"] == "smooth-l1-decay-dit-256"   # a concrete run identity
    help_text = build_parser().format_help()
    for flag in ("--block-out-s", "--t-max", "--ema-decay", "--resume", "--kernels"):
        assert flag in help_text


def test_presets_and_validation():
    d = TrainConfig().resolve()
    assert d.preset == "digits" and d.model == "SiT-T/2" and (d.block_out_s, d.block_out_t) == (2, 4)
    lat = TrainConfig(data_dir="x").resolve()
    assert (lat.model, lat.block_out_s, lat.block_out_t, lat.batch_size, lat.ema_decay) == \
        ("SiT-XL/2", 8, 20, 32, 0.9999)
    assert TrainConfig(data_dir="x", model="DiT-XL/2").resolve().block_out_t == 16
    with pytest.raises(ValueError, match="block-out-t 30 is outside 1..28"):
        TrainConfig(data_dir="x", block_out_t=30).resolve()
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig(model="SiT-Q/2").resolve()
    for clip in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--grad-clip must be > 0"):
            TrainConfig(grad_clip=clip).resolve()
    assert TrainConfig(grad_clip=float("inf")).resolve().grad_clip == float("inf")


def test_config_file_with_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"lr": 0.01, "seed": 5}))
    cfg = parse_config(["--config", str(p), "--seed", "9"])
    assert cfg.lr == 0.01 and cfg.seed == 9


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=-1.0), "--lr must be a finite number > 0"),
    (dict(lr=float("nan")), "--lr must be a finite number > 0"),
    (dict(adam_beta1=1.5), "--adam-beta1 must be in [0, 1)"),
    (dict(adam_eps=-1.0), "--adam-eps must be a finite number > 0"),
    (dict(weight_decay=-1.0), "--weight-decay must be a finite number >= 0"),
    (dict(ema_decay=2.0), "--ema-decay must be in [0, 1]"),
    (dict(align_weight=float("nan")), "--align-weight must be a finite number >= 0"),
    (dict(global_batch_size=0), "--global-batch-size must be >= 1"),
    (dict(max_steps=-5), "--max-steps must be >= 1"),
    (dict(epochs=-1), "--epochs must be >= 1"),
    (dict(threads=-2), "--threads must be >= 1"),
    (dict(num_workers=-1), "--num-workers must be >= 0"),
    (dict(lr_warmup_steps=-1), "--lr-warmup-steps must be >= 0"),
    (dict(keep_ckpts=-1), "--keep-ckpts must be >= 0"),
    (dict(peak_tflops=-1.0), "--peak-tflops must be a finite number > 0"),
    (dict(exp_name=""), "--exp-name must be a folder name"),
    (dict(sample_num_steps=0), "--sample-num-steps must be >= 1"),
    (dict(sample_cfg_scale=float("nan")),
     "the sample grids (--sample-*): cfg_scale must be a finite number"),
    (dict(cfg_prob=0.0, sample_cfg_scale=4.0), "needs the null class"),
])
def test_nonsense_values_are_refused_before_training(kw, msg):
    """Each of these trained garbage, exited 0 with nothing done, or failed deep inside
    (some only at the first sample grid, thousands of steps in)."""
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw).resolve()
    assert msg in str(e.value)


def test_no_null_class_means_unguided_grids():
    assert TrainConfig(cfg_prob=0.0).resolve().sample_cfg_scale == 1.0


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = {"missing": None, "json": "{lr: 1", "list": "[1, 2]", "type": '{"lr": "fast"}'}
    for name, text in bad.items():
        p = tmp_path / f"{name}.json"
        if text is not None:
            p.write_text(text)
        with pytest.raises(SystemExit) as e:
            parse_config(["--config", str(p)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--config {p}" in err, err
    assert "lr must be float, got 'fast'" in err


def test_a_command_line_flag_equal_to_its_default_still_overrides_the_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"t_max": 0.5, "seed": 5, "lr": 0.01, "sample_steps": 7}))
    cfg = parse_config(["--config", str(p), "--t-max", "0.2", "--seed", "0"])
    assert (cfg.t_max, cfg.seed, cfg.lr) == (0.2, 0, 0.01)
    assert cfg.sample_num_steps == 7   # an earlier version's key, renamed


def test_setup_errors_are_one_line_exit_2(tmp_path, capsys):
    from sra_fast.ops.attention import flash_attn_available
    from sra_fast.trainer import main
    (tmp_path / "f").write_text("a file")
    cases = [(["--out-dir", str(tmp_path / "f")], "cannot make the run folder")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    if not flash_attn_available():
        cases.append((["--attn", "flash_attn"], "flash_attn"))
    for argv, msg in cases:
        assert main(argv + ["--max-steps", "1", "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_ctrl_c_is_one_line_naming_the_newest_checkpoint(tmp_path, monkeypatch, capsys):
    from sra_fast import trainer as T
    real = T.Trainer.train

    def train_then_ctrl_c(self):
        real(self)
        raise KeyboardInterrupt
    monkeypatch.setattr(T.Trainer, "train", train_then_ctrl_c)
    argv = ["--out-dir", str(tmp_path), "--max-steps", "2", "--ckpt-every", "2",
            "--sample-every", "0", "--batch-size", "16", "--threads", "1"]
    assert T.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("[sra-fast] interrupted (Ctrl-C): no checkpoint written; the newest "
                       f"complete one is {tmp_path / 'digits' / 'checkpoints' / '0000002.pt'}")

    def ctrl_c_while_setting_up(self, *a, **k):   # no run folder opened yet: none named
        raise KeyboardInterrupt
    monkeypatch.setattr(T.Trainer, "__init__", ctrl_c_while_setting_up)
    assert T.main(argv + ["--exp-name", "other"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "[sra-fast] interrupted (Ctrl-C) while setting up: nothing written"


def test_a_grid_that_cannot_be_written_costs_the_grid_not_the_run(tmp_path, monkeypatch,
                                                                    capsys):
    from PIL import Image

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    tr = Trainer(digits_cfg(tmp_path, max_steps=4, ckpt_every=4, sample_every=2),
                 dataset=SmallDigits(64))
    tr.train()
    assert tr.step == 4 and (tr.run_dir / "checkpoints" / "0000004.pt").exists()
    err = capsys.readouterr().err
    assert "no sample grid at step 2: could not write it (No space left on device)" in err


# ------------------------------------------------------------------------ a short run
def test_short_digits_run_leaves_checkpoint_metrics_and_grid(tmp_path):
    cfg = digits_cfg(tmp_path, max_steps=6, ckpt_every=3, sample_every=3)
    tr = Trainer(cfg, dataset=SmallDigits(64), quiet=True)
    out = tr.train()
    run = tmp_path / "runs" / "digits"
    assert out["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000003.pt",
                                                                          "0000006.pt"]
    assert (run / "checkpoints" / "0000006.json").is_file()
    assert (run / "samples" / "step-0000003.png").is_file() and (run / "samples.png").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == "SiT-T/2" and saved["block_out_s"] == 2
    recs = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in recs] == [2, 3, 4, 6]   # 3: the checkpoint's open window
    for r in recs:
        assert np.isfinite(r["loss"]) and r["align_loss"] >= 0 and r["img_per_s"] > 0
        assert r["lr"] > 0 and r["grad_norm"] > 0
    ck = torch.load(run / "checkpoints" / "0000006.pt", weights_only=True)
    for k in ("model", "ema", "opt", "args", "steps", "epoch", "data_position", "rng",
              "config", "sra_fast_version"):
        assert k in ck
    assert isinstance(ck["args"], dict) and ck["steps"] == 6
    assert ck["data_position"] == {"epoch": 1, "batch": 2, "steps_per_epoch": 4,
                                   "global_batch": 16, "num_items": 64, "seed": 0,
                                   "world_size": 1}
    # the EMA moved, the teacher stayed in eval mode
    assert not torch.equal(ck["ema"]["blocks.0.attn.qkv.weight"],
                           ck["model"]["blocks.0.attn.qkv.weight"])
    assert not tr.ema.training
    # TensorBoard (a test dependency): the same losses as metrics.jsonl, under train/
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/align_loss", "train/lr"} <= set(acc.Tags()["scalars"])
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == [2, 3, 4, 6]
    np.testing.assert_allclose([v for _, v in tb_loss], [r["loss"] for r in recs], rtol=1e-6)


def test_losses_are_read_only_every_log_every_steps(tmp_path, monkeypatch):
    calls = []
    orig = TrainStep.read_stats

    def counting(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(TrainStep, "read_stats", counting)
    tr = Trainer(digits_cfg(tmp_path, max_steps=8, log_every=4), dataset=SmallDigits(64),
                 quiet=True)
    tr.sample_grid = lambda *a, **k: None
    tr.train()
    assert len(calls) == 2


def test_logged_throughput_leaves_out_checkpoints_and_grids(tmp_path, monkeypatch):
    """img/s and MFU describe training: a slow checkpoint or grid between two log points
    does not drag the next window down."""
    import sra_fast.trainer as T
    real_write = T.save_training_checkpoint

    def slow_write(*a, **k):                        # a slow file system
        time.sleep(1.0)
        return real_write(*a, **k)
    monkeypatch.setattr(T, "save_training_checkpoint", slow_write)
    tr = Trainer(digits_cfg(tmp_path, max_steps=6, log_every=2, ckpt_every=2, sample_every=2),
                 dataset=SmallDigits(64), quiet=True)
    tr._write_grid = lambda *a, **k: time.sleep(1.0)
    tr.train()
    recs = [r for r in read_metrics(tmp_path / "runs" / "digits") if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4, 6]
    # a step of this model takes milliseconds; with the 2 s of each pause counted, the
    # windows after a pause would take >= 1 s per step
    assert all(r["sec_per_step"] < 0.5 for r in recs[1:]), recs


def test_nonfinite_losses_skip_updates_then_stop_with_good_checkpoint(tmp_path):
    ds = SmallDigits(64)
    cfg = digits_cfg(tmp_path, max_steps=40, ckpt_every=2, log_every=2, max_nonfinite=3)
    tr = Trainer(cfg, dataset=ds, quiet=True)
    tr.sample_grid = lambda *a, **k: None
    orig = tr.one_step
    state = {}

    def poisoned(x, y, w):
        if tr.step >= 2:   # from the third step on, every batch holds a NaN
            if "w" not in state:
                state["w"] = {k: v.clone() for k, v in tr.model.state_dict().items()}
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return orig(x, y, w)

    tr.one_step = poisoned
    good = tmp_path / "runs" / "digits" / "checkpoints" / "0000002.pt"
    with pytest.raises(TrainingStopped, match=r"\d+ consecutive non-finite losses") as e:
        tr.train()
    assert "0000002.pt" in str(e.value)
    ckpts = sorted(p.name for p in good.parent.glob("*.pt"))
    assert ckpts == ["0000002.pt"]            # nothing written after the losses went bad
    for k, v in tr.model.state_dict().items():   # every bad update was skipped
        assert torch.equal(v, state["w"][k]), k
    recs = [r for r in read_metrics(tmp_path / "runs" / "digits") if "nonfinite" in r]
    assert recs[-1]["nonfinite"] == 2 and recs[-1]["loss"] is None
    assert recs[-1]["nonfinite_total"] >= 3


# ------------------------------------------------------------------------ bad input
def test_out_dir_with_another_runs_config(tmp_path):
    Trainer(digits_cfg(tmp_path), dataset=SmallDigits(64), quiet=True)
    with pytest.raises(RunError, match=r"holds another run \(config differs in lr"):
        Trainer(digits_cfg(tmp_path, lr=0.5), dataset=SmallDigits(64), quiet=True)
    # runtime-only differences (steps, logging) are the same run
    Trainer(digits_cfg(tmp_path, max_steps=99, log_every=7), dataset=SmallDigits(64),
            quiet=True)


def test_existing_checkpoints_need_resume(tmp_path):
    tr = Trainer(digits_cfg(tmp_path, max_steps=2, ckpt_every=2), dataset=SmallDigits(64),
                 quiet=True)
    tr.sample_grid = lambda *a, **k: None
    tr.train()
    with pytest.raises(RunError, match="already has checkpoints .*--resume auto"):
        Trainer(digits_cfg(tmp_path, max_steps=4), dataset=SmallDigits(64), quiet=True)


def test_global_batch_must_divide_across_ranks(tmp_path):
    env = DistEnv(rank=0, world_size=3)   # the check runs before any collective
    with pytest.raises(RunError, match="--global-batch-size 16 does not divide across 3"):
        Trainer(digits_cfg(tmp_path, global_batch_size=16), env=env, dataset=SmallDigits(64),
                quiet=True)
    with pytest.raises(RunError, match="does not split into --grad-accum 3"):
        Trainer(digits_cfg(tmp_path, grad_accum=3), dataset=SmallDigits(64), quiet=True)


def test_checkpoint_from_another_model_size(tmp_path):
    data = make_released_latents(tmp_path / "d", n=16)
    tr = Trainer(tiny_latent_config(tmp_path / "r", data, max_steps=2, ckpt_every=2), quiet=True)
    tr.train()
    ck = tmp_path / "r" / "run" / "checkpoints" / "0000002.pt"
    # ours names the model it holds (a bare or released state dict of another size gets the
    # shape list: tests/test_checkpoint.py)
    with pytest.raises(RunError, match="is a SiT-T/2 checkpoint, but this run builds SiT-T/4: "
                                       "pass --model SiT-T/2"):
        Trainer(tiny_latent_config(tmp_path / "r2", data, model="SiT-T/4", resume=str(ck)),
                quiet=True)
    with pytest.raises(CheckpointError, match="only partial checkpoints"):
        part = tmp_path / "partial"
        part.mkdir()
        (part / "0000005.pt.tmp-123").write_bytes(b"x")
        Trainer(tiny_latent_config(tmp_path / "r3", data, resume=str(part)), quiet=True)


def _released_checkpoint(tmp_path, data):
    """A checkpoint as the released SiT-SRA train.py writes it: AdamW over
    model.parameters() (pos_embed included), args as an argparse.Namespace, 1000 classes
    (the released --num-classes; the released-layout data defaults to it too)."""
    from sra_fast.config import build_model
    torch.manual_seed(1)
    m = build_model("SiT-T/2", input_size=8, in_channels=4, num_classes=1000)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    loss = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])).square().mean()
    loss.backward()
    opt.step()
    ema = {k: v.clone() + 0.01 for k, v in m.state_dict().items()}
    path = tmp_path / "released.pt"
    torch.save({"model": m.state_dict(), "ema": ema, "opt": opt.state_dict(),
                "args": argparse.Namespace(model="SiT-T/2", resolution=64, num_classes=1000),
                "epoch": 2, "steps": 11}, path)
    return path, m, opt


def test_resume_from_released_checkpoint_with_optimizer(tmp_path):
    data = make_released_latents(tmp_path / "d", n=16)
    path, m, opt = _released_checkpoint(tmp_path, data)
    tr = Trainer(tiny_latent_config(tmp_path / "r", data, resume=str(path), max_steps=12),
                 quiet=True)
    assert (tr.step, tr.epoch, tr.pos) == (11, 2, 0)
    for k, v in m.state_dict().items():
        assert torch.equal(tr.model.state_dict()[k], v)
    named = dict(m.named_parameters())
    st = tr.opt.state[dict(tr.model.named_parameters())["blocks.0.mlp.fc1.weight"]]
    assert torch.equal(st["exp_avg"], opt.state[named["blocks.0.mlp.fc1.weight"]]["exp_avg"])
    assert all(g.get("fused") for g in tr.opt.param_groups)   # our step's flags survive
    tr.train()
    assert tr.step == 12


def test_init_from_released_checkpoint(tmp_path):
    data = make_released_latents(tmp_path / "d", n=16)
    path, m, _ = _released_checkpoint(tmp_path, data)
    tr = Trainer(tiny_latent_config(tmp_path / "r", data, init_from=str(path)), quiet=True)
    assert tr.step == 0 and len(tr.opt.state) == 0
    assert torch.equal(tr.model.state_dict()["final_layer.linear.weight"],
                       m.state_dict()["final_layer.linear.weight"])
    assert torch.allclose(tr.ema.state_dict()["final_layer.linear.weight"],
                          m.state_dict()["final_layer.linear.weight"] + 0.01)


def test_mfu_is_logged_when_flops_and_peak_are_known(tmp_path):
    tr = Trainer(digits_cfg(tmp_path, max_steps=2, peak_tflops=1.0), dataset=SmallDigits(64),
                 quiet=True)
    tr.sample_grid = lambda *a, **k: None
    tr.train()
    recs = [r for r in read_metrics(tmp_path / "runs" / "digits") if "loss" in r]
    if tr._flops is None:
        pytest.skip("sra_fast.flops is not available")
    assert 0 < recs[-1]["mfu"] < 1


def test_the_mfu_peak_follows_the_card_the_precision_and_tf32(monkeypatch):
    """Datasheet peaks by card name; fp32 is TF32's rate unless --no-tf32 turned it off (MFU
    would otherwise be understated ~7x); a PCIe H100 scales down; unknown cards and the CPU:
    None; --peak-tflops wins."""
    from sra_fast.metrics_log import peak_tflops
    cuda = torch.device("cuda", 0)
    name = {"n": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name["n"])
    assert peak_tflops(cuda, "bf16") == 989.4
    assert peak_tflops(cuda, "fp32") == 494.7
    assert peak_tflops(cuda, "fp32", tf32=False) == 66.9
    assert peak_tflops(cuda, "bf16", tf32=False) == 989.4   # no effect on bf16
    assert peak_tflops(cuda, "fp32", override=123.0, tf32=False) == 123.0
    name["n"] = "NVIDIA H100 PCIe"
    assert peak_tflops(cuda, "fp32", tf32=False) == pytest.approx(66.9 * 756 / 989.4)
    name["n"] = "Some Other GPU"
    assert peak_tflops(cuda, "bf16") is None
    assert peak_tflops(torch.device("cpu"), "bf16") is None


def test_one_pass_adamw_ema_from_the_command_line(tmp_path):
    """--ema-impl adamw reaches the step; a short digits run matches the default update to
    fp32 rounding (the extension's AdamW arithmetic is torch's CUDA kernel's)."""
    from sra_fast import ext
    assert parse_config(["--ema-impl", "adamw"]).ema_impl == "adamw"
    with pytest.raises(SystemExit):
        parse_config(["--ema-impl", "sgd"])
    if ext.load(jit=True) is None:
        pytest.skip(f"extension unavailable: {ext.unavailable_reason()}")
    out = []
    for impl in ("foreach", "adamw"):
        tr = Trainer(digits_cfg(tmp_path / impl, ema_impl=impl, max_steps=3), quiet=True,
                     dataset=SmallDigits(48))
        tr.train()
        assert tr.train_step.ema_impl == impl
        out.append([p.detach().clone() for p in list(tr.model.parameters())
                    + list(tr.ema.parameters())])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*out))


def test_a_sample_grid_out_of_gpu_memory_costs_the_grid_not_the_run(tmp_path, monkeypatch,
                                                                     capsys):
    """The grid is drawn on top of the training state (and a captured step's pool): running
    out of GPU memory there warns and skips that grid; training goes on."""
    import sra_fast.trainer as T

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(T, "sample", oom)
    tr = Trainer(digits_cfg(tmp_path, max_steps=4, sample_every=2, log_every=2),
                 dataset=SmallDigits(64))
    tr.train()
    assert tr.step == 4
    err = capsys.readouterr()
    assert ("[sra-fast] warning: no sample grid: out of device memory at step 2: training "
            "goes on. CUDA out of memory. Tried to allocate 2.00 GiB") in err.err
    assert not (tr.run_dir / "samples.png").exists()


def test_out_of_memory_in_a_step_is_one_line_with_what_to_change(tmp_path, monkeypatch,
                                                                 capsys):
    import sra_fast.trainer as T
    msg = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
           "79.19 GiB of which 1.06 GiB is free.\nsecond line")

    def step(self, *a):
        if self.step == 2:
            raise torch.OutOfMemoryError(msg)
    monkeypatch.setattr(T.Trainer, "one_step", step)
    rc = T.main(["--out-dir", str(tmp_path / "runs"), "--max-steps", "4", "--log-every", "1",
                 "--sample-every", "0", "--kernels", "ref", "--threads", "1", "--device", "cpu",
                 "--grad-accum", "2"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()   # the bar's lines, then the error
    assert [ln for ln in err if "error" in ln] == err[-1:] == [
        "error: out of device memory at step 3: SiT-T/2 with --batch-size 64 per process and "
        "--grad-accum 2; a larger --grad-accum (the batch in that many micro-batches) keeps "
        "the batch and needs less. CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
        "a total capacity of 79.19 GiB of which 1.06 GiB is free."]


def test_exit_status_of_a_run_stopped_by_non_finite_losses(tmp_path, monkeypatch, capsys):
    """train.py --help documents 3 for it (2: bad input; 128+N: a stop signal)."""
    import sra_fast.trainer as T

    real = T.Trainer.one_step

    def step(self, x, y, w):                        # every batch holds a NaN
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        return real(self, x, y, w)
    monkeypatch.setattr(T.Trainer, "one_step", step)
    rc = T.main(["--out-dir", str(tmp_path / "runs"), "--max-steps", "8", "--log-every", "1",
                 "--sample-every", "0", "--kernels", "ref", "--threads", "1", "--device", "cpu",
                 "--max-nonfinite", "3"])
    assert rc == 3
    assert "training stopped: 3 consecutive non-finite losses" in capsys.readouterr().err


def test_progress_bars_redraw_once_a_minute_into_a_log_file(monkeypatch):
    from sra_fast.metrics_log import progress_bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with progress_bar(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == 60.0
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with progress_bar(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == 0.1                 # tqdm's own default on a terminal


def test_too_little_disk_for_a_checkpoint_is_said_at_start_and_after_each(tmp_path, monkeypatch,
                                                                          capsys):
    import collections
    import sra_fast.trainer as T
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 4096, 4096))
    tr = Trainer(digits_cfg(tmp_path, max_steps=2, ckpt_every=2), dataset=SmallDigits(64),
                 quiet=True)
    n = sum(p.numel() for p in tr.model.parameters())      # all trained but pos_embed
    n_trained = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    need = 4 * (2 * n + 2 * n_trained) / 2 ** 30
    assert capsys.readouterr().err.strip() == (
        f"[sra-fast] warning: {tr.run_dir} has 0.00 GiB free, a checkpoint takes "
        f"~{need:.2f} GiB: make room (--keep-ckpts N keeps only the newest N)")
    tr.train()
    size = (tr.run_dir / "checkpoints" / "0000002.pt").stat().st_size / 2 ** 30
    assert (f"[sra-fast] warning: {tr.run_dir} has 0.00 GiB free, the next checkpoint takes "
            f"~{size:.2f} GiB" in capsys.readouterr().err)


def test_a_step_that_hangs_prints_every_threads_stack_and_the_run_goes_on(tmp_path, capfd):
    tr = Trainer(digits_cfg(tmp_path, max_steps=3, hang_report_min=0.4 / 60),
                 dataset=SmallDigits(64), quiet=True)
    step_once = tr.one_step

    def one_step(*a):
        if tr.step == 1:
            time.sleep(1.0)                      # 2.5 report periods without a step
        step_once(*a)
    tr.one_step = one_step
    assert tr.train()["step"] == 3
    err = capfd.readouterr().err
    # the slow step's 1 s holds two 0.4 s periods (the first step, with its set-up, may
    # take one more)
    assert err.count("Timeout (0:00:00.400000)!") >= 2 and "in one_step" in err, err[-3000:]
    time.sleep(1.0)                              # disarmed at the end: nothing more
    assert "Timeout" not in capfd.readouterr().err


def test_steady_steps_never_trigger_a_hang_report(tmp_path, capfd):
    """The report timer restarts after every step: 8 steps of 0.3 s (2.4 s in all) under a
    1 s limit print nothing."""
    tr = Trainer(digits_cfg(tmp_path, max_steps=8, hang_report_min=1.0 / 60),
                 dataset=SmallDigits(64), quiet=True)
    tr.sample_grid = lambda *a, **k: None
    step_once = tr.one_step

    def one_step(*a):
        time.sleep(0.3)
        step_once(*a)
    tr.one_step = one_step
    tr.train()
    assert "Timeout" not in capfd.readouterr().err


def test_watchdog_minutes_must_not_be_negative():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="--hang-report-min must be >= 0"):
            TrainConfig(hang_report_min=bad).resolve()
    assert TrainConfig(hang_report_min=0).resolve().hang_report_min == 0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="--hang-exit-min must be >= 0"):
            TrainConfig(hang_exit_min=bad).resolve()
    assert TrainConfig(hang_exit_min=0).resolve().hang_exit_min == 0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="--peer-lost-min must be >= 0"):
            TrainConfig(peer_lost_min=bad).resolve()
    assert TrainConfig(peer_lost_min=0).resolve().peer_lost_min == 0


# ------------------------------------------------------------------------ long runs
def test_checkpoint_off_a_log_step_logs_the_open_window(tmp_path):
    """A run resumed from a checkpoint never replays the steps before it: the open log
    window (its losses, its skipped-step count) is logged before the checkpoint is written."""
    cfg = digits_cfg(tmp_path, max_steps=4, log_every=4, ckpt_every=3)
    tr = Trainer(cfg, dataset=SmallDigits(64), quiet=True)
    tr.sample_grid = lambda *a, **k: None
    orig = tr.one_step

    def poisoned(x, y, w):
        if tr.step == 0:   # the first step's loss is not finite
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return orig(x, y, w)

    tr.one_step = poisoned
    tr.train()
    recs = [r for r in read_metrics(tmp_path / "runs" / "digits") if "nonfinite" in r]
    assert [r["step"] for r in recs] == [3, 4]
    assert [r["nonfinite_total"] for r in recs] == [1, 1]
    ck = torch.load(tmp_path / "runs" / "digits" / "checkpoints" / "0000003.pt",
                    weights_only=False)
    assert ck["nonfinite"]["total"] == 1


@pytest.mark.parametrize("locked", [True, False])
def test_stale_partial_checkpoints_are_removed_at_start(tmp_path, monkeypatch, capsys, locked):
    """Locked (sra_fast.run_lock), every partial file is a killed write's: all go, the one a
    kill just left too. Without a lock (a file system without flock), a recent one may be a
    write going on: it stays, with a warning."""
    from sra_fast import trainer as trainer_mod
    cfg = digits_cfg(tmp_path, max_steps=2, ckpt_every=2)
    tr = Trainer(cfg, dataset=SmallDigits(64), quiet=True)
    tr.sample_grid = lambda *a, **k: None
    tr.train()
    folder = tmp_path / "runs" / "digits" / "checkpoints"
    stale, fresh = folder / "0000004.pt.tmp-123", folder / "0000004.pt.tmp-456"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 10)
    old = time.time() - 2 * Trainer.STALE_PARTIAL_S
    os.utime(stale, (old, old))
    if not locked:
        monkeypatch.setattr(trainer_mod, "lock_run_folder",
                            lambda *a, **k: "warning: cannot lock (no flock)")
    capsys.readouterr()
    tr = Trainer(digits_cfg(tmp_path, max_steps=4, ckpt_every=2, resume="auto"),
                 dataset=SmallDigits(64), quiet=True)
    err = capsys.readouterr().err
    assert not stale.exists()
    assert fresh.exists() != locked
    assert (f"warning: {fresh} is being written" in err) != locked, err


def test_ranks_that_opened_different_data_refuse_to_start(tmp_path, monkeypatch):
    from sra_fast import trainer as trainer_mod
    tr = Trainer(digits_cfg(tmp_path), dataset=SmallDigits(64), quiet=True)

    class TwoRanks:
        distributed, world_size, rank, is_main = True, 2, 0, True

    def gather(mine, env):   # rank 1 opened a shorter copy of the data
        other = (mine[0], mine[1], (48,) + tuple(mine[2][1:]))
        return [mine, other]

    tr.env = TwoRanks()
    monkeypatch.setattr(trainer_mod, "all_gather_objects", gather)
    with pytest.raises(RunError, match=r"opened different data \(rank 0: 64 items.*rank 1: "
                                       r"48 items.*same --data-dir"):
        tr._agree_on_start(None)
    monkeypatch.setattr(trainer_mod, "all_gather_objects", lambda mine, env: [mine, mine])
    tr._agree_on_start(None)   # the same data: fine


def test_workers_stop_when_training_fails(tmp_path):
    """With data-loader workers (which ignore stop signals), an error in a step still ends
    the process: main() prints the traceback and returns 1, and the interpreter exits
    instead of waiting forever on the workers."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\n"
        "import sra_fast.trainer as T\n"
        "orig = T.Trainer.one_step\n"
        "def boom(self, x, y, w):\n"
        "    if self.step == 2:\n"
        "        raise RuntimeError('injected failure')\n"
        "    return orig(self, x, y, w)\n"
        "T.Trainer.one_step = boom\n"
        "sys.exit(T.main(sys.argv[1:]))\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path / "runs"),
                          "--max-steps", "6", "--batch-size", "16", "--num-workers", "2",
                          "--kernels", "ref", "--sample-every", "0", "--threads", "1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "injected failure" in res.stderr and "unexpected failure" in res.stderr
