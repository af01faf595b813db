"""Markdown table of benchmark results: `python benchmarks/table.py benchmarks/results/cpu-*.json`.

One row per (file, part): the settings that differ between runs (devices, conv lowering (results
before it was removed), XLA:CPU convolution library, malloc), ms/step, images/s and MFU against the peak measured in that run.
Results of benchmarks/vs_torch.py (`"kind": "vs_torch"`) get their own table, one row per width:
project vs PyTorch images/s, their ratio and MFUs.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import MALLOC  # noqa: E402  (imports no jax)
from vs_torch import table_rows as vs_torch_rows  # noqa: E402  (imports no jax nor torch)

from simclr_jax.runtime import xla  # noqa: E402  (imports no jax)


def settings(result: dict) -> str:
    flags = result.get("xla_flags", "")
    convs = "eigen" if xla.EIGEN_CONVS in flags else "default"
    if "xla_cpu_use_onednn=true" in flags.lower():
        convs = "onednn"
    convs = result.get("cpu_convs", convs)  # recorded from issue #18 on
    tunables = result.get("glibc_tunables", "")
    malloc = next((name for name, t in MALLOC.items() if t and t in tunables), "default")
    return f"{result['device_count']} | {result.get('conv_impl', 'xla')} | {convs} | {malloc}"


def rows(paths, parts=("pretrain", "augment", "classifier")):
    yield (
        "| run | batch | devices | conv_impl | CPU convs | malloc | part | ms/step | images/s | "
        "peak GFLOP/s | MFU |"
    )
    yield "|---|---|---|---|---|---|---|---|---|---|---|"
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        for p in r["parts"]:
            if p["part"] not in parts:
                continue
            yield (
                f"| {name} | {r['global_batch']} | {settings(r)} | {p['part']} | "
                f"{p['ms_per_step']:.0f} | {p['images_per_s']:.1f} | {r['peak_gflop_per_s']:.0f} | "
                f"{p['mfu']:.0%} |"
            )


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    results = {path: _load(path) for path in sys.argv[1:]}
    vs_torch = [r for r in results.values() if r.get("kind") == "vs_torch"]
    others = [path for path, r in results.items() if r.get("kind") != "vs_torch"]
    tables = [rows(others)] if others else []
    tables += [vs_torch_rows(vs_torch)] if vs_torch else []
    print("\n\n".join("\n".join(t) for t in tables))
