"""The image pack's format (`pack.py` makes packs; `sources.PackedSource` reads them): per split,
SPLIT.array_record (one encoded canvas-sized image a record) and SPLIT.labels.npy, and PACK_META
last (the canvas, the encoding, each split's classes, size and the fingerprint of what it came
from). Here: the paths and the checked metadata, the encoder of a record, and the steps that
write a split and the metadata (each under a temporary name, then renamed: until PACK_META is in
place the folder is no pack).
"""

import concurrent.futures
import io
import json
import logging
import os

import numpy as np
from PIL import Image

from simclr_jax.data import images as image_files
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
            f"(python -m simclr_jax.data.pack DIR {root})."
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
