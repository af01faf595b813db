"""The pictures people look at first in a SimCLR run, gathered from the run itself and drawn by
`plots.py` into the workdir (process 0 writes):

* `views.png`: the first images of pretraining's first batch and their two views, made by the
  step's own augmentation (`augment.two_views`, the run's seed keys and config);
* `pretrain.png`: loss, learning rate, and the kNN monitor's and the online linear head's
  accuracy against the step (metrics.jsonl);
* `neighbours.png`: test images and their nearest training images by cosine similarity of h,
  from the pretrained encoder f (frozen, BN in inference mode), as the kNN evaluation sees them.
"""

import os

import jax
import numpy as np

from simclr_jax.core import augment, networks
from simclr_jax.data import stream
from simclr_jax.evaluation import frozen
from simclr_jax.report import plots
from simclr_jax.runtime import parallel
from simclr_jax.runtime.files import (
    METRICS_FILE,
    NEIGHBOURS_PNG,
    PRETRAIN_PNG,
    VIEWS_PNG,
    read_records,
)
from simclr_jax.train.state import (
    AUGMENT_KEY,
    DATA_KEY,
    compute_dtype,
    restore_encoder,
    seed_key,
)


def first_views(config, source, n: int = 8) -> dict:
    """The first `n` images of pretraining's first global batch and their two views at step 0,
    exactly as `pretrain.pretrain_step` draws them (the data order and the per-example keys are
    functions of the seed, the step and the global example index). `source`: ds.pretrain."""
    batch = min(config.pretrain.batch_size, len(source))
    order = stream.Order(seed_key(config.seed, DATA_KEY), len(source), batch)
    ids = order.batch(0)[: min(n, len(source))]
    spec = augment.spec_from_config(config)
    views = jax.jit(lambda key, images, ids: augment.two_views(key, 0, images, ids, spec))
    images = source.read(ids)
    v1, v2 = views(seed_key(config.seed, AUGMENT_KEY), images, ids)
    return {
        "ids": ids,
        "sources": images,
        "view1": np.asarray(v1),
        "view2": np.asarray(v2),
    }


def write_views(config, ds, workdir: str):
    """views.png; returns the figure."""
    v = first_views(config, ds.pretrain)
    a = config.augment
    title = (
        f"{ds.name}: SimCLR views at step 0 (crop scale >= {a.crop_scale_min:g}, jitter "
        f"{a.jitter_strength:g} p={a.jitter_prob:g}, gray p={a.grayscale_prob:g}, blur "
        f"p={a.blur_prob:g})"
    )
    path = os.path.join(workdir, VIEWS_PNG)
    return plots.views_grid(v["sources"], v["view1"], v["view2"], path, title)


def write_pretrain_curves(config, workdir: str, num_classes: int | None = None):
    """pretrain.png from the pretraining records of metrics.jsonl; returns the figure (None when
    there are no records)."""
    path = os.path.join(workdir, METRICS_FILE)
    records = read_records(path, "pretrain") if os.path.exists(path) else []
    if not records:
        return None
    title = f"SimCLR pretraining: {config.data.name}, {config.model.name}, batch {config.pretrain.batch_size}"
    chance = 1.0 / num_classes if num_classes else None
    return plots.pretrain_curves(records, os.path.join(workdir, PRETRAIN_PNG), title, chance)


def query_indices(test_labels: np.ndarray, n: int = 8) -> np.ndarray:
    """The first test image of each class, for the first `n` classes present (then more of the
    first ones if there are fewer classes)."""
    firsts = [int(np.flatnonzero(test_labels == c)[0]) for c in np.unique(test_labels)]
    rest = [i for i in range(len(test_labels)) if i not in set(firsts)]
    return np.array((firsts + rest)[:n])


def nearest_neighbours(
    config, ds, encoder: dict, n_queries: int = 8, k: int = 5, max_bank: int = 10_000
) -> dict:
    """Test queries and their k nearest training images by cosine similarity of h from the frozen
    `encoder` ({'params', 'batch_stats'} of f). The bank is the train split (a fixed random subset
    of `max_bank` when larger). Every process computes it (the feature extraction is collective)."""
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    feature_fn = frozen.make_feature_fn(model, augment.spec_from_config(config))
    variables = parallel.replicate(
        {
            "params": {"encoder": encoder["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"]},
        }
    )
    n = len(ds.train_labels)
    bank = np.arange(n)
    if n > max_bank:
        bank = np.sort(np.random.default_rng(config.seed).permutation(n)[:max_bank])
    queries = query_indices(ds.test_labels, n_queries)

    def features(source, ids):
        reader = stream.Reader(source, index=ids)
        return frozen.extract_features(feature_fn, variables, reader, len(ids), config.data)

    bank_h = frozen.l2_normalize(features(ds.train, bank))  # (B, F)
    query_h = frozen.l2_normalize(features(ds.test, queries))  # (q, F)
    sims = np.asarray(query_h @ bank_h.T)  # (q, B)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (q, k)
    return {
        "queries": queries,
        "neighbours": bank[order],  # (q, k) train indices
        "sims": np.take_along_axis(sims, order, axis=1),
        "bank_size": len(bank),
    }


def write_neighbours(config, ds, workdir: str, source: str, primary: bool = True):
    """neighbours.png from the pretrained encoder in `source` (a pretraining checkpoint
    directory); every process calls it, `primary` draws. Returns (figure or None, the data)."""
    encoder, step = restore_encoder(config, source)
    nn = nearest_neighbours(config, ds, encoder)
    if not primary:
        return None, nn
    q, idx = nn["queries"], nn["neighbours"]
    title = (
        f"{ds.name}: nearest training images in h-space (cosine, {nn['bank_size']} candidates), "
        f"encoder step {step}"
    )
    fig = plots.neighbours_grid(
        ds.test.read(q),
        ds.test_labels[q],
        ds.train.read(idx.reshape(-1)).reshape(idx.shape + (ds.train.canvas,) * 2 + (3,)),
        ds.train_labels[idx],
        nn["sims"],
        os.path.join(workdir, NEIGHBOURS_PNG),
        title,
    )
    return fig, nn
