"""Training data: the released latent layout, the packed format and its converter, the
embedded digits, deterministic sharding, posterior sampling, and bad-input errors."""
import json

import numpy as np
import pytest
import torch

from sra_fast.data import (DataError, DigitsDataset, PackedLatents, PackedWriter,
                           ReleasedLatents, ShardedBatchSampler, convert_released_to_packed,
                           make_loader, open_dataset, sample_posterior)
from trainer_fixtures import make_released_latents


def test_released_layout_reads_sorted_files_and_labels(tmp_path):
    root = make_released_latents(tmp_path / "d", n=23, num_classes=3)
    ds = open_dataset(root)
    assert isinstance(ds, ReleasedLatents)
    assert len(ds) == 23 and ds.num_classes == 1000   # the released trainers' default
    assert ds.item_shape == (8, 8, 8) and ds.sample_shape == (4, 8, 8)
    assert ds.files == sorted(ds.files)
    x, y = ds[np.array([5, 0, 22])]
    assert x.shape == (3, 8, 8, 8) and x.dtype == torch.float32
    meta = dict(json.loads((root / "vae-sd" / "dataset.json").read_text())["labels"])
    for j, i in enumerate([5, 0, 22]):
        arr = np.load(root / "vae-sd" / ds.files[i])
        assert np.array_equal(x[j].numpy(), arr)
        assert y[j].item() == meta[ds.files[i]]
    # pointing at vae-sd itself works too
    assert len(open_dataset(root / "vae-sd")) == 23


def test_packed_conversion_matches_released_and_is_atomic(tmp_path):
    root = make_released_latents(tmp_path / "d", n=30)
    dest = tmp_path / "packed"
    convert_released_to_packed(root, dest, chunk=7, threads=2, progress=False)
    assert not list(tmp_path.glob(".packed.tmp-*"))
    rel, packed = ReleasedLatents(root), open_dataset(dest)
    assert isinstance(packed, PackedLatents)
    idx = np.array([29, 3, 3, 17, 0])
    xr, yr = rel[idx]
    xp, yp = packed[idx]
    assert torch.equal(xr, xp) and torch.equal(yr, yp)
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["count"] == 30 and meta["shape"] == [8, 8, 8] and meta["num_classes"] == 1000
    means = np.stack([np.load(root / "vae-sd" / f)[:4] for f in rel.files])
    assert np.allclose(meta["stats"]["mean_channel_mean"], means.mean(axis=(0, 2, 3)), atol=1e-5)
    # the packed folder works as --data-dir (directly, or as DATA/packed)
    assert isinstance(open_dataset(tmp_path), PackedLatents)
    with pytest.raises(DataError, match="already holds a packed dataset"):
        convert_released_to_packed(root, dest, progress=False)


def test_released_layout_has_the_released_1000_classes(tmp_path):
    """As the released trainers' --num-classes 1000: an ImageNet subset keeps the table
    (and null class 1000) of the full set; larger labels widen it; packing keeps it."""
    root = make_released_latents(tmp_path / "d", n=9, num_classes=3)
    assert open_dataset(root).num_classes == 1000
    assert open_dataset(root, num_classes=3).num_classes == 3          # as given
    p = convert_released_to_packed(root, tmp_path / "p", progress=False)
    assert json.loads((p / "meta.json").read_text())["num_classes"] == 1000
    assert open_dataset(p).num_classes == 1000
    p3 = convert_released_to_packed(root, tmp_path / "p3", num_classes=3, progress=False)
    assert open_dataset(p3).num_classes == 3
    js = root / "vae-sd" / "dataset.json"
    entries = json.loads(js.read_text())["labels"]
    entries[4][1] = 1500
    js.write_text(json.dumps({"labels": entries}))
    assert open_dataset(root).num_classes == 1501
    entries[4][1] = 999
    js.write_text(json.dumps({"labels": entries}))
    assert open_dataset(root).num_classes == 1000


def test_missing_listed_latent_files_are_named_at_open(tmp_path):
    root = make_released_latents(tmp_path / "d", n=23, per_folder=10)
    feat = root / "vae-sd"
    (feat / "00000" / "img-mean-std-00000005.npy").unlink()
    with pytest.raises(DataError, match=r"vae-sd/dataset.json: 1 listed latent files are "
                                        r"missing, e.g. .*vae-sd/00000/img-mean-std-00000005"
                                        r".npy$"):
        open_dataset(root)
    np.save(feat / "00000" / "img-mean-std-00000005.npy", np.zeros((8, 8, 8), np.float32))
    for f in (feat / "00002").iterdir():   # a whole sub-folder gone: 20, 21, 22
        f.unlink()
    (feat / "00002").rmdir()
    with pytest.raises(DataError, match=r"3 listed latent files are missing, e.g. "
                                        r".*00002/img-mean-std-00000020.npy$"):
        ReleasedLatents(root)
    (feat / "00002").mkdir()   # a folder named like a listed file is no file
    (feat / "00002" / "img-mean-std-00000020.npy").mkdir()
    with pytest.raises(DataError, match=r"3 listed latent files are missing"):
        convert_released_to_packed(root, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_packed_writer_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "p"
    with pytest.raises(DataError, match="never written"):
        with PackedWriter(dest, 4, (8, 2, 2)) as w:
            w.write(0, np.zeros((2, 8, 2, 2), np.float32), [0, 1])
            w.commit()
    assert not dest.exists()
    assert not list(tmp_path.iterdir())


def test_packed_dataset_survives_pickling_for_workers(tmp_path):
    root = make_released_latents(tmp_path / "d", n=16)
    dest = convert_released_to_packed(root, tmp_path / "p", progress=False)
    ds = PackedLatents(dest)
    sampler = ShardedBatchSampler(len(ds), 4, seed=1)
    batches = [b for b in make_loader(ds, sampler, num_workers=1)]
    assert len(batches) == 4
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == 16


def test_digits_dataset():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.sample_shape == (1, 8, 8)
    assert DigitsDataset(16).sample_shape == (1, 16, 16)
    x, y = ds[np.arange(10)]
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert set(ds.labels.tolist()) == set(range(10))


def test_sharding_partitions_global_batches_deterministically():
    n, b, world = 103, 4, 3
    single = ShardedBatchSampler(n, b * world, 1, 0, seed=7)
    ranks = [ShardedBatchSampler(n, b, world, r, seed=7) for r in range(world)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        for i, g in enumerate(single):
            assert np.array_equal(np.concatenate([p[i] for p in per_rank]), g)
        assert len(per_rank[0]) == n // (b * world) == single.steps_per_epoch
    a, b2 = list(ShardedBatchSampler(n, 4, seed=7)), list(ShardedBatchSampler(n, 4, seed=8))
    assert not np.array_equal(a[0], b2[0])          # the seed matters
    s = ShardedBatchSampler(n, 4, seed=7)
    full = list(s)
    s.set_epoch(0, start=5)
    assert [x.tolist() for x in s] == [x.tolist() for x in full[5:]]   # resume position
    s.set_epoch(1)
    assert not np.array_equal(list(s)[0], full[0])                      # new epoch order


def test_global_batch_larger_than_dataset():
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(10, 8, world_size=2)


def test_sample_posterior_formula_and_determinism():
    m = torch.randn(3, 8, 4, 4)
    m[:, 4:] = m[:, 4:].abs()
    z1 = sample_posterior(m, 0.18215, torch.Generator().manual_seed(3))
    eps = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(z1, (m[:, :4] + m[:, 4:] * eps) * 0.18215)
    z2 = sample_posterior(m, 0.18215, torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2)


# ------------------------------------------------------------------------- bad input
def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="neither vae-sd/dataset.json"):
        open_dataset(tmp_path / "other")


def test_wrong_dtype_and_shape_are_named(tmp_path):
    root = make_released_latents(tmp_path / "d", n=6)
    ds = ReleasedLatents(root)
    bad = root / "vae-sd" / ds.files[2]
    np.save(bad, np.zeros((8, 8, 8), np.float64))
    with pytest.raises(DataError, match=r"img-mean-std-00000002.npy: latent array has dtype "
                                        r"float64; expected float32"):
        ds[np.array([1, 2])]
    np.save(bad, np.zeros((8, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"00000002.npy: latent array has shape \(8, 4, 4\)"):
        ds[np.array([2])]
    root2 = make_released_latents(tmp_path / "e", n=4, dtype=np.float16)
    with pytest.raises(DataError, match="dtype float16; expected float32"):
        ReleasedLatents(root2)


def test_odd_channel_count_is_refused(tmp_path):
    root = make_released_latents(tmp_path / "d", n=3)
    ds = ReleasedLatents(root)
    np.save(root / "vae-sd" / ds.files[0], np.zeros((7, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"expected \(2C, H, W\)"):
        ReleasedLatents(root)


def test_labels_outside_num_classes(tmp_path):
    root = make_released_latents(tmp_path / "d", n=9, num_classes=3)
    with pytest.raises(DataError, match=r"labels are outside 0..1 \(largest 2\)"):
        open_dataset(root, num_classes=2)
    js = root / "vae-sd" / "dataset.json"
    entries = json.loads(js.read_text())["labels"]
    entries[0][1] = -1
    js.write_text(json.dumps({"labels": entries}))
    with pytest.raises(DataError, match="negative class label"):
        open_dataset(root)
    js.write_text(json.dumps({"labels": None}))
    with pytest.raises(DataError, match="no class labels"):
        open_dataset(root)
    js.write_text(json.dumps({"labels": []}))
    with pytest.raises(DataError, match="empty dataset"):
        open_dataset(root)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_convert_never_deletes_what_is_at_dest(tmp_path):
    root = make_released_latents(tmp_path / "d", n=6)
    source = _tree(root)
    keep = tmp_path / "keep"
    (keep / "code").mkdir(parents=True)
    (keep / "paper.tex").write_text("important")
    (keep / "code" / "a.py").write_text("x")
    for overwrite in (False, True):   # not a packed dataset: never replaced
        with pytest.raises(DataError, match="keep is not empty and is not a packed dataset"):
            convert_released_to_packed(root, keep, overwrite=overwrite, progress=False)
        # the source, or a folder holding it or inside it: refused even with --overwrite
        with pytest.raises(DataError, match="contains the source"):
            convert_released_to_packed(root, root, overwrite=overwrite, progress=False)
        with pytest.raises(DataError, match=r"vae-sd is the source"):
            convert_released_to_packed(root, root / "vae-sd", overwrite=overwrite,
                                       progress=False)
        with pytest.raises(DataError, match="is inside the source"):
            convert_released_to_packed(root, root / "vae-sd" / "p", overwrite=overwrite,
                                       progress=False)
    assert _tree(keep) == ["code", "code/a.py", "paper.tex"]
    assert _tree(root) == source
    assert not list(tmp_path.glob(".*")) and not list(root.glob(".*"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile exists and is not a folder"):
        convert_released_to_packed(root, tmp_path / "afile", overwrite=True, progress=False)
    with pytest.raises(DataError, match="--threads must be >= 1, got 0"):
        convert_released_to_packed(root, tmp_path / "p", threads=0, progress=False)
    # DATA/packed beside DATA/vae-sd (as documented) and an empty folder are fine
    convert_released_to_packed(root, root / "packed", progress=False)
    (tmp_path / "empty").mkdir()
    convert_released_to_packed(root, tmp_path / "empty", progress=False)
    assert len(open_dataset(tmp_path / "empty")) == 6
    # --overwrite replaces a packed dataset, but not one that somebody added files to
    convert_released_to_packed(root, root / "packed", overwrite=True, progress=False)
    (root / "packed" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files besides a packed dataset"):
        convert_released_to_packed(root, root / "packed", overwrite=True, progress=False)
    assert (root / "packed" / "notes.txt").read_text() == "mine"


def test_packed_writer_rechecks_dest_at_commit(tmp_path):
    dest = tmp_path / "p"
    with pytest.raises(DataError, match="not empty and is not a packed dataset"):
        with PackedWriter(dest, 2, (8, 2, 2)) as w:
            w.write(0, np.zeros((2, 8, 2, 2), np.float32), [0, 1])
            dest.mkdir()                       # someone else's folder appears meanwhile
            (dest / "x.txt").write_text("theirs")
            w.commit()
    assert _tree(dest) == ["x.txt"]
    assert not list(tmp_path.glob(".*"))


def _truncate(p):
    f = p / "latents.npy"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 300)


@pytest.mark.parametrize("change, msg", [
    (_truncate, r"latents.npy: unreadable \(mmap length"),
    (lambda p: (p / "latents.npy").unlink(), r"latents.npy: unreadable"),
    (lambda p: (p / "labels.npy").unlink(), r"labels.npy: unreadable"),
    (lambda p: (p / "labels.npy").write_bytes(b"junk"), r"labels.npy: unreadable"),
    (lambda p: np.save(p / "labels.npy", np.zeros((6, 2), np.int64)),
     r"labels.npy: array int64 \(6, 2\); expected integer \(N,\)"),
    (lambda p: (p / "meta.json").write_text("[1]"), "meta.json: not an sra-fast packed"),
    (lambda p: (p / "meta.json").write_bytes(b"\xff{"), "meta.json: unreadable"),
], ids=["latents-truncated", "latents-missing", "labels-missing", "labels-corrupt",
        "labels-2d", "meta-list", "meta-not-utf8"])
def test_damaged_packed_folders_are_named(tmp_path, change, msg):
    root = make_released_latents(tmp_path / "d", n=6)
    p = convert_released_to_packed(root, tmp_path / "p", progress=False)
    change(p)
    with pytest.raises(DataError, match=msg):
        open_dataset(p)


def test_unreadable_data_dir(tmp_path, monkeypatch):
    (tmp_path / "noread").mkdir()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(type(tmp_path), "iterdir", denied)   # as chmod 000 is for non-root
    with pytest.raises(DataError, match=r"--data-dir .*noread: cannot read "
                                        r"\(Permission denied\)$"):
        open_dataset(tmp_path / "noread")
