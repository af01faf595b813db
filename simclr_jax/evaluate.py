"""Frozen-encoder evaluations shared by the pretraining monitor and the downstream stage: feature
extraction (pmapped, BN in inference mode) and the weighted kNN classifier.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import augment, parallel

_CHUNK = 256  # images per device per feature-extraction call


def make_feature_fn(model, image_size: int):
    """pmapped (variables, images uint8 (N,H,W,3), ids (n,)) -> h (n, F) float32, BN frozen."""

    def features(variables, images, ids):
        x = augment.downstream_batch(None, 0, images[ids], ids, train=False, image_size=image_size)
        return model.apply(variables, x, train=False, method="encode")

    return jax.pmap(features, axis_name=parallel.AXIS)


def extract_features(feature_fn, variables, images, num_examples: int) -> np.ndarray:
    """h for every example, in order, on the host: (num_examples, F) float32.

    `variables` and `images` are replicated (leading local-device axis).
    """
    out = []
    per_call = _CHUNK * jax.device_count()
    for start in range(0, num_examples, per_call):
        ids = np.arange(start, min(num_examples, start + per_call), dtype=np.int32)
        local_ids, _ = parallel.shard_indices(ids, per_call)
        feats = feature_fn(variables, images, local_ids)  # (local_devices, CHUNK, F)
        feats = multihost_utils.process_allgather(feats, tiled=True)  # (all devices, CHUNK, F)
        out.append(np.asarray(feats).reshape(-1, feats.shape[-1])[: len(ids)])
    return np.concatenate(out)


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
    train = l2_normalize(jnp.asarray(train_feats))
    test = l2_normalize(jnp.asarray(test_feats))
    labels = jnp.asarray(train_labels)
    k = min(k, train.shape[0])
    preds = [
        _knn_chunk(test[i : i + chunk], train, labels, k, temperature, num_classes)
        for i in range(0, test.shape[0], chunk)
    ]
    return float(np.mean(np.concatenate(preds) == np.asarray(test_labels)))


def knn_eval(
    feature_fn,
    variables,
    train_images,
    train_labels,
    test_images,
    test_labels,
    num_classes: int,
    k: int,
    temperature: float,
) -> float:
    """Features of both splits with the frozen encoder, then knn_accuracy."""
    tr = extract_features(feature_fn, variables, train_images, len(train_labels))
    te = extract_features(feature_fn, variables, test_images, len(test_labels))
    return knn_accuracy(tr, train_labels, te, test_labels, num_classes, k, temperature)
