"""The project's pretrain step against a plain PyTorch SimCLR step, in one process (issue #13).

For each --widths value (ResNet-18, CIFAR stem, channel multiplier) it builds

  project  the pretrain step (--precision, float32 by default) exactly as pretrain.run builds it
           (throughput.build_step('pretrain', ...), the CIFAR config via throughput.make_config:
           head_layers 3, LARS, NT-Xent at temperature 0.5; augmentation inside the step);
  PyTorch  benchmarks/torch_reference.make_step: the same network, head, loss and LARS, eager,
           channels_last, views pre-made before timing; on --torch-device, with the tuning a
           PyTorch user adds on a GPU as options (--torch-autocast bfloat16, --torch-compile);

compiles / warms both up, then runs them alternately, --block project steps then --block PyTorch
steps, until each has run --steps, so that both see the same load on a shared machine. Each block
ends before the next begins (block_until_ready; loss.item() for PyTorch), so the two libraries
never run at once; within a block a GPU's queue stays full (--block 1 on the CPU, where a step is
synchronous anyway). It reports the median of each, images/s, the ratio project / PyTorch, and
each one's MFU: the FLOPs of the project's step (XLA's cost analysis, as throughput.py counts
them) over the step time, over the matmul peak in the compute dtype measured in the same run
(throughput.Peak, before and after each width's timed steps).

  python benchmarks/vs_torch.py --widths 0.125,0.25,0.5,1.0 --batch 256 --steps 10 --devices 2
  python benchmarks/vs_torch.py --widths 1.0 --batch 512 --precision bfloat16 --torch-device cuda \
      --torch-autocast bfloat16 --torch-compile --steps 30 --block 10 --peak-size 16384  # one GPU
  python benchmarks/table.py benchmarks/results/cpu-vs-torch-*.json     # the markdown table

Writes benchmarks/results/<device>-vs-torch-<n>dev-b<batch>[-<tag>].json with every sample.
Needs PyTorch (pip install torch==2.13.0, the CPU build; not a dependency of the package).
"""

import argparse
import gc
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax: prepare_process must run before jax starts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="0.125,0.25,0.5,1.0", help="ResNet-18 channel multipliers")
    p.add_argument("--batch", type=int, default=256, help="global batch (source images)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each after compiling")
    p.add_argument("--devices", type=int, default=0, help="XLA:CPU devices (0: as set)")
    p.add_argument("--torch-threads", type=int, default=0, help="0: one per core")
    p.add_argument(
        "--memory-format", default="channels_last", choices=("channels_last", "contiguous")
    )
    p.add_argument("--block", type=int, default=1, help="steps per timed block (ends synced)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--torch-device", default="cpu", help="cpu | cuda | auto (cuda if there is one)")
    p.add_argument(
        "--torch-autocast", default="none", choices=("none", "bfloat16"), help="forward's dtype"
    )
    p.add_argument("--torch-compile", action="store_true", help="torch.compile forward + loss")
    p.add_argument("--torch-compile-mode", default=None, help="torch.compile's mode (default)")
    p.add_argument(
        "--torch-compile-backend",
        default="inductor",
        help="inductor; aot_eager traces only (tests)",
    )
    p.add_argument("--peak-size", type=int, default=2048, help="side of the peak matmul")
    p.add_argument("--malloc", default="hugepages", choices=tuple(throughput.MALLOC))
    throughput.add_cpu_convs_option(p)
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out", default=throughput.RESULTS, help="directory of the JSON result")
    args = p.parse_args(argv)
    args.widths = [float(w) for w in args.widths.split(",") if w]
    if args.steps % args.block:
        p.error(f"--steps {args.steps} is not a multiple of --block {args.block}")
    return args


def torch_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def jax_side(args, width: float, data):
    """(call, FLOPs per step over all devices, compile s, config): the project's pretrain step;
    call(n) runs n steps and waits for the last."""
    import jax

    from simclr_jax.train import state as train_state

    config = throughput.make_config(
        SimpleNamespace(
            precision=args.precision, model="resnet18", width=width, batch=args.batch, image_size=32
        )
    )
    p_step, state = throughput.build_step(
        "pretrain", config, train_state.seed_key(0, train_state.INIT_KEY)
    )
    batch, _, aug_key = data  # throughput.device_data: one fixed on-device batch
    step_args = (batch, aug_key)
    flops = throughput.lowered_flops(p_step, (state, *step_args)) * jax.device_count()
    holder = {"state": state}

    def call(n: int = 1):
        for _ in range(n):
            holder["state"], metrics = p_step(holder["state"], *step_args)
        return jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    call()
    return call, flops, time.perf_counter() - t0, config


def torch_side(args, width: float, config):
    """(call, first step s): torch_reference's step with the same head, loss and optimizer
    settings as `config`, on --torch-device, tuned as the options say; call(n) runs n steps and
    returns the last one's loss (a float: the steps have finished)."""
    import torch
    import torch_reference

    m, pc = config.model, config.pretrain
    assert m.name == "resnet18" and m.stem == "cifar" and m.head_hidden_dim == 0
    assert pc.optimizer == "lars", pc.optimizer
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    step = torch_reference.make_step(
        width,
        args.batch,
        m.head_layers,
        proj_dim=m.proj_dim,
        bn_output=m.head_bn_output,
        temperature=pc.temperature,
        weight_decay=pc.weight_decay,
        momentum=pc.momentum,
        memory_format=fmt,
        device=args.torch_device,
        autocast=None if args.torch_autocast == "none" else getattr(torch, args.torch_autocast),
        compile=args.torch_compile,
        compile_mode=args.torch_compile_mode,
        compile_backend=args.torch_compile_backend,
    )

    def call(n: int = 1) -> float:
        for _ in range(n - 1):
            step(sync=False)
        return step()

    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


def torch_matmul_flops(size: int, reps: int = 3, device: str = "cpu", dtype=None) -> float:
    """Best FLOP/s of a size x size matmul in PyTorch (MKL on the CPU, cuBLAS on a GPU; float32
    unless `dtype`) on random normal data, as throughput.Peak: beside the XLA peak, to show
    whether the two libraries' matmuls differ."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype or torch.float32, generator=generator)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def matmul():
        a @ a
        sync()

    best = min(_seconds(matmul) for _ in range(reps + 1))
    return 2.0 * size**3 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(jax_call, torch_call, steps: int, block: int = 1):
    """Seconds per step of each, in alternating blocks of `block` steps (project block, then
    PyTorch block; each block ends when its last step has finished), `steps` steps of each;
    PyTorch's loss at the end of each block."""
    jax_s, torch_s, losses = [], [], []
    for _ in range(steps // block):
        jax_s.append(_seconds(lambda: jax_call(block)) / block)
        t0 = time.perf_counter()
        losses.append(torch_call(block))
        torch_s.append((time.perf_counter() - t0) / block)
    return jax_s, torch_s, losses


def _side(seconds: list, batch: int, flops: float) -> dict:
    sec = statistics.median(seconds)
    return {
        "ms_per_step": 1e3 * sec,
        "ms_all": [1e3 * s for s in seconds],
        "images_per_s": batch / sec,
        "gflop_per_s": flops / sec / 1e9,  # the project step's FLOPs, for both sides
    }


def run_width(args, width: float, data, peak, torch_peaks: list) -> dict:
    """Builds, warms up and times both steps at one width; returns its row (MFU added later)."""
    import jax
    import torch

    dtype = getattr(torch, args.precision)  # the peaks' dtype: the project's compute dtype

    jax_call, flops, compile_s, config = jax_side(args, width, data)
    torch_call, torch_first_s = torch_side(args, width, config)
    for _ in range(args.warmup):
        jax_call()
        torch_call()
    peak.measure()
    torch_peaks.append(torch_matmul_flops(args.peak_size, device=args.torch_device, dtype=dtype))
    with jax.transfer_guard("disallow"):  # the project's batch lives on the devices
        jax_s, torch_s, losses = interleaved(jax_call, torch_call, args.steps, args.block)
    peak.measure()
    torch_peaks.append(torch_matmul_flops(args.peak_size, device=args.torch_device, dtype=dtype))
    row = {
        "width": width,
        "gflop_per_step": flops / 1e9,
        "jax": _side(jax_s, args.batch, flops),
        "torch": _side(torch_s, args.batch, flops),
        "jax_compile_s": compile_s,
        "torch_first_step_s": torch_first_s,
        "torch_losses": losses,
    }
    row["ratio"] = row["jax"]["images_per_s"] / row["torch"]["images_per_s"]
    print(
        f"width {width:g}: project {row['jax']['ms_per_step']:.0f} ms, PyTorch "
        f"{row['torch']['ms_per_step']:.0f} ms, ratio {row['ratio']:.2f}"
    )
    return row


def main(argv=None):
    args = parse_args(argv)
    throughput.prepare_process(args)  # XLA devices, Eigen convolutions, malloc: before jax
    import torch

    args.torch_device = torch_device(args.torch_device)
    if args.torch_device != "cpu":  # both on one GPU: jax preallocates 75% of its memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    import jax
    import jax.numpy as jnp

    torch.set_num_threads(args.torch_threads or cores())
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} does not split over {n_dev} devices")
    first = throughput.make_config(
        SimpleNamespace(
            precision="float32", model="resnet18", width=1.0, batch=args.batch, image_size=32
        )
    )
    data = throughput.device_data(first, args.batch)  # a random uint8 batch, as throughput.py
    peak = throughput.Peak(args.peak_size, getattr(jnp, args.precision))
    peak.measure()
    # MKL's / OpenMP's / cuBLAS's first-call set-up, untimed
    torch_matmul_flops(
        args.peak_size, device=args.torch_device, dtype=getattr(torch, args.precision)
    )
    torch_peaks, rows = [], []
    for width in args.widths:
        rows.append(run_width(args, width, data, peak, torch_peaks))
        gc.collect()  # the previous width's states and buffers, before the next is built
    peak_flops = statistics.median(peak.samples)
    for row in rows:
        for side in ("jax", "torch"):
            row[side]["mfu"] = row[side]["gflop_per_s"] * 1e9 / peak_flops
    result = describe(args, jax, torch, peak, peak_flops, torch_peaks)
    result["widths"] = rows
    write(result, args)
    print("\n".join(table_rows([result])))
    return result


def describe(args, jax, torch, peak, peak_flops: float, torch_peaks: list) -> dict:
    """The run's settings and the machine's state, written beside the samples."""
    return {
        "kind": "vs_torch",
        "device": throughput.device_name(jax),
        "device_count": jax.device_count(),
        "model": "resnet18",
        "global_batch": args.batch,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "order": f"interleaved: {args.block} project step(s), {args.block} PyTorch step(s), ...",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_device": args.torch_device,
        "torch_device_name": (
            torch.cuda.get_device_name() if args.torch_device == "cuda" else "cpu"
        ),
        "torch_autocast": args.torch_autocast,
        "torch_compile": args.torch_compile,
        "torch_compile_mode": args.torch_compile_mode,
        "torch_compile_backend": args.torch_compile_backend if args.torch_compile else None,
        "torch_cudnn": torch.backends.cudnn.version() if args.torch_device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "torch_memory_format": args.memory_format,
        "torch_mkldnn_enabled": torch.backends.mkldnn.enabled,
        "torch_parallel_info": torch.__config__.parallel_info(),
        "peak_gflop_per_s": peak_flops / 1e9,
        "peak_samples_gflop_per_s": [p / 1e9 for p in peak.samples],
        "torch_matmul_gflop_per_s": [p / 1e9 for p in torch_peaks],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "max_rss_gib": throughput.max_rss_gib(),
        "cpu_convs": args.cpu_convs_in_use,
    }


def write(result: dict, args) -> str:
    tag = f"-{args.tag}" if args.tag else ""
    name = f"{result['device']}-vs-torch-{result['device_count']}dev-b{args.batch}{tag}.json"
    return throughput.save_json(result, args.out, name)


def table_rows(results: list[dict]):
    """Markdown rows, one per (result, width); MFU against the same run's XLA matmul peak."""
    yield (
        "| width | batch | project images/s | PyTorch images/s | ratio | project MFU | PyTorch MFU |"
    )
    yield "|---|---|---|---|---|---|---|"
    for r in results:
        for w in r["widths"]:
            j, t = w["jax"], w["torch"]
            yield (
                f"| {w['width']:g} | {r['global_batch']} | {j['images_per_s']:.1f} | "
                f"{t['images_per_s']:.1f} | {w['ratio']:.2f} | {j['mfu']:.0%} | {t['mfu']:.0%} |"
            )


if __name__ == "__main__":
    main()
