"""Orbax checkpoints: save every N steps (asynchronously), keep the last K, restore the newest one
that is readable, skipping damaged ones with a warning.

A checkpoint holds the unreplicated train state as a dict {step, params, batch_stats, opt_state}
plus JSON metadata (the config sections that define the model and data), and optionally further
items of their own (`extra`: pretraining's online linear head), which a restore reads where the
step holds them and that readers of the state alone never touch. Nothing else is needed to
resume exactly: the data order and every augmentation key are functions of (seed, step).

Saving and restoring are collective in a multi-process run: every process calls them with its own
copy of the (identical) tree; orbax writes each array once, from process 0, and every process
reads it back. Callers see single-device arrays either way.
"""

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simclr_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def _replicated_sharding() -> NamedSharding:
    """Fully replicated over one device per process: a leaf whose single copy on this process
    is one shard of a global array that orbax can save and restore collectively."""
    devices = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
    return NamedSharding(Mesh(np.array(devices), ("process",)), PartitionSpec())


def _to_global(tree: Any) -> Any:
    """Single-device (identical on every process) -> global replicated arrays, without copies
    unless a leaf sits on another local device than the mesh's."""
    sharding = _replicated_sharding()
    device = jax.local_devices()[0]

    def put(x):
        x = jax.device_put(x, device)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [x])

    return jax.tree.map(put, tree)


def _abstract_global(target: Any) -> Any:
    """The restore target: each leaf's shape and dtype (arrays, ShapeDtypeStructs or a Python int
    step), replicated."""
    sharding = _replicated_sharding()

    def abstract(x):
        dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    return jax.tree.map(abstract, target)


class UnreadableCheckpoint(CheckpointError):
    """The newest checkpoint of a restore that does not fall back cannot be read."""


def _ignore_closed_loop_callbacks() -> None:
    """A restore that fails on one array (a damaged checkpoint) closes orbax's event loop while
    tensorstore reads of the others are in flight; each of them then completes into the closed
    loop, an unraisable "RuntimeError: Event loop is closed" that Python prints as a traceback
    (dozens for one damaged checkpoint, burying the one line that says what happened). Those
    alone are dropped, from the first restore on; every other unraisable exception goes to the
    hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "closed_loop_filter", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook.closed_loop_filter = True
    sys.unraisablehook = hook


def has_steps(directory: str) -> bool:
    """Whether `directory` holds checkpoint step directories (a cheap look before any restore;
    whether one of them is readable is the restore's to find out)."""
    return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


class Checkpointer:
    """A CheckpointManager over `directory` with the state/meta layout described above."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save killed half-way
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, tree: Any, meta: dict, extra: dict | None = None) -> None:
        """Starts an (async) save; a save for an already-saved step is a no-op. `extra`: {name:
        tree} saved as items of their own beside the state."""
        if step in self._mngr.all_steps():
            return
        items = {k: ocp.args.StandardSave(_to_global(t)) for k, t in (extra or {}).items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_global(tree)), meta=ocp.args.JsonSave(meta), **items
        )
        self._mngr.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def restore_latest(
        self, target: Any, extra: dict | None = None, fall_back: bool = True
    ) -> tuple[Any, dict, int] | None:
        """Newest readable checkpoint as (tree, meta, step); damaged ones are set aside with a
        warning (fall_back=False: the newest or nothing, an unreadable one raising
        UnreadableCheckpoint and left in place: a restore that only reads).

        `target` is a tree of arrays with the wanted structure, shapes and placement; `extra`
        ({name: target}) the items of their own to read too (`restore`).
        Returns None when there is no checkpoint, or none that can be read.
        """
        for step in reversed(self.steps()):
            try:
                tree, meta = self.restore(step, target, extra)
            except Exception as err:  # truncated / corrupt files: fall back to the one before
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                if not fall_back:
                    raise UnreadableCheckpoint(
                        f"Checkpoint step {step} in {self.directory}, the newest, is unreadable "
                        f"({reason})."
                    ) from err
                log.warning(
                    "Checkpoint step %d in %s is unreadable (%s); set aside in %s, trying an "
                    "older one.",
                    step,
                    self.directory,
                    reason,
                    self._set_aside(step),
                )
                continue
            return tree, meta, step
        return None

    def restore_matching(
        self,
        target: Any,
        check: Callable[[dict], None],
        extra: dict | None = None,
        fall_back: bool = True,
    ) -> tuple[Any, dict, int] | None:
        """`restore_latest`, for checkpoints whose metadata `check` accepts (it raises otherwise).

        The newest checkpoint's metadata is checked before anything is restored, so that one made
        for another model fails with `check`'s message rather than looking unreadable (a shape
        mismatch), and the restored one is checked again (an older one may have been used).
        """
        steps = self.steps()
        if steps:
            try:
                meta = self.read_meta(steps[-1])
            except Exception:  # damaged metadata: restore_latest sets that step aside
                meta = None
            if meta is not None:
                check(meta)
        found = self.restore_latest(target, extra, fall_back)
        if found is not None:
            check(found[1])
        return found

    def _set_aside(self, step: int) -> str:
        """Moves a damaged step out of the manager's way (kept for inspection, not deleted), so
        that the resumed run can save that step again."""
        dest = os.path.join(self.directory + ".damaged", str(step))
        if jax.process_index() == 0:
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._mngr.reload()
        return dest

    def restore(self, step: int, target: Any, extra: dict | None = None) -> tuple[Any, dict]:
        """The tree of `step` as single-device arrays on this process's first local device.

        `extra` ({name: target}): those of the items saved with `save(..., extra)` that the step
        holds are read too and returned in the tree (a dict) under their names; one that the
        step lacks (a checkpoint written without it) is left out of the tree."""
        _ignore_closed_loop_callbacks()  # before: they can come before the error reaches us
        held = {k: t for k, t in (extra or {}).items() if self.holds(step, k)}
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_global(target)),
            meta=ocp.args.JsonRestore(),
            **{k: ocp.args.StandardRestore(_abstract_global(t)) for k, t in held.items()},
        )
        out = self._mngr.restore(step, args=args)
        tree = jax.tree.map(lambda x: x.addressable_data(0), out["state"])
        for name in held:
            tree[name] = jax.tree.map(lambda x: x.addressable_data(0), out[name])
        return tree, out["meta"]

    def holds(self, step: int, item: str) -> bool:
        """Whether the checkpoint of `step` has the item `item` (a directory of its own)."""
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def shapes(self, step: int) -> Any:
        """The shape of every array of the state saved at `step`, from orbax's description of the
        tree (no array is read): what a restore target that depends on a size needs first."""
        path = pathlib.Path(self.directory, str(step), "state")
        tree = ocp.StandardCheckpointHandler().metadata(path).tree
        return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)

    def read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self) -> None:
        """Until the saves started are committed; a signal meanwhile waits for that (held)."""
        with signals_held():
            self._mngr.wait_until_finished()

    def close(self) -> None:
        with signals_held():
            self._mngr.wait_until_finished()
            self._mngr.close()


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM recorded, not acted on, while a checkpoint is committed, then delivered
    to the handlers that were there before (run.py's, which stop the run, or the step loop's): a
    second Ctrl-C or a SIGTERM during the final save does not abandon it. Only in the main thread,
    and only for handlers set from Python (jax's preemption service owns SIGTERM in a
    multi-process run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            log.warning("Signal %d arrived while a checkpoint was saved; it is saved.", got[0])
            if not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # else: already stopping
                signal.raise_signal(got[0])
