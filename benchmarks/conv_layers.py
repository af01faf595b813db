"""Per-convolution times of ResNet-18 (CIFAR stem): forward, input gradient, filter gradient, and
the GEMM filter gradient of simclr_jax/runtime/cpu_conv.py; optionally an A/B of XLA:CPU's convolution
libraries, arm against arm in alternating processes.

Each of the network's distinct convolutions (at each --widths channel multiplier, as
resnet.ResNet scales them) is jitted alone, run twice, then timed --repeats times (median):

  forward      lax.conv_general_dilated, NHWC / HWIO, as the model calls it;
  input grad   its `jax.vjp` with respect to the input (none for the stem: images need none);
  filter grad  its `jax.vjp` with respect to the filter, as XLA differentiates it;
  gemm grad    cpu_conv.conv_filter_grad, the GEMM filter gradient the model uses on CPU for
               convolutions of at most cpu_conv.NARROW output channels.

Each compiled program is also searched for oneDNN's custom call (`__onednn$convolution`), so the
table says which directions a library takes over. Sums are weighted by how often the layer
occurs in the network. --batch is the views per device: a pretraining step of global batch B on
one device convolves 2B views.

One process, one library (XLA reads XLA_FLAGS once, when it starts): --cpu-convs as run.py
(benchmarks/throughput.py's option). With --arms, this script instead runs itself once per arm
per round, alternating arms (A B A B ...) so that a shared machine's load hits both alike, and
reports each layer's median over the rounds:

  python benchmarks/conv_layers.py --batch 512 --widths 0.125,0.25,0.5,1.0 \\
      --arms default,onednn --rounds 3 --tag ab

writes benchmarks/results/<device>-conv-layers-b<batch>[-<tag>].json and prints markdown tables.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax: the flags go in before jax starts)

from simclr_jax.runtime import xla  # noqa: E402  (imports no jax)

# (input side, in channels, out channels, kernel, stride, occurrences) of ResNet-18, CIFAR stem,
# at width 1; channels other than the images' 3 scale with the width (base 64 -> int(64 * w)).
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
DIRECTIONS = ("forward", "input grad", "filter grad", "gemm grad")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512, help="views per convolution")
    p.add_argument("--widths", default="1.0", help="comma-separated channel multipliers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per program (median)")
    throughput.add_cpu_convs_option(p)
    p.add_argument("--arms", default="", help="comma-separated --cpu-convs values to A/B")
    p.add_argument("--rounds", type=int, default=3, help="with --arms: processes per arm")
    p.add_argument("--json", default="", help="write this process's rows here (used by --arms)")
    p.add_argument("--tag", default="", help="with --arms: suffix of the result file name")
    p.add_argument("--out", default=throughput.RESULTS, help="with --arms: result directory")
    args = p.parse_args(argv)
    args.widths = [float(w) for w in args.widths.split(",") if w]
    args.arms = [a for a in args.arms.split(",") if a]
    bad = set(args.arms) - set(throughput.CPU_CONVS)
    if bad:
        p.error(f"--arms: unknown {sorted(bad)}; valid: {throughput.CPU_CONVS}")
    if len(set(args.arms)) != len(args.arms) or len(args.arms) == 1:
        p.error("--arms: two or more different --cpu-convs values, e.g. default,onednn")
    return args


def scaled(width: float):
    """LAYERS at `width`: (side, cin, cout, k, stride, count)."""
    base = int(64 * width)
    if base < 1:
        raise SystemExit(f"--widths {width}: 64 * width < 1")
    c = lambda ch: ch if ch == 3 else ch // 64 * base  # noqa: E731
    return [(side, c(ci), c(co), k, s, n) for side, ci, co, k, s, n in LAYERS]


def measure(args) -> dict:
    """This process's rows: per width, per layer, ms of each direction and whether oneDNN took it."""
    convs = throughput.set_cpu_convs(args.cpu_convs)
    import jax
    import numpy as np
    from jax import lax

    from simclr_jax.runtime import cpu_conv

    rng = np.random.default_rng(0)

    def bench(f, *a):
        compiled = jax.jit(f).lower(*a).compile()
        throughput.timed(lambda: compiled(*a), 2)  # warm-up
        times = throughput.timed(lambda: compiled(*a), args.repeats)
        return statistics.median(times) * 1e3, xla.ONEDNN_CONV in compiled.as_text()

    def layer(side, cin, cout, k, s):
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

        def gemm_grad(x, g):
            return cpu_conv.conv_filter_grad(x, g, w.shape, (s, s), pad)

        g = rng.random(jax.eval_shape(conv, x, w).shape, np.float32)
        timed = {
            "forward": bench(conv, x, w),
            "filter grad": bench(filter_grad, x, g),
            "gemm grad": bench(gemm_grad, x, g),
        }
        if cin > 3:  # the stem's input gradient is never computed (images need none)
            timed["input grad"] = bench(input_grad, g, w)
        return {
            "ms": {d: timed[d][0] for d in DIRECTIONS if d in timed},
            "onednn": {d: timed[d][1] for d in DIRECTIONS if d in timed},
            "gflop": 2 * g.size * k * k * cin / 1e9,
        }

    rows = []
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} ({convs}), batch {args.batch}")
    for width in args.widths:
        for side, cin, cout, k, s, count in scaled(width):
            row = layer(side, cin, cout, k, s)
            row.update(width=width, layer=f"{k}x{k} {cin}->{cout} /{s} @{side}", count=count)
            rows.append(row)
            cells = "  ".join(
                f"{d} {ms:.1f}{'*' if row['onednn'][d] else ''}" for d, ms in row["ms"].items()
            )
            print(f"w{width:g} {row['layer']} (x{count}): {cells}", flush=True)
    return {
        "cpu_convs": convs,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "device": throughput.device_name(jax),
        "rows": rows,
    }


def run_arms(args) -> dict:
    """Alternating processes, one per arm per round; per layer, the median over the rounds."""
    runs = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in args.arms:
                out = os.path.join(tmp, f"{arm}-{r}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--cpu-convs", arm, "--json", out]
                cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
                cmd += ["--widths", ",".join(f"{w:g}" for w in args.widths)]
                print(f"round {r + 1}/{args.rounds}, {arm}", flush=True)
                subprocess.run(cmd, check=True)
                with open(out) as f:
                    runs[arm].append(json.load(f))
    first = runs[args.arms[0]][0]
    arms = {}
    for arm, procs in runs.items():
        rows = []
        for i, row in enumerate(procs[0]["rows"]):
            samples = {d: [p["rows"][i]["ms"][d] for p in procs] for d in row["ms"]}
            rows.append(
                dict(row, ms={d: statistics.median(v) for d, v in samples.items()}, samples=samples)
            )
        arms[arm] = {
            "cpu_convs": procs[0]["cpu_convs"],
            "xla_flags": procs[0]["xla_flags"],
            "rows": rows,
        }
    return {
        "kind": "conv_layers",
        "device": first["device"],
        "jax": first["jax"],
        "batch": args.batch,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "order": "alternating processes: " + ", ".join(args.arms) + ", ...",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "arms": arms,
    }


def totals(rows, width: float) -> dict:
    """Per direction, ms over the network at `width` (each layer times its occurrences)."""
    out = {}
    for row in rows:
        if row["width"] == width:
            for d, ms in row["ms"].items():
                out[d] = out.get(d, 0.0) + row["count"] * ms
    return out


def tables(result: dict):
    """Markdown: per width, each direction's network total per arm; then, per layer, each arm's
    ms (a '*' where oneDNN's custom call took the direction)."""
    names = list(result["arms"])
    widths = sorted({r["width"] for r in result["arms"][names[0]]["rows"]})
    head = " | ".join(f"{n} ms" for n in names)
    ratio = f" | {names[0]} / {names[1]}" if len(names) == 2 else ""
    yield f"| width | direction | {head}{ratio} |"
    yield "|---:|---|" + "---:|" * (len(names) + bool(ratio))
    for w in widths:
        sums = {n: totals(result["arms"][n]["rows"], w) for n in names}
        for d in DIRECTIONS:
            cells = " | ".join(f"{sums[n][d]:.0f}" for n in names)
            r = f" | {sums[names[0]][d] / sums[names[1]][d]:.2f}" if ratio else ""
            yield f"| {w:g} | {d} | {cells}{r} |"
    yield ""
    cols = " | ".join(f"{d}: {n}" for d in DIRECTIONS for n in names)
    yield f"| width | layer (count) | {cols} |"
    yield "|---:|---|" + "---:|" * (len(DIRECTIONS) * len(names))
    per_arm = [result["arms"][n]["rows"] for n in names]
    for i, row in enumerate(per_arm[0]):
        cells = []
        for d in DIRECTIONS:
            for rows in per_arm:
                r = rows[i]
                cells.append(
                    f"{r['ms'][d]:.1f}{'*' if r['onednn'][d] else ''}" if d in r["ms"] else ""
                )
        yield f"| {row['width']:g} | {row['layer']} (x{row['count']}) | {' | '.join(cells)} |"


def main(argv=None):
    args = parse_args(argv)
    if not args.arms:
        result = measure(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
        for w in args.widths:
            sums = totals(result["rows"], w)
            print(f"w{w:g} network sums, ms: " + ", ".join(f"{d} {v:.0f}" for d, v in sums.items()))
        return result
    result = run_arms(args)
    tag = f"-{args.tag}" if args.tag else ""
    throughput.save_json(
        result, args.out, f"{result['device']}-conv-layers-b{args.batch}{tag}.json"
    )
    print("\n".join(tables(result)))
    return result


if __name__ == "__main__":
    main()
