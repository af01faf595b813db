"""Devices: the one pmap axis name, replication of state and data, the per-device slice of a global
batch, and jax.distributed set-up for multi-host runs."""

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # used by pmap, nn.BatchNorm(axis_name=...), lax.pmean/psum and lax.all_gather


def replicate(tree, devices=None):
    """Copies a host/single-device tree onto every local device (leading axis = local devices)."""
    devices = jax.local_devices() if devices is None else devices
    n, sharding = len(devices), NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (n,) + x.shape), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first local device's copy of a replicated tree, as single-device arrays (no host copy)."""
    return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


def per_device(global_batch: int) -> int:
    n = jax.device_count()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} does not split over {n} devices")
    return global_batch // n


def epoch_permutation(key, epoch, num_examples: int):
    """The data order of one epoch: a function of (key, epoch) only. (num_examples,) int32."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def device_batch_ids(key, step, num_examples: int, global_batch: int):
    """Inside pmap: the global example indices this device handles at `step`. (per_device,)

    The global batch of step s is slice s % steps_per_epoch of the permutation of epoch
    s // steps_per_epoch; device d takes its d-th contiguous part. The union over devices, and so
    the result of a step, does not depend on the device count.
    """
    steps_per_epoch = num_examples // global_batch
    n = global_batch // lax.axis_size(AXIS)
    perm = epoch_permutation(key, step // steps_per_epoch, num_examples)
    start = (step % steps_per_epoch) * global_batch + lax.axis_index(AXIS) * n
    return lax.dynamic_slice(perm, (start,), (n,))


def shard_indices(indices: np.ndarray, pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads host indices to a multiple of `pad_to` (repeating the last one) and returns the
    (local_devices, per_device) indices for this process plus a validity mask of the same shape."""
    n = len(indices)
    total = -(-n // pad_to) * pad_to
    padded = np.concatenate([indices, np.full(total - n, indices[-1], indices.dtype)])
    valid = np.arange(total) < n
    # Each process takes the contiguous block of its local devices.
    per_proc = total // jax.process_count()
    lo = jax.process_index() * per_proc
    shape = (jax.local_device_count(), -1)
    return padded[lo : lo + per_proc].reshape(shape), valid[lo : lo + per_proc].reshape(shape)


def initialize_distributed(dist_cfg) -> None:
    """Multi-host: jax.distributed.initialize() before any device is touched (explicit or auto)."""
    if not dist_cfg.enabled:
        return
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    jax.distributed.initialize(**kwargs)
