"""The run, per --mode: check the config, the encoder (or teacher) source and the data (the
pretraining data and the downstream stage's transfer dataset, downstream.data, where one is named;
what the data allows: `app/data_checks.py`) before anything is written, then take the workdir (one run at
a time), pretrain, then the downstream comparison, the pictures and the report (--mode=distill:
the distillation stage on a workdir that holds the downstream run, then the report). What run.py
calls."""

import copy
import logging
import os
import time

import jax

from simclr_jax import pretrained
from simclr_jax.app import data_checks, workdirs
from simclr_jax.app import validate as config_lib
from simclr_jax.data import dataset, sources
from simclr_jax.errors import CheckpointError
from simclr_jax.report import build, pictures
from simclr_jax.runtime import parallel, signals
from simclr_jax.runtime.files import METRICS_FILE, checkpoint_dir, read_records
from simclr_jax.runtime.records import MetricWriter
from simclr_jax.stages import pretrain
from simclr_jax.train import checkpoint
from simclr_jax.train.state import TOTAL_STEPS, check_meta

log = logging.getLogger(__name__)


def pretrain_dir(workdir: str) -> str:
    return checkpoint_dir(workdir, "pretrain")


def encoder_source(config, workdir: str) -> str:
    """The pretraining checkpoint directory --mode=downstream restores from; fails early if none."""
    where = os.path.abspath(config.restore) if config.restore else pretrain_dir(workdir)
    ckpt_root = checkpoint_dir(where, "pretrain")
    if config.restore and os.path.isdir(ckpt_root):  # --config.restore=<a workdir>
        where = ckpt_root
    if not checkpoint.has_steps(where):
        raise CheckpointError(
            f"--mode=downstream needs a pretraining checkpoint, and {where} holds none. Run "
            f"--mode=pretrain (or all) with this --workdir first, or point --config.restore at a "
            f"workdir or checkpoint directory of a finished pretraining run."
        )
    return where


def _load_data(config):
    t0 = time.perf_counter()
    ds = dataset.load(config.data)
    streamed = [
        r
        for r in ("pretrain", "train", "test")
        if not isinstance(getattr(ds, r), sources.ArraySource)
    ]
    log.info(
        "Loaded %s: %d pretraining (%s) / %d labelled train / %d test images in %.1fs on %d "
        "device(s)%s.",
        ds.name,
        len(ds.pretrain),
        config.data.pretrain_split,
        len(ds.train_labels),
        len(ds.test_labels),
        time.perf_counter() - t0,
        jax.device_count(),
        f"; streamed from storage: {', '.join(streamed)}" if streamed else "",
    )
    return ds


def _load_transfer(config, ds):
    """The downstream stage's dataset (downstream.data; `ds` itself without one), loaded before
    any work so that its errors come first, as the pretraining data's do."""
    if not dataset.is_transfer(config):
        return ds
    t0 = time.perf_counter()
    transfer = dataset.load_downstream(config, ds)
    log.info(
        "Loaded the transfer dataset %s: %d labelled train / %d test images, %d classes, in "
        "%.1fs; the encoder reads them at %d px, normalised with %s's statistics.",
        transfer.name,
        len(transfer.train_labels),
        len(transfer.test_labels),
        transfer.num_classes,
        time.perf_counter() - t0,
        config.data.image_size,
        ds.name,
    )
    return transfer


def check_checkpoints_in(config, source: str, finished: bool = False) -> None:
    """The newest checkpoint in `source` was made for this config's model, data and
    normalisation, and (with `finished`, for a pretraining that records its length) ends its run:
    its metadata only; a damaged one is left to the restore."""
    ckpt = checkpoint.Checkpointer(source, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        try:
            meta = ckpt.read_meta(steps[-1]) if steps else None
        except Exception:
            meta = None
        if meta is not None:
            check_meta(meta, config, source)
    finally:
        ckpt.close()
    total = (meta or {}).get(TOTAL_STEPS)
    if finished and total and steps[-1] < total:
        raise CheckpointError(
            f"--mode=downstream evaluates a finished pretraining, and the newest checkpoint in "
            f"{source} is step {steps[-1]} of {total}. Rerun --mode=pretrain (or all) with that "
            f"run's --workdir to finish it, then this command."
        )


def check_workdir_checkpoints(config, workdir: str, source: str | None) -> None:
    """Every checkpoint the run may restore (the workdir's, of every phase, and the encoder
    source) was made for this config's model, data and normalisation: checked before anything
    is written, so that a refused run leaves the workdir as it was."""
    root = checkpoint_dir(workdir)
    phases = sorted(os.listdir(root)) if os.path.isdir(root) else []
    dirs = [os.path.join(root, p) for p in phases if "." not in p]  # not <phase>.damaged
    for where in dirs + ([source] if source else []):
        if checkpoint.has_steps(where):
            check_checkpoints_in(config, where)


def _pretrain_stage(config, ds, workdir: str, writer) -> dict:
    if writer.enabled:  # the first check of a SimCLR run, before the long wait
        pictures.write_views(config, ds, workdir)
        log.info("Augmented views: %s", os.path.join(os.path.abspath(workdir), pictures.VIEWS_PNG))
    ckpt = checkpoint.Checkpointer(pretrain_dir(workdir), keep=config.pretrain.keep_checkpoints)
    try:
        state, result = pretrain.run(config, ds, writer, ckpt)
    finally:
        ckpt.close()
    if writer.enabled:
        export = os.path.join(os.path.abspath(workdir), pretrained.EXPORT_FILE)
        pretrained.export({"params": state.params, "batch_stats": state.batch_stats}, export)
        pictures.write_pretrain_curves(config, workdir, ds.num_classes)
        log.info("Pretrained model's variables: %s", export)
    # A finished pretraining runs no step: its last record is the one metrics.jsonl holds.
    last = result.last_record or _last_record(workdir, "pretrain")
    return {"wall_s": result.wall_s, "images_per_s": result.images_per_s, **last}


def _last_record(workdir: str, phase: str) -> dict:
    """The last metrics.jsonl record of `phase` that has a loss ({} where there is none)."""
    rows = read_records(os.path.join(workdir, METRICS_FILE), phase)
    return next((r for r in reversed(rows) if "loss" in r), {})


def _write_report(workdir: str, summary: dict) -> None:
    """report.md / report.json from the workdir's files; its headline numbers into `summary`."""
    rep = build.write(workdir)
    summary.update(build.summary(rep), wall_s=rep["wall_s"])
    log.info("Report: %s", os.path.join(os.path.abspath(workdir), build.REPORT_MD))


def _downstream_stage(config, ds, workdir: str, writer, source: str) -> dict:
    """The comparison, the nearest-neighbour picture, then the report (written by process 0, from
    the workdir's files)."""
    from simclr_jax.stages import downstream  # noqa: PLC0415 (the heavier stage, only when used)

    summary = downstream.run(config, ds, workdir, writer, source)
    with signals.doing("downstream: the nearest-neighbours picture"):
        pictures.write_neighbours(config, ds, workdir, source, primary=writer.enabled)
    if writer.enabled:
        _write_report(workdir, summary)
    return summary


def teacher_source(config, workdir: str) -> str:
    """The downstream run's checkpoint directory --mode=distill restores its teacher from; fails
    early if it holds no checkpoint (whether it is the run's final one is checked once the data is
    loaded: distill.restore_teacher)."""
    where = checkpoint_dir(workdir, config.distill.teacher)
    if not checkpoint.has_steps(where):
        raise CheckpointError(
            f"--mode=distill needs the downstream run '{config.distill.teacher}' as its teacher, "
            f"and {where} holds no checkpoint. Run --mode=downstream (or all) with this --workdir "
            f"first, or set config.distill.teacher to a run it holds."
        )
    return where


def _distill_stage(config, ds, workdir: str, writer) -> dict:
    """The distilled and the labels-only student, then the report rewritten with them."""
    from simclr_jax.stages import distill  # noqa: PLC0415 (only when used)

    summary = distill.run(config, ds, workdir, writer)
    if writer.enabled:
        _write_report(workdir, summary)
    return summary


def run(config, workdir: str, mode: str = "all") -> dict:
    """Runs the stages of `mode` in `workdir`; returns a summary dict (also logged).

    Everything that can fail on bad input is checked before the workdir is touched (the config,
    the encoder source of --mode=downstream, the data); a run that fails before any work leaves
    the workdir as it found it, and a second run on a workdir in use stops at once.
    """
    config_lib.check_values(config, mode)  # first: a bad distributed section never starts it
    parallel.initialize_distributed(config.distributed)
    if jax.process_index() != 0:  # process 0 reports progress; the others only warn
        logging.getLogger("simclr_jax").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    config_lib.check_batch_sizes(config)  # over every process's devices
    if config.restore and not os.path.isabs(os.path.expanduser(config.restore)):
        config = copy.deepcopy(config)  # recorded absolute: config.json is read from elsewhere
        with config.unlocked():
            config.restore = os.path.abspath(os.path.expanduser(config.restore))
    source = encoder_source(config, workdir) if mode == "downstream" else None
    if source is not None:
        check_checkpoints_in(config, source, finished=True)
    if mode == "distill":  # the teacher's checkpoint, made for this model and data
        check_checkpoints_in(config, teacher_source(config, workdir))
    with signals.recording():  # a signal is acted on at the next stop point (runtime/signals.py)
        ds = _load_data(config)
        transfer = _load_transfer(config, ds) if mode != "pretrain" else None
        warnings = data_checks.check(config, mode, ds, transfer)  # refuses, or warns once, here
        signals.check("loading the data")
        return _run_stages(config, (ds, transfer), workdir, mode, source, warnings)


def _run_stages(
    config, datasets, workdir: str, mode: str, source: str | None, warnings: tuple
) -> dict:
    """The stages of `mode` in `workdir`, under its lock; a stop during the pictures or the report
    ends the run once they are written (130 / 143). datasets: (pretraining, downstream) data (the
    downstream one is None in --mode=pretrain); warnings: `checks.check`'s, which config.json
    records for the report."""
    ds, transfer = datasets
    config = dataset.with_stats(config, ds, transfer)  # the input normalisation, -> config.json
    if warnings:
        with config.unlocked():
            config.warnings = list(warnings)
    created = workdirs.first_missing(workdir)  # what a failure before any work removes again
    workdirs.check_writable(workdir)  # creates it: the lock lives there
    summary = {"workdir": os.path.abspath(workdir), "mode": mode}
    with workdirs.lock(workdir), workdirs.undone_unless_work(workdir, created):
        delete = workdirs.check(workdir, config, mode)  # a run overwritten is not checked
        if not delete:
            check_workdir_checkpoints(config, workdir, source)
        workdirs.prepare(workdir, config, delete)
        writer = MetricWriter(workdir)
        try:
            if mode in ("pretrain", "all"):
                summary["pretrain"] = _pretrain_stage(config, ds, workdir, writer)
                source = pretrain_dir(workdir)
            if mode in ("downstream", "all"):
                summary["downstream"] = _downstream_stage(config, transfer, workdir, writer, source)
            if mode == "distill":  # over the downstream data (its train split under transfer)
                summary["distill"] = _distill_stage(config, transfer, workdir, writer)
        finally:
            writer.close()
    if signals.requested():  # arrived after the last stop point: all is written
        raise signals.Interrupted(
            f"the run: {signals.describe(signals.requested())}; its work is written.",
            signals.requested(),
        )
    return summary
