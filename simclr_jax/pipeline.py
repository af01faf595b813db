"""The run, per --mode: check the config, the encoder source and the data before anything is
written, then take the workdir (one run at a time), pretrain, then the downstream comparison, the
pictures and the report. What run.py calls."""

import contextlib
import copy
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import (
    checkpoint,
    data,
    encoder,
    parallel,
    pictures,
    pretrain,
    report,
    sources,
    stops,
)
from simclr_jax import config as config_lib
from simclr_jax.errors import CheckpointError, WorkdirError
from simclr_jax.lock import LOCK_FILE, WorkdirLock
from simclr_jax.metrics import METRICS_FILE, MetricWriter
from simclr_jax.train_state import check_meta, model_identity

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# The sections that make two runs incomparable: a workdir holding another one is refused.
IDENTITY_KEYS = ("data.name", "data.image_size", "model")


def pretrain_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", "pretrain")


def _identity(cfg: dict) -> dict:
    out = {}
    for key in IDENTITY_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        if key == "model" and isinstance(node, dict):  # keys of earlier versions left out
            node = model_identity(node)
        out[key] = node
    return out


def _check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise WorkdirError(
            f"--workdir {workdir!r} is not writable ({err}). Choose another --workdir."
        ) from err


def _identity_changes(path: str, config) -> dict:
    """{key: (old, new)} for the identity keys where the run in `path` (a config.json) differs."""
    with open(path) as f:
        old = _identity(json.load(f))
    new = _identity(json.loads(config.to_json()))
    return {k: (v, new[k]) for k, v in old.items() if v != new[k]}


def _delete_run(workdir: str) -> None:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    for name in (METRICS_FILE, "tensorboard"):
        p = os.path.join(workdir, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
            os.path.exists(p) and os.remove(p)
        )


def prepare_workdir(workdir: str, config, mode: str) -> None:
    """Creates the workdir, refuses one that holds a different run, writes config.json.

    Every process checks; only process 0 deletes and writes (atomically, so that the others read
    the old file or the new one whole), and nobody goes on before it has finished.
    """
    primary = jax.process_index() == 0
    _check_writable(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    diff = _identity_changes(path, config) if os.path.exists(path) else {}
    if diff and not config.overwrite:
        lines = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
        raise WorkdirError(
            f"--workdir {workdir!r} holds a run of a different config ({lines}). Use another "
            f"--workdir, or pass --config.overwrite=True to delete that run and start anew."
        )
    if diff and mode != "downstream" and primary:
        log.warning("Overwriting the run in %s (config.overwrite=True).", workdir)
        _delete_run(workdir)
    if primary:
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_workdir")


def encoder_source(config, workdir: str) -> str:
    """The pretraining checkpoint directory --mode=downstream restores from; fails early if none."""
    where = os.path.abspath(config.restore) if config.restore else pretrain_dir(workdir)
    ckpt_root = os.path.join(where, "checkpoints", "pretrain")
    if config.restore and os.path.isdir(ckpt_root):  # --config.restore=<a workdir>
        where = ckpt_root
    steps = [d for d in os.listdir(where) if d.isdigit()] if os.path.isdir(where) else []
    if not steps:
        raise CheckpointError(
            f"--mode=downstream needs a pretraining checkpoint, and {where} holds none. Run "
            f"--mode=pretrain (or all) with this --workdir first, or point --config.restore at a "
            f"workdir or checkpoint directory of a finished pretraining run."
        )
    return where


def _load_data(config):
    t0 = time.perf_counter()
    ds = data.load(config.data)
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


def check_encoder_source(config, source: str) -> None:
    """The newest checkpoint in `source` was made for this config's model and data (its metadata
    only; a damaged one is left to the restore, which sets it aside)."""
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


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds the workdir's lock (lock.py) for the run; process 0 takes it and tells the others."""
    held, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            held.acquire()
        except WorkdirError as err:
            error = err
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirError(f"--workdir {workdir!r} is in use (process 0 says by whom).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        held.release()


def _work(workdir: str) -> tuple:
    """What a run leaves that counts as work: metrics records and checkpoint steps."""
    metrics = os.path.join(workdir, METRICS_FILE)
    root = os.path.join(workdir, "checkpoints")
    phases = sorted(os.listdir(root)) if os.path.isdir(root) else []
    steps = [
        (p, sorted(d for d in os.listdir(os.path.join(root, p)) if d.isdigit())) for p in phases
    ]
    return os.path.getsize(metrics) if os.path.exists(metrics) else None, [s for s in steps if s[1]]


def _first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (None: `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


@contextlib.contextmanager
def undone_unless_work(workdir: str, created: str | None):
    """A run that fails before it has done any work (no new metrics record, no checkpoint) leaves
    the workdir as it found it: `created` (the directories this run made) removed, or, in a
    workdir that was there, the files it added removed and config.json as it was. Process 0
    cleans up; the error goes on."""
    existed = created is None
    before = os.listdir(workdir) if existed else None
    config_path = os.path.join(workdir, CONFIG_FILE)
    old_config = None
    if existed and os.path.exists(config_path):
        with open(config_path, "rb") as f:
            old_config = f.read()
    tb = os.path.join(workdir, "tensorboard")
    old_tb = os.listdir(tb) if existed and os.path.isdir(tb) else []
    work = _work(workdir)
    try:
        yield
    except BaseException:
        if jax.process_index() == 0 and _work(workdir) == work:
            if not existed:
                shutil.rmtree(created, ignore_errors=True)
            else:
                _remove_new(workdir, before + [LOCK_FILE], tb, old_tb)
                if old_config is not None:
                    with open(config_path, "wb") as f:
                        f.write(old_config)
        raise


def _remove_new(workdir: str, kept: list[str], tb: str, old_tb: list[str]) -> None:
    for name in set(os.listdir(workdir)) - set(kept):
        p = os.path.join(workdir, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    if os.path.isdir(tb):
        for name in set(os.listdir(tb)) - set(old_tb):
            os.remove(os.path.join(tb, name))


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
        export = os.path.join(os.path.abspath(workdir), encoder.EXPORT_FILE)
        encoder.export({"params": state.params, "batch_stats": state.batch_stats}, export)
        pictures.write_pretrain_curves(config, workdir, ds.num_classes)
        log.info("Pretrained model's variables: %s", export)
    return {"wall_s": result.wall_s, "images_per_s": result.images_per_s, **result.last_record}


def _downstream_stage(config, ds, workdir: str, writer, source: str) -> dict:
    """The comparison, the nearest-neighbour picture, then the report (written by process 0, from
    the workdir's files)."""
    from simclr_jax import downstream  # noqa: PLC0415 (the heavier stage, only when used)

    summary = downstream.run(config, ds, workdir, writer, source)
    with stops.doing("downstream: the nearest-neighbours picture"):
        pictures.write_neighbours(config, ds, workdir, source, primary=writer.enabled)
    if writer.enabled:
        rep = report.write(workdir)
        summary.update(report.summary(rep), wall_s=rep["wall_s"])
        log.info("Report: %s", os.path.join(os.path.abspath(workdir), report.REPORT_MD))
    return summary


def run(config, workdir: str, mode: str = "all") -> dict:
    """Runs the stages of `mode` in `workdir`; returns a summary dict (also logged).

    Everything that can fail on bad input is checked before the workdir is touched (the config,
    the encoder source of --mode=downstream, the data); a run that fails before any work leaves
    the workdir as it found it, and a second run on a workdir in use stops at once.
    """
    parallel.initialize_distributed(config.distributed)
    if jax.process_index() != 0:  # process 0 reports progress; the others only warn
        logging.getLogger("simclr_jax").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    config_lib.validate(config, mode)
    if config.restore and not os.path.isabs(os.path.expanduser(config.restore)):
        config = copy.deepcopy(config)  # recorded absolute: config.json is read from elsewhere
        with config.unlocked():
            config.restore = os.path.abspath(os.path.expanduser(config.restore))
    source = encoder_source(config, workdir) if mode == "downstream" else None
    if source is not None:
        check_encoder_source(config, source)
    with stops.recording():  # a signal is acted on at the next stop point (stops.py)
        ds = _load_data(config)
        stops.check("loading the data")
        return _run_stages(config, ds, workdir, mode, source)


def _run_stages(config, ds, workdir: str, mode: str, source: str | None) -> dict:
    """The stages of `mode` in `workdir`, under its lock; a stop during the pictures or the report
    ends the run once they are written (130 / 143)."""
    config = data.with_stats(config, ds)  # the input normalisation, written to config.json
    created = _first_missing(workdir)  # what a failure before any work removes again
    _check_writable(workdir)  # creates it: the lock lives there
    summary = {"workdir": os.path.abspath(workdir), "mode": mode}
    with workdir_lock(workdir), undone_unless_work(workdir, created):
        prepare_workdir(workdir, config, mode)
        writer = MetricWriter(workdir)
        try:
            if mode in ("pretrain", "all"):
                summary["pretrain"] = _pretrain_stage(config, ds, workdir, writer)
                source = pretrain_dir(workdir)
            if mode in ("downstream", "all"):
                summary["downstream"] = _downstream_stage(config, ds, workdir, writer, source)
        finally:
            writer.close()
    if stops.requested():  # arrived after the last stop point: all is written
        raise stops.Interrupted(
            f"the run: {stops.describe(stops.requested())}; its work is written.", stops.requested()
        )
    return summary
