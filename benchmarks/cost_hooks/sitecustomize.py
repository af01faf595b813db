"""Loaded at start-up by every Python process of a test session that benchmarks/test_costs.py
runs (it puts this folder on PYTHONPATH): at exit, one JSON line per process into
$SIMCLR_TEST_COSTS with the test that started it (pytest's PYTEST_CURRENT_TEST, inherited by
subprocesses), its wall and CPU seconds, and jax's own compile events (tracing, lowering,
XLA compilation, persistent-cache reads) when the process imported jax. Nothing happens
without SIMCLR_TEST_COSTS."""

import os

if os.environ.get("SIMCLR_TEST_COSTS"):
    import atexit
    import collections
    import importlib.abc
    import json
    import resource
    import sys
    import time

    _T0 = time.time()
    _EVENTS = collections.Counter()

    def _listen(module) -> None:
        def on_duration(event, duration, **_):
            _EVENTS[event] += duration

        def on_event(event, **_):
            _EVENTS["#" + event] += 1

        module.register_event_duration_secs_listener(on_duration)
        module.register_event_listener(on_event)

    class _AfterMonitoring(importlib.abc.MetaPathFinder):
        """Registers the listeners as soon as jax._src.monitoring has been executed."""

        def find_spec(self, name, path, target=None):
            if name != "jax._src.monitoring":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_listen(module):
                exec_module(module)
                _listen(module)

            loader.exec_module = exec_and_listen
            return spec

    import importlib.util

    sys.meta_path.insert(0, _AfterMonitoring())

    @atexit.register
    def _write() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
            "pid": os.getpid(),
            "argv": sys.argv[:3],
            "pytest": "pytest" in sys.modules and "PYTEST_XDIST_WORKER" not in os.environ,
            "wall_s": time.time() - _T0,
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "jax": "jax" in sys.modules,
            "events": dict(_EVENTS),
        }
        with open(os.environ["SIMCLR_TEST_COSTS"], "a") as f:
            f.write(json.dumps(record) + "\n")
