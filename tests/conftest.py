"""Test set-up: 8 simulated CPU devices and a persistent XLA compilation cache for this session.

Both go into the environment before jax starts, so the run.py subprocesses that tests launch
inherit them: a config compiled once (in any process) is not compiled again, which keeps the
many short end-to-end runs (resume, kill, bad input) cheap.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="simclr_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
