"""A pytest plugin (benchmarks/test_costs.py loads it with -p): one JSON line per test into
$SIMCLR_TEST_COSTS with its wall seconds (setup + call + teardown), the CPU seconds of the test
process itself and of the subprocesses it waited for, and the jax compile events of the test
process during the test (sitecustomize.py counts them)."""

import json
import os
import resource
import time

import pytest


def _cpu(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _events() -> dict:
    import sitecustomize  # this folder's: the process's jax event totals so far

    return dict(getattr(sitecustomize, "_EVENTS", {}))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = (time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), _events())
    yield
    after = (time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), _events())
    events = {k: v - before[3].get(k, 0) for k, v in after[3].items()}
    record = {
        "test": item.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "wall_s": after[0] - before[0],
        "self_cpu_s": after[1] - before[1],
        "children_cpu_s": after[2] - before[2],
        "events": {k: v for k, v in events.items() if v},
    }
    with open(os.environ["SIMCLR_TEST_COSTS"], "a") as f:
        f.write(json.dumps(record) + "\n")
