"""Stops that lose nothing: a signal at an epoch's end, during its evaluation, during the last
step of pretraining (with a second one during the final save) and during the downstream stage
each end the run with 130/143 after a committed checkpoint of that step, never going on into the
next stage, and the rerun finishes exactly as an uninterrupted run does.

The signals are sent by the run to itself at the exact point (tests/signal_worker.py)."""

import json
import os
import subprocess
import sys

import pytest

from simclr_jax.report import FROZEN
from tests.helpers import FINISHED_FLAGS, FINISHED_STEPS, REPO, checkpoint_tree, run_cli
from tests.test_resume import _assert_same_tree

# The session's shared finished run's settings (tests/helpers.py): 2 epochs of 8 steps with a kNN
# check after each, a 3-epoch downstream stage.
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


def _numbers(workdir):
    """Every record's numbers but timings, by phase and step (a resumed downstream stage writes
    its frozen evaluations again, after the classifier runs' records): what a bitwise resume must
    reproduce."""
    rows = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in _records(workdir)]
    return sorted(rows, key=lambda r: (r["phase"], r["step"]))


def _steps(workdir, phase):
    where = os.path.join(workdir, "checkpoints", phase)
    return sorted(int(d) for d in os.listdir(where) if d.isdigit())


@pytest.fixture(scope="module")
def reference(finished_run):
    """The uninterrupted run: the session's shared one (read only)."""
    return finished_run["workdir"]


@pytest.mark.parametrize(
    "point, signame, extra, phase, step, code",
    [
        ("pretrain@8", "SIGTERM", (), "pretrain", 8, 143),  # the step that ends epoch 1
        ("pretrain@eval", "SIGINT", (), "pretrain", 8, 130),  # during epoch 1's kNN check
        ("pretrain@16", "SIGTERM", ("again",), "pretrain", 16, 143),  # last step, then the save
        ("finetune@2", "SIGTERM", (), "finetune", 2, 143),  # the downstream stage
    ],
)
def test_a_signal_saves_that_step_stops_the_run_and_the_rerun_is_bitwise(
    reference, tmp_path, point, signame, extra, phase, step, code
):
    workdir = str(tmp_path / "run")
    out = _signalled(workdir, point, signame, *extra)
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Rerun the same command to resume" in out.stderr
    assert f"at step {step}; checkpoint saved" in out.stderr, out.stderr[-3000:]
    assert _steps(workdir, phase)[-1] == step  # committed: the newest checkpoint is that step
    records = _records(workdir)
    assert records[-1]["phase"] == phase and records[-1]["step"] == step
    if point == "pretrain@8":  # saved first; the evaluation due then was skipped, and said so
        assert "the evaluation due after step 8 (epoch 1) is skipped" in out.stderr
        assert "knn_acc" not in records[-1]
    if phase == "pretrain":  # it never went on into the next stage
        assert {r["phase"] for r in records} == {"pretrain"}
        assert not os.path.exists(os.path.join(workdir, "report.md"))
    if "again" in extra:
        assert "arrived while a checkpoint was saved; it is saved" in out.stderr

    rerun = run_cli([*FLAGS, "--workdir", workdir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_tree(checkpoint_tree(workdir, STEPS), checkpoint_tree(reference, STEPS))
    assert _numbers(workdir) == _numbers(reference)


# The downstream stage alone, from the reference's encoder, with a cross-validated linear probe
# (2 folds, 2 penalties: 8 fits a probe before the final one).
DOWNSTREAM = [
    *FLAGS,
    "--mode=downstream",
    "--config.downstream.linear_folds=2",
    "--config.downstream.linear_l2_grid=(0.01,0.1)",
]


def _report_numbers(workdir):
    """report.json's headline numbers and frozen-evaluation records, timings left out."""
    with open(os.path.join(workdir, "report.json")) as f:
        rep = json.load(f)
    frozen = {p: {k: v for k, v in rep[p].items() if not k.endswith("_s")} for p in FROZEN}
    return rep["summary"], frozen


@pytest.fixture(scope="module")
def downstream_reference(reference, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("downstream_ref") / "run")
    out = run_cli([*DOWNSTREAM, f"--config.restore={reference}", "--workdir", workdir])
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.mark.parametrize(
    "call, signame, code, said",
    [
        # Inside numpy's setitem of the probe's cross-validation loss: the crash of issue #25.
        ("float-in:probe._cross_validate", "SIGTERM", 143, "linear (linear probe)"),
        ("evaluate.frozen_features:1", "SIGINT", 130, "the simclr features"),
        ("downstream.pixel_features:1", "SIGTERM", 143, "the pixels features"),  # a baseline
        ("evaluate.knn_accuracy:1", "SIGTERM", 143, "knn (kNN)"),
        ("report.write:1", "SIGTERM", 143, "its work is written"),  # after the last stop point
    ],
)
def test_a_signal_during_an_evaluation_ends_the_run_and_the_rerun_reports_the_same(
    reference, downstream_reference, tmp_path, call, signame, code, said
):
    """Issue #25: a SIGTERM during the linear probe ended with a traceback (numpy's setitem
    turned the handler's exception into a ValueError). Every evaluation outside the step loops
    stops at its next stop point with the signal's exit code and one line, and the rerun of the
    same command ends with the uninterrupted run's numbers."""
    workdir = str(tmp_path / "run")
    flags = [*DOWNSTREAM, f"--config.restore={reference}"]
    out = _signalled(
        workdir, call if call.startswith("float") else f"call:{call}", signame, flags=flags
    )
    assert out.returncode == code, out.stderr[-3000:]
    # (jaxlib 0.12 warns "Error writing persistent compilation cache entry" for oneDNN programs)
    assert "Traceback" not in out.stderr and "ValueError" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert said in last and last.endswith("Rerun the same command to resume."), last
    rerun = run_cli([*flags, "--workdir", workdir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _numbers(workdir) == _numbers(downstream_reference)
    assert _report_numbers(workdir) == _report_numbers(downstream_reference)
