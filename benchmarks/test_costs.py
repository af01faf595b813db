"""Where the test suite's time goes: runs `python -m pytest` (any extra arguments are pytest's)
with a plugin that records each test's wall and CPU seconds, the subprocesses it started and
jax's compile events (tracing, lowering to MLIR, XLA compilation, persistent-cache reads), in the
test process and in every subprocess; then prints a per-file and a per-test table (Markdown).

  python benchmarks/test_costs.py                      # the whole suite, as the README runs it
  python benchmarks/test_costs.py -n 0 tests/test_stops.py
  python benchmarks/test_costs.py --report costs.jsonl # the tables of an earlier run only

Start-up and imports are not an event: a Python process that imports the package and jax costs
about 1.7 s before it does anything (`python -X importtime -c 'import simclr_jax.app.main'`);
the tables count the processes, so that share can be read off. CONTRIBUTING.md holds the tables
of a run made alone on the 2-core machine.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOOKS = os.path.join(HERE, "cost_hooks")  # sitecustomize.py and costs_plugin.py
TRACE = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_READ = "/jax/compilation_cache/cache_retrieval_time_sec"


def run_suite(pytest_args: list[str], out: str) -> float:
    env = dict(os.environ, SIMCLR_TEST_COSTS=out)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HOOKS, ROOT, env.get("PYTHONPATH")]))
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "costs_plugin", *pytest_args], cwd=ROOT, env=env
    )
    return time.time() - t0


def _split(events: dict) -> tuple[float, float, float]:
    return (
        sum(events.get(k, 0.0) for k in TRACE),
        events.get(COMPILE, 0.0),
        events.get(CACHE_READ, 0.0),
    )


def tables(path: str, top: int) -> str:
    tests, children = {}, collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "worker" in r:
                tests[r["test"]] = r
            elif r["test"] and not r["pytest"]:
                children[r["test"]].append(r)
    rows = []
    for test, r in tests.items():
        kids = children.get(test, [])
        trace, comp, cache = _split(r["events"])
        for k in kids:
            t, c, h = _split(k["events"])
            trace, comp, cache = trace + t, comp + c, cache + h
        rows.append(
            {
                "test": test,
                "file": test.split("::")[0],
                "wall": r["wall_s"],
                "cpu": r["self_cpu_s"] + r["children_cpu_s"],
                "procs": len(kids),
                "proc_wall": sum(k["wall_s"] for k in kids),
                "trace": trace,
                "compile": comp,
                "cache": cache,
            }
        )
    keys = ("wall", "cpu", "procs", "proc_wall", "trace", "compile", "cache")
    by_file, count = collections.defaultdict(collections.Counter), collections.Counter()
    for row in rows:
        count[row["file"]] += 1
        by_file[row["file"]].update({k: row[k] for k in keys})
    total = sum(by_file.values(), collections.Counter())
    columns = "wall s | CPU s | processes | their wall s | tracing + lowering s | XLA compile s | "
    columns += "cache reads s |"

    def cells(d) -> str:
        return (
            f"{d['wall']:.1f} | {d['cpu']:.1f} | {d['procs']} | {d['proc_wall']:.1f} | "
            f"{d['trace']:.1f} | {d['compile']:.1f} | {d['cache']:.1f} |"
        )

    out = [f"| file | tests | {columns}", "|---|" + "---:|" * 8]
    for file in sorted(by_file, key=lambda f: -by_file[f]["wall"]):
        out.append(f"| {file} | {count[file]} | {cells(by_file[file])}")
    out.append(f"| **all** | {len(rows)} | {cells(total)}")
    out += ["", f"| the {top} slowest tests | {columns}", "|---|" + "---:|" * 7]
    for r in sorted(rows, key=lambda r: -r["wall"])[:top]:
        out.append(f"| {r['test']} | {cells(r)}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="print the tables of this costs file; run nothing")
    parser.add_argument("--top", type=int, default=25, help="rows of the per-test table")
    parser.add_argument("--out", help="the costs file to write (default: a new temporary one)")
    args, pytest_args = parser.parse_known_args()
    path = args.report
    if path is None:
        path = args.out or tempfile.mkstemp(prefix="test_costs_", suffix=".jsonl")[1]
        open(path, "w").close()
        wall = run_suite(pytest_args, path)
        print(f"\nsuite wall {wall:.0f} s; costs in {path}\n")
    print(tables(path, args.top))


if __name__ == "__main__":
    main()
