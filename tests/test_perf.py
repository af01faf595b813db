"""Performance invariants of the training step (issue #5), on simulated CPU devices:

* the data lives on the devices: steady-state pretrain steps run under
  jax.transfer_guard('disallow');
* no retracing / recompilation after the first step;
* the train state's buffers are donated (the old state is deleted by a step);
* bf16 mixed precision: convs in bf16; params, optimizer state, BN statistics, h and the loss
  float32;
* XLA:CPU is asked for Eigen's convolutions only where the flag exists;
* the CPU's GEMM filter gradient (cpu_conv) gives XLA's outputs and gradients;
* the loop fetches metrics from the devices only at log steps.

The pretrain step is built exactly as `pretrain.run` builds it, with the tiny model.
"""

import contextlib
import itertools
import os
import re
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar_simclr
from simclr_jax.core import networks, optim
from simclr_jax.data import sources
from simclr_jax.runtime import cpu_conv, parallel
from simclr_jax.runtime import xla as xla_env
from simclr_jax.runtime.records import MetricWriter
from simclr_jax.stages import pretrain
from simclr_jax.train import loop
from simclr_jax.train import state as train_state
from tests.helpers import REPO

IMAGE_SIZE = 16
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def tiny_config(precision="float32"):
    c = cifar_simclr.get_config()
    c.precision = precision
    c.data.image_size = IMAGE_SIZE
    c.model.name = "tiny"
    c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # random images
    c.pretrain.batch_size = 2 * jax.device_count()
    return c


def build_step(config):
    """(p_step, replicated state, an iterator of the steps' args) as pretrain.run builds them:
    the batches streamed from a source (their transfers are explicit device_puts)."""
    pc = config.pretrain
    schedule = optim.make_schedule(pc, 4, 100)
    model, p_step = pretrain.make_step(config, schedule)
    # 'unsafe_rbg' init key: compiling the threefry initialisers is slow on CPU.
    state = train_state.create_state(
        model, optim.make_optimizer(pc, schedule), jax.random.key(0, impl="unsafe_rbg"), IMAGE_SIZE
    )
    images = np.random.default_rng(0).integers(
        0, 256, (4 * pc.batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )
    source = sources.ArraySource(images, np.zeros(len(images), np.int32), "random")
    return p_step, parallel.replicate(state), pretrain.batches(config, source, 0, 100)


@contextlib.contextmanager
def count_compile_events():
    """Counts jax's trace / lower / backend-compile events inside the block (a persistent
    compilation cache skips backend compiles, not tracing and lowering)."""
    counts = {e: 0 for e in COMPILE_EVENTS}
    active = [True]

    def listener(event, duration, **kwargs):
        if active[0] and event in counts:
            counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        active[0] = False  # jax 0.7.2 has no unregister: the listener stays, inert
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            unregister(listener)


@pytest.fixture(scope="module")
def steady_state():
    """Runs one step (compiles), then 3 steps under transfer_guard('disallow'), recording the
    compile events of each phase and whether each step deleted its input state."""
    p_step, state, args = build_step(tiny_config())
    with count_compile_events() as first:
        state, metrics = p_step(state, *next(args))
        jax.block_until_ready(metrics)
    deleted, losses = [], []
    with count_compile_events() as steady, jax.transfer_guard("disallow"):
        for _ in range(3):
            old = state
            state, metrics = p_step(state, *next(args))
            leaves = jax.tree.leaves((old.params, old.batch_stats, old.opt_state, old.step))
            deleted.append([x.is_deleted() for x in leaves])
            losses.append(metrics["loss"])
        jax.block_until_ready(state)
    return types.SimpleNamespace(
        first=first, steady=steady, deleted=deleted, losses=jax.device_get(losses), state=state
    )


def test_steady_state_steps_run_under_transfer_guard(steady_state):
    # Reaching here means no implicit host<->device transfer raised inside the guard.
    assert np.all(np.isfinite(np.asarray(steady_state.losses)))
    assert int(steady_state.state.step[0]) == 4


def test_no_recompilation_after_first_step(steady_state):
    assert steady_state.first[COMPILE_EVENTS[0]] >= 1  # the counter sees the first compile
    assert steady_state.steady == {e: 0 for e in COMPILE_EVENTS}


def test_train_state_buffers_are_donated(steady_state):
    for step_flags in steady_state.deleted:
        assert step_flags and all(step_flags)


def _conv_types(hlo_text: str) -> list[list[str]]:
    """Element types of (lhs, rhs, out) of each stablehlo.convolution in a lowered module."""
    lines = [ln for ln in hlo_text.splitlines() if "stablehlo.convolution" in ln]
    return [re.findall(r"tensor<[^>]*?x?(bf16|f32|f16)>", ln.rsplit(" : ", 1)[-1]) for ln in lines]


def test_bfloat16_computes_convs_in_bf16_and_keeps_float32_state():
    p_step, state, args = build_step(tiny_config("bfloat16"))
    new_state, metrics = jax.eval_shape(p_step, state, *next(args))
    for tree in (new_state.params, new_state.opt_state, new_state.batch_stats):
        floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {jnp.dtype(jnp.float32)}  # (the optimizer's step count is int32)
    assert metrics["loss"].dtype == jnp.float32
    convs = _conv_types(p_step.lower(state, *next(args)).as_text())
    assert len(convs) >= 6  # forward and input-gradient convs of the 5 convs
    assert all(t == ["bf16", "bf16", "bf16"] for t in convs), convs
    # h comes back float32 even though the convs are bf16.
    model = networks.build_model(tiny_config("bfloat16").model, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), variables)
    h, z = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert h.dtype == z.dtype == jnp.float32


def test_float32_step_has_no_bf16_convs():
    p_step, state, args = build_step(tiny_config("float32"))
    convs = _conv_types(p_step.lower(state, *next(args)).as_text())
    assert convs and all(t == ["f32", "f32", "f32"] for t in convs)


# ----------------------------------------------------------------------------- XLA:CPU


def test_eigen_convolutions_are_asked_for_only_where_they_apply():
    flag = xla_env.EIGEN_CONVS
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    known = (
        xla_env.EIGEN_CONVS_JAXLIB[0] <= xla_env.jaxlib_version() <= xla_env.EIGEN_CONVS_JAXLIB[1]
    )
    assert (xla_env.cpu_convolutions(env) == "eigen") == known
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2")
    assert (flag in env["XLA_FLAGS"]) == known
    assert (xla_env.cpu_convolutions(env) == "eigen") == known  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == int(known)
    chosen = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}  # the user's choice
    assert xla_env.cpu_convolutions(chosen) == ""
    assert chosen["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    opted_out = {"SIMCLR_JAX_CPU_CONVS": "ynn"}
    assert xla_env.cpu_convolutions(opted_out) == "" and "XLA_FLAGS" not in opted_out


# ----------------------------------------------------------------------------- the loop


def test_loop_fetches_metrics_only_at_log_steps(tmp_path, monkeypatch):
    fetches = []
    real_get = jax.device_get
    monkeypatch.setattr(loop.jax, "device_get", lambda x: fetches.append(len(x)) or real_get(x))
    step = jax.jit(lambda s: (s + 1, {"loss": s.astype(jnp.float32)}))
    spec = loop.LoopSpec("pretrain", 10, 100, log_every=4, checkpoint_every=0, images_per_step=1)
    writer = MetricWriter(str(tmp_path), enabled=False)
    loop.run(spec, step, jnp.int32(0), itertools.repeat(()), 0, writer)
    assert fetches == [4, 4, 2]  # steps 4, 8 and the last, each fetching its pending metrics


# ----------------------------------------------------------------------------- CPU convolutions


@pytest.mark.parametrize(
    "kernel, stride, padding, cin, cout, hw, rule",
    [
        (3, 1, ((1, 1), (1, 1)), 5, 7, (10, 12), "narrow"),  # BasicBlock conv (row-shift GEMM)
        (3, 1, ((1, 1), (1, 1)), 5, 7, (4, 6), "narrow"),  # ... on a small map (im2col)
        (3, 2, ((1, 1), (1, 1)), 4, 6, (10, 12), "narrow"),  # strided BasicBlock conv
        (1, 1, ((0, 0), (0, 0)), 6, 5, (10, 12), "narrow"),  # Bottleneck 1x1
        (1, 2, "SAME", 4, 8, (10, 12), "narrow"),  # projection shortcut
        (7, 2, ((3, 3), (3, 3)), 3, 4, (10, 12), "narrow"),  # ImageNet stem
        (3, 1, ((0, 2), (2, 0)), 3, 2, (10, 12), "narrow"),  # asymmetric padding
        (3, 1, ((1, 1), (1, 1)), 4, 40, (6, 6), "narrow"),  # wider than cpu_conv.NARROW: XLA's own
        (3, 1, ((1, 1), (1, 1)), 8, 64, (16, 16), "narrow+large"),  # the jaxlib 0.12 rule's GEMM
        (3, 2, ((1, 1), (1, 1)), 8, 64, (16, 16), "narrow+large"),  # ... too few outputs: XLA's own
    ],
)
def test_gemm_grad_conv_matches_xla(kernel, stride, padding, cin, cout, hw, rule):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *hw, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    numbers = jax.lax.conv_dimension_numbers(x.shape, k.shape, dn)
    xla = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (stride,) * 2, padding, dimension_numbers=dn
    )
    gemm = lambda x, k: cpu_conv.gemm_grad_conv(
        x, k, (stride,) * 2, padding, dimension_numbers=numbers, rule=rule
    )
    y = xla(x, k)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    np.testing.assert_array_equal(jax.jit(gemm)(x, k), y)  # the forward is XLA's conv itself
    vjp = lambda f: jax.jit(lambda x, k, g: jax.vjp(f, x, k)[1](g))(x, k, g)
    (dx_ref, dk_ref), (dx, dk) = vjp(xla), vjp(gemm)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dk_ref).max()))


def test_the_cpu_conv_keeps_the_models_parameters_outputs_and_gradients():
    cfg = types.SimpleNamespace(
        name="tiny", width=1, stem="cifar", head_layers=2, head_hidden_dim=0, proj_dim=16
    )
    plain, fast = (
        networks.build_model(cfg),
        networks.build_model(cfg, conv=cpu_conv.conv_module("cpu")),
    )
    assert cpu_conv.conv_module("gpu") is nn.Conv
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(lambda x: plain.init(jax.random.key(0, impl="unsafe_rbg"), x, train=False))(
        x
    )
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(jax.eval_shape(lambda x: fast.init(jax.random.key(0), x, train=False), x)) == (
        shapes(variables)
    )

    def run(model):
        def loss(params):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            (h, z), _ = model.apply(v, x, train=True, mutable=["batch_stats"])
            return jnp.sum(z * jnp.linspace(-1, 1, z.size).reshape(z.shape)) + jnp.sum(h**2), (h, z)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    ((loss_ref, (h_ref, z_ref)), g_ref), ((loss, (h, z)), g) = run(plain), run(fast)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(z, z_ref)
    assert loss == loss_ref
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_run_py_uses_a_persistent_compilation_cache_unless_told_otherwise():
    env = {}
    assert xla_env.use_compilation_cache(env) == os.path.expanduser(xla_env.CACHE_DIR)
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == xla_env.CACHE_MIN_COMPILE_S
    mine = {"JAX_COMPILATION_CACHE_DIR": "/somewhere"}
    assert xla_env.use_compilation_cache(mine) == "/somewhere"
    off = {"JAX_COMPILATION_CACHE_DIR": ""}
    assert xla_env.use_compilation_cache(off) == ""


def test_gemm_filter_grad_rules_per_layer_and_jaxlib(monkeypatch):
    """Which ResNet-18 convolutions (CIFAR stem, 32 px) get the GEMM filter gradient under each
    rule (cpu_conv's docstring; the measurements in benchmarks/README.md), and which rule a
    jaxlib gets, SIMCLR_JAX_GEMM_FILTER_GRAD overriding it."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import conv_layers

    def picked(rule, width):
        out = set()
        for side, cin, cout, k, s, _ in conv_layers.scaled(width):
            pad = ((k // 2, k // 2),) * 2
            if cpu_conv.uses_gemm(rule, (1, side, side, cin), (k, k, cin, cout), (s, s), pad):
                out.add(f"{k}x{k} {cin}->{cout} /{s} @{side}")
        return out

    shortcuts = {"1x1 64->128 /2 @32", "1x1 128->256 /2 @16", "1x1 256->512 /2 @8"}
    assert picked("narrow+large", 1.0) == shortcuts | {
        "3x3 64->64 /1 @32",
        "3x3 64->128 /2 @32",
        "3x3 128->128 /1 @16",
        "3x3 128->256 /2 @16",
        "3x3 256->256 /1 @8",
    }  # not the stem (3 input channels), nor the 4x4 maps of the last stage
    narrow = {
        "3x3 3->16 /1 @32",
        "3x3 16->16 /1 @32",
        "3x3 16->32 /2 @32",
        "3x3 32->32 /1 @16",
        "1x1 16->32 /2 @32",
    }
    assert picked("narrow", 0.25) == narrow
    assert picked("narrow+large", 0.25) == narrow | {
        "3x3 32->64 /2 @16",  # 32 input channels
        "1x1 32->64 /2 @16",
        "1x1 64->128 /2 @8",
    }
    assert picked("narrow", 1.0) == set()
    assert picked("none", 0.25) == set()

    monkeypatch.delenv(cpu_conv.RULE_ENV, raising=False)
    for version, rule in (((0, 7), "narrow"), ((0, 10), "narrow"), ((0, 12), "narrow+large")):
        monkeypatch.setattr(xla_env, "jaxlib_version", lambda v=version: v)
        assert cpu_conv.default_rule() == rule
    monkeypatch.setenv(cpu_conv.RULE_ENV, "none")
    assert cpu_conv.default_rule() == "none" and cpu_conv.conv_module("cpu") is nn.Conv
    monkeypatch.setenv(cpu_conv.RULE_ENV, "gemm")
    with pytest.raises(ValueError, match="SIMCLR_JAX_GEMM_FILTER_GRAD=gemm: expected one of"):
        cpu_conv.default_rule()
