"""Test set-up: 8 simulated CPU devices, a persistent XLA compilation cache, the compatibility
marks, and one finished tiny run shared by the tests that read a finished workdir.

The environment is set before jax starts, so the run.py subprocesses that tests launch (and the
pytest-xdist workers) inherit it: a program compiled once, in any process, is read from the cache
afterwards, which keeps the many short end-to-end runs (resume, kill, bad input) cheap. The cache
is kept between sessions (SIMCLR_JAX_TEST_CACHE, default ~/.cache/simclr-jax-tests; jax keys its
entries by the program, the flags and the jax version, so a changed program compiles again), so
a contributor's second run of the suite skips XLA's compilation; CONTRIBUTING.md gives the
suite's time both ways. `SIMCLR_JAX_TEST_CACHE=$(mktemp -d) python -m pytest` starts cold.
"""

import fcntl
import json
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get("SIMCLR_JAX_TEST_CACHE")
    or os.path.join(os.path.expanduser("~"), ".cache", "simclr-jax-tests"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The compatibility subset, which CI runs in every version set (CONTRIBUTING.md): the tests that
# call an API that differs between the sets, chosen by what broke there before. A module's name
# maps to why, and to the names of its tests in the subset (None: all of them).
COMPAT = {
    "test_resume.py": (
        "orbax: save, restore, a damaged step, another device count (jax 0.7.2 drifts 1e-4 where "
        "0.10 does not), a run written by an older version",
        (
            "test_sigkill_at",
            "test_damaged_latest",
            "test_checkpoint_from_8",
            "test_sigterm_saves",
            "test_a_run_written_before",
        ),
    ),  # fmt: skip
    "test_after_training.py": ("load_encoder's orbax restore and flax apply; the pictures", None),
    "test_multihost.py": ("jax.distributed, several processes, collective orbax I/O", None),
    "test_preemption.py": ("jax's preemption service (always on, no flag, on jax 0.7.2)", None),
    "test_perf.py": ("jax's compile events (0.7.2), buffer donation, the transfer guard", None),
    "test_onednn.py": ("XLA:CPU's convolution flags, per jaxlib version", None),
    "test_packaging.py": ("every imported package declared, in each resolved set", None),
    "test_stream.py": ("grain's MapDataset, ReadOptions and prefetch", None),
    "test_pack.py": ("array_record's writer and tfds' data_source", None),
    "test_folder.py": (
        "tfds' mock data and label cache (STL-10's splits), the folder source through grain",
        ("test_stl10", "test_tfds_labels", "test_a_folder_of_mixed"),
    ),
    "test_models.py": ("flax's BatchNorm across devices, parameter layout", None),
    "test_pretrain.py": (
        "pmap and its collectives over 1, 2, 4 and 8 devices",
        ("test_loss_curve",),
    ),
    "test_benchmarks.py": (
        "jax's cost analysis (none of the lowered program on jax 0.7)",
        ("test_throughput",),
    ),  # fmt: skip
    "test_notebook.py": ("the Colab runtime's notebook", None),
    "test_export.py": ("orbax's metadata (a classifier's class count) read for the export", None),
}


def pytest_collection_modifyitems(items):
    for item in items:
        _, names = COMPAT.get(item.path.name, ("", ()))
        if names is None or any(item.name.startswith(n) for n in names):
            item.add_marker(pytest.mark.compat)


def _shared_root(tmp_path_factory) -> str:
    """A folder every xdist worker of this session sees (the workers' own roots sit in it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return str(root)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One finished tiny run (tests.helpers.FINISHED_FLAGS on 2 devices: 16 pretraining steps,
    the kNN monitor after each of its 2 epochs, a 3-epoch downstream stage), made once per session
    whichever worker asks first (a file lock), and read by every test that needs a finished
    workdir. Read it, never write it: copy it to change anything.

    Returns {"workdir", "stdout", "stderr"}: the run's folder and its console."""
    from tests.helpers import FINISHED_FLAGS, run_cli

    root = os.path.join(_shared_root(tmp_path_factory), "finished_run")
    os.makedirs(root, exist_ok=True)
    done = os.path.join(root, "done.json")
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            workdir = os.path.join(root, "run")
            out = run_cli([*FINISHED_FLAGS, "--workdir", workdir])
            assert out.returncode == 0, out.stderr[-3000:]
            with open(done, "w") as f:
                json.dump({"workdir": workdir, "stdout": out.stdout, "stderr": out.stderr}, f)
    with open(done) as f:
        return json.load(f)
