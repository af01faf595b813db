"""The workdir a run lives in: checked writable, refused when it holds a run of another config or
one made with settings the rerun would not apply, config.json written, held by one run at a time
(lock.py), and left as it was found by a run that fails before any work. Every process checks;
process 0 writes and deletes.

A workdir holds no path of its own: the data and the encoder a run started from are identified by
content (data.identity, the checkpoints' digests), so a workdir can be copied or moved and the
same command reruns there without redoing anything.
"""

import contextlib
import json
import logging
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.app.lock import WorkdirLock
from simclr_jax.errors import WorkdirError
from simclr_jax.runtime.files import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    checkpoint_dir,
    read_records,
)
from simclr_jax.train.state import model_identity

log = logging.getLogger(__name__)
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
    shutil.rmtree(checkpoint_dir(workdir), ignore_errors=True)
    for name in (METRICS_FILE, "tensorboard"):
        p = os.path.join(workdir, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
            os.path.exists(p) and os.remove(p)
        )


# Keys that say where or how, not what: a rerun may change them. (The data and a restored
# encoder are checked by content: data.identity and the checkpoints' metadata. So is the input
# normalisation, which a run computes from the data where it is unset: other values, set or
# computed from changed data, are refused by the checkpoints' check, whose message names them.)
FREE_KEYS = ("restore", "overwrite", "distributed", "data.data_dir", "data.identity")
FREE_KEYS += ("data.mean", "data.std")
FREE_KEYS += ("data.cache_gb", "data.read_threads", "data.prefetch", "data.max_bad_fraction")
FREE_KEYS += ("downstream.data.data_dir", "downstream.data.identity")
FREE_KEYS += (
    "warnings",
)  # app/data_checks.py's notes on a run's settings and data (they vary by mode)
FREE_KEYS += (
    "pretrain.checkpoint_every",
    "pretrain.keep_checkpoints",
    "downstream.checkpoint_every",
)
# The work each stage's keys go into (the keys of a section are its stage's; the rest,
# pretraining's), and the stages whose work a mode redoes when their keys change: pretraining
# resumes (it never redoes), a downstream or distill run starts anew on other settings.
DEPENDS = {"pretrain": ("pretrain", "downstream", "distill")}
DEPENDS.update(downstream=("downstream", "distill"), distill=("distill",))
REDOES = {"pretrain": (), "all": ("downstream",), "downstream": ("downstream",)}
REDOES["distill"] = ("distill",)


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def _stage(key: str) -> str:
    section = key.split(".", 1)[0]
    return section if section in ("downstream", "distill") else "pretrain"


def _phase_stage(phase: str) -> str:
    phase = phase.split(".", 1)[0]  # <phase>.damaged: checkpoints set aside
    if phase == "pretrain":
        return "pretrain"
    return "distill" if phase.startswith("distill") else "downstream"


def work_stages(workdir: str) -> set[str]:
    """The stages ('pretrain', 'downstream', 'distill') whose work the workdir holds: records in
    metrics.jsonl or checkpoint steps."""
    metrics = os.path.join(workdir, METRICS_FILE)
    phases = {r.get("phase") for r in read_records(metrics)} if os.path.exists(metrics) else set()
    phases |= {phase for phase, _ in _work(workdir)[1]}
    return {_phase_stage(p) for p in phases if p}


def _unapplied(path: str, config, workdir: str, mode: str) -> dict:
    """{key: (old, new)} of the settings where the run in `path` (a config.json) differs and whose
    work in the workdir this mode would keep rather than redo. A key the old file lacks (written
    before it existed) is unknown, not a difference."""
    with open(path) as f:
        old = _flat(json.load(f))
    new = _flat(json.loads(config.to_json_best_effort()))
    work = work_stages(workdir)

    def kept(key):  # work that depends on the key and that this mode would not redo
        return any(s in work and s not in REDOES[mode] for s in DEPENDS[_stage(key)])

    changed = [k for k in new if k in old and old[k] != new[k] and not _free(k)]
    return {k: (old[k], new[k]) for k in sorted(changed) if kept(k)}


def _listed(diff: dict, most: int = 6) -> str:
    items = [f"{k}: {a} -> {b}" for k, (a, b) in diff.items()]
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def check(workdir: str, config, mode: str) -> bool:
    """Refuses (WorkdirError, before anything is written) a workdir that holds a run of another
    config, or one made with settings that this mode would not apply to its work (config.json
    would then describe settings that work never had), unless config.overwrite deletes that run
    (in --mode=pretrain or all). Returns whether it will be deleted (`prepare`)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    diff = _identity_changes(path, config)
    if diff and not config.overwrite:
        raise WorkdirError(
            f"--workdir {workdir!r} holds a run of a different config ({_listed(diff)}). Use another "
            f"--workdir, or pass --config.overwrite=True to delete that run and start anew."
        )
    deletes = mode in ("pretrain", "all")
    if diff:
        return deletes
    unapplied = _unapplied(path, config, workdir, mode)
    if unapplied and not (config.overwrite and deletes):
        start_anew = (
            "pass --config.overwrite=True to delete that run and start anew"
            if deletes
            else "use --mode=all with --config.overwrite=True to delete that run and start anew"
        )
        raise WorkdirError(
            f"--workdir {workdir!r} holds work made with other settings ({_listed(unapplied)}) "
            f"that --mode={mode} would keep, not redo, and config.json would then describe "
            f"settings it never had. Rerun with the settings in its {CONFIG_FILE}, use another "
            f"--workdir, or {start_anew}."
        )
    return bool(unapplied)


def prepare(workdir: str, config, delete: bool) -> None:
    """Deletes the run in the workdir where `check` said so, and writes config.json.

    Every process checks; only process 0 deletes and writes (atomically, so that the others read
    the old file or the new one whole), and nobody goes on before it has finished.
    """
    primary = jax.process_index() == 0
    if delete and primary:
        log.warning("Overwriting the run in %s (config.overwrite=True).", workdir)
        _delete_run(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
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
    root = checkpoint_dir(workdir)
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
