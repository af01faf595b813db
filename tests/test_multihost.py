"""Multi-host: 2 processes x 2 simulated CPU devices on localhost (jax.distributed, gloo
collectives) give the losses of 1 process x 4 devices; only process 0 writes; the checkpoints they
save together restore. Also the launcher detection that turns jax.distributed on by itself."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from simclr_jax.core import networks, optim
from simclr_jax.runtime import parallel
from simclr_jax.train import state as train_state
from simclr_jax.train.checkpoint import Checkpointer
from tests.helpers import REPO, TINY_FLAGS, checkpoint_tree, max_param_diff, run_cli, tiny_config

STEPS = 4
FLAGS = [*TINY_FLAGS, "--mode=pretrain", "--config.pretrain.log_every=1"]
TIMEOUT = 420  # a hung collective must fail the test, not stall the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(workdir, steps, num_processes=2, devices_per_process=2):
    """Runs run.py as `num_processes` cooperating processes; returns their (returncode, stderr)."""
    port = _free_port()
    argvs = [
        [
            sys.executable,
            "run.py",
            *FLAGS,
            "--workdir",
            workdir,
            f"--config.pretrain.num_steps={steps}",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=localhost:{port}",
            f"--config.distributed.num_processes={num_processes}",
            f"--config.distributed.process_id={i}",
        ]
        for i in range(num_processes)
    ]
    return run_together(argvs, devices_per_process)


def run_together(argvs, devices_per_process: int) -> list[tuple[int, str]]:
    """Starts one process per argv (cwd: the repo; `devices_per_process` simulated CPU devices
    each), waits for all with TIMEOUT, and kills any left; returns their (returncode, stderr)."""
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}"
    )
    procs = [
        subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for argv in argvs
    ]
    try:
        return [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _restore(workdir, step):
    """The pretraining state of `step`, restored in this (single) process by the Checkpointer."""
    config = tiny_config()
    model = networks.build_model(config.model, bn_axis_name=parallel.AXIS)
    tx = optim.make_optimizer(config.pretrain, optim.make_schedule(config.pretrain, 8, STEPS))
    target = train_state.state_tree(
        train_state.create_state(model, tx, train_state.seed_key(0, 0), 32)
    )
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"), create=False)
    try:
        return ckpt.restore(step, target)[0]
    finally:
        ckpt.close()


def test_two_processes_match_one_process_on_four_devices(tmp_path):
    """Two processes of two devices each (jax.distributed on localhost) give the one-process,
    four-device run's records and checkpoint. Slower than most (~40 s on 2 cores): a run.py
    process for the reference and one per host, two of them at once on the two cores, each
    compiling for its own device count."""
    ref = str(tmp_path / "ref")
    out = run_cli([*FLAGS, "--workdir", ref, f"--config.pretrain.num_steps={STEPS}"], devices=4)
    assert out.returncode == 0, out.stderr[-3000:]

    workdir = str(tmp_path / "multi")
    results = _run_processes(workdir, STEPS)
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i}:\n{err[-3000:]}"
    assert "Process 1 of 2: 2 local / 4 global devices" in results[1][1]
    assert "Loaded digits" in results[0][1] and "Loaded digits" not in results[1][1]  # one reports

    got, want = _records(workdir), _records(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one writer: no duplicates
    for key in ("loss", "online_probe_loss"):  # digits has labels: the head is on by default
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4)
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
    assert json.load(open(os.path.join(workdir, "config.json")))["distributed"]["enabled"]
    assert not [f for f in os.listdir(workdir) if f.startswith(".write_test")]

    # Saved together, once; restores in a single process (--mode=downstream on one machine) to
    # the single-process run's state, up to the order of float sums.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "pretrain"))) == ["2", "4"]
    got_state, want_state = _restore(workdir, STEPS), _restore(ref, STEPS)
    assert int(got_state["step"]) == STEPS
    diff, leaf = max_param_diff(got_state, want_state)
    assert diff < 1e-4, (diff, leaf)
    got_head, want_head = (checkpoint_tree(w, STEPS, "probe")["params"] for w in (workdir, ref))
    diff, leaf = max_param_diff(got_head, want_head)  # the head's own item, saved together
    assert diff < 1e-4, (diff, leaf)

    # Restored together: the finished run resumes at its last step on both processes (a process
    # that started over would wait on collectives the other never joins, or write more records).
    results = _run_processes(workdir, STEPS)
    for i, (code, err) in enumerate(results):
        assert code == 0 and "unreadable" not in err, f"process {i}:\n{err[-3000:]}"
    assert f"Resuming pretraining from step {STEPS}" in results[0][1]
    assert [r["step"] for r in _records(workdir)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize(
    "env, want",
    [
        ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "node[1-2]"}, "SLURM"),
        ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"}, None),  # one task: nothing to join
        ({"SLURM_NTASKS": "4"}, None),  # sbatch's shell, outside an srun step
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "TPU pod"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
        ({"MEGASCALE_NUM_SLICES": "2"}, "TPU pod"),
        ({}, None),
    ],
)
def test_detect_cluster(monkeypatch, env, want):
    for key in (
        "SLURM_NTASKS",
        "SLURM_STEP_NODELIST",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_NUM_SLICES",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert parallel.detect_cluster() == want
