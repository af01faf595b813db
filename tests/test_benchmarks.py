"""The benchmark scripts run end to end on a tiny model (their numbers are not checked: timings
belong to the benchmark, not to tests)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from throughput import MALLOC  # noqa: E402  (imports no jax)


def _run(script, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the scripts set devices
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_throughput_writes_its_json_and_table(tmp_path):
    stdout = _run(
        "throughput.py",
        *("--model", "tiny", "--batch", "8", "--devices", "2", "--steps", "1", "--warmup", "0"),
        *("--peak-size", "256", "--parts", "augment,pretrain", "--out", str(tmp_path)),
        *("--malloc", "retain"),  # re-executes itself with glibc's tunables
    )
    (path,) = tmp_path.glob("*.json")
    assert path.name == "cpu-2dev-tiny-b8-float32.json"
    result = json.loads(path.read_text())
    assert result["device_count"] == 2 and result["global_batch"] == 8
    assert result["glibc_tunables"] == MALLOC["retain"]
    assert [p["part"] for p in result["parts"]] == ["augment", "pretrain"]
    pretrain = result["parts"][1]
    assert pretrain["gflop_per_step"] > 0 and 0 < pretrain["mfu"] < 10
    assert result["peak_gflop_per_s"] > 0 and result["max_rss_gib"] > 0
    assert "augmentation / pretrain step" in stdout
    table = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "table.py"), str(path)],
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0, table.stderr
    assert "| retain | pretrain |" in table.stdout, table.stdout  # the malloc column


def test_profile_step_sums_the_traced_step_per_operation(tmp_path):
    stdout = _run(
        "profile_step.py",
        *("--model", "tiny", "--batch", "8", "--devices", "2", "--warmup", "1", "--top", "40"),
        *("--trace-dir", str(tmp_path)),
    )
    assert "page faults" in stdout
    kinds = stdout.split("\nkind")[1].split("\n\n")[0].splitlines()[1:]
    assert 5 < len(kinds) <= 40 and all(float(row.split()[1]) >= 0 for row in kinds)
    assert any(row.startswith("convolution") for row in kinds), kinds
    assert "convolution(" in (tmp_path / "step.hlo.txt").read_text()
