"""Throughput of the SimCLR steps: augmentation, pretrain step, downstream classifier step.

For a given model, global batch, precision and device count it times (median of --steps runs
after --warmup, each ended by block_until_ready):

  augment         making the two views of a batch (the first lines of pretrain_step);
  pretrain        the full pretrain step, built as `pretrain.run` builds it (pmapped over
                  parallel.AXIS, train state donated), run under jax.transfer_guard('disallow');
  pretrain_probe  the same step with the online linear head (pretrain.online_probe) training
                  beside the encoder (not among the default parts: --parts pretrain,pretrain_probe
                  gives its cost per step, the ratio of the two);
  classifier      the downstream classifier step (`classifier.classifier_step`), built the same way;

each on one fixed batch made on the devices beforehand (`device_data`: this process's rows of a
global batch, as `pretrain.batches` streams them), so that the step alone is timed, not the
reading of its batches. Every part is compiled and warmed up first, then the parts are timed in
turn, one call each per round (so that the load of a shared machine hits them alike, and two
parts compare call by call). It reports ms/step, images/s and model FLOP utilisation (MFU): the
step's FLOPs from XLA's cost analysis, over the step time, over the machine's peak measured in
the same run (the best of a large matmul, in the same precision, jitted on one device and pmapped
over all of them; measured before and after the timed rounds).

Writes benchmarks/results/<device>-<n>dev-<model>[-w<width>]-b<batch>-<precision>[-<tag>].json
and prints a short table. On CPU, --devices sets XLA_FLAGS=--xla_force_host_platform_device_count
before jax starts (one device per core runs the cores' convolutions side by side), XLA:CPU's
convolutions are the ones run.py picks for the installed jaxlib (--cpu-convs), and glibc's
malloc is told to back large buffers with transparent huge pages (--malloc, GLIBC_TUNABLES, by
re-executing this script): XLA:CPU allocates its temporaries afresh every step and faults them in
again (535,000 4 KiB pages a step at batch 128).

  python benchmarks/throughput.py --model resnet18 --batch 256 --precision float32 --devices 2
  python benchmarks/throughput.py --model tiny --batch 64 --steps 3 --parts pretrain
  python benchmarks/throughput.py --model resnet18 --width 0.125 --image-size 16 --batch 256 \
      --devices 2 --parts pretrain,pretrain_probe --steps 20     # the digits config's step
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclr_jax.runtime import xla  # noqa: E402  (imports no jax: flags go in before jax starts)

# glibc malloc settings (GLIBC_TUNABLES, read when a process starts). 'retain': one arena that
# never maps nor trims, so freed memory is reused (no page faults per step; see docs/performance.md).
MALLOC = {
    "hugepages": "glibc.malloc.hugetlb=1",
    "retain": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=68719476736",
    "default": "",
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PARTS = ("augment", "pretrain", "pretrain_probe", "classifier")
DEFAULT_PARTS = ("augment", "pretrain", "classifier")


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options that choose and set up the step (shared with benchmarks/profile_step.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="resnet18", help="resnet18 | resnet34 | resnet50 | tiny")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    p.add_argument("--batch", type=int, default=256, help="global batch (source images)")
    p.add_argument("--image-size", type=int, default=32, help="side of the views (data.image_size)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--devices", type=int, default=0, help="CPU: simulated devices (0: as set)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after compilation")
    p.add_argument(
        "--malloc",
        default="hugepages",
        choices=tuple(MALLOC),
        help="glibc malloc: hugepages (THP for large blocks), retain (keep freed memory), default",
    )
    add_cpu_convs_option(p)
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    return p


# --cpu-convs: 'auto' is run.py's choice for the installed jaxlib (xla_env.cpu_convolutions:
# oneDNN's on jaxlib >= 0.12, Eigen's on 0.10); the others are SIMCLR_JAX_CPU_CONVS's values.
CPU_CONVS = ("auto", "onednn", "eigen", "default", "ynn")


def add_cpu_convs_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-convs",
        default="auto",
        choices=CPU_CONVS,
        help="XLA:CPU convolutions: auto (run.py's choice for this jaxlib), onednn, eigen, "
        "default (jaxlib's own; ynn is its old name); one not available on this jaxlib is an error",
    )


def set_cpu_convs(name: str, environ=os.environ) -> str:
    """Sets SIMCLR_JAX_CPU_CONVS for `name` and XLA_FLAGS as run.py would (before jax starts);
    the convolutions in use ('onednn', 'eigen' or 'default'). Asking for oneDNN or Eigen where
    this jaxlib has no flag for them is a SystemExit, not a silent fall-back to the default."""
    environ["SIMCLR_JAX_CPU_CONVS"] = "" if name == "auto" else name
    chosen = xla.cpu_convolutions(environ) or "default"
    if name in ("onednn", "eigen") and chosen != name:
        raise SystemExit(
            f"--cpu-convs {name}: not available on jaxlib {xla.jaxlib_version()} "
            f"(this one gives {chosen}); use --cpu-convs default or auto"
        )
    return chosen


def parse_args(argv=None):
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed runs per part (median)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated of {PARTS}")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the peak matmul")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out", default=RESULTS, help="directory of the JSON result")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; valid: {PARTS}")
    return args


def prepare_process(args) -> None:
    """Environment that must be set before jax starts (re-executes once for GLIBC_TUNABLES)."""
    want, old = MALLOC[args.malloc], os.environ.get("GLIBC_TUNABLES", "")
    if want and want not in old and sys.platform.startswith("linux"):
        os.environ["GLIBC_TUNABLES"] = f"{old}:{want}" if old else want
        os.execv(sys.executable, [sys.executable, *sys.argv])
    flags = os.environ.get("XLA_FLAGS", "")
    if args.devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
        flags += f" --xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{flags} {args.xla_flags}".strip()
    args.cpu_convs_in_use = set_cpu_convs(args.cpu_convs)  # as run.py unless told otherwise


def timed(fn, steps: int) -> list[float]:
    """Seconds of `steps` calls of fn(), each ended by block_until_ready."""
    import jax

    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- the parts


def make_config(args):
    from configs import cifar_simclr

    c = cifar_simclr.get_config()
    c.precision = args.precision
    c.model.name = args.model
    c.model.width = args.width
    c.data.image_size = getattr(args, "image_size", 32)  # profile_step, vs_torch: CIFAR's 32
    c.data.mean, c.data.std = (0.5,) * 3, (0.29,) * 3  # of the random uint8 images
    c.pretrain.batch_size = args.batch
    c.downstream.batch_size = args.batch
    return c


class Peak:
    """A large matmul in the compute dtype: jitted on one device, and pmapped over all. Its
    operands are random normal: constant operands run faster than data (a bf16 matmul on an H200
    ran 13% faster on zeros, the device tool's notes), which would overstate the peak and
    understate every MFU."""

    def __init__(self, size: int, dtype):
        import jax

        n = jax.local_device_count()
        key = jax.random.key(0)
        a = jax.random.normal(key, (size, size), dtype)
        self.flops = 2.0 * size**3
        self.single = (jax.jit(lambda a: a @ a), a)
        self.multi = (jax.pmap(lambda a: a @ a), jax.random.normal(key, (n, size, size), dtype))
        self.n = n
        self.samples: list[float] = []  # FLOP/s
        self.measure(reps=1)  # compile and warm up

    def measure(self, reps: int = 3) -> float:
        one = min(timed(lambda: self.single[0](self.single[1]), reps))
        best = self.flops / one
        if self.n > 1:
            all_ = min(timed(lambda: self.multi[0](self.multi[1]), reps))
            best = max(best, self.n * self.flops / all_)
        self.samples.append(best)
        return best


def lowered_flops(fn, call_args) -> float:
    """FLOPs per device of fn(*call_args), from XLA's cost analysis of the lowered program
    (lowering only where jax can: compiling here would compile the step a second time)."""
    lowered = fn.lower(*call_args)
    analysis = lowered.cost_analysis()
    if analysis is None:  # older jax (0.7) analyses only compiled programs
        analysis = lowered.compile().cost_analysis()
    return _flops(analysis)


def _flops(analysis) -> float:
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def device_data(config, batch: int):
    """(pretrain batch, classifier batch, aug_key) on the local devices, as `pretrain.batches`
    delivers a step's input: this process's rows of step 0's global batch (`stream.Order` over 4
    batches' worth of random uint8 images and labels, read by `stream.Reader`), sharded over the
    local devices. The pretrain batch is {'images': (L, n, S, S, 3) uint8, 'ids': (L, n) int32},
    the classifier's adds 'labels' (L, n) int32; the augmentation key is replicated."""
    import jax
    import numpy as np

    from simclr_jax.data import sources, stream
    from simclr_jax.runtime import parallel
    from simclr_jax.train import state as train_state

    rng = np.random.default_rng(0)
    size = config.data.image_size
    images = rng.integers(0, 256, (4 * batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (4 * batch,), dtype=np.int32)
    source = sources.ArraySource(images, labels, "random")
    order = stream.Order(train_state.seed_key(0, train_state.DATA_KEY), len(source), batch)
    rows = jax.tree.map(parallel.shard, stream.Reader(source, labels=True)(order.local(0)))
    pretrain_batch = {k: rows[k] for k in ("images", "ids")}
    aug_key = parallel.replicate(train_state.seed_key(0, train_state.AUGMENT_KEY))
    return pretrain_batch, rows, aug_key


def build_step(part: str, config, state_key=None):
    """(p_step, replicated state) of the 'pretrain', 'pretrain_probe' (with the online linear
    head, 10 classes) or 'classifier' part, built exactly as pretrain.run / downstream.compare
    build them (no state without a key)."""
    from simclr_jax.core import optim
    from simclr_jax.runtime import parallel
    from simclr_jax.stages import pretrain
    from simclr_jax.train import classifier
    from simclr_jax.train import state as train_state

    pretraining = part.startswith("pretrain")
    section = config.pretrain if pretraining else config.downstream
    schedule = optim.make_schedule(section, 100, 1000)
    if pretraining:
        model, p_step = pretrain.make_step(config, schedule)
    else:
        model, p_step = classifier.make_classifier_step(config, schedule, num_classes=10)
    state = None
    if state_key is not None:
        tx = optim.make_optimizer(section, schedule)
        state = train_state.create_state(model, tx, state_key, config.data.image_size)
        if part == "pretrain_probe":
            state = state.replace(probe=pretrain.probe_state(config, schedule, 10))
        state = parallel.replicate(state)
    return p_step, state


def build_augment(config):
    """pmapped (batch, aug_key, step) -> two views, the first lines of pretrain_step."""
    import jax

    from simclr_jax.core import augment
    from simclr_jax.runtime import parallel

    aug_cfg = augment.spec_from_config(config)

    def views(batch, aug_key, step):
        return augment.two_views(aug_key, step, batch["images"], batch["ids"], aug_cfg)

    return jax.pmap(views, axis_name=parallel.AXIS)


def prepare_part(name, args, config, data) -> dict:
    """Builds, compiles and warms up one part: {'call': one timed call, 'flops': per device,
    'compile_s'}."""
    import jax
    import jax.numpy as jnp

    from simclr_jax.runtime import parallel
    from simclr_jax.train import state as train_state

    pretrain_batch, labelled_batch, aug_key = data
    key = train_state.seed_key(0, train_state.INIT_KEY)
    t0 = time.perf_counter()
    if name == "augment":
        fn = build_augment(config)
        step = parallel.replicate(jnp.int32(0))
        call_args = (pretrain_batch, aug_key, step)
        flops = lowered_flops(fn, call_args)
        call = lambda: fn(*call_args)  # noqa: E731
    else:
        p_step, state = build_step(name, config, key)
        batch = pretrain_batch if name == "pretrain" else labelled_batch  # the head reads labels
        step_args = (batch, aug_key)
        flops = lowered_flops(p_step, (state, *step_args))
        holder = {"state": state}

        def call():
            holder["state"], metrics = p_step(holder["state"], *step_args)
            return metrics

    jax.block_until_ready(call())  # compile
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(call())
    return {"call": call, "flops": flops, "compile_s": compile_s}


def time_parts(prepared: dict, args, peak) -> dict[str, dict[str, list[float]]]:
    """Seconds of each part's calls, timed in turn (round-robin, `args.steps` rounds), the
    machine's peak measured before and after: {part: {'wall': [...], 'cpu': [...]}}. 'cpu' is
    this process's CPU time over the call (all its threads): the work done, which other
    processes on a shared machine slow far less than the wall time."""
    import jax

    times = {name: {"wall": [], "cpu": []} for name in prepared}
    peak.measure()
    with jax.transfer_guard("disallow"):  # the batch lives on the devices: no copies per step
        for _ in range(args.steps):
            for name, part in prepared.items():
                cpu = time.process_time()
                times[name]["wall"] += timed(part["call"], 1)
                times[name]["cpu"].append(time.process_time() - cpu)
    peak.measure()
    return times


def part_row(name: str, part: dict, times: dict[str, list[float]], args) -> dict:
    import jax

    sec = statistics.median(times["wall"])
    total = part["flops"] * jax.device_count()
    return {
        "part": name,
        "ms_per_step": 1e3 * sec,
        "ms_all": [1e3 * t for t in times["wall"]],
        "cpu_ms_per_step": 1e3 * statistics.median(times["cpu"]),
        "cpu_ms_all": [1e3 * t for t in times["cpu"]],
        "images_per_s": args.batch / sec,
        "gflop_per_step": total / 1e9,
        "gflop_per_s": total / sec / 1e9,
        "compile_s": part["compile_s"],
    }


def probe_cost(times: dict) -> dict | None:
    """The online linear head's cost per step, where both pretrain parts ran, in wall and in CPU
    time: the ratio of their medians and the median of the rounds' ratios (the two calls of a
    round ran back to back)."""
    if "pretrain" not in times or "pretrain_probe" not in times:
        return None
    out = {}
    for clock in ("wall", "cpu"):
        on, off = times["pretrain_probe"][clock], times["pretrain"][clock]
        out[clock] = {
            "ratio_of_medians": statistics.median(on) / statistics.median(off),
            "median_round_ratio": statistics.median(a / b for a, b in zip(on, off, strict=True)),
            "ms_per_step_added": 1e3 * (statistics.median(on) - statistics.median(off)),
        }
    return out


def max_rss_gib() -> float | None:
    """Peak resident memory of this process (host memory: the CPU backend's buffers)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(jax) -> str:
    dev = jax.devices()[0]
    kind = "cpu" if dev.platform == "cpu" else dev.device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def main(argv=None):
    args = parse_args(argv)
    prepare_process(args)
    import jax

    from simclr_jax.train import state as train_state

    config = make_config(args)
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} does not split over {n_dev} devices")
    data = device_data(config, args.batch)

    peak = Peak(args.peak_size, train_state.compute_dtype(config))
    peak.measure()
    prepared = {}
    for name in args.parts:
        prepared[name] = prepare_part(name, args, config, data)
        print(f"{name}: compiled in {prepared[name]['compile_s']:.0f} s")
    times = time_parts(prepared, args, peak)
    rows = [part_row(name, prepared[name], times[name], args) for name in args.parts]
    peak_flops = statistics.median(peak.samples)
    for row in rows:
        row["mfu"] = row["gflop_per_s"] * 1e9 / peak_flops
    by_name = {r["part"]: r for r in rows}
    result = {
        "device": device_name(jax),
        "device_count": n_dev,
        "model": args.model,
        "width": args.width,
        "image_size": args.image_size,
        "global_batch": args.batch,
        "precision": args.precision,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_convs": args.cpu_convs_in_use,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax": jax.__version__,
        "steps": args.steps,
        "peak_gflop_per_s": peak_flops / 1e9,
        "peak_samples_gflop_per_s": [p / 1e9 for p in peak.samples],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "max_rss_gib": max_rss_gib(),
        "parts": rows,
    }
    if "augment" in by_name and "pretrain" in by_name:
        result["augment_share_of_pretrain"] = (
            by_name["augment"]["ms_per_step"] / by_name["pretrain"]["ms_per_step"]
        )
    if probe_cost(times):
        result["online_probe_cost"] = probe_cost(times)
    write(result, args)
    print_table(result)
    return result


def write(result: dict, args) -> str:
    width = "" if args.width == 1 else f"-w{args.width:g}"
    size = "" if args.image_size == 32 else f"-{args.image_size}px"
    tag = f"-{args.tag}" if args.tag else ""
    name = (
        f"{result['device']}-{result['device_count']}dev-{args.model}{width}{size}-b{args.batch}-"
        f"{args.precision}{tag}.json"
    )
    return save_json(result, args.out, name)


def save_json(result: dict, out: str, name: str) -> str:
    """Writes `result` to out/name (the directory made if need be), says where; the path. Every
    benchmark script's results JSON goes through here."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return path


def print_table(result: dict) -> None:
    print(
        f"\n{result['device']} x{result['device_count']}  {result['model']} w{result['width']:g}  "
        f"batch {result['global_batch']}  {result['precision']}  "
        f"peak {result['peak_gflop_per_s']:.0f} GFLOP/s"
    )
    print(f"{'part':<11}{'ms/step':>10}{'images/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>9}{'MFU':>7}")
    for r in result["parts"]:
        print(
            f"{r['part']:<11}{r['ms_per_step']:>10.1f}{r['images_per_s']:>10.1f}"
            f"{r['gflop_per_step']:>12.1f}{r['gflop_per_s']:>9.1f}{r['mfu']:>7.1%}"
        )
    if "augment_share_of_pretrain" in result:
        print(f"augmentation / pretrain step: {result['augment_share_of_pretrain']:.1%}")
    for clock, cost in (result.get("online_probe_cost") or {}).items():
        print(
            f"online linear head, {clock} time: pretrain_probe / pretrain "
            f"{cost['ratio_of_medians']:.4f} (medians), {cost['median_round_ratio']:.4f} (median "
            f"of the rounds' ratios), {cost['ms_per_step_added']:+.1f} ms/step"
        )


if __name__ == "__main__":
    main()
