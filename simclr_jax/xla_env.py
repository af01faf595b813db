"""XLA settings that must be made before jax starts (imports nothing from jax): Eigen's
convolutions on XLA:CPU, and jax's persistent compilation cache.

XLA:CPU hands convolutions to YNNPACK, whose filter gradient is much slower than Eigen's on the
ResNets here (benchmarks/README.md has the measurements). `prefer_eigen_convolutions` asks for
Eigen's, for this process and the processes it starts, unless XLA_FLAGS already chooses. The flag
is only read by the CPU compiler (harmless with a GPU or TPU) and only set for the jaxlib versions
known to have it: XLA aborts on an unknown flag.
"""

import os
import re
from importlib import metadata

EIGEN_CONVS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
# jaxlib versions whose XLA has the flag (0.10.x measured); extend when a newer one is checked.
EIGEN_CONVS_JAXLIB = ((0, 10), (0, 10))


def jaxlib_version() -> tuple[int, int]:
    try:
        major, minor = re.findall(r"\d+", metadata.version("jaxlib"))[:2]
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)
    return int(major), int(minor)


def prefer_eigen_convolutions(environ=os.environ) -> bool:
    """Adds EIGEN_CONVS to environ['XLA_FLAGS'] where it applies; True if it is set there now.
    SIMCLR_JAX_CPU_CONVS=ynn keeps jaxlib's default."""
    flags = environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return EIGEN_CONVS in flags
    low, high = EIGEN_CONVS_JAXLIB
    if environ.get("SIMCLR_JAX_CPU_CONVS", "eigen") == "ynn" or not (
        low <= jaxlib_version() <= high
    ):
        return False
    environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVS}".strip()
    return True


# jax's persistent compilation cache: a rerun loads its programs instead of compiling them again.
CACHE_DIR = os.path.join("~", ".cache", "simclr-jax", "xla")
CACHE_MIN_COMPILE_S = "0"  # every program is kept (the small ones add up: 75 in the probes)


def use_compilation_cache(environ=os.environ) -> str:
    """Points jax's persistent compilation cache at CACHE_DIR unless JAX_COMPILATION_CACHE_DIR
    is set (set it to '' to turn the cache off); returns the directory in use ('' = off).
    Delete the directory to clear it."""
    if "JAX_COMPILATION_CACHE_DIR" not in environ:
        environ["JAX_COMPILATION_CACHE_DIR"] = os.path.expanduser(CACHE_DIR)
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_S)
    return environ["JAX_COMPILATION_CACHE_DIR"]
