"""One resumable supervised run, what the downstream comparison's classifiers and the
distillation's students share: the labelled subset's epoch list and streamed inputs, a run's
checkpoint metadata (what it depends on: change one and it starts anew), its checkpoint directory,
and the training itself through the shared step loop with a test evaluation per epoch or so.
"""

import logging
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.data import dataset, stream
from simclr_jax.runtime import parallel
from simclr_jax.runtime.files import checkpoint_dir
from simclr_jax.train import loop
from simclr_jax.train.checkpoint import Checkpointer
from simclr_jax.train.state import (
    CLASSIFIER_AUGMENT_KEY,
    CLASSIFIER_DATA_KEY,
    changed_keys,
    check_meta,
    checked_restore,
    checkpoint_meta,
    seed_key,
    state_tree,
)

# The downstream stage's classifier runs: the short and the long budget, fine-tuned and scratch.
CLASSIFIER_RUNS = ("finetune", "scratch", "finetune_long", "scratch_long")

log = logging.getLogger(__name__)

EVAL_POINTS = 20  # test evaluations of a long classifier run (every epoch of a short one)
# The downstream keys a classifier checkpoint depends on: change one and the run starts anew
# (and ft_proj_selector, which head layers the classifier keeps, as the run reads it:
# `_selector_key`).
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
)


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
    transfer = dataset.transfer_identity(config)
    return {"downstream_data": _plain_tree(transfer)} if transfer else {}


def shared_meta(config) -> dict:
    """What every supervised run depends on beyond its own settings: the seed, the precision,
    the data's cut and normalisation, the flip, and the transfer dataset where there is one."""
    return {
        **transfer_meta(config),
        "seed": config.seed,
        "precision": config.precision,
        "max_train_examples": config.data.max_train_examples,
        "normalisation": [list(config.data.mean), list(config.data.std)],
        "flip_prob": config.augment.flip_prob,
    }


def run_meta(config, phase: str, epochs: int, encoder: dict | None) -> dict:
    """Checkpoint metadata: the model and the pretraining data (the encoder's input contract,
    checked strictly), and what the run depends on (its own learning rate among them: `phase`
    names the run in downstream.runs; the transfer dataset's identity where downstream.data names
    one, so a run on another dataset starts anew)."""
    dc = config.downstream
    return {
        **checkpoint_meta(config, phase),
        "run": {
            **shared_meta(config),
            "downstream": {
                **_run_keys(dc),
                **_selector_key(config),
                "epochs": epochs,
                "learning_rate": run_learning_rate(dc, phase),  # this run's own
            },
            "encoder": encoder,  # what identifies the f it starts from (downstream.run)
        },
    }


def _run_keys(dc) -> dict:
    """RUN_KEYS' values in `dc`."""
    return {k: _plain(dc[k]) for k in RUN_KEYS}


def _selector_key(config) -> dict:
    """The selector as the run reads it: -1 is model.head_layers (the same run, the same
    checkpoints); left out at 0, so runs written before the key existed (at 0) still resume."""
    k = ft_proj_selector(config)
    return {"ft_proj_selector": k} if k else {}


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


def open_run_checkpoints(
    directory: str, config, meta: dict, earlier: dict | None = None
) -> Checkpointer:
    """A Checkpointer for one classifier run. Checkpoints of a run with other downstream
    settings (or another pretrained encoder) are deleted, so the run starts anew; a checkpoint
    for another model or data is an error. `earlier`: the 'run' entry an earlier version of this
    code wrote for this same run (it identified the encoder by its directory), also accepted."""
    ckpt = Checkpointer(directory, keep=config.pretrain.keep_checkpoints)
    steps = ckpt.steps()
    if not steps:
        return ckpt
    try:
        old = ckpt.read_meta(steps[-1])
    except Exception:  # damaged: restore_latest deals with it
        return ckpt
    check_meta(old, config, directory)
    if old.get("run") == meta["run"] or (earlier is not None and old.get("run") == earlier):
        return ckpt
    log.warning(
        "%s holds a classifier run with other settings (%s): starting it anew.",
        directory,
        "; ".join(
            f"{k}: {a} -> {b}" for k, (a, b) in changed_keys(old.get("run") or {}, meta["run"])
        ),
    )
    ckpt.close()
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("simclr_jax.train.supervised.rmtree")
    return Checkpointer(directory, keep=config.pretrain.keep_checkpoints)


def train_in_workdir(
    config, workdir: str, writer, loop_spec, parts: tuple, earlier: dict | None = None
) -> float:
    """One run with its checkpoints in workdir/checkpoints/<phase> (`open_run_checkpoints`,
    `train`); its wall seconds. parts: (initial state, pmapped step, inputs, evaluator, metadata);
    earlier: as open_run_checkpoints'.
    """
    state, p_step, inputs, evaluator, meta = parts
    directory = checkpoint_dir(workdir, loop_spec.phase)
    ckpt = open_run_checkpoints(directory, config, meta, earlier)
    try:
        result = train(config, state, ckpt, meta, p_step, inputs, loop_spec, writer, evaluator)
    finally:
        ckpt.close()
    return result.wall_s


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
    phase, start, saved = spec.phase, 0, {}
    found = checked_restore(ckpt, state_tree(state), config)
    if found is not None:
        tree, saved, start = found
        state = state.replace(**tree)
        what = "finished: training skipped" if start >= spec.total_steps else "resuming"
        log.info("%s: checkpoint of step %d in %s (%s).", phase, start, ckpt.directory, what)

    def save(step, rstate, unrecorded):
        tree = state_tree(parallel.unreplicate(rstate))
        ckpt.save(step, tree, {**meta, loop.UNRECORDED: unrecorded})

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
        saved.get(loop.UNRECORDED),
    )
    ckpt.wait()
    return result


def run_learning_rate(dc, run: str) -> float:
    """The peak learning rate (before batch scaling) of classifier run `run`: its own
    downstream.runs.<run>.learning_rate, or downstream.learning_rate where that is 0 or unset."""
    own = ((dc.get("runs") or {}).get(run) or {}).get("learning_rate") or 0.0
    return float(own) if own > 0 else float(dc["learning_rate"])
