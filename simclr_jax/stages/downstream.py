"""The downstream comparison: does SimCLR pretraining help when labels are few?

Orchestration only (the parts live in `classifier.py`, `train/supervised.py`, `evaluation/frozen.py` and
`train/state.py`). Every method sees the same class-balanced labelled subset of the train split
and is scored on the whole test split; every record carries the subset's fingerprint
(`data.subset_digest`):

* baselines: chance; raw pixels (linear probe, kNN); the same encoder at its random
  initialisation, frozen (linear probe, kNN);
* the SimCLR encoder, frozen: linear probe and the weighted kNN vote;
* the same classifier (f + a zero-initialised linear head) trained end to end from the
  pretrained f ('finetune') and from the weights pretraining started from ('scratch'), with the
  same data order, augmentation keys, optimizer and schedule, each at its own peak learning rate
  where `downstream.runs` sets one, for the short budget (`downstream.epochs`) and for a long one
  (`downstream.long_epochs`, phases 'finetune_long' / 'scratch_long'), test loss and accuracy
  after every epoch.
"""

import logging
import time

import numpy as np

from simclr_jax.core import augment, optim
from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.core.optim import scaled_learning_rate
from simclr_jax.data import dataset as data
from simclr_jax.evaluation import frozen as evaluate
from simclr_jax.evaluation import linear_probe
from simclr_jax.runtime import signals
from simclr_jax.train import classifier, loop, supervised
from simclr_jax.train.state import (
    INIT_KEY,
    init_variables,
    restore_encoder,
    seed_key,
    simclr_model,
    start_variables,
    variables_digest,
)
from simclr_jax.train.supervised import run_learning_rate

log = logging.getLogger(__name__)

FINETUNE, SCRATCH, CHANCE = "finetune", "scratch", "chance"
LONG = "_long"  # suffix of the long-budget classifier runs' phases
# Frozen features: (source, linear-probe phase, kNN phase).
FEATURES = (("simclr", "linear", "knn"), ("random", "linear_random", "knn_random"))
FEATURES += (("pixels", "linear_pixels", "knn_pixels"),)


def budgets(config) -> list[tuple[str, int]]:
    """(phase suffix, epochs) of the classifier runs: the short budget, and the long one if on."""
    dc = config.downstream
    return [("", dc.epochs)] + ([(LONG, dc.long_epochs)] if dc.long_epochs > 0 else [])


def compare(
    config, ds, workdir: str, writer, subset: np.ndarray, starts: dict, earlier: dict | None = None
) -> dict:
    """The pretrained ('finetune') and the 'scratch' classifier runs for each budget: identical
    data order, augmentation keys, optimizer and schedule shape; only where they start differs,
    and the peak learning rate where downstream.runs gives a run its own.

    starts: {FINETUNE: (encoder, encoder_id), SCRATCH: (...)}: f's variables and what identifies
    them in the checkpoints' metadata; earlier: {run: the encoder_id an earlier version recorded
    for the same f}. Returns {phase: wall seconds of this invocation}.
    """
    dc = config.downstream
    ids = supervised.epoch_indices(subset, dc.batch_size)  # (n_epoch,) train indices
    spe = len(ids) // dc.batch_size
    inputs, spec = supervised.labelled_inputs(config, ds, ids), augment.spec_from_config(config)
    digest = {"subset": data.subset_digest(ids)}
    walls = {}
    for suffix, epochs in budgets(config):
        total = int(epochs * spe)
        steps = {}  # peak lr -> (tx, model, p_step): runs at one rate share one compiled step
        log_every = spe * supervised.eval_every(epochs)  # records (and checkpoints) per evaluation
        ckpt_every = dc.checkpoint_every if dc.checkpoint_every > 0 else log_every
        test = None  # one compiled test evaluation for both runs (their models are the same)
        for run in (FINETUNE, SCRATCH):
            phase = run + suffix
            tx, model, p_step, peak = _run_step(config, ds, phase, spe, total, steps)
            test = test or classifier.make_evaluator(model, spec, ds.test, config.data, digest)

            def evaluator(rstate, test=test, peak=peak):  # the records say the run's own rate
                return {**test(rstate), "peak_learning_rate": peak}

            loop_spec = loop.LoopSpec(phase, total, spe, log_every, ckpt_every, dc.batch_size)
            state = classifier.initial_state(model, tx, starts[run][0], config.data.image_size)
            ids = (starts[run][1], (earlier or {}).get(run))
            parts = (state, p_step, evaluator, ids)
            walls[phase] = _train_run(config, workdir, writer, epochs, loop_spec, parts, inputs)
    return walls


def _train_run(config, workdir: str, writer, epochs: int, loop_spec, parts, inputs) -> float:
    """One classifier run with its checkpoints in workdir/checkpoints/<phase>; its wall seconds.
    parts: (initial state, pmapped step, evaluator, (what identifies the starting encoder, what
    an earlier version recorded for it or None))."""
    state, p_step, evaluator, (encoder_id, earlier_id) = parts
    meta = supervised.run_meta(config, loop_spec.phase, epochs, encoder_id)
    earlier = None
    if earlier_id is not None:
        earlier = supervised.run_meta(config, loop_spec.phase, epochs, earlier_id)["run"]
    return supervised.train_in_workdir(
        config, workdir, writer, loop_spec, (state, p_step, inputs, evaluator, meta), earlier
    )


def _run_step(config, ds, phase: str, spe: int, total: int, cache: dict):
    """(optimizer, model, pmapped step, peak lr) of classifier run `phase`: downstream's
    optimizer and schedule at the run's own peak learning rate (config.run_learning_rate), built
    once per rate in `cache`."""
    section = config.downstream.copy_and_resolve_references()
    section.learning_rate = run_learning_rate(config.downstream, phase)
    peak = scaled_learning_rate(section.learning_rate, section.batch_size, section.lr_scaling)
    if peak not in cache:
        schedule = optim.make_schedule(section, spe, total)
        model, p_step = classifier.make_classifier_step(config, schedule, ds.num_classes)
        cache[peak] = (optim.make_optimizer(section, schedule), model, p_step)
    return (*cache[peak], peak)


def random_encoder(config) -> dict:
    """f (and the head layers downstream.ft_proj_selector keeps) at their initialisation, exactly
    as pretraining starts (the same init key): the floor a learned representation has to clear."""
    variables = init_variables(  # pretraining's own model: the compiled init is reused
        simclr_model(config), seed_key(config.seed, INIT_KEY), config.data.image_size
    )
    return start_variables(variables, ft_proj_selector(config))


def pixel_features(config, ds, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels in [0, 1] at the encoder's input size, what the encoder sees before its
    normalisation (or at downstream.pixel_size where set, for images too large to fit),
    flattened: (n, S*S*3) of the subset and (m, S*S*3) of the test split."""
    import jax  # noqa: PLC0415

    size = config.downstream.get("pixel_size") or config.data.image_size

    def flat(source, ids):
        chunks = []
        for i in range(0, len(ids), 1024):
            signals.check()
            images = source.read(ids[i : i + 1024])
            chunks.append(augment.downstream_batch(None, 0, images, None, False, size))
        return np.concatenate([np.asarray(jax.device_get(c)).reshape(len(c), -1) for c in chunks])

    return flat(ds.train, np.asarray(subset)), flat(ds.test, np.arange(len(ds.test)))


def frozen_evaluations(config, ds, writer, subset, encoders: dict, encoder_step: int):
    """Linear probe and kNN on the labelled subset's frozen features, for the SimCLR encoder and
    the two baselines (random-init encoder, raw pixels), plus chance. Writes one record per
    method (replacing older ones). encoders: {'simclr': f, 'random': f at init}.

    Returns the records by phase."""
    train_y, common = ds.train_labels[subset], {"num_test": len(ds.test_labels)}
    common.update(dataset=ds.name, num_classes=ds.num_classes)  # what downstream evaluated on
    common.update(num_labelled=len(subset), subset=data.subset_digest(subset))
    writer.drop_phase(CHANCE)
    out = {CHANCE: writer.write(0, CHANCE, {"test_acc": 1.0 / ds.num_classes, **common})}
    for source, linear_phase, knn_phase in FEATURES:
        t0 = time.perf_counter()
        with signals.doing(f"downstream: the {source} features"):  # a stop names what it stopped
            if source == "pixels":
                train_x, test_x = pixel_features(config, ds, subset)
            else:
                train_x, test_x = evaluate.frozen_features(config, ds, subset, encoders[source])
        sizes = {**common, "features_s": time.perf_counter() - t0, "features": source}
        if source == "simclr":
            sizes["encoder_step"] = encoder_step
        features = (train_x, train_y, test_x)
        with signals.doing(f"downstream: {linear_phase} (linear probe)"):
            out[linear_phase] = _linear_record(config, ds, writer, features, linear_phase, sizes)
        with signals.doing(f"downstream: {knn_phase} (kNN)"):
            out[knn_phase] = _knn_record(config, ds, writer, features, knn_phase, sizes)
    return out


def _linear_record(config, ds, writer, features, phase: str, sizes: dict) -> dict:
    """Fits the linear probe on frozen features; writes and returns its record."""
    dc = config.downstream
    train_x, train_y, test_x = features
    t0 = time.perf_counter()
    res = linear_probe.configured_linear_probe(
        config, train_x, train_y, test_x, ds.test_labels, ds.num_classes
    )
    wall = time.perf_counter() - t0
    writer.drop_phase(phase)
    log.info("%s: test acc %.4f (l2 %g, %.1fs).", phase, res["test_acc"], res["l2"], wall)
    note = linear_probe.convergence_note(res)  # None when every L-BFGS fit converged
    if note:
        log.warning("%s: %s", phase, note)
        res["not_converged"] = note  # the report lists it with the run's warnings
    return writer.write(dc.linear_iters, phase, {**res, **sizes, "wall_s": wall})


def _knn_record(config, ds, writer, features, phase: str, sizes: dict) -> dict:
    """The weighted kNN vote on frozen features; writes and returns its record."""
    dc = config.downstream
    train_x, train_y, test_x = features
    t0 = time.perf_counter()
    acc = evaluate.knn_accuracy(
        train_x, train_y, test_x, ds.test_labels, ds.num_classes, dc.knn_k, dc.knn_temperature
    )
    wall = time.perf_counter() - t0
    writer.drop_phase(phase)
    scalars = {"test_acc": acc, "k": min(dc.knn_k, len(train_y)), "temperature": dc.knn_temperature}
    log.info("%s (k=%d): test acc %.4f.", phase, scalars["k"], acc)
    return writer.write(0, phase, {**scalars, **sizes, "wall_s": wall})


def run(config, ds, workdir: str, writer, source: str) -> dict:
    """The downstream stage: restore f from `source` (a pretraining checkpoint directory), the
    frozen-encoder evaluations and baselines, then the pretrained-vs-scratch comparison, all on
    `ds`: the pretraining data, or the transfer dataset of downstream.data (its images resized
    to data.image_size and normalised with data.mean / data.std, the encoder's input; the
    classifiers' heads have its classes).

    'scratch' starts from the very weights SimCLR pretraining started from, so pretraining is
    the only difference between the two classifiers (their heads start at zero).
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
    initial = random_encoder(config)
    # The random-init baseline's BN statistics are the labelled images', not the init's 0 / 1.
    with signals.doing("downstream: the random-init encoder's BN statistics"):
        random = evaluate.estimate_batch_stats(config, ds.train, subset, initial)
    encoders = {"simclr": encoder, "random": random}
    frozen = frozen_evaluations(config, ds, writer, subset, encoders, encoder_step)
    # f by its content (a copied or moved workdir holds the same encoder); runs written before
    # named its directory instead, and are still this run where that is `source`.
    starts = {
        FINETUNE: (encoder, {"step": encoder_step, "digest": variables_digest(encoder)}),
        SCRATCH: (initial, {"init": "the pretraining's initial weights"}),
    }
    earlier = {FINETUNE: {"dir": source, "step": encoder_step}}
    walls = compare(config, ds, workdir, writer, subset, starts, earlier)
    summary = {"encoder_step": encoder_step, "num_labelled": len(subset)}
    summary.update({f"{k}_test_acc": r["test_acc"] for k, r in frozen.items()})
    summary["train_wall_s"] = walls  # this invocation's classifier training (0 when skipped)
    return summary
