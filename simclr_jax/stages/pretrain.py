"""SimCLR pretraining: the pmapped step (two views of this device's rows, f and g, NT-Xent over
the global batch, LARS update), the online linear head, the kNN monitor, and the run that streams
its batches (`stream.py`), resumes from, and writes, orbax checkpoints.

The online linear head (`pretrain.online_probe`; the official code's lineareval_while_pretraining,
solo-learn's online linear evaluation): a linear layer on stop_gradient(h) of the first view,
trained on the labels inside the same pmapped step with an optax optimizer of its own
(`probe_state`). It lives in the train state's `probe` field and in a checkpoint item of its own;
nothing of it reaches the encoder's loss, gradient, optimizer or BN statistics, so the encoder
trains bitwise as without it. Its loss and train accuracy join the step's metrics, its test
accuracy the kNN monitor's points.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from simclr_jax.core import augment, losses, networks, optim
from simclr_jax.data import dataset, stream
from simclr_jax.errors import ConfigError
from simclr_jax.evaluation import frozen
from simclr_jax.runtime import parallel
from simclr_jax.train import loop
from simclr_jax.train.checkpoint import Checkpointer
from simclr_jax.train.state import (
    AUGMENT_KEY,
    DATA_KEY,
    INIT_KEY,
    PROBE_INIT_KEY,
    TOTAL_STEPS,
    TrainState,
    checked_restore,
    checkpoint_meta,
    compute_dtype,
    create_state,
    seed_key,
    simclr_model,
    state_tree,
)

log = logging.getLogger(__name__)

# The online linear head's record keys (metrics.jsonl, pretrain.png, report.json): its
# cross-entropy and top-1 accuracy on the train views (each step's, averaged like the other step
# metrics), and its top-1 accuracy on the test split at the kNN monitor's points.
PROBE_LOSS, PROBE_ACC = "online_probe_loss", "online_probe_acc"
PROBE_TEST_ACC = "online_probe_test_acc"
PROBE_ITEM = "probe"  # its checkpoint item (Checkpointer.save's `extra`)


def pretrain_step(state, batch, aug_key, *, model, aug_cfg, temperature, schedule):
    """One SimCLR step on this device's share of the global batch (inside pmap over AXIS).

    batch: {'images': (n, H, W, 3) uint8, 'ids': (n,) int32}, this device's rows of the step's
    global batch and their global positions (`stream.Order`), from which the views' keys fold;
    with the online linear head (`state.probe`), also 'labels' (n,) int32.
    """
    ids = batch["ids"]
    v1, v2 = augment.two_views(aug_key, state.step, batch["images"], ids, aug_cfg)  # (n,S,S,3) x2
    views = dataset.normalize(jnp.concatenate([v1, v2]), aug_cfg)  # (2n, S, S, 3): BN sees both

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (h, z), updates = model.apply(variables, views, train=True, mutable=["batch_stats"])
        z1, z2 = jnp.split(z, 2)  # (n, D) each
        partial_loss, metrics = losses.nt_xent_with_metrics(z1, z2, temperature, parallel.AXIS)
        # The official scale, 2L (losses.OBJECTIVE_SCALE); metrics['loss'] reports L.
        return losses.OBJECTIVE_SCALE * partial_loss, (metrics, updates["batch_stats"], h)

    grads, (metrics, batch_stats, h) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = lax.psum(grads, parallel.AXIS)  # partial losses sum to L, so their grads sum too
    metrics["learning_rate"] = schedule(state.step)
    probe = state.probe
    if probe is not None:  # h of the forward pass above: BN's statistics move once
        h1 = lax.stop_gradient(jnp.split(h, 2)[0])  # (n, F): the first view's
        probe, probe_metrics = probe_step(probe, h1, batch["labels"])
        metrics.update(probe_metrics)
    # Global BN: the running statistics are already identical on every device.
    return state.apply_gradients(grads=grads, batch_stats=batch_stats, probe=probe), metrics


def probe_step(probe: TrainState, h, labels):
    """One update of the online linear head on this device's rows (inside pmap over AXIS):
    h (n, F) float32, labels (n,) int32. Its gradient is the global batch's mean cross-entropy's
    (averaged over the devices, apart from the encoder's); the accuracy is before the update."""

    def loss_fn(params):
        logits = probe.apply_fn({"params": params}, h)  # (n, C)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe.params)
    grads = lax.pmean(grads, parallel.AXIS)  # equal rows per device: the global mean's gradient
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    metrics = {PROBE_LOSS: lax.pmean(loss, parallel.AXIS), PROBE_ACC: lax.pmean(acc, parallel.AXIS)}
    return probe.apply_gradients(grads=grads), metrics


def probe_state(config, schedule, num_classes: int) -> TrainState:
    """The online linear head, fresh: `networks.online_probe_head` on h, initialised from its own
    seed key, with an optimizer of its own: pretraining's (optimizer, learning-rate schedule,
    momentum, weight decay on the kernel), LARS without its trust ratio, as the official code
    trains its supervised head beside the encoder."""
    head = networks.online_probe_head(num_classes)
    feat_dim = networks.build_encoder(config.model).feat_dim
    key = seed_key(config.seed, PROBE_INIT_KEY)
    params = head.init(key, jnp.zeros((1, feat_dim), jnp.float32))["params"]
    tx = optim.make_optimizer(config.pretrain, schedule, trust_ratio=False)
    return TrainState.create(apply_fn=head.apply, params=params, tx=tx)


def probe_tree(probe: TrainState) -> dict:
    """What the online linear head's checkpoint item holds."""
    return {"step": probe.step, "params": probe.params, "opt_state": probe.opt_state}


def probe_accuracy(probe: TrainState, features, labels) -> float:
    """Top-1 accuracy of the online linear head (unreplicated) on features (m, F), labels (m,)."""
    logits = probe.apply_fn({"params": probe.params}, jnp.asarray(features))  # (m, C)
    return float(np.mean(np.asarray(jnp.argmax(logits, axis=-1)) == np.asarray(labels)))


def online_probe(config, source) -> bool:
    """Whether pretraining trains the online linear head on `source` (ds.pretrain): as
    pretrain.online_probe says, or where it is unset (None), whether every image has a label.
    Raises ConfigError when it is asked for on images without labels."""
    asked = config.pretrain.get("online_probe")
    missing = int(np.sum(np.asarray(source.labels) < 0))
    if asked and missing:
        raise ConfigError(
            f"config.pretrain.online_probe=True, but {missing} of the {len(source)} pretraining "
            f"images (data.pretrain_split={config.data.pretrain_split!r}) have no label: leave it "
            f"unset or set it False, or pretrain on a labelled split."
        )
    return bool(asked) if asked is not None else not missing


def make_step(config, schedule, devices=None):
    """(model, pmapped step): `pretrain_step` for `config`, over `devices` (default: every device),
    the state donated. pretrain.run, the benchmark and the tests all build the step here."""
    model = simclr_model(config)
    step_fn = functools.partial(
        pretrain_step,
        model=model,
        aug_cfg=augment.spec_from_config(config),
        temperature=config.pretrain.temperature,
        schedule=schedule,
    )
    return model, jax.pmap(step_fn, axis_name=parallel.AXIS, devices=devices, donate_argnums=(0,))


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    if num_examples < global_batch:
        raise ConfigError(
            f"config.pretrain.batch_size={global_batch} is larger than the {num_examples} training "
            f"images; lower it."
        )
    return stream.steps_per_epoch(num_examples, global_batch)


def total_steps(section, spe: int) -> int:
    return int(section.num_steps) if section.num_steps > 0 else int(section.epochs * spe)


def step_and_initial_state(config, spe: int, n_steps: int, num_classes: int | None = None):
    """(pmapped step, fresh unreplicated state) of a pretraining run of `n_steps` steps, `spe` per
    epoch: its LR schedule, model, optimizer and the seed's init key; with `num_classes`, the
    online linear head's state in the state's `probe` (`probe_state`)."""
    schedule = optim.make_schedule(config.pretrain, spe, n_steps)
    model, p_step = make_step(config, schedule)
    tx = optim.make_optimizer(config.pretrain, schedule)
    state = create_state(model, tx, seed_key(config.seed, INIT_KEY), config.data.image_size)
    if num_classes is not None:
        state = state.replace(probe=probe_state(config, schedule, num_classes))
    return p_step, state


def restore_or_init(ckpt: Checkpointer, state: TrainState, config) -> tuple[TrainState, int, dict]:
    """The newest readable checkpoint's state, step and metadata, or `state` itself, 0 and {} (a
    fresh start). With the online linear head, the head's item too; from a checkpoint without
    one, the head starts afresh (`fresh_probe_at`) while the encoder resumes."""
    had_checkpoints = bool(ckpt.steps())  # damaged ones are set aside by the restore
    extra = None if state.probe is None else {PROBE_ITEM: probe_tree(state.probe)}
    found = checked_restore(ckpt, state_tree(state), config, extra)
    if found is None:
        if had_checkpoints:
            log.warning("No usable checkpoint in %s: starting from scratch.", ckpt.directory)
        return state, 0, {}
    tree, meta, step = found
    log.info("Resuming pretraining from step %d (%s).", step, ckpt.directory)
    probe = tree.pop(PROBE_ITEM, None)
    state = state.replace(**tree)
    if state.probe is None:  # a head in the checkpoint and none asked for: it is left there
        return state, step, meta
    if probe is not None:
        return state.replace(probe=state.probe.replace(**probe)), step, meta
    log.warning(
        "The checkpoint of step %d in %s holds no online linear head (written without "
        "pretrain.online_probe): the head starts afresh there, the encoder resumes as saved.",
        step,
        ckpt.directory,
    )
    return state.replace(probe=fresh_probe_at(state.probe, step)), step, meta


def fresh_probe_at(probe: TrainState, step: int) -> TrainState:
    """A fresh online linear head placed at pretraining step `step`: its learning-rate schedule
    (the optax state's ScaleByScheduleState count) goes on from there, not from its warm-up."""

    def schedule_count(path, _) -> bool:
        return getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"

    count = jnp.asarray(step, jnp.int32)
    opt_state = optax.tree_utils.tree_set(probe.opt_state, schedule_count, count=count)
    return probe.replace(step=step, opt_state=opt_state)


def batches(config, source, start: int, stop: int, labels: bool = False):
    """Steps start..stop-1's inputs, (batch, aug_key), on the local devices: `source`'s rows in
    the order of (seed, step) (stream.Order), read on host threads (with their labels for the
    online linear head: the order and the keys are the same either way)."""
    order = stream.Order(seed_key(config.seed, DATA_KEY), len(source), config.pretrain.batch_size)
    aug_key = parallel.replicate(seed_key(config.seed, AUGMENT_KEY))
    reader = stream.Reader(source, labels=labels)
    for batch in stream.train_batches(reader, order, start, stop, config.data):
        yield batch, aug_key


def run(config, ds, writer, ckpt: Checkpointer) -> tuple[TrainState, loop.LoopResult]:
    """Pretrains on ds.pretrain (resuming from `ckpt` when it holds a checkpoint); returns the
    unreplicated state."""
    pc = config.pretrain
    global_batch = pc.batch_size
    spe = steps_per_epoch(len(ds.pretrain), global_batch)
    n_steps = total_steps(pc, spe)
    probe = online_probe(config, ds.pretrain)
    if not probe and pc.get("online_probe") is None:
        log.info(
            "pretrain: the online linear head (pretrain.online_probe) is off: %d of the %d "
            "pretraining images (data.pretrain_split=%r) have no label.",
            int(np.sum(ds.pretrain.labels < 0)),
            len(ds.pretrain),
            config.data.pretrain_split,
        )
    num_classes = ds.num_classes if probe else None
    p_step, state = step_and_initial_state(config, spe, n_steps, num_classes)
    state, start, saved = restore_or_init(ckpt, state, config)
    # The run's length too: --mode=downstream refuses an unfinished one (pipeline).
    meta = {**checkpoint_meta(config, "pretrain"), TOTAL_STEPS: n_steps}

    def save(step, rstate, unrecorded):
        kept = parallel.unreplicate(rstate)
        extra = None if kept.probe is None else {PROBE_ITEM: probe_tree(kept.probe)}
        ckpt.save(step, state_tree(kept), {**meta, loop.UNRECORDED: unrecorded}, extra)

    spec = loop.LoopSpec("pretrain", n_steps, spe, pc.log_every, pc.checkpoint_every, global_batch)
    on_epoch_end = knn_monitor(config, ds) if pc.knn_every else None
    inputs = batches(config, ds.pretrain, start, n_steps, labels=probe)
    result = loop.run(
        spec,
        p_step,
        parallel.replicate(state),
        inputs,
        start,
        writer,
        save,
        on_epoch_end,
        ckpt.wait,
        saved.get(loop.UNRECORDED),
    )
    return parallel.unreplicate(result.state), result


def knn_monitor(config, ds):
    """on_epoch_end callback: kNN test accuracy of the frozen encoder every knn_every epochs
    (features of the labelled train and test splits, streamed), and the online linear head's
    test accuracy on the same test features (h, BN in inference mode) where it trains."""
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    feature_fn = frozen.make_feature_fn(model, augment.spec_from_config(config))
    dc = config.downstream

    def on_epoch_end(epoch, rstate):
        if epoch % config.pretrain.knn_every:
            return {}
        variables = {"params": rstate.params, "batch_stats": rstate.batch_stats}
        acc, test_h = frozen.knn_eval(
            feature_fn, variables, ds, config.data, ds.num_classes, dc.knn_k, dc.knn_temperature
        )
        out = {"knn_acc": acc}
        if rstate.probe is not None:
            probe = parallel.unreplicate(rstate.probe)
            out[PROBE_TEST_ACC] = probe_accuracy(probe, test_h, ds.test_labels)
        return out

    return on_epoch_end
