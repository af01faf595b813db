"""The run, per --mode: check the config and the workdir, load the data, pretrain, then the
downstream comparison and the report. What run.py calls."""

import json
import logging
import os
import shutil
import time

import jax
from jax.experimental import multihost_utils

from simclr_jax import checkpoint, data, parallel, pretrain
from simclr_jax import config as config_lib
from simclr_jax.metrics import METRICS_FILE, MetricWriter

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# The sections that make two runs incomparable: a workdir holding another one is refused.
IDENTITY_KEYS = ("data.name", "data.image_size", "model")


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do."""


def pretrain_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", "pretrain")


def _identity(cfg: dict) -> dict:
    out = {}
    for key in IDENTITY_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        if key == "model" and isinstance(node, dict):  # conv_impl etc.: same params
            node = pretrain.model_identity(node)
        out[key] = node
    return out


def prepare_workdir(workdir: str, config, mode: str) -> None:
    """Creates the workdir, refuses one that holds a different run, writes config.json.

    Every process checks; only process 0 deletes and writes (atomically, so that the others read
    the old file or the new one whole), and nobody goes on before it has finished.
    """
    primary = jax.process_index() == 0
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
    path = os.path.join(workdir, CONFIG_FILE)
    new = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {
            k: (v, _identity(new)[k]) for k, v in _identity(old).items() if v != _identity(new)[k]
        }
        if diff and not config.overwrite:
            lines = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise WorkdirError(
                f"--workdir {workdir!r} holds a run of a different config ({lines}). Use another "
                f"--workdir, or pass --config.overwrite=True to delete that run and start anew."
            )
        if diff and mode != "downstream" and primary:
            log.warning("Overwriting the run in %s (config.overwrite=True).", workdir)
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
            for name in (METRICS_FILE, "tensorboard"):
                p = os.path.join(workdir, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
                    os.path.exists(p) and os.remove(p)
                )
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
        raise checkpoint.CheckpointError(
            f"--mode=downstream needs a pretraining checkpoint, and {where} holds none. Run "
            f"--mode=pretrain (or all) with this --workdir first, or point --config.restore at a "
            f"workdir or checkpoint directory of a finished pretraining run."
        )
    return where


def run(config, workdir: str, mode: str = "all") -> dict:
    """Runs the stages of `mode` in `workdir`; returns a summary dict (also logged)."""
    parallel.initialize_distributed(config.distributed)
    if jax.process_index() != 0:  # process 0 reports progress; the others only warn
        logging.getLogger("simclr_jax").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    config_lib.validate(config, mode)
    source = encoder_source(config, workdir) if mode == "downstream" else None
    prepare_workdir(workdir, config, mode)
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
    writer = MetricWriter(workdir)
    summary = {"workdir": os.path.abspath(workdir), "mode": mode}
    try:
        if mode in ("pretrain", "all"):
            ckpt = checkpoint.Checkpointer(
                pretrain_dir(workdir), keep=config.pretrain.keep_checkpoints
            )
            try:
                _, result = pretrain.run(config, ds, writer, ckpt)
            finally:
                ckpt.close()
            summary["pretrain"] = {
                "wall_s": result.wall_s,
                "images_per_s": result.images_per_s,
                **result.last_record,
            }
            source = pretrain_dir(workdir)
        if mode in ("downstream", "all"):
            from simclr_jax import downstream  # noqa: PLC0415 (the heavier stage, only when used)

            summary["downstream"] = downstream.run(config, ds, workdir, writer, source)
    finally:
        writer.close()
    return summary
