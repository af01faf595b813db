"""Image folders in torchvision's ImageFolder layout (DIR/<split>/<class>/..., or loose files for
an unlabelled split): `scan_split` makes a split a deterministic file list with labels, and
`verify` is one decoding pass (`images.decode`, on host threads) that drops the files that will
not decode, naming them once.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os

import numpy as np

from simclr_jax.data.images import BadImage, decode
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
_VERIFY_CHUNK = 4096  # files in flight per pool.map: bounds the futures held for a large split
_FIRST_FEW = 3  # bad files named in an error
_NAMED_IN_WARNING = 5  # bad files named (with their reason) in the warning
LAYOUT = "DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg, optional DIR/unlabelled/*.jpg"


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
