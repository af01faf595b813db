"""SimCLRv2's fine-tuning from a projection-head layer (downstream.ft_proj_selector): the model's
kept head layers, their copy from pretraining, the frozen features they give, the config's
errors, and -1 (the official code's 'last layer') read as model.head_layers everywhere. A whole
run at selector 1 (resumed after a stop, and on 1 and 8 simulated devices) is
tests/test_transfer.py's first test, which runs the downstream stage at selector 1."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax.app import validate as config_lib
from simclr_jax.core import networks
from simclr_jax.errors import ConfigError
from simclr_jax.report import markdown
from simclr_jax.train import classifier, supervised
from simclr_jax.train import state as train_state
from tests.helpers import TINY_FLAGS, run_cli, tiny_config
from tests.test_models import apply, images, init, make_cfg

LAYERS = 3  # the demo's head depth


@pytest.fixture(scope="module")
def pretrained():
    """A tiny SimCLR model with a 3-layer head, its variables moved off their init (so that a
    copy from the wrong layer or a missing copy shows)."""
    cfg = make_cfg(head_layers=LAYERS, head_hidden_dim=24, proj_dim=16, head_bn_output=True)
    model = networks.build_model(cfg)
    variables = init(model, images(4))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: a + rng.normal(0, 0.1, a.shape).astype(a.dtype), variables)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])  # variances > 0
    return cfg, model, variables


def _classifier_state(cfg, variables, k):
    clf = networks.build_model(cfg, num_classes=10, proj_layers=k)
    start = train_state.start_variables(variables, k)
    state = classifier.initial_state(clf, optax.sgd(0.1), start, 16)
    return clf, {"params": state.params, "batch_stats": state.batch_stats}


def test_selector_0_is_the_classifier_without_head_layers(pretrained):
    cfg, model, variables = pretrained
    clf, state = _classifier_state(cfg, variables, 0)
    plain = networks.Classifier(encoder=networks.build_encoder(cfg), num_classes=10)
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


@pytest.mark.parametrize(
    "k, layers, want",
    [
        (-2, 3, r"must be >= -1 \(-1 = model\.head_layers\), got -2"),
        (4, 3, r"must be an integer in -1\.\.model\.head_layers=3 .*got 4"),
        (2, 1, r"must be an integer in -1\.\.model\.head_layers=1 .*got 2"),
    ],
)
def test_a_bad_selector_is_a_config_error_naming_the_key(k, layers, want):
    config = tiny_config(**{"downstream.ft_proj_selector": k, "model.head_layers": layers})
    with pytest.raises(ConfigError, match=rf"config\.downstream\.ft_proj_selector: {want}"):
        config_lib.validate(config)
    for ok in (layers, -1):  # z, and -1, the official code's 'last layer': allowed
        config.downstream.ft_proj_selector = ok
        config_lib.validate(config)


def test_selector_minus_one_is_the_last_head_layer_everywhere():
    """-1 reads as model.head_layers in what the stage reads (config.ft_proj_selector: the
    classifier's kept layers, the probes' features, load_encoder's default layer), in the runs'
    checkpoint metadata (the same run as at 3) and in the report."""
    last, minus_one = (tiny_config(**{"downstream.ft_proj_selector": k}) for k in (3, -1))
    assert networks.ft_proj_selector(minus_one) == networks.ft_proj_selector(last) == 3
    assert classifier.build_model(minus_one, 10).proj_layers == 3
    assert supervised.run_meta(minus_one, "finetune", 1, None) == supervised.run_meta(
        last, "finetune", 1, None
    )
    line = markdown.features_line(json.loads(minus_one.to_json()))
    assert line.startswith("Features (frozen rows and classifiers' input): head layer 3 of 3 (z; ")
    assert "downstream.ft_proj_selector=-1)" in line


def test_a_bad_selector_on_the_command_line_is_one_line_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    bad = "--config.downstream.ft_proj_selector=4"
    out = run_cli([*TINY_FLAGS, bad, "--workdir", str(workdir)], timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert (
        "config.downstream.ft_proj_selector: must be an integer in -1..model.head_layers=3"
        in (last[-1])
    ), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not workdir.exists()
