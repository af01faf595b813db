"""A small image folder in torchvision's ImageFolder layout, written the way real ones arrive.

DIR/train/<class>/*, DIR/test/<class>/* and loose files in DIR/unlabelled/, in the kinds of file
`images.decode` must cope with (RGB and CMYK JPEG, an EXIF-rotated JPEG, grey, RGBA, palette and
16-bit grey PNG) at mixed sizes and aspect ratios, plus a few unreadable files in unlabelled/.
Each class has its own colour and stripe direction under the noise, so a classifier can learn it.
"""

import io
import os

import numpy as np
from PIL import Image

KINDS = ("rgb.jpg", "grey.png", "rgba.png", "palette.png", "cmyk.jpg", "grey16.png", "exif6.jpg")
_COLOURS = np.array(
    [(220, 60, 40), (40, 170, 70), (50, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 200)],
    np.float64,
)
ORIENTATION = 0x0112  # the EXIF tag; 6 = "rotate 90 degrees clockwise to display"


def write_folder(
    root,
    *,
    train_per_class=6,
    test_per_class=3,
    classes=("cat", "dog", "ship"),
    unlabelled=20,
    corrupt=2,
    sizes=((40, 30), (24, 24), (64, 48), (33, 70)),
    seed=0,
) -> dict:
    """Writes the folder under `root` (deterministic given `seed`); returns what it wrote:
    {'classes', 'train', 'test', 'unlabelled' (readable files), 'corrupt' (relative paths)}."""
    rng = np.random.default_rng(seed)
    count = 0  # runs over every file, so each class and split gets every kind and size
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                kind, size = KINDS[count % len(KINDS)], sizes[count % len(sizes)]
                path = os.path.join(root, split, name, f"{i:03d}_{kind}")
                save(path, kind, picture(rng, label, size))
                count += 1
    os.makedirs(os.path.join(root, "unlabelled"), exist_ok=True)
    for i in range(unlabelled):
        kind, size = KINDS[count % len(KINDS)], sizes[count % len(sizes)]
        label = int(rng.integers(len(classes)))
        save(os.path.join(root, "unlabelled", f"{i:03d}_{kind}"), kind, picture(rng, label, size))
        count += 1
    bad = [write_corrupt(root, i, rng) for i in range(corrupt)]
    return {
        "classes": tuple(classes),
        "train": train_per_class * len(classes),
        "test": test_per_class * len(classes),
        "unlabelled": unlabelled,
        "corrupt": bad,
    }


def picture(rng, label: int, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 for size (w, h): the class's colour, striped along a class-specific
    direction (which survives conversion to grey), plus noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    angle = np.pi * label / 5
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * (x * np.cos(angle) + y * np.sin(angle)))
    colour = _COLOURS[label % len(_COLOURS)]
    image = colour * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 10, (h, w, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def save(path: str, kind: str, rgb: np.ndarray) -> None:
    """Writes `rgb` (h, w, 3) uint8 as the file kind named in KINDS."""
    im = Image.fromarray(rgb)
    if kind == "rgb.jpg":
        im.save(path, quality=90)
    elif kind == "grey.png":
        im.convert("L").save(path)
    elif kind == "rgba.png":  # alpha fading left to right: the decoder composites over white
        alpha = np.linspace(255, 64, rgb.shape[1]).astype(np.uint8)
        im.putalpha(Image.fromarray(np.broadcast_to(alpha, rgb.shape[:2]).copy()))
        im.save(path)
    elif kind == "palette.png":  # a GIF-style adaptive palette
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)
    elif kind == "cmyk.jpg":
        im.convert("CMYK").save(path, quality=90)
    elif kind == "grey16.png":
        grey = np.asarray(im.convert("L")).astype(np.uint16) * 257  # 0..255 -> 0..65535
        Image.fromarray(grey).save(path)
    elif kind == "exif6.jpg":  # stored turned a quarter left; the tag turns it upright again
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def write_corrupt(root, i: int, rng) -> str:
    """unlabelled/bad_NNN_*: alternately a JPEG cut in half and random bytes named .png; returns
    the path relative to `root`."""
    if i % 2 == 0:
        buf = io.BytesIO()
        Image.fromarray(picture(rng, 0, (48, 40))).save(buf, "JPEG", quality=90)
        rel, data = f"unlabelled/bad_{i:03d}_truncated.jpg", buf.getvalue()[: buf.tell() // 2]
    else:
        rel, data = f"unlabelled/bad_{i:03d}_random.png", rng.bytes(600)
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)
    return rel
