"""The downstream comparison: does SimCLR pretraining help when labels are few?

Orchestration only (the parts live in `classifier.py`, `evaluate.py` and `train_state.py`):

* the same classifier (f + a linear head) trained twice on the same class-balanced labelled
  subset, with the same data order, augmentation keys, head init, optimizer and schedule: once
  from the pretrained f ('finetune'), once from a random f ('scratch'); test loss and accuracy
  after every epoch;
* the frozen-encoder evaluations on the same subset: a linear probe and the weighted kNN vote;
* the metrics.jsonl records of all of it (phases 'finetune', 'scratch', 'linear', 'knn').
"""

import logging
import os
import time

import numpy as np

from simclr_jax import classifier, data, evaluate, loop, optim, parallel
from simclr_jax.train_state import (
    CLASSIFIER_AUGMENT_KEY,
    CLASSIFIER_DATA_KEY,
    CLASSIFIER_INIT_KEY,
    create_state,
    restore_encoder,
    seed_key,
)

log = logging.getLogger(__name__)

FINETUNE, SCRATCH, LINEAR, KNN = "finetune", "scratch", "linear", "knn"


def epoch_indices(subset: np.ndarray, global_batch: int) -> np.ndarray:
    """What one classifier epoch iterates over: the subset, repeated when it is smaller than a
    batch (each image then appears ceil(batch / n) times an epoch, with its own augmentations)."""
    reps = -(-global_batch // len(subset))
    return np.tile(subset, reps)


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
    model, p_step = classifier.make_classifier_step(config, schedule, ds.num_classes)
    step_args = parallel.replicate(
        (
            ds.train_images[ids],
            ds.train_labels[ids].astype(np.int32),
            seed_key(config.seed, CLASSIFIER_DATA_KEY),
            seed_key(config.seed, CLASSIFIER_AUGMENT_KEY),
        )
    )
    evaluator = classifier.make_evaluator(
        model, image_size, parallel.replicate(ds.test_images), ds.test_labels
    )
    init_key = seed_key(config.seed, CLASSIFIER_INIT_KEY)
    ckpt_every = dc.checkpoint_every if dc.checkpoint_every > 0 else spe
    walls = {}
    for phase, enc, enc_id in ((FINETUNE, encoder, encoder_id), (SCRATCH, None, None)):
        meta = classifier.run_meta(config, phase, enc_id)
        directory = os.path.join(os.path.abspath(workdir), "checkpoints", phase)
        ckpt = classifier.open_run_checkpoints(directory, config, meta)
        try:
            state = create_state(model, tx, init_key, image_size, enc)
            spec = loop.LoopSpec(phase, total, spe, spe, ckpt_every, dc.batch_size)
            result = classifier.train(
                config, state, ckpt, meta, p_step, step_args, spec, writer, evaluator
            )
        finally:
            ckpt.close()
        walls[phase] = result.wall_s
    return walls


def _linear_record(config, ds, writer, features, sizes: dict) -> dict:
    """Fits the linear probe on the frozen features; writes and returns its 'linear' record."""
    dc = config.downstream
    train_x, train_y, test_x = features
    t0 = time.perf_counter()
    res = evaluate.linear_probe(
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
    log.info("Linear probe: test acc %.4f (%.1fs).", res["test_acc"], wall)
    steps = res.pop("steps")
    return writer.write(steps, LINEAR, {**res, "epochs": dc.linear_epochs, **sizes, "wall_s": wall})


def _knn_record(config, ds, writer, features, sizes: dict) -> dict:
    """The weighted kNN vote on the frozen features; writes and returns its 'knn' record."""
    dc = config.downstream
    train_x, train_y, test_x = features
    t0 = time.perf_counter()
    acc = evaluate.knn_accuracy(
        train_x, train_y, test_x, ds.test_labels, ds.num_classes, dc.knn_k, dc.knn_temperature
    )
    wall = time.perf_counter() - t0
    writer.drop_phase(KNN)
    scalars = {"test_acc": acc, "k": min(dc.knn_k, len(train_y)), "temperature": dc.knn_temperature}
    log.info("kNN (k=%d): test acc %.4f.", scalars["k"], acc)
    return writer.write(0, KNN, {**scalars, **sizes, "wall_s": wall})


def frozen_evaluations(
    config, ds, writer, subset: np.ndarray, encoder: dict, encoder_step: int
) -> dict:
    """Linear probe and kNN on features of the frozen pretrained f (BN in inference mode),
    extracted once: the labelled subset is the probe's training set and kNN's memory bank.
    Writes one 'linear' and one 'knn' record (replacing older ones); returns both."""
    t0 = time.perf_counter()
    train_x, test_x = evaluate.frozen_features(config, ds, subset, encoder)
    sizes = {
        "num_labelled": len(subset),
        "num_test": len(ds.test_labels),
        "encoder_step": encoder_step,
        "features_s": time.perf_counter() - t0,
    }
    features = (train_x, ds.train_labels[subset], test_x)
    out = {}
    if config.downstream.linear_epochs > 0:
        out[LINEAR] = _linear_record(config, ds, writer, features, sizes)
    out[KNN] = _knn_record(config, ds, writer, features, sizes)
    return out


def run(config, ds, workdir: str, writer, source: str) -> dict:
    """The downstream stage: restore f from `source` (a pretraining checkpoint directory), run
    the pretrained-vs-scratch comparison and the frozen-encoder evaluations.

    Returns a summary: final test numbers of the frozen evaluations, wall times, the labelled-set
    size (the classifiers' numbers are in metrics.jsonl, which the report reads).
    """
    encoder, encoder_step = restore_encoder(config, source)
    log.info("Restored the pretrained encoder from %s (step %d).", source, encoder_step)
    dc = config.downstream
    subset = data.labelled_subset(ds.train_labels, dc.label_fraction, ds.num_classes, config.seed)
    log.info(
        "Labelled subset: %d of %d train images (label_fraction %g, class-balanced).",
        len(subset),
        len(ds.train_labels),
        dc.label_fraction,
    )
    walls = compare(
        config, ds, workdir, writer, subset, encoder, {"dir": source, "step": encoder_step}
    )
    frozen = frozen_evaluations(config, ds, writer, subset, encoder, encoder_step)
    summary = {"encoder_step": encoder_step, "num_labelled": len(subset)}
    summary.update({f"{k}_test_acc": r["test_acc"] for k, r in frozen.items()})
    summary["train_wall_s"] = walls  # this invocation's classifier training (0 when skipped)
    return summary
