"""The command line, exactly as a user runs it: a latent folder in the released layout ->
train.py -> checkpoints -> --resume auto -> python -m sra_fast.sample; the embedded digits
default (shortened); one-line errors for bad input."""
import json

import numpy as np
import pytest
import torch

from trainer_fixtures import REPO, make_released_latents, run_cli

TRAIN = REPO / "train.py"


@pytest.mark.timeout(400)
def test_latent_folder_train_resume_sample(tmp_path):
    data = make_released_latents(tmp_path / "imagenet-latents", n=40, num_classes=4)
    runs = tmp_path / "runs"
    common = ["--data-dir", data, "--model", "SiT-T/2", "--block-out-s", "2", "--block-out-t",
              "4", "--t-max", "0.2", "--loss-type", "cos", "--align-weight", "0.5",
              "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-4", "--precision", "fp32",
              "--out-dir", runs, "--exp-name", "e1", "--ckpt-every", "3", "--log-every", "1",
              "--sample-every", "0", "--vae", "none", "--num-workers", "1", "--kernels", "ref",
              "--seed", "1"]
    p = run_cli([TRAIN, *common, "--max-steps", "3"], cwd=tmp_path)
    assert "global batch 4 = 4 per process x 1 process(es), 2 micro-batches of 2" in p.stdout
    run = runs / "e1"
    assert (run / "checkpoints" / "0000003.pt").is_file()
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    # the same command without --resume refuses to overwrite the run
    p = run_cli([TRAIN, *common, "--max-steps", "6"], cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: {run} already has checkpoints (newest 0000003.pt); pass --resume auto to "
        "continue it, or another --exp-name for a new run"]
    p = run_cli([TRAIN, *common, "--max-steps", "6", "--resume", "auto"], cwd=tmp_path)
    assert f"resumed from {run / 'checkpoints' / '0000003.pt'}: step 3, epoch 0, batch 3/10" \
        in p.stdout
    ck = torch.load(run / "checkpoints" / "0000006.pt", weights_only=True)
    assert ck["steps"] == 6 and ck["config"]["model"] == "SiT-T/2"
    losses = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    # sampling from the checkpoint: latents out (no VAE here), settings recorded
    out = tmp_path / "samples.npz"
    p = run_cli(["-m", "sra_fast.sample", "--ckpt", run / "checkpoints" / "0000006.pt",
                 "--num-samples", "10", "--batch-size", "4", "--sampler", "sde",
                 "--num-steps", "5", "--cfg-scale", "1.5", "--guidance-high", "0.7",
                 "--vae", "none", "--out", out, "--seed", "3"], cwd=tmp_path)
    z = np.load(out)
    assert z["latents"].shape == (10, 4, 8, 8) and z["labels"].shape == (10,)
    assert np.isfinite(z["latents"]).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sampler"] == "sde" and meta["num_steps"] == 5 and meta["cfg_scale"] == 1.5
    assert meta["guidance_high"] == 0.7 and meta["seed"] == 3 and meta["t_min"] == 0.04
    import hashlib
    assert meta["checkpoint_sha256"] == hashlib.sha256(
        (run / "checkpoints" / "0000006.pt").read_bytes()).hexdigest()
    assert not out.with_name(out.name + ".parts").exists()


@pytest.mark.timeout(300)
def test_embedded_digits_default_shortened(tmp_path, monkeypatch, capsys):
    p = run_cli([TRAIN, "--max-steps", "4", "--ckpt-every", "4", "--sample-num-steps", "2",
                 "--batch-size", "16"], cwd=tmp_path)
    assert "SiT-T/2" in p.stdout and "sklearn digits" in p.stdout
    # stderr is no terminal here: plain progress lines instead of a redrawn bar
    assert "[sra-fast] step 4/4 (epoch 0): loss " in p.stdout and "ETA 0m 0s" in p.stdout
    assert "it/s" not in p.stderr and "step/s" not in p.stderr
    run = tmp_path / "runs" / "digits"
    assert (run / "checkpoints" / "0000004.pt").is_file()
    assert (run / "samples.png").is_file() and (run / "samples" / "step-0000004.png").is_file()
    from PIL import Image
    with Image.open(run / "samples.png") as im:
        assert im.size[0] > 8 * 64 and im.size[1] > 10 * 64   # 10 classes x 8, upscaled
    out = tmp_path / "d.npz"
    run_cli(["-m", "sra_fast.sample", "--ckpt", run / "checkpoints" / "0000004.pt",
             "--num-samples", "6", "--sampler", "euler", "--num-steps", "2", "--out", out,
             "--classes", "balanced"], cwd=tmp_path)
    z = np.load(out)
    assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    assert z["labels"].tolist() == [0, 1, 2, 3, 4, 5]

    # out of memory while sampling: one line; a smaller --batch-size then goes on with the
    # same --out (no batch was written)
    import sra_fast.sample as S
    real = S.sample

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.\nmore")
    args = ["--ckpt", str(run / "checkpoints" / "0000004.pt"), "--num-samples", "4",
            "--sampler", "euler", "--num-steps", "2", "--out", str(tmp_path / "e.npz"),
            "--device", "cpu"]
    monkeypatch.setattr(S, "sample", oom)
    assert S.main(args + ["--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if "error" in ln] == err[-1:] == [
        "error: out of device memory while sampling: --batch-size 4 per process; pass a "
        "smaller one. CUDA out of memory. Tried to allocate 8.00 GiB."]
    monkeypatch.setattr(S, "sample", real)
    # settings that would silently mean something else: one line each, no output
    ck = ["--ckpt", str(run / "checkpoints" / "0000004.pt"), "--num-samples", "2", "--out",
          str(tmp_path / "f.npz"), "--device", "cpu"]
    for extra, msg in ((["--sampler", "euler", "--num-steps", "0"], "--num-steps must be >= 1"),
                       (["--sampler", "sde", "--num-steps", "2", "--t-min", "0"],
                        "--t-min must be in (0, 1)")):
        assert S.main(ck + extra) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()
    assert S.main(args + ["--batch-size", "2"]) == 0
    assert np.load(tmp_path / "e.npz")["arr_0"].shape == (4, 8, 8, 3)


@pytest.mark.parametrize("case", ["missing", "empty", "bad-dtype", "labels", "size", "batch",
                                  "teacher-bf16"])
def test_bad_input_gives_one_line_errors(tmp_path, case):
    data = tmp_path / "data"
    args = ["--model", "SiT-T/2", "--batch-size", "4", "--max-steps", "1", "--kernels", "ref",
            "--vae", "none", "--out-dir", tmp_path / "runs"]
    expect = {"missing": "does not exist", "empty": "is empty",
              "bad-dtype": "latent array has dtype float64; expected float32",
              "labels": "labels are outside 0..1", "size": "implies 32x32 latents",
              "batch": "does not split into --grad-accum 3",
              "teacher-bf16": "--teacher-bf16 needs --precision bf16"}[case]
    if case == "empty":
        data.mkdir()
    elif case != "missing":
        make_released_latents(data, n=8, dtype=np.float64 if case == "bad-dtype" else np.float32)
    extra = {"labels": ["--num-classes", "2"], "size": ["--resolution", "256"],
             "batch": ["--grad-accum", "3"],
             "teacher-bf16": ["--teacher-bf16", "--precision", "fp32"]}.get(case, [])
    p = run_cli([TRAIN, "--data-dir", data, *args, *extra], cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not list((tmp_path / "runs").rglob("*.pt"))
