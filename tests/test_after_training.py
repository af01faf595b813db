"""What a user gets from a finished run (one tiny `run.py` run, shared): the encoder in their own
code (`load_encoder`, checked against the model's own `encode`)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import simclr_jax
from simclr_jax import augment, data, encoder, models
from simclr_jax.errors import CheckpointError
from simclr_jax.train_state import compute_dtype, restore_encoder
from tests.helpers import TINY_FLAGS, run_cli

STEPS = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("after") / "run")
    args = [
        *TINY_FLAGS,
        f"--config.pretrain.num_steps={STEPS}",
        "--config.pretrain.knn_every=1",
        "--config.downstream.epochs=2",
        "--config.downstream.linear_epochs=5",
        "--workdir",
        workdir,
    ]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    config = encoder.read_config(workdir)
    return {"workdir": workdir, "out": out, "config": config, "ds": data.load(config.data)}


def _checkpoint_tree(workdir, step=STEPS):
    path = os.path.join(workdir, "checkpoints", "pretrain", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)


# ----------------------------------------------------------------------------- load_encoder


def test_load_encoder_matches_the_models_own_encode(run):
    workdir, config, ds = run["workdir"], run["config"], run["ds"]
    enc = simclr_jax.load_encoder(workdir)  # the workdir: its newest pretraining checkpoint
    assert enc.step == STEPS and enc.source.endswith(os.path.join("checkpoints", "pretrain"))
    images = ds.test_images[:20]  # (20, 32, 32, 3) uint8

    # The model's own encode, with f as downstream restores it.
    f, step = restore_encoder(config, os.path.join(workdir, "checkpoints", "pretrain"))
    model = models.build_model(config.model, dtype=compute_dtype(config))
    x = augment.downstream_batch(None, 0, images, None, train=False, image_size=32)
    variables = {"params": {"encoder": f["params"]}, "batch_stats": {"encoder": f["batch_stats"]}}
    want_h = model.apply(variables, x, train=False, method="encode")
    h = enc(images)
    assert h.shape == want_h.shape == (20, models.build_encoder(config.model).feat_dim)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc(images / 255.0), want_h, rtol=1e-4, atol=1e-5)  # float input
    np.testing.assert_allclose(enc(images, batch_size=7), want_h, rtol=1e-5, atol=1e-6)

    # z, with g from the same checkpoint.
    tree = _checkpoint_tree(workdir)
    full = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    want_h2, want_z = model.apply(full, x, train=False)
    h2, z = enc(images, projection=True)
    np.testing.assert_allclose(h2, want_h2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, enc.variables, full)
    jax.tree.map(np.testing.assert_array_equal, enc.encoder_variables, f)


def test_the_portable_export_is_the_final_state(run):
    workdir = run["workdir"]
    path = os.path.join(workdir, encoder.EXPORT_FILE)
    exported = simclr_jax.load_encoder(path)
    tree = _checkpoint_tree(workdir)
    assert exported.step is None and exported.source == path
    jax.tree.map(np.testing.assert_array_equal, exported.variables, {
        "params": tree["params"], "batch_stats": tree["batch_stats"]
    })  # fmt: skip
    images = run["ds"].test_images[:8]
    from_ckpt = simclr_jax.load_encoder(os.path.join(workdir, "checkpoints", "pretrain"))
    np.testing.assert_array_equal(exported(images), from_ckpt(images))


def test_load_encoder_refuses_a_directory_without_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="holds no pretrained encoder"):
        simclr_jax.load_encoder(str(tmp_path))
