"""The workdir a run lives in: checked writable, refused when it holds a run of another config,
config.json written, held by one run at a time (lock.py), and left as it was found by a run that
fails before any work. Every process checks; process 0 writes and deletes."""

import contextlib
import json
import logging
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.errors import WorkdirError
from simclr_jax.lock import LOCK_FILE, WorkdirLock
from simclr_jax.metrics import METRICS_FILE
from simclr_jax.train_state import model_identity

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# The sections that make two runs incomparable: a workdir holding another one is refused.
IDENTITY_KEYS = ("data.name", "data.image_size", "model")


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


def check_writable(workdir: str) -> None:
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


def prepare(workdir: str, config, mode: str) -> None:
    """Creates the workdir, refuses one that holds a different run, writes config.json.

    Every process checks; only process 0 deletes and writes (atomically, so that the others read
    the old file or the new one whole), and nobody goes on before it has finished.
    """
    primary = jax.process_index() == 0
    check_writable(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    diff = _identity_changes(path, config) if os.path.exists(path) else {}
    if diff and not config.overwrite:
        lines = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
        raise WorkdirError(
            f"--workdir {workdir!r} holds a run of a different config ({lines}). Use another "
            f"--workdir, or pass --config.overwrite=True to delete that run and start anew."
        )
    if diff and mode not in ("downstream", "distill") and primary:
        log.warning("Overwriting the run in %s (config.overwrite=True).", workdir)
        _delete_run(workdir)
    if primary:
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_workdir")


@contextlib.contextmanager
def lock(workdir: str):
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


def first_missing(path: str) -> str | None:
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
