"""SimCLR pretraining: the pmapped step (two views of this device's rows, f and g, NT-Xent over
the global batch, LARS update), the kNN monitor, and the run that streams its batches
(`stream.py`), resumes from, and writes, orbax checkpoints.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax import augment, data, evaluate, loop, losses, models, optim, parallel, stream
from simclr_jax.checkpoint import Checkpointer
from simclr_jax.errors import ConfigError
from simclr_jax.train_state import (
    AUGMENT_KEY,
    DATA_KEY,
    INIT_KEY,
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


def pretrain_step(state, batch, aug_key, *, model, aug_cfg, temperature, schedule):
    """One SimCLR step on this device's share of the global batch (inside pmap over AXIS).

    batch: {'images': (n, H, W, 3) uint8, 'ids': (n,) int32}, this device's rows of the step's
    global batch and their global positions (`stream.Order`), from which the views' keys fold.
    """
    ids = batch["ids"]
    v1, v2 = augment.two_views(aug_key, state.step, batch["images"], ids, aug_cfg)  # (n,S,S,3) x2
    views = data.normalize(jnp.concatenate([v1, v2]), aug_cfg)  # (2n, S, S, 3): BN sees both

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (_, z), updates = model.apply(variables, views, train=True, mutable=["batch_stats"])
        z1, z2 = jnp.split(z, 2)  # (n, D) each
        partial_loss, metrics = losses.nt_xent_with_metrics(z1, z2, temperature, parallel.AXIS)
        # The official scale, 2L (losses.OBJECTIVE_SCALE); metrics['loss'] reports L.
        return losses.OBJECTIVE_SCALE * partial_loss, (metrics, updates["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = lax.psum(grads, parallel.AXIS)  # partial losses sum to L, so their grads sum too
    metrics["learning_rate"] = schedule(state.step)
    # Global BN: the running statistics are already identical on every device.
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


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


def step_and_initial_state(config, spe: int, n_steps: int) -> tuple:
    """(pmapped step, fresh unreplicated state) of a pretraining run of `n_steps` steps, `spe` per
    epoch: its LR schedule, model, optimizer and the seed's init key."""
    schedule = optim.make_schedule(config.pretrain, spe, n_steps)
    model, p_step = make_step(config, schedule)
    tx = optim.make_optimizer(config.pretrain, schedule)
    return p_step, create_state(model, tx, seed_key(config.seed, INIT_KEY), config.data.image_size)


def restore_or_init(ckpt: Checkpointer, state: TrainState, config) -> tuple[TrainState, int, dict]:
    """The newest readable checkpoint's state, step and metadata, or `state` itself, 0 and {} (a
    fresh start)."""
    had_checkpoints = bool(ckpt.steps())  # damaged ones are set aside by the restore
    found = checked_restore(ckpt, state_tree(state), config)
    if found is None:
        if had_checkpoints:
            log.warning("No usable checkpoint in %s: starting from scratch.", ckpt.directory)
        return state, 0, {}
    tree, meta, step = found
    log.info("Resuming pretraining from step %d (%s).", step, ckpt.directory)
    return state.replace(**tree), step, meta


def batches(config, source, start: int, stop: int):
    """Steps start..stop-1's inputs, (batch, aug_key), on the local devices: `source`'s rows in
    the order of (seed, step) (stream.Order), read on host threads."""
    order = stream.Order(seed_key(config.seed, DATA_KEY), len(source), config.pretrain.batch_size)
    aug_key = parallel.replicate(seed_key(config.seed, AUGMENT_KEY))
    for batch in stream.train_batches(stream.Reader(source), order, start, stop, config.data):
        yield batch, aug_key


def run(config, ds, writer, ckpt: Checkpointer) -> tuple[TrainState, loop.LoopResult]:
    """Pretrains on ds.pretrain (resuming from `ckpt` when it holds a checkpoint); returns the
    unreplicated state."""
    pc = config.pretrain
    global_batch = pc.batch_size
    spe = steps_per_epoch(len(ds.pretrain), global_batch)
    n_steps = total_steps(pc, spe)
    p_step, state = step_and_initial_state(config, spe, n_steps)
    state, start, saved = restore_or_init(ckpt, state, config)
    # The run's length too: --mode=downstream refuses an unfinished one (pipeline).
    meta = {**checkpoint_meta(config, "pretrain"), TOTAL_STEPS: n_steps}

    def save(step, rstate, unrecorded):
        tree = state_tree(parallel.unreplicate(rstate))
        ckpt.save(step, tree, {**meta, loop.UNRECORDED: unrecorded})

    spec = loop.LoopSpec("pretrain", n_steps, spe, pc.log_every, pc.checkpoint_every, global_batch)
    on_epoch_end = knn_monitor(config, ds) if pc.knn_every else None
    inputs = batches(config, ds.pretrain, start, n_steps)
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
    (features of the labelled train and test splits, streamed)."""
    model = models.build_model(config.model, dtype=compute_dtype(config))
    feature_fn = evaluate.make_feature_fn(model, augment.spec_from_config(config))
    dc = config.downstream

    def on_epoch_end(epoch, rstate):
        if epoch % config.pretrain.knn_every:
            return {}
        variables = {"params": rstate.params, "batch_stats": rstate.batch_stats}
        acc = evaluate.knn_eval(
            feature_fn, variables, ds, config.data, ds.num_classes, dc.knn_k, dc.knn_temperature
        )
        return {"knn_acc": acc}

    return on_epoch_end
