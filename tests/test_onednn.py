"""oneDNN convolutions on XLA:CPU (simclr_jax/runtime/xla.py): which convolutions run.py asks for per
jaxlib version and SIMCLR_JAX_CPU_CONVS; on jaxlib >= 0.12 with a CPU, with the flags run.py
sets, a convolution compiles to oneDNN's custom call, and one pretraining step of the tiny model
gives the loss, parameters, BatchNorm statistics and optimizer state of jaxlib's default
convolutions within float32 rounding.

XLA reads XLA_FLAGS once, when its backend starts: each variant runs in its own process, with the
flags xla_env.cpu_convolutions chooses (SIMCLR_JAX_CPU_CONVS=default for the reference).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from simclr_jax.runtime import xla
from tests.helpers import REPO

needs_onednn = pytest.mark.skipif(
    xla.jaxlib_version() < xla.ONEDNN_CONVS_JAXLIB or jax.default_backend() != "cpu",
    reason="oneDNN convolutions are chosen on XLA:CPU from jaxlib 0.12 on",
)


def one_step(out: str) -> None:
    """In a fresh process: the compiled HLO of one convolution and of the tiny model's pretraining
    step (built as pretrain.run builds it), and the state after that step, into `out` (.npz)."""
    from jax import lax

    from simclr_jax.data import sources
    from simclr_jax.runtime import parallel
    from simclr_jax.stages import pretrain
    from simclr_jax.train import state as train_state
    from tests.helpers import tiny_config

    x = np.ones((2, 8, 8, 3), np.float32)
    k = np.ones((3, 3, 3, 4), np.float32)
    conv = lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    conv_hlo = jax.jit(conv).lower(x, k).compile().as_text()

    config = tiny_config(**{"pretrain.warmup_epochs": 0.0})  # a non-zero LR at the first step
    p_step, state = pretrain.step_and_initial_state(config, 8, 8)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(
        0, 256, (2 * config.pretrain.batch_size, size, size, 3), dtype=np.uint8
    )
    source = sources.ArraySource(images, np.zeros(len(images), np.int32), "random")
    args = next(pretrain.batches(config, source, 0, 1))
    compiled = p_step.lower(parallel.replicate(state), *args).compile()
    new, metrics = compiled(parallel.replicate(state), *args)
    tree = jax.device_get(train_state.state_tree(parallel.unreplicate(new)))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = {f"leaf{i}": np.asarray(a) for i, (_, a) in enumerate(flat)}
    info = {
        "conv_onednn": xla.ONEDNN_CONV in conv_hlo,
        "step_onednn_convs": compiled.as_text().count(xla.ONEDNN_CONV),
        "flags": os.environ.get("XLA_FLAGS", ""),
        "paths": [jax.tree_util.keystr(p) for p, _ in flat],
    }
    np.savez(out, loss=np.asarray(metrics["loss"])[0], info=json.dumps(info), **leaves)


def _run(convs: str, out: str):
    """one_step in a subprocess on 1 CPU device, with xla_env's flags for SIMCLR_JAX_CPU_CONVS."""
    env = dict(os.environ, SIMCLR_JAX_CPU_CONVS=convs, JAX_COMPILATION_CACHE_DIR="")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    chosen = xla.cpu_convolutions(env)
    code = "import sys; from tests.test_onednn import one_step; one_step(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, out],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        leaves = [f[f"leaf{i}"] for i in range(len(f.files) - 2)]
        return chosen, float(f["loss"]), leaves, json.loads(str(f["info"]))


@pytest.mark.parametrize(
    "version, wanted, chosen",
    [
        ((0, 12), "", "onednn"),
        ((1, 0), "onednn", "onednn"),
        ((0, 12), "default", ""),
        ((0, 12), "ynn", ""),
        ((0, 12), "eigen", ""),  # Eigen's flag is only known to work on jaxlib 0.10
        ((0, 11), "", ""),
        ((0, 10), "", "eigen"),  # as before oneDNN
        ((0, 10), "onednn", ""),
        ((0, 7), "", ""),
    ],
)
def test_cpu_convolutions_per_jaxlib_and_switch(monkeypatch, version, wanted, chosen):
    monkeypatch.setattr(xla, "jaxlib_version", lambda: version)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    if wanted:
        env["SIMCLR_JAX_CPU_CONVS"] = wanted
    assert xla.cpu_convolutions(env) == chosen
    flags = {"onednn": xla.ONEDNN_CONVS, "eigen": xla.EIGEN_CONVS, "": ""}[chosen]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flags}".strip()
    assert xla.cpu_convolutions(env) == chosen  # idempotent
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flags}".strip()


def test_cpu_convolutions_leave_a_choice_in_xla_flags_and_refuse_unknown_values(monkeypatch):
    monkeypatch.setattr(xla, "jaxlib_version", lambda: (0, 12))
    for flags in ("--xla_cpu_use_onednn=false", "--xla_cpu_experimental_ynn_fusion_type=dot"):
        env = {"XLA_FLAGS": flags}
        assert xla.cpu_convolutions(env) == "" and env["XLA_FLAGS"] == flags
    with pytest.raises(ValueError, match="SIMCLR_JAX_CPU_CONVS=onedn: expected one of"):
        xla.cpu_convolutions({"SIMCLR_JAX_CPU_CONVS": "onedn"})


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("onednn")
    return {c: _run(c, str(d / f"{c}.npz")) for c in ("onednn", "default")}


@needs_onednn
def test_onednn_flags_make_convolutions_onednn_custom_calls(variants):
    chosen, _, _, info = variants["onednn"]
    assert chosen == "onednn" and xla.ONEDNN_CONVS in info["flags"]
    assert info["conv_onednn"]
    assert info["step_onednn_convs"] > 0
    chosen, _, _, info = variants["default"]
    assert chosen == "" and "onednn" not in info["flags"]
    assert not info["conv_onednn"] and info["step_onednn_convs"] == 0


@needs_onednn
def test_a_pretraining_step_with_onednn_gives_the_default_numbers(variants):
    """Within float32 rounding: each leaf to 1e-5 of the largest float in its part of the state
    (params, batch_stats, opt_state), whose small gradients (the BN scales') differ relatively more."""
    _, loss, leaves, info = variants["onednn"]
    _, ref_loss, ref_leaves, _ = variants["default"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    parts = [path.split("]")[0] for path in info["paths"]]  # "['params'", ...
    scale = {}
    for part, b in zip(parts, ref_leaves, strict=True):
        if b.size and np.issubdtype(b.dtype, np.floating):
            scale[part] = max(scale.get(part, 0.0), float(np.max(np.abs(b))))
    worst = (0.0, "")
    for path, part, a, b in zip(info["paths"], parts, leaves, ref_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale.get(part, 1.0), err_msg=path)
        if b.size:
            worst = max(worst, (float(np.max(np.abs(a.astype(np.float64) - b))), path))
    print(f"loss {loss!r} vs {ref_loss!r}; largest difference {worst[0]:.3g} at {worst[1]}")
