"""Shapes, parameter counts, BN behaviour, mixed precision and cross-device BN of the
encoder / projection head / classifier. Large models are only traced (jax.eval_shape)."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.app import validate as config_lib
from simclr_jax.core import networks
from simclr_jax.errors import ConfigError


def make_cfg(name="tiny", **overrides):
    fields = dict(name=name, width=1, stem="cifar", head_layers=2, head_hidden_dim=0, proj_dim=128)
    return types.SimpleNamespace(**(fields | overrides))


# Random numbers come from NumPy and the init key is 'unsafe_rbg': on CPU, compiling the
# default (partitionable threefry) generator takes seconds per shape.
INIT_KEY = jax.random.key(0, impl="unsafe_rbg")


def images(batch, size=16, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)


def init(model, x):
    """Jitted init (one compile is faster on CPU than op-by-op dispatch)."""
    return jax.jit(lambda x: model.init(INIT_KEY, x, train=False))(x)


@pytest.fixture(scope="module")
def tiny():
    """The tiny SimCLR model and its variables, initialised once for the module."""
    model = networks.build_model(make_cfg())
    return model, init(model, images(4))


@functools.partial(jax.jit, static_argnames=("model", "train", "method"))
def apply(model, variables, x, train=False, method="__call__"):
    """Jitted apply; in train mode also returns the updated batch_stats."""
    mutable = ["batch_stats"] if train else False
    return model.apply(variables, x, train=train, method=method, mutable=mutable)


def abstract_init(model, batch=2, size=32):
    """Variable shapes without computing anything."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x), x


def count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def test_tiny_forward_shapes(tiny):
    (model, variables), x = tiny, images(4)
    h, z = apply(model, variables, x)
    assert h.shape == (4, networks.build_encoder(make_cfg()).feat_dim) == (4, 16)
    assert z.shape == (4, 128)
    h_only = apply(model, variables, x, method="encode")
    np.testing.assert_allclose(h_only, h)


@pytest.mark.parametrize(
    "name, params, feat", [("resnet18", 11_168_832, 512), ("resnet50", 23_500_352, 2048)]
)
def test_resnet_cifar_shapes_and_param_count(name, params, feat):
    # Counts: torchvision's ResNet without fc, with the 7x7 stem replaced by a 3x3 one.
    cfg = make_cfg(name)
    model = networks.build_model(cfg)
    variables, x = abstract_init(model, batch=2)
    assert count(variables["params"]["encoder"]) == params
    h, z = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert h.shape == (2, feat) and z.shape == (2, 128)
    assert networks.build_encoder(cfg).feat_dim == feat
    # Default head: Dense(feat -> feat) -> BN -> ReLU -> Dense(feat -> 128).
    assert variables["params"]["head"]["dense1"]["kernel"].shape == (feat, feat)
    assert variables["params"]["head"]["dense2"]["kernel"].shape == (feat, 128)


def test_width_and_head_options():
    cfg = make_cfg("resnet50", width=2, head_layers=3, head_hidden_dim=256, proj_dim=64)
    assert networks.build_encoder(cfg).feat_dim == 4096
    variables, x = abstract_init(networks.build_model(cfg))
    head = variables["params"]["head"]
    kernels = [head[f"dense{i}"]["kernel"].shape for i in (1, 2, 3)]
    assert kernels == [(4096, 256), (256, 256), (256, 64)]
    assert "bias" not in head["dense3"] and "bn3" not in head  # z = W3 x: no bias (see the head)
    cfg = make_cfg(head_layers=1, head_bn_output=True)
    head = abstract_init(networks.build_model(cfg))[0]["params"]["head"]
    assert set(head) == {"dense1", "bn1"} and "bias" not in head["dense1"]


@pytest.mark.parametrize("stem, spatial", [("cifar", [32, 16]), ("imagenet", [8, 4])])
def test_stem_downsampling(stem, spatial):
    model = networks.build_model(make_cfg(stem=stem)).encoder
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    fn = lambda v, x: model.apply(v, x, train=False, capture_intermediates=True)
    _, state = jax.eval_shape(fn, variables, x)
    blocks = state["intermediates"]
    sizes = [blocks[f"stage{i}_block1"]["__call__"][0].shape[1] for i in (1, 2)]
    assert sizes == spatial
    kernel = variables["params"]["stem_conv"]["kernel"].shape
    assert kernel[:2] == ((3, 3) if stem == "cifar" else (7, 7))


def test_batch_norm_train_vs_eval(tiny):
    (model, variables), x = tiny, images(6)
    (_, z), updates = apply(model, variables, x, train=True)
    old, new = variables["batch_stats"], updates["batch_stats"]
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old, new)
    assert all(jax.tree.leaves(changed))
    # Train mode normalises with the batch: an example's output depends on its companions.
    (_, z_alone), _ = apply(model, variables, x[:3], train=True)
    assert not np.allclose(z[:3], z_alone, atol=1e-4)
    # Eval mode uses the running averages only: no mutation, no batch dependence.
    _, z_eval = apply(model, variables, x)  # mutable=False: BN must not try to update
    _, z_eval_alone = apply(model, variables, x[:3])
    np.testing.assert_allclose(z_eval[:3], z_eval_alone, rtol=1e-5, atol=1e-6)
    _, z_eval_new = apply(model, {**variables, **updates}, x)
    assert not np.allclose(z_eval, z_eval_new)


def test_classifier_takes_pretrained_encoder(tiny):
    (simclr, pre), x = tiny, images(4)
    clf = networks.build_model(make_cfg(), num_classes=10)
    fresh = abstract_init(clf, size=16)[0]
    for col in ("params", "batch_stats"):
        shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
        assert shapes(pre[col]["encoder"]) == shapes(fresh[col]["encoder"])
    # Copy the pretrained encoder subtree straight in.
    head = jax.tree.map(lambda a: np.full(a.shape, 0.01, a.dtype), fresh["params"]["head"])
    params = {"head": head, "encoder": pre["params"]["encoder"]}
    restored = {"params": params, "batch_stats": {"encoder": pre["batch_stats"]["encoder"]}}
    logits = apply(clf, restored, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    h_clf = apply(clf, restored, x, method="encode")
    h_pre, _ = apply(simclr, pre, x)
    np.testing.assert_allclose(h_clf, h_pre)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
    (model32, variables), x = tiny, images(4)
    model = networks.build_model(make_cfg(), dtype=jnp.bfloat16)
    shapes = abstract_init(model, size=16)[0]
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    (h, z), updates = apply(model, variables, x, train=True)
    assert h.dtype == z.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    h32, _ = apply(model32, variables, x)
    h16 = apply(model, variables, x, method="encode")
    np.testing.assert_allclose(h16, h32, rtol=0.1, atol=0.05)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (simulated) devices")
def test_cross_device_batch_norm_matches_global_batch(tiny):
    ndev = 8 if jax.device_count() >= 8 else min(jax.device_count(), 4)
    (single, variables), per_device = tiny, 2
    x = images(ndev * per_device, seed=1)
    (h, z), upd = apply(single, variables, x, train=True)

    pmodel = networks.build_model(make_cfg(), bn_axis_name="batch")

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0))
    def step(variables, x):
        return pmodel.apply(variables, x, train=True, mutable=["batch_stats"])

    (hp, zp), updp = step(variables, x.reshape(ndev, per_device, *x.shape[1:]))
    np.testing.assert_allclose(hp.reshape(h.shape), h, rtol=1e-5, atol=5e-5)
    # z passes one more BN (batch 16, E[x^2] - E[x]^2 in float32): summation order differs
    # (jax 0.7.2 differs by up to 1.2e-5 on one element of 2048).
    np.testing.assert_allclose(zp.reshape(z.shape), z, rtol=1e-4, atol=5e-5)
    # Every device holds the same, global running statistics.
    for a, b in zip(jax.tree.leaves(updp), jax.tree.leaves(upd), strict=True):
        np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), rtol=1e-5, atol=1e-6)


def test_unknown_names_are_refused_by_the_config_check():
    from configs import digits_simclr

    for key, value, message in (
        ("name", "resnet19", "resnet18"),
        ("name", "vit", "tiny"),
        ("stem", "mnist", "stem"),
    ):
        c = digits_simclr.get_config()
        c.model[key] = value
        with pytest.raises(ConfigError, match=message):
            config_lib.validate(c)
