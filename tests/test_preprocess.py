"""Preprocessing CLI: image folder -> ADM crop -> SD-VAE moments -> packed and released
layouts; several ranks, resuming, bad input. A tiny randomly initialised AutoencoderKL built
from a config stands in for the SD-VAE (no download); the images are the photos that
scikit-learn ships."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sra_fast.data import PackedLatents, ReleasedLatents  # noqa: E402
from sra_fast.data import DataError  # noqa: E402
from sra_fast.preprocess import center_crop_arr, list_images  # noqa: E402
from trainer_fixtures import REPO, run_cli, subprocess_env  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=64)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of real photos (crops of sklearn's china.jpg and flower.jpg), mixed
    formats and sizes, one grayscale."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().images
    root = tmp_path_factory.mktemp("images")
    (root / "n01_china").mkdir()
    (root / "n02_flower" / "sub").mkdir(parents=True)
    Image.fromarray(china).save(root / "n01_china" / "a.jpg", quality=95)
    Image.fromarray(china[50:250, 100:400]).save(root / "n01_china" / "b.png")
    Image.fromarray(china[:150, :150]).save(root / "n01_china" / "c.JPEG", quality=95)
    Image.fromarray(flower).save(root / "n02_flower" / "a.png")
    Image.fromarray(flower[100:400, 200:500]).convert("L").save(root / "n02_flower" / "b.png")
    Image.fromarray(flower[::3, ::3]).save(root / "n02_flower" / "sub" / "c.jpg", quality=95)
    (root / "n02_flower" / "notes.txt").write_text("not an image")
    return root


def _encode(src, dest, vae, *extra, env=None, check=True):
    return run_cli(["-m", "sra_fast.preprocess", "encode", "--source", src, "--dest", dest,
                    "--resolution", 64, "--vae", vae, "--chunk-size", 2, "--batch-size", 2,
                    "--num-workers", 0, "--device", "cpu", *extra], cwd=REPO, env=env,
                   check=check)


def test_encode_writes_both_layouts_matching_the_vae(tmp_path, image_folder, tiny_vae):
    dest = tmp_path / "data"
    _encode(image_folder, dest, tiny_vae)
    assert not (dest / ".sra-work").exists()
    labels = json.loads((dest / "vae-sd" / "dataset.json").read_text())["labels"]
    assert labels == [[f"00000/img-mean-std-{i:08d}.npy", c]
                      for i, c in enumerate([0, 0, 0, 1, 1, 1])]
    rel, packed = ReleasedLatents(dest), PackedLatents(dest / "packed")
    xr, yr = rel[np.arange(6)]
    xp, yp = packed[np.arange(6)]
    assert xr.shape == (6, 8, 8, 8) and xr.dtype == torch.float32
    assert torch.equal(xr, xp) and torch.equal(yr, yp)
    assert (xr[:, 4:] > 0).all()                     # the second half is the posterior std
    meta = json.loads((dest / "packed" / "meta.json").read_text())
    assert meta["count"] == 6 and meta["classes"] == ["n01_china", "n02_flower"]
    # sorted class folders, sorted files (recursively): n02_flower/a.png is item 3,
    # n02_flower/sub/c.jpg item 5; each equals a direct encoding of the ADM crop
    from diffusers import AutoencoderKL
    from PIL import Image
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    for i, name in ((1, "n01_china/b.png"), (3, "n02_flower/a.png"), (5, "n02_flower/sub/c.jpg")):
        with Image.open(image_folder / name) as im:
            arr = center_crop_arr(im.convert("RGB"), 64)
        assert arr.shape == (64, 64, 3)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            d = vae.encode(x).latent_dist
        assert torch.allclose(xr[i], torch.cat([d.mean, d.std], 1)[0], atol=1e-5)


def test_two_ranks_and_resume_give_the_same_latents(tmp_path, image_folder, tiny_vae):
    one = tmp_path / "one"
    _encode(image_folder, one, tiny_vae, "--format", "packed")
    # a run cut short after one chunk (as a crash would), then finished by two ranks
    two = tmp_path / "two"
    _encode(image_folder, two, tiny_vae, "--format", "packed", "--max-chunks", "1")
    work = two / ".sra-work"
    assert (work / "chunk-000000.npy").is_file() and not (two / "packed").exists()
    (work / ".chunk-000001.npy.tmp-1234").write_bytes(b"a crash mid-write")
    mtime = (work / "chunk-000000.npy").stat().st_mtime_ns
    procs = []
    for rank in (0, 1):
        env = subprocess_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sra_fast.preprocess", "encode", "--source",
             str(image_folder), "--dest", str(two), "--resolution", "64", "--vae",
             str(tiny_vae), "--chunk-size", "2", "--batch-size", "2", "--num-workers", "0",
             "--device", "cpu", "--format", "packed", "--wait-timeout", "120", "--keep-work"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = PackedLatents(one / "packed"), PackedLatents(two / "packed")
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.array, b.array, atol=1e-6)
    # chunk 0 was not recomputed: it was rank 0's and already there
    assert (work / "chunk-000000.npy").stat().st_mtime_ns == mtime
    assert "1 of ours already done" in outs[0]


def test_bad_source_and_existing_dest(tmp_path, image_folder, tiny_vae):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jpg").write_bytes(b"")
    p = _encode(flat, tmp_path / "o", tiny_vae, check=False)
    assert p.returncode == 2 and "x.jpg is outside any class sub-folder" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    dest = tmp_path / "d"
    _encode(image_folder, dest, tiny_vae, "--format", "released", "--max-images", "2")
    p = _encode(image_folder, dest, tiny_vae, "--format", "released", check=False)
    assert p.returncode == 2 and "already holds encoded latents" in p.stderr
    # --overwrite rewrites vae-sd/ in place: stopped after its first chunk, the folder is
    # unfinished (no dataset.json), never the old labels over a mix of latents
    _encode(image_folder, dest, tiny_vae, "--format", "released", "--overwrite",
            "--max-chunks", "1")
    assert not (dest / "vae-sd" / "dataset.json").exists()
    _encode(image_folder, dest, tiny_vae, "--format", "released", "--overwrite")
    assert len(json.loads((dest / "vae-sd" / "dataset.json").read_text())["labels"]) == 6
    bad = tmp_path / "bad"
    (bad / "c0").mkdir(parents=True)
    (bad / "c0" / "broken.jpg").write_bytes(b"not a jpeg")
    p = _encode(bad, tmp_path / "o2", tiny_vae, check=False)
    assert p.returncode == 2 and "broken.jpg: unreadable image" in p.stderr
    assert not (tmp_path / "o2" / "packed").exists()
    assert not (tmp_path / "o2" / "vae-sd" / "dataset.json").exists()


def test_encoded_folder_trains_and_samples_through_the_vae(tmp_path, image_folder, tiny_vae):
    """images -> preprocess -> train.py (grids decoded by the VAE) -> sample.py (ADM npz)."""
    data = tmp_path / "data"
    _encode(image_folder, data, tiny_vae)
    runs = tmp_path / "runs"
    run_cli([REPO / "train.py", "--data-dir", data, "--model", "SiT-T/2", "--batch-size", 2,
             "--max-steps", 2, "--ckpt-every", 2, "--sample-every", 2, "--sample-num-steps", 2,
             "--vae", tiny_vae, "--out-dir", runs, "--exp-name", "e", "--precision", "fp32",
             "--num-workers", 0], cwd=tmp_path)
    from PIL import Image
    with Image.open(runs / "e" / "samples.png") as im:   # 2 classes x 8 decoded 64px images
        assert im.size == (8 * 66 + 2, 2 * 66 + 2)
    out = tmp_path / "s.npz"
    run_cli(["-m", "sra_fast.sample", "--ckpt", runs / "e" / "checkpoints" / "0000002.pt",
             "--num-samples", 3, "--sampler", "euler", "--num-steps", 2, "--vae", tiny_vae,
             "--out", out], cwd=tmp_path)
    z = np.load(out)
    assert z["arr_0"].shape == (3, 64, 64, 3) and z["arr_0"].dtype == np.uint8


def test_out_of_memory_while_encoding_is_one_line(tmp_path, image_folder, tiny_vae,
                                                  monkeypatch, capsys):
    import sra_fast.preprocess as P

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.\nmore")
    monkeypatch.setattr(P, "encode_moments", oom)
    rc = P.main(["encode", "--source", str(image_folder), "--dest", str(tmp_path / "d"),
                 "--resolution", "64", "--vae", str(tiny_vae), "--chunk-size", "2",
                 "--batch-size", "2", "--num-workers", "0", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if "error" in ln] == err[-1:] == [
        "error: out of device memory while encoding: --batch-size 2 images per encoder "
        "batch; pass a smaller one (finished chunks are kept). CUDA out of memory. Tried to "
        "allocate 4.00 GiB."]


def _main(monkeypatch, capsys, *args):
    """P.main in this process as rank 0 of 1: (exit code, stderr lines)."""
    import sra_fast.preprocess as P
    monkeypatch.setattr(P, "env_ranks", lambda: (0, 1, 0, 1))
    rc = P.main([str(x) for x in args])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, msg", [
    (["--max-images", "-1"], "--max-images must be >= 1 (or left out: all), got -1"),
    (["--max-images", "0"], "--max-images must be >= 1 (or left out: all), got 0"),
    (["--max-chunks", "-1"], "--max-chunks must be >= 1 (or left out: all), got -1"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--wait-timeout", "nan"], "--wait-timeout must be >= 0 seconds (0: forever), got nan"),
    (["--resolution", "0"], "--resolution 0 must be a positive multiple of 8 (256 or 512)"),
    (["--resolution", "-8"], "--resolution -8 must be a positive multiple of 8 (256 or 512)"),
], ids=["max-images-neg", "max-images-0", "max-chunks-neg", "chunk-size-0", "batch-size-0",
        "num-workers-neg", "wait-timeout-nan", "resolution-0", "resolution-neg"])
def test_bad_numbers_are_one_line_errors(tmp_path, image_folder, tiny_vae, monkeypatch,
                                         capsys, flags, msg):
    args = ["encode", "--source", image_folder, "--dest", tmp_path / "d", "--resolution", 64,
            "--vae", tiny_vae, "--chunk-size", 2, "--batch-size", 2, "--num-workers", 0,
            "--device", "cpu", *flags]
    assert _main(monkeypatch, capsys, *args) == (2, [f"error: {msg}"])
    assert not (tmp_path / "d").exists()


def test_bad_dest_is_refused_before_encoding(tmp_path, image_folder, tiny_vae, monkeypatch,
                                             capsys):
    def enc(dest, *extra):
        return _main(monkeypatch, capsys, "encode", "--source", image_folder, "--dest", dest,
                     "--resolution", 64, "--vae", tiny_vae, "--num-workers", 0,
                     "--device", "cpu", *extra)
    (tmp_path / "afile").write_text("x")
    assert enc(tmp_path / "afile") == (2, [f"error: --dest {tmp_path / 'afile'} exists and is "
                                           "not a folder"])
    rc, err = enc(tmp_path / "afile" / "d")
    assert rc == 2 and err == [f"error: --dest {tmp_path / 'afile' / 'd'}: cannot create "
                               f"{tmp_path / 'afile' / 'd' / '.sra-work'} (Not a directory)"]
    rc, err = enc(image_folder / "out")
    assert rc == 2 and err == [f"error: --dest {image_folder / 'out'} is or is inside --source "
                               f"{image_folder}; choose a --dest outside the image folder"]
    # DEST/packed that is somebody's folder is never replaced, --overwrite or not
    (tmp_path / "d" / "packed").mkdir(parents=True)
    (tmp_path / "d" / "packed" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        rc, err = enc(tmp_path / "d", *extra)
        assert rc == 2 and len(err) == 1 and "is not empty and is not a packed dataset" in err[0]
    assert (tmp_path / "d" / "packed" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "d" / ".sra-work").exists()
    # a damaged work index of an unfinished run
    (tmp_path / "e" / ".sra-work").mkdir(parents=True)
    (tmp_path / "e" / ".sra-work" / "index.json").write_text("{not json")
    rc, err = enc(tmp_path / "e")
    assert rc == 2 and err == [f"error: {tmp_path / 'e' / '.sra-work' / 'index.json'} is "
                               "unreadable (a damaged unfinished run); delete "
                               f"{tmp_path / 'e' / '.sra-work'} to start again"]


def test_convert_refuses_its_own_source(tmp_path, monkeypatch, capsys):
    from trainer_fixtures import make_released_latents
    root = make_released_latents(tmp_path / "lat", n=4)
    before = sorted(p.name for p in (root / "vae-sd").rglob("*"))
    for extra in ([], ["--overwrite"]):
        rc, err = _main(monkeypatch, capsys, "convert", "--source", root, "--dest", root, *extra)
        assert rc == 2 and err == [f"error: {root} contains the source {root / 'vae-sd'}; "
                                   "write the packed dataset to a folder outside it "
                                   "(replacing it could delete the source)"]
    assert sorted(p.name for p in (root / "vae-sd").rglob("*")) == before
    rc, err = _main(monkeypatch, capsys, "convert", "--source", root, "--dest", root / "p",
                    "--threads", 0)
    assert rc == 2 and err == ["error: --threads must be >= 1, got 0"]
    rc, _ = _main(monkeypatch, capsys, "convert", "--source", root, "--dest", root / "packed")
    assert rc == 0 and len(PackedLatents(root / "packed")) == 4


# ---------------------------------------------------------- listing images, as released
def _pixels(seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(path, seed=0):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed)).save(path)


def test_released_convert_output_keeps_its_labels(tmp_path, tiny_vae, monkeypatch, capsys):
    """The released `dataset_tools convert` writes images/00000/img00000000.png ... and
    images/dataset.json; encoding that folder takes the labels from the json (the chunk
    folder 00000 is no class) in the same index order."""
    src = tmp_path / "images"
    want = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    entries = []
    for i, c in enumerate(want):
        _png(src / "00000" / f"img{i:08d}.png", seed=i)
        entries.append([f"00000/img{i:08d}.png", c])
    (src / "dataset.json").write_text(json.dumps({"labels": entries[::-1]}))   # any order
    dest = tmp_path / "data"
    rc, _ = _main(monkeypatch, capsys, "encode", "--source", src, "--dest", dest,
                  "--resolution", 16, "--vae", tiny_vae, "--chunk-size", 4, "--batch-size", 4,
                  "--num-workers", 0, "--device", "cpu")
    assert rc == 0
    labels = json.loads((dest / "vae-sd" / "dataset.json").read_text())["labels"]
    assert labels == [[f"00000/img-mean-std-{i:08d}.npy", c] for i, c in enumerate(want)]
    packed = PackedLatents(dest / "packed")
    assert packed.labels.tolist() == want and packed.num_classes == 3
    assert packed.meta["classes"] == ["0", "1", "2"]
    # index i is image i
    x, _ = ReleasedLatents(dest)[np.arange(9)]
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    for i in (0, 4, 8):
        img = torch.from_numpy(_pixels(i)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            assert torch.allclose(x[i, :4], vae.encode(img).latent_dist.mean[0], atol=1e-5)


def test_images_are_listed_in_the_released_order(tmp_path, tiny_vae, monkeypatch, capsys):
    """Sorted relative paths ("cat-b/" < "cat.x/" < "cat/"), every extension PIL opens
    (.jfif too), hidden names and save-only formats (.pdf) left out; --max-images takes
    the first N of that order."""
    src = tmp_path / "src"
    for name in ("cat/a.png", "cat-b/a.png", "cat.x/a.png", "cat/sub/0.png", "cat/b.jfif",
                 "cat/.hidden.png", ".Trash/x.png", "cat/.thumbs/y.png"):
        _png(src / name)
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "cat" / "scan.pdf").write_bytes(b"%PDF-1.4")
    (src / "empty").mkdir()
    files, labels, classes = list_images(src)
    assert files == ["cat-b/a.png", "cat.x/a.png", "cat/a.png", "cat/b.jfif", "cat/sub/0.png"]
    assert classes == ["cat", "cat-b", "cat.x"]        # folders holding images
    assert labels == [1, 2, 0, 0, 0]
    dest = tmp_path / "d"
    rc, _ = _main(monkeypatch, capsys, "encode", "--source", src, "--dest", dest,
                  "--resolution", 16, "--vae", tiny_vae, "--num-workers", 0, "--device", "cpu",
                  "--format", "released", "--max-images", 3)
    assert rc == 0
    assert [c for _, c in json.loads((dest / "vae-sd" / "dataset.json").read_text())[
        "labels"]] == [1, 2, 0]
    # one class folder is allowed (all class 0)
    one = tmp_path / "one"
    _png(one / "only" / "a.png")
    _png(one / "only" / "b.png")
    assert list_images(one) == (["only/a.png", "only/b.png"], [0, 0], ["only"])


def _json_source(tmp_path, labels):
    src = tmp_path / "images"
    for i in range(3):
        _png(src / "00000" / f"img{i:08d}.png")
    if labels is not None:
        (src / "dataset.json").write_text(labels if isinstance(labels, str)
                                          else json.dumps(labels))
    return src


_PAIRS = [[f"00000/img{i:08d}.png", i] for i in range(3)]


@pytest.mark.parametrize("labels, msg", [
    ({"labels": _PAIRS[:1] + _PAIRS[2:]},
     r"dataset.json: gives no class for 00000/img00000001.png \(unlisted images: 1\)$"),
    ({"labels": _PAIRS + [["00001/img00000003.png", 0], ["00000/gone.png", 1]]},
     r"dataset.json: lists 00000/gone.png, which is no image in the folder "
     r"\(such entries: 2\)$"),
    ({"labels": None}, r"dataset.json: has no class labels \('labels' is missing or null\)"),
    ({"other": 1}, r"dataset.json: has no class labels"),
    ({"labels": _PAIRS[:2] + [["00000/img00000002.png", -1]]},
     r"dataset.json: 'labels' must be a list of \[relative_path, class\] pairs with "
     r"classes >= 0; found \[\"00000/img00000002.png\", -1\]$"),
    ({"labels": _PAIRS[:2] + [["00000/img00000002.png"]]}, r"found \[\"00000/img00000002.png\"\]$"),
    ("{not json", r"dataset.json: unreadable \(Expecting property name"),
    (None, r"--source .*images: x.png is outside any class sub-folder \(such images: 1;"),
], ids=["image-unlisted", "stray-entries", "labels-null", "labels-missing", "negative-class",
        "not-a-pair", "bad-json", "no-json-one-class-folder"])
def test_bad_source_labels_are_one_line_errors(tmp_path, labels, msg):
    src = _json_source(tmp_path, labels)
    if labels is None:   # no dataset.json: 00000 is one class folder, but x.png has none
        assert list_images(src)[1] == [0, 0, 0]
        _png(src / "x.png")
    with pytest.raises(DataError, match=msg) as e:
        list_images(src)
    assert "\n" not in str(e.value)


def test_a_source_without_images(tmp_path):
    (tmp_path / "s" / "c0").mkdir(parents=True)
    (tmp_path / "s" / "c0" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"--source .*s holds no images$"):
        list_images(tmp_path / "s")
    with pytest.raises(DataError, match="is not a folder"):
        list_images(tmp_path / "s" / "c0" / "notes.txt")
