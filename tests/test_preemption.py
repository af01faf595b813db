"""Preemption and one run per workdir: with several processes, SIGTERM to one of them stops all
at the same step (one process: tests/test_resume.py); a second run on a workdir in use stops at
once naming the holder, and the lock of a SIGKILLed run does not block the next."""

import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO, run_cli
from tests.test_multihost import TIMEOUT, _free_port
from tests.test_resume import FLAGS, _popen, _records


def wait_for_records(workdir, n=1, proc=None, timeout=240):
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= n:
            return True
        time.sleep(0.01)
    return False


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """jax's preemption service: the notice to process 1 reaches process 0, both save the same
    step together and exit 143."""
    workdir, port = str(tmp_path / "multi"), _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "run.py",
                *FLAGS,
                "--workdir",
                workdir,
                "--config.pretrain.num_steps=10000",
                "--config.pretrain.checkpoint_every=0",
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        assert wait_for_records(workdir, proc=procs[0], timeout=TIMEOUT)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    steps = {int(e.split("preempted (SIGTERM) at step ")[1].split(";")[0]) for e in errs}
    assert len(steps) == 1, errs
    (step,) = steps
    assert os.listdir(os.path.join(workdir, "checkpoints", "pretrain")) == [str(step)]
    # The service names the step right after it ran: its record is the rerun's (loop.py).
    assert _records(workdir)[-1]["step"] == step - 1


def test_a_second_run_on_a_workdir_in_use_stops_at_once(tmp_path):
    workdir = str(tmp_path / "run")
    first = _popen(workdir, steps=10_000)
    try:
        assert wait_for_records(workdir, proc=first)
        second = run_cli([*FLAGS, "--workdir", workdir, "--config.pretrain.num_steps=10000"])
        n_before = len(_records(workdir))
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("error: --workdir") and f"in use by process {first.pid} on" in line
        assert "choose another --workdir" in line
        assert first.poll() is None  # the first run goes on, alone in its metrics.jsonl
        assert wait_for_records(workdir, n=n_before + 2, proc=first)
        steps = [r["step"] for r in _records(workdir)]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, its flock goes with the process
        first.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))
    # A short run in its place (another length: the killed run's is deleted, config.overwrite).
    args = [
        *FLAGS,
        "--workdir",
        workdir,
        "--config.pretrain.num_steps=2",
        "--config.overwrite=True",
    ]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, ".lock"))
