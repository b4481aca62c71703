"""`python -m sra_fast.sample` on bad input: one line on stderr, exit 2, nothing drawn, nothing
lost or mixed; and over several processes. Runs on a tiny pixel-space SiT checkpoint saved as
the trainer does (model, ema, model_config), so no VAE and no training are needed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sra_fast.sample as S
from sra_fast.config import build_model
from trainer_fixtures import aot_eager_compile_fn, finish_procs, srun_like_procs

WORKER = Path(__file__).resolve().parent / "sample_worker.py"

MODEL_CONFIG = dict(name="SiT-T/4", input_size=8, in_channels=1, num_classes=3,
                    class_dropout_prob=0.1, qk_norm=False, kind="sit", data_kind="images",
                    latent_scale=None)


def save_ckpt(path, seed):
    torch.manual_seed(seed)
    kw = {k: MODEL_CONFIG[k] for k in ("input_size", "in_channels", "num_classes",
                                        "class_dropout_prob", "qk_norm")}
    m = build_model(MODEL_CONFIG["name"], **kw)
    with torch.no_grad():   # the zero-initialised head would give the same samples for any seed
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save({"model": sd, "ema": sd, "model_config": dict(MODEL_CONFIG),
                "config": {"path_type": "linear"}}, path)
    return path


@pytest.fixture
def ckpt(tmp_path):
    return save_ckpt(tmp_path / "model.pt", seed=0)


def base_args(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--num-samples", "4", "--batch-size", "2", "--sampler", "euler",
            "--num-steps", "2", "--device", "cpu", "--out", str(out), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if a single batch is drawn."""
    def sample(*a, **k):
        raise AssertionError("sampling started before the bad input was reported")
    monkeypatch.setattr(S, "sample", sample)


def crash_after_first_batch(monkeypatch):
    real, calls = S.sample, []

    def sample(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt   # killed while drawing the second batch
        return real(*a, **k)
    monkeypatch.setattr(S, "sample", sample)
    return real


def crash_after_first_batch_run(monkeypatch, capsys, args):
    real = crash_after_first_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        S.main(args)
    monkeypatch.setattr(S, "sample", real)
    capsys.readouterr()   # (its progress bar)


def test_resume_refuses_parts_from_a_changed_checkpoint(tmp_path, ckpt, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    crash_after_first_batch_run(monkeypatch, capsys, base_args(ckpt, out))
    assert (parts / "part-000000.npz").is_file()
    first = np.load(parts / "part-000000.npz")["images"]

    # another checkpoint of the same model, copied over the same path: refused, parts kept
    original = ckpt.read_bytes()
    save_ckpt(ckpt, seed=1)
    assert S.main(base_args(ckpt, out)) == 2
    line = one_error_line(capsys)
    assert str(parts) in line and "checkpoint's content (SHA-256" in line
    assert "delete that folder" in line and "--out" in line
    assert not out.exists() and np.array_equal(np.load(parts / "part-000000.npz")["images"],
                                               first)

    # the original content back (at another path: the content decides): resumes, and the
    # result is that of an uninterrupted run
    moved = tmp_path / "moved.pt"
    moved.write_bytes(original)
    assert S.main(base_args(moved, out)) == 0
    assert S.main(base_args(moved, tmp_path / "clean.npz")) == 0
    a, b = np.load(out), np.load(tmp_path / "clean.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert np.array_equal(a["arr_0"][:2], first)
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["checkpoint_sha256"] == S.sha256_file(moved)
    assert not parts.exists()


def test_resume_refuses_parts_without_settings(tmp_path, ckpt, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    crash_after_first_batch_run(monkeypatch, capsys, base_args(ckpt, out))
    (parts / "settings.json").unlink()
    assert S.main(base_args(ckpt, out)) == 2
    line = one_error_line(capsys)
    assert str(parts) in line and "no readable settings.json" in line
    assert (parts / "part-000000.npz").is_file() and not out.exists()


@pytest.mark.parametrize("case", ["out-folder", "out-under-file", "out-is-ckpt", "out-not-npz",
                                  "grid-missing-folder", "grid-folder", "grid-extension"])
def test_bad_output_paths_are_refused_before_sampling(tmp_path, ckpt, no_sampling, capsys,
                                                      case):
    out, extra = tmp_path / "s.npz", []
    (tmp_path / "afile").write_text("keep me")
    if case == "out-folder":
        out.mkdir()
        expect = "is a folder"
    elif case == "out-under-file":
        out = tmp_path / "afile" / "s.npz"
        expect = "is a file, not a folder"
    elif case == "out-is-ckpt":
        out = ckpt
        expect = "must end in .npz"
    elif case == "out-not-npz":
        out = tmp_path / "afile"
        expect = "must end in .npz"
    elif case == "grid-missing-folder":
        extra = ["--grid", str(tmp_path / "nope" / "g.png")]
        expect = "does not exist"
    elif case == "grid-folder":
        (tmp_path / "g.png").mkdir()
        extra = ["--grid", str(tmp_path / "g.png")]
        expect = "is a folder"
    else:
        extra = ["--grid", str(tmp_path / "g.pngx")]
        expect = "unknown image file extension"
    before = ckpt.read_bytes()
    assert S.main(base_args(ckpt, out, *extra)) == 2
    line = one_error_line(capsys)
    assert expect in line and ("--grid" if extra else "--out") in line
    assert ckpt.read_bytes() == before and (tmp_path / "afile").read_text() == "keep me"
    assert not list(tmp_path.glob("**/*.parts"))


@pytest.mark.parametrize("flag,value", [("--cfg-scale", "nan"), ("--cfg-scale", "inf"),
                                        ("--cfg-scale", "-inf"), ("--guidance-low", "nan"),
                                        ("--guidance-high", "nan")])
def test_non_finite_guidance_is_refused(tmp_path, ckpt, no_sampling, capsys, flag, value):
    out = tmp_path / "s.npz"
    assert S.main(base_args(ckpt, out, f"{flag}={value}")) == 2
    assert one_error_line(capsys) == f"error: {flag} must be a finite number, got {value}"
    assert not out.exists() and not (tmp_path / "s.npz.parts").exists()


def test_rejected_classes_leave_no_parts_folder(tmp_path, ckpt, no_sampling, capsys):
    out = tmp_path / "s.npz"
    assert S.main(base_args(ckpt, out, "--classes", "1,99")) == 2
    assert "ids must be in 0..2" in one_error_line(capsys)
    assert not (tmp_path / "s.npz.parts").exists()


def test_a_finished_sample_set_is_not_overwritten_unless_asked(tmp_path, ckpt, capsys):
    out = tmp_path / "s.npz"
    assert S.main(base_args(ckpt, out)) == 0
    before = out.read_bytes()
    assert S.main(base_args(ckpt, out)) == 2
    assert "already exists (a finished sample set); pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert S.main(base_args(ckpt, out) + ["--overwrite"]) == 0


def _sample_tasks(mode, args, world, timeout=150):
    """tests/sample_worker.py MODE as `world` srun-style tasks, to the end: (return codes,
    outputs, seconds); killed whatever happens."""
    return finish_procs(srun_like_procs([WORKER, mode, *args], world), timeout)


@pytest.mark.timeout(300)
def test_two_processes_draw_the_samples_one_draws(tmp_path, ckpt):
    """Batches are dealt to the ranks (3 batches: rank 0 draws two), each sample's noise and
    each batch's generator come from the seed and its index: the file is the same."""
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.npz"
        rc, logs, _ = _sample_tasks("ok", base_args(ckpt, out, "--num-samples", "6"), world)
        assert rc == [0] * world, "\n".join(logs)
        outs[world] = np.load(out)
        assert json.loads(out.with_suffix(".json").read_text())["world_size"] == world
        assert not out.with_name(out.name + ".parts").exists()
    assert outs[1]["arr_0"].shape == (6, 8, 8, 3)
    assert np.array_equal(outs[1]["labels"], outs[2]["labels"])
    assert np.array_equal(outs[1]["arr_0"], outs[2]["arr_0"])


@pytest.mark.timeout(300)
def test_a_failing_sampling_process_stops_the_others(tmp_path, ckpt):
    """Rank 1 fails at its first batch: rank 0, an hour of sampling from the final barrier
    (here: asleep for 120 s), stops within seconds saying why, instead of sampling on and
    waiting out the 3-hour process-group timeout there."""
    rc, outs, took = _sample_tasks("fails", base_args(ckpt, tmp_path / "s.npz"), 2)
    both = "\n---\n".join(outs)
    assert rc == [1, 2], both
    assert "(rank 0) sampling" in outs[0] and "woke up" not in outs[0], both
    assert ("(rank 0) [sra-fast] stopping: rank 1 failed: error: decoding latents: a test "
            "failure on rank 1") in outs[0], both
    assert "error: decoding latents: a test failure on rank 1" in outs[1], both
    assert took < 60, took   # the sleep was 120 s


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing", [1, 0])
def test_a_sampling_process_failing_while_starting_stops_the_others(tmp_path, ckpt, failing):
    """A rank finds no GPU for itself before the process group exists: the other, waiting in
    the rendezvous (3-hour timeout when sampling), stops within seconds saying why; the
    failing rank's error is one line (exit 2), not a traceback, printed before it waits to
    tell the other (rank 0 hosts the store for that)."""
    rc, outs, took = _sample_tasks(f"nogpu{failing}", base_args(ckpt, tmp_path / "s.npz"), 2)
    both = "\n---\n".join(outs)
    other = 1 - failing
    assert rc[failing] == 2 and rc[other] == 1, both
    error = f"error: LOCAL_RANK {failing} but only 0 GPUs are visible on this node"
    assert (f"(rank {other}) [sra-fast] stopping: rank {failing} failed while starting: "
            f"{error}") in outs[other], both
    lines = outs[failing].strip().splitlines()
    assert lines[0] == (f"(rank {failing}) " if failing else "") + error, both
    assert "Traceback" not in outs[failing], both
    assert took < 60, took


def test_weights_student_is_trains_name_for_the_model_weights(tmp_path, ckpt, capsys):
    """`--weights student` (train.py's --sample-weights spelling) samples the model weights,
    not the EMA, and is recorded as `model`."""
    sd = torch.load(ckpt, weights_only=False)
    sd["ema"] = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in sd["model"].items()}
    torch.save(sd, ckpt)
    outs = {}
    for w in ("student", "model", "ema"):
        out = tmp_path / f"{w}.npz"
        assert S.main(base_args(ckpt, out, "--weights", w)) == 0
        outs[w] = np.load(out)["arr_0"]
        recorded = json.loads(out.with_suffix(".json").read_text())["weights"]
        assert recorded == ("model" if w == "student" else w)
    capsys.readouterr()
    assert np.array_equal(outs["student"], outs["model"])
    assert not np.array_equal(outs["student"], outs["ema"])


def test_compiled_sampling_draws_the_same_samples_and_records_it(tmp_path, ckpt, monkeypatch,
                                                                 capsys):
    """--compile: the network runs compiled (dynamo's aot_eager here: the same ATen ops, so
    the same bits; inductor may differ in the last ones), guided and unguided steps (two batch
    shapes) each in one graph; OUT.json records the mode; finished batches drawn without it
    are not mixed in."""
    from torch._dynamo.utils import counters
    seen = []
    monkeypatch.setattr(S, "compile_fn", aot_eager_compile_fn(seen))
    torch._dynamo.reset()
    counters.clear()
    guided = ["--cfg-scale", "2.0", "--guidance-high", "0.5", "--num-steps", "4"]
    plain, comp = tmp_path / "plain.npz", tmp_path / "comp.npz"
    try:
        assert S.main(base_args(ckpt, plain, *guided)) == 0
        assert S.main(base_args(ckpt, comp, *guided, "--compile", "default")) == 0
        assert seen == ["default"]
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert np.array_equal(np.load(plain)["arr_0"], np.load(comp)["arr_0"])
    assert json.loads(comp.with_suffix(".json").read_text())["compile"] == "default"
    assert "compile" not in json.loads(plain.with_suffix(".json").read_text())
    # parts drawn uncompiled are not resumed by a compiled run
    out = tmp_path / "mixed.npz"
    crash_after_first_batch_run(monkeypatch, capsys, base_args(ckpt, out))
    assert S.main(base_args(ckpt, out, "--compile", "default")) == 2
    assert "drawn with other settings: compile (" in one_error_line(capsys)
