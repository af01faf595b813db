"""The data order and the per-host input stream.

The order is a function, not iterator state: the global batch of step s is slice s % E of the
permutation of epoch s // E (E steps an epoch), `jax.random.permutation(fold_in(key, epoch), N)`
computed on the host's CPU backend. Device d of the P processes' D devices takes the d-th
contiguous block, and each process reads only its own devices' rows. A checkpoint therefore
needs only the step, and the batch a step sees does not depend on the device or process count.

Reading: grain's `MapDataset` over step numbers, each element one step's local batch read from a
`sources` source on a host thread (decoding and resizing included); at most `prefetch` of them
wait in host memory, and `prefetch` of them on the devices while the step before runs. The
evaluations' chunks go through the same reader.
"""

import collections
import contextlib
import logging
import os
import threading

import jax
import numpy as np

from simclr_jax.runtime import parallel

# grain >= 0.2.18 on a jaxlib older than 0.11 (the Colab runtime's 0.7.2) logs this at import, in
# every run: about profiling its multiprocess workers, which this stream does not use (it reads
# on threads). Only that line is dropped; grain's other warnings still show (issue #25).
_GRAIN_PROFILER_NOTE = "Grain multiprocess worker profiling requires jaxlib"


class _DropGrainProfilerNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_GRAIN_PROFILER_NOTE)


@contextlib.contextmanager
def _without_grain_profiler_note():
    note = _DropGrainProfilerNote()
    logger = logging.getLogger("absl")  # grain logs through absl.logging
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


with _without_grain_profiler_note():
    import grain  # noqa: E402

_ORDER_CACHE = 2  # epochs whose permutation is kept (a step never spans more than two)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return num_examples // global_batch


def local_block(global_batch: int) -> tuple[int, int]:
    """(start, size) of this process's rows in a global batch: its devices' contiguous block."""
    per_device = global_batch // jax.device_count()
    size = per_device * jax.local_device_count()
    return jax.process_index() * size, size


class Order:
    """Global batch ids as a function of (key, step): positions in [0, num_examples). Each epoch's
    permutation is computed once on this process's CPU and kept for _ORDER_CACHE epochs
    (thread-safe: grain asks from many threads)."""

    def __init__(self, key, num_examples: int, global_batch: int):
        self.num_examples, self.global_batch = num_examples, global_batch
        self.steps_per_epoch = steps_per_epoch(num_examples, global_batch)
        # This process's own CPU device (jax.devices('cpu')[0] may be another process's).
        self._cpu = jax.local_devices(backend="cpu")[0]
        self._key = jax.device_put(jax.device_get(key), self._cpu)
        self._lock, self._cache = threading.Lock(), {}

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._cache:
                with jax.default_device(self._cpu):
                    key = jax.random.fold_in(self._key, epoch)
                    perm = np.asarray(jax.random.permutation(key, self.num_examples), np.int32)
                while len(self._cache) >= _ORDER_CACHE:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return self._cache[epoch]

    def batch(self, step: int) -> np.ndarray:
        """(global_batch,) int32 positions of step `step`."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        start = k * self.global_batch
        return self._epoch(epoch)[start : start + self.global_batch]

    def local(self, step: int) -> np.ndarray:
        """(local_devices, per_device) positions of this process's rows of step `step`."""
        lo, size = local_block(self.global_batch)
        return self.batch(step)[lo : lo + size].reshape(jax.local_device_count(), -1)


class Reader:
    """One gather path for every stage: rows by position -> host arrays.

    `index` maps positions to the source's ids (the classifier's epoch list; None: the identity).
    The step's keys are folded from the positions, so they travel as `ids`.
    """

    def __init__(self, source, index: np.ndarray | None = None, labels: bool = False):
        self.source, self.index, self.labels = source, index, labels

    def __call__(self, positions: np.ndarray) -> dict:
        positions = np.asarray(positions, np.int32)
        ids = positions if self.index is None else self.index[positions]
        flat = ids.reshape(-1)
        images = self.source.read(flat).reshape(positions.shape + (self.source.canvas,) * 2 + (3,))
        out = {"images": images, "ids": positions}
        if self.labels:
            out["labels"] = self.source.labels[flat].reshape(positions.shape).astype(np.int32)
        return out


def read_options(data_cfg) -> grain.ReadOptions:
    """Host threads (config.data.read_threads) and the host batches read ahead: at least one
    per thread, since grain runs no more threads than its buffer holds (config.data.prefetch
    raises it). Host memory holds at most that many batches."""
    threads = data_cfg.read_threads or min(16, os.cpu_count() or 1)
    return grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(threads, data_cfg.prefetch)
    )


def to_devices(batches, depth: int):
    """Each host batch sharded over the local devices (leading axis), `depth` ahead of the
    consumer: the transfers of the next batches overlap the step that runs."""
    queue = collections.deque()
    for batch in batches:
        queue.append(jax.tree.map(parallel.shard, batch))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def train_batches(reader: Reader, order: Order, start: int, stop: int, data_cfg):
    """Steps start..stop-1 of `order`: this process's rows, read by `reader` on host threads,
    on the local devices. Yields dicts of (local_devices, per_device, ...) arrays."""
    steps = grain.MapDataset.range(start, stop).map(lambda step: reader(order.local(step)))
    host = steps.to_iter_dataset(read_options(data_cfg))
    return to_devices(host, max(1, data_cfg.prefetch))


def eval_chunks(reader: Reader, num_examples: int, data_cfg, max_per_device=parallel.EVAL_CHUNK):
    """Every position in [0, num_examples), in `parallel.index_chunks`' calls: yields (ids (k,),
    batch, mask) with batch and mask on the local devices, read ahead on host threads."""
    chunks = list(parallel.index_chunks(num_examples, max_per_device))

    def read(i):
        ids, local_ids, mask = chunks[i]
        return ids, {**reader(local_ids), "mask": mask}

    host = grain.MapDataset.range(len(chunks)).map(read).to_iter_dataset(read_options(data_cfg))
    for ids, batch in host:
        yield ids, jax.tree.map(parallel.shard, batch)
