"""The step loop that pretraining and the downstream classifiers share: it runs a pmapped step
function, keeps metrics on device until a log or checkpoint step, stops on a NaN/Inf loss naming
the step, checkpoints on schedule, and turns Ctrl-C (SIGINT) and SIGTERM (preemption: spot/preemptible
VMs, SLURM) into a checkpoint and a clean exit. A multi-process run leaves SIGTERM to jax's preemption
service, which gives every process the same step to stop at.

Records (metrics.jsonl) do not depend on where a run was stopped: a record is written only where
the uninterrupted run writes one (every `log_every` steps, the last step, and an epoch-end
evaluation's step), and it averages the steps since the record before. A stop writes no record of
its own: the checkpoint of the step it stops at carries the steps' metrics that no record holds yet
(`UNRECORDED`, in the checkpoint's metadata), and the evaluation and record due after that step, if
any, are left to the rerun, which resumes from that checkpoint and writes them as the uninterrupted
run would have. So a stopped run's metrics.jsonl is the first records of the uninterrupted run's,
and the rerun's is all of them (their timings aside).

One loop rather than two near-copies: what differs between the phases (the step, the evaluation at
an epoch's end, what a checkpoint holds) comes in as arguments.
"""

import dataclasses
import logging
import math
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.errors import Divergence
from simclr_jax.runtime import signals
from simclr_jax.runtime.records import MetricWriter, progress_bar

log = logging.getLogger(__name__)

# The checkpoint metadata key of what no record holds yet: {'rows': the per-step metrics since the
# last record, in step order, 'seconds': the wall time they took}.
UNRECORDED = "unrecorded_steps"


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    phase: str  # the 'phase' of the metrics.jsonl records
    total_steps: int
    steps_per_epoch: int
    log_every: int
    checkpoint_every: int  # 0: checkpoints only at the end (and on interruption)
    images_per_step: int  # source images per step (global), for images/s


@dataclasses.dataclass
class LoopResult:
    state: Any
    wall_s: float
    images_per_s: float  # median over log intervals, the first (compilation) excluded when possible
    last_record: dict


class _StopFlag:
    """The step loop's view of the run's stop record (runtime/signals.py): a signal is recorded, never raised
    inside a (donating) step call, and asked for after every step.

    With several processes, SIGTERM stays with jax's preemption service: a notice on any process
    reaches all of them, and `reached_preemption_sync_point` is True at the same step everywhere,
    so they save the same checkpoint together. It must be asked after every step, which `stop` is.
    """

    def __init__(self):
        self._coordinated = signals.coordinated()
        self._recording = signals.recording()  # a no-op inside a run's own (pipeline.run)

    def __enter__(self):
        self._recording.__enter__()
        return self

    def stop(self, step: int) -> int | None:
        """The signal to stop on after `step`, or None to go on. Called after every step."""
        if self._coordinated and multihost_utils.reached_preemption_sync_point(step):
            return signal.SIGTERM
        return signals.requested()

    def late(self) -> int | None:
        """A signal recorded since the step's `stop` was asked (in a multi-process run SIGTERM is
        the service's, and only SIGINT is recorded here)."""
        return signals.requested()

    def message(self, phase: str, step: int, signum: int) -> str:
        if signum == signal.SIGINT:
            return f"{phase}: interrupted at step {step}; checkpoint saved."
        if self._coordinated:  # the notice may have reached another process
            return f"{phase}: preempted (SIGTERM) at step {step}; every process saved it."
        return f"{phase}: terminated (SIGTERM) at step {step}; checkpoint saved."

    def __exit__(self, *exc):
        return self._recording.__exit__(*exc)


def _fetch(pending: list, first_step: int, phase: str) -> list[dict]:
    """Host copies of the pending per-step metrics; raises Divergence at the first bad loss."""
    host = jax.device_get(pending)
    rows = [{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()} for m in host]
    for i, row in enumerate(rows):
        if not math.isfinite(row["loss"]):
            raise Divergence(
                f"{phase}: the loss is {row['loss']} at step {first_step + i + 1}. The run stopped; "
                f"the last good checkpoint is kept. Lower the learning rate or check the data."
            )
    return rows


def _recorded(writer: MetricWriter, phase: str, step: int) -> bool:
    """Whether metrics.jsonl holds the record of `phase` at `step` (the work after that step's
    checkpoint is then done); process 0 reads it and tells the others."""
    last = writer.last(phase)
    found = bool(last and last["step"] == step)
    if jax.process_count() > 1:
        found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    return found


def run(
    spec: LoopSpec,
    step_fn: Callable,
    state,
    inputs: Iterator[tuple],
    start_step: int,
    writer: MetricWriter,
    save: Callable[[int, Any, dict], None] | None = None,
    on_epoch_end: Callable[[int, Any], dict] | None = None,
    commit: Callable[[], None] | None = None,
    unrecorded: dict | None = None,
) -> LoopResult:
    """Runs `state, metrics = step_fn(state, *next(inputs))` from start_step to spec.total_steps
    (`inputs` yields each step's arguments, from start_step on: the streamed batch and keys).

    `save(step, state, unrecorded)` starts a checkpoint, `unrecorded` (JSON) to be kept in its
    metadata under UNRECORDED, and `commit()` waits until it is written; `on_epoch_end(epoch, state)`
    returns extra scalars for that step's record (evaluations; {} where none is due).
    `unrecorded`: the UNRECORDED entry of the checkpoint resumed from (None: a fresh start, or a
    checkpoint written before the entry existed). Records of this phase after start_step are
    dropped first; when metrics.jsonl has no record of start_step, the work due after it (its
    evaluation, its record) is done first, as the uninterrupted run did it.

    Each step's checkpoint, when one is due, is started before the step's evaluation and record.
    On SIGINT / SIGTERM the step that is running finishes, its checkpoint is written and
    committed, and `Interrupted` is raised; the step's evaluation and record are the rerun's. A
    signal that arrives later in a step's work (its fetch, evaluation, record or save; the
    phase's last step included) ends the run the same way once that work is done or abandoned (an
    evaluation stops at its next stop point). A second signal while the checkpoint is committed
    is recorded, not acted on: the save finishes first.
    """
    writer.truncate(spec.phase, start_step)
    step, pending, rows = start_step, [], []
    rates, record, carried_s = [], {}, 0.0
    resume = bool(start_step) and unrecorded is not None
    resume = resume and not _recorded(writer, spec.phase, start_step)
    if resume:  # the steps since the last record, and the work after start_step's checkpoint
        rows, carried_s = list(unrecorded["rows"]), float(unrecorded["seconds"])
    t_log = t0 = time.perf_counter()
    if start_step < spec.total_steps:  # the bar sits at its start until the compilation is done
        log.info("%s: compiling the first step (tens of seconds) ...", spec.phase)
    bar = progress_bar(spec.total_steps, start_step, spec.phase)

    def drain() -> None:
        """The pending steps' metrics to the host (a NaN raises Divergence here)."""
        nonlocal rows, pending
        rows += _fetch(pending, step - len(pending), spec.phase)
        pending = []

    def unrecorded_now() -> dict:
        return {"rows": rows, "seconds": carried_s + time.perf_counter() - t_log}

    def log_record(extra: dict) -> None:
        nonlocal rows, t_log, record, carried_s
        drain()
        if not rows:
            return
        now = time.perf_counter()
        scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        rates.append(len(rows) * spec.images_per_step / (carried_s + now - t_log))
        record = writer.write(step, spec.phase, {**scalars, **extra, "images_per_s": rates[-1]})
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{rates[-1]:.0f}")
        bar.update(step - bar.n)
        rows, t_log, carried_s = [], now, 0.0

    def due_after() -> bool:
        """Whether anything may be due after `step`'s checkpoint (an evaluation, a record)."""
        epoch_end = on_epoch_end is not None and step % spec.steps_per_epoch == 0
        return epoch_end or step == spec.total_steps or step % spec.log_every == 0

    def after_checkpoint(rstate) -> bool:
        """The work due after `step`'s checkpoint: its epoch-end evaluation, then its record
        (where one is due). False: a signal abandoned the evaluation (the rerun does both)."""
        extra = {}
        if on_epoch_end and step % spec.steps_per_epoch == 0:
            try:
                extra = on_epoch_end(step // spec.steps_per_epoch, rstate)
            except signals.Interrupted:
                return False  # the signal stays recorded: the loop stops after the checkpoint
        if step == spec.total_steps or step % spec.log_every == 0 or extra:
            log_record(extra)
        return True

    def stopping(signum: int, rstate, done: bool):
        """Saves (unless this step was saved) and commits `step`'s checkpoint; the Interrupted to
        raise. done: whether the work after the checkpoint was done."""
        if save is not None:
            drain()
            save(step, rstate, unrecorded_now())  # a no-op when this step was saved
            if commit is not None:
                commit()  # the handlers still only record: a second signal waits
        if not done and due_after():
            log.info("%s: stopping; what is due after step %d is the rerun's.", spec.phase, step)
        bar.close()
        return signals.Interrupted(flag.message(spec.phase, step, signum), signum)

    with _StopFlag() as flag:
        if resume and not after_checkpoint(state):
            raise stopping(flag.late(), state, False)
        if resume and due_after():
            log.info("%s: what was due after step %d, left by a stop, is done.", spec.phase, step)
        while step < spec.total_steps:
            state, metrics = step_fn(state, *next(inputs))
            step += 1
            pending.append(metrics)
            stop = flag.stop(step)
            due = spec.checkpoint_every and step % spec.checkpoint_every == 0
            if save is not None and (step == spec.total_steps or stop or due):
                drain()  # checked for a NaN first: a diverged state is never saved
                save(step, state, unrecorded_now())
            done = not stop and after_checkpoint(state)
            stop = stop or flag.late()  # one that came during this step's fetch, save or eval
            if stop:
                raise stopping(stop, state, done)
    bar.close()
    steady = rates[1:] if len(rates) > 1 else rates
    return LoopResult(
        state, time.perf_counter() - t0, statistics.median(steady) if steady else 0.0, record
    )
