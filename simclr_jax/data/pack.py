"""An image folder, or a prepared tfds dataset, packed once into array_record files of
canvas-sized images: faster to stream, and a dataset that travels without tensorflow-datasets.

    python -m simclr_jax.data.pack DIR OUT --canvas 256          # then --config.data.data_dir=OUT
    python -m simclr_jax.data.pack --tfds cifar10 --data-dir TFDS_DIR OUT --encoding jpeg --quality 98

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
import functools
import logging
import os
import sys

from simclr_jax.data import catalog as dataset_splits
from simclr_jax.data import folders, pack_format
from simclr_jax.data import images as image_files
from simclr_jax.errors import DataError

log = logging.getLogger(__name__)


def pack_split(
    root: str,
    out: str,
    split: str,
    canvas: int,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
    quality: int = pack_format.JPEG_QUALITY,
) -> dict:
    """Packs ROOT/SPLIT into OUT/SPLIT.array_record and OUT/SPLIT.labels.npy, decoding each file
    once (the files that will not decode are skipped and named, as `folders.verify` does);
    returns the split's entry of pack_format.PACK_META."""
    found = folders.scan_split(root, split)
    paths = [os.path.join(root, f) for f in found.files]
    tmp = pack_format.record_path(out, split) + ".partial"
    load = functools.partial(image_files.decode, canvas=canvas)
    reasons = pack_format.write_records(tmp, paths, load, encoding, quality, num_threads)
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
    return pack_format.finish_split(out, split, found.labels, entry)


def pack(
    root: str,
    out: str,
    canvas: int,
    splits: list[str] | None = None,
    encoding: str = "png",
    max_bad_fraction: float = 0.1,
    num_threads: int = 0,
    quality: int = pack_format.JPEG_QUALITY,
) -> dict:
    """Packs the splits of the image folder ROOT (default: every split folder in it) into OUT,
    which must not exist or be empty; returns pack_format.PACK_META's contents."""
    root = os.path.abspath(os.path.expanduser(root))
    out = os.path.abspath(os.path.expanduser(out))
    pack_format.check_args(out, canvas, encoding, quality)
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
    meta = pack_format.new_meta(root, canvas, encoding, quality)
    for split in splits:
        meta["splits"][split] = pack_split(
            root, out, split, canvas, encoding, max_bad_fraction, num_threads, quality
        )
    return pack_format.write_meta(out, meta)


def pack_tfds(
    name: str,
    data_dir: str,
    out: str,
    canvas: int = 0,
    splits: list[str] | None = None,
    encoding: str = "png",
    num_threads: int = 0,
    quality: int = pack_format.JPEG_QUALITY,
) -> dict:
    """Packs the splits (default: all) of the tfds dataset NAME prepared under DATA_DIR into OUT
    at `canvas` (0: the dataset's own side), read as a run reads it (`sources.TfdsSource`): a
    run then needs no tensorflow-datasets. Returns PACK_META's contents."""
    where = os.path.abspath(os.path.expanduser(data_dir))
    out = os.path.abspath(os.path.expanduser(out))
    builder = dataset_splits.prepared_builder(name, where)  # a DataError if it is not prepared
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"Dataset {name!r} has features {list(features)}; packing needs 'image'.")
    canvas = canvas or features["image"].shape[0] or 0  # 0 (no side of its own): an error
    pack_format.check_args(out, canvas, encoding, quality)
    known = sorted(builder.info.splits)  # may be empty (a mock): then --splits names them
    if unknown := sorted(set(splits or ()) - set(known or splits)):
        raise DataError(f"{name!r} has no split {unknown[0]!r}: it has {known}.")
    if not (splits := splits or known):
        raise DataError(f"{name!r} lists no splits: name them with --splits (e.g. train,test).")
    classes = list(features["label"].names) if "label" in features else []
    os.makedirs(out, exist_ok=True)
    meta = pack_format.new_meta(f"--tfds {name} --data-dir {where}", canvas, encoding, quality)
    for split in splits:
        source = dataset_splits.open_tfds_split(builder, name, where, split, canvas)
        meta["splits"][split] = _pack_source(
            source, out, split, classes, encoding, quality, num_threads
        )
    return pack_format.write_meta(out, meta)


def _pack_source(source, out, split, classes, encoding, quality, num_threads) -> dict:
    """A source's images (`source.read`) packed as SPLIT; every one must decode (a prepared
    dataset's do: one that does not is a damaged copy)."""
    tmp = pack_format.record_path(out, split) + ".partial"
    load = lambda i: source.read([i])[0]  # noqa: E731
    reasons = pack_format.write_records(
        tmp, range(len(source)), load, encoding, quality, num_threads
    )
    if bad := [i for i, reason in enumerate(reasons) if reason is not None]:
        os.remove(tmp)
        raise DataError(
            f"{len(bad)} images of {source.name} do not decode (the first, #{bad[0]}: "
            f"{reasons[bad[0]]}): prepare the dataset again."
        )
    entry = {
        "num_examples": len(source),
        "classes": classes,
        "fingerprint": source.identity()["fingerprint"],
        "skipped": [],
    }
    return pack_format.finish_split(out, split, source.labels, entry)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simclr_jax.data.pack", description=__doc__.splitlines()[0]
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
    parser.add_argument("--encoding", default="png", choices=pack_format.ENCODINGS)
    parser.add_argument(
        "--quality", type=int, help=f"JPEG quality (default {pack_format.JPEG_QUALITY})"
    )
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
    quality = pack_format.JPEG_QUALITY if args.quality is None else args.quality
    out = args.paths[-1]
    common = dict(splits=splits, encoding=args.encoding, num_threads=args.threads, quality=quality)
    try:
        if args.tfds:
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
