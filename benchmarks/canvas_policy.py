"""What the resize-to-canvas policy (images.to_canvas, through images.decode) does to CIFAR-10.

On the first --n CIFAR-10 test images (tfds array_record, read with tfds.data_source):

  passthrough  canvas 32 from the 32x32 images themselves: must be bitwise (max |diff| 0);
  png, jpeg    each image enlarged (bicubic) to a random non-square size, --min-side..--max-side
               px per side with aspect w/h in [0.75, 1.33], stored as PNG (lossless) or JPEG
               (--quality), then decoded back to canvas 32 by images.decode;
  png square   the control: enlarged to a random square size instead (nothing cropped), so its
               error is the enlarge-and-shrink resampling alone.

Reported per row, in 0..255 pixel units (max_diff: the largest |decoded - original| anywhere;
the others averaged over pixels, channels and images):
  err_vs_original  mean |decoded - original|: all losses, including that the canvas holds the
                   centre crop of a stretched image, not the original's whole frame;
  err_vs_centre    mean |decoded - the original's same centre region resized to 32 (bicubic)|:
                   the resampling and codec loss alone, geometry taken out;
  area_kept        the fraction of the original's area inside the canvas (short/long side).
PNG against JPEG separates the codec's loss from the resize's.

  python benchmarks/canvas_policy.py --n 2000
"""

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclr_jax.data import images  # noqa: E402

CANVAS = 32
ASPECT = (0.75, 1.33)


def read_cifar(n: int, data_dir: str) -> np.ndarray:
    """(n, 32, 32, 3) uint8: the first n CIFAR-10 test images."""
    import tensorflow_datasets as tfds

    source = tfds.data_source("cifar10", data_dir=data_dir, download=False)["test"]
    return np.stack([np.asarray(r["image"]) for r in source.__getitems__(list(range(n)))])


def random_size(rng, low: int, high: int, square: bool) -> tuple[int, int]:
    """(w, h), each in [low, high]: equal if `square`, else unequal with w/h in ASPECT."""
    while True:
        w, h = (int(v) for v in rng.integers(low, high + 1, size=2))
        if square:
            return w, w
        if w != h and ASPECT[0] <= w / h <= ASPECT[1]:
            return w, h


def centre_reference(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """The region of the 32x32 `image` that the canvas of its (w, h) enlargement shows, resized
    to the canvas directly: what a lossless, resampling-free pipeline would give."""
    side = CANVAS * min(w, h) / max(w, h)  # the long axis keeps short/long of the original
    left, top = ((CANVAS - side) / 2, 0.0) if w > h else (0.0, (CANVAS - side) / 2)
    box = (left, top, left + (side if w > h else CANVAS), top + (CANVAS if w > h else side))
    return np.asarray(Image.fromarray(image).resize((CANVAS, CANVAS), Image.BICUBIC, box=box))


def round_trip(originals, fmt: str, args, square: bool = False) -> dict:
    """Enlarge, store as `fmt`, decode to the canvas; the errors and the area kept."""
    rng = np.random.default_rng(args.seed)  # the same sizes for every format
    max_diff, err_orig, err_centre, area = 0, [], [], []
    for image in originals:
        w, h = random_size(rng, args.min_side, args.max_side, square)
        buf = io.BytesIO()
        big = Image.fromarray(image).resize((w, h), Image.BICUBIC)
        big.save(buf, fmt, **({"quality": args.quality} if fmt == "JPEG" else {}))
        out = images.decode(buf.getvalue(), CANVAS).astype(np.int16)
        max_diff = max(max_diff, int(np.abs(out - image).max()))
        err_orig.append(np.abs(out - image).mean())
        err_centre.append(np.abs(out - centre_reference(image, w, h)).mean())
        area.append(min(w, h) / max(w, h))
    return {
        "max_diff": max_diff,
        "err_vs_original": np.mean(err_orig),
        "err_vs_centre": np.mean(err_centre),
        "area_kept": f"{np.mean(area):.3f} (min {np.min(area):.3f})",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="CIFAR-10 test images")
    p.add_argument("--data-dir", default="/work/shared/tensorflow_datasets")
    p.add_argument("--min-side", type=int, default=40)
    p.add_argument("--max-side", type=int, default=64)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    originals = read_cifar(args.n, args.data_dir)
    diff = max(
        int(np.abs(images.to_canvas(x, CANVAS).astype(np.int16) - x).max()) for x in originals
    )
    rows = {
        "passthrough": {"max_diff": diff, "err_vs_original": 0.0, "err_vs_centre": 0.0},
        "png square (control)": round_trip(originals, "PNG", args, square=True),
        "png": round_trip(originals, "PNG", args),
        f"jpeg q{args.quality}": round_trip(originals, "JPEG", args),
    }
    print(
        f"{args.n} CIFAR-10 test images, canvas {CANVAS}, enlarged to {args.min_side}..{args.max_side} px"
    )
    print("| case | max_diff | err_vs_original | err_vs_centre | area_kept |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        a, b, c = r["max_diff"], r["err_vs_original"], r["err_vs_centre"]
        print(f"| {name} | {a} | {b:.3f} | {c:.3f} | {r.get('area_kept', '1')} |")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
