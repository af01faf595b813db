"""Compile time of every phase of a run: `python benchmarks/compile_times.py [--config ...]`.

Runs the pipeline in this process (mode all, a fresh workdir) with a jax.monitoring listener
that sums jax's trace, lowering and backend-compile durations by the phase running at the time
(pretraining, each classifier run, the frozen evaluations, the rest), and prints a table.
Run it twice with the same JAX_COMPILATION_CACHE_DIR to see a rerun with a warm persistent
cache (--cache DIR sets it; run.py uses ~/.cache/simclr-jax/xla by default).

  python benchmarks/compile_times.py --cache /tmp/xla_cache --tag cold
  python benchmarks/compile_times.py --cache /tmp/xla_cache --tag warm
"""

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax)

EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/digits_simclr.py")
    p.add_argument("--cache", default="", help="JAX_COMPILATION_CACHE_DIR ('' = off)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--out", default=throughput.RESULTS)
    return p.parse_args(argv)


def instrument(totals: dict, current: list) -> None:
    """Attributes compile events to the phase in current[0]: loop.run sets it to its phase, the
    frozen evaluations to 'frozen evaluations'."""
    import jax

    from simclr_jax.stages import downstream
    from simclr_jax.train import loop

    def listener(event, duration, **kwargs):
        if event in EVENTS:
            totals[current[0]][EVENTS[event]] += duration
            totals[current[0]]["programs"] += event.endswith("backend_compile_duration")

    jax.monitoring.register_event_duration_secs_listener(listener)
    run, frozen = loop.run, downstream.frozen_evaluations

    def run_phase(spec, *args, **kwargs):
        current[0] = spec.phase
        try:
            return run(spec, *args, **kwargs)
        finally:
            current[0] = "other"

    def frozen_phase(*args, **kwargs):
        current[0] = "frozen evaluations"
        try:
            return frozen(*args, **kwargs)
        finally:
            current[0] = "other"

    loop.run, downstream.frozen_evaluations = run_phase, frozen_phase


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = args.cache  # '' = off
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
    from recipe_run import load_config  # noqa: PLC0415 (the same config loading and overrides)

    from simclr_jax.runtime import xla

    xla.cpu_convolutions()  # as run.py
    xla.use_compilation_cache()  # run.py's settings, in --cache
    from simclr_jax.app import main as pipeline

    args.precision, args.data_dir = "float32", ""
    config = load_config(args)
    totals = collections.defaultdict(lambda: collections.Counter())
    current = ["other"]
    instrument(totals, current)
    t0 = time.perf_counter()
    pipeline.run(config, tempfile.mkdtemp(prefix="simclr_compile_"), "all")
    result = {
        "config": args.config,
        "cache": bool(args.cache),
        "wall_s": time.perf_counter() - t0,
        "phases": {k: dict(v) for k, v in totals.items()},
    }
    print_table(result)
    name = f"cpu-compile-{os.path.splitext(os.path.basename(args.config))[0]}"
    throughput.save_json(result, args.out, f"{name}{'-' + args.tag if args.tag else ''}.json")
    return result


def print_table(result: dict) -> None:
    print("| phase | programs compiled | trace s | lower s | compile s |")
    print("|---|---:|---:|---:|---:|")
    total = collections.Counter()
    for phase, t in result["phases"].items():
        total.update(t)
        print(
            f"| {phase} | {t['programs']} | {t['trace']:.1f} | {t['lower']:.1f} | "
            f"{t['compile']:.1f} |"
        )
    print(
        f"| **all** | {total['programs']} | {total['trace']:.1f} | {total['lower']:.1f} | "
        f"{total['compile']:.1f} |"
    )
    print(f"whole run: {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
