"""Shared test set-up: a tiny digits config and a way to run run.py in a subprocess."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The digits train split's channel statistics (the digits Dataset's channel_stats(), rounded).
DIGITS_STATS = ((0.3057,) * 3, (0.3234,) * 3)


def tiny_config(**overrides):
    """The digits config shrunk to seconds: tiny ResNet, small batches, few steps."""
    from configs import digits_simclr

    c = digits_simclr.get_config()
    c.model.name = "tiny"
    c.data.max_train_examples = 256
    # What data.with_stats fills in a run (tests build steps without loading the data).
    c.data.mean, c.data.std = DIGITS_STATS
    c.pretrain.batch_size = 32
    c.pretrain.num_steps = 4
    c.pretrain.log_every = 2
    c.pretrain.checkpoint_every = 2
    c.pretrain.knn_every = 0
    c.downstream.epochs = 1
    c.downstream.batch_size = 32
    c.downstream.long_epochs = 0
    c.downstream.linear_l2_grid = (1e-2,)
    c.downstream.linear_iters = 20
    for run in c.downstream.runs:  # one shared rate (the demo's own picks suit its model only)
        c.downstream.runs[run].learning_rate, c.downstream.runs[run].chosen_on = 0.0, ""
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def run_cli(args, devices=2, timeout=300, env=None, **kwargs):
    """Runs `python run.py ARGS` on `devices` simulated CPU devices; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "run.py"), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


TINY_FLAGS = [
    "--config",
    "configs/digits_simclr.py",
    "--config.model.name=tiny",
    "--config.data.max_train_examples=256",
    "--config.pretrain.batch_size=32",
    "--config.pretrain.log_every=2",
    "--config.pretrain.checkpoint_every=2",
    "--config.pretrain.knn_every=0",
    "--config.downstream.long_epochs=0",
    "--config.downstream.linear_l2_grid=(0.01,)",
    "--config.downstream.linear_iters=20",
    # one shared rate, as tiny_config
    *(f"--config.downstream.runs.{r}.learning_rate=0" for r in ("finetune", "scratch")),
    *(f"--config.downstream.runs.{r}_long.learning_rate=0" for r in ("finetune", "scratch")),
]


# The session's shared finished run (tests/conftest.py, finished_run): 256 digits, batch 32 = 8
# steps an epoch; 2 epochs with the kNN monitor after each, a record every 4 steps; a short
# downstream stage (11 labels, batch 4: two classifier steps an epoch, a record after each epoch's
# test evaluation, 3 epochs).
FINISHED_STEPS = 16
FINISHED_FLAGS = [
    *TINY_FLAGS,
    f"--config.pretrain.num_steps={FINISHED_STEPS}",
    "--config.pretrain.knn_every=1",
    "--config.pretrain.log_every=4",
    "--config.pretrain.checkpoint_every=4",
    "--config.downstream.epochs=3",
    "--config.downstream.batch_size=4",
    "--config.downstream.warmup_epochs=3",  # as long as the runs: app/data_checks.py warns (test_after_training)
    "--config.downstream.linear_folds=0",
    "--config.downstream.knn_k=5",
]


def max_param_diff(a, b) -> tuple[float, str]:
    """(max |a - b| over the leaves of two trees of the same structure, the worst leaf's path)."""
    import jax
    import numpy as np

    worst = (0.0, "")
    leaves_b = jax.tree.leaves(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], leaves_b, strict=True):
        d = float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        worst = max(worst, (d, jax.tree_util.keystr(path)))
    return worst


def checkpoint_tree(workdir: str, step: int, item: str = "state"):
    """The pretraining state saved at `step` in `workdir` (or its item `item`: 'probe', the online
    linear head's), as NumPy arrays: read with restore_type np.ndarray, which needs no sharding
    (restoring as jax arrays without a target makes orbax warn 'Sharding info not provided when
    restoring' for every leaf)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    from simclr_jax.app import main

    path = os.path.join(main.pretrain_dir(workdir), str(step), item)

    structure = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
    return ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
