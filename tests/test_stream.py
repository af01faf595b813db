"""The streamed input path: the order is a function of (seed, step), every process reads only its
own devices' rows, and the streamed steps are bitwise the steps of the in-memory path they
replaced (1 process x 1 device, 1 x 4, 2 processes x 2 devices)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from simclr_jax.data import dataset, sources, stream
from simclr_jax.train import state as train_state
from tests.helpers import REPO, tiny_config
from tests.test_multihost import _free_port, run_together

WORKER = os.path.join(REPO, "tests", "stream_worker.py")


def test_order_is_a_slice_of_the_epoch_permutation():
    key = train_state.seed_key(0, train_state.DATA_KEY)
    order = stream.Order(key, 40, 8)  # 5 steps an epoch
    for epoch in range(2):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), 40))
        steps = [order.batch(epoch * 5 + k) for k in range(5)]
        np.testing.assert_array_equal(np.concatenate(steps), perm)  # the epoch, no repeats
    assert not np.array_equal(order.batch(0), order.batch(5))  # a new order each epoch
    local = order.local(7)
    assert local.shape == (jax.local_device_count(), 8 // jax.device_count())
    np.testing.assert_array_equal(local.reshape(-1), order.batch(7))  # one process: all rows


def test_batches_resume_at_any_step_and_bound_what_they_hold():
    config = tiny_config(**{"pretrain.batch_size": 32})
    ds = dataset.load(config.data)
    whole = [b["ids"] for b, _ in _host(config, ds, 0, 6)]
    resumed = [b["ids"] for b, _ in _host(config, ds, 4, 6)]
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    first, _ = next(iter(pretrain_batches(config, ds, 0, 1)))
    assert first["images"].shape == (jax.local_device_count(), 32 // jax.device_count(), 16, 16, 3)
    assert first["images"].dtype == np.uint8


def pretrain_batches(config, ds, start, stop):
    from simclr_jax.stages import pretrain

    return pretrain.batches(config, ds.pretrain, start, stop)


def _host(config, ds, start, stop):
    return [(jax.device_get(b), k) for b, k in pretrain_batches(config, ds, start, stop)]


def _worker(tmp_path, devices: int, processes: int = 1) -> list[dict]:
    port = _free_port()
    outs = [str(tmp_path / f"out{i}.json") for i in range(processes)]
    extra = lambda i: [str(port), str(processes), str(i)] if processes > 1 else []  # noqa: E731
    codes = run_together(
        [[sys.executable, WORKER, outs[i], *extra(i)] for i in range(processes)], devices
    )
    for i, (code, err) in enumerate(codes):
        assert code == 0, f"process {i}:\n{err[-3000:]}"
    return [json.load(open(o)) for o in outs]


@pytest.mark.parametrize("devices, processes", [(1, 1), (4, 1), (2, 2)])
def test_streamed_steps_are_the_in_memory_steps_bitwise(tmp_path, devices, processes):
    results = _worker(tmp_path, devices, processes)
    for r in results:
        # The same example ids on every device, the same losses and parameters, to the bit.
        assert r["stream"]["ids"] == r["memory"]["ids"]
        assert r["stream"]["losses"] == r["memory"]["losses"]
        assert r["stream"]["params"] == r["memory"]["params"]
        # Each process read exactly its own devices' rows of each step, nothing more (host
        # threads read steps concurrently: one read a step, in any order).
        mine = [np.asarray(step).reshape(-1).tolist() for step in r["stream"]["ids"]]
        assert sorted(r["asked"]) == sorted(mine)
    # Together the processes read every row of each global batch once.
    config = tiny_config(**{"pretrain.batch_size": 64})
    n = len(dataset.load(config.data).pretrain)
    order = stream.Order(train_state.seed_key(0, train_state.DATA_KEY), n, 64)
    for step in range(len(results[0]["stream"]["ids"])):
        read = np.concatenate([np.reshape(r["stream"]["ids"][step], -1) for r in results])
        np.testing.assert_array_equal(read, order.batch(step))  # process 0's block first


def test_a_split_cached_in_memory_reads_as_the_streamed_one(tmp_path):
    from tests.folder_fixture import write_folder

    write_folder(str(tmp_path))
    config = tiny_config(
        **{"data.name": "folder", "data.data_dir": str(tmp_path), "data.max_train_examples": 0}
    )
    config.data.cache_gb = 0.0
    streamed = dataset.load(config.data)
    config.data.cache_gb = 1.0
    cached = dataset.load(config.data)
    assert isinstance(cached.train, sources.ArraySource)
    assert not isinstance(streamed.train, sources.ArraySource)
    ids = np.arange(len(streamed.train))[::-1]
    np.testing.assert_array_equal(streamed.train.read(ids), cached.train.read(ids))
    assert streamed.train.identity() == cached.train.identity()
    batch = stream.Reader(streamed.test, labels=True)(np.arange(4).reshape(2, 2))
    assert batch["images"].shape == (2, 2, 16, 16, 3) and batch["labels"].shape == (2, 2)
    np.testing.assert_array_equal(batch["labels"].reshape(-1), streamed.test.labels[:4])
