"""An image folder packed once into array_record files of canvas-sized images: faster to stream.

    python -m simclr_jax.pack DIR OUT --canvas 256          # then --config.data.data_dir=OUT

DIR is the ImageFolder layout a run reads (`folders.LAYOUT`); OUT gets, per split, SPLIT.array_record
(one record per readable image, in the folder's order: decoded, made RGB and resized to the canvas
exactly as a run would, then encoded) and SPLIT.labels.npy, and last `PACK_META` (the canvas, the
encoding, each split's classes, size, and the fingerprint of the files it came from). A run points
`data.data_dir` at OUT with `data.name=folder` as before and reads the pack instead of the files:
no directory walk and no decoding pass at start-up, one file per split, and a decode at each step
of a small image instead of a full-size photograph (benchmarks/README.md, "Input pipeline").

The default encoding, PNG, is lossless: a packed split gives the same pixels, so the same run, as
its folder at the same canvas. `--encoding jpeg` (quality 95) makes smaller files that decode
faster, and changes pixels by JPEG's error. Unreadable files are skipped and named, as a run over
the folder skips them (`folders.verify`, `--max-bad-fraction`).
"""

import argparse
import concurrent.futures
import io
import json
import logging
import os
import sys

import numpy as np
from PIL import Image

from simclr_jax import folders
from simclr_jax import images as image_files
from simclr_jax.errors import DataError

log = logging.getLogger(__name__)

PACK_META = "simclr_pack.json"
KIND = "simclr-jax image pack"
VERSION = 1
ENCODINGS = ("png", "jpeg")
JPEG_QUALITY = 95
_CHUNK = 1024  # images encoded per batch of the thread pool (bounds what is held in memory)


def is_pack(root: str) -> bool:
    return os.path.isfile(os.path.join(root, PACK_META))


def record_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.array_record")


def labels_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.labels.npy")


def read_meta(root: str) -> dict:
    """OUT's PACK_META, checked: a DataError naming the fix for a pack that cannot be read."""
    path = os.path.join(root, PACK_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(
            f"Could not read {path} ({type(err).__name__}: {err}): pack the folder again "
            f"(python -m simclr_jax.pack DIR {root})."
        ) from err
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise DataError(
            f"{path} is not a version-{VERSION} {KIND} (kind {meta.get('kind')!r}, version "
            f"{meta.get('version')!r}): pack the folder again with this version of simclr-jax."
        )
    return meta


def encode(image: np.ndarray, encoding: str) -> bytes:
    """(S, S, 3) uint8 -> PNG (lossless) or JPEG (quality JPEG_QUALITY, 4:4:4) bytes."""
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def pack_split(
    root: str,
    out: str,
    split: str,
    canvas: int,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
) -> dict:
    """Packs ROOT/SPLIT into OUT/SPLIT.array_record and OUT/SPLIT.labels.npy (each written under a
    temporary name, then renamed); returns the split's entry of PACK_META."""
    from array_record.python.array_record_module import ArrayRecordWriter

    found = folders.scan_split(root, split)
    found, skipped = folders.verify(root, found, canvas, max_bad_fraction, num_threads)
    target, tmp = record_path(out, split), record_path(out, split) + ".partial"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: random access

    def one(name: str) -> bytes:
        return encode(image_files.decode(os.path.join(root, name), canvas), encoding)

    try:
        workers = num_threads or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(found), _CHUNK):
                for record in pool.map(one, found.files[start : start + _CHUNK]):
                    writer.write(record)
    finally:
        writer.close()
    np.save(labels_path(out, split), found.labels.astype(np.int32))
    os.replace(tmp, target)
    log.info("Packed %d images of %s into %s (%d skipped)", len(found), split, target, len(skipped))
    return {
        "num_examples": len(found),
        "classes": list(found.classes),
        "fingerprint": found.fingerprint(),
        "skipped": skipped,
    }


def pack(
    root: str,
    out: str,
    canvas: int,
    splits: list[str] | None = None,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
) -> dict:
    """Packs the splits of the image folder ROOT (default: every split folder in it) into OUT,
    which must not exist or be empty; returns PACK_META's contents."""
    root = os.path.abspath(os.path.expanduser(root))
    out = os.path.abspath(os.path.expanduser(out))
    if encoding not in ENCODINGS:
        raise DataError(f"--encoding {encoding!r}: use one of {', '.join(ENCODINGS)}.")
    if canvas < 1:
        raise DataError(f"--canvas {canvas}: give the side in pixels a run will read (e.g. 256).")
    if not os.path.isdir(root):
        raise DataError(
            f"{root} is not a folder: give an image folder laid out as {folders.LAYOUT}."
        )
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out} already exists and is not an empty folder: give a new OUT folder.")
    if splits is None:
        splits = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        if not splits:
            raise DataError(f"{root} has no split folders: lay it out as {folders.LAYOUT}.")
    for split in splits:  # every layout error before any work
        folders.scan_split(root, split)
    os.makedirs(out, exist_ok=True)
    meta = {
        "kind": KIND,
        "version": VERSION,
        "canvas": canvas,
        "encoding": encoding,
        "source": root,
        "splits": {},
    }
    for split in splits:
        meta["splits"][split] = pack_split(
            root, out, split, canvas, encoding, max_bad_fraction, num_threads
        )
    with open(os.path.join(out, PACK_META + ".partial"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, PACK_META + ".partial"), os.path.join(out, PACK_META))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simclr_jax.pack", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dir", help=f"the image folder ({folders.LAYOUT})")
    parser.add_argument("out", help="a new folder for the pack (then --config.data.data_dir=OUT)")
    parser.add_argument(
        "--canvas", type=int, required=True, help="side in pixels (config.data.canvas)"
    )
    parser.add_argument("--splits", default="", help="comma-separated; default: every split folder")
    parser.add_argument("--encoding", default="png", choices=ENCODINGS)
    parser.add_argument("--max-bad-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="0: one per CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = [s for s in args.splits.split(",") if s] or None
    try:
        meta = pack(
            args.dir,
            args.out,
            args.canvas,
            splits,
            args.encoding,
            args.max_bad_fraction,
            args.threads,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{k} {v['num_examples']}" for k, v in meta["splits"].items())
    print(f"Packed {sizes} at {args.canvas} px ({args.encoding}) into {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
