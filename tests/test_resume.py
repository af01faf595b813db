"""Never lose a run: resume after SIGKILL (bitwise), damaged checkpoints, another device count,
divergence, Ctrl-C, SIGTERM (bitwise), and bad input that stops cleanly."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, TINY_FLAGS, checkpoint_tree, run_cli

STEPS = 8
FLAGS = [*TINY_FLAGS, "--mode=pretrain", "--config.pretrain.log_every=1"]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_tree(a, b):
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, list | tuple):
        return _flatten({str(i): v for i, v in enumerate(tree)}, prefix)
    return {prefix: tree}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps on 2 devices."""
    workdir = str(tmp_path_factory.mktemp("ref") / "run")
    out = run_cli([*FLAGS, "--workdir", workdir, f"--config.pretrain.num_steps={STEPS}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _popen(workdir, steps=STEPS, devices=2):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [*FLAGS, "--workdir", workdir, f"--config.pretrain.num_steps={steps}"]
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc, condition, timeout=240):
    """SIGKILLs proc as soon as condition() holds (polled every 2 ms); False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def test_sigkill_at_several_points_resumes_bitwise(reference, tmp_path):
    """SIGKILL at several points of pretraining (before the first checkpoint, between two, while
    one is written), each resumed from what survived, ends bitwise the uninterrupted run. Slower
    than most (~40 s on 2 cores): a killed process is the point, so each kill point is a run.py
    process of its own, and a last one resumes to the end."""
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints", "pretrain")
    metrics = os.path.join(workdir, "metrics.jsonl")

    def n_records():
        return sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0

    kill_points = [
        lambda: n_records() >= 1,  # mid-run, before any checkpoint
        lambda: bool(glob.glob(os.path.join(ckpt_dir, "*tmp*"))),  # while a save is in flight
        lambda: n_records() >= 5,  # after a checkpoint, between saves
    ]
    killed = 0
    for condition in kill_points:
        killed += _kill_when(_popen(workdir), condition)
    assert killed >= 2, "the run finished before the kill points were reached"
    final = _popen(workdir)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-3000:]

    _assert_same_run(workdir, reference)


def _assert_same_run(workdir, reference):
    """The final checkpoint (the state and the online linear head's item) and every record's
    losses and head accuracy of `workdir` are bitwise `reference`'s."""
    for item in ("state", "probe"):  # digits has labels: the head is on by default
        _assert_same_tree(
            checkpoint_tree(workdir, STEPS, item), checkpoint_tree(reference, STEPS, item)
        )
    got, want = _records(workdir), _records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "online_probe_loss", "online_probe_acc"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_damaged_latest_checkpoint_is_skipped(reference, tmp_path):
    """--mode=downstream restores the newest checkpoint or none: a damaged one is one line (no
    screenful of "Event loop is closed" tracebacks), nothing set aside or written, since the
    workdir's encoder.msgpack is the newest's. The pretraining's rerun sets it aside and redoes
    its steps from the readable one before, bitwise."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints", "pretrain")
    for f in glob.glob(os.path.join(ckpt_dir, str(STEPS), "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(7)  # a torn write
    shutil.rmtree(os.path.join(ckpt_dir, str(STEPS - 2)))
    before = sorted(glob.glob(os.path.join(workdir, "**"), recursive=True))
    config = open(os.path.join(workdir, "config.json")).read()
    args = [*FLAGS, "--workdir", workdir, f"--config.pretrain.num_steps={STEPS}"]
    out = run_cli([*args, "--mode=downstream"])
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert f"Checkpoint step {STEPS} in" in last and "the newest, is unreadable" in last
    assert "rerun --mode=pretrain (or all)" in last
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr
    assert sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)) == before
    assert open(os.path.join(workdir, "config.json")).read() == config
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Checkpoint step {STEPS} in" in out.stderr and "unreadable" in out.stderr
    assert "Event loop is closed" not in out.stderr
    _assert_same_tree(checkpoint_tree(workdir, STEPS), checkpoint_tree(reference, STEPS))
    assert [r["step"] for r in _records(workdir)] == list(range(1, STEPS + 1))


def test_no_usable_checkpoint_starts_fresh(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step_dir in glob.glob(os.path.join(workdir, "checkpoints", "pretrain", "[0-9]*")):
        for f in glob.glob(os.path.join(step_dir, "state", "*")):
            if os.path.isfile(f):
                os.remove(f)
    out = run_cli([*FLAGS, "--workdir", workdir, f"--config.pretrain.num_steps={STEPS}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "No usable checkpoint" in out.stderr and "starting from scratch" in out.stderr
    assert [r["loss"] for r in _records(workdir)] == [r["loss"] for r in _records(reference)]


def test_checkpoint_from_8_devices_resumes_on_1_and_4(tmp_path):
    base = str(tmp_path / "base")
    out = run_cli([*FLAGS, "--workdir", base, f"--config.pretrain.num_steps={STEPS}"], devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    want = np.array([r["loss"] for r in _records(base)])
    for devices in (1, 4):
        workdir = str(tmp_path / f"resume{devices}")
        shutil.copytree(base, workdir)
        for step in (STEPS, STEPS - 2):  # leave the step-4 checkpoint written on 8 devices
            shutil.rmtree(os.path.join(workdir, "checkpoints", "pretrain", str(step)))
        args = [*FLAGS, "--workdir", workdir, f"--config.pretrain.num_steps={STEPS}"]
        out = run_cli(args, devices=devices)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"Resuming pretraining from step {STEPS - 4}" in out.stderr
        records = _records(workdir)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        # Another device count sums in another order: float32 drift (jax 0.7.2 reaches 1.1e-4 by
        # step 8). A wrong resume (data, key, optimiser state) moves the loss by percents.
        np.testing.assert_allclose([r["loss"] for r in records], want, rtol=1e-3)


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        *FLAGS,
        "--workdir",
        workdir,
        "--config.pretrain.num_steps=6",
        "--config.pretrain.checkpoint_every=1",
        "--config.pretrain.learning_rate=1e30",
        "--config.pretrain.warmup_epochs=0",
    ]
    out = run_cli(args)
    assert out.returncode == 2
    assert "the loss is nan at step" in out.stderr or "the loss is inf at step" in out.stderr
    bad_step = int(out.stderr.split(" at step ")[1].split(".")[0])
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints", "pretrain")))
    assert steps and max(steps) == bad_step - 1  # nothing saved from the diverged step on


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _popen(workdir, steps=10_000)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "interrupted at step" in err and "Rerun the same command to resume" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    ckpts = os.listdir(os.path.join(workdir, "checkpoints", "pretrain"))
    assert str(step) in ckpts
    # A stop writes no record of its own: the last is the step's (a signal during its record)
    # or the one before (the step's record is then the rerun's).
    assert _records(workdir)[-1]["step"] in (step - 1, step)


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_bitwise(reference, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _popen(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read()
    assert "terminated (SIGTERM) at step" in err and "Rerun the same command to resume" in err
    assert "Traceback" not in err
    step = int(err.split("terminated (SIGTERM) at step ")[1].split(";")[0])
    assert step < STEPS, "SIGTERM came too late to interrupt"
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints", "pretrain"))
    assert _records(workdir)[-1]["step"] in (step - 1, step)  # as in the SIGINT test above
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released on the way out

    # An unfinished pretraining is no encoder to evaluate: one line, before any work.
    args = [
        *FLAGS,
        "--workdir",
        workdir,
        f"--config.pretrain.num_steps={STEPS}",
        "--mode=downstream",
    ]
    out = run_cli(args, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"is step {step} of {STEPS}" in out.stderr.strip().splitlines()[-1]

    final = _popen(workdir)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-3000:]
    _assert_same_run(workdir, reference)


def test_workdir_of_another_config_is_refused_unless_overwrite(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    args = [*FLAGS, "--workdir", workdir, "--config.model.width=2.0"]
    out = run_cli(args, timeout=120)
    assert out.returncode == 2
    assert "holds a run of a different config" in out.stderr and "overwrite" in out.stderr
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before  # nothing lost
    out = run_cli([*args, "--config.overwrite=True", "--config.pretrain.num_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in _records(workdir)] == [1, 2]  # the old run's records are gone


@pytest.mark.parametrize(
    "phases, key, value, mode, refused",
    [
        (["pretrain"], "pretrain.learning_rate", 0.5, "all", True),  # resumed, not redone
        (["pretrain"], "pretrain.learning_rate", 0.5, "downstream", True),
        (["pretrain"], "augment.jitter_prob", 0.5, "pretrain", True),
        (["pretrain", "finetune"], "downstream.epochs", 3, "all", False),  # runs start anew
        (["pretrain", "finetune"], "downstream.epochs", 3, "downstream", False),
        (["pretrain", "finetune"], "downstream.epochs", 3, "pretrain", True),
        (["pretrain", "finetune"], "downstream.epochs", 3, "distill", True),  # the teacher's
        (["pretrain", "finetune", "distill"], "downstream.epochs", 3, "downstream", True),
        (["pretrain", "finetune", "distill"], "distill.temperature", 2.0, "distill", False),
        (["pretrain", "finetune", "distill"], "distill.temperature", 2.0, "all", True),
        (["pretrain"], "data.data_dir", "/elsewhere", "all", False),  # where, not what
        (["pretrain"], "restore", "/elsewhere/run", "downstream", False),
        (["pretrain"], "pretrain.checkpoint_every", 7, "all", False),
        (["pretrain"], "data.mean", (0.5, 0.5, 0.5), "all", False),  # the checkpoints' to refuse
        ([], "pretrain.learning_rate", 0.5, "all", False),  # no work yet: nothing kept
    ],
)
def test_a_rerun_with_settings_it_would_not_apply_is_refused(
    tmp_path, phases, key, value, mode, refused
):
    """A rerun may change a setting only where its mode redoes the work that setting went into:
    pretraining is resumed, never redone; a downstream or distill run starts anew on other
    settings (the distillation was taught by the old classifiers). Paths and checkpoint cadence
    may always change."""
    from simclr_jax.app import workdirs
    from simclr_jax.errors import WorkdirError
    from tests.helpers import tiny_config

    workdir = str(tmp_path)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(tiny_config().to_json_best_effort())
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": 1, "phase": p, "loss": 1.0}) + "\n" for p in phases)
    config = tiny_config(**{key: value})
    if not refused:
        assert workdirs.check(workdir, config, mode) is False
        return
    with pytest.raises(WorkdirError, match="other settings") as err:
        workdirs.check(workdir, config, mode)
    assert f"{key}: " in str(err.value) and f" -> {value}" in str(err.value)
    if mode in ("all", "pretrain"):  # overwrite deletes the run there, and only there
        assert workdirs.check(workdir, tiny_config(**{key: value, "overwrite": True}), mode)
    else:
        with pytest.raises(WorkdirError, match="--mode=all with --config.overwrite=True"):
            workdirs.check(workdir, tiny_config(**{key: value, "overwrite": True}), mode)
    # A key an older config.json lacks is unknown, not changed.
    old = json.loads(tiny_config().to_json_best_effort())
    section, name = key.rsplit(".", 1) if "." in key else ("", key)
    (old[section] if section else old).pop(name)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(old, f)
    assert workdirs.check(workdir, config, mode) is False


def test_unwritable_workdir_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run_cli([*FLAGS, "--workdir", str(blocker / "run")], timeout=120)
    assert out.returncode == 2
    assert "is not writable" in out.stderr and "--workdir" in out.stderr


def test_downstream_without_checkpoint_fails_early(tmp_path):
    out = run_cli(
        [*TINY_FLAGS, "--workdir", str(tmp_path / "empty"), "--mode=downstream"], timeout=120
    )
    assert out.returncode == 2
    assert "needs a pretraining checkpoint" in out.stderr and "--config.restore" in out.stderr


def test_damaged_dataset_file_fails_clearly(tmp_path):
    src = os.path.join(REPO, "..", "shared", "tensorflow_datasets", "cifar10", "3.0.2")
    if not os.path.isdir(src):
        pytest.skip("no prepared cifar10 metadata beside the checkout")
    dst = tmp_path / "tfds" / "cifar10" / "3.0.2"
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        if name.endswith(".json") or name.endswith(".txt"):
            shutil.copy(os.path.join(src, name), dst / name)
        else:  # the array_record shards: replaced by garbage of the same name
            (dst / name).write_bytes(b"\x00garbage" * 100)
    args = [*FLAGS, "--workdir", str(tmp_path / "run"), "--config.data.name=cifar10"]
    out = run_cli([*args, f"--config.data.data_dir={tmp_path / 'tfds'}"], timeout=120)
    assert out.returncode == 2
    assert "cifar10" in out.stderr and ("damaged" in out.stderr or "not prepared" in out.stderr)


def test_a_run_written_before_conv_impl_was_removed_restores(tmp_path):
    """tests/data/legacy_run: a tiny 2-step pretraining run written by commit 7250eb2, whose
    config.json still has model.conv_impl. Its workdir is accepted, its checkpoint restores, and
    the encoder that comes back is the checkpoint's, bitwise."""
    from simclr_jax.app import main
    from simclr_jax.train import state as train_state
    from tests.helpers import tiny_config

    workdir = str(tmp_path / "legacy")
    shutil.copytree(os.path.join(REPO, "tests", "data", "legacy_run"), workdir)
    assert "conv_impl" in json.load(open(os.path.join(workdir, "config.json")))["model"]
    # The legacy run's model, input size and pretraining settings (the defaults have moved on
    # since; a rerun with others is refused, as for any workdir holding a pretraining).
    legacy = {"model.head_layers": 2, "data.image_size": 32, "augment.flip_prob": 0.5}
    legacy.update({"pretrain.num_steps": 2, "pretrain.epochs": 12, "pretrain.warmup_epochs": 2.0})
    legacy["pretrain.learning_rate"] = 1.0
    encoder, step = train_state.restore_encoder(tiny_config(**legacy), main.pretrain_dir(workdir))
    saved = checkpoint_tree(workdir, 2)
    assert step == 2
    _assert_same_tree(encoder["params"], saved["params"]["encoder"])
    _assert_same_tree(encoder["batch_stats"], saved["batch_stats"]["encoder"])
    config = tiny_config(**legacy, **{"downstream.epochs": 1, "downstream.batch_size": 8})
    out = main.run(config, workdir, "downstream")["downstream"]
    assert out["encoder_step"] == 2 and 0.0 <= out["knn_test_acc"] <= 1.0


def test_a_checkpoint_without_the_online_probe_resumes_with_a_fresh_head(tmp_path, caplog):
    """tests/data/legacy_run, written before the online linear head existed, resumes with the
    head on (the default on digits): the encoder's state from its checkpoint, bitwise, and the
    head from its init at step 2, its learning-rate schedule where pretraining's is (its optax
    count 2, not 0), said in the log. (Saving and resuming the head's own item: the SIGKILL and
    SIGTERM tests above.)"""
    import jax
    import optax

    from simclr_jax.app import main
    from simclr_jax.stages import pretrain
    from simclr_jax.train.checkpoint import Checkpointer
    from tests.helpers import tiny_config

    config = tiny_config(**{"model.head_layers": 2, "data.image_size": 32, "pretrain.num_steps": 8})
    _, state = pretrain.step_and_initial_state(config, 8, 8, num_classes=10)
    fresh = state.probe
    source = main.pretrain_dir(os.path.join(REPO, "tests", "data", "legacy_run"))
    ckpt = Checkpointer(source, create=False, async_save=False)
    try:
        with caplog.at_level("WARNING", logger="simclr_jax.stages.pretrain"):
            state, step, _ = pretrain.restore_or_init(ckpt, state, config)
    finally:
        ckpt.close()
    assert step == 2 and "holds no online linear head" in caplog.text and "afresh" in caplog.text
    saved = checkpoint_tree(os.path.join(REPO, "tests", "data", "legacy_run"), 2)
    for part in ("params", "batch_stats"):
        _assert_same_tree(jax.device_get(getattr(state, part)), saved[part])
    assert int(state.step) == 2 and int(state.probe.step) == 2
    jax.tree.map(np.testing.assert_array_equal, state.probe.params, fresh.params)
    counts = optax.tree_utils.tree_get_all_with_path(state.probe.opt_state, "count")
    assert [int(c) for _, c in counts] == [2]  # LARS's one schedule count, on from step 2
    assert [
        int(c) for _, c in optax.tree_utils.tree_get_all_with_path(fresh.opt_state, "count")
    ] == [0]


def test_a_checkpoint_records_its_input_normalisation_and_other_values_are_refused():
    """The normalisation is part of what a checkpoint must agree with, as the data identity: other
    values are a one-line CheckpointError naming both; a checkpoint without the entry (written
    before it existed, as tests/data/legacy_run's) or a config whose statistics are not computed
    yet is checked on the rest."""
    from simclr_jax.errors import CheckpointError
    from simclr_jax.train import state as train_state
    from tests.helpers import DIGITS_STATS, tiny_config

    meta = train_state.checkpoint_meta(tiny_config(), "pretrain")
    assert meta["normalisation"] == {"mean": list(DIGITS_STATS[0]), "std": list(DIGITS_STATS[1])}
    train_state.check_meta(meta, tiny_config(), "here")
    other = tiny_config(**{"data.mean": (0.5, 0.5, 0.5)})
    with pytest.raises(CheckpointError, match="normalised with mean") as err:
        train_state.check_meta(meta, other, "here")
    assert "config.data.mean" in str(err.value) and "\n" not in str(err.value)
    train_state.check_meta({k: v for k, v in meta.items() if k != "normalisation"}, other, "here")
    train_state.check_meta(meta, tiny_config(**{"data.mean": (), "data.std": ()}), "here")
