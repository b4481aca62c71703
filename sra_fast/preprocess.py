"""Image folder -> SD-VAE latent moments (`python -m sra_fast.preprocess`).

    python -m sra_fast.preprocess encode --source IMAGENET/train --dest DATA --resolution 256
    torchrun --nproc-per-node 8 -m sra_fast.preprocess encode --source ... --dest DATA
    python -m sra_fast.preprocess convert --source DATA --dest DATA/packed

encode: an image folder, every image PIL can open under it in sorted relative-path order
(the released dataset_tools order); classes from its dataset.json (the released convert
step's output) or else from its sorted top-level folder names (ImageNet style) ->
ADM centre crop to --resolution (256 or 512) -> [-1, 1] -> the SD-VAE encoder (diffusers
AutoencoderKL, a local path or a hub name that this machine can load) -> posterior moments
concat(mean, std), float32 (8, R/8, R/8) per image -> DATA/packed/ (the packed format)
and/or DATA/vae-sd/ (the released REPA/SRA layout). Batched on every GPU: images are cut
into chunks, chunk c belongs to rank c mod WORLD_SIZE, and each chunk's result is written
to its own file under DATA/.sra-work/ by that rank alone (temporary name, then rename). A
crashed run started again with the same command skips the finished chunks. When every
chunk is there, rank 0 writes dataset.json and/or assembles the packed folder, each
atomically, and removes the work folder. No process group is needed: ranks never talk.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import HelpFormatter, RawDescriptionHelpFormatter
from .data import (DataError, PackedWriter, check_packed_dest, convert_released_to_packed,
                   error_line, out_of_memory_line)
from .distributed import env_ranks, pick_device, stderr_line
from .metrics_log import progress_bar

WORK = ".sra-work"


def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop: halve with BOX while large, BICUBIC resize, centre crop."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    cy = (arr.shape[0] - image_size) // 2
    cx = (arr.shape[1] - image_size) // 2
    return arr[cy: cy + image_size, cx: cx + image_size]


def image_extensions() -> set[str]:
    """The lower-case extensions PIL can open, as the released dataset_tools accepts (less
    the save-only ones such as .pdf: they would fail at the first read)."""
    from PIL import Image
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN}


def _walk_images(src: Path, exts: set[str]) -> list[str]:
    """Relative "/" paths of the images under src, recursively, following links as the
    released code does (each real folder once: a link loop would never end)."""
    found, seen = [], set()

    def visit(folder: str, rel: str):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for e in it:
                # hidden names are skipped (the released code takes them too): macOS
                # ._x.jpg droppings and the like are no images, and .Trash no class
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    visit(e.path, rel + e.name + "/")
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in exts:
                    found.append(rel + e.name)
    visit(str(src), "")
    return found


def _json_labels(js: Path, files: list[str]) -> list[int]:
    """Each file's class from SOURCE/dataset.json (the released convert step's labels)."""
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError) as e:   # ValueError: bad JSON or bad UTF-8
        raise DataError(f"{js}: unreadable ({' '.join(str(e).split())})") from None
    entries = meta.get("labels") if isinstance(meta, dict) else None
    if entries is None:   # the released writer leaves it null when any image lacks a class
        raise DataError(f"{js}: has no class labels ('labels' is missing or null); "
                        "class-conditional training needs them")
    table = {}
    for x in entries if isinstance(entries, list) else [entries]:
        ok = (isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
              and type(x[1]) is int and x[1] >= 0)
        if not ok:
            raise DataError(f"{js}: 'labels' must be a list of [relative_path, class] pairs "
                            f"with classes >= 0; found {json.dumps(x)[:80]}")
        table[x[0].replace("\\", "/")] = x[1]
    unlisted = [f for f in files if f not in table]
    if unlisted:
        raise DataError(f"{js}: gives no class for {unlisted[0]} (unlisted images: "
                        f"{len(unlisted)})")
    listed = set(files)
    strays = sorted(p for p in table if p not in listed)
    if strays:
        raise DataError(f"{js}: lists {strays[0]}, which is no image in the folder "
                        f"(such entries: {len(strays)})")
    return [table[f] for f in files]


def list_images(source) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, class ids, class names) of the images under source, in the order of
    the released dataset_tools (sorted relative paths): classes from source/dataset.json
    (what the released convert step writes beside its images), else from the sorted
    top-level folder names (ImageNet style)."""
    src = Path(source)
    if not src.is_dir():
        raise DataError(f"--source {src} is not a folder")
    files = sorted(_walk_images(src, image_extensions()))
    if not files:
        raise DataError(f"--source {src} holds no images")
    js = src / "dataset.json"
    if js.is_file():
        labels = _json_labels(js, files)
        return files, labels, [str(i) for i in range(max(labels) + 1)]
    loose = [f for f in files if "/" not in f]
    if loose:   # the released code would give these class 0 and shift every other class
        raise DataError(f"--source {src}: {loose[0]} is outside any class sub-folder "
                        f"(such images: {len(loose)}; expected one folder per class, ImageNet "
                        "style, or a dataset.json of labels)")
    tops = [f.split("/", 1)[0] for f in files]
    classes = sorted(set(tops))   # folders holding images, as released
    ids = {c: i for i, c in enumerate(classes)}
    return files, [ids[t] for t in tops], classes


def released_name(i: int) -> str:
    s = f"{i:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


class _Images(torch.utils.data.Dataset):
    def __init__(self, root, files, resolution):
        self.root, self.files, self.res = Path(root), files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        path = self.root / self.files[i]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.res)
        except Exception as e:
            raise DataError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None
        return torch.from_numpy(arr)


def _atomic_npy(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_encoder(name: str, device):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise SystemExit("error: preprocessing needs diffusers: pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:
        raise SystemExit(f"error: could not load the VAE {name!r} ({' '.join(str(e).split())[:200]})"
                         "; give a local folder or a hub name this machine can download") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images_u8: torch.Tensor) -> np.ndarray:
    """uint8 NHWC -> float32 (N, 2C, h, w) = concat(posterior mean, posterior std)."""
    x = images_u8.to(next(vae.parameters()).device).permute(0, 3, 1, 2).float() / 127.5 - 1
    d = vae.encode(x.to(vae.dtype)).latent_dist
    return torch.cat([d.mean, d.std], dim=1).float().cpu().numpy()


def check_encode_flags(a) -> None:
    """Numbers that would otherwise fail deep inside (a division, the DataLoader) or, worse,
    quietly drop images (--max-images -1 is files[:-1])."""
    if a.resolution < 8 or a.resolution % 8:
        raise DataError(f"--resolution {a.resolution} must be a positive multiple of 8 "
                        "(256 or 512)")
    for flag, v, lo, hint in (("--batch-size", a.batch_size, 1, ""),
                              ("--chunk-size", a.chunk_size, 1, ""),
                              ("--num-workers", a.num_workers, 0, ""),
                              ("--max-images", a.max_images, 1, " (or left out: all)"),
                              ("--max-chunks", a.max_chunks, 1, " (or left out: all)")):
        if v is not None and v < lo:
            raise DataError(f"{flag} must be >= {lo}{hint}, got {v}")
    if not a.wait_timeout >= 0:   # also nan
        raise DataError(f"--wait-timeout must be >= 0 seconds (0: forever), got {a.wait_timeout}")


def encode(a) -> int:
    rank, world, local_rank, _ = env_ranks()
    formats = {f.strip() for f in a.format.split(",") if f.strip()}
    if not formats or formats - {"packed", "released"}:
        raise DataError(f"--format {a.format!r}: use packed, released or packed,released")
    check_encode_flags(a)
    dest = Path(a.dest)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"--dest {dest} exists and is not a folder")
    src, out = Path(a.source).resolve(), dest.resolve()
    if out == src or src in out.parents:   # the outputs would turn into class folders
        raise DataError(f"--dest {dest} is or is inside --source {a.source}; choose a --dest "
                        "outside the image folder")
    done_packed = (dest / "packed" / "meta.json").is_file()
    done_released = (dest / "vae-sd" / "dataset.json").is_file()
    if (("packed" in formats and done_packed) or ("released" in formats and done_released)) \
            and not a.overwrite:
        raise DataError(f"--dest {dest} already holds encoded latents; pass --overwrite or "
                        "choose another --dest")
    if "packed" in formats:   # now, not after hours of encoding
        check_packed_dest(dest / "packed", a.overwrite, [a.source])
    files, labels, classes = list_images(a.source)
    if a.max_images is not None:
        files, labels = files[:a.max_images], labels[:a.max_images]
    n = len(files)
    work = dest / WORK
    index = {"source": str(Path(a.source).resolve()), "files": files, "labels": labels,
             "classes": classes, "resolution": a.resolution, "vae": a.vae,
             "chunk_size": a.chunk_size, "formats": sorted(formats)}
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    if rank == 0:
        if "released" in formats and done_released:
            # (--overwrite) vae-sd/ is rewritten in place: unfinished until the new
            # dataset.json, so that a run stopped midway never passes for complete with the
            # old labels over a mix of old and new latents
            (dest / "vae-sd" / "dataset.json").unlink(missing_ok=True)
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--dest {dest}: cannot create {work} ({e.strerror})") from None
        idx_file = work / "index.json"
        if idx_file.is_file():
            try:
                old = json.loads(idx_file.read_text())
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict):
                raise DataError(f"{idx_file} is unreadable (a damaged unfinished run); delete "
                                f"{work} to start again")
            if old.get("digest") != digest:
                raise DataError(f"{work} holds an unfinished run over other images or settings;"
                                " delete it (or pass the same flags) to start again")
        else:
            _atomic_text(idx_file, json.dumps({"digest": digest, **index}))
    else:
        t0 = time.time()   # rank 0 creates the work folder; wait for it (shared filesystem)
        while not (work / "index.json").is_file():
            if time.time() - t0 > 600:
                raise DataError(f"{work}/index.json did not appear: does every node see "
                                "--dest on a shared filesystem?")
            time.sleep(0.5)
    n_chunks = -(-n // a.chunk_size)
    mine = [c for c in range(n_chunks) if c % world == rank]
    todo = [c for c in mine if not (work / f"chunk-{c:06d}.npy").is_file()]
    device = pick_device(a.device, local_rank)
    if device.type == "cuda":   # else the loader's pinning thread puts a context on GPU 0
        torch.cuda.set_device(device)
    if rank == 0:
        print(f"[sra-fast] {n:,} images in {len(classes)} classes -> {sorted(formats)} at "
              f"{dest}; {n_chunks} chunks of {a.chunk_size} over {world} process(es)"
              f"{f', {len(mine) - len(todo)} of ours already done' if len(todo) < len(mine) else ''}",
              flush=True)
    if a.max_chunks is not None:
        todo = todo[:a.max_chunks]
    if todo:
        vae = load_encoder(a.vae, device)
        bar = progress_bar(total=sum(min(a.chunk_size, n - c * a.chunk_size) for c in todo),
                   unit="img", desc=f"encoding (rank {rank})", disable=rank != 0)
        try:
            for c in todo:
                lo, hi = c * a.chunk_size, min((c + 1) * a.chunk_size, n)
                ds = _Images(a.source, files[lo:hi], a.resolution)
                dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size,
                                                 num_workers=a.num_workers,
                                                 pin_memory=device.type == "cuda")
                out = []
                for batch in dl:
                    out.append(encode_moments(vae, batch))
                    bar.update(len(batch))
                moments = np.concatenate(out).astype(np.float32)
                if "released" in formats:
                    for j, m in enumerate(moments):
                        _atomic_npy(dest / "vae-sd" / released_name(lo + j), m)
                # the chunk's completion mark; it carries the data only when packing needs it
                _atomic_npy(work / f"chunk-{c:06d}.npy",
                            moments if "packed" in formats else np.zeros(0, np.float32))
        finally:
            bar.close()   # before any error line
    if a.max_chunks is not None:
        return 0
    if rank != 0:
        return 0
    # rank 0: wait for every chunk, then finalise
    t0, shown = time.time(), 0.0
    while True:
        missing = [c for c in range(n_chunks) if not (work / f"chunk-{c:06d}.npy").is_file()]
        if not missing:
            break
        if time.time() - shown > 60:
            print(f"[sra-fast] waiting for {len(missing)} chunk(s) from other processes",
                  flush=True)
            shown = time.time()
        if a.wait_timeout and time.time() - t0 > a.wait_timeout:
            raise DataError(f"{len(missing)} chunks never arrived (e.g. chunk {missing[0]}); "
                            "run the same command again to finish them")
        time.sleep(2.0)
    if "released" in formats:
        entries = [[released_name(i), int(labels[i])] for i in range(n)]
        _atomic_text(dest / "vae-sd" / "dataset.json", json.dumps({"labels": entries}))
    if "packed" in formats:
        first = np.load(work / "chunk-000000.npy", mmap_mode="r")
        with PackedWriter(dest / "packed", n, first.shape[1:], a.dtype, a.overwrite,
                          [a.source]) as w:
            for c in range(n_chunks):
                lo = c * a.chunk_size
                arr = np.load(work / f"chunk-{c:06d}.npy")
                w.write(lo, arr.astype(a.dtype, copy=False), labels[lo:lo + len(arr)])
            w.commit(len(classes), {"source": index["source"], "resolution": a.resolution,
                                    "vae": a.vae, "classes": classes})
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[sra-fast] done: {n:,} latents in {dest}", flush=True)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="python -m sra_fast.preprocess", description=__doc__,
                                formatter_class=RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="image folder -> SD-VAE latent moments",
                       formatter_class=HelpFormatter)
    e.add_argument("--source", required=True, help="image folder: one sub-folder per class "
                   "(ImageNet style), or with a dataset.json of labels (the released convert "
                   "output)")
    e.add_argument("--dest", required=True, help="output folder (gets packed/ and/or vae-sd/)")
    e.add_argument("--resolution", type=int, default=256, help="ADM centre crop size (256 or "
                   "512)")
    e.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="AutoencoderKL: local folder or hub name")
    e.add_argument("--format", default="packed,released",
                   help="packed, released, or both (comma separated)")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="storage dtype of the packed array")
    e.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    e.add_argument("--chunk-size", type=int, default=1024,
                   help="images per work unit (the unit of resuming)")
    e.add_argument("--num-workers", type=int, default=8, help="image-decoding workers")
    e.add_argument("--max-images", type=int, default=None,
                   help="encode only the first N images of the listing (all when left out)")
    e.add_argument("--max-chunks", type=int, default=None,
                   help="encode at most this many chunks in this process, then stop without "
                        "finalising (time-sliced jobs; run again to continue)")
    e.add_argument("--wait-timeout", type=float, default=0,
                   help="rank 0: seconds to wait for other ranks' chunks (0: forever)")
    e.add_argument("--keep-work", action="store_true", help="keep DATA/.sra-work")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a finished packed/ dataset, rewrite a finished vae-sd/ in place")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    c = sub.add_parser("convert", help="released vae-sd layout -> packed folder",
                       formatter_class=HelpFormatter)
    c.add_argument("--source", required=True, help="folder holding vae-sd/ (or vae-sd itself)")
    c.add_argument("--dest", required=True, help="packed output folder")
    c.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="storage dtype of the packed array")
    c.add_argument("--threads", type=int, default=16, help="file-reading threads")
    c.add_argument("--num-classes", type=int, default=None,
                   help="the label count (when left out: 1000, as the released trainers, or "
                        "the largest label + 1 above that)")
    c.add_argument("--overwrite", action="store_true", help="replace a finished packed dataset")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "encode":
            return encode(a)
        out = convert_released_to_packed(a.source, a.dest, a.dtype, a.overwrite, a.threads,
                                         num_classes=a.num_classes)
        print(f"[sra-fast] wrote {out}")
        return 0
    except DataError as e:
        stderr_line(f"error: {error_line(e)}")
        return 2
    except OSError as e:   # e.g. a full disk or a read-only --dest: finished chunks are kept
        where = f"{e.filename}: " if e.filename else ""
        stderr_line(f"error: {where}{e.strerror or error_line(e)}")
        return 2
    except torch.OutOfMemoryError as e:
        stderr_line("error: " + out_of_memory_line(
            e, "while encoding", f"--batch-size {a.batch_size} images per encoder batch; "
            "pass a smaller one (finished chunks are kept)"))
        return 2


if __name__ == "__main__":
    sys.exit(main())
