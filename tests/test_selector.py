"""SimCLRv2's fine-tuning from a projection-head layer (downstream.ft_proj_selector): the model's
kept head layers, their copy from pretraining, the frozen features they give, the config's
errors, and a classifier run at selector 1 that resumes bitwise and gives the same records on 1
and 8 simulated devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import classifier, models, train_state
from simclr_jax import config as config_lib
from simclr_jax.errors import ConfigError
from tests.helpers import TINY_FLAGS, run_cli, tiny_config
from tests.test_models import apply, images, init, make_cfg
from tests.test_stops import _numbers, _signalled

LAYERS = 3  # the demo's head depth


@pytest.fixture(scope="module")
def pretrained():
    """A tiny SimCLR model with a 3-layer head, its variables moved off their init (so that a
    copy from the wrong layer or a missing copy shows)."""
    cfg = make_cfg(head_layers=LAYERS, head_hidden_dim=24, proj_dim=16, head_bn_output=True)
    model = models.build_model(cfg)
    variables = init(model, images(4))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: a + rng.normal(0, 0.1, a.shape).astype(a.dtype), variables)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])  # variances > 0
    return cfg, model, variables


def _classifier_state(cfg, variables, k):
    clf = models.build_model(cfg, num_classes=10, proj_layers=k)
    start = train_state.start_variables(variables, k)
    state = classifier.initial_state(clf, optax.sgd(0.1), start, 16)
    return clf, {"params": state.params, "batch_stats": state.batch_stats}


def test_selector_0_is_the_classifier_without_head_layers(pretrained):
    cfg, model, variables = pretrained
    clf, state = _classifier_state(cfg, variables, 0)
    plain = models.Classifier(encoder=models.build_encoder(cfg), num_classes=10)
    assert clf == plain  # the very module of before: same parameters, same numbers
    fresh = init(plain, images(2))
    assert set(state["params"]) == {"encoder", "head"} and set(state["batch_stats"]) == {"encoder"}
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(state) == shapes(fresh)
    x = images(4)
    h = apply(model, variables, x, method="encode")
    np.testing.assert_allclose(apply(clf, state, x, method="features"), h)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_kept_head_layers_are_the_pretrained_ones_by_name(pretrained, k):
    cfg, model, variables = pretrained
    clf, state = _classifier_state(cfg, variables, k)
    head = variables["params"]["head"]
    bns = {f"bn{i}" for i in range(1, k + 1)}
    assert set(state["params"]["proj"]) == {f"dense{i}" for i in range(1, k + 1)} | bns
    assert set(state["batch_stats"]["proj"]) == bns
    for name in state["params"]["proj"]:  # copied, bitwise, from the pretrained layer of its name
        jax.tree.map(np.testing.assert_array_equal, state["params"]["proj"][name], head[name])
    for name in bns:
        stats = variables["batch_stats"]["head"][name]
        jax.tree.map(np.testing.assert_array_equal, state["batch_stats"]["proj"][name], stats)
    np.testing.assert_array_equal(state["params"]["head"]["kernel"], 0.0)  # the linear head
    x = images(4)
    got = apply(clf, state, x, method="features")
    feats = jax.jit(lambda v, x: model.apply(v, x, False, k, method="features"))
    np.testing.assert_allclose(got, feats(variables, x), rtol=1e-5, atol=1e-6)
    h, z = apply(model, variables, x)
    if k == LAYERS:  # the last layer's output is z
        np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-6)
    if k == 1:  # by hand: relu(BN(h W1)) with the running statistics
        bn, st = head["bn1"], variables["batch_stats"]["head"]["bn1"]
        y = (h @ head["dense1"]["kernel"] - st["mean"]) / np.sqrt(st["var"] + 1e-5)
        want_1 = np.maximum(y * bn["scale"] + bn["bias"], 0.0)
        np.testing.assert_allclose(got, want_1, rtol=1e-4, atol=1e-5)
    logits = apply(clf, state, x)
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head


@pytest.mark.parametrize("k, layers", [(-1, 3), (4, 3), (2, 1)])
def test_a_bad_selector_is_a_config_error_naming_the_key(k, layers):
    config = tiny_config(**{"downstream.ft_proj_selector": k, "model.head_layers": layers})
    want = rf"config\.downstream\.ft_proj_selector: .* 0\.\.model\.head_layers={layers} .*got {k}"
    with pytest.raises(ConfigError, match=want):
        config_lib.validate(config)
    config.downstream.ft_proj_selector = layers  # z: allowed, as in the official code
    config_lib.validate(config)


def test_a_bad_selector_on_the_command_line_is_one_line_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    bad = "--config.downstream.ft_proj_selector=4"
    out = run_cli([*TINY_FLAGS, bad, "--workdir", str(workdir)], timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert (
        "config.downstream.ft_proj_selector: must be an integer in 0..model.head_layers=3"
        in (last[-1])
    ), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not workdir.exists()


# ----------------------------------------------------------------------------- a run at selector 1

# 4 pretraining steps, then the downstream stage alone at selector 1: 3 epochs of one step (11
# labels at batch 32: the subset repeated), checkpoints at every epoch.
FLAGS = [
    *TINY_FLAGS,
    "--config.pretrain.num_steps=4",
    "--config.downstream.epochs=3",
    "--config.downstream.linear_folds=0",
    "--config.downstream.knn_k=5",
]
SELECTED = [*FLAGS, "--mode=downstream", "--config.downstream.ft_proj_selector=1"]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("selector") / "pre")
    out = run_cli([*FLAGS, "--mode=pretrain", "--workdir", workdir])
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _checkpoint_structure(workdir, run, step):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415

    path = epath.Path(os.path.join(workdir, "checkpoints", run, str(step), "state"))
    return ocp.PyTreeCheckpointHandler().metadata(path).tree


def _downstream(encoder_run, workdir, devices):
    out = run_cli([*SELECTED, f"--config.restore={encoder_run}", "--workdir", workdir], devices)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_selector_1_resumes_bitwise_and_is_the_same_on_1_and_8_devices(encoder_run, tmp_path):
    """One uninterrupted run on 1 device; one stopped in the fine-tuned run and rerun (bitwise
    the same records); one on 8 devices (the same, up to float32 drift)."""
    ref = str(tmp_path / "ref")
    _downstream(encoder_run, ref, devices=1)
    want = _numbers(ref)
    # The classifier keeps head layer 1: its checkpoint holds it, and the report says so.
    for run in ("finetune", "scratch"):
        params = _checkpoint_structure(ref, run, 3)["params"]
        assert set(params) == {"encoder", "proj", "head"} and set(params["proj"]) == {
            "dense1",
            "bn1",
        }
    with open(os.path.join(ref, "report.md")) as f:
        assert "head layer 1 of 3" in f.read()
    phases = {r["phase"] for r in want}
    assert {"finetune", "scratch", "linear", "knn", "linear_random"} <= phases

    # Stopped during the fine-tuned run's step 2, then rerun: the same records, bitwise.
    stopped = str(tmp_path / "stopped")
    flags = [*SELECTED, f"--config.restore={encoder_run}"]
    out = _signalled(stopped, "finetune@2", "SIGTERM", devices=1, flags=flags)
    assert out.returncode == 143 and "at step 2; checkpoint saved" in out.stderr, out.stderr[-3000:]
    _downstream(encoder_run, stopped, devices=1)
    assert _numbers(stopped) == want

    # 8 devices: the same records, up to float32 summation order.
    num_test = next(r["num_test"] for r in want if r["phase"] == "chance")
    other = str(tmp_path / "dev8")
    _downstream(encoder_run, other, devices=8)
    got = _numbers(other)
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        what = f"{b['phase']} step {b['step']}"
        if "loss" in b:  # a classifier's train loss: float32 drift only
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-3, err_msg=what)
        if "test_acc" in b:  # at most one test image flips
            assert abs(a["test_acc"] - b["test_acc"]) <= 1.5 / num_test, what
