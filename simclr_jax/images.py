"""Image files as the encoder's uint8 canvas: decoding real-world files, and the ImageFolder layout.

Owns three things, all on the host and free of jax:

* `to_canvas`: any (H, W, 3) uint8 image -> the square (canvas, canvas, 3) the encoder reads
  (shorter side resized to the canvas, longer side centre-cropped; a canvas-sized image as is);
* `decode`: one file (path or bytes) -> that canvas, whatever Pillow mode it opens in (grey,
  palette, alpha, CMYK, 16-bit, float, EXIF-rotated); anything unreadable raises `BadImage`;
* `scan_split` / `verify`: torchvision's ImageFolder layout (DIR/<split>/<class>/..., or loose
  files for an unlabelled split) as a deterministic file list with labels, and one decoding pass
  that drops the files that will not decode, naming them once.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import logging
import os

import numpy as np
from PIL import Image, ImageOps

from simclr_jax.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
# The Pillow formats those extensions hold (MPO: multi-picture JPEGs from cameras). Opening only
# these keeps Pillow's exotic plugins (EPS runs Ghostscript) away from files found on disk.
_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_VERIFY_CHUNK = 4096  # files in flight per pool.map: bounds the futures held for a large split
_FIRST_FEW = 3  # bad files named in an error
_NAMED_IN_WARNING = 5  # bad files named (with their reason) in the warning
LAYOUT = "DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg, optional DIR/unlabelled/*.jpg"


class BadImage(DataError):
    """A file that does not decode to an image; `path` is '<bytes>' for in-memory data.

    A DataError, so that one escaping a data stream reads as one line naming the file (run.py),
    not as a bug's traceback.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, " ".join(str(reason).split())  # one line
        super().__init__(f"{self.path}: {self.reason}")


def to_canvas(image: np.ndarray, canvas: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (canvas, canvas, 3) uint8: the shorter side resized to `canvas`, the
    longer side centre-cropped to it.

    The resize is Pillow's bicubic (antialiased when shrinking, `reducing_gap` off), computed
    for the centred square only (`box`): the same pixels as resizing the whole image and then
    cropping, with the crop exactly centred rather than rounded to a whole pixel. No resampling
    where the scale is 1: a canvas x canvas image is returned as is (CIFAR at canvas 32 passes
    through bitwise), and one whose shorter side is already `canvas` is only cropped.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"to_canvas needs an (H, W, 3) uint8 image; got {image.dtype} {image.shape}"
        )
    h, w = image.shape[:2]
    if (h, w) == (canvas, canvas):
        return image
    side = min(h, w)
    if side == canvas:  # whole-pixel crop (rounded down), so the kept pixels stay bitwise
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]
    top, left = (h - side) / 2, (w - side) / 2
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(image).resize((canvas, canvas), Image.BICUBIC, box=box))


def decode(data: bytes | str | os.PathLike, canvas: int) -> np.ndarray:
    """A JPEG/PNG/BMP/GIF/WebP/TIFF/PNM file (a path, or its bytes) -> (canvas, canvas, 3) uint8.

    Upright as its EXIF orientation says, in RGB whatever its mode (`_to_rgb`), then `to_canvas`.
    Decoded in full, so a truncated file raises rather than coming out partly grey (as long as
    nobody turned on PIL.ImageFile.LOAD_TRUNCATED_IMAGES). Any failure, and any image over
    PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb), raises `BadImage`.
    """
    in_memory = isinstance(data, bytes | bytearray | memoryview)
    name = "<bytes>" if in_memory else os.fspath(data)
    try:
        with Image.open(io.BytesIO(data) if in_memory else data, formats=_formats()) as im:
            _check_pixels(im.size)
            im.load()  # the full decode: truncated data raises here
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except BadImage:
        raise
    except Image.UnidentifiedImageError as err:  # its message repeats the path or a BytesIO repr
        raise BadImage(name, "not a JPEG, PNG, BMP, GIF, WebP, TIFF or PNM image") from err
    except Exception as err:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise BadImage(name, f"{type(err).__name__}: {err}") from err
    return to_canvas(rgb, canvas)


@functools.cache
def _formats() -> tuple[str, ...]:
    """_FORMATS less any this Pillow lacks (Image.open raises KeyError on an unknown name)."""
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _check_pixels(size: tuple[int, int]) -> None:
    """Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS and only warns above
    it: both are a bad file here. Checked by hand, since a warnings filter cannot be set for one
    thread (verify decodes on many); Pillow's own warning still shows, once."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise Image.DecompressionBombError(
            f"{size[0]}x{size[1]} pixels, over PIL.Image.MAX_IMAGE_PIXELS={limit}"
        )


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode -> (H, W, 3) uint8."""
    if im.mode in _SIXTEEN_BIT:
        # 16-bit grey PNG/TIFF (I;16*, or I in older Pillow): keep the top 8 bits, so the full
        # 0..65535 range maps to 0..255. Pillow's convert() clips at 255 instead (all white).
        return _grey(np.asarray(im).astype(np.int64).clip(0, 65535) >> 8)
    if im.mode == "F":  # float: values taken as 0..255, outside clipped, NaN black
        return _grey(np.clip(np.rint(np.nan_to_num(np.asarray(im), nan=0.0)), 0, 255))
    if im.mode in _ALPHA or "transparency" in im.info:  # incl. palette / tRNS transparency
        return _over_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # L, 1, P, CMYK, YCbCr


def _grey(values: np.ndarray) -> np.ndarray:
    """(H, W) values in 0..255 -> (H, W, 3) uint8."""
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3): composited over white, rounded. Transparent logos and icons
    are drawn for a white page; dropping alpha (convert('RGB')) shows whatever colour the
    transparent pixels happen to store, most often black."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fingerprints
class FolderSplit:
    """One split of an image folder: its files in a fixed order, with labels and byte sizes."""

    files: tuple[str, ...]  # relative to the root, '/'-separated: 'train/cat/001.jpg'
    labels: np.ndarray  # (N,) int32: index into `classes`; -1 for every file of an unlabelled split
    classes: tuple[str, ...]  # sorted class folder names; () when unlabelled
    split: str  # the split's folder name under the root
    sizes: np.ndarray  # (N,) int64 bytes when scanned (-1: could not stat): part of the fingerprint

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """16 hex digits of sha1 over the file list, labels and sizes: changes when a file is
        added, removed, renamed, relabelled or rewritten at another size."""
        h = hashlib.sha1("\n".join(self.files).encode("utf-8"))
        h.update(b"\0" + self.labels.astype("<i4").tobytes())
        h.update(b"\0" + self.sizes.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def take(self, keep: np.ndarray) -> "FolderSplit":
        """The files at indices `keep` (in that order), with their labels and sizes."""
        keep = np.asarray(keep, np.int64)
        return dataclasses.replace(
            self,
            files=tuple(self.files[i] for i in keep),
            labels=self.labels[keep],
            sizes=self.sizes[keep],
        )


def is_image_file(name: str) -> bool:
    """Not hidden, and an extension in IMAGE_EXTENSIONS (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_split(root: str, split: str) -> FolderSplit:
    """The files of ROOT/SPLIT, laid out as torchvision's ImageFolder.

    One subfolder per class: labelled, a class's index its position among the sorted names, its
    files found recursively. Loose image files and no subfolders: unlabelled (labels -1). Hidden
    entries and other extensions are ignored; the order is sorted, not the filesystem's. Raises
    DataError, one line naming the path and the fix, for a layout it cannot read.
    """
    root = os.path.abspath(os.path.expanduser(root))
    top = os.path.join(root, split)
    _check_split_dir(root, split)
    entries = [e for e in os.scandir(top) if not e.name.startswith(".")]
    subdirs = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
    if subdirs and loose:
        raise DataError(
            f"{top} holds both loose image files ({len(loose)}, e.g. {loose[0]}) and subfolders "
            f"({_some(subdirs)}): a split is one folder per class, or loose images only "
            f"(unlabelled). Move the loose files into a class folder, or the folders out."
        )
    if loose:
        files = [f"{split}/{name}" for name in loose]
        labels, classes = np.full((len(files),), -1, np.int32), ()
    elif subdirs:
        files, labels, classes = _scan_classes(root, split, subdirs)
    else:
        raise DataError(
            f"{top} holds no image files ({' '.join(IMAGE_EXTENSIONS)}): put one folder per "
            f"class there with the images inside, or loose images for an unlabelled split."
        )
    sizes = np.array([_size(os.path.join(root, f)) for f in files], np.int64)
    return FolderSplit(tuple(files), labels, tuple(classes), split, sizes)


def _check_split_dir(root: str, split: str) -> None:
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"Image folder {root} {what}: point at a folder laid out as {LAYOUT}.")
    if not os.path.isdir(os.path.join(root, split)):
        present = sorted(
            e.name + "/" for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        has = f"it has {_some(present, 8)}" if present else "it has no folders"
        raise DataError(
            f"Image folder {root} has no {split}/ folder ({has}): lay it out as {LAYOUT}."
        )


def _scan_classes(root: str, split: str, classes: list[str]):
    """(files, labels, classes) of a labelled split: class-major, each class's files sorted."""
    files, labels, empty = [], [], []
    for index, name in enumerate(classes):
        found = _walk_images(os.path.join(root, split, name))
        if not found:
            empty.append(name)
        files += [f"{split}/{name}/{f}" for f in found]
        labels += [index] * len(found)
    if empty:
        where = os.path.join(root, split)
        raise DataError(
            f"Class folder(s) {_some(empty)} under {where} hold no image files "
            f"({' '.join(IMAGE_EXTENSIONS)}): add images to them or remove them."
        )
    return files, np.array(labels, np.int32), classes


def _walk_images(top: str) -> list[str]:
    """Image files under `top`, recursively, relative to it and '/'-separated, sorted. Follows
    symbolic links (datasets are often assembled from them), each real folder once (no loops)."""
    found, seen = [], set()
    for here, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up, or a second link to a folder already walked
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(here, top).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        found += [prefix + name for name in filenames if is_image_file(name)]
    return sorted(found)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # a dangling link: kept here, named by `verify`
        return -1


def _some(names, n: int = _FIRST_FEW) -> str:
    """'a, b, c' or 'a, b, c, ... (7 in all)'."""
    head = ", ".join(names[:n])
    return head if len(names) <= n else f"{head}, ... ({len(names)} in all)"


def verify(
    root: str, split: FolderSplit, canvas: int, max_bad_fraction: float, num_threads: int = 0
) -> tuple[FolderSplit, list[str]]:
    """Decodes every file of `split` once (a thread pool: Pillow releases the GIL while it
    decodes; num_threads 0 = one per CPU) and returns the split without the files that fail,
    order kept, and their relative paths.

    Some bad files: skipped, named once in one warning. More than `max_bad_fraction` of them, or
    all: DataError, as training on what is left would quietly be training on another dataset.
    """
    root = os.path.abspath(os.path.expanduser(root))
    reasons = _bad_reasons([os.path.join(root, f) for f in split.files], canvas, num_threads)
    return drop_unreadable(root, split, reasons, max_bad_fraction)


def drop_unreadable(
    root: str, split: FolderSplit, reasons: list[str | None], max_bad_fraction: float
) -> tuple[FolderSplit, list[str]]:
    """`verify`'s verdict once each file of `split` was decoded: `reasons` holds, per file, None
    (it decodes) or why it does not. Returns the split without the bad files and their names;
    warns once, or raises DataError, as `verify` says."""
    where = os.path.join(root, split.split)
    bad = [i for i, reason in enumerate(reasons) if reason is not None]
    if not bad:
        return split, []
    total, names = len(split.files), [split.files[i] for i in bad]
    named = [f"{split.files[i]} ({reasons[i]})" for i in bad]
    if len(bad) == total:
        raise DataError(
            f"None of the {total} files under {where} could be read (first few: "
            f"{', '.join(named[:_FIRST_FEW])}). Check that they are images (not, e.g., Git LFS "
            f"pointers) and that this process may read them."
        )
    if len(bad) / total > max_bad_fraction:
        raise DataError(
            f"{len(bad)} of {total} files under {where} could not be read (first few: "
            f"{', '.join(names[:_FIRST_FEW])}); more than data.max_bad_fraction="
            f"{max_bad_fraction}. Fix or remove them, or raise config.data.max_bad_fraction."
        )
    more = ", ..." if len(bad) > _NAMED_IN_WARNING else ""
    log.warning(
        "Skipped %d unreadable file(s) of %d under %s: %s%s",
        len(bad),
        total,
        where,
        ", ".join(named[:_NAMED_IN_WARNING]),
        more,
    )
    keep = np.setdiff1d(np.arange(total), bad)
    return split.take(keep), names


def _bad_reasons(paths: list[str], canvas: int, num_threads: int) -> list[str | None]:
    """Per path: None if it decodes, else BadImage's reason."""
    reasons = []
    workers = num_threads or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), _VERIFY_CHUNK):
            chunk = paths[start : start + _VERIFY_CHUNK]
            reasons += pool.map(functools.partial(_reason, canvas=canvas), chunk)
    return reasons


def _reason(path: str, canvas: int) -> str | None:
    try:
        decode(path, canvas)
    except BadImage as err:
        return err.reason
    return None
