"""Test set-up: 8 simulated CPU devices (set before jax starts) and small shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def n_devices():
    import jax

    return jax.device_count()
