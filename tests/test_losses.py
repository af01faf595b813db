"""NT-Xent against a plain float64 NumPy transcription of the formula, on one device and
pmapped over simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from simclr_jax.core.losses import nt_xent, nt_xent_with_metrics

TAU = 0.5


def ref_loss(z1, z2, tau):
    """L = 1/(2N) sum_k [l(k, k+N) + l(k+N, k)], written out with loops in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)  # (2N, D)
    big_n = z1.shape[0]
    z = z / np.linalg.norm(z, axis=1, keepdims=True)

    def sim(i, j):
        return float(np.dot(z[i], z[j]))

    def ell(i, j):
        denom = sum(np.exp(sim(i, m) / tau) for m in range(2 * big_n) if m != i)
        return -np.log(np.exp(sim(i, j) / tau) / denom)

    total = sum(ell(k, k + big_n) + ell(k + big_n, k) for k in range(big_n))
    return total / (2 * big_n)


def ref_acc(z1, z2):
    """Fraction of the 2N rows whose positive beats all other 2N - 2 candidates."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    big_n = z1.shape[0]
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    pos = np.concatenate([np.arange(big_n) + big_n, np.arange(big_n)])
    return float(np.mean(np.argmax(s, axis=1) == pos))


def ref_grad(z1, z2, tau, eps=1e-6):
    """Central finite differences of ref_loss in float64."""
    grads = []
    for which in (0, 1):
        zs = [z1.astype(np.float64), z2.astype(np.float64)]
        g = np.zeros_like(zs[which])
        for idx in np.ndindex(g.shape):
            plus, minus = [z.copy() for z in zs], [z.copy() for z in zs]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            g[idx] = (ref_loss(*plus, tau) - ref_loss(*minus, tau)) / (2 * eps)
        grads.append(g)
    return grads


def _views(seed, big_n, dim):
    """Correlated float32 views from NumPy (jax.random is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(big_n, dim)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(big_n, dim))).astype(np.float32)
    return z1, z2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_value_and_grad_match_numpy(tau):
    z1, z2 = _views(0, 6, 5)
    loss, (g1, g2) = jax.value_and_grad(nt_xent, argnums=(0, 1))(z1, z2, tau)
    np.testing.assert_allclose(loss, ref_loss(z1, z2, tau), rtol=1e-5)
    r1, r2 = ref_grad(z1, z2, tau)
    np.testing.assert_allclose(g1, r1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g2, r2, rtol=1e-4, atol=1e-6)


def test_metrics_single_device():
    z1, z2 = _views(1, 8, 4)
    loss, metrics = nt_xent_with_metrics(z1, z2, TAU)
    np.testing.assert_allclose(metrics["loss"], loss)
    np.testing.assert_allclose(metrics["contrastive_acc"], ref_acc(z1, z2))


def test_contrastive_acc_constructed():
    big_n = 6
    z1 = np.eye(big_n, dtype=np.float32)  # orthogonal, well separated
    _, metrics = nt_xent_with_metrics(z1, z1.copy(), TAU)
    assert float(metrics["contrastive_acc"]) == 1.0
    # Swap the second views of examples 0 and 1: rows of both views of 0 and 1 now find a
    # wrong candidate (similarity 1) above their positive (similarity 0).
    z2 = z1[[1, 0, 2, 3, 4, 5]]
    _, metrics = nt_xent_with_metrics(z1, z2, TAU)
    np.testing.assert_allclose(metrics["contrastive_acc"], (2 * big_n - 4) / (2 * big_n))
    np.testing.assert_allclose(metrics["contrastive_acc"], ref_acc(z1, z2))


def test_temperature_scaling():
    z1 = np.eye(4, dtype=np.float32)
    # Aligned, separated views: a lower temperature sharpens the softmax -> lower loss.
    losses = [float(nt_xent(z1, z1, tau)) for tau in (1.0, 0.5, 0.1)]
    assert losses[0] > losses[1] > losses[2]
    refs = [ref_loss(z1, z1, t) for t in (1.0, 0.5, 0.1)]
    # atol: a loss near 0 is a difference of two O(10) float32 numbers.
    np.testing.assert_allclose(losses, refs, rtol=1e-5, atol=1e-6)
    # Identical projections: all 2N - 1 candidates tie -> log(2N - 1) at any temperature.
    same = np.ones((4, 3), np.float32)
    for tau in (0.05, 1.0):
        np.testing.assert_allclose(nt_xent(same, same, tau), np.log(7), rtol=1e-5)


def test_scale_invariance_bf16_and_zero_rows():
    z1, z2 = _views(2, 6, 8)
    loss = nt_xent(z1, z2, TAU)
    np.testing.assert_allclose(nt_xent(3.0 * z1, 0.2 * z2, TAU), loss, rtol=1e-5)
    bf16 = nt_xent(z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16), TAU)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, loss, rtol=2e-2)
    # A zero projection must not produce NaN in the loss or its gradient.
    z1[0] = 0.0
    loss, grads = jax.value_and_grad(nt_xent, argnums=(0, 1))(z1, z2, TAU)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)


def _num_devices():
    count = jax.device_count()
    return 8 if count >= 8 else (4 if count >= 4 else count)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (simulated) devices")
def test_pmap_matches_single_device():
    ndev, n, dim, tau = _num_devices(), 2, 4, 0.3
    big_n = ndev * n
    # z = x @ w with w shared across devices, so the parameter-gradient convention is tested.
    x1, x2 = _views(3, big_n, dim)
    w = np.random.default_rng(4).normal(size=(dim, dim)).astype(np.float32)

    def loss_fn(w, x1, x2, axis_name):
        return nt_xent_with_metrics(x1 @ w, x2 @ w, tau, axis_name)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
    def step(w, x1, x2):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
        (partial, metrics), (gw, g1, g2) = grad_fn(w, x1, x2, "batch")
        # Parameter gradients: psum of the partials' gradients (not pmean).
        return partial, metrics, lax.psum(gw, "batch"), g1, g2

    shard = lambda a: a.reshape(ndev, n, dim)
    partial, metrics, gw, g1, g2 = step(w, shard(x1), shard(x2))

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
    (ref, ref_metrics), (rw, r1, r2) = grad_fn(w, x1, x2, None)
    np.testing.assert_allclose(ref, ref_loss(x1 @ w, x2 @ w, tau), rtol=1e-5)
    # The partials sum to the global loss; metrics are global on every device.
    np.testing.assert_allclose(partial.sum(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.full(ndev, ref), rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], ref_metrics["contrastive_acc"])
    # Each device's input gradient is already dL/d(its rows) (all_gather's transpose sums).
    np.testing.assert_allclose(g1.reshape(big_n, dim), r1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g2.reshape(big_n, dim), r2, rtol=1e-4, atol=1e-6)
    for d in range(ndev):
        np.testing.assert_allclose(gw[d], rw, rtol=1e-4, atol=1e-6)
