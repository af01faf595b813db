"""The downstream classifier (the encoder f, the projection head layers it keeps, a linear head):
its network, initial state, pmapped training step and test evaluation. Whether f starts pretrained
or from scratch is the caller's choice of state; one resumable training run of it (or of a
distilled student) is `train/supervised.py`'s.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import optax
from jax import lax

from simclr_jax.core import augment, networks, optim
from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.data import dataset, stream
from simclr_jax.runtime import cpu_conv, parallel
from simclr_jax.train.state import (
    INIT_KEY,
    TrainState,
    abstract_state_tree,
    compute_dtype,
    seed_key,
)

log = logging.getLogger(__name__)

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
    x = dataset.normalize(x, spec)

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
    (networks.Classifier's init): the same as `train_state.create_state(..., encoder)`, without
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
    return networks.build_model(
        model_cfg or config.model,
        num_classes=num_classes,
        bn_axis_name=parallel.AXIS,
        dtype=compute_dtype(config),
        conv=cpu_conv.conv_module(),  # the CPU's faster filter gradient of narrow convolutions
        proj_layers=ft_proj_selector(config),
    )


def abstract_tree(config, num_classes: int) -> dict:
    """The restore target of a downstream classifier run's checkpoint (`build_model`'s network,
    downstream's optimizer), traced only: what the distillation's teacher and the export read."""
    model = build_model(config, num_classes)
    tx = optim.make_optimizer(config.downstream, optax.constant_schedule(0.0))
    return abstract_state_tree(model, tx, seed_key(config.seed, INIT_KEY), config.data.image_size)


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
    x = dataset.normalize(
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
