"""A prepared tfds dataset packed into the image pack format (`pack.py`): its splits read as a run
reads them (`sources.TfdsSource`; the canvas defaults to the dataset's own side), in their order
and with their labels and class names, so that a run on the pack needs no tensorflow-datasets.

    python -m simclr_jax.pack --tfds cifar10 --data-dir TFDS_DIR OUT --encoding jpeg --quality 98
"""

import os

from simclr_jax import pack
from simclr_jax.errors import DataError


def pack_tfds(
    name: str,
    data_dir: str,
    out: str,
    canvas: int = 0,
    splits: list[str] | None = None,
    encoding: str = "png",
    num_threads: int = 0,
    quality: int = pack.JPEG_QUALITY,
) -> dict:
    """Packs the splits (default: all) of the tfds dataset NAME prepared under DATA_DIR into OUT
    at `canvas` (0: the dataset's own side), read as a run reads it (`sources.TfdsSource`): a
    run then needs no tensorflow-datasets. Returns PACK_META's contents."""
    from simclr_jax import splits as dataset_splits  # it opens packs: imported here, not at the top

    where = os.path.abspath(os.path.expanduser(data_dir))
    out = os.path.abspath(os.path.expanduser(out))
    builder = dataset_splits._prepared_builder(
        name, where
    )  # a DataError naming the fix if unprepared
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"Dataset {name!r} has features {list(features)}; packing needs 'image'.")
    canvas = canvas or features["image"].shape[0] or 0  # 0 (no side of its own): an error
    pack.check_args(out, canvas, encoding, quality)
    known = sorted(builder.info.splits)  # may be empty (a mock): then --splits names them
    if unknown := sorted(set(splits or ()) - set(known or splits)):
        raise DataError(f"{name!r} has no split {unknown[0]!r}: it has {known}.")
    if not (splits := splits or known):
        raise DataError(f"{name!r} lists no splits: name them with --splits (e.g. train,test).")
    classes = list(features["label"].names) if "label" in features else []
    os.makedirs(out, exist_ok=True)
    meta = pack.new_meta(f"--tfds {name} --data-dir {where}", canvas, encoding, quality)
    for split in splits:
        source = _tfds_source(builder, name, where, split, canvas)
        meta["splits"][split] = _pack_source(
            source, out, split, classes, encoding, quality, num_threads
        )
    return pack.write_meta(out, meta)


def _tfds_source(builder, name: str, where: str, split: str, canvas: int):
    """One split as a run reads it: `sources.TfdsSource`, the images left encoded until read."""
    import tensorflow_datasets as tfds

    from simclr_jax import sources  # sources reads packs: imported here, not at the top

    found = tfds.data_source(
        name,
        split=split,
        data_dir=where,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return sources.TfdsSource(found, name, split, str(builder.version), canvas)


def _pack_source(source, out, split, classes, encoding, quality, num_threads) -> dict:
    """A source's images (`source.read`) packed as SPLIT; every one must decode (a prepared
    dataset's do: one that does not is a damaged copy)."""
    tmp = pack.record_path(out, split) + ".partial"
    load = lambda i: source.read([i])[0]  # noqa: E731
    reasons = pack.write_records(tmp, range(len(source)), load, encoding, quality, num_threads)
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
    return pack.finish_split(out, split, source.labels, entry)
