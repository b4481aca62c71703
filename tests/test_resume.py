"""Resuming: N steps + resume + N steps is bitwise 2N steps; --resume auto picks the newest
complete checkpoint and survives partial or broken ones."""
import pytest
import torch

from sra_fast.trainer import Trainer
from trainer_fixtures import (assert_same_training_state, make_released_latents,  # noqa: F401
                              restore_backends, tiny_latent_config, training_state)

pytestmark = pytest.mark.usefixtures("restore_backends")


def _run(cfg):
    tr = Trainer(cfg, quiet=True)
    tr.train()
    return tr


@pytest.mark.parametrize("ema_impl", ["foreach", "adamw"])
def test_resume_is_bitwise(tmp_path, ema_impl):
    # 40 latents, batch 8: 5 steps per epoch, so the resumed half starts mid-epoch and
    # crosses an epoch boundary; warm-up makes the learning rate step-dependent; grad
    # accumulation and label dropout (cfg_prob 0.1) are on; latents are posterior samples.
    # ema_impl="adamw": the one-pass update (its plan is built over the resumed state)
    if ema_impl == "adamw":
        from sra_fast import ext
        if ext.load(jit=True) is None:
            pytest.skip(f"extension unavailable: {ext.unavailable_reason()}")
    data = make_released_latents(tmp_path / "d", n=40)
    kw = dict(lr=1e-3, lr_warmup_steps=4, grad_accum=2, ckpt_every=3, log_every=1,
              ema_impl=ema_impl)
    ref = training_state(_run(tiny_latent_config(tmp_path / "a", data, max_steps=6, **kw)))
    _run(tiny_latent_config(tmp_path / "b", data, max_steps=3, **kw))
    resumed = _run(tiny_latent_config(tmp_path / "b", data, max_steps=6, resume="auto", **kw))
    assert_same_training_state(ref, training_state(resumed))
    assert ref["pos"] == (6, 1, 1)
    # and the weights did change over the run
    first = torch.load(tmp_path / "b" / "run" / "checkpoints" / "0000003.pt",
                       weights_only=True)
    assert not torch.equal(first["model"]["final_layer.linear.weight"],
                           ref["model"]["final_layer.linear.weight"])


def test_resume_auto_skips_partial_and_broken_checkpoints(tmp_path, capsys):
    data = make_released_latents(tmp_path / "d", n=16)
    cfg = dict(ckpt_every=2, log_every=2)
    _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, **cfg))
    ck = tmp_path / "r" / "run" / "checkpoints"
    (ck / "0000006.pt.tmp-999").write_bytes(b"half a checkpoint")   # a crash while saving
    (ck / "0000004.pt").write_bytes(b"garbage")                     # a broken newest file
    capsys.readouterr()
    tr = Trainer(tiny_latent_config(tmp_path / "r", data, max_steps=6, resume="auto", **cfg))
    err = capsys.readouterr()
    assert tr.step == 2
    assert "skipping unreadable checkpoint" in err.err and "0000004.pt" in err.err
    assert "resumed from" in err.out and "0000002.pt: step 2" in err.out


def test_resuming_an_older_step_into_the_same_run_is_refused(tmp_path):
    """Steps 2 and 4 exist; --resume .../0000002.pt would write a second history whose step-4
    checkpoint replaces the first's (and --keep-ckpts prunes by step): refused, one line."""
    from sra_fast.trainer import RunError
    data = make_released_latents(tmp_path / "d", n=16)
    _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, ckpt_every=2))
    ck = tmp_path / "r" / "run" / "checkpoints"
    with pytest.raises(RunError, match="already has checkpoints after step 2 \\(newest "
                                       "0000004.pt\\)"):
        Trainer(tiny_latent_config(tmp_path / "r", data, max_steps=6, ckpt_every=2,
                                   resume=str(ck / "0000002.pt")), quiet=True)
    # into another run folder it is a branch of its own: fine
    tr = _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, ckpt_every=2,
                                 exp_name="branch", resume=str(ck / "0000002.pt")))
    assert tr.step == 4
    assert sorted(p.name for p in ck.glob("*.pt")) == ["0000002.pt", "0000004.pt"]


def test_a_resumed_run_drops_the_lost_runs_metrics_after_its_step(tmp_path):
    """The run logged steps 1-4 but died before checkpoint 4: resumed from 2, it trains 3 and
    4 again; metrics.jsonl must not hold two records for them (nor a torn last line)."""
    from sra_fast.metrics_log import read_metrics
    data = make_released_latents(tmp_path / "d", n=16)
    cfg = dict(ckpt_every=2, log_every=1)
    _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, **cfg))
    run = tmp_path / "r" / "run"
    (run / "checkpoints" / "0000004.pt").unlink()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.1')      # torn by the crash
    _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, resume="auto", **cfg))
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_resuming_another_models_checkpoint_names_both_models(tmp_path):
    from sra_fast.trainer import RunError
    data = make_released_latents(tmp_path / "d", n=16)
    _run(tiny_latent_config(tmp_path / "r", data, model="DiT-T/2", max_steps=2, ckpt_every=2))
    ck = tmp_path / "r" / "run" / "checkpoints" / "0000002.pt"
    with pytest.raises(RunError, match="is a DiT-T/2 checkpoint, but this run builds SiT-T/2: "
                                       "pass --model DiT-T/2"):
        Trainer(tiny_latent_config(tmp_path / "s", data, resume=str(ck)), quiet=True)


def test_keep_ckpts_never_prunes_the_checkpoint_just_written(tmp_path):
    from sra_fast.train_state import save_training_checkpoint
    data = make_released_latents(tmp_path / "d", n=16)
    tr = _run(tiny_latent_config(tmp_path / "r", data, max_steps=4, ckpt_every=2,
                                 keep_ckpts=2))
    ck = tmp_path / "r" / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["0000002.pt", "0000004.pt"]
    # a step below the others (after a skipped unreadable newest, say) stays
    p = save_training_checkpoint(tr.run_dir, step=1, epoch=0, model=tr.model, ema=tr.ema,
                                 opt=tr.opt, config={}, data_position={}, rng={}, keep=2)
    assert p.exists()
    assert sorted(p.name for p in ck.glob("*.pt")) == ["0000001.pt", "0000004.pt"]


@pytest.mark.parametrize("locked", [True, False])
def test_resume_auto_with_only_partial_checkpoints_starts_fresh(tmp_path, capsys, monkeypatch,
                                                                locked):
    """Locked, the partial file (a killed write's) is removed first and said so; without a
    lock (no flock), a recent one stays and resume says it found only partial ones."""
    from sra_fast import trainer as trainer_mod
    data = make_released_latents(tmp_path / "d", n=16)
    ck = tmp_path / "r" / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "0000002.pt.tmp-5").write_bytes(b"x")
    if not locked:
        monkeypatch.setattr(trainer_mod, "lock_run_folder",
                            lambda *a, **k: "warning: cannot lock (no flock)")
    tr = Trainer(tiny_latent_config(tmp_path / "r", data, resume="auto"))
    assert tr.step == 0
    out = capsys.readouterr()
    if locked:
        assert not (ck / "0000002.pt.tmp-5").exists()
        assert "removed 1 partial checkpoint file(s) left by interrupted writes" in out.out
        assert f"no checkpoint in {ck}; starting from scratch" in out.out
    else:
        assert "only partial checkpoints (0000002.pt.tmp-5); starting from scratch" in out.err


def test_checkpoint_optimizer_resumes_in_released_code(tmp_path):
    """The file's "opt" is in the released layout: the released train.py builds AdamW over
    model.parameters() (the frozen pos_embed included) and calls load_state_dict on it. That
    must load, and every trainable parameter must get its own moments back."""
    data = make_released_latents(tmp_path / "d", n=16)
    tr = _run(tiny_latent_config(tmp_path / "r", data, max_steps=2, ckpt_every=2))
    ck = torch.load(tmp_path / "r" / "run" / "checkpoints" / "0000002.pt", weights_only=True)
    model = tr.model
    released_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)   # as released
    released_opt.load_state_dict(ck["opt"])
    ours = dict(zip([p for p in model.parameters() if p.requires_grad],
                    tr.opt.state_dict()["state"].values()))
    n_checked = 0
    for name, p in model.named_parameters():
        st = released_opt.state.get(p, {})
        if not p.requires_grad:
            assert name == "pos_embed" and not st
            continue
        assert torch.equal(st["exp_avg"], ours[p]["exp_avg"]), name
        assert torch.equal(st["exp_avg_sq"], ours[p]["exp_avg_sq"]), name
        n_checked += 1
    assert n_checked == len(ours) and len(ck["opt"]["param_groups"][0]["params"]) == \
        len(list(model.parameters()))


def test_resume_reads_checkpoints_with_the_older_optimizer_layout(tmp_path):
    """Files written before the released layout index only the trainable parameters: they
    resume bitwise as before."""
    from sra_fast.train_state import adapt_released_optimizer
    data = make_released_latents(tmp_path / "d", n=40)
    kw = dict(lr=1e-3, ckpt_every=3, log_every=1)
    ref = training_state(_run(tiny_latent_config(tmp_path / "a", data, max_steps=6, **kw)))
    tr = _run(tiny_latent_config(tmp_path / "b", data, max_steps=3, **kw))
    path = tmp_path / "b" / "run" / "checkpoints" / "0000003.pt"
    ck = torch.load(path, weights_only=True)
    old = adapt_released_optimizer(ck["opt"], ck["model"], tr.model)   # trainable-only
    assert len(old["param_groups"][0]["params"]) == len(ck["opt"]["param_groups"][0]["params"]) - 1
    ck["opt"] = old
    torch.save(ck, path)
    resumed = _run(tiny_latent_config(tmp_path / "b", data, max_steps=6, resume="auto", **kw))
    assert_same_training_state(ref, training_state(resumed))


@pytest.mark.parametrize("recorded", [True, False], ids=["device-recorded", "older-file"])
def test_resume_from_a_run_on_another_device_type_reseeds(tmp_path, capsys, recorded):
    """A checkpoint written on a GPU holds a CUDA step generator's state (16 bytes), which a
    CPU generator cannot take (and the reverse): --device may change on resume, so the run
    re-seeds and says so instead of failing in Generator.set_state."""
    data = make_released_latents(tmp_path / "d", n=40)
    kw = dict(lr=1e-3, ckpt_every=3, log_every=1)
    _run(tiny_latent_config(tmp_path / "b", data, max_steps=3, **kw))
    path = tmp_path / "b" / "run" / "checkpoints" / "0000003.pt"
    ck = torch.load(path, weights_only=True)
    for r in ck["rng"]["ranks"]:   # what a CUDA generator's get_state() gives
        r["generator"] = torch.zeros(16, dtype=torch.uint8)
        if recorded:
            r["generator_device"] = "cuda"
        else:
            r.pop("generator_device", None)
    torch.save(ck, path)
    capsys.readouterr()
    tr = Trainer(tiny_latent_config(tmp_path / "b", data, max_steps=4, resume="auto", **kw))
    tr.train()
    out = capsys.readouterr().out
    assert "RNG re-seeded (the checkpoint's step generator was on" in out
    assert tr.step == 4
