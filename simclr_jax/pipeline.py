"""The run, per --mode: check the config and the workdir, load the data, pretrain, then the
downstream comparison and the report. What run.py calls."""

import json
import logging
import os
import shutil
import time

import jax
from jax.experimental import multihost_utils

from simclr_jax import checkpoint, data, parallel, pretrain, report
from simclr_jax import config as config_lib
from simclr_jax.errors import CheckpointError, WorkdirError
from simclr_jax.metrics import METRICS_FILE, MetricWriter
from simclr_jax.train_state import model_identity

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
    log.info(
        "Loaded %s: %d train / %d test images in %.1fs on %d device(s).",
        ds.name,
        len(ds.train_labels),
        len(ds.test_labels),
        time.perf_counter() - t0,
        jax.device_count(),
    )
    return ds


def _pretrain_stage(config, ds, workdir: str, writer) -> dict:
    ckpt = checkpoint.Checkpointer(pretrain_dir(workdir), keep=config.pretrain.keep_checkpoints)
    try:
        _, result = pretrain.run(config, ds, writer, ckpt)
    finally:
        ckpt.close()
    return {"wall_s": result.wall_s, "images_per_s": result.images_per_s, **result.last_record}


def _downstream_stage(config, ds, workdir: str, writer, source: str) -> dict:
    """The comparison, then the report (written by process 0, from the workdir's files)."""
    from simclr_jax import downstream  # noqa: PLC0415 (the heavier stage, only when used)

    summary = downstream.run(config, ds, workdir, writer, source)
    if writer.enabled:
        rep = report.write(workdir)
        summary.update(report.summary(rep), wall_s=rep["wall_s"])
        log.info("Report: %s", os.path.join(workdir, report.REPORT_MD))
    return summary


def run(config, workdir: str, mode: str = "all") -> dict:
    """Runs the stages of `mode` in `workdir`; returns a summary dict (also logged)."""
    parallel.initialize_distributed(config.distributed)
    if jax.process_index() != 0:  # process 0 reports progress; the others only warn
        logging.getLogger("simclr_jax").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    config_lib.validate(config, mode)
    source = encoder_source(config, workdir) if mode == "downstream" else None
    ds = _load_data(config)
    config = data.with_stats(config, ds)  # the input normalisation, written to config.json
    prepare_workdir(workdir, config, mode)
    writer = MetricWriter(workdir)
    summary = {"workdir": os.path.abspath(workdir), "mode": mode}
    try:
        if mode in ("pretrain", "all"):
            summary["pretrain"] = _pretrain_stage(config, ds, workdir, writer)
            source = pretrain_dir(workdir)
        if mode in ("downstream", "all"):
            summary["downstream"] = _downstream_stage(config, ds, workdir, writer, source)
    finally:
        writer.close()
    return summary
