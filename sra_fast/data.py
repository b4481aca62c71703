"""Training data: released REPA/SRA latent folders, the packed format, the embedded digits set,
and deterministic per-rank batches.

Formats
  released  `DATA/vae-sd/` of numbered folders of float32 (2C, H, W) arrays = concat(mean,
            std) of the SD-VAE posterior, and `vae-sd/dataset.json` =
            {"labels": [[relative_path, class], ...]} (the REPA/SRA dataset_tools layout).
            Items are read in sorted file-name order, as the released dataset does.
  packed    one folder: `latents.npy` (N, 2C, H, W) float32/float16, memory-mapped;
            `labels.npy` (N,) int64; `meta.json` (count, shape, dtype, classes, statistics).
            Written into a temporary folder and renamed into place, so a folder with
            meta.json is always complete. One memory map serves every worker: no per-file
            open() per sample, which is what starves 64 GPUs reading the released layout.
  digits    scikit-learn's 1797 8x8 handwritten digits (shipped with the package), one
            channel in [-1, 1]: the embedded default run (grids are upsampled for display).
Latent datasets return the stored moments; `sample_posterior` draws
`(mean + std * eps) * 0.18215` on the training device.

Every dataset is indexed by a whole batch of indices (`ds[index_array] -> (x, y)`) so a
loader fetches a batch with one call (one sorted memmap gather for the packed format).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

LATENT_SCALE = 0.18215
PACKED_FORMAT = "sra-fast-packed"
PACKED_VERSION = 1


class DataError(ValueError):
    """A problem with the training data, stated in one line."""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def error_line(e: BaseException) -> str:
    """One line for a user-facing error, also when a loader worker wrapped it (the original
    message is then the last line of the wrapped text)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    for prefix in ("sra_fast.data.DataError: ", "DataError: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def out_of_memory_line(e: BaseException, where: str, advice: str) -> str:
    """One line for running out of device memory: where, what to change, and the
    allocator's own first line (how much was asked for, what is free)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "out of memory")
    return f"out of device memory {where}: {advice}. {first}"


# ---------------------------------------------------------------------------- datasets
class BatchDataset(torch.utils.data.Dataset):
    """Base: `kind` is "moments" (latent mean/std, 2C channels) or "images" (model input)."""
    kind = "images"
    name = "dataset"
    labels: np.ndarray
    item_shape: tuple
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.get_batch(idx)

    def get_batch(self, idx: np.ndarray):
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple:
        """Shape of one model input (C, H, W)."""
        if self.kind == "moments":
            c, h, w = self.item_shape
            return (c // 2, h, w)
        return tuple(self.item_shape)

    def describe(self) -> str:
        return (f"{self.name}: {len(self):,} items of {self.kind} {tuple(self.item_shape)}, "
                f"{self.num_classes} classes")

    def check_labels(self, num_classes: int | None, where: str) -> int:
        labels = self.labels
        if labels.size == 0:
            raise DataError(f"{where}: the dataset is empty")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise DataError(f"{where}: negative class label {lo}")
        if num_classes is None:
            num_classes = hi + 1
        elif hi >= num_classes:
            bad = int((labels >= num_classes).sum())
            raise DataError(f"{where}: {bad} labels are outside 0..{num_classes - 1} (largest "
                            f"{hi}); set --num-classes to at least {hi + 1}")
        self.num_classes = int(num_classes)
        return self.num_classes


class DigitsDataset(BatchDataset):
    """scikit-learn's handwritten digits at `size` x `size` (8: as shipped; larger sizes are
    bilinear upsamplings), values in [-1, 1]. The embedded run trains at 8x8 (patch 2: 16
    tokens) and upsamples only for display: at equal compute it gives clearer digits than
    training on 16x16 upsamplings."""
    kind = "images"
    name = "sklearn digits"

    def __init__(self, size: int = 8):
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]   # (N,1,8,8) in [0,1]
        if size != 8:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False)
        self.x = (x * 2 - 1).clamp(-1, 1).contiguous()
        self.labels = d.target.astype(np.int64)
        self.y = torch.from_numpy(self.labels)
        self.item_shape = tuple(self.x.shape[1:])
        self.num_classes = 10

    def get_batch(self, idx):
        t = torch.from_numpy(idx)
        return self.x[t], self.y[t]


class ReleasedLatents(BatchDataset):
    """The REPA/SRA `vae-sd/` layout: one .npy file per image plus dataset.json."""
    kind = "moments"

    def __init__(self, root, num_classes: int | None = None):
        root = Path(root)
        feat = root / "vae-sd" if (root / "vae-sd" / "dataset.json").is_file() else root
        js = feat / "dataset.json"
        if not js.is_file():
            raise DataError(f"{root}: no vae-sd/dataset.json (released latent layout)")
        self.name = f"released latents {feat}"
        self.features_dir = feat
        try:
            meta = json.loads(js.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{js}: unreadable dataset.json ({_one_line(e)})") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            raise DataError(f"{js}: has no class labels ('labels' is missing or null); "
                            "class-conditional training needs them")
        if len(entries) == 0:
            raise DataError(f"{js}: lists no latent files (empty dataset)")
        try:
            pairs = sorted((str(p).replace("\\", "/"), int(c)) for p, c in entries)
        except (TypeError, ValueError):
            raise DataError(f"{js}: 'labels' must be a list of [relative_path, class] "
                            "pairs") from None
        self.files = [p for p, _ in pairs]
        self.labels = np.array([c for _, c in pairs], dtype=np.int64)
        self._check_files_exist(js)
        first = feat / self.files[0]
        arr = self._load(first, check=False)
        if arr.ndim != 3 or arr.shape[0] % 2:
            raise DataError(f"{first}: latent array has shape {arr.shape}; expected (2C, H, W) "
                            "= concat(mean, std), e.g. (8, 32, 32)")
        self.item_shape = tuple(arr.shape)
        if num_classes is None and self.labels.size and self.labels.max() < 1000:
            num_classes = 1000   # the released trainers' --num-classes: same model, same null id
        self.check_labels(num_classes, str(js))

    def _check_files_exist(self, js: Path):
        """Every listed file, now rather than when a batch reaches it hours into a run: one
        listing per sub-folder (a stat per file is slow on network filesystems)."""
        present: dict[str, set] = {}
        missing = []
        for f in self.files:
            folder, _, name = f.rpartition("/")
            if folder not in present:
                try:
                    with os.scandir(self.features_dir / folder) as it:
                        present[folder] = {e.name for e in it if not e.is_dir()}
                except OSError:   # missing, not a folder, unreadable: its files count as missing
                    present[folder] = set()
            if name not in present[folder]:
                missing.append(f)
        if missing:
            raise DataError(f"{js}: {len(missing)} listed latent files are missing, e.g. "
                            f"{self.features_dir / missing[0]}")

    def _load(self, path, check=True):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: unreadable latent file ({_one_line(e)})") from None
        if arr.dtype != np.float32:
            raise DataError(f"{path}: latent array has dtype {arr.dtype}; expected float32")
        if check and tuple(arr.shape) != self.item_shape:
            raise DataError(f"{path}: latent array has shape {tuple(arr.shape)}; expected "
                            f"{self.item_shape} like the rest of the dataset")
        return arr

    def get_batch(self, idx):
        x = np.stack([self._load(self.features_dir / self.files[i]) for i in idx])
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx])


class PackedLatents(BatchDataset):
    """The packed format: one memory-mapped (N, 2C, H, W) array + labels + meta.json."""
    kind = "moments"

    def __init__(self, root, num_classes: int | None = None):
        root = Path(root)
        self.root = root
        self.name = f"packed latents {root}"
        try:
            self.meta = json.loads((root / "meta.json").read_text())
        except (OSError, ValueError) as e:   # ValueError: bad JSON or bad UTF-8
            raise DataError(f"{root}/meta.json: unreadable ({_one_line(e)})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != PACKED_FORMAT:
            raise DataError(f"{root}/meta.json: not an sra-fast packed dataset")
        try:
            self.labels = np.load(root / "labels.npy", allow_pickle=False)
        except Exception as e:
            raise DataError(f"{root}/labels.npy: unreadable ({_one_line(e)})") from None
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise DataError(f"{root}/labels.npy: array {self.labels.dtype} "
                            f"{self.labels.shape}; expected integer (N,)")
        self._arr = None
        try:
            arr = self.array
        except Exception as e:   # missing, truncated (mmap longer than the file), pickled
            raise DataError(f"{root}/latents.npy: unreadable ({_one_line(e)})") from None
        if arr.ndim != 4 or arr.shape[1] % 2 or arr.dtype not in (np.float32, np.float16):
            raise DataError(f"{root}/latents.npy: array {arr.dtype} {arr.shape}; expected "
                            "float32/float16 (N, 2C, H, W)")
        if len(arr) != len(self.labels) or len(arr) != self.meta.get("count"):
            raise DataError(f"{root}: latents ({len(arr)}), labels ({len(self.labels)}) and "
                            f"meta.json count ({self.meta.get('count')}) disagree")
        self.item_shape = tuple(arr.shape[1:])
        if num_classes is None:
            num_classes = self.meta.get("num_classes")
            if not isinstance(num_classes, int) or isinstance(num_classes, bool):
                num_classes = None   # a hand-edited meta.json: count the labels instead
        self.check_labels(num_classes, str(root))

    @property
    def array(self):
        if self._arr is None:   # opened lazily: each loader worker maps the file itself
            self._arr = np.load(self.root / "latents.npy", mmap_mode="r")
        return self._arr

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arr"] = None
        return d

    def get_batch(self, idx):
        order = np.argsort(idx, kind="stable")
        x = np.empty((len(idx), *self.item_shape), dtype=self.array.dtype)
        x[order] = self.array[idx[order]]   # one sorted gather: sequential-ish reads
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx])


def open_dataset(data_dir, num_classes: int | None = None) -> BatchDataset:
    """The dataset for --data-dir (None: the embedded digits), with clear errors."""
    if data_dir is None:
        ds = DigitsDataset()
        if num_classes is not None:
            ds.check_labels(num_classes, "digits")
        return ds
    root = Path(data_dir)
    try:   # stat/listdir raise PermissionError on a folder we may not read
        if not root.exists():
            raise DataError(f"--data-dir {root} does not exist")
        if not root.is_dir():
            raise DataError(f"--data-dir {root} is not a folder")
        if not any(root.iterdir()):
            raise DataError(f"--data-dir {root} is empty")
        if (root / "meta.json").is_file():
            return PackedLatents(root, num_classes)
        if (root / "packed" / "meta.json").is_file():
            return PackedLatents(root / "packed", num_classes)
        if (root / "vae-sd" / "dataset.json").is_file() or (root / "dataset.json").is_file():
            return ReleasedLatents(root, num_classes)
        partial = sorted(p.name for p in root.glob(".*.tmp-*"))
    except OSError as e:
        what = f" {e.filename}" if e.filename and Path(e.filename) != root else ""
        raise DataError(f"--data-dir {root}: cannot read{what} "
                        f"({e.strerror or _one_line(e)})") from None
    extra = f" (only an unfinished packed folder: {partial[0]})" if partial else ""
    raise DataError(f"--data-dir {root} holds neither vae-sd/dataset.json (released latent "
                    f"layout) nor meta.json (packed format){extra}")


def sample_posterior(moments: torch.Tensor, scale: float = LATENT_SCALE,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(mean + std * eps) * scale on moments' device; moments are (N, 2C, H, W)."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return (mean + std * eps) * scale


# ---------------------------------------------------------------------------- packed writer
PACKED_FILES = ("latents.npy", "labels.npy", "meta.json")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _has_packed_meta(path: Path) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == PACKED_FORMAT


def is_packed_folder(path) -> bool:
    """True for a folder holding only what PackedWriter writes: the one kind of folder that
    --overwrite may replace (anything else could be someone's data)."""
    path = Path(path)
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return names <= set(PACKED_FILES) and _has_packed_meta(path)


def check_packed_dest(dest, overwrite: bool = False, sources=()) -> None:
    """Refuse a packed-dataset destination whose replacement could lose data: one that is,
    holds or lies inside a source folder (even with --overwrite), a non-empty folder without
    --overwrite, and with it any folder that is not a packed dataset."""
    dest = Path(dest)
    real = dest.resolve()   # symlinks and "..": compare the folders actually meant
    for src in sources:
        s = Path(src).resolve()
        if _within(real, s) or _within(s, real):
            how = "is" if real == s else "is inside" if _within(real, s) else "contains"
            raise DataError(f"{dest} {how} the source {src}; write the packed dataset to a "
                            "folder outside it (replacing it could delete the source)")
    try:
        if not dest.exists():
            return
        if not dest.is_dir():
            raise DataError(f"{dest} exists and is not a folder; choose another destination")
        entries = sorted(p.name for p in dest.iterdir())
    except OSError as e:
        raise DataError(f"{dest}: cannot read ({e.strerror or _one_line(e)})") from None
    if not entries:
        return
    if is_packed_folder(dest):
        if not overwrite:
            raise DataError(f"{dest} already holds a packed dataset; pass --overwrite to "
                            "replace it")
        return
    what = ("holds other files besides a packed dataset" if _has_packed_meta(dest)
            else "is not empty and is not a packed dataset")
    raise DataError(f"{dest} {what} ({len(entries)} entries, e.g. {entries[0]}); choose a "
                    "new or empty folder (--overwrite replaces only a packed dataset)")


class PackedWriter:
    """Writes a packed dataset into a temporary folder; `commit` renames it into place.

    Rows may be written in any order; commit refuses if a row was never written. Statistics
    (per-channel mean/std of the stored moments) accumulate as rows arrive.
    """

    def __init__(self, dest, count: int, item_shape, dtype="float32", overwrite: bool = False,
                 sources=()):
        self.dest = Path(dest)
        self.overwrite, self.sources = overwrite, tuple(sources)
        check_packed_dest(self.dest, overwrite, self.sources)
        if count <= 0:
            raise DataError("cannot pack an empty dataset")
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}"
        self.count, self.item_shape = count, tuple(item_shape)
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
            self.latents = np.lib.format.open_memmap(self.tmp / "latents.npy", mode="w+",
                                                     dtype=np.dtype(dtype),
                                                     shape=(count, *self.item_shape))
        except OSError as e:   # e.g. the parent is a file, read-only, or the disk is full
            self.abort()
            raise DataError(f"{self.tmp}: cannot create the temporary folder "
                            f"({e.strerror or _one_line(e)})") from None
        self.labels = np.full(count, -1, dtype=np.int64)
        c = self.item_shape[0]
        self._sum = np.zeros(c, np.float64)
        self._sq = np.zeros(c, np.float64)
        self._n = 0

    def write(self, start: int, x: np.ndarray, labels):
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.item_shape:
            raise DataError(f"rows {start}..: shape {x.shape[1:]}, expected {self.item_shape}")
        self.latents[start:start + len(x)] = x
        self.labels[start:start + len(x)] = np.asarray(labels, dtype=np.int64)
        xf = x.astype(np.float64)
        self._sum += xf.sum(axis=(0, 2, 3))
        self._sq += (xf ** 2).sum(axis=(0, 2, 3))
        self._n += x.shape[0] * x.shape[2] * x.shape[3]

    def commit(self, num_classes: int | None = None, extra: dict | None = None) -> Path:
        if (self.labels < 0).any():
            missing = int((self.labels < 0).sum())
            raise DataError(f"packed dataset incomplete: {missing} of {self.count} rows were "
                            "never written")
        self.latents.flush()
        del self.latents
        np.save(self.tmp / "labels.npy", self.labels)
        mean = self._sum / max(self._n, 1)
        std = np.sqrt(np.maximum(self._sq / max(self._n, 1) - mean ** 2, 0))
        c = self.item_shape[0] // 2
        meta = {
            "format": PACKED_FORMAT, "version": PACKED_VERSION, "count": self.count,
            "shape": list(self.item_shape), "dtype": str(np.dtype(
                np.load(self.tmp / "latents.npy", mmap_mode="r").dtype)),
            "layout": "concat(mean, std) of the SD-VAE posterior, per image",
            "latent_scale": LATENT_SCALE,
            "num_classes": int(num_classes if num_classes is not None else self.labels.max() + 1),
            "stats": {"mean_channel_mean": mean[:c].tolist(),
                      "mean_channel_std": std[:c].tolist(),
                      "std_channel_mean": mean[c:].tolist()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
        }
        with open(self.tmp / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        # again: the destination may have changed while we packed (hours at ImageNet scale)
        check_packed_dest(self.dest, self.overwrite, self.sources)
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}"
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest

    def abort(self):
        self.__dict__.pop("latents", None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def convert_released_to_packed(src, dest, dtype: str = "float32", overwrite: bool = False,
                               threads: int = 16, chunk: int = 4096, num_classes=None,
                               progress: bool = True) -> Path:
    """Released vae-sd layout -> packed format (threaded reads, atomic commit)."""
    if threads < 1:
        raise DataError(f"--threads must be >= 1, got {threads}")
    ds = ReleasedLatents(src, num_classes)
    n = len(ds)
    from .metrics_log import progress_bar
    # the source is the folder the latent files are in: DATA/packed beside DATA/vae-sd is fine
    with PackedWriter(dest, n, ds.item_shape, dtype, overwrite, [ds.features_dir]) as w, \
            concurrent.futures.ThreadPoolExecutor(threads) as pool:
        bar = progress_bar(total=n, desc="packing", unit="img", disable=not progress)
        for start in range(0, n, chunk):
            idx = np.arange(start, min(start + chunk, n))
            parts = list(pool.map(lambda i: ds._load(ds.features_dir / ds.files[i]), idx))
            w.write(start, np.stack(parts).astype(dtype, copy=False), ds.labels[idx])
            bar.update(len(idx))
        bar.close()
        return w.commit(ds.num_classes, {"source": str(Path(src).resolve())})


# ---------------------------------------------------------------------------- sharding
class ShardedBatchSampler:
    """Deterministic per-rank batches.

    Epoch e is a permutation of the dataset drawn from (seed, e), cut into global batches of
    `batch_size * world_size` (the incomplete tail is dropped); rank r takes the r-th
    contiguous slice of each global batch. So a single process with the global batch sees
    exactly the union of what the ranks see, and the position in the epoch is one integer
    (global batches consumed), which checkpoints store.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.world_size, self.rank = num_items, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the dataset has {num_items} items, fewer than one global batch "
                            f"of {self.global_batch}; lower --batch-size")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"position {start} is outside epoch of {self.steps_per_epoch} batches")
        self.epoch, self.start = epoch, start

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        perm = self.permutation(self.epoch)
        b, g = self.batch_size, self.global_batch
        for i in range(self.start, self.steps_per_epoch):
            yield perm[i * g + self.rank * b: i * g + (self.rank + 1) * b]

    def __len__(self):
        return self.steps_per_epoch - self.start


def make_loader(ds: BatchDataset, sampler: ShardedBatchSampler, num_workers: int = 0,
                pin_memory: bool = False, worker_init_fn=None):
    kw = {}
    if num_workers > 0:
        kw = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_init_fn)
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=sampler,
                                       num_workers=num_workers, pin_memory=pin_memory, **kw)


def main(argv=None):
    """python -m sra_fast.data convert SRC DEST: released vae-sd layout -> packed format."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m sra_fast.data",
                                description="Convert released REPA/SRA latents to the packed "
                                            "format.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="released vae-sd layout -> packed folder")
    c.add_argument("src", help="folder holding vae-sd/ (or the vae-sd folder itself)")
    c.add_argument("dest", help="packed output folder (created atomically)")
    c.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    c.add_argument("--threads", type=int, default=16)
    c.add_argument("--num-classes", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        out = convert_released_to_packed(a.src, a.dest, a.dtype, a.overwrite, a.threads,
                                         num_classes=a.num_classes)
    except DataError as e:   # one line, exit 2 (bad input), as the other commands
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
