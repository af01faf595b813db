"""An image folder, or a prepared tfds dataset, packed once into array_record files of
canvas-sized images: faster to stream, and a dataset that travels without tensorflow-datasets.

    python -m simclr_jax.pack DIR OUT --canvas 256          # then --config.data.data_dir=OUT
    python -m simclr_jax.pack --tfds cifar10 --data-dir TFDS_DIR OUT --encoding jpeg --quality 98

DIR is the ImageFolder layout a run reads (`folders.LAYOUT`); OUT gets, per split, SPLIT.array_record
(one record per readable image, in the folder's order: decoded, made RGB and resized to the canvas
exactly as a run would, then encoded) and SPLIT.labels.npy, and last `PACK_META` (the canvas, the
encoding, each split's classes, size, and the fingerprint of the files it came from). A run points
`data.data_dir` at OUT with `data.name=folder` as before and reads the pack instead of the files:
no directory walk and no decoding pass at start-up, one file per split, and a decode at each step
of a small image instead of a full-size photograph (benchmarks/README.md, "Input pipeline").
With `--tfds NAME` the splits of a tfds dataset prepared under TFDS_DIR are packed the same way,
read as a run reads them (`sources.TfdsSource`; the canvas defaults to the dataset's own side),
in their order and with their labels and class names.

The default encoding, PNG, is lossless: a packed split gives the same pixels, so the same run, as
its folder at the same canvas. `--encoding jpeg` (4:4:4, `--quality`, default 95) makes smaller
files that decode faster, and changes pixels by JPEG's error (all of CIFAR-10 at q98: 55 MiB,
0.45 grey levels off on average; benchmarks/README.md, "Carrying all of CIFAR-10 to the device").
Each image is decoded once. Unreadable files are skipped and named, as a run over the folder
skips them (`folders.verify`, `--max-bad-fraction`); in a tfds dataset one is an error.
"""

import argparse
import concurrent.futures
import functools
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


def encode(image: np.ndarray, encoding: str, quality: int = JPEG_QUALITY) -> bytes:
    """(S, S, 3) uint8 -> PNG (lossless) or JPEG (4:4:4, Huffman tables optimised) bytes.

    The optimised tables are lossless (the same pixels as the standard ones) and, at 32 px, a
    third smaller: at that size the standard tables are most of the file."""
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(
            buf, format="JPEG", quality=quality, subsampling=0, optimize=True
        )
    return buf.getvalue()


def write_records(
    path: str, items, load, encoding: str, quality: int, num_threads: int
) -> list[str | None]:
    """Each of `items` decoded once (`load(item)` -> canvas image, on a thread pool), encoded and
    written to the array_record file PATH in order. Returns, per item, None (written) or why it
    would not decode (a BadImage's reason; the item is skipped)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    def one(item):
        try:
            return encode(load(item), encoding, quality), None
        except image_files.BadImage as err:
            return None, err.reason

    reasons = []
    writer = ArrayRecordWriter(path, "group_size:1")  # one record per chunk: random access
    try:
        with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            for start in range(0, len(items), _CHUNK):
                for record, reason in pool.map(one, items[start : start + _CHUNK]):
                    if record is not None:
                        writer.write(record)
                    reasons.append(reason)
    finally:
        writer.close()
    return reasons


def finish_split(out: str, split: str, labels: np.ndarray, entry: dict) -> dict:
    """The split's labels saved and its records renamed into place; returns `entry`."""
    np.save(labels_path(out, split), labels.astype(np.int32))
    os.replace(record_path(out, split) + ".partial", record_path(out, split))
    n, skipped = entry["num_examples"], len(entry["skipped"])
    log.info("Packed %d images of %s into %s (%d skipped)", n, split, out, skipped)
    return entry


def pack_split(
    root: str,
    out: str,
    split: str,
    canvas: int,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
    quality: int = JPEG_QUALITY,
) -> dict:
    """Packs ROOT/SPLIT into OUT/SPLIT.array_record and OUT/SPLIT.labels.npy, decoding each file
    once (the files that will not decode are skipped and named, as `folders.verify` does);
    returns the split's entry of PACK_META."""
    found = folders.scan_split(root, split)
    paths = [os.path.join(root, f) for f in found.files]
    tmp = record_path(out, split) + ".partial"
    load = functools.partial(image_files.decode, canvas=canvas)
    reasons = write_records(tmp, paths, load, encoding, quality, num_threads)
    try:
        found, skipped = folders.drop_unreadable(root, found, reasons, max_bad_fraction)
    except DataError:
        os.remove(tmp)
        raise
    entry = {
        "num_examples": len(found),
        "classes": list(found.classes),
        "fingerprint": found.fingerprint(),
        "skipped": skipped,
    }
    return finish_split(out, split, found.labels, entry)


def check_args(out: str, canvas: int, encoding: str, quality: int) -> None:
    """The arguments every pack takes, checked before any work (DataError names the fix)."""
    if encoding not in ENCODINGS:
        raise DataError(f"--encoding {encoding!r}: use one of {', '.join(ENCODINGS)}.")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: give a JPEG quality from 1 to 100 (e.g. 95).")
    if canvas < 1:
        raise DataError(f"--canvas {canvas}: give the side in pixels a run will read (e.g. 256).")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out} already exists and is not an empty folder: give a new OUT folder.")


def new_meta(source: str, canvas: int, encoding: str, quality: int) -> dict:
    """PACK_META's fields but the splits; `source` is what was packed, as this module's
    arguments (DIR, or --tfds NAME --data-dir DIR): a pack can name how to make it again."""
    meta = {"kind": KIND, "version": VERSION, "canvas": canvas, "encoding": encoding}
    if encoding == "jpeg":  # absent from packs made before --quality (then JPEG_QUALITY)
        meta["quality"] = quality
    return {**meta, "source": source, "splits": {}}


def write_meta(out: str, meta: dict) -> dict:
    """PACK_META written last (under a temporary name, then renamed): until then OUT is no pack."""
    with open(os.path.join(out, PACK_META + ".partial"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, PACK_META + ".partial"), os.path.join(out, PACK_META))
    return meta


def pack(
    root: str,
    out: str,
    canvas: int,
    splits: list[str] | None = None,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
    quality: int = JPEG_QUALITY,
) -> dict:
    """Packs the splits of the image folder ROOT (default: every split folder in it) into OUT,
    which must not exist or be empty; returns PACK_META's contents."""
    root = os.path.abspath(os.path.expanduser(root))
    out = os.path.abspath(os.path.expanduser(out))
    check_args(out, canvas, encoding, quality)
    if not os.path.isdir(root):
        raise DataError(
            f"{root} is not a folder: give an image folder laid out as {folders.LAYOUT}."
        )
    if splits is None:
        splits = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        if not splits:
            raise DataError(f"{root} has no split folders: lay it out as {folders.LAYOUT}.")
    for split in splits:  # every layout error before any work
        folders.scan_split(root, split)
    os.makedirs(out, exist_ok=True)
    meta = new_meta(root, canvas, encoding, quality)
    for split in splits:
        meta["splits"][split] = pack_split(
            root, out, split, canvas, encoding, max_bad_fraction, num_threads, quality
        )
    return write_meta(out, meta)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simclr_jax.pack", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="[DIR] OUT",
        help=f"the image folder ({folders.LAYOUT}), "
        "unless --tfds; OUT: a new folder for the pack (then --config.data.data_dir=OUT)",
    )
    parser.add_argument("--tfds", default="", metavar="NAME", help="pack this tfds dataset")
    parser.add_argument("--data-dir", default="", help="with --tfds: where it is prepared")
    parser.add_argument(
        "--canvas",
        type=int,
        default=0,
        help="side in pixels (config.data.canvas); with --tfds default the dataset's own",
    )
    parser.add_argument("--splits", default="", help="comma-separated; default: every split")
    parser.add_argument("--encoding", default="png", choices=ENCODINGS)
    parser.add_argument("--quality", type=int, help=f"JPEG quality (default {JPEG_QUALITY})")
    parser.add_argument("--max-bad-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="0: one per CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.tfds else 2):
        parser.error("give DIR OUT, or --tfds NAME --data-dir DIR OUT")
    if args.quality is not None and args.encoding != "jpeg":
        parser.error("--quality is for --encoding jpeg")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = [s for s in args.splits.split(",") if s] or None
    quality = JPEG_QUALITY if args.quality is None else args.quality
    out = args.paths[-1]
    common = dict(splits=splits, encoding=args.encoding, num_threads=args.threads, quality=quality)
    try:
        if args.tfds:
            from simclr_jax.tfds_pack import pack_tfds  # imports tensorflow-datasets

            meta = pack_tfds(args.tfds, args.data_dir, out, args.canvas, **common)
        else:
            bad = args.max_bad_fraction
            meta = pack(args.paths[0], out, args.canvas, max_bad_fraction=bad, **common)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{k} {v['num_examples']}" for k, v in meta["splits"].items())
    how = f"jpeg q{quality}" if args.encoding == "jpeg" else args.encoding
    print(f"Packed {sizes} at {meta['canvas']} px ({how}) into {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
