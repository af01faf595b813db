"""Random-access sources of uint8 images at the canvas size, one per kind of dataset.

Every source answers `len(source)`, `source.labels` ((N,) int32, -1 where a split is unlabelled),
`source.read(ids) -> (k, canvas, canvas, 3) uint8` and `source.identity()` (what a checkpoint
records of the data: the source, the number of examples and a fingerprint). Nothing here decides
an order or touches a device: `stream.py` asks for the rows of each step.

* `ArraySource`: images already in host memory (the embedded digits, or a small split cached);
* `TfdsSource`: a prepared tfds dataset through `tfds.data_source` (array_record: random access,
  no TensorFlow), decoded on each read;
* `FolderSource`: image files in torchvision's ImageFolder layout (`folders.scan_split`), decoded
  on each read;
* `PackedSource`: one split of such a folder (or of a tfds dataset) packed into array_record
  (`pack.py`), decoded on each read;
* `Concat` (several splits as one, e.g. STL-10's train+unlabelled), `Take` (the first n) and
  `Subset` (given examples: a validation split carved from train).
"""

import dataclasses
import hashlib
import os

import numpy as np

from simclr_jax.data import folders, pack_format
from simclr_jax.data import images as image_files
from simclr_jax.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """(N, S, S, 3) uint8 images and (N,) labels in host memory."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def canvas(self) -> int:
        return self.images.shape[1]

    def read(self, ids) -> np.ndarray:
        return self.images[np.asarray(ids)]

    def identity(self) -> dict:
        digest = hashlib.sha1(np.ascontiguousarray(self.labels).tobytes())
        step = max(1, len(self) // 64)  # 64 images sampled: cheap, and any other data differs
        digest.update(np.ascontiguousarray(self.images[::step]).tobytes())
        return {
            "source": self.name,
            "num_examples": len(self),
            "fingerprint": digest.hexdigest()[:16],
        }


class _Encoded:
    """What a source of encoded images in a random-access data source (`_source`: tfds' or
    array_record's, `__getitems__` thread-safe) shares: each read decodes its records' images
    with `images.decode`, the folder's decoder, at `canvas`."""

    _source = None  # the data source of records
    labels: np.ndarray
    canvas: int

    @staticmethod
    def _image(record) -> bytes:
        """A record's encoded image (a pack's record is the image itself)."""
        return record

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, ids) -> np.ndarray:
        rows = self._source.__getitems__([int(i) for i in np.asarray(ids)])
        return _stack([image_files.decode(self._image(r), self.canvas) for r in rows], self.canvas)


class TfdsSource(_Encoded):
    """One split of a prepared tfds dataset, read through `tfds.data_source` with the images left
    encoded (`SkipDecoding`): labels come without decoding a pixel, and each read decodes its
    images (PNG is lossless: CIFAR-10's pixels are the ones tfds itself decodes)."""

    def __init__(self, data_source, name: str, split: str, version: str, canvas: int):
        self._source, self.name, self.canvas = data_source, f"tfds:{name}/{split}", canvas
        self._version = version
        self.labels = _tfds_labels(data_source, f"{name}-{version}-{split}")

    @staticmethod
    def _image(record) -> bytes:
        return record["image"]

    def identity(self) -> dict:
        text = f"{self.name}:{self._version}:{len(self)}".encode()
        return {
            "source": self.name,
            "num_examples": len(self),
            "fingerprint": hashlib.sha1(text + self.labels.tobytes()).hexdigest()[:16],
        }


# Labels of tfds splits, read once (every record of a split) and kept here, keyed by the split's
# files (path, size, mtime): ImageNet's 1.28M records are not read again at each start.
LABEL_CACHE = os.path.join("~", ".cache", "simclr-jax", "labels")


def _tfds_labels(data_source, what: str, cache_dir: str = LABEL_CACHE) -> np.ndarray:
    """(N,) int32 labels of a tfds data source (-1 where a split is unlabelled), from the label
    cache when it holds this split's files, else read from every record and cached."""
    path = _label_cache_path(data_source, what, os.path.expanduser(cache_dir))
    n = len(data_source)
    if path and os.path.isfile(path):
        try:
            labels = np.load(path)
            if labels.shape == (n,):
                return labels.astype(np.int32)
        except (OSError, ValueError):
            pass  # a torn file: read again
    labels = np.empty(n, np.int32)
    for start in range(0, n, 4096):  # an unlabelled split (STL-10's) has -1 or no label
        rows = data_source.__getitems__(list(range(start, min(n, start + 4096))))
        labels[start : start + len(rows)] = [int(r.get("label", -1)) for r in rows]
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, labels)
            os.replace(tmp, path)
        except OSError:  # a read-only home: the labels are read at each start instead
            pass
    return labels


def _label_cache_path(data_source, what: str, cache_dir: str) -> str | None:
    """The cache file of a split: named after it, keyed by its files' paths, sizes and mtimes;
    None when the files cannot be listed (then nothing is cached)."""
    try:
        files = data_source.dataset_info.splits[data_source.split].filepaths
        stats = [(os.path.abspath(os.fspath(f)), os.stat(os.fspath(f))) for f in files]
    except Exception:  # a mock, a remote path, a tfds without filepaths: read every time
        return None
    if not stats:
        return None
    key = "\n".join(f"{p}:{st.st_size}:{st.st_mtime_ns}" for p, st in stats)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in what)
    return os.path.join(cache_dir, f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")


class FolderSource:
    """The readable files of one split of an image folder (`folders.verify` has dropped the rest)."""

    def __init__(self, root: str, split: folders.FolderSplit, canvas: int):
        self.root, self.split, self.canvas = root, split, canvas
        self.name = f"folder:{os.path.join(root, split.split)}"
        self.labels = np.asarray(split.labels, np.int32)
        self.classes = split.classes

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, ids) -> np.ndarray:
        # Files were decoded once by folders.verify: one failing now changed since (a DataError).
        paths = (os.path.join(self.root, self.split.files[int(i)]) for i in np.asarray(ids))
        return _stack([image_files.decode(p, self.canvas) for p in paths], self.canvas)

    def identity(self) -> dict:
        return {
            "source": self.name,
            "num_examples": len(self),
            "fingerprint": self.split.fingerprint(),
        }


class PackedSource(_Encoded):
    """One split of a packed image folder (`pack.py`): canvas-sized encoded images in one
    array_record file, read at random through array_record's data source (thread-safe)."""

    def __init__(self, root: str, split: str, meta: dict, canvas: int):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        entry = meta["splits"][split]
        self.name, self.canvas = f"pack:{os.path.join(root, split)}", canvas
        self.labels = np.load(pack_format.labels_path(root, split)).astype(np.int32)
        self.classes = tuple(entry["classes"])
        self._source = ArrayRecordDataSource([pack_format.record_path(root, split)])
        if len(self._source) != len(self.labels) or len(self.labels) != entry["num_examples"]:
            raise DataError(
                f"The pack {root} is inconsistent for split {split!r} ({len(self._source)} "
                f"records, {len(self.labels)} labels, {entry['num_examples']} in "
                f"{pack_format.PACK_META}): pack the folder again into a new folder."
            )
        text = f"{entry['fingerprint']}:{meta['canvas']}:{meta['encoding']}"
        if "quality" in meta:  # a JPEG pack's quality (packs made before --quality: 95, unsaid)
            text += f":q{meta['quality']}"
        self._fingerprint = hashlib.sha1(text.encode()).hexdigest()[:16]

    def identity(self) -> dict:
        return {"source": self.name, "num_examples": len(self), "fingerprint": self._fingerprint}


class Concat:
    """Several sources read as one: ids [0, len(a)) are a's, then b's, ..."""

    def __init__(self, parts: list):
        self.parts, self.canvas = parts, parts[0].canvas
        self.name = "+".join(p.name for p in parts)
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.labels = np.concatenate([p.labels for p in parts])
        # A folder's class names (those of its labelled parts; () for the others).
        self.classes = next((p.classes for p in parts if getattr(p, "classes", ())), ())

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        out = np.empty((len(ids), self.canvas, self.canvas, 3), np.uint8)
        which = np.searchsorted(self._starts, ids, side="right") - 1
        for k, part in enumerate(self.parts):
            rows = np.flatnonzero(which == k)
            if len(rows):
                out[rows] = part.read(ids[rows] - self._starts[k])
        return out

    def identity(self) -> dict:
        ids = [p.identity() for p in self.parts]
        joined = "".join(i["fingerprint"] for i in ids).encode()
        return {
            "source": self.name,
            "num_examples": len(self),
            "fingerprint": hashlib.sha1(joined).hexdigest()[:16],
        }


class Take:
    """The first n examples of a source (config.data.max_train_examples)."""

    def __init__(self, source, n: int):
        self.source, self.n, self.canvas, self.name = source, n, source.canvas, source.name
        self.labels = source.labels[:n]

    def __len__(self) -> int:
        return self.n

    def read(self, ids) -> np.ndarray:
        return self.source.read(ids)

    def identity(self) -> dict:
        inner = self.source.identity()
        return {**inner, "num_examples": self.n, "of": inner["num_examples"]}


class Subset:
    """The examples `ids` of a source, in that order (a validation split carved from train)."""

    def __init__(self, source, ids: np.ndarray, name: str):
        self.source, self.ids, self.name = source, np.asarray(ids, np.int64), name
        self.canvas, self.labels = source.canvas, source.labels[self.ids]
        self.classes = getattr(source, "classes", ())

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, ids) -> np.ndarray:
        return self.source.read(self.ids[np.asarray(ids)])

    def identity(self) -> dict:
        inner = self.source.identity()
        digest = hashlib.sha1(inner["fingerprint"].encode() + self.ids.tobytes())
        return {
            "source": self.name,
            "num_examples": len(self),
            "fingerprint": digest.hexdigest()[:16],
        }


def read_all(source, chunk: int = 2048) -> np.ndarray:
    """The whole source in host memory, (N, S, S, 3) uint8, read in chunks."""
    out = np.empty((len(source), source.canvas, source.canvas, 3), np.uint8)
    for start in range(0, len(source), chunk):
        ids = np.arange(start, min(len(source), start + chunk))
        out[ids] = source.read(ids)
    return out


def cached(source, max_bytes: float):
    """`source` read once into host memory (an ArraySource keeping its identity) when its pixels
    fit in `max_bytes`; else the source itself, read on each access."""
    if isinstance(source, ArraySource):
        return source
    if len(source) * source.canvas**2 * 3 > max_bytes:
        return source
    return _Cached(read_all(source), source.labels, source.name, source.identity())


@dataclasses.dataclass(frozen=True, eq=False)
class _Cached(ArraySource):
    inner_identity: dict = dataclasses.field(default_factory=dict)

    def identity(self) -> dict:  # the same run whether it was cached or streamed
        return self.inner_identity


def _stack(rows: list[np.ndarray], canvas: int) -> np.ndarray:
    """Decoded canvases (canvas, canvas, 3) as one (k, canvas, canvas, 3) array."""
    return np.stack(rows) if rows else np.empty((0, canvas, canvas, 3), np.uint8)
