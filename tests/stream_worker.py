"""One process of the streaming-vs-in-memory check (tests/test_stream.py runs it as 1 process x 1
device, 1 x 4, and 2 processes x 2 devices).

For a few pretraining steps it runs the same state twice: (a) the in-memory path as it was before
streaming, the whole train split on every device and each device gathering its rows by the
on-device permutation (`lax.axis_index`); (b) the streamed path, `pretrain.batches` reading this
process's rows from a source that records every id it is asked for. It writes both loss curves,
the final parameters' digests and the recorded ids as JSON to argv[1].

  python tests/stream_worker.py OUT.json [coordinator_port num_processes process_id]
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from simclr_jax.data import dataset
from simclr_jax.runtime import parallel
from simclr_jax.stages import pretrain
from simclr_jax.train import state as train_state  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

STEPS = 5  # 256 images at batch 64: 4 steps an epoch, so step 4 starts the second epoch


class Recording:
    """A source that records the ids it is asked for (what this process reads)."""

    def __init__(self, source):
        self.source, self.canvas, self.labels, self.asked = source, source.canvas, source.labels, []

    def __len__(self):
        return len(self.source)

    def read(self, ids):
        self.asked.append(np.asarray(ids).tolist())
        return self.source.read(ids)


def in_memory_gather(config, n):
    """The pre-streaming step: every device holds all n images and picks its rows on device."""
    batch_size = config.pretrain.batch_size

    def gather(images, key, step):
        spe = n // batch_size
        perm = jax.random.permutation(jax.random.fold_in(key, step // spe), n)
        per = batch_size // lax.axis_size(parallel.AXIS)
        start = (step % spe) * batch_size + lax.axis_index(parallel.AXIS) * per
        ids = lax.dynamic_slice(perm, (start,), (per,))
        return {"images": images[ids], "ids": ids.astype(np.int32)}

    return jax.pmap(gather, axis_name=parallel.AXIS)


def digest(tree) -> str:
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def main(out_path, *dist):
    if dist:
        port, nproc, pid = (int(x) for x in dist)
        jax.distributed.initialize(f"localhost:{port}", nproc, pid)
    config = tiny_config(**{"pretrain.batch_size": 64, "pretrain.num_steps": STEPS})
    config = dataset.with_stats(config, dataset.load(config.data))
    ds = dataset.load(config.data)
    n = len(ds.pretrain)
    p_step, state = pretrain.step_and_initial_state(config, n // 64, STEPS)

    # (a) in memory, gathered on device.
    gather = in_memory_gather(config, n)
    images = parallel.replicate(ds.pretrain.read(np.arange(n)))
    data_key = parallel.replicate(train_state.seed_key(config.seed, train_state.DATA_KEY))
    aug_key = parallel.replicate(train_state.seed_key(config.seed, train_state.AUGMENT_KEY))
    rstate, mem_losses, mem_ids = parallel.replicate(state), [], []
    for step in range(STEPS):
        batch = gather(images, data_key, parallel.replicate(np.int32(step)))
        mem_ids.append(np.asarray(batch["ids"]).tolist())
        rstate, metrics = p_step(rstate, batch, aug_key)
        mem_losses.append(np.asarray(metrics["loss"])[0].tolist())
    mem_digest = digest(parallel.unreplicate(rstate).params)

    # (b) streamed from a recording source.
    source = Recording(ds.pretrain)
    rstate, str_losses, str_ids = parallel.replicate(state), [], []
    for batch, key in pretrain.batches(config, source, 0, STEPS):
        str_ids.append(np.asarray(batch["ids"]).tolist())
        rstate, metrics = p_step(rstate, batch, key)
        str_losses.append(np.asarray(metrics["loss"])[0].tolist())
    result = {
        "process": jax.process_index(),
        "local_devices": jax.local_device_count(),
        "memory": {"losses": mem_losses, "ids": mem_ids, "params": mem_digest},
        "stream": {
            "losses": str_losses,
            "ids": str_ids,
            "params": digest(parallel.unreplicate(rstate).params),
        },
        "asked": source.asked,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
