"""The named splits of each kind of dataset, opened as random-access sources (`sources.py`).

Three kinds: the embedded scikit-learn handwritten digits (no network, no files), an image folder
in torchvision's ImageFolder layout (`folders.py`) or its pack (`pack.py`), and any prepared tfds
image set, read through `tfds.data_source` (array_record; no TensorFlow needed to read). A split
name may join several with '+' ('train+unlabelled'). What a run does with them (the roles, the
validation split, caching, statistics) is `data/dataset.py`'s.
"""

import contextlib
import difflib
import logging
import os
import shlex

import numpy as np

from simclr_jax.data import folders, pack_format, sources
from simclr_jax.errors import DataError

log = logging.getLogger(__name__)

DIGITS = "digits"
FOLDER = "folder"
TFDS_DEFAULT_DIR = "~/tensorflow_datasets"  # tfds' default data_dir (without TFDS_DATA_DIR)
READABLE_FORMATS = ("array_record", "parquet")  # the random-access formats tfds.data_source reads


def open_splits(data_cfg) -> tuple[dict, int]:
    """({'pretrain', 'train', 'test'}: source, number of classes) of config.data's dataset: the
    splits its `pretrain_split`, `train_split` and `test_split` name, each opened once."""
    if data_cfg.name == DIGITS:
        return _digits_splits(data_cfg)
    if data_cfg.name == FOLDER:
        return _folder_splits(data_cfg)
    return _tfds_splits(data_cfg)


def split_names(data_cfg) -> dict[str, list[str]]:
    """{'pretrain': [...], 'train': [...], 'test': [...]}: 'train+unlabelled' names two."""
    return {
        role: [p.strip() for p in str(data_cfg[f"{role}_split"]).split("+") if p.strip()]
        for role in ("pretrain", "train", "test")
    }


def _assemble(data_cfg, open_split) -> dict:
    """Each role's source from `open_split(name)`, every split opened once."""
    opened, out = {}, {}
    for role, names in split_names(data_cfg).items():
        for n in names:
            if n not in opened:
                opened[n] = open_split(n)
        parts = [opened[n] for n in names]
        out[role] = parts[0] if len(parts) == 1 else sources.Concat(parts)
    return out


def canvas_size(data_cfg, native: int | None = None) -> int:
    """The host canvas images are decoded and resized to: config.data.canvas, else the dataset's
    own fixed size (CIFAR-10's 32), else config.data.image_size."""
    return int(data_cfg.canvas or native or data_cfg.image_size)


def _digits_splits(data_cfg) -> tuple[dict, int]:
    train, test = load_digits(data_cfg.image_size)
    known = {"train": train, "test": test}

    def open_split(name):
        if name not in known:
            raise DataError(
                f"The digits have splits 'train' and 'test', not {name!r}: set "
                f"config.data.pretrain_split / train_split / test_split to one of them."
            )
        return known[name]

    return _assemble(data_cfg, open_split), 10


def load_digits(image_size: int = 32) -> tuple:
    """scikit-learn's 1,797 8x8 digits (0..16 ink levels) as uint8 RGB, 80/20 split, fixed order:
    (train, test) ArraySources."""
    from PIL import Image
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    small = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
            for im in small
        ]
    )
    images = np.repeat(big[..., None], 3, axis=-1)  # (1797, S, S, 3)
    labels = raw.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed: independent of config.seed
    n_train = int(0.8 * len(labels))
    tr, te = order[:n_train], order[n_train:]
    return (
        sources.ArraySource(images[tr], labels[tr], "digits/train"),
        sources.ArraySource(images[te], labels[te], "digits/test"),
    )


def _folder_splits(data_cfg) -> tuple[dict, int]:
    """An image folder in the ImageFolder layout (folders.LAYOUT): each named split scanned and
    decoded once (folders.verify drops, and names, the files that will not decode)."""
    if not data_cfg.data_dir:
        raise DataError(
            f"config.data.name=folder needs config.data.data_dir=DIR, a folder laid out as "
            f"{folders.LAYOUT}."
        )
    root = os.path.abspath(os.path.expanduser(data_cfg.data_dir))
    if pack_format.is_pack(root):
        return _packed_splits(data_cfg, root)
    canvas = canvas_size(data_cfg)

    def open_split(name):
        split = folders.scan_split(root, name)
        split, _ = folders.verify(
            root, split, canvas, data_cfg.max_bad_fraction, data_cfg.read_threads
        )
        return sources.FolderSource(root, split, canvas)

    return _labelled_classes(_assemble(data_cfg, open_split))


def _packed_splits(data_cfg, root: str) -> tuple[dict, int]:
    """A folder packed by `python -m simclr_jax.data.pack` (pack.py): its splits' array_record files."""
    meta = pack_format.read_meta(root)
    canvas = canvas_size(data_cfg, meta["canvas"])
    if canvas != meta["canvas"]:
        log.warning(
            "%s was packed at %d px and config.data.canvas=%d: every read resizes again (pack at "
            "the canvas you train at).",
            root,
            meta["canvas"],
            canvas,
        )

    def open_split(name):
        if name not in meta["splits"]:
            raise DataError(
                f"The pack {root} has splits {sorted(meta['splits'])}, not {name!r}: set "
                f"config.data.pretrain_split / train_split / test_split to those, or pack "
                f"{name!r} too (python -m simclr_jax.data.pack {meta['source']} NEW_OUT --canvas "
                f"{meta['canvas']})."
            )
        return sources.PackedSource(root, name, meta, canvas)

    return _labelled_classes(_assemble(data_cfg, open_split))


def _labelled_classes(splits: dict) -> tuple[dict, int]:
    """`splits` and the number of classes of its train split, checked against its test split's."""
    train, test = splits["train"], splits["test"]
    if train.classes and test.classes and train.classes != test.classes:
        raise DataError(
            f"The class folders of {train.name} {list(train.classes)} and {test.name} "
            f"{list(test.classes)} differ; both labelled splits need the same classes."
        )
    return splits, len(train.classes)


def prepare_command(name: str, data_dir: str) -> str:
    """The command that prepares `name` once into `data_dir` in a format tfds.data_source reads."""
    return (
        f"pip install tensorflow tensorflow-datasets && tfds build {name} --data_dir "
        f"{shlex.quote(data_dir)} --file_format=array_record"
    )


def _not_prepared(name: str, data_dir: str, why: str) -> DataError:
    return DataError(
        f"Dataset {name!r} is not prepared in {data_dir} ({why}). Prepare it once (TensorFlow and "
        f"network are needed to prepare it, not to read it):\n"
        f"  {prepare_command(name, data_dir)}\n"
        f"then rerun with --config.data.data_dir={data_dir} (or copy a prepared {name}/ folder "
        f"there). --config.data.name=digits needs nothing prepared."
    )


@contextlib.contextmanager
def _quiet_absl():
    """absl's (tfds') warnings off for a moment; errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tfds_splits(data_cfg) -> tuple[dict, int]:
    """The named splits of a prepared tfds dataset, read through tfds.data_source with the images
    left encoded (sources.TfdsSource decodes them at each read)."""
    name = data_cfg.name
    where = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DIR
    where = os.path.abspath(os.path.expanduser(where))
    builder = prepared_builder(name, where)
    features = builder.info.features
    if "image" not in features:
        raise DataError(
            f"Dataset {name!r} has features {list(features)}; simclr-jax needs 'image'."
        )
    shape = features["image"].shape
    canvas = canvas_size(data_cfg, shape[0] if shape[0] and shape[0] == shape[1] else None)

    def open_split(split):
        known = sorted(builder.info.splits)
        if known and split not in known:
            raise DataError(
                f"Dataset {name!r} has no split {split!r} (it has {known}): set "
                f"config.data.pretrain_split / train_split / test_split to splits it has."
            )
        return open_tfds_split(builder, name, where, split, canvas)

    num_classes = features["label"].num_classes if "label" in features else 0
    return _assemble(data_cfg, open_split), num_classes


def open_tfds_split(builder, name: str, where: str, split: str, canvas: int):
    """One split of the prepared tfds dataset `name` in `where` as a `sources.TfdsSource`, its
    images left encoded until read; unreadable files are a DataError naming the fix."""
    import tensorflow_datasets as tfds

    try:
        found = tfds.data_source(
            name,
            split=split,
            data_dir=where,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        # Reads every record once (its labels; later starts read them from the label cache,
        # kept while the files' sizes and mtimes hold): damage shows here.
        return sources.TfdsSource(found, name, split, str(builder.version), canvas)
    except Exception as err:
        raise DataError(
            f"Could not read the {split!r} split of {name!r} under {where} "
            f"({type(err).__name__}: {err}). The prepared files look damaged: delete "
            f"{name}/ there and prepare it again (`{prepare_command(name, where)}`), or use "
            f"another copy."
        ) from err


def check_tfds_name(name: str) -> None:
    """DataError, one line with the nearest known name, when tfds knows no dataset `name` (its
    'name/config:version' forms are judged by the name): checked before anything says 'not
    prepared', which would send the user to prepare a dataset that does not exist."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    base = name.split("/")[0].split(":")[0]
    try:
        tfds.builder_cls(base)
    except DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(base, known, n=1)
        hint = f"did you mean {close[0]!r}? Else set " if close else "set "
        raise DataError(
            f"config.data.name={name!r} is not a tfds dataset: {hint}'digits', 'folder' (with "
            f"config.data.data_dir=DIR) or a tfds image dataset's name (`tfds.list_builders()` "
            f"lists them)."
        ) from None


def prepared_builder(name: str, where: str):
    """The tfds builder of `name` prepared in `where`, in a format tfds.data_source reads."""
    import tensorflow_datasets as tfds

    check_tfds_name(name)
    if not os.path.isdir(where):  # checked first: tfds would report an empty dataset
        raise _not_prepared(name, where, "the directory does not exist")
    try:
        with _quiet_absl():  # tfds warns of each folder it finds empty before we can explain
            builder = tfds.builder(name, data_dir=where)
            prepared = builder.is_prepared()
    except Exception as err:  # unknown name: tfds' message then lists every name it knows
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"Unknown tfds dataset config.data.name={name!r} ({first}): set 'digits', 'folder' "
            f"or a tfds image dataset's name (`tfds.list_builders()` lists them)."
        ) from err
    if not prepared:
        raise _not_prepared(name, where, f"no prepared version {builder.version} there")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in READABLE_FORMATS:
        raise _not_prepared(
            name, where, f"it is prepared as {file_format}, which tfds.data_source cannot read"
        )
    return builder
