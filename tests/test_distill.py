"""--mode=distill: the distillation loss against NumPy, bad values and a missing teacher as one-line
errors before any work, and on a tiny finished run: the report's student rows, the same records on
1 and 8 devices, and a stop that the rerun resumes bitwise."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from simclr_jax.app import validate as config_lib
from simclr_jax.core import losses
from simclr_jax.errors import ConfigError
from tests.helpers import TINY_FLAGS, run_cli, tiny_config
from tests.test_resume import _assert_same_tree
from tests.test_stops import _numbers, _signalled, _steps

# A tiny run whose teacher ('finetune': 64 labels, 2 steps an epoch, 4 epochs at lr 0.1) is far
# from uniform, then a student over its 256 pretraining images: 8 steps an epoch, 2 epochs; the
# labels-only student with the classifiers' settings, so that its step's compiled program is
# theirs (the persistent cache: the runs here are on 1 device, but the 8-device one).
FLAGS = [
    *TINY_FLAGS,
    "--config.pretrain.num_steps=4",
    "--config.downstream.label_fraction=0.25",
    "--config.downstream.epochs=4",
    "--config.downstream.linear_folds=0",
    "--config.downstream.knn_k=5",
    "--config.downstream.learning_rate=0.1",
    "--config.distill.teacher=finetune",
    "--config.distill.epochs=2",
    "--config.distill.batch_size=32",
    "--config.distill.lr_scaling=none",
    "--config.distill.learning_rate=0.05",
    "--config.distill.labels_epochs=4",
    "--config.distill.labels_learning_rate=0.1",
]
DISTILL = [*FLAGS, "--mode=distill"]
STEPS = 16  # the distilled student's


def _numpy_loss(s, t, temperature):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p = np.exp(log_softmax(t / temperature))
    return temperature**2 * np.mean(-(p * log_softmax(s / temperature)).sum(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_the_distillation_loss_is_the_numpy_transcription_and_leaves_the_teacher(temperature):
    rng = np.random.default_rng(0)
    s, t = (rng.normal(size=(6, 10)).astype(np.float32) * 3 for _ in range(2))
    got = losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), temperature)
    np.testing.assert_allclose(float(got), _numpy_loss(s, t, temperature), rtol=1e-5)
    grad_t = jax.grad(lambda t: losses.distillation_loss(jnp.asarray(s), t, temperature))(t)
    assert not np.any(np.asarray(grad_t))  # no gradient reaches the teacher
    # The student's gradient: T * (softmax(s/T) - softmax(t/T)) / n (the T^2 scale kept).
    grad_s = jax.grad(lambda s: losses.distillation_loss(s, jnp.asarray(t), temperature))(s)
    want = temperature * (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)) / 6
    np.testing.assert_allclose(np.asarray(grad_s), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("distill.teacher", "scratch", "must be one of"),
        ("distill.temperature", 0.0, "must be > 0"),
        ("distill.epochs", 0, "must be > 0"),
        ("distill.labels_epochs", 0, "must be > 0"),
        ("distill.labels_learning_rate", -1.0, "must be > 0"),
        ("distill.learning_rate", 0.0, "must be > 0"),
        ("distill.optimizer", "adam", "must be one of"),
        ("distill.model.name", "vgg", "must be one of"),
        ("distill.model.width", -0.5, "must be >= 0"),
        ("distill.batch_size", 30, "does not split over 8 devices"),
    ],
)
def test_a_bad_distill_value_is_a_config_error_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_lib.validate(tiny_config(**{"distill.teacher": "finetune", key: value}), "distill")
    assert str(err.value).startswith(f"config.{key}:") and "\n" not in str(err.value)


def test_a_long_teacher_needs_the_long_budget():
    config = tiny_config(**{"distill.teacher": "finetune_long"})  # tiny: long_epochs = 0
    with pytest.raises(ConfigError, match="config.distill.teacher: 'finetune_long' needs"):
        config_lib.validate(config, "distill")


def test_a_missing_teacher_is_one_line_before_any_work(tmp_path):
    workdir = str(tmp_path / "run")
    out = run_cli([*DISTILL, "--workdir", workdir], devices=1)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --mode=distill needs the downstream run 'finetune'")
    assert "--mode=downstream (or all)" in last and "Traceback" not in out.stderr
    assert not os.path.exists(workdir)  # nothing written


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny pretrain + downstream run: the teacher's workdir (left as it is: tests copy it)."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    out = run_cli([*FLAGS, "--workdir", workdir], devices=1)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def distilled(finished, tmp_path_factory):
    """--mode=distill on a copy of `finished`, on 1 device."""
    workdir = str(tmp_path_factory.mktemp("distilled") / "run")
    shutil.copytree(finished, workdir)
    out = run_cli([*DISTILL, "--workdir", workdir], devices=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distilled student" in out.stdout
    return workdir


def _student_records(workdir):
    rows = [r for r in _numbers(workdir) if r["phase"] in ("distill", "distill_labels")]
    return [r for r in rows if "test_acc" in r or "loss" in r]


def _tree(workdir, phase, step):
    path = epath.Path(workdir) / "checkpoints" / phase / str(step) / "state"
    structure = ocp.PyTreeCheckpointHandler().metadata(path).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_the_report_puts_both_students_beside_the_teacher(distilled):
    with open(os.path.join(distilled, "report.json")) as f:
        rep = json.load(f)
    s = rep["summary"]
    assert rep["distill"]["epoch"] == [1, 2] and rep["distill_labels"]["epoch"] == [1, 2, 3, 4]
    want = s["distill_test_acc"] - s["distill_labels_test_acc"]
    assert s["distilled_minus_labels_only"] == pytest.approx(want)
    assert s["distilled_minus_teacher"] == pytest.approx(
        s["distill_test_acc"] - s["finetune_test_acc"]
    )
    losses_ = [r["loss"] for r in _student_records(distilled) if r["phase"] == "distill"]
    assert losses_[0] > losses_[-1]  # the student learns the teacher (not a uniform one)
    with open(os.path.join(distilled, "report.md")) as f:
        md = f.read()
    assert "distilled from finetune, T=1" in md and "The same student on the labels alone" in md
    assert "Distilled student minus the same student on the labels" in md
    # The students' checkpoints know their teacher by content, not by path: a moved workdir
    # keeps them (tests/test_after_training.py moves one).
    metas = {}
    for phase in ("distill", "distill_labels"):
        step = _steps(distilled, phase)[-1]
        with open(
            os.path.join(distilled, "checkpoints", phase, str(step), "meta", "metadata")
        ) as f:
            metas[phase] = f.read()
        assert os.path.dirname(distilled) not in metas[phase], phase
    teacher = json.loads(metas["distill"])["run"]["teacher"]
    assert set(teacher) == {"run", "step", "digest"} and teacher["run"] == "finetune"


def test_the_students_records_are_the_same_on_8_devices(finished, distilled, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    out = run_cli([*DISTILL, "--workdir", workdir], devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    want, got = _student_records(distilled), _student_records(workdir)
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:  # float32 sums in another order: drift; a wrong step moves them by percents
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), (a["phase"], a["step"], k)
            else:
                assert a[k] == b[k], k


def test_a_stop_in_the_distillation_resumes_bitwise(finished, distilled, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    # Mid-way through epoch 1 (8 steps, one record at its end): the rerun's first record
    # averages the same 8 steps as the uninterrupted run's.
    out = _signalled(workdir, "distill@5", "SIGTERM", devices=1, flags=DISTILL)
    assert out.returncode == 143, out.stderr[-3000:]
    assert "distill: terminated (SIGTERM) at step 5; checkpoint saved" in out.stderr
    assert _steps(workdir, "distill")[-1] == 5
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "distill_labels"))
    rerun = run_cli([*DISTILL, "--workdir", workdir], devices=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _student_records(workdir) == _student_records(distilled)
    _assert_same_tree(_tree(workdir, "distill", STEPS), _tree(distilled, "distill", STEPS))


def test_an_unfinished_teacher_or_other_settings_are_one_line_before_any_work(finished, tmp_path):
    """Asked for a 5-epoch teacher where the workdir's finished 4, --mode=distill is refused: it
    would not retrain the teacher, so config.json would describe one it never was. With the
    settings the workdir holds and its teacher's last checkpoint gone (step 6 of 8 left), it is
    refused for an unfinished teacher. Either way the workdir is left as it was found."""
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    out = run_cli([*DISTILL, "--config.downstream.epochs=5", "--workdir", workdir], devices=1)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "other settings (downstream.epochs: 4 -> 5)" in last and "--mode=distill" in last
    shutil.rmtree(os.path.join(workdir, "checkpoints", "finetune", "8"))
    out = run_cli([*DISTILL, "--workdir", workdir], devices=1)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "holds step 6 of 8" in last and "--mode=downstream (or all)" in last
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before  # left as it was found
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "distill"))


def test_the_demo_config_distils_with_the_rates_its_validation_search_picked():
    from configs import digits_simclr

    config = digits_simclr.get_config()
    config_lib.validate(config, "distill")
    d = config.distill
    assert (d.teacher, d.learning_rate, d.labels_learning_rate) == ("finetune_long", 0.3, 0.1)
    assert d.chosen_on.startswith("validation")


def test_the_official_distillation_view_is_a_resized_crop_and_flip_without_colour():
    """distill.student_view='resized_crop': each example's view a function of its global id (not
    of how the batch is split), colour untouched, traced through the distillation step; recorded
    in the run's checkpoint metadata (so a change starts the run anew), left out at the default
    (so runs written before resume)."""
    import functools

    import optax

    from simclr_jax.core import augment
    from simclr_jax.runtime import parallel
    from simclr_jax.stages import distill
    from simclr_jax.train import classifier
    from simclr_jax.train import state as train_state

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 20, 20, 1), np.uint8).repeat(3, -1)  # (4, 20, 20, 3)
    key, ids = jax.random.PRNGKey(0), np.arange(4)
    batch_views = jax.jit(augment.resized_crop_flip_batch, static_argnums=(4, 5, 6))
    views = batch_views(key, 3, grey, ids, 16, 0.3, 0.5)
    reordered = batch_views(key, 3, grey[::-1], ids[::-1], 16, 0.3, 0.5)
    np.testing.assert_array_equal(views[::-1], reordered)  # each view follows its example's id
    assert views.shape == (4, 16, 16, 3) and 0 <= float(views.min()) <= float(views.max()) <= 1
    np.testing.assert_array_equal(views[..., 0], views[..., 2])  # no colour jitter, no hue

    config = tiny_config(**{"distill.student_view": "resized_crop"})
    model = classifier.build_model(config, 10)
    spec = augment.spec_from_config(config)
    step = functools.partial(
        distill.distill_step,
        student=model,
        teacher=model,
        spec=spec,
        schedule=optax.constant_schedule(0.1),
        temperature=1.0,
        view="resized_crop",
    )
    tx = optax.sgd(0.1)
    state = jax.eval_shape(lambda: train_state.create_state(model, tx, jax.random.PRNGKey(0), 16))
    teacher = {"params": state.params, "batch_stats": state.batch_stats}
    batch = {"images": jnp.asarray(grey[None]), "ids": jnp.asarray(ids[None], jnp.int32)}
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), (state, teacher))
    _, metrics = jax.eval_shape(
        jax.vmap(step, axis_name=parallel.AXIS),
        stacked[0],
        batch,
        jax.ShapeDtypeStruct((1, 2), jnp.uint32),
        stacked[1],
    )
    assert metrics["loss"].shape == (1,)

    got = distill.run_meta(config, distill.DISTILL, {})["run"]["distill"]
    assert got["student_view"] == "resized_crop"
    plain = distill.run_meta(tiny_config(), distill.DISTILL, {})["run"]["distill"]
    assert "student_view" not in plain and set(got) - set(plain) == {"student_view"}
