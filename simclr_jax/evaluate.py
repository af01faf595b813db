"""Frozen-encoder evaluations, shared by the pretraining monitor and the downstream stage: feature
extraction (pmapped, BN in inference mode), the weighted kNN classifier and the linear probe.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils

from simclr_jax import augment, models, parallel
from simclr_jax.train_state import LINEAR_KEY, compute_dtype


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
    for ids, local_ids, _ in parallel.index_chunks(num_examples):
        feats = feature_fn(variables, images, local_ids)  # (local_devices, per_device, F)
        feats = multihost_utils.process_allgather(feats, tiled=True)  # (devices, per_device, F)
        out.append(np.asarray(feats).reshape(-1, feats.shape[-1])[: len(ids)])
    return np.concatenate(out)


def frozen_features(config, ds, subset: np.ndarray, encoder: dict) -> tuple[np.ndarray, ...]:
    """h of the labelled subset (n, F) and of the test set (m, F) from the frozen `encoder`
    ({'params', 'batch_stats'} of f), on the host, float32."""
    model = models.build_model(config.model, dtype=compute_dtype(config))
    feature_fn = make_feature_fn(model, config.data.image_size)
    variables = parallel.replicate(
        {
            "params": {"encoder": encoder["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"]},
        }
    )
    train_images = parallel.replicate(ds.train_images[subset])
    train_x = extract_features(feature_fn, variables, train_images, len(subset))
    test_images = parallel.replicate(ds.test_images)
    test_x = extract_features(feature_fn, variables, test_images, len(ds.test_labels))
    return train_x, test_x


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


# ----------------------------------------------------------------------------- linear probe


def _probe_order(n: int, batch: int, epochs: int, seed: int) -> jnp.ndarray:
    """(steps, batch) minibatch indices: a permutation per epoch, the remainder dropped. From
    numpy seeded with (seed, LINEAR_KEY): a few thousand indices, for which a jax.random program
    would take longer to compile (XLA:CPU) than the whole fit."""
    rng = np.random.default_rng([seed, LINEAR_KEY])
    spe = n // batch
    order = np.stack([rng.permutation(n)[: spe * batch] for _ in range(epochs)])
    return jnp.asarray(order.reshape(epochs * spe, batch), jnp.int32)


def _probe_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit_probe(tx, params, xs, ys, order):
    """The whole fit, one scan over the minibatches of `order`. Returns (params, losses)."""

    def body(carry, idx):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(_probe_loss)(params, xs[idx], ys[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = lax.scan(body, (params, tx.init(params)), order)
    return params, losses


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes, *, epochs, batch_size, learning_rate, seed
) -> dict:
    """Softmax regression on frozen features: {'train_loss', 'train_acc', 'test_loss', 'test_acc',
    'steps'}.

    Features are standardised with the train features' per-dimension mean and std (the probe
    then needs no per-model learning-rate tuning); SGD with momentum 0.9 and a cosine decay from
    `learning_rate`, minibatches of min(batch_size, n) drawn without replacement each epoch
    (the remainder dropped), zero-initialised weights. The whole fit is one jitted scan.
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs = jnp.asarray((train_x - mean) / std, jnp.float32)  # (n, F)
    xt = jnp.asarray((test_x - mean) / std, jnp.float32)  # (m, F)
    ys, yt = jnp.asarray(train_y, jnp.int32), jnp.asarray(test_y, jnp.int32)
    n = len(train_y)
    batch = min(batch_size, n)
    spe, steps = n // batch, epochs * (n // batch)
    tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, max(steps, 1)), momentum=0.9)
    params = {"w": jnp.zeros((xs.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    # The features go in as arguments: closed over, they would become constants of the program.
    fit = jax.jit(functools.partial(_fit_probe, tx))
    params, losses = fit(params, xs, ys, _probe_order(n, batch, epochs, seed))

    def acc(x, y):
        return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))

    return {
        "train_loss": float(jnp.mean(losses[-spe:])),  # the last epoch's minibatches
        "train_acc": acc(xs, ys),
        "test_loss": float(_probe_loss(params, xt, yt)),
        "test_acc": acc(xt, yt),
        "steps": steps,
    }
