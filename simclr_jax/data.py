"""Datasets: uint8 images and labels read once into host memory, then placed on the devices.

Two sources: the embedded scikit-learn handwritten digits (no network, no files) and any tfds
image-classification set with `image`/`label` features, read through `tfds.data_source` (array_record;
no TensorFlow needed to read). Also the train split's channel statistics (the encoder's input
normalisation) and the class-balanced labelled subset used downstream.
"""

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import shlex

import numpy as np

from simclr_jax.errors import ConfigError, DataError

DIGITS = "digits"
# The CIFAR-10 statistics the ResNet applied itself before the normalisation moved to the data
# side: what runs whose config has no data.mean / data.std (written before) were trained with.
LEGACY_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_READ_CHUNK = 2048  # examples per tfds read; bounds peak memory of the decoded dicts


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, H, W, 3) uint8
    test_labels: np.ndarray  # (M,) int32
    num_classes: int

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the train images' pixels in [0, 1] (float64 sums)."""
        total, sq, n = np.zeros(3), np.zeros(3), 0
        for start in range(0, len(self.train_images), _READ_CHUNK):
            x = self.train_images[start : start + _READ_CHUNK].astype(np.float64) / 255.0
            total += x.sum(axis=(0, 1, 2))
            sq += (x * x).sum(axis=(0, 1, 2))
            n += x[..., 0].size
        mean = total / n
        std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
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
    """A copy of `config` whose data.mean / data.std are the train split's channel statistics
    where they were left () (the encoder's input normalisation, `normalize`)."""
    config = copy.deepcopy(config)
    if not tuple(config.data.mean) or not tuple(config.data.std):
        mean, std = ds.channel_stats()
        with config.unlocked():
            config.data.mean, config.data.std = mean, std
    return config


def load(data_cfg) -> Dataset:
    """Loads `data_cfg.name` (optionally subsampled to data_cfg.max_train_examples)."""
    if data_cfg.name == DIGITS:
        ds = load_digits(data_cfg.image_size)
    else:
        ds = load_tfds(data_cfg.name, data_cfg.data_dir or None)
    if data_cfg.max_train_examples and data_cfg.max_train_examples < len(ds.train_labels):
        n = data_cfg.max_train_examples
        ds = dataclasses.replace(
            ds, train_images=ds.train_images[:n], train_labels=ds.train_labels[:n]
        )
    return ds


def load_digits(image_size: int = 32) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (0..16 ink levels) as uint8 RGB, 80/20 split, fixed order."""
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
    return Dataset(DIGITS, images[tr], labels[tr], images[te], labels[te], num_classes=10)


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


def load_tfds(name: str, data_dir: str | None) -> Dataset:
    """Reads the train and test splits of a prepared tfds dataset into uint8 arrays."""
    import tensorflow_datasets as tfds

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DIR  # tfds' own default
    where = os.path.abspath(os.path.expanduser(where))
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
    try:
        sources = tfds.data_source(name, data_dir=where, download=False)
    except Exception as err:
        raise _not_prepared(name, where, f"{type(err).__name__}: {err}") from err
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"Dataset {name!r} has features {list(features)}; simclr-jax needs 'image' and 'label'."
        )
    test_split = "test" if "test" in sources else None
    if "train" not in sources or test_split is None:
        raise DataError(
            f"Dataset {name!r} needs 'train' and 'test' splits; it has {list(sources)}."
        )
    train = _read_split(name, sources["train"], "train", where)
    test = _read_split(name, sources["test"], "test", where)
    num_classes = features["label"].num_classes
    return Dataset(name, train[0], train[1], test[0], test[1], num_classes=num_classes)


def _read_split(name, source, split, data_dir) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images, labels = None, np.empty((n,), np.int32)
    try:
        for start in range(0, n, _READ_CHUNK):
            rows = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
            batch = np.stack([np.asarray(r["image"]) for r in rows])
            if images is None:
                images = np.empty((n,) + batch.shape[1:], np.uint8)
            images[start : start + len(rows)] = batch
            labels[start : start + len(rows)] = [r["label"] for r in rows]
    except Exception as err:
        raise DataError(
            f"Could not read the {split!r} split of {name!r} under {data_dir}"
            f" ({type(err).__name__}: {err}). The prepared files look damaged: delete "
            f"{name}/ there and prepare it again (`{prepare_command(name, data_dir)}`), or use "
            f"another copy."
        ) from err
    if images.shape[-1] == 1:  # grayscale sets (mnist, ...) become 3-channel
        images = np.repeat(images, 3, axis=-1)
    return images, labels


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
