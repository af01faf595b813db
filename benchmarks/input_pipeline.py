"""The streamed input path, measured (issue #16 item 7). Three parts, each a median of repeats:

  decode   host decode + resize to the canvas, images/s on ONE thread (= per core), at 32, 96 and
           224 px: from JPEG files (sources.FolderSource) and from array_record records holding
           the same JPEG bytes (array_record's reader, what tfds.data_source reads); at 32 px also
           CIFAR-10's own array_record (PNG records, sources.TfdsSource); and from the folder
           packed at the canvas (`python -m simclr_jax.data.pack`, PNG and JPEG; with its packing rate
           on one thread: verify + decode + encode). Plus what it means in
           host cores per accelerator for a step of 20,000 images/s.
  step     the CIFAR-10 pretraining step fed from the in-memory cache against the same step fed
           by decoding array_record at every step (data.cache_gb=0), interleaved block by block
           in one process with one compiled step; the ratio of medians is the overhead.
  rss      peak RSS (ru_maxrss of a child run.py) of a short pretraining run on a folder of 1,000
           JPEGs against one of 10,000, both streamed at a 96 px canvas.

  python benchmarks/input_pipeline.py --parts decode,step,rss --data-dir ../shared/tensorflow_datasets
Results: benchmarks/results/cpu-input-pipeline.json (and a markdown table on stdout).
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax)

SOURCE_SIDE = {32: (40, 32), 96: (128, 96), 224: (500, 375)}  # JPEG sizes: ImageNet's ~500x375


def _photo(rng, w: int, h: int) -> np.ndarray:
    """A smooth random picture with noise (JPEG-compresses like a photograph, not like noise)."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float64)
    return np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_folder(root: str, n: int, size: tuple[int, int], classes: int = 10, seed: int = 0):
    """root/train/c<k>/<i>.jpg and root/test/c<k>/<i>.jpg (a tenth as many), random photographs."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", max(classes, n // 10))):
        for i in range(count):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
                f.write(_jpeg(_photo(rng, *size)))


def _rate(read, n: int, repeats: int, batch: int = 64) -> float:
    """Median images/s of `read(ids)` over `repeats` passes of n images in batches (one thread)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            read(np.arange(start, min(n, start + batch)))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def part_decode(args) -> list[dict]:
    from array_record.python import array_record_data_source, array_record_module

    from simclr_jax.data import folders, images, pack, pack_format, sources

    rows, tmp = [], tempfile.mkdtemp(prefix="input_bench_")
    for canvas, (w, h) in SOURCE_SIDE.items():
        n = args.decode_images
        root = os.path.join(tmp, f"jpeg{canvas}")
        write_jpeg_folder(root, n, (w, h), classes=1)
        split = folders.scan_split(root, "train")
        folder = sources.FolderSource(root, split, canvas)
        rows.append(
            {
                "canvas": canvas,
                "source": f"JPEG files {w}x{h}",
                "images_per_s_per_core": _rate(folder.read, n, args.repeats),
            }  # fmt: skip
        )
        path = os.path.join(tmp, f"jpeg{canvas}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for f in split.files:
            writer.write(open(os.path.join(root, f), "rb").read())
        writer.close()
        records = array_record_data_source.ArrayRecordDataSource([path])

        def read(ids, records=records, canvas=canvas):
            return [images.decode(r, canvas) for r in records.__getitems__(list(map(int, ids)))]

        rows.append(
            {
                "canvas": canvas,
                "source": f"array_record of JPEG {w}x{h}",
                "images_per_s_per_core": _rate(read, n, args.repeats),
            }  # fmt: skip
        )
        for (
            encoding
        ) in pack_format.ENCODINGS:  # the folder packed at the canvas (simclr_jax.data.pack)
            out = os.path.join(tmp, f"pack{canvas}{encoding}")
            t0 = time.perf_counter()
            meta = pack.pack(root, out, canvas, ["train"], encoding, num_threads=1)
            packing = n / (time.perf_counter() - t0)
            packed = sources.PackedSource(out, "train", meta, canvas)
            rows.append(
                {
                    "canvas": canvas,
                    "source": f"pack of {w}x{h}: {encoding}, {canvas}x{canvas}",
                    "images_per_s_per_core": _rate(packed.read, n, args.repeats),
                    "packing_images_per_s_per_core": packing,
                }  # fmt: skip
            )
    if args.data_dir:
        from configs import cifar_simclr
        from simclr_jax.data import dataset

        cfg = cifar_simclr.get_config().data
        cfg.data_dir, cfg.cache_gb = args.data_dir, 0.0
        test = dataset.load(cfg).test
        rows.append(
            {
                "canvas": 32,
                "source": "CIFAR-10 tfds array_record (PNG)",
                "images_per_s_per_core": _rate(test.read, args.decode_images, args.repeats),
            }  # fmt: skip
        )
    for r in rows:
        r["cores_for_20k_per_s"] = 20000.0 / r["images_per_s_per_core"]
    return rows


def part_step(args) -> dict:
    """In-memory vs decoded-each-step CIFAR-10 pretraining steps, interleaved."""
    import jax

    from configs import cifar_cpu
    from simclr_jax.data import dataset
    from simclr_jax.runtime import parallel
    from simclr_jax.stages import pretrain

    config = cifar_cpu.get_config()
    config.data.data_dir = args.data_dir
    config.data.cache_gb = 1.0
    memory = dataset.load(config.data)
    config = dataset.with_stats(config, memory)
    config.data.cache_gb = 0.0
    streamed = dataset.load(config.data)
    spe = len(memory.pretrain) // config.pretrain.batch_size
    p_step, state = pretrain.step_and_initial_state(config, spe, 10 * spe)
    rstate = parallel.replicate(state)
    times = {"memory": [], "stream": []}
    feeds = {
        name: pretrain.batches(config, ds.pretrain, 0, 10 * spe)
        for name, ds in (("memory", memory), ("stream", streamed))
    }
    for name in feeds:  # compile, and fill each feed's prefetch
        rstate, m = p_step(rstate, *next(feeds[name]))
        jax.block_until_ready(m)
    for _ in range(args.blocks):
        for name, feed in feeds.items():
            t0 = time.perf_counter()
            for _ in range(args.block_steps):
                rstate, m = p_step(rstate, *next(feed))
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / args.block_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": config.pretrain.batch_size,
        "image_size": config.data.image_size,
        "model": f"{config.model.name} x{config.model.width}",
        "devices": jax.device_count(),
        "read_threads": config.data.read_threads or min(16, os.cpu_count()),
        "median_step_s": med,
        "overhead": med["stream"] / med["memory"] - 1.0,
        "samples_s": times,
    }


def part_rss(args) -> list[dict]:
    rows, tmp = [], tempfile.mkdtemp(prefix="input_rss_")
    # Each size runs twice and the second is the measurement: the first fills the persistent
    # compilation cache (the LR schedule's length is compiled in, so each size has its own
    # program, and compiling peaks far above reading).
    for n in (1000, 1000, 10000, 10000):
        root = os.path.join(tmp, f"folder{n}")
        write_jpeg_folder(root, n, (128, 96))
        workdir = os.path.join(tmp, f"run{n}")
        cmd = [
            sys.executable, os.path.join(ROOT, "run.py"), "--config", "configs/cifar_simclr.py",
            "--workdir", workdir, "--mode=pretrain", "--config.data.name=folder",
            f"--config.data.data_dir={root}", "--config.data.canvas=96",
            "--config.data.image_size=32", "--config.data.cache_gb=0", "--config.model.name=tiny",
            "--config.pretrain.batch_size=64", f"--config.pretrain.num_steps={args.rss_steps}",
            "--config.pretrain.log_every=10", "--config.data.mean=(0.5,0.5,0.5)",
            "--config.data.std=(0.25,0.25,0.25)",
        ]  # fmt: skip
        # A fresh parent per run: RUSAGE_CHILDREN's peak is then this run's alone.
        probe = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
        )
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", probe, *cmd], cwd=ROOT, capture_output=True,
            text=True,
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        peak_kb = int(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "images": n,
                "canvas": 96,
                "peak_rss_mb": peak_kb / 1024.0,
                "wall_s": time.perf_counter() - t0,
            }  # fmt: skip
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="decode,step,rss")
    p.add_argument("--data-dir", default="", help="tfds data_dir holding cifar10 (decode, step)")
    p.add_argument("--decode-images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=5, help="step: interleaved blocks per path")
    p.add_argument("--block-steps", type=int, default=4)
    p.add_argument("--rss-steps", type=int, default=40)
    p.add_argument("--out", default=throughput.RESULTS)
    p.add_argument("--tag", default="cpu-input-pipeline")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    result = {"command": " ".join(["input_pipeline.py", *sys.argv[1:]]), "cpus": os.cpu_count()}
    if "decode" in parts:
        result["decode"] = part_decode(args)
        print("| canvas | source | images/s per core | cores for 20,000 images/s |")
        print("|---:|---|---:|---:|")
        for r in result["decode"]:
            print(f"| {r['canvas']} | {r['source']} | {r['images_per_s_per_core']:.0f} | "
                  f"{r['cores_for_20k_per_s']:.1f} |")  # fmt: skip
    if "step" in parts:
        result["step"] = part_step(args)
        s = result["step"]
        print(f"step: memory {s['median_step_s']['memory']:.3f} s, streamed "
              f"{s['median_step_s']['stream']:.3f} s, overhead {100 * s['overhead']:+.1f}%")  # fmt: skip
    if "rss" in parts:
        result["rss"] = part_rss(args)
        for r in result["rss"][1::2]:
            print(
                f"rss: {r['images']} images: peak {r['peak_rss_mb']:.0f} MB ({r['wall_s']:.0f} s)"
            )
    throughput.save_json(result, args.out, f"{args.tag}.json")


if __name__ == "__main__":
    main()
