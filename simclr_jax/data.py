"""Datasets: the splits a run reads, as random-access sources (`sources.py`), never as a whole.

Three kinds: the embedded scikit-learn handwritten digits (no network, no files), an image folder
in torchvision's ImageFolder layout (`images.py`), and any prepared tfds image set, read through
`tfds.data_source` (array_record; no TensorFlow needed to read). A run names the split it
pretrains on (possibly unlabelled, or several joined with '+') and the labelled train and test
splits the evaluations read. Also: the pretraining split's channel statistics (the encoder's input
normalisation), the data's identity that checkpoints record, and the class-balanced labelled
subset used downstream.
"""

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import shlex
from typing import Any

import numpy as np

from simclr_jax import images as image_files
from simclr_jax import pack, sources
from simclr_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DIGITS = "digits"
# The CIFAR-10 statistics the ResNet applied itself before the normalisation moved to the data
# side: what runs whose config has no data.mean / data.std (written before) were trained with.
LEGACY_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_READ_CHUNK = 2048  # examples per read of the statistics' pass; bounds its memory
STATS_MAX = 50_000  # images the channel statistics are computed on (evenly spaced)
FOLDER = "folder"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The splits of a run, as random-access sources (`sources.py`): what SimCLR pretrains on
    (`pretrain`, labels unused: may be unlabelled), the labelled train split (the kNN monitor, the
    downstream stage's labelled subset) and the test split."""

    name: str
    pretrain: Any
    train: Any
    test: Any
    num_classes: int

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pretraining images' pixels in [0, 1] (float64 sums),
        over at most STATS_MAX of them, evenly spaced (all of CIFAR-10's train split)."""
        n = len(self.pretrain)
        ids = np.unique(np.linspace(0, n - 1, min(n, STATS_MAX)).round().astype(np.int64))
        total, sq, count = np.zeros(3), np.zeros(3), 0
        for start in range(0, len(ids), _READ_CHUNK):
            x = self.pretrain.read(ids[start : start + _READ_CHUNK]).astype(np.float64) / 255.0
            total += x.sum(axis=(0, 1, 2))
            sq += (x * x).sum(axis=(0, 1, 2))
            count += x[..., 0].size
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
        return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def input_stats(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """config.data's (mean, std); the CIFAR constants the ResNet applied itself for a config
    written before they were keys (LEGACY_STATS)."""
    mean, std = (
        tuple(config.data.get(k, v)) for k, v in zip(("mean", "std"), LEGACY_STATS, strict=True)
    )
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(
            f"config.data.mean / config.data.std are {mean} / {std}: set three values each, or "
            f"leave them () and let `data.with_stats(config, dataset)` fill them from the train "
            f"split (the pipeline does)."
        )
    return mean, std


def normalize(images, spec):
    """Images in [0, 1] (..., 3) -> the encoder's input: (x - mean) / std per channel, with the
    statistics of the dataset at hand (`spec.mean`, `spec.std`; numpy or jax arrays)."""
    return (images - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def with_stats(config, ds: Dataset):
    """A copy of `config` whose data.mean / data.std are the pretraining split's channel
    statistics where they were left () (the encoder's input normalisation, `normalize`), and
    whose data.identity is what its checkpoints record of the data (`identity`)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        if not tuple(config.data.mean) or not tuple(config.data.std):
            config.data.mean, config.data.std = ds.channel_stats()
        config.data.identity = identity(ds)
    return config


def identity(ds: Dataset) -> dict:
    """What a checkpoint records of the data it was trained on: each split's source, number of
    examples and fingerprint (a resumed run on other data stops instead of going on in another
    order)."""
    return {role: getattr(ds, role).identity() for role in ("pretrain", "train", "test")}


def load(data_cfg) -> Dataset:
    """The splits config.data names (`pretrain_split`, `train_split`, `test_split`) of
    `data_cfg.name`: the embedded digits, an image folder, or a prepared tfds dataset. The train
    side is cut to data_cfg.max_train_examples; a split whose pixels fit in data_cfg.cache_gb is
    read once into host memory, a larger one is read (and decoded) at each step."""
    if data_cfg.name == DIGITS:
        splits, num_classes = _digits_splits(data_cfg)
    elif data_cfg.name == FOLDER:
        splits, num_classes = _folder_splits(data_cfg)
    else:
        splits, num_classes = _tfds_splits(data_cfg)
    pretrain, train, test = (splits[k] for k in ("pretrain", "train", "test"))
    n = data_cfg.max_train_examples
    if n:
        pretrain, train = (sources.Take(s, n) if n < len(s) else s for s in (pretrain, train))
    if data_cfg.get("validation_fraction", 0.0):
        pretrain, train, test = _carve_validation(data_cfg, pretrain, train)
    for role, split in (("train", train), ("test", test)):
        if (split.labels < 0).any():
            raise DataError(
                f"config.data.{role}_split={data_cfg[role + '_split']!r} of {data_cfg.name!r} is "
                f"unlabelled; the {role} split of the evaluations needs labels. Name a labelled "
                f"split there, and the unlabelled one in config.data.pretrain_split."
            )
    limit = data_cfg.cache_gb * 2**30
    cached = {}  # a split named twice (pretrain = train) is read once

    def cache(src):
        return cached.setdefault(id(src), sources.cached(src, limit))

    return Dataset(data_cfg.name, cache(pretrain), cache(train), cache(test), num_classes)


VALIDATION_SEED = 0  # the validation split is the same whatever config.seed is


def validation_ids(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of a class-balanced `fraction` of `labels` (at least one a class), sorted; fixed
    (VALIDATION_SEED), so every seed and run of a config holds out the same images."""
    rng = np.random.default_rng(VALIDATION_SEED)
    held = [
        rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False)
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(held))


def _carve_validation(data_cfg, pretrain, train) -> tuple:
    """(pretrain, train, validation): data.validation_fraction of the labelled train split held
    out as the split every evaluation scores (in place of the test split, which is then not
    read), and kept out of the train split and of pretraining when pretraining reads it too."""
    names = _split_names(data_cfg)
    same = names["pretrain"] == names["train"]
    if not same and set(names["train"]) & set(names["pretrain"]):
        raise ConfigError(
            f"config.data.validation_fraction={data_cfg.validation_fraction} holds images out of "
            f"the train split {data_cfg.train_split!r}, which pretraining reads as part of "
            f"{data_cfg.pretrain_split!r}: set config.data.pretrain_split to the train split "
            f"itself or to splits without it (e.g. 'unlabelled')."
        )
    held = validation_ids(train.labels, data_cfg.validation_fraction)
    keep = np.setdiff1d(np.arange(len(train)), held)
    validation = sources.Subset(train, held, f"{train.name}[validation]")
    kept = sources.Subset(train, keep, f"{train.name}[-validation]")
    return (kept if same else pretrain), kept, validation


def _split_names(data_cfg) -> dict[str, list[str]]:
    """{'pretrain': [...], 'train': [...], 'test': [...]}: 'train+unlabelled' names two."""
    return {
        role: [p.strip() for p in str(data_cfg[f"{role}_split"]).split("+") if p.strip()]
        for role in ("pretrain", "train", "test")
    }


def _assemble(data_cfg, open_split) -> dict:
    """Each role's source from `open_split(name)`, every split opened once."""
    opened, out = {}, {}
    for role, names in _split_names(data_cfg).items():
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
    """An image folder in the ImageFolder layout (images.LAYOUT): each named split scanned and
    decoded once (images.verify drops, and names, the files that will not decode)."""
    if not data_cfg.data_dir:
        raise DataError(
            f"config.data.name=folder needs config.data.data_dir=DIR, a folder laid out as "
            f"{image_files.LAYOUT}."
        )
    root = os.path.abspath(os.path.expanduser(data_cfg.data_dir))
    if pack.is_pack(root):
        return _packed_splits(data_cfg, root)
    canvas = canvas_size(data_cfg)

    def open_split(name):
        split = image_files.scan_split(root, name)
        split, _ = image_files.verify(
            root, split, canvas, data_cfg.max_bad_fraction, data_cfg.read_threads
        )
        return sources.FolderSource(root, split, canvas)

    return _labelled_classes(_assemble(data_cfg, open_split))


def _packed_splits(data_cfg, root: str) -> tuple[dict, int]:
    """A folder packed by `python -m simclr_jax.pack` (pack.py): its splits' array_record files."""
    meta = pack.read_meta(root)
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
                f"{name!r} too (python -m simclr_jax.pack {meta['source']} NEW_OUT --canvas "
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


TFDS_DEFAULT_DIR = "~/tensorflow_datasets"  # tfds' default data_dir (without TFDS_DATA_DIR)
READABLE_FORMATS = ("array_record", "parquet")  # the random-access formats tfds.data_source reads


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
    import tensorflow_datasets as tfds

    name = data_cfg.name
    where = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DIR
    where = os.path.abspath(os.path.expanduser(where))
    builder = _prepared_builder(name, where)
    decoders = {"image": tfds.decode.SkipDecoding()}
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
        try:
            found = tfds.data_source(
                name, split=split, data_dir=where, download=False, decoders=decoders
            )
            # Reads every record once (its labels; later starts read them from the label
            # cache, kept while the files' sizes and mtimes hold): damage shows here.
            return sources.TfdsSource(found, name, split, str(builder.version), canvas)
        except Exception as err:
            raise DataError(
                f"Could not read the {split!r} split of {name!r} under {where} "
                f"({type(err).__name__}: {err}). The prepared files look damaged: delete "
                f"{name}/ there and prepare it again (`{prepare_command(name, where)}`), or use "
                f"another copy."
            ) from err

    num_classes = features["label"].num_classes if "label" in features else 0
    return _assemble(data_cfg, open_split), num_classes


def _prepared_builder(name: str, where: str):
    """The tfds builder of `name` prepared in `where`, in a format tfds.data_source reads."""
    import tensorflow_datasets as tfds

    if not os.path.isdir(where):  # checked first: tfds would report an empty dataset
        raise _not_prepared(name, where, "the directory does not exist")
    try:
        with _quiet_absl():  # tfds warns of each folder it finds empty before we can explain
            builder = tfds.builder(name, data_dir=where)
            prepared = builder.is_prepared()
    except Exception as err:  # unknown name: tfds lists close matches in its message
        raise DataError(f"Unknown tfds dataset config.data.name={name!r}: {err}") from err
    if not prepared:
        raise _not_prepared(name, where, f"no prepared version {builder.version} there")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in READABLE_FORMATS:
        raise _not_prepared(
            name, where, f"it is prepared as {file_format}, which tfds.data_source cannot read"
        )
    return builder


def labelled_subset(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset: round(fraction * count) per class (at least 1), sorted.

    Deterministic given the seed; the same indices on every host and device count.
    """
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        k = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def subset_digest(indices: np.ndarray) -> str:
    """A short fingerprint of a set of train indices (order and repeats ignored): every record of
    the downstream stage carries the one of the images it was fitted on."""
    unique = np.unique(np.asarray(indices, np.int64))
    return hashlib.sha1(unique.tobytes()).hexdigest()[:12]
