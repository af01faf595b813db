"""What the loaded data allows, checked once it is loaded and before the workdir is touched
(`pipeline.run`): a setting that cannot mean anything with this data is refused (one line naming
the key and the fix), and one that is legal but odd is warned of, once, in the log and in the
report (`check` returns the warnings; the pipeline records them in config.json's `warnings`, which
report.md lists). What the config alone decides is `app/validate.py`'s.
"""

import logging

import numpy as np

from simclr_jax.data import dataset, stream
from simclr_jax.errors import ConfigError, DataError
from simclr_jax.stages import pretrain
from simclr_jax.train import supervised

log = logging.getLogger(__name__)


def check(config, mode: str, ds, transfer) -> tuple[str, ...]:
    """Refuses (ConfigError / DataError) what `mode`'s stages cannot do anything meaningful with;
    returns the warnings, each logged once here. ds: the pretraining data; transfer: the downstream
    stage's (None in --mode=pretrain; ds itself without downstream.data)."""
    if mode in ("pretrain", "all") and config.pretrain.knn_every:  # the monitor's labels
        _two_classes(ds, "config.data")
    if mode in ("pretrain", "all"):  # pretrain.online_probe=True on unlabelled images: refused
        pretrain.online_probe(config, ds.pretrain)
    if mode != "pretrain":
        _two_classes(transfer, "config.downstream.data" if transfer is not ds else "config.data")
    notes = []
    if mode in ("pretrain", "all"):
        notes += _pretraining(config, ds)
    if mode != "pretrain":
        notes += _downstream(config, transfer)
    if mode == "distill":
        notes += _distillation(config, transfer)
    for note in notes:
        log.warning("%s", note)
    return tuple(notes)


def _two_classes(ds, key: str) -> None:
    """A labelled train split with one class makes every accuracy 100%, chance included."""
    if len(np.unique(ds.train_labels)) >= 2:
        return
    raise DataError(
        f"The labelled train split {ds.train.name} holds one class, so every accuracy, chance "
        f"included, would be 100%: give it two classes or more (one folder per class), or set "
        f"{key}.train_split (or {key}.max_train_examples) so that it holds several."
    )


def _warmup_note(key: str, warmup_epochs: float, spe: int, total: int, what: str) -> list[str]:
    """A warm-up as long as the run (of more than one step): the learning rate reaches its peak
    at the last step only (optim.make_schedule cuts the warm-up there), and never decays."""
    warmup = int(round(warmup_epochs * spe))
    if total < 2 or warmup < total:
        return []
    return [
        f"{key}={warmup_epochs:g} is {warmup} steps and {what} has {total}: its learning rate "
        f"climbs to its peak at the last step and never decays; shorten the warm-up or lengthen "
        f"the run."
    ]


def _pretraining(config, ds) -> list[str]:
    pc = config.pretrain
    spe = pretrain.steps_per_epoch(len(ds.pretrain), pc.batch_size)  # refuses a batch > the data
    total = pretrain.total_steps(pc, spe)
    notes = _warmup_note("pretrain.warmup_epochs", pc.warmup_epochs, spe, total, "pretraining")
    epochs = total // spe
    if pc.knn_every > epochs:
        notes.append(
            f"pretrain.knn_every={pc.knn_every} epochs, and pretraining has {epochs} whole "
            f"epoch(s): the kNN monitor never runs; set it to at most {epochs}, or 0 (off)."
        )
    return notes


def _labelled_steps(config, ds) -> tuple[int, int]:
    """(labelled images, steps per epoch) of the runs on the labelled subset (the classifiers,
    the labels-only student): the subset repeated up to a batch where it is smaller."""
    dc = config.downstream
    subset = dataset.labelled_subset(
        ds.train_labels, dc.label_fraction, ds.num_classes, config.seed
    )
    return len(subset), len(supervised.epoch_indices(subset, dc.batch_size)) // dc.batch_size


def _downstream(config, ds) -> list[str]:
    dc = config.downstream
    n, spe = _labelled_steps(config, ds)
    notes = []
    if dc.batch_size > n:
        notes.append(
            f"downstream.batch_size={dc.batch_size} is larger than the {n} labelled images "
            f"(downstream.label_fraction={dc.label_fraction:g}): each classifier epoch shows each image "
            f"about {dc.batch_size / n:.0f} times (in its own augmentations) and BatchNorm sees "
            f"repeats; lower it to at most {n}, or raise the label fraction."
        )
    budgets = [dc.epochs] + ([dc.long_epochs] if dc.long_epochs > 0 else [])
    for epochs in budgets:
        what = f"the {epochs}-epoch classifier run"
        notes += _warmup_note("downstream.warmup_epochs", dc.warmup_epochs, spe, epochs * spe, what)
    return notes


def _distillation(config, ds) -> list[str]:
    d, n = config.distill, len(ds.pretrain)
    if d.batch_size > n:
        raise ConfigError(
            f"config.distill.batch_size={d.batch_size} is larger than the {n} images the student "
            f"learns from (the downstream data's pretraining split); lower it to at most {n}."
        )
    spe = stream.steps_per_epoch(n, d.batch_size)
    what = "the distillation"
    notes = _warmup_note("distill.warmup_epochs", d.warmup_epochs, spe, d.epochs * spe, what)
    _, spe = _labelled_steps(config, ds)
    what = "the labels-only student"
    total = d.labels_epochs * spe
    return notes + _warmup_note(
        "downstream.warmup_epochs", config.downstream.warmup_epochs, spe, total, what
    )
