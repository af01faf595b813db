"""Where a pretrain step's time goes: XLA's profile of one step, summed per HLO operation.

Builds the pretrain step as benchmarks/throughput.py does (`pretrain.make_step`, same model,
batch, precision, devices and CPU settings, on its fixed on-device batch), runs it --warmup
times, then traces one step with `jax.profiler.trace` and prints the operations' time from the
trace, by kind (the HLO name without its number: `transpose_copy_fusion`, `convolution`,
`ynn_fusion`, ...) and the single slowest ones, with the step's page faults and CPU time. The
trace (open it in Perfetto or TensorBoard) and the optimized HLO are written under --trace-dir.

On CPU the thunk executor runs independent operations side by side, and a convolution's trace
event may end before its Eigen work does, so the times of different rows overlap and do not add
up to the step; read them as where the work is, not as a partition of the wall time. With several
devices the rows sum over all of them.

  python benchmarks/profile_step.py --model resnet18 --batch 128 --devices 1
  python benchmarks/profile_step.py --model tiny --batch 16 --top 10
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax)


def parse_args(argv=None):
    p = throughput.argument_parser(__doc__.split("\n")[0])
    p.set_defaults(devices=1, warmup=2, malloc="default")
    p.add_argument("--top", type=int, default=15, help="rows of each table")
    p.add_argument("--trace-dir", default="/tmp/simclr_jax_profile", help="trace and HLO")
    return p.parse_args(argv)


def op_times(trace_dir: str) -> dict[str, float]:
    """Seconds per HLO operation in the newest perfetto trace under trace_dir."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            out[op] += e["dur"] * 1e-6
    return dict(out)


def by_kind(times: dict[str, float]) -> dict[str, tuple[float, int]]:
    """{kind: (seconds, count)}, the kind being the HLO name without its '.N' suffix."""
    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for op, sec in times.items():
        k = kinds[re.sub(r"\.\d+$", "", op)]
        k[0] += sec
        k[1] += 1
    return {name: (sec, n) for name, (sec, n) in kinds.items()}


def main(argv=None):
    args = parse_args(argv)
    throughput.prepare_process(args)
    import jax

    from simclr_jax.train import state as train_state

    config = throughput.make_config(args)
    batch, _, aug_key = throughput.device_data(config, args.batch)  # one fixed on-device batch
    key = train_state.seed_key(0, train_state.INIT_KEY)
    p_step, state = throughput.build_step("pretrain", config, key)
    os.makedirs(args.trace_dir, exist_ok=True)
    p_step = p_step.lower(state, batch, aug_key).compile()  # compiled once, its HLO kept
    with open(os.path.join(args.trace_dir, "step.hlo.txt"), "w") as f:
        f.write(p_step.as_text())
    for _ in range(max(args.warmup, 1)):
        state, metrics = p_step(state, batch, aug_key)
        jax.block_until_ready(metrics)

    usage = _usage()
    t0 = time.perf_counter()
    state, metrics = p_step(state, batch, aug_key)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - t0
    usage = {k: v - usage[k] for k, v in _usage().items()}
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        state, metrics = p_step(state, batch, aug_key)
        jax.block_until_ready(metrics)

    times = op_times(args.trace_dir)
    print(
        f"{args.model} batch {args.batch} {args.precision} on {jax.device_count()} device(s): "
        f"untraced step {wall:.2f} s, "
        f"CPU user {usage['user']:.2f} s + system {usage['system']:.2f} s, "
        f"{usage['faults']:.0f} page faults"
    )
    print(f"\n{'kind':<36}{'s':>8}{'ops':>6}")
    for name, (sec, n) in sorted(by_kind(times).items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{name:<36}{sec:>8.3f}{n:>6}")
    print(f"\n{'operation':<36}{'s':>8}")
    for op, sec in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{op:<36}{sec:>8.3f}")
    print(f"\ntrace and optimized HLO (step.hlo.txt) in {args.trace_dir}")
    return times


def _usage() -> dict[str, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "system": r.ru_stime, "faults": r.ru_minflt}


if __name__ == "__main__":
    main()
