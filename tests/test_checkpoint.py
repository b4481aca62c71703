"""Released checkpoint files: allow-listed loading, strict state-dict matching, clear errors."""
import argparse

import pytest
import torch

from sra_fast.checkpoint import (CheckpointError, load_checkpoint, load_model_state,
                                 state_dict_from)
from sra_fast.models import SiT_models


class NotAllowed:
    pass


def small(**kw):
    return SiT_models["SiT-S/8"](input_size=16, num_classes=10, **kw)


def released_file(tmp_path, model):
    args = argparse.Namespace(model="SiT-S/8", encoder_depth=4, proj_coeff=0.5, output_dir=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([1])).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict(),
            "args": args, "steps": 400000, "epoch": 80}
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    return path


def test_released_checkpoint_loads_under_weights_only(tmp_path):
    m = small()
    path = released_file(tmp_path, m)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].encoder_depth == 4
    assert ckpt["steps"] == 400000 and ckpt["epoch"] == 80
    m2 = small()
    assert load_model_state(m2, state_dict_from(ckpt, "ema")) == []
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    torch.optim.AdamW(m2.parameters()).load_state_dict(ckpt["opt"])


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": small().state_dict(), "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="allow-list.*trust"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trust=True)["args"], NotAllowed)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(bad)   # a damaged file, not an allow-list refusal
    for i, obj in enumerate((torch.zeros(3), [1, 2])):   # loads, but is no checkpoint
        p = tmp_path / f"obj{i}.pt"
        torch.save(obj, p)
        for trust in (False, True):
            with pytest.raises(CheckpointError, match=f"obj{i}.pt: holds a "):
                load_checkpoint(p, trust=trust)


def test_zip_files_are_memory_mapped_and_old_format_files_still_load(tmp_path, monkeypatch):
    """Zip-format files (every torch.save since 1.6) load memory-mapped: the ranks of a node
    resuming together share the page cache instead of a copy each; the old format loads
    whole."""
    sd = {"model": small().state_dict()}
    torch.save(sd, tmp_path / "new.pt")
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real(*a, **k))
    for name in ("new.pt", "old.pt"):
        got = load_checkpoint(tmp_path / name)["model"]
        assert all(torch.equal(got[k], v) for k, v in sd["model"].items())
    assert calls == [True, True, None]   # new: mapped; old: mapped refused, then whole


def test_plain_checkpoint_without_head_needs_flag(capsys):
    src = small()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("ap_head.")}
    sd["projectors.0.0.weight"] = torch.zeros(3, 3)   # REPA's projector: ignored
    m = small()
    with pytest.raises(CheckpointError, match="no SRA projector head.*init-missing-head"):
        load_model_state(m, sd)
    head_before = m.ap_head.linear1.weight.clone()
    left = load_model_state(m, sd, init_missing_head=True)
    assert sorted(left) == ["ap_head.linear1.bias", "ap_head.linear1.weight",
                            "ap_head.linear2.bias", "ap_head.linear2.weight"]
    assert torch.equal(m.ap_head.linear1.weight, head_before)
    assert torch.equal(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert "no projector head" in capsys.readouterr().out


def test_mismatched_model_errors():
    sd = SiT_models["SiT-B/8"](input_size=16, num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match="shapes do not match.*768"):
        load_model_state(small(), sd)
    sd = small().state_dict()
    sd.pop("blocks.3.mlp.fc1.weight")
    sd["blocks.99.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing.*blocks.3.mlp.fc1.weight.*unexpected.*blocks.99"):
        load_model_state(small(), sd)
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        state_dict_from({"model": 1, "steps": 3}, "ema")


def test_ddp_prefixes_are_stripped():
    sd = {"module." + k: v for k, v in small().state_dict().items()}
    load_model_state(small(), state_dict_from({"ema": sd}))


def test_mismatch_errors_say_which_setting_explains_them():
    with pytest.raises(CheckpointError, match="unexpected.*q_norm.*trained with qk_norm.*--qk-norm"):
        load_model_state(small(), small(qk_norm=True).state_dict())
    with pytest.raises(CheckpointError, match="has qk_norm and the checkpoint does not"):
        load_model_state(small(qk_norm=True), small().state_dict())
    # released REPA/SRA tables always carry the null class row (11 here); ours without dropout: 10
    with pytest.raises(CheckpointError, match="11 rows.*null class.*--cfg-prob > 0"):
        load_model_state(small(class_dropout_prob=0.0), small().state_dict())
    with pytest.raises(CheckpointError, match="no null-class row.*--cfg-prob 0"):
        load_model_state(small(), small(class_dropout_prob=0.0).state_dict())
    with pytest.raises(CheckpointError, match="learn_sigma"):
        load_model_state(small(), small(learn_sigma=True).state_dict())
    with pytest.raises(CheckpointError) as e:   # no hint where no setting explains it
        load_model_state(small(), SiT_models["SiT-B/8"](input_size=16, num_classes=10).state_dict())
    assert "likely" not in str(e.value)


def test_sampler_builds_qk_norm_models_from_released_files(tmp_path):
    """A released REPA/SRA run with --qk-norm: sample.py finds qk_norm in the state dict (or
    the args) and builds the model with it."""
    from sra_fast.sample import model_from_checkpoint
    m = small(qk_norm=True)
    ck = load_checkpoint(released_file(tmp_path, m))
    model, info = model_from_checkpoint(ck)
    assert info["qk_norm"] is True
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("path_type,ours", [("Linear", "linear"), ("GVP", "cosine"), (None, "linear")])
def test_original_sit_checkpoint_samples_under_our_time_convention(tmp_path, path_type, ours):
    """willisma/SiT files (learned-sigma head, t = 1 is data): the sampler gets the network
    wrapped so that v(x, t) = -v_SiT(x, 1 - t), and the path named in ours."""
    from sra_fast.sample import model_from_checkpoint
    from sra_fast.sampling import SiTOriginalTime
    src = small(learn_sigma=True)
    with torch.no_grad():   # a trained-looking net: the final layer starts at zero
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("ap_head.")}
    args = argparse.Namespace(model="SiT-S/8", num_classes=10, path_type=path_type,
                              prediction="velocity")
    ck = {"model": sd, "ema": sd, "args": args} if path_type else sd   # bare: pretrained file
    model, info = model_from_checkpoint(ck, name=None if path_type else "SiT-S/8",
                                        num_classes=10)
    assert isinstance(model, SiTOriginalTime) and info["path_type"] == ours
    assert "t=1 data" in info["time_convention"]
    x, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 10])
    t = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.abs().max() > 0.1 and torch.equal(out, -src.eval()(x, 1 - t, y))


def test_original_sit_checkpoint_unsupported_settings_are_refused():
    from sra_fast.sample import model_from_checkpoint
    sd = {k: v for k, v in small(learn_sigma=True).state_dict().items()
          if not k.startswith("ap_head.")}
    for kw, msg in ((dict(path_type="VP"), "path_type='VP'"),
                    (dict(path_type="Linear", prediction="noise"), "prediction='noise'")):
        ck = {"model": sd, "ema": sd, "args": argparse.Namespace(model="SiT-S/8", **kw)}
        with pytest.raises(CheckpointError, match=msg):
            model_from_checkpoint(ck)
