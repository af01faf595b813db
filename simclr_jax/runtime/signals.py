"""Stops that lose nothing: SIGINT (Ctrl-C) and SIGTERM (preemption) are recorded, never raised
where they land, and the run stops at the next stop point.

A handler that raises where the signal lands can raise inside a C call back into Python: numpy
turned a stop during the linear probe's `losses[f, j] = jnp...` into "ValueError: setting an array
element with a sequence" (issue #25). So while `recording()` is on (pipeline.run, for the whole
run), a signal only sets a flag, and the work polls it where stopping is clean:

* the step loop (loop.py), after every step: it writes that step's checkpoint first;
* the evaluations outside it (evaluation/frozen.py, downstream.py), between chunks and fits: `check(what)`
  raises `Interrupted`, nothing of that evaluation is kept, and the rerun does it again (the
  frozen evaluations are recomputed on every downstream run, bit for bit);
* the end of the run (pipeline.run): a signal during the pictures or the report stops it once
  they are written.

run.py turns `Interrupted` into one line on stderr and the exit code a shell reports for the
signal, 128 + signum (130 / 143). In a multi-process run SIGTERM belongs to jax's preemption
service (the step loop asks it for the step to stop at), and only SIGINT is recorded here.
"""

import contextlib
import signal
import threading

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived and the run stopped at a stop point (after a checkpoint of the last
    finished step, inside a step loop). `signum` is the signal (run.py exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class _Record:
    signum: int | None = None  # the first signal recorded
    depth = 0  # nesting of recording()
    doing: list[str] = []  # what the work under way is called (`doing`), innermost last


_RECORD = _Record()


def coordinated() -> bool:
    """Whether SIGTERM is jax's preemption service's (several processes; the service is on by
    default, `jax_enable_preemption_service`, a flag jax 0.7 does not have: always on there)."""
    service = getattr(jax.config, "jax_enable_preemption_service", True)
    return jax.process_count() > 1 and service


def _handle(signum, frame):
    _RECORD.signum = _RECORD.signum or signum


@contextlib.contextmanager
def recording():
    """SIGINT and SIGTERM recorded while inside (nested uses share one record; the outermost
    clears it and restores the handlers that were there). Only in the main thread, where Python
    delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    if _RECORD.depth == 0:
        _RECORD.signum = None
        for signum in SIGNALS:
            if signum != signal.SIGTERM or not coordinated():
                old[signum] = signal.signal(signum, _handle)
    _RECORD.depth += 1
    try:
        yield
    finally:
        _RECORD.depth -= 1
        for signum, handler in old.items():
            signal.signal(signum, handler)


def requested() -> int | None:
    """The signal recorded so far (None: go on)."""
    return _RECORD.signum


def describe(signum: int) -> str:
    return "interrupted (SIGINT)" if signum == signal.SIGINT else "terminated (SIGTERM)"


@contextlib.contextmanager
def doing(what: str):
    """Names the work a stop point inside would stop (the innermost name is the message's)."""
    _RECORD.doing.append(what)
    try:
        yield
    finally:
        _RECORD.doing.pop()


def check(what: str | None = None) -> None:
    """A stop point: raises `Interrupted` if a signal was recorded. `what` (default: the innermost
    `doing`) names the work that stops; it is done again when the run resumes."""
    signum = _RECORD.signum
    if signum is not None:
        what = what or (_RECORD.doing[-1] if _RECORD.doing else "the run")
        raise Interrupted(f"{what}: {describe(signum)}; it is done again on resume.", signum)
