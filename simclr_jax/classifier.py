"""The downstream classifier (the encoder f, the projection head layers it keeps, a linear head):
its pmapped training step, its test evaluation, and one training run with its checkpoints
(resumable; started anew when the run's settings change). Whether f starts pretrained or from
scratch is the caller's choice of state.
"""

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils

from simclr_jax import augment, cpu_conv, data, loop, models, parallel, stream
from simclr_jax.checkpoint import Checkpointer
from simclr_jax.config import ft_proj_selector, run_learning_rate
from simclr_jax.train_state import (
    CLASSIFIER_AUGMENT_KEY,
    CLASSIFIER_DATA_KEY,
    TrainState,
    check_meta,
    checked_restore,
    checkpoint_meta,
    compute_dtype,
    seed_key,
    state_tree,
)

log = logging.getLogger(__name__)

EVAL_POINTS = 20  # test evaluations of a long classifier run (every epoch of a short one)
# The downstream keys a classifier checkpoint depends on: change one and the run starts anew.
RUN_KEYS = (
    "epochs",
    "label_fraction",
    "batch_size",
    "optimizer",
    "learning_rate",
    "lr_scaling",
    "warmup_epochs",
    "weight_decay",
    "momentum",
    "ft_proj_selector",  # which head layers the classifier keeps: another model
)
# RUN_KEYS left out of the metadata at these values, so runs written before the key existed
# (which ran at that value) still resume.
ABSENT_AT = {"ft_proj_selector": 0}


# ----------------------------------------------------------------------------- step and eval


def classifier_step(state, batch, aug_key, *, model, spec, schedule):
    """One supervised step on this device's share of the global batch (inside pmap over AXIS).

    batch: {'images': (n, H, W, 3) uint8, 'labels': (n,) int32, 'ids': (n,) int32 positions in
    the epoch list (the keys fold from them)}; spec: `augment.spec_from_config`.
    """
    ids, y = batch["ids"], batch["labels"]  # (n,) each
    # The pretraining's flip probability: whether the data is mirror-invariant (digits are not).
    x = augment.downstream_batch(
        aug_key, state.step, batch["images"], ids, True, spec.image_size, spec.flip_prob
    )
    x = data.normalize(x, spec)

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


def initial_state(model, tx, encoder: dict, image_size: int) -> TrainState:
    """The classifier's state with `encoder`'s f ({'params', 'batch_stats'}), the head layers it
    keeps (model.proj) copied by name from `encoder['head']` (the first layers of the SimCLR
    model's projection head: `train_state.kept_head`), and the linear head at zero
    (models.Classifier's init): the same as `train_state.create_state(..., encoder)`, without
    compiling the model's random initialisers only to replace them."""
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda key: model.init(key, dummy, train=False), jax.random.key(0))
    head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"]["head"])
    params = {"encoder": encoder["params"], "head": head}
    batch_stats = {"encoder": encoder["batch_stats"]}
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        wanted = shapes[collection].get("proj")
        if wanted:  # the layers the classifier keeps, by name
            tree["proj"] = {name: encoder["head"][collection][name] for name in wanted}
    return TrainState.create(apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=tx)


def build_model(config, num_classes: int, model_cfg=None):
    """The classifier network of `config` (f + its head; global BN over the pmap axis, the compute
    dtype, the CPU's convolution), with `model_cfg`'s architecture in place of config.model where
    given (the distillation's student). Every stage that trains or restores one builds it here."""
    return models.build_model(
        model_cfg or config.model,
        num_classes=num_classes,
        bn_axis_name=parallel.AXIS,
        dtype=compute_dtype(config),
        conv=cpu_conv.conv_module(),  # the CPU's faster filter gradient of narrow convolutions
        proj_layers=ft_proj_selector(config),
    )


def make_classifier_step(config, schedule, num_classes: int, devices=None, model_cfg=None):
    """(model, pmapped step): `classifier_step` for `config` (`build_model`), over `devices`
    (default: every device), the state donated. The comparison, the benchmark, the
    distillation's labels-only student and the tests build it here."""
    model = build_model(config, num_classes, model_cfg)
    step_fn = functools.partial(
        classifier_step,
        model=model,
        spec=augment.spec_from_config(config),
        schedule=schedule,
    )
    return model, jax.pmap(step_fn, axis_name=parallel.AXIS, devices=devices, donate_argnums=(0,))


def eval_step(params, batch_stats, batch, *, model, spec):
    """Summed test loss and correct count over every device's rows (inside pmap over AXIS).

    batch: {'images', 'labels', 'mask'} (n, ...) with mask False for padding rows. BN in
    inference.
    """
    x = data.normalize(
        augment.downstream_batch(None, 0, batch["images"], None, False, spec.image_size), spec
    )
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    y, mask = batch["labels"], batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # (n,)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (
        lax.psum(jnp.sum(jnp.where(mask, loss, 0.0)), parallel.AXIS),
        lax.psum(jnp.sum(jnp.where(mask, correct, 0.0)), parallel.AXIS),
    )


def make_evaluator(model, spec, test_source, data_cfg, extra: dict | None = None):
    """(replicated state) -> {'test_loss', 'test_acc', **extra} over the whole test split, read
    from `test_source` in chunks (stream.eval_chunks)."""
    p_eval = jax.pmap(functools.partial(eval_step, model=model, spec=spec), axis_name=parallel.AXIS)
    reader, m = stream.Reader(test_source, labels=True), len(test_source)

    def evaluate_state(rstate) -> dict:
        loss_sum, correct = 0.0, 0.0
        for _, batch in stream.eval_chunks(reader, m, data_cfg):
            batch = {k: batch[k] for k in ("images", "labels", "mask")}
            out = p_eval(rstate.params, rstate.batch_stats, batch)
            loss_sum += float(out[0][0])
            correct += float(out[1][0])
        return {"test_loss": loss_sum / m, "test_acc": correct / m, **(extra or {})}

    return evaluate_state


# ----------------------------------------------------------------------------- labelled inputs


def epoch_indices(subset: np.ndarray, global_batch: int) -> np.ndarray:
    """What one classifier epoch iterates over: the subset, repeated when it is smaller than a
    batch (each image then appears ceil(batch / n) times an epoch, with its own augmentations)."""
    reps = -(-global_batch // len(subset))
    return np.tile(subset, reps)


def labelled_inputs(config, ds, ids: np.ndarray):
    """(start, stop) -> the classifier steps' arguments (batch, aug_key) on the local devices:
    the rows of the epoch list `ids` in the order of (seed, step), streamed from the labelled
    train split (the same for every run on the labelled subset)."""
    dc = config.downstream
    reader = stream.Reader(ds.train, index=ids, labels=True)
    aug_key = parallel.replicate(seed_key(config.seed, CLASSIFIER_AUGMENT_KEY))

    def inputs(start: int, stop: int):
        order = stream.Order(seed_key(config.seed, CLASSIFIER_DATA_KEY), len(ids), dc.batch_size)
        for batch in stream.train_batches(reader, order, start, stop, config.data):
            yield batch, aug_key

    return inputs


# ----------------------------------------------------------------------------- one run


def transfer_meta(config) -> dict:
    """{'downstream_data': the transfer dataset's identity} where downstream.data names one (the
    data a run trains and is scored on, so a run on another dataset starts anew), else {}: the
    metadata of runs without one is what it was before."""
    transfer = data.transfer_identity(config)
    return {"downstream_data": _plain_tree(transfer)} if transfer else {}


def run_meta(config, phase: str, epochs: int, encoder: dict | None) -> dict:
    """Checkpoint metadata: the model and the pretraining data (the encoder's input contract,
    checked strictly), and what the run depends on (its own learning rate among them: `phase`
    names the run in downstream.runs; the transfer dataset's identity where downstream.data names
    one, so a run on another dataset starts anew)."""
    dc = config.downstream
    return {
        **checkpoint_meta(config, phase),
        "run": {
            **transfer_meta(config),
            "seed": config.seed,
            "precision": config.precision,
            "max_train_examples": config.data.max_train_examples,
            "normalisation": [list(config.data.mean), list(config.data.std)],
            "flip_prob": config.augment.flip_prob,
            "downstream": {
                **_run_keys(dc),
                "epochs": epochs,
                "learning_rate": run_learning_rate(dc, phase),  # this run's own
            },
            "encoder": encoder,  # {'dir', 'step'} of the pretrained f; None for scratch
        },
    }


def _run_keys(dc) -> dict:
    """RUN_KEYS' values in `dc`, those at their ABSENT_AT value left out."""
    out = {k: _plain(dc.get(k, ABSENT_AT.get(k))) for k in RUN_KEYS}
    return {k: v for k, v in out.items() if k not in ABSENT_AT or v != ABSENT_AT[k]}


def _plain(value):
    """Tuples as lists: what the metadata reads back from JSON."""
    return list(value) if isinstance(value, tuple) else value


def _plain_tree(tree):
    """ConfigDicts and tuples as the dicts and lists the metadata reads back from JSON."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, dict):
        return {k: _plain_tree(v) for k, v in tree.items()}
    return [_plain_tree(v) for v in tree] if isinstance(tree, list | tuple) else tree


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


def open_run_checkpoints(directory: str, config, meta: dict) -> Checkpointer:
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
    check_meta(old, config, directory)
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
        multihost_utils.sync_global_devices("simclr_jax.classifier.rmtree")
    return Checkpointer(directory, keep=config.pretrain.keep_checkpoints)


def eval_every(epochs: int) -> int:
    """Epochs between test evaluations (and log records, and by default checkpoints): every
    epoch of a run of up to EVAL_POINTS epochs, else about EVAL_POINTS times a run."""
    return max(1, epochs // EVAL_POINTS)


def train(config, state, ckpt, meta, p_step, inputs, spec, writer, evaluator):
    """Trains one classifier run with the shared loop: resumes from `ckpt`, and skips training
    when its last checkpoint is the final step (the curves are then already in metrics.jsonl).
    `inputs(start, stop)` yields the steps' arguments from `start` on.

    The test set is evaluated every `eval_every(epochs)` epochs and after the last one; those
    records get 'epoch', 'test_loss' and 'test_acc'. Returns the LoopResult.
    """
    epochs = -(-spec.total_steps // spec.steps_per_epoch)
    every = eval_every(epochs)
    phase, start = spec.phase, 0
    found = checked_restore(ckpt, state_tree(state), config)
    if found is not None:
        tree, _, start = found
        state = state.replace(**tree)
        what = "finished: training skipped" if start >= spec.total_steps else "resuming"
        log.info("%s: checkpoint of step %d in %s (%s).", phase, start, ckpt.directory, what)

    def save(step, rstate):
        ckpt.save(step, state_tree(parallel.unreplicate(rstate)), meta)

    def on_epoch_end(epoch, rstate):
        if epoch % every and epoch != epochs:
            return {}
        out = {"epoch": epoch, **evaluator(rstate)}
        log.info(
            "%s epoch %d: test acc %.4f, loss %.4f", phase, epoch, out["test_acc"], out["test_loss"]
        )
        return out

    result = loop.run(
        spec,
        p_step,
        parallel.replicate(state),
        inputs(start, spec.total_steps),
        start,
        writer,
        save,
        on_epoch_end,
        ckpt.wait,
    )
    ckpt.wait()
    return result
