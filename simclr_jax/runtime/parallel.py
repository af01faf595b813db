"""Devices: the one pmap axis name, replication of state and sharding of host batches, the chunked
loop over examples that evaluations share, and jax.distributed set-up for multi-host runs. (The
data order and the per-process rows of a global batch: `stream.py`.)"""

import logging
import os
import urllib.request

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXIS = "batch"  # used by pmap, nn.BatchNorm(axis_name=...), lax.pmean/psum and lax.all_gather
EVAL_CHUNK = 256  # images per device per evaluation call (bounds the activations' memory)


def replicate(tree, devices=None):
    """Copies a host/single-device tree onto every local device (leading axis = local devices)."""
    n = len(jax.local_devices() if devices is None else devices)
    return jax.tree.map(
        lambda x: shard(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), devices), tree
    )


def unreplicate(tree):
    """The first local device's copy of a replicated tree, as single-device arrays (no host copy)."""
    return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


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


def index_chunks(num_examples: int, max_per_device: int = EVAL_CHUNK):
    """The one chunked evaluation loop: covers range(num_examples) in calls of at most
    max_per_device rows on each of all devices. Yields (ids (k,), local_ids, mask), the last two
    (local_devices, per_device) as `shard_indices` gives them, for a pmapped function to gather
    rows by index. Every call has the same shape, so the function compiles once."""
    n_dev = jax.device_count()
    per_call = min(max_per_device, -(-num_examples // n_dev)) * n_dev
    for start in range(0, num_examples, per_call):
        ids = np.arange(start, min(num_examples, start + per_call), dtype=np.int32)
        local_ids, mask = shard_indices(ids, per_call)
        yield ids, local_ids, mask


def detect_cluster() -> str | None:
    """The launcher that started several processes of this run, from its environment (no device
    is touched): a SLURM step with several tasks, or a multi-host TPU slice. None otherwise."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
        return "SLURM"
    # GKE TPU pods list their hosts in the environment; multislice runs name a slice count.
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len(hosts.split(",")) > 1 or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1:
        return "TPU pod"
    if _on_cloud_tpu_vm() and len(_tpu_metadata("worker-network-endpoints").split(",")) > 1:
        return "TPU pod"  # a GCE TPU VM slice: its hosts are in the metadata server
    return None


def _on_cloud_tpu_vm() -> bool:
    # Set by `import jax` from the PCI bus (TPU chips and libtpu present); private, so guarded.
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_metadata(key: str) -> str:
    """A GCE metadata attribute ('' when unreachable: Colab and single-host VMs need no set-up)."""
    url = f"http://metadata.google.internal/computeMetadata/v1/instance/attributes/{key}"
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def initialize_distributed(dist_cfg) -> None:
    """Multi-host: jax.distributed.initialize() before any device is touched, when asked for
    (config.distributed.enabled) or when a launcher started several processes (detect_cluster).

    Explicit coordinator_address / num_processes / process_id win; the others are left to jax's
    own detection (SLURM, Open MPI, Cloud TPU).
    """
    if jax.distributed.is_initialized():  # a second run in the same process (a notebook)
        return
    cluster = None if dist_cfg.enabled else detect_cluster()
    if not dist_cfg.enabled and cluster is None:
        return
    if cluster:
        log.info("Launched by %s: initializing jax.distributed.", cluster)
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    # CPU processes exchange through gloo, jax's default (jax_cpu_collectives_implementation)
    # from 0.7.2 on: nothing to set for the localhost test or CPU clusters.
    jax.distributed.initialize(**kwargs)
    log.info(
        "Process %d of %d: %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def shard(x, devices=None):
    """A host array whose leading axis is the local devices -> one slice on each (pmap's input)."""
    devices = jax.local_devices() if devices is None else devices
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    return jax.device_put(np.asarray(x), sharding)
