"""The downstream comparison: does SimCLR pretraining help when labels are few?

This module owns everything after pretraining:

* `restore_encoder`: the pretrained encoder f's params and BN statistics from the pretraining
  run's orbax checkpoint (refusing one made for another model or data);
* the classifier (f + a linear head) with its pmapped `classifier_step` and `eval_step`, trained
  twice on the same class-balanced labelled subset with the same data order, augmentation keys,
  head init, optimizer and schedule: once from the pretrained f ('finetune'), once from a random
  f ('scratch'); test loss and accuracy after every epoch; checkpointed and resumable;
* the frozen-encoder evaluations: a linear probe (features extracted once, a jitted softmax
  regression) and the weighted kNN vote of `evaluate.py`;
* `run`, which does all of that, writes metrics.jsonl records (phases 'finetune', 'scratch',
  'linear', 'knn') and the report (`report.py`).
"""

import functools
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils

from simclr_jax import augment, data, evaluate, loop, models, optim, parallel, pretrain, report
from simclr_jax.checkpoint import Checkpointer, CheckpointError

log = logging.getLogger(__name__)

# fold_in tags of the config seed (pretraining uses 0, 1, 2). Both classifier runs share them.
CLASSIFIER_INIT_KEY, CLASSIFIER_DATA_KEY, CLASSIFIER_AUGMENT_KEY, LINEAR_KEY = 3, 4, 5, 6
FINETUNE, SCRATCH, LINEAR, KNN = "finetune", "scratch", "linear", "knn"
_EVAL_CHUNK = 256  # test images per device per eval call
# The downstream keys a classifier checkpoint depends on: change one and the run starts anew.
_RUN_KEYS = (
    "epochs",
    "label_fraction",
    "batch_size",
    "optimizer",
    "learning_rate",
    "lr_scaling",
    "warmup_epochs",
    "weight_decay",
    "momentum",
)


# ----------------------------------------------------------------------------- the encoder


def abstract_pretrain_tree(config) -> dict:
    """Shapes, dtypes and placement (default device) of a pretraining checkpoint's tree: the
    restore target, built as pretrain.run builds its state but traced only (no init compiled).

    The optimizer state's structure depends on the optimizer, not on the schedule's values,
    so a constant schedule stands in for pretrain.run's.
    """
    model = models.build_model(
        config.model, bn_axis_name=parallel.AXIS, dtype=pretrain.compute_dtype(config)
    )
    tx = optim.make_optimizer(config.pretrain, optax.constant_schedule(0.0))
    key = pretrain.seed_key(config.seed, pretrain.INIT_KEY)
    shapes = jax.eval_shape(
        lambda: pretrain.state_tree(pretrain.create_state(model, tx, key, config.data.image_size))
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def restore_encoder(config, source: str) -> tuple[dict, int]:
    """The pretrained f from the newest checkpoint in `source`: ({'params', 'batch_stats'}, step).

    Raises CheckpointError when `source` holds no readable checkpoint, or one made for another
    model or data (checked on the metadata first, so a shape mismatch never hides the cause).
    """
    target = abstract_pretrain_tree(config)
    ckpt = Checkpointer(source, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if steps:
            try:
                meta = ckpt.read_meta(steps[-1])
            except Exception:  # damaged: restore_latest falls back to an older one
                meta = None
            if meta is not None:
                pretrain.check_meta(meta, config, ckpt.directory)
        found = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(
            f"No readable pretraining checkpoint in {source}. Pretrain first (--mode=all or "
            f"pretrain with this --workdir), or point --config.restore at a finished run."
        )
    tree, meta, step = found
    pretrain.check_meta(meta, config, source)
    encoder = {"params": tree["params"]["encoder"], "batch_stats": tree["batch_stats"]["encoder"]}
    return encoder, int(step)


# ----------------------------------------------------------------------------- the classifier


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_variables(model, key, image_size: int) -> dict:
    """model.init in inference mode; jitted once per (model, image size), since compiling the
    many random initialisers is slow on CPU (modules are hashable)."""
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return model.init(key, dummy, train=False)


def create_classifier_state(model, tx, key, image_size: int, encoder: dict | None = None):
    """f + linear head, initialised from `key`; f replaced by `encoder` ({'params',
    'batch_stats'}) when given. The head's init depends on `key` only, so the pretrained and
    scratch runs start from the same head."""
    variables = init_variables(model, key, image_size)
    params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
    if encoder is not None:
        params["encoder"], batch_stats["encoder"] = encoder["params"], encoder["batch_stats"]
    return pretrain.TrainState.create(
        apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=tx
    )


def classifier_step(
    state, images, labels, data_key, aug_key, *, model, image_size, global_batch, schedule
):
    """One supervised step on this device's share of the global batch (inside pmap over AXIS).

    images: (N, H, W, 3) uint8 and labels (N,) int32, the labelled subset on every device.
    """
    ids = parallel.device_batch_ids(data_key, state.step, images.shape[0], global_batch)  # (n,)
    x = augment.downstream_batch(aug_key, state.step, images[ids], ids, True, image_size)
    y = labels[ids]  # (n,)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Every device holds the mean over an equal share: the pmean is the global mean's gradient.
    grads = lax.pmean(grads, parallel.AXIS)
    metrics = {
        "loss": lax.pmean(loss, parallel.AXIS),
        "accuracy": lax.pmean(jnp.mean(jnp.argmax(logits, -1) == y), parallel.AXIS),
        "learning_rate": schedule(state.step),
    }
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(params, batch_stats, images, labels, ids, mask, *, model, image_size):
    """Summed test loss and correct count over every device's ids (inside pmap over AXIS).

    ids, mask: (n,) indices into images / labels, and False for padding rows. BN in inference.
    """
    x = augment.downstream_batch(None, 0, images[ids], ids, False, image_size)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    y = labels[ids]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # (n,)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (
        lax.psum(jnp.sum(jnp.where(mask, loss, 0.0)), parallel.AXIS),
        lax.psum(jnp.sum(jnp.where(mask, correct, 0.0)), parallel.AXIS),
    )


def make_evaluator(model, image_size: int, test_images, test_labels: np.ndarray):
    """(replicated state) -> {'test_loss', 'test_acc'} over the whole test set.

    test_images: replicated uint8 (local devices, M, H, W, 3). Every call has the same shape
    (the test set is padded to a multiple of the per-call size), so it compiles once.
    """
    p_eval = jax.pmap(
        functools.partial(eval_step, model=model, image_size=image_size),
        axis_name=parallel.AXIS,
    )
    labels = parallel.replicate(np.asarray(test_labels, np.int32))
    m, n_dev = len(test_labels), jax.device_count()
    per_call = min(_EVAL_CHUNK * n_dev, -(-m // n_dev) * n_dev)

    def evaluate_state(rstate) -> dict:
        loss_sum, correct = 0.0, 0.0
        for start in range(0, m, per_call):
            ids = np.arange(start, min(m, start + per_call), dtype=np.int32)
            local_ids, mask = parallel.shard_indices(ids, per_call)
            out = p_eval(rstate.params, rstate.batch_stats, test_images, labels, local_ids, mask)
            loss_sum += float(out[0][0])
            correct += float(out[1][0])
        return {"test_loss": loss_sum / m, "test_acc": correct / m}

    return evaluate_state


def labelled_indices(labels: np.ndarray, config, num_classes: int) -> np.ndarray:
    """The class-balanced labelled subset (train indices), deterministic given config.seed."""
    return data.labelled_subset(labels, config.downstream.label_fraction, num_classes, config.seed)


def epoch_indices(subset: np.ndarray, global_batch: int) -> np.ndarray:
    """What one classifier epoch iterates over: the subset, repeated when it is smaller than a
    batch (each image then appears ceil(batch / n) times an epoch, with its own augmentations)."""
    reps = -(-global_batch // len(subset))
    return np.tile(subset, reps)


def _run_meta(config, phase: str, encoder: dict | None) -> dict:
    """Checkpoint metadata: the model and data (checked strictly), and what the run depends on."""
    dc = config.downstream
    return {
        **pretrain.checkpoint_meta(config, phase),
        "run": {
            "seed": config.seed,
            "precision": config.precision,
            "max_train_examples": config.data.max_train_examples,
            "downstream": {k: dc[k] for k in _RUN_KEYS},
            "encoder": encoder,  # {'dir', 'step'} of the pretrained f; None for scratch
        },
    }


def _changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, tuple]]:
    """(dotted key, (old, new)) for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", (a, b)))
    return out


def _open_run_checkpoints(directory: str, config, meta: dict) -> Checkpointer:
    """A Checkpointer for one classifier run. Checkpoints of a run with other downstream
    settings (or another pretrained encoder) are deleted, so the run starts anew; a checkpoint
    for another model or data is an error."""
    ckpt = Checkpointer(directory, keep=config.pretrain.keep_checkpoints)
    steps = ckpt.steps()
    if not steps:
        return ckpt
    try:
        old = ckpt.read_meta(steps[-1])
    except Exception:  # damaged: restore_latest deals with it
        return ckpt
    pretrain.check_meta(old, config, directory)
    if old.get("run") == meta["run"]:
        return ckpt
    log.warning(
        "%s holds a classifier run with other settings (%s): starting it anew.",
        directory,
        "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in _changes(old.get("run") or {}, meta["run"])),
    )
    ckpt.close()
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("simclr_jax.downstream.rmtree")
    return Checkpointer(directory, keep=config.pretrain.keep_checkpoints)


def train_classifier(config, phase, state, ckpt, meta, p_step, step_args, spec, writer, evaluator):
    """Trains one classifier run with the shared loop: resumes from `ckpt`, and skips training
    when its last checkpoint is the final step (the curves are then already in metrics.jsonl).

    Each epoch's record gets 'epoch', 'test_loss' and 'test_acc'. Returns the LoopResult.
    """
    start = 0
    found = ckpt.restore_latest(pretrain.state_tree(state))
    if found is not None:
        tree, old_meta, start = found
        pretrain.check_meta(old_meta, config, ckpt.directory)
        state = state.replace(**tree)
        what = "finished: training skipped" if start >= spec.total_steps else "resuming"
        log.info("%s: checkpoint of step %d in %s (%s).", phase, start, ckpt.directory, what)

    def save(step, rstate):
        ckpt.save(step, pretrain.state_tree(parallel.unreplicate(rstate)), meta)

    def on_epoch_end(epoch, rstate):
        out = {"epoch": epoch, **evaluator(rstate)}
        log.info(
            "%s epoch %d: test acc %.4f, loss %.4f", phase, epoch, out["test_acc"], out["test_loss"]
        )
        return out

    result = loop.run(
        spec, p_step, parallel.replicate(state), step_args, start, writer, save, on_epoch_end
    )
    ckpt.wait()
    return result


def make_classifier_step(config, schedule, num_classes: int, devices=None):
    """(model, pmapped step): `classifier_step` for `config`, over `devices` (default: every
    device), the state donated. compare, the benchmark and the tests all build the step here."""
    model = models.build_model(
        config.model,
        num_classes=num_classes,
        bn_axis_name=parallel.AXIS,
        dtype=pretrain.compute_dtype(config),
    )
    step_fn = functools.partial(
        classifier_step,
        model=model,
        image_size=config.data.image_size,
        global_batch=config.downstream.batch_size,
        schedule=schedule,
    )
    return model, jax.pmap(step_fn, axis_name=parallel.AXIS, devices=devices, donate_argnums=(0,))


def compare(config, ds, workdir: str, writer, subset: np.ndarray, encoder: dict, encoder_id: dict):
    """The pretrained ('finetune') and the 'scratch' classifier runs: identical data order,
    augmentation keys, head init, optimizer and schedule; only f's initial weights differ.
    Returns {phase: wall seconds of this invocation}."""
    dc, image_size = config.downstream, config.data.image_size
    ids = epoch_indices(subset, dc.batch_size)  # (n_epoch,) train indices
    spe = len(ids) // dc.batch_size
    total = int(dc.epochs * spe)
    schedule = optim.make_schedule(dc, spe, total)
    tx = optim.make_optimizer(dc, schedule)
    model, p_step = make_classifier_step(config, schedule, ds.num_classes)  # one for both runs
    step_args = parallel.replicate(
        (
            ds.train_images[ids],
            ds.train_labels[ids].astype(np.int32),
            pretrain.seed_key(config.seed, CLASSIFIER_DATA_KEY),
            pretrain.seed_key(config.seed, CLASSIFIER_AUGMENT_KEY),
        )
    )
    evaluator = make_evaluator(
        model, image_size, parallel.replicate(ds.test_images), ds.test_labels
    )
    init_key = pretrain.seed_key(config.seed, CLASSIFIER_INIT_KEY)
    ckpt_every = dc.checkpoint_every if dc.checkpoint_every > 0 else spe
    walls = {}
    for phase, enc, enc_id in ((FINETUNE, encoder, encoder_id), (SCRATCH, None, None)):
        meta = _run_meta(config, phase, enc_id)
        directory = os.path.join(os.path.abspath(workdir), "checkpoints", phase)
        ckpt = _open_run_checkpoints(directory, config, meta)
        try:
            state = create_classifier_state(model, tx, init_key, image_size, enc)
            spec = loop.LoopSpec(phase, total, spe, spe, ckpt_every, dc.batch_size)
            result = train_classifier(
                config, phase, state, ckpt, meta, p_step, step_args, spec, writer, evaluator
            )
        finally:
            ckpt.close()
        walls[phase] = result.wall_s
    return walls


# ----------------------------------------------------------------------------- frozen encoder


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes, *, epochs, batch_size, learning_rate, seed
) -> dict:
    """Softmax regression on frozen features: {'train_loss', 'train_acc', 'test_loss', 'test_acc'}.

    Features are standardised with the train features' per-dimension mean and std (the probe
    then needs no per-model learning-rate tuning); SGD with momentum 0.9 and a cosine decay from
    `learning_rate`, minibatches of min(batch_size, n) drawn without replacement each epoch
    (the remainder dropped), zero-initialised weights. The whole fit is one jitted scan.
    The minibatch order comes from numpy seeded with (seed, LINEAR_KEY): a few thousand indices,
    for which a jax.random program would take longer to compile (XLA:CPU) than the whole fit.
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

    rng = np.random.default_rng([seed, LINEAR_KEY])
    order = np.stack([rng.permutation(n)[: spe * batch] for _ in range(epochs)])
    order = jnp.asarray(order.reshape(steps, batch), jnp.int32)  # (steps, batch)

    def loss_fn(params, x, y):
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def fit(params, xs, ys, order):  # features as arguments: closed over, they'd be constants
        def body(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, xs[idx], ys[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = lax.scan(body, (params, tx.init(params)), order)
        return params, losses

    params = {"w": jnp.zeros((xs.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    params, losses = fit(params, xs, ys, order)

    def acc(x, y):
        return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))

    return {
        "train_loss": float(jnp.mean(losses[-spe:])),  # the last epoch's minibatches
        "train_acc": acc(xs, ys),
        "test_loss": float(loss_fn(params, xt, yt)),
        "test_acc": acc(xt, yt),
        "steps": steps,
    }


def frozen_features(config, ds, subset: np.ndarray, encoder: dict) -> tuple[np.ndarray, ...]:
    """h of the labelled subset (n, F) and of the test set (m, F), on the host, float32."""
    model = models.build_model(config.model, dtype=pretrain.compute_dtype(config))
    feature_fn = evaluate.make_feature_fn(model, config.data.image_size)
    variables = parallel.replicate(
        {
            "params": {"encoder": encoder["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"]},
        }
    )
    train_images = parallel.replicate(ds.train_images[subset])
    train_x = evaluate.extract_features(feature_fn, variables, train_images, len(subset))
    test_images = parallel.replicate(ds.test_images)
    test_x = evaluate.extract_features(feature_fn, variables, test_images, len(ds.test_labels))
    return train_x, test_x


def frozen_evaluations(
    config, ds, writer, subset: np.ndarray, encoder: dict, encoder_step: int
) -> dict:
    """Linear probe and kNN on features of the frozen pretrained f (BN in inference mode),
    extracted once: the labelled subset is the probe's training set and kNN's memory bank.
    Writes one 'linear' and one 'knn' record (replacing older ones); returns both."""
    dc = config.downstream
    t0 = time.perf_counter()
    train_x, test_x = frozen_features(config, ds, subset, encoder)
    train_y = ds.train_labels[subset]
    sizes = {
        "num_labelled": len(subset),
        "num_test": len(ds.test_labels),
        "encoder_step": encoder_step,
    }
    features_s = time.perf_counter() - t0
    out = {}
    if dc.linear_epochs > 0:
        t0 = time.perf_counter()
        res = linear_probe(
            train_x,
            train_y,
            test_x,
            ds.test_labels,
            ds.num_classes,
            epochs=dc.linear_epochs,
            batch_size=dc.linear_batch_size,
            learning_rate=dc.linear_learning_rate,
            seed=config.seed,
        )
        wall = time.perf_counter() - t0
        writer.drop_phase(LINEAR)
        out[LINEAR] = writer.write(
            res.pop("steps"),
            LINEAR,
            {**res, "epochs": dc.linear_epochs, **sizes, "features_s": features_s, "wall_s": wall},
        )
        log.info("Linear probe: test acc %.4f (%.1fs).", res["test_acc"], wall)
    t0 = time.perf_counter()
    acc = evaluate.knn_accuracy(
        train_x, train_y, test_x, ds.test_labels, ds.num_classes, dc.knn_k, dc.knn_temperature
    )
    wall = time.perf_counter() - t0
    writer.drop_phase(KNN)
    scalars = {"test_acc": acc, "k": min(dc.knn_k, len(subset)), "temperature": dc.knn_temperature}
    out[KNN] = writer.write(0, KNN, {**scalars, **sizes, "features_s": features_s, "wall_s": wall})
    log.info("kNN (k=%d): test acc %.4f.", scalars["k"], acc)
    return out


# ----------------------------------------------------------------------------- the stage


def run(config, ds, workdir: str, writer, source: str) -> dict:
    """The downstream stage: restore f from `source` (a pretraining checkpoint directory), run
    the pretrained-vs-scratch comparison and the frozen-encoder evaluations, write the report.

    Returns a summary: final test numbers of each method, wall times, the labelled-set size.
    """
    encoder, encoder_step = restore_encoder(config, source)
    log.info("Restored the pretrained encoder from %s (step %d).", source, encoder_step)
    subset = labelled_indices(ds.train_labels, config, ds.num_classes)
    log.info(
        "Labelled subset: %d of %d train images (label_fraction %g, class-balanced).",
        len(subset),
        len(ds.train_labels),
        config.downstream.label_fraction,
    )
    walls = compare(
        config, ds, workdir, writer, subset, encoder, {"dir": source, "step": encoder_step}
    )
    frozen = frozen_evaluations(config, ds, writer, subset, encoder, encoder_step)
    summary = {"encoder_step": encoder_step, "num_labelled": len(subset)}
    summary.update({f"{k}_test_acc": r["test_acc"] for k, r in frozen.items()})
    summary["train_wall_s"] = walls  # this invocation's classifier training (0 when skipped)
    if writer.enabled:
        rep = report.write(workdir)
        summary.update(report.summary(rep), wall_s=rep["wall_s"])
        log.info("Report: %s", os.path.join(workdir, report.REPORT_MD))
    return summary
