"""Stops that lose nothing and change no number: a signal mid-way between two records, at an
epoch's end, during its evaluation, during the last step of pretraining (with a second one during
the final save), inside a classifier's first epoch and during the downstream stage each end the
run with 130/143 after a committed checkpoint of that step, never going on into the next stage;
the stopped run's records are the first records of an uninterrupted run's, and the rerun finishes
with every record and the report of the uninterrupted run (timings aside).

The signals are sent by the run to itself at the exact point (tests/signal_worker.py)."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from simclr_jax.runtime import signals
from simclr_jax.runtime.files import read_records
from simclr_jax.runtime.records import MetricWriter
from simclr_jax.train import loop
from tests.helpers import FINISHED_FLAGS, FINISHED_STEPS, REPO, checkpoint_tree, run_cli
from tests.test_resume import _assert_same_tree

# The session's shared finished run's settings (tests/helpers.py): digits shrunk, 256 images, batch
# 32 = 8 steps an epoch; 2 epochs with a kNN check after each, a record every 4 steps; a short
# downstream stage (11 labels, batch 4: two classifier steps an epoch, a record after each epoch's
# test evaluation, 3 epochs).
STEPS, FLAGS = FINISHED_STEPS, FINISHED_FLAGS


def _signalled(workdir, point, signame, *extra, devices=2, flags=FLAGS):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    worker = os.path.join(REPO, "tests", "signal_worker.py")
    args = [point, signame, *extra, "--", *flags, "--workdir", workdir]
    return subprocess.run(
        [sys.executable, worker, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _untimed(workdir):
    """metrics.jsonl's records in file order, timings (keys ending in _s) left out."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in _records(workdir)]


def _numbers(workdir):
    """Every record's numbers but timings, by phase and step (a resumed downstream stage writes
    its frozen evaluations again, after the classifier runs' records): what a bitwise resume must
    reproduce."""
    return sorted(_untimed(workdir), key=lambda r: (r["phase"], r["step"]))


def _report(workdir):
    """report.json but its timings (keys ending in _s) and the workdir's own path."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.endswith("_s") and k != "workdir"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    with open(os.path.join(workdir, "report.json")) as f:
        return strip(json.load(f))


def _steps(workdir, phase):
    where = os.path.join(workdir, "checkpoints", phase)
    return sorted(int(d) for d in os.listdir(where) if d.isdigit())


# ----------------------------------------------------------------------------- the loop alone

# A toy phase of 12 steps, 3 an epoch: a record every 4 steps and after every second epoch's
# evaluation (steps 4, 6, 8, 12), checkpoints only when stopped and at the end.
TOY = loop.LoopSpec("toy", 12, 3, log_every=4, checkpoint_every=0, images_per_step=1)
_toy_step = jax.jit(lambda s, i: (s + 1, {"loss": jnp.sin(s) + 1 / (s + 1.0)}))


def _toy(workdir, monkeypatch, saves, start=0, saved=(0.0, None), stop_at=None, stop_in_eval=None):
    """Runs the toy phase from `start` (saved: the state and UNRECORDED of its checkpoint), a
    signal recorded while step `stop_at` runs or during epoch `stop_in_eval`'s evaluation; the
    checkpoints it saves go into `saves`, {step: (state, UNRECORDED as JSON reads it back)}."""
    signalled = []
    monkeypatch.setattr(signals, "requested", lambda: signal.SIGINT if signalled else None)

    def step_fn(state, i):
        if i == stop_at:
            signalled.append(i)
        return _toy_step(state, i)

    def on_epoch_end(epoch, state):
        if epoch == stop_in_eval:
            signalled.append(epoch)
            raise signals.Interrupted("toy evaluation", signal.SIGINT)
        return {"eval": float(state) / 2} if epoch % 2 == 0 else {}

    def save(step, state, unrecorded):
        saves.setdefault(step, (float(state), json.loads(json.dumps(unrecorded))))

    writer = MetricWriter(workdir)
    try:
        inputs = iter([(i,) for i in range(start + 1, TOY.total_steps + 1)])
        state, unrecorded = jnp.float32(saved[0]), saved[1]
        loop.run(TOY, step_fn, state, inputs, start, writer, save, on_epoch_end, None, unrecorded)
    finally:
        writer.close()


def _toy_records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    rows = read_records(path) if os.path.exists(path) else []
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def test_the_records_do_not_depend_on_where_a_stop_lands(tmp_path, monkeypatch):
    """The step loop alone, stopped after every step and during every evaluation, then resumed
    from the checkpoint it saved: the stopped run's records are the first of the uninterrupted
    run's, none of the step stopped at, and the resumed run's are all of them, bit for bit."""
    _toy(str(tmp_path / "whole"), monkeypatch, {})
    want = _toy_records(str(tmp_path / "whole"))
    assert [r["step"] for r in want] == [4, 6, 8, 12] and "eval" in want[1]
    points = [{"stop_at": k} for k in range(1, TOY.total_steps + 1)]
    points += [{"stop_in_eval": e} for e in (2, 4)]  # the evaluations that have scalars
    for point in points:
        workdir, saves = str(tmp_path / "_".join(f"{k}{v}" for k, v in point.items())), {}
        with pytest.raises(signals.Interrupted):
            _toy(workdir, monkeypatch, saves, **point)
        step, saved = max(saves.items())
        got = _toy_records(workdir)
        assert got == want[: len(got)] and all(r["step"] < step for r in got), point
        _toy(workdir, monkeypatch, {}, start=step, saved=saved)
        assert _toy_records(workdir) == want, point


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def reference(finished_run):
    """The uninterrupted run: the session's shared one (read only)."""
    return finished_run["workdir"]


# Where a signal lands inside the step loops: (point, signal, extra, phase, step, exit code). Each
# chain is one workdir: every stop is checked as it happens, its rerun is the next stop's run, and
# the last rerun must end with the uninterrupted run's checkpoints, records and report. A chain
# never stops a downstream stage twice: its rerun writes the frozen evaluations' records again
# after the classifier runs' (by phase and step the same; in file order not a prefix).
STEP_CHAINS = {
    "pretrain@6, @eval, @16 + save, finetune@2": [
        ("pretrain@6", "SIGINT", (), "pretrain", 6, 130),  # between two records
        ("pretrain@eval", "SIGINT", (), "pretrain", 8, 130),  # during epoch 1's kNN check
        ("pretrain@16", "SIGTERM", ("again",), "pretrain", 16, 143),  # last step, then the save
        ("finetune@2", "SIGTERM", (), "finetune", 2, 143),  # the end of its first epoch
    ],
    "pretrain@8, finetune@1": [
        ("pretrain@8", "SIGTERM", (), "pretrain", 8, 143),  # the step that ends epoch 1
        ("finetune@1", "SIGINT", (), "finetune", 1, 130),  # inside the classifier's first epoch
    ],
}


def _assert_stopped(workdir, reference, out, point, extra, phase, step, code):
    """One stop: its exit code and lines, its checkpoint, and no record of its own."""
    assert out.returncode == code, (point, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Rerun the same command to resume" in out.stderr
    assert f"at step {step}; checkpoint saved" in out.stderr, (point, out.stderr[-3000:])
    assert _steps(workdir, phase)[-1] == step, point  # committed: the newest is that step
    # No record of the stop's own: the first records of the uninterrupted run, none of the step
    # stopped at (its evaluation and record, where due, are the rerun's, and it says so).
    got, want = _untimed(workdir), _untimed(reference)
    assert got == want[: len(got)], point
    assert all(r["step"] < step for r in got if r["phase"] == phase), point
    if point in ("pretrain@8", "pretrain@eval", "finetune@2"):
        assert "what is due after step" in out.stderr, point
    if phase == "pretrain":  # it never went on into the next stage
        assert {r["phase"] for r in got} == {"pretrain"}, point
        assert not os.path.exists(os.path.join(workdir, "report.md")), point
    if "again" in extra:
        assert "arrived while a checkpoint was saved; it is saved" in out.stderr, point


@pytest.mark.parametrize("chain", list(STEP_CHAINS))
def test_a_signal_saves_that_step_stops_the_run_and_the_rerun_is_bitwise(
    reference, tmp_path, chain
):
    """Six stops in two chains of reruns (a run.py process each; ~60 s and ~30 s: the chains
    start eight processes where six separate stop-and-rerun pairs started twelve). Each stop ends the run with 130/143 after
    a committed checkpoint of that step, never going on into the next stage; the stopped run's
    records are the first records of the uninterrupted run's; the last rerun finishes with the
    uninterrupted run's checkpoints, records and report (timings aside)."""
    workdir = str(tmp_path / "run")
    for point, signame, extra, phase, step, code in STEP_CHAINS[chain]:
        out = _signalled(workdir, point, signame, *extra)
        _assert_stopped(workdir, reference, out, point, extra, phase, step, code)

    rerun = run_cli([*FLAGS, "--workdir", workdir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_tree(checkpoint_tree(workdir, STEPS), checkpoint_tree(reference, STEPS))
    assert _numbers(workdir) == _numbers(reference)
    assert _report(workdir) == _report(reference)


# The downstream stage alone, from the reference's encoder, with a cross-validated linear probe
# (2 folds, 2 penalties: 8 fits a probe before the final one).
DOWNSTREAM = [
    *FLAGS,
    "--mode=downstream",
    "--config.downstream.linear_folds=2",
    "--config.downstream.linear_l2_grid=(0.01,0.1)",
]


@pytest.fixture(scope="module")
def downstream_reference(reference, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("downstream_ref") / "run")
    out = run_cli([*DOWNSTREAM, f"--config.restore={reference}", "--workdir", workdir])
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


# Stops outside the step loops, in the order one downstream run meets them (each rerun computes
# the frozen evaluations again, so every point is met again): (point, signal, exit code, what the
# last line names).
EVALUATION_STOPS = [
    ("call:evaluation.frozen.frozen_features:1", "SIGINT", 130, "the simclr features"),
    # Inside numpy's setitem of the probe's cross-validation loss: the crash of issue #25.
    ("float-in:evaluation.linear_probe._cross_validate", "SIGTERM", 143, "linear (linear probe)"),
    ("call:evaluation.frozen.knn_accuracy:1", "SIGTERM", 143, "knn (kNN)"),
    ("call:stages.downstream.pixel_features:1", "SIGTERM", 143, "the pixels features"),  # baseline
    ("call:report.build.write:1", "SIGTERM", 143, "its work is written"),  # after the last point
]


def test_a_signal_during_an_evaluation_ends_the_run_and_the_rerun_reports_the_same(
    reference, downstream_reference, tmp_path
):
    """Issue #25: a SIGTERM during the linear probe ended with a traceback (numpy's setitem
    turned the handler's exception into a ValueError). Every evaluation outside the step loops
    stops at its next stop point with the signal's exit code and one line, and the rerun of the
    same command ends with the uninterrupted run's numbers. One chain of six processes (~55 s):
    each stop's rerun is the next stop's run, where five stop-and-rerun pairs started ten."""
    workdir = str(tmp_path / "run")
    flags = [*DOWNSTREAM, f"--config.restore={reference}"]
    for point, signame, code, said in EVALUATION_STOPS:
        out = _signalled(workdir, point, signame, flags=flags)
        assert out.returncode == code, (point, out.stderr[-3000:])
        # (jaxlib 0.12 warns "Error writing persistent compilation cache entry" for oneDNN)
        assert "Traceback" not in out.stderr and "ValueError" not in out.stderr, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert said in last and last.endswith("Rerun the same command to resume."), (point, last)
    rerun = run_cli([*flags, "--workdir", workdir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _numbers(workdir) == _numbers(downstream_reference)
    assert _report(workdir) == _report(downstream_reference)
