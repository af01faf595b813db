"""What packing CIFAR-10 for the device costs (issue #24): the pack's size beside the device's
64 MiB, its pixel error against the prepared tfds images, and the frozen linear probe and kNN of
trained encoders on packed against raw images, with the spread that says whether it matters.

  python -m simclr_jax.data.pack --tfds cifar10 --data-dir ../shared/tensorflow_datasets \\
      .devdata/cifar10_pack --encoding jpeg --quality 98
  python benchmarks/pack_cost.py --tfds-dir ../shared/tensorflow_datasets \\
      --pack .devdata/cifar10_pack --wheels .whl --candidates-every 6 --encoder WORKDIR ...

Both sides are read through the project's own input path (`data.load`: `data.name=cifar10` on the
tfds copy, `data.name=folder` on the pack, which is what a GPU run reads). For each encoder (a
pretraining workdir, `encoder.load_encoder`) the features of all 50,000 train and 10,000 test
images are taken from each side (`evaluate.frozen_features`), then the linear probe
(`configured_linear_probe`, every train label) and the kNN vote (k=200, T=0.1) on each. The
spread: the bootstrap standard error over the 10,000 test images of each accuracy and of the
paired difference packed - raw (the same test images resampled for both), and, with several
encoders, how far apart the encoders land. `--candidates-every N` also encodes every Nth image
in the other ways considered (PNG, WebP lossless and lossy, JPEG 4:4:4 at several qualities)
and scales their bytes to 60,000 images. Results: results/<tag>.json.
"""

import argparse
import io
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402

MIB = 2**20
DEVICE_CARRY_MIB = 64  # the device tool's limit: working tree + carried paths
JPEG_QUALITIES = (90, 92, 94, 95, 96, 97, 98, 99, 100)
BOOTSTRAP = 2000  # resamples of the test images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tfds-dir", required=True, help="where cifar10 is prepared (tfds)")
    p.add_argument("--pack", required=True, help="the pack (python -m simclr_jax.data.pack --tfds)")
    p.add_argument("--encoder", action="append", default=[], help="a pretraining workdir")
    p.add_argument("--wheels", default="", help="the wheels that travel with it (.whl)")
    p.add_argument("--candidates-every", type=int, default=0, help="0: no candidates")
    p.add_argument("--out", default=throughput.RESULTS)
    p.add_argument("--tag", default="cpu-cifar10-pack-cost")
    return p.parse_args(argv)


def _data_cfg(config, name: str, data_dir: str):
    cfg = config.data.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.name, cfg.data_dir, cfg.cache_gb = name, data_dir, 1.0  # read once, then in memory
    return cfg


def _pixels(ds) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 of train then test, and the labels."""
    from simclr_jax.data import sources

    x = np.concatenate([sources.read_all(ds.train), sources.read_all(ds.test)])
    return x, np.concatenate([ds.train_labels, ds.test_labels])


def pixel_error(a: np.ndarray, b: np.ndarray) -> dict:
    """Grey-level error of b against a (uint8, same shape), in chunks (float64 sums)."""
    abs_sum, sq_sum, worst, same, n = 0.0, 0.0, 0, 0, 0
    for i in range(0, len(a), 4096):
        d = b[i : i + 4096].astype(np.int16) - a[i : i + 4096]
        abs_sum += float(np.abs(d).sum(dtype=np.float64))
        sq_sum += float((d.astype(np.float64) ** 2).sum())
        worst, same, n = max(worst, int(np.abs(d).max())), same + int((d == 0).sum()), n + d.size
    mse = sq_sum / n
    return {
        "images": len(a),
        "mean_abs": abs_sum / n,
        "max_abs": worst,
        "rmse": mse**0.5,
        "psnr_db": None if mse == 0 else float(10 * np.log10(255**2 / mse)),  # None: exact
        "exact_fraction": same / n,
    }


def _encode_other(image: np.ndarray, how: str) -> bytes:
    from PIL import Image

    from simclr_jax.data import pack_format

    if how.startswith("jpeg"):
        return pack_format.encode(image, "jpeg", int(how[len("jpeg-q") :]))
    if how == "png":
        return pack_format.encode(image, "png")
    buf = io.BytesIO()
    if how == "png-9":
        Image.fromarray(image).save(buf, format="PNG", compress_level=9)
    elif how == "webp-lossless":
        Image.fromarray(image).save(buf, format="WEBP", lossless=True)  # method 4
    else:  # webp-qN: lossy (4:2:0, as WebP always is)
        Image.fromarray(image).save(buf, format="WEBP", quality=int(how[len("webp-q") :]))
    return buf.getvalue()


def candidates(raw: np.ndarray, every: int) -> list[dict]:
    """Each way of encoding considered, on every `every`-th image: bytes scaled to all of them,
    and the pixel error after decoding as a run does (`images.decode`)."""
    from simclr_jax.data import images

    sample = raw[::every]
    hows = ["png", "png-9", "webp-lossless", "webp-q90", "webp-q100"]
    rows = []
    for how in hows + [f"jpeg-q{q}" for q in JPEG_QUALITIES]:
        blobs = [_encode_other(im, how) for im in sample]
        back = np.stack([images.decode(b, raw.shape[1]) for b in blobs])
        size = sum(map(len, blobs)) * len(raw) / len(sample)
        rows.append({"encoding": how, "est_mib_all": size / MIB, **pixel_error(sample, back)})
        print(f"{how:14s} {size / MIB:7.1f} MiB  mean abs {rows[-1]['mean_abs']:.3f}", flush=True)
    return rows


def _tree_bytes() -> int:
    """What the working tree adds to a device call: its tracked files' bytes."""
    files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout
    return sum(os.path.getsize(f) for f in files.decode().split("\0") if os.path.isfile(f))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if path else 0


def sizes(args) -> dict:
    pack_b, wheels_b, tree_b = _dir_bytes(args.pack), _dir_bytes(args.wheels), _tree_bytes()
    total = pack_b + wheels_b + tree_b
    return {
        "pack_bytes": pack_b,
        "wheels_bytes": wheels_b,
        "tree_bytes": tree_b,
        "total_mib": total / MIB,
        "margin_mib": DEVICE_CARRY_MIB - total / MIB,
    }


def _paired(correct_raw: np.ndarray, correct_packed: np.ndarray, rng) -> dict:
    """Accuracies, their difference and bootstrap standard errors over the test images."""
    n = len(correct_raw)
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    raw_b, packed_b = correct_raw[idx].mean(1), correct_packed[idx].mean(1)
    return {
        "raw": float(correct_raw.mean()),
        "packed": float(correct_packed.mean()),
        "packed_minus_raw": float(correct_packed.mean() - correct_raw.mean()),
        "se_raw": float(raw_b.std()),
        "se_packed": float(packed_b.std()),
        "se_packed_minus_raw": float((packed_b - raw_b).std()),
        "same_answer": None,
    }


def probe_encoder(workdir: str, sides: dict, rng) -> dict:
    """One encoder's linear probe and kNN on each side ({'raw': Dataset, 'packed': Dataset})."""
    from simclr_jax import pretrained
    from simclr_jax.data import dataset
    from simclr_jax.evaluation import frozen
    from simclr_jax.evaluation import linear_probe as probe

    enc = pretrained.load_encoder(workdir)
    config = dataset.with_stats(
        enc.config, sides["raw"]
    )  # its own stats (fills only a missing one)
    out, preds, dc = {"encoder": workdir, "step": enc.step}, {}, config.downstream
    for side, ds in sides.items():
        every = np.arange(len(ds.train))
        train_x, test_x = frozen.frozen_features(config, ds, every, enc.encoder_variables)
        y, yt, k = ds.train_labels, ds.test_labels, ds.num_classes
        probe = probe.configured_linear_probe(config, train_x, y, test_x, yt, k, predict=True)
        knn = frozen.knn_predictions(train_x, y, test_x, k, dc.knn_k, dc.knn_temperature)
        preds[side] = {"linear": probe["test_pred"], "knn": knn, "labels": yt}
        out[f"{side}_linear_l2"] = probe["l2"]
        print(f"{workdir} {side}: linear {probe['test_acc']:.4f} kNN {np.mean(knn == yt):.4f}")
    raw, packed = preds["raw"], preds["packed"]
    assert np.array_equal(raw["labels"], packed["labels"])  # the same test images, in order
    for what in ("linear", "knn"):
        res = _paired(raw[what] == raw["labels"], packed[what] == raw["labels"], rng)
        res["same_answer"] = float(np.mean(raw[what] == packed[what]))
        out[what] = res
    return out


def main(argv=None):
    args = parse_args(argv)
    from configs import cifar_simclr
    from simclr_jax.data import dataset, pack_format

    base = cifar_simclr.get_config()
    sides = {
        "raw": dataset.load(_data_cfg(base, "cifar10", args.tfds_dir)),
        "packed": dataset.load(_data_cfg(base, "folder", args.pack)),
    }
    raw, labels = _pixels(sides["raw"])
    packed, packed_labels = _pixels(sides["packed"])
    assert np.array_equal(labels, packed_labels), "the pack's labels differ from the tfds copy's"
    result = {"pack": pack_format.read_meta(args.pack), **sizes(args)}
    n = len(sides["raw"].train)
    result["pixel_error"] = pixel_error(raw, packed)
    result["pixel_error_train"], result["pixel_error_test"] = (
        pixel_error(raw[:n], packed[:n]),
        pixel_error(raw[n:], packed[n:]),
    )
    print(f"pack: {result['pack_bytes'] / MIB:.2f} MiB, {result['pixel_error']}", flush=True)
    if args.candidates_every:
        result["candidates_every"] = args.candidates_every
        result["candidates"] = candidates(raw, args.candidates_every)
    del raw, packed
    rng = np.random.default_rng(0)
    result["encoders"] = [probe_encoder(w, sides, rng) for w in args.encoder]
    throughput.save_json(result, args.out, f"{args.tag}.json")


if __name__ == "__main__":
    main()
