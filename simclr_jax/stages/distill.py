"""The distillation stage (`--mode=distill`), SimCLRv2's third step (Chen et al., 2020, "Big
Self-Supervised Models are Strong Semi-Supervised Learners", section 2, eq. 2).

A student network (the teacher's architecture, or a smaller one: `distill.model`), from scratch,
learns the fine-tuned teacher's temperature-softened predictions over the pretraining split
(labelled and unlabelled images; labels unused): `losses.distillation_loss`, the teacher in
inference mode on the very view the student sees, as the official code does. That view is
distill.student_view: by default the classifiers' pad-and-translate crop and flip; 'resized_crop'
is the official distillation's random resized crop and flip (colour off). Its baseline: the same
student, from the same initial weights, trained on the labelled subset's hard labels alone
('distill_labels'), with the classifier's step.

This module owns the distillation step, the teacher's restore (the final checkpoint of the
downstream run `distill.teacher` in the workdir), the two student runs (phases 'distill' and
'distill_labels', checkpoints in <workdir>/checkpoints/<phase>, resumable, stopped like the
others) and what their checkpoints depend on. It builds on the shared parts (train_state,
runs' loop and checkpoints, classifier's model, step and evaluation, stream,
augment, optim); it never imports pretrain.py or downstream.py.
"""

import functools
import logging
import os

import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax.core import augment, losses, optim
from simclr_jax.core.optim import scaled_learning_rate
from simclr_jax.data import dataset, stream
from simclr_jax.errors import CheckpointError
from simclr_jax.runtime import parallel
from simclr_jax.runtime.files import checkpoint_dir
from simclr_jax.train import classifier, loop, supervised
from simclr_jax.train.checkpoint import Checkpointer, UnreadableCheckpoint
from simclr_jax.train.state import (
    DISTILL_AUGMENT_KEY,
    DISTILL_DATA_KEY,
    DISTILL_INIT_KEY,
    checked_restore,
    checkpoint_meta,
    create_state,
    model_identity,
    seed_key,
    variables_digest,
)

log = logging.getLogger(__name__)

DISTILL, LABELS = "distill", "distill_labels"  # the two student runs' phases
# What each run's checkpoints depend on (change one and that run starts anew): the distill keys,
# and, for the labels-only student, downstream's labelled-subset settings.
DISTILL_KEYS = ("teacher", "temperature", "epochs", "batch_size", "optimizer", "learning_rate")
DISTILL_KEYS += ("lr_scaling", "warmup_epochs", "weight_decay", "momentum")
LABELS_KEYS = ("labels_epochs", "labels_learning_rate")
LABELLED_KEYS = ("label_fraction", "batch_size", "optimizer", "lr_scaling", "warmup_epochs")
LABELLED_KEYS += ("weight_decay", "momentum")


def distill_step(
    state, batch, aug_key, teacher_vars, *, student, teacher, spec, schedule, temperature, view
):
    """One distillation step on this device's share of the global batch (inside pmap over AXIS).

    batch: {'images': (n, H, W, 3) uint8, 'ids': (n,) int32 positions in the pretraining split};
    teacher_vars: the teacher's {'params', 'batch_stats'} (replicated). Both networks see the same
    augmented view (`view`: distill.student_view, `student_view`); the teacher in inference mode,
    the student with global BN. 'accuracy' is the student's agreement with the teacher's top class.
    """
    images, ids = batch["images"], batch["ids"]
    if view == "resized_crop":  # the official distillation's: random resized crop, flip
        x = augment.resized_crop_flip_batch(
            aug_key, state.step, images, ids, spec.image_size, spec.crop_scale_min, spec.flip_prob
        )
    else:  # 'translate': the classifiers' pad-and-translate crop and flip
        x = augment.downstream_batch(
            aug_key, state.step, images, ids, True, spec.image_size, spec.flip_prob
        )
    x = dataset.normalize(x, spec)
    t_logits = teacher.apply(teacher_vars, x, train=False)  # (n, C)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = student.apply(variables, x, train=True, mutable=["batch_stats"])
        loss = losses.distillation_loss(logits, t_logits, temperature)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, parallel.AXIS)  # equal shares: the global mean's gradient
    agree = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
    metrics = {
        "loss": lax.pmean(loss, parallel.AXIS),
        "accuracy": lax.pmean(agree, parallel.AXIS),
        "learning_rate": schedule(state.step),
    }
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def student_model(config):
    """config.model with distill.model's name and width where set ('' / 0: the teacher's)."""
    model = config.model.copy_and_resolve_references()
    if config.distill.model.name:
        model.name = config.distill.model.name
    if config.distill.model.width:
        model.width = config.distill.model.width
    return model


def student_view(config) -> str:
    """distill.student_view: 'translate' (the default, and what configs written before the key
    ran) or 'resized_crop'."""
    return config.distill.get("student_view", "translate")


def teacher_dir(workdir: str, config) -> str:
    return checkpoint_dir(workdir, config.distill.teacher)


def teacher_steps(config, ds) -> int:
    """The final step of the downstream run distill.teacher names (its budget on the subset)."""
    dc = config.downstream
    subset = dataset.labelled_subset(
        ds.train_labels, dc.label_fraction, ds.num_classes, config.seed
    )
    spe = len(supervised.epoch_indices(subset, dc.batch_size)) // dc.batch_size
    long = config.distill.teacher.endswith("_long")
    return int((dc.long_epochs if long else dc.epochs) * spe)


def restore_teacher(config, ds, workdir: str) -> tuple[dict, dict, str]:
    """(the teacher's {'params', 'batch_stats'}, what identifies it, its directory): the final
    checkpoint of the downstream run distill.teacher in `workdir`; CheckpointError when there is
    none. The identity is the run's name, step and a digest of its variables, not its path: a
    copied or moved workdir holds the same teacher."""
    directory, total = teacher_dir(workdir, config), teacher_steps(config, ds)
    target = classifier.abstract_tree(config, ds.num_classes)  # the classifier stage's network
    ckpt = Checkpointer(directory, create=False, async_save=False)
    found, what = None, "no readable checkpoint"
    try:  # only read: a damaged newest checkpoint is the downstream rerun's to set aside and redo
        if os.path.isdir(directory):
            found = checked_restore(ckpt, target, config, fall_back=False)
    except UnreadableCheckpoint as err:
        what = f"an unreadable newest checkpoint ({err})"
    finally:
        ckpt.close()
    step = None if found is None else int(found[2])
    if step != total:
        what = what if step is None else f"step {step} of {total}"
        raise CheckpointError(
            f"--mode=distill needs the finished downstream run '{config.distill.teacher}' as its "
            f"teacher, and {directory} holds {what}. Run --mode=downstream (or all) with this "
            f"--workdir first, or set config.distill.teacher to a finished run."
        )
    variables = {"params": found[0]["params"], "batch_stats": found[0]["batch_stats"]}
    identity = {"run": config.distill.teacher, "step": step}
    return variables, {**identity, "digest": variables_digest(variables)}, directory


def run_meta(config, phase: str, origin: dict) -> dict:
    """Checkpoint metadata of a student run: the model and data (checked strictly), and what the
    run depends on (the student's architecture, its keys, where it learns from)."""
    keys = DISTILL_KEYS if phase == DISTILL else LABELS_KEYS
    settings = {k: config.distill[k] for k in keys}
    if phase == DISTILL and student_view(config) != "translate":  # left out at the default, so
        settings["student_view"] = student_view(config)  # runs written before still resume
    return {
        **checkpoint_meta(config, phase),
        "run": {
            **supervised.shared_meta(config),  # seed, precision, data cut, flip, the transfer set
            "student": model_identity(student_model(config).to_dict()),
            "distill": settings,
            **origin,
        },
    }


def _distill_parts(config, ds, student, teacher_vars):
    """(loop spec, optimizer, pmapped distill step, inputs, peak lr) of the 'distill' run."""
    dc = config.distill
    spe = stream.steps_per_epoch(len(ds.pretrain), dc.batch_size)
    total = int(dc.epochs * spe)
    every = spe * supervised.eval_every(dc.epochs)
    loop_spec = loop.LoopSpec(DISTILL, total, spe, every, every, dc.batch_size)
    schedule = optim.make_schedule(dc, spe, total)
    step_fn = functools.partial(
        distill_step,
        student=student,
        teacher=classifier.build_model(config, ds.num_classes),
        spec=augment.spec_from_config(config),
        schedule=schedule,
        temperature=float(dc.temperature),
        view=student_view(config),
    )
    p_step = jax.pmap(step_fn, axis_name=parallel.AXIS, donate_argnums=(0,))
    reader, replicated = stream.Reader(ds.pretrain), parallel.replicate(teacher_vars)
    aug_key = parallel.replicate(seed_key(config.seed, DISTILL_AUGMENT_KEY))

    def inputs(start: int, stop: int):
        order = stream.Order(
            seed_key(config.seed, DISTILL_DATA_KEY), len(ds.pretrain), dc.batch_size
        )
        for batch in stream.train_batches(reader, order, start, stop, config.data):
            yield batch, aug_key, replicated

    peak = scaled_learning_rate(dc.learning_rate, dc.batch_size, dc.lr_scaling)
    return loop_spec, optim.make_optimizer(dc, schedule), p_step, inputs, peak


def _labels_parts(config, ds, ids):
    """(loop spec, optimizer, pmapped classifier step, inputs, peak lr) of the labels-only
    student: downstream's optimizer and batch on the labelled subset, at distill.labels_*."""
    section = config.downstream.copy_and_resolve_references()
    section.learning_rate = config.distill.labels_learning_rate
    spe = len(ids) // section.batch_size
    epochs = config.distill.labels_epochs
    total, every = int(epochs * spe), spe * supervised.eval_every(epochs)
    loop_spec = loop.LoopSpec(LABELS, total, spe, every, every, section.batch_size)
    schedule = optim.make_schedule(section, spe, total)
    _, p_step = classifier.make_classifier_step(
        config, schedule, ds.num_classes, model_cfg=student_model(config)
    )
    inputs = supervised.labelled_inputs(config, ds, ids)
    peak = scaled_learning_rate(section.learning_rate, section.batch_size, section.lr_scaling)
    return loop_spec, optim.make_optimizer(section, schedule), p_step, inputs, peak


def run(config, ds, workdir: str, writer) -> dict:
    """The distillation stage: restore the teacher, train the distilled student ('distill') and
    the labels-only one ('distill_labels') from the same initial weights; both are scored on the
    test split after their epochs, as the classifier runs. Returns the wall seconds of this
    invocation's training by phase, and what taught."""
    teacher_vars, teacher_id, teacher_at = restore_teacher(config, ds, workdir)
    log.info("Teacher: %s, step %d.", teacher_at, teacher_id["step"])
    dc = config.downstream
    subset = dataset.labelled_subset(
        ds.train_labels, dc.label_fraction, ds.num_classes, config.seed
    )
    ids = supervised.epoch_indices(subset, dc.batch_size)
    student = classifier.build_model(config, ds.num_classes, student_model(config))
    spec = augment.spec_from_config(config)
    test = classifier.make_evaluator(student, spec, ds.test, config.data)
    parts = {
        DISTILL: _distill_parts(config, ds, student, teacher_vars),
        LABELS: _labels_parts(config, ds, ids),
    }
    origins = {
        DISTILL: {"teacher": teacher_id},
        LABELS: {"downstream": {k: dc[k] for k in LABELLED_KEYS}},
    }
    # What runs written before teachers were identified by content recorded: the directory.
    old_id = {"teacher": {"dir": teacher_at, "step": teacher_id["step"]}}
    earlier = {DISTILL: run_meta(config, DISTILL, old_id)["run"], LABELS: None}
    extra = {
        DISTILL: {"teacher": config.distill.teacher, "temperature": config.distill.temperature},
        LABELS: {"subset": dataset.subset_digest(ids)},
    }
    walls = {}
    for phase, (loop_spec, tx, p_step, inputs, peak) in parts.items():
        state = create_state(student, tx, seed_key(config.seed, DISTILL_INIT_KEY), spec.image_size)

        def evaluator(rstate, phase=phase, peak=peak):
            return {**test(rstate), **extra[phase], "peak_learning_rate": peak}

        meta = run_meta(config, phase, origins[phase])
        run_parts = (state, p_step, inputs, evaluator, meta)
        walls[phase] = supervised.train_in_workdir(
            config, workdir, writer, loop_spec, run_parts, earlier[phase]
        )
    return {"teacher": teacher_id, "train_wall_s": walls}
