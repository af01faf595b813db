"""XLA settings that must be made before jax starts (imports nothing from jax): the library behind
XLA:CPU's convolutions, and jax's persistent compilation cache.

`cpu_convolutions` picks, for this process and the processes it starts, the convolutions for the
installed jaxlib, unless XLA_FLAGS already chooses:

* jaxlib 0.10: Eigen's (EIGEN_CONVS). XLA:CPU hands convolutions to YNNPACK, whose filter
  gradient is much slower than Eigen's on the ResNets here (benchmarks/README.md has the
  measurements).
* jaxlib >= 0.12: oneDNN's (ONEDNN_CONVS): XLA rewrites the forward and input gradient of narrow
  convolutions (up to 16 channels here) into `__onednn$convolution` custom calls; wider ones and
  every filter gradient stay as they were (benchmarks/conv_layers.py). The ResNet-18 pretraining
  step gets 1.14x faster at width 0.125 and 1.08x at 0.25, and stays as fast at 0.5 and 1.0
  (benchmarks/README.md, "oneDNN convolutions and the GEMM filter gradient on jax 0.12");
  tests/test_onednn.py checks the custom call and that a step gives jaxlib's default numbers
  within float32 rounding. Its cost: jaxlib 0.12.0 cannot write a program holding such a call
  to the persistent compilation cache (jax warns "Error writing persistent compilation cache
  entry ... std::bad_alloc"), so those programs (in the demo: the pretraining step and the BN
  statistics pass) compile again in every run; the demo's wall time comes out even.
* other versions: jaxlib's default.

SIMCLR_JAX_CPU_CONVS overrides the choice: `default` (or `ynn`, its old name) keeps jaxlib's
default, `eigen` / `onednn` ask for that one only where the jaxlib is known to have its flags.
The flags are only read by the CPU compiler (harmless with a GPU or TPU) and only set for the
jaxlib versions known to have them: XLA aborts on an unknown flag.
"""

import os
import re
from importlib import metadata

EIGEN_CONVS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
# jaxlib versions whose XLA has the flag (0.10.x measured); extend when a newer one is checked.
EIGEN_CONVS_JAXLIB = ((0, 10), (0, 10))
# The custom-call flag is the one that brings oneDNN's convolutions (and the cache's warning
# above); the first alone leaves the convolutions as they are.
ONEDNN_CONVS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"
# From this jaxlib on (0.12.0 checked); older ones are left as they are.
ONEDNN_CONVS_JAXLIB = (0, 12)
ONEDNN_CONV = "__onednn$convolution"  # the custom call's target in a compiled program's HLO
# SIMCLR_JAX_CPU_CONVS's values; '' (unset) is the choice above.
CPU_CONVS = ("", "onednn", "eigen", "default", "ynn")


def jaxlib_version() -> tuple[int, int]:
    try:
        major, minor = re.findall(r"\d+", metadata.version("jaxlib"))[:2]
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)
    return int(major), int(minor)


def _chosen_in(flags: str) -> str:
    """The convolutions that XLA_FLAGS already asks for ('' for jaxlib's default)."""
    if EIGEN_CONVS in flags:
        return "eigen"
    return "onednn" if "--xla_cpu_use_onednn=true" in flags else ""


def cpu_convolutions(environ=os.environ) -> str:
    """Adds the flags of this jaxlib's XLA:CPU convolutions (module docstring) to
    environ['XLA_FLAGS'], unless those already set a YNNPACK fusion type or a oneDNN flag;
    returns the convolutions in use: 'onednn', 'eigen', or '' (jaxlib's default)."""
    flags = environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or "onednn" in flags:
        return _chosen_in(flags)
    wanted = environ.get("SIMCLR_JAX_CPU_CONVS", "")
    if wanted not in CPU_CONVS:
        raise ValueError(
            f"SIMCLR_JAX_CPU_CONVS={wanted}: expected one of {', '.join(CPU_CONVS[1:])} (or unset)"
        )
    version = jaxlib_version()
    low, high = EIGEN_CONVS_JAXLIB
    if wanted in ("", "onednn") and version >= ONEDNN_CONVS_JAXLIB:
        chosen, new = "onednn", ONEDNN_CONVS
    elif wanted in ("", "eigen") and low <= version <= high:
        chosen, new = "eigen", EIGEN_CONVS
    else:
        return ""
    environ["XLA_FLAGS"] = f"{flags} {new}".strip()
    return chosen


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
