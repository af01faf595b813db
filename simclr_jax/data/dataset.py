"""Datasets: the splits a run reads, as random-access sources (`sources.py`), never as a whole.

A run names the split it pretrains on (possibly unlabelled, or several joined with '+') and the
labelled train and test splits the evaluations read; `data/catalog.py` opens them for each kind of
dataset (the embedded digits, an image folder or its pack, a prepared tfds set). Here: the
roles, the train side's cut and validation split, host caching, the pretraining split's channel
statistics (the encoder's input normalisation), the data's identity that checkpoints record,
the class-balanced labelled subset used downstream, and the transfer dataset the downstream stage
may read instead (downstream.data, merged with config.data here).
"""

import copy
import dataclasses
import hashlib
from typing import Any

import numpy as np

from simclr_jax.data import catalog as dataset_splits
from simclr_jax.data import sources
from simclr_jax.errors import ConfigError, DataError

# The CIFAR-10 statistics the ResNet applied itself before the normalisation moved to the data
# side: what runs whose config has no data.mean / data.std (written before) were trained with.
LEGACY_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_READ_CHUNK = 2048  # examples per read of the statistics' pass; bounds its memory
STATS_MAX = 50_000  # images the channel statistics are computed on (evenly spaced)


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


def with_stats(config, ds: Dataset, transfer: Dataset | None = None):
    """A copy of `config` whose data.mean / data.std are the pretraining split's channel
    statistics where they were left () (the encoder's input normalisation, `normalize`), whose
    data.identity is what its checkpoints record of the data (`identity`), and whose
    data.pretrain_unlabelled counts the pretraining images without a label (the online linear
    head trains only where there are none: pretrain.online_probe); with a `transfer` dataset
    (downstream.data), downstream.data.identity is its identity."""
    config = copy.deepcopy(config)
    with config.unlocked():
        if not tuple(config.data.mean) or not tuple(config.data.std):
            config.data.mean, config.data.std = ds.channel_stats()
        config.data.identity = identity(ds)
        config.data.pretrain_unlabelled = int(np.sum(ds.pretrain.labels < 0))
        if transfer is not None and is_transfer(config):
            config.downstream.data.identity = identity(transfer)
    return config


# The keys of downstream.data that replace config.data's for the transfer dataset.
TRANSFER_KEYS = ("name", "data_dir", "train_split", "test_split", "max_train_examples")
TRANSFER_KEYS += ("validation_fraction",)


def is_transfer(config) -> bool:
    """Whether the downstream stage reads another dataset than pretraining (downstream.data)."""
    return bool((config.downstream.get("data") or {}).get("name"))


def transfer_identity(config) -> dict | None:
    """What the classifier checkpoints record of the transfer dataset (None without one)."""
    return (config.downstream.get("data") or {}).get("identity") if is_transfer(config) else None


def downstream_data_config(config):
    """The data config the downstream stage reads: config.data itself without a transfer set;
    else config.data with downstream.data's keys (TRANSFER_KEYS). The encoder's input contract
    stays the pretraining run's: image_size, mean / std; the host settings (threads, prefetch,
    cache) too. Nothing pretrains on it (its pretrain split is its train split, opened once), and
    it is decoded at its own size (canvas 0: its native size, else image_size)."""
    if not is_transfer(config):
        return config.data
    d = copy.deepcopy(config.data)
    with d.unlocked():
        for key in TRANSFER_KEYS:
            d[key] = config.downstream.data[key]
        d.pretrain_split, d.canvas = d.train_split, 0
    return d


def load_downstream(config, ds: Dataset) -> Dataset:
    """The dataset of the downstream stage: `ds` (the pretraining data) without a transfer set,
    else the one downstream.data names. Its errors name the downstream.data keys."""
    if not is_transfer(config):
        return ds
    try:
        return load(downstream_data_config(config))
    except (DataError, ConfigError) as err:  # the loader's messages name config.data's keys
        text = str(err).replace("config.data.", "config.downstream.data.")
        raise type(err)(f"The transfer dataset (config.downstream.data): {text}") from err


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
    splits, num_classes = dataset_splits.open_splits(data_cfg)
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
    names = dataset_splits.split_names(data_cfg)
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
