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

from simclr_jax import augment, data, models, parallel, stops, stream
from simclr_jax.train_state import LINEAR_KEY, compute_dtype


def make_feature_fn(model, spec):
    """pmapped (variables, images (n, H, W, 3) uint8) -> h (n, F) float32, BN frozen.
    spec: `augment.spec_from_config` (image size, normalisation)."""

    def features(variables, images):
        x = augment.downstream_batch(None, 0, images, None, False, spec.image_size)
        return model.apply(variables, data.normalize(x, spec), train=False, method="encode")

    return jax.pmap(features, axis_name=parallel.AXIS)


def extract_features(feature_fn, variables, reader, num_examples: int, data_cfg) -> np.ndarray:
    """h of positions 0..num_examples-1 of `reader` (stream.Reader), in order, on the host:
    (num_examples, F) float32. `variables` are replicated (leading local-device axis)."""
    out = []
    for ids, batch in stream.eval_chunks(reader, num_examples, data_cfg):
        stops.check()  # a signal stops here (stops.py), between chunks
        feats = feature_fn(variables, batch["images"])  # (local_devices, per_device, F)
        feats = multihost_utils.process_allgather(feats, tiled=True)  # (devices, per_device, F)
        out.append(np.asarray(feats).reshape(-1, feats.shape[-1])[: len(ids)])
    return np.concatenate(out)


def frozen_features(config, ds, subset: np.ndarray, encoder: dict) -> tuple[np.ndarray, ...]:
    """h of the labelled subset (n, F) and of the test set (m, F) from the frozen `encoder`
    ({'params', 'batch_stats'} of f), on the host, float32."""
    model = models.build_model(config.model, dtype=compute_dtype(config))
    feature_fn = make_feature_fn(model, augment.spec_from_config(config))
    variables = parallel.replicate(
        {
            "params": {"encoder": encoder["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"]},
        }
    )
    train = stream.Reader(ds.train, index=np.asarray(subset))
    train_x = extract_features(feature_fn, variables, train, len(subset), config.data)
    test_x = extract_features(
        feature_fn, variables, stream.Reader(ds.test), len(ds.test_labels), config.data
    )
    return train_x, test_x


def estimate_batch_stats(config, source, ids: np.ndarray, encoder: dict, chunk: int = 512) -> dict:
    """`encoder`'s BN running statistics estimated on the images `ids` of `source`, as anyone
    using a network's random features would (precise BN): each chunk goes through f in training
    mode, each BN layer's chunk mean and variance are recovered from its running-statistics
    update, and the chunks' statistics are averaged, weighted by size. Returns `encoder` with
    those batch_stats (its params unchanged). On one device, the same on every host."""
    model = models.build_model(config.model, dtype=compute_dtype(config))
    spec, m = augment.spec_from_config(config), models.BN_MOMENTUM
    zero = jax.tree.map(jnp.zeros_like, encoder["batch_stats"])
    variables = {"params": {"encoder": encoder["params"]}, "batch_stats": {"encoder": zero}}

    @jax.jit
    def chunk_stats(images):
        x = augment.downstream_batch(None, 0, images, None, False, spec.image_size)
        _, new = model.apply(
            variables, data.normalize(x, spec), True, method="encode", mutable=["batch_stats"]
        )  # from zero: new = (1 - m) * the chunk's statistic
        return jax.tree.map(lambda s: s / (1.0 - m), new["batch_stats"]["encoder"])

    total, ids = None, np.asarray(ids)
    for start in range(0, len(ids), chunk):
        stops.check()
        part = ids[start : start + chunk]
        weight = float(len(part))
        stats = jax.tree.map(lambda s: s * weight, chunk_stats(source.read(part)))  # noqa: B023
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    return {**encoder, "batch_stats": jax.tree.map(lambda s: s / len(ids), total)}


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
        stops.check()
        preds.append(_knn_chunk(test[i : i + chunk], train, labels, k, temperature, num_classes))
    return np.concatenate(preds)


def knn_eval(
    feature_fn, variables, ds, data_cfg, num_classes: int, k: int, temperature: float
) -> float:
    """Features of the labelled train split and the test split with the frozen encoder (read
    from `ds`'s sources in chunks), then knn_accuracy."""
    tr = extract_features(feature_fn, variables, stream.Reader(ds.train), len(ds.train), data_cfg)
    te = extract_features(feature_fn, variables, stream.Reader(ds.test), len(ds.test), data_cfg)
    return knn_accuracy(tr, ds.train_labels, te, ds.test_labels, num_classes, k, temperature)


# ----------------------------------------------------------------------------- linear probe


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each example: a seeded shuffle, then each class dealt round-robin, so every
    fold holds about 1 / folds of each class."""
    rng = np.random.default_rng([seed, LINEAR_KEY])
    order = rng.permutation(len(labels))
    fold = np.empty(len(labels), np.int32)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        fold[members] = (rng.integers(folds) + np.arange(len(members))) % folds
    return fold


def _probe_loss(params, x, y):
    """Mean cross-entropy per example (n,) of the softmax regression."""
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


def _fit_probe(xs, ys, weights, l2, num_classes: int, iters: int):
    """Multinomial logistic regression, L2 penalty on the weights (not the bias), fitted by
    full-batch L-BFGS (optax) from zero: minimises mean_w(cross-entropy) + l2 / 2 |W|^2, the mean
    taken with `weights` (n,) (0 leaves an example out). Returns the params."""

    def objective(params):
        ce = _probe_loss(params, xs, ys)
        return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return (optax.apply_updates(params, updates), state), None

    params = {"w": jnp.zeros((xs.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    (params, _), _ = lax.scan(body, (params, solver.init(params)), None, length=iters)
    return params


_fit = jax.jit(_fit_probe, static_argnames=("num_classes", "iters"))


def _cross_validate(xs, ys, fold: np.ndarray, l2_grid, folds: int, num_classes: int, iters: int):
    """Held-out cross-entropy per penalty, averaged over the folds: each (fold, penalty) fitted
    on the other folds' examples. One compiled fit serves them all (a Python loop: vmapping the
    L-BFGS line search ran slower on CPU than fitting one problem after another)."""
    losses = np.zeros((folds, len(l2_grid)))
    for f in range(folds):
        train, held = jnp.asarray(fold != f, jnp.float32), jnp.asarray(fold == f, jnp.float32)
        for j, l2 in enumerate(l2_grid):
            stops.check()  # between fits: a signal never lands inside numpy's setitem
            params = _fit(xs, ys, train, l2, num_classes=num_classes, iters=iters)
            losses[f, j] = jnp.sum(held * _probe_loss(params, xs, ys)) / jnp.sum(held)
    return losses.mean(0)


# How a probe's features are fed to it: standardised with the training features' per-dimension
# mean and std, or as they are. Cross-validation picks one (standardising pixel borders that are
# nearly constant blows up their noise; scikit-learn's default leaves features as they are).
PREPROCESSING = ("standardized", "raw")
MAX_WIDEN = 4  # times the penalty grid may grow by 10x past an edge the pick landed on


def _preprocess(train_x: np.ndarray, test_x: np.ndarray, how: str):
    if how == "raw":
        return jnp.asarray(train_x, jnp.float32), jnp.asarray(test_x, jnp.float32)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (
        jnp.asarray((train_x - mean) / std, jnp.float32),
        jnp.asarray((test_x - mean) / std, jnp.float32),
    )


def _choose_penalty(score, grid: list[float], scores: dict) -> tuple[str, float, bool]:
    """(preprocessing, penalty, widened): the pair of PREPROCESSING x `grid` with the lowest
    held-out loss, `score(how, penalties)` scoring those not in `scores` yet. A pick at an edge of
    the grid widens it by 10x past that edge (at most MAX_WIDEN times an edge) and scores again.
    `grid` and `scores` are updated in place."""
    room, widened = {"low": MAX_WIDEN, "high": MAX_WIDEN}, False
    while True:
        for h in PREPROCESSING:
            todo = [v for v in grid if (h, v) not in scores]
            if todo:
                scores.update({(h, v): float(c) for v, c in zip(todo, score(h, todo), strict=True)})
        how, l2 = min(((h, v) for h in PREPROCESSING for v in grid), key=scores.__getitem__)
        edge = "low" if l2 == grid[0] else "high" if l2 == grid[-1] else None
        if edge is None or not room[edge]:
            return how, l2, widened
        room[edge] -= 1
        if edge == "low":
            grid.insert(0, grid[0] / 10)
        else:
            grid.append(grid[-1] * 10)
        widened = True


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes, *, l2_grid, folds, iters, seed, predict=False
) -> dict:
    """Logistic regression on frozen features, its preprocessing and L2 penalty chosen on the
    training set alone.

    Both preprocessings (PREPROCESSING) and every penalty of `l2_grid` are scored by held-out
    cross-entropy in `folds`-fold stratified cross-validation on the training set; the best pair
    wins. When the winning penalty sits at an edge of the grid, the grid is widened by 10x past
    that edge (at most MAX_WIDEN times) and scored again, so the pick is bracketed. With one
    penalty or folds < 2 nothing is chosen: standardised features, the grid's first penalty. The
    probe is then refitted on the whole training set. Every fit is full-batch L-BFGS, `iters`
    iterations from zero (`_fit_probe`). Returns {'train_loss', 'train_acc', 'test_loss',
    'test_acc', 'l2', 'preprocessing', 'l2_grid' (as widened), 'cv_loss' (held-out loss per
    penalty of l2_grid for the chosen preprocessing, or None), 'widened' (bool)}, and with
    `predict` 'test_pred' ((t,) the class per test example, for paired comparisons).
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    ys, yt = jnp.asarray(train_y, jnp.int32), jnp.asarray(test_y, jnp.int32)
    inputs = {}  # each preprocessing's (train, test) arrays, made when first asked for

    def prepared(how: str):
        if how not in inputs:
            inputs[how] = _preprocess(train_x, test_x, how)
        return inputs[how]

    grid, scores = sorted(float(v) for v in l2_grid), {}
    how, l2, widened = PREPROCESSING[0], grid[0], False
    if len(grid) > 1 and folds > 1:
        fold = _stratified_folds(np.asarray(train_y), folds, seed)

        def score(h: str, todo: list[float]) -> np.ndarray:
            return _cross_validate(prepared(h)[0], ys, fold, todo, folds, num_classes, iters)

        how, l2, widened = _choose_penalty(score, grid, scores)
    xs, xt = prepared(how)
    stops.check()
    params = _fit(xs, ys, jnp.ones(len(train_y)), l2, num_classes=num_classes, iters=iters)

    def acc(x, y):
        return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))

    logits = xt @ params["w"] + params["b"]  # (t, classes)
    pred = {"test_pred": np.asarray(jnp.argmax(logits, -1))} if predict else {}
    return {
        **pred,
        "train_loss": float(jnp.mean(_probe_loss(params, xs, ys))),
        "train_acc": acc(xs, ys),
        "test_loss": float(jnp.mean(_probe_loss(params, xt, yt))),
        "test_acc": acc(xt, yt),
        "l2": l2,
        "preprocessing": how,
        "l2_grid": grid,
        "cv_loss": [scores[(how, v)] for v in grid] if scores else None,
        "widened": widened,
    }


def configured_linear_probe(
    config, train_x, train_y, test_x, test_y, num_classes, predict: bool = False
) -> dict:
    """`linear_probe` with the config's settings (downstream.linear_*, the seed's folds)."""
    dc = config.downstream
    return linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        l2_grid=tuple(dc.linear_l2_grid),
        folds=dc.linear_folds,
        iters=dc.linear_iters,
        seed=config.seed,
        predict=predict,
    )
