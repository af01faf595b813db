"""Per-convolution times of ResNet-18 (CIFAR stem): forward, input gradient, filter gradient.

Each of the network's distinct convolutions is jitted alone (forward; `jax.vjp` input gradient;
filter gradient as XLA differentiates it), run twice, then timed 3 times (median); the sums are weighted by how often the layer occurs.
XLA_FLAGS as set (run.py's setting, Eigen's convolutions, is applied unless --cpu-convs ynn):

  python benchmarks/conv_layers.py --batch 128
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclr_jax import xla_env  # noqa: E402  (imports no jax)

# (input side, in channels, out channels, kernel, stride, occurrences) of ResNet-18, CIFAR stem.
LAYERS = [
    (32, 3, 64, 3, 1, 1),
    (32, 64, 64, 3, 1, 4),
    (32, 64, 128, 3, 2, 1),
    (16, 128, 128, 3, 1, 3),
    (32, 64, 128, 1, 2, 1),
    (16, 128, 256, 3, 2, 1),
    (8, 256, 256, 3, 1, 3),
    (16, 128, 256, 1, 2, 1),
    (8, 256, 512, 3, 2, 1),
    (4, 512, 512, 3, 1, 3),
    (8, 256, 512, 1, 2, 1),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="views per convolution")
    p.add_argument("--cpu-convs", default="eigen", choices=("eigen", "ynn"))
    args = p.parse_args(argv)
    os.environ["SIMCLR_JAX_CPU_CONVS"] = args.cpu_convs
    xla_env.prefer_eigen_convolutions()
    import jax
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)

    def bench(f, *a):
        compiled = jax.jit(f).lower(*a).compile()
        for _ in range(2):
            jax.block_until_ready(compiled(*a))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*a))
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    def layer(side, cin, cout, k, s):
        """(ms of forward, input grad, filter grad; GFLOP of one of them)."""
        pad = ((k // 2, k // 2),) * 2
        x = rng.random((args.batch, side, side, cin), np.float32)
        w = rng.random((k, k, cin, cout), np.float32)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

        def conv(x, w):
            return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)

        def input_grad(g, w):
            return jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0]

        def filter_grad(x, g):
            return jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0]

        g = rng.random(jax.eval_shape(conv, x, w).shape, np.float32)
        row = {
            "forward": bench(conv, x, w),
            "input grad": bench(input_grad, g, w) if cin > 3 else 0.0,  # the stem has none
            "filter grad": bench(filter_grad, x, g),
        }
        return row, 2 * g.size * k * k * cin / 1e9

    totals = {}
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, batch {args.batch}, ms (GFLOP/s)")
    for side, cin, cout, k, s, count in LAYERS:
        row, gflop = layer(side, cin, cout, k, s)
        for name, ms in row.items():
            totals[name] = totals.get(name, 0.0) + count * ms
        cells = "  ".join(f"{n} {ms:.0f} ({gflop / ms * 1e3:.0f})" for n, ms in row.items() if ms)
        print(f"{k}x{k} {cin}->{cout} /{s} @{side} (x{count}): {cells}", flush=True)
    print("sum over the network, ms: " + ", ".join(f"{n} {v:.0f}" for n, v in totals.items()))


if __name__ == "__main__":
    main()
