"""Frozen-encoder evaluations, shared by the pretraining monitor and the downstream stage: feature
extraction (pmapped, BN in inference mode; h or a projection-head layer's output) and the
weighted kNN classifier (the linear probe is `evaluation/linear_probe.py`'s).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.core import augment, networks, resnet
from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.data import dataset, stream
from simclr_jax.runtime import parallel, signals
from simclr_jax.train.state import compute_dtype


def make_feature_fn(model, spec, layer: int = 0):
    """pmapped (variables, images (n, H, W, 3) uint8) -> features (n, F) float32, BN frozen: h,
    or with `layer` = k the output of the SimCLR model's first k head layers.
    spec: `augment.spec_from_config` (image size, normalisation)."""

    def features(variables, images):
        x = augment.downstream_batch(None, 0, images, None, False, spec.image_size)
        x = dataset.normalize(x, spec)
        return model.apply(variables, x, train=False, method="features", layer=layer)

    return jax.pmap(features, axis_name=parallel.AXIS)


def extract_features(feature_fn, variables, reader, num_examples: int, data_cfg) -> np.ndarray:
    """h of positions 0..num_examples-1 of `reader` (stream.Reader), in order, on the host:
    (num_examples, F) float32. `variables` are replicated (leading local-device axis)."""
    out = []
    for ids, batch in stream.eval_chunks(reader, num_examples, data_cfg):
        signals.check()  # a signal stops here (runtime/signals.py), between chunks
        feats = feature_fn(variables, batch["images"])  # (local_devices, per_device, F)
        feats = multihost_utils.process_allgather(feats, tiled=True)  # (devices, per_device, F)
        out.append(np.asarray(feats).reshape(-1, feats.shape[-1])[: len(ids)])
    return np.concatenate(out)


def model_variables(encoder: dict) -> dict:
    """The SimCLR model's variables from a downstream start ({'params', 'batch_stats'} of f and
    optionally 'head', the kept head layers': `train_state.start_variables`)."""
    head = encoder.get("head")
    return {
        c: {"encoder": encoder[c], **({"head": head[c]} if head else {})}
        for c in ("params", "batch_stats")
    }


def frozen_features(config, ds, subset: np.ndarray, encoder: dict) -> tuple[np.ndarray, ...]:
    """Features of the labelled subset (n, F) and of the test set (m, F) from the frozen `encoder`
    (`model_variables`), on the host, float32: h, or the output of the first
    downstream.ft_proj_selector head layers (`encoder` must then hold them)."""
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    spec = augment.spec_from_config(config)
    feature_fn = make_feature_fn(model, spec, ft_proj_selector(config))
    variables = parallel.replicate(model_variables(encoder))
    train = stream.Reader(ds.train, index=np.asarray(subset))
    train_x = extract_features(feature_fn, variables, train, len(subset), config.data)
    test_x = extract_features(
        feature_fn, variables, stream.Reader(ds.test), len(ds.test_labels), config.data
    )
    return train_x, test_x


def estimate_batch_stats(config, source, ids: np.ndarray, encoder: dict, chunk: int = 512) -> dict:
    """`encoder`'s BN running statistics (of f and of the kept head layers, `model_variables`)
    estimated on the images `ids` of `source`, as anyone using a network's random features would
    (precise BN): each chunk goes through the layers up to downstream.ft_proj_selector in
    training mode, each BN layer's chunk mean and variance are recovered from its
    running-statistics update, and the chunks' statistics are averaged, weighted by size. Returns
    `encoder` with those batch_stats (its params unchanged). On one device, the same on every
    host."""
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    spec, m, layer = (
        augment.spec_from_config(config),
        resnet.BN_MOMENTUM,
        ft_proj_selector(config),
    )
    variables = model_variables(encoder)
    variables["batch_stats"] = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    @jax.jit
    def chunk_stats(images):
        x = dataset.normalize(
            augment.downstream_batch(None, 0, images, None, False, spec.image_size), spec
        )
        _, new = model.apply(
            variables, x, True, layer, method="features", mutable=["batch_stats"]
        )  # from zero: new = (1 - m) * the chunk's statistic
        return jax.tree.map(lambda s: s / (1.0 - m), new["batch_stats"])

    total, ids = None, np.asarray(ids)
    for start in range(0, len(ids), chunk):
        signals.check()
        part = ids[start : start + chunk]
        weight = float(len(part))
        stats = jax.tree.map(lambda s: s * weight, chunk_stats(source.read(part)))  # noqa: B023
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    stats = jax.tree.map(lambda s: s / len(ids), total)
    out = {**encoder, "batch_stats": stats["encoder"]}
    if "head" in encoder:
        out["head"] = {**encoder["head"], "batch_stats": stats.get("head", {})}
    return out


# ----------------------------------------------------------------------------- kNN


def l2_normalize(x, eps: float = 1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_chunk(test, train, train_labels, k: int, temperature: float, num_classes: int):
    sims = test @ train.T  # (t, N) cosine similarities (rows are unit norm)
    top_sims, top_idx = jax.lax.top_k(sims, k)  # (t, k)
    weights = jnp.exp(top_sims / temperature)  # as in InstDisc / lightly / solo-learn
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * weights[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)  # (t,)


def knn_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Accuracy of the temperature-weighted kNN vote with cosine similarity (k capped at N)."""
    preds = knn_predictions(
        train_feats, train_labels, test_feats, num_classes, k, temperature, chunk
    )
    return float(np.mean(preds == np.asarray(test_labels)))


def knn_predictions(
    train_feats, train_labels, test_feats, num_classes: int, k: int, temperature: float, chunk=1024
) -> np.ndarray:
    """(t,) the kNN vote's class per test example (`knn_accuracy`'s, for paired comparisons)."""
    train = l2_normalize(jnp.asarray(train_feats))
    test = l2_normalize(jnp.asarray(test_feats))
    labels = jnp.asarray(train_labels)
    k = min(k, train.shape[0])
    preds = []
    for i in range(0, test.shape[0], chunk):
        signals.check()
        preds.append(_knn_chunk(test[i : i + chunk], train, labels, k, temperature, num_classes))
    return np.concatenate(preds)


def knn_eval(
    feature_fn, variables, ds, data_cfg, num_classes: int, k: int, temperature: float
) -> tuple[float, np.ndarray]:
    """Features of the labelled train split and the test split with the frozen encoder (read
    from `ds`'s sources in chunks), then knn_accuracy: (accuracy, the test split's features
    (m, F), for other evaluations of the same encoder)."""
    tr = extract_features(feature_fn, variables, stream.Reader(ds.train), len(ds.train), data_cfg)
    te = extract_features(feature_fn, variables, stream.Reader(ds.test), len(ds.test), data_cfg)
    return knn_accuracy(tr, ds.train_labels, te, ds.test_labels, num_classes, k, temperature), te
