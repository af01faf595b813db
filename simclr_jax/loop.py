"""The step loop that pretraining and the downstream classifiers share: it runs a pmapped step
function, keeps metrics on device until a log or checkpoint step, stops on a NaN/Inf loss naming
the step, checkpoints on schedule, and turns Ctrl-C (SIGINT) and SIGTERM (preemption: spot/preemptible
VMs, SLURM) into a checkpoint and a clean exit. A multi-process run leaves SIGTERM to jax's preemption
service, which gives every process the same step to stop at.

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

from simclr_jax import stops
from simclr_jax.errors import Divergence
from simclr_jax.metrics import MetricWriter, progress_bar

log = logging.getLogger(__name__)

# A record key: the epoch-end evaluation due at this step was skipped by a stop (`run` makes it up
# when the run resumes from that step, then drops the key).
SKIPPED = "evaluation_skipped"


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
    """The step loop's view of the run's stop record (stops.py): a signal is recorded, never raised
    inside a (donating) step call, and asked for after every step.

    With several processes, SIGTERM stays with jax's preemption service: a notice on any process
    reaches all of them, and `reached_preemption_sync_point` is True at the same step everywhere,
    so they save the same checkpoint together. It must be asked after every step, which `stop` is.
    """

    def __init__(self):
        self._coordinated = stops.coordinated()
        self._recording = stops.recording()  # a no-op inside a run's own (pipeline.run)

    def __enter__(self):
        self._recording.__enter__()
        return self

    def stop(self, step: int) -> int | None:
        """The signal to stop on after `step`, or None to go on. Called after every step."""
        if self._coordinated and multihost_utils.reached_preemption_sync_point(step):
            return signal.SIGTERM
        return stops.requested()

    def late(self) -> int | None:
        """A signal recorded since the step's `stop` was asked (in a multi-process run SIGTERM is
        the service's, and only SIGINT is recorded here)."""
        return stops.requested()

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


def _skipped_evaluation(writer: MetricWriter, spec: LoopSpec, start_step: int) -> bool:
    """Whether the record of `start_step` (a resumed run's first) marks an epoch-end evaluation
    that a stop skipped; process 0 reads metrics.jsonl and tells the others."""
    if not start_step or start_step % spec.steps_per_epoch:
        return False
    last = writer.last(spec.phase)
    found = bool(last and last["step"] == start_step and last.get(SKIPPED))
    if jax.process_count() > 1:
        found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    return found


def _epoch_end(on_epoch_end: Callable, spec: LoopSpec, step: int, state, stop) -> dict:
    """The epoch-end evaluation's scalars, or a mark that it was skipped (made up when the run
    resumes from this step): skipped when a stop is under way, abandoned at the evaluation's
    next stop point when a signal arrives during it."""
    epoch = step // spec.steps_per_epoch
    if not stop:
        try:
            return on_epoch_end(epoch, state)
        except stops.Interrupted:
            pass  # the signal stays recorded: the loop stops after this step's checkpoint
    log.info(
        "%s: stopping; the evaluation due after step %d (epoch %d) is skipped.",
        spec.phase,
        step,
        epoch,
    )
    return {SKIPPED: 1}


def run(
    spec: LoopSpec,
    step_fn: Callable,
    state,
    inputs: Iterator[tuple],
    start_step: int,
    writer: MetricWriter,
    save: Callable[[int, Any], None] | None = None,
    on_epoch_end: Callable[[int, Any], dict] | None = None,
    commit: Callable[[], None] | None = None,
) -> LoopResult:
    """Runs `state, metrics = step_fn(state, *next(inputs))` from start_step to spec.total_steps
    (`inputs` yields each step's arguments, from start_step on: the streamed batch and keys).

    `save(step, state)` starts a checkpoint and `commit()` waits until it is written;
    `on_epoch_end(epoch, state)` returns extra scalars for that step's record (evaluations).
    Records of this phase after start_step are dropped first, so a resumed metrics.jsonl has
    neither duplicated nor missing steps.

    A checkpoint that is due is started before the epoch's evaluation. On SIGINT / SIGTERM the
    step that is running finishes, its checkpoint is written and committed (an evaluation due
    then is skipped, and the log says so), and `Interrupted` is raised; a signal that arrives
    later in a step's work (its fetch, evaluation, log or save; the phase's last step included)
    ends the run the same way once that work is done. A second signal while the checkpoint is
    committed is recorded, not acted on: the save finishes first.
    """
    writer.truncate(spec.phase, start_step)
    if on_epoch_end and _skipped_evaluation(writer, spec, start_step):
        extra = on_epoch_end(start_step // spec.steps_per_epoch, state)
        writer.amend(spec.phase, start_step, extra, drop=(SKIPPED,))
        log.info("%s: the evaluation a stop skipped at step %d, made up.", spec.phase, start_step)
    step, pending, rows = start_step, [], []
    rates, record = [], {}
    t_log = t0 = time.perf_counter()
    if start_step < spec.total_steps:  # the bar sits at its start until the compilation is done
        log.info("%s: compiling the first step (tens of seconds) ...", spec.phase)
    bar = progress_bar(spec.total_steps, start_step, spec.phase)

    def drain() -> None:
        """The pending steps' metrics to the host (a NaN raises Divergence here)."""
        nonlocal rows, pending
        rows += _fetch(pending, step - len(pending), spec.phase)
        pending = []

    def log_record(extra: dict) -> None:
        nonlocal rows, t_log, record
        drain()
        if not rows:
            return
        now = time.perf_counter()
        rates.append(len(rows) * spec.images_per_step / (now - t_log))
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        record = writer.write(step, spec.phase, {**mean, **extra, "images_per_s": rates[-1]})
        bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{rates[-1]:.0f}")
        bar.update(len(rows))
        rows, t_log = [], now

    with _StopFlag() as flag:
        while step < spec.total_steps:
            state, metrics = step_fn(state, *next(inputs))
            step, epoch_end = step + 1, (step + 1) % spec.steps_per_epoch == 0
            pending.append(metrics)
            last = step == spec.total_steps
            stop = flag.stop(step)
            want_ckpt = save is not None and (
                last or stop or (spec.checkpoint_every and step % spec.checkpoint_every == 0)
            )
            if want_ckpt:  # checked for a NaN first: a diverged state is never saved
                drain()
                save(step, state)
            extra = {}
            if epoch_end and on_epoch_end:
                extra = _epoch_end(on_epoch_end, spec, step, state, stop)
            stop = stop or flag.late()  # one that came during this step's fetch, save or eval
            if last or stop or step % spec.log_every == 0 or extra:
                log_record(extra)
            if stop:
                if save is not None:
                    save(step, state)  # a no-op when this step was saved above
                    if commit is not None:
                        commit()  # the handlers still only record: a second signal waits
                bar.close()
                raise stops.Interrupted(flag.message(spec.phase, step, stop), stop)
    bar.close()
    steady = rates[1:] if len(rates) > 1 else rates
    return LoopResult(
        state, time.perf_counter() - t0, statistics.median(steady) if steady else 0.0, record
    )
