"""The benchmark scripts run end to end on a tiny model (their numbers are not checked: timings
belong to the benchmark, not to tests). The PyTorch reference (benchmarks/torch_reference.py) is
checked against the project's model, loss and optimizer where PyTorch is installed (CI does not
install it: those tests are skipped there)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

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
        *("--peak-size", "256", "--out", str(tmp_path)),
        *("--parts", "augment,pretrain,pretrain_probe", "--image-size", "16"),
        *("--malloc", "retain"),  # re-executes itself with glibc's tunables
    )
    (path,) = tmp_path.glob("*.json")
    assert path.name == "cpu-2dev-tiny-16px-b8-float32.json"
    result = json.loads(path.read_text())
    assert result["device_count"] == 2 and result["global_batch"] == 8
    assert result["image_size"] == 16 and result["glibc_tunables"] == MALLOC["retain"]
    assert [p["part"] for p in result["parts"]] == ["augment", "pretrain", "pretrain_probe"]
    pretrain, with_probe = result["parts"][1:]
    assert pretrain["gflop_per_step"] > 0 and 0 < pretrain["mfu"] < 10
    assert with_probe["gflop_per_step"] > pretrain["gflop_per_step"]  # the head's matmuls
    assert result["peak_gflop_per_s"] > 0 and result["max_rss_gib"] > 0
    assert "augmentation / pretrain step" in stdout
    cost = result["online_probe_cost"]  # the ratio of the two pretrain parts' times
    for clock, key in (("wall", "ms_per_step"), ("cpu", "cpu_ms_per_step")):
        ms = {p["part"]: p[key] for p in result["parts"]}
        want = ms["pretrain_probe"] / ms["pretrain"]
        assert cost[clock]["ratio_of_medians"] == pytest.approx(want), clock
        assert f"online linear head, {clock} time: pretrain_probe / pretrain" in stdout
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


def test_recipe_run_packs_an_npz_and_reads_it_back(tmp_path):
    """--pack writes the labelled train and test splits as an .npz small enough to send; --npz
    reads them back as the run's data, image for image (the run itself, on a pack, is the recipe
    call's end-to-end test below); subset_baselines.py gives the run's baselines on it."""
    import recipe_run

    from simclr_jax.data import dataset, sources

    npz = tmp_path / "digits.npz"
    stdout = _run("recipe_run.py", "--config", "configs/digits_simclr.py", "--pack", str(npz))
    assert "1437 train images" in stdout, stdout
    args = recipe_run.parse_args(["--config", "configs/digits_simclr.py", "--npz", str(npz)])
    config = recipe_run.load_config(args)
    got, want = recipe_run.load_data(config, args), dataset.load(config.data)
    assert (len(got.train), len(got.test), got.num_classes) == (1437, 360, 10)
    assert got.pretrain is got.train  # the run pretrains on the packed train split
    for split in ("train", "test"):
        a, b = getattr(got, split), getattr(want, split)
        np.testing.assert_array_equal(sources.read_all(a), sources.read_all(b))
        np.testing.assert_array_equal(a.labels, b.labels)

    stdout = _run(
        "subset_baselines.py",
        *("--npz", str(npz), "--config", "configs/digits_simclr.py", "--precision", "float32"),
        *("--set", "model.name=tiny", "--set", "downstream.linear_iters=20"),
        *("--set", "downstream.linear_l2_grid=(0.01,)", "--out", str(tmp_path), "--tag", "b"),
    )
    assert "pixels: " in stdout and "random-init encoder: " in stdout  # written after each
    result = json.loads((tmp_path / "b.json").read_text())
    assert (result["train_images"], result["test_images"], result["chance"]) == (1437, 360, 0.1)
    for key in ("pixels_linear_probe", "pixels_sklearn_default_logreg", "pixels_knn"):
        assert 0.5 < result[key] <= 1.0, key  # raw 8x8 digits are easy
    for key in ("random_init_linear_probe", "random_init_knn"):
        assert 0.0 <= result[key] <= 1.0, key


def test_recipe_run_plans_its_epochs():
    """--minutes: as many epochs as its steps fit at the timed rate; --epochs: exactly, unless
    --pretrain-by would be missed at the timed rate times --rate-factor with the kNN checks
    counted: then as many as fit what is left less one more compile (another program)."""
    import recipe_run

    def args(*extra):
        return recipe_run.parse_args(["--knn-every", "5", *extra])

    now, images = 1000.0, 6000  # 1000 images/s: 6 s an epoch
    assert recipe_run.planned_epochs(args("--minutes", "1"), 1000.0, 9.0, images, now) == (10, None)
    assert recipe_run.planned_epochs(args("--epochs", "40"), 1000.0, 9.0, images, now) == (40, None)
    # 40 epochs, 8 checks of 3 s at 500 images/s (12 s an epoch): 504 s, in the 504 s left
    slow = ("--rate-factor", "0.5", "--knn-check-s", "3")
    fits = args("--epochs", "40", "--pretrain-by", "1504", *slow)
    assert recipe_run.planned_epochs(fits, 1000.0, 9.0, images, now) == (40, None)
    late = args("--epochs", "40", "--pretrain-by", "1503", *slow)
    epochs, why = recipe_run.planned_epochs(late, 1000.0, 9.0, images, now)
    # 503 - 9 s of compile = 494 s: 39 epochs and 7 checks are 489 s
    assert epochs == 39 and "40 epochs would end after --pretrain-by" in why
    assert recipe_run.fitting_epochs(5, 1000.0, images) == 1  # at least one
    assert recipe_run.fitting_epochs(60, 1000.0, images, 5, 6.0) == 9  # 54 s + 1 check of 6


@pytest.mark.torch
def test_vs_torch_writes_its_json_and_table(tmp_path):
    pytest.importorskip("torch")
    stdout = _run(
        "vs_torch.py",
        *("--widths", "0.125", "--batch", "8", "--devices", "2", "--steps", "2", "--warmup", "1"),
        *("--peak-size", "256", "--out", str(tmp_path)),
    )
    (path,) = tmp_path.glob("*.json")
    assert path.name == "cpu-vs-torch-2dev-b8.json"
    result = json.loads(path.read_text())
    assert result["kind"] == "vs_torch" and result["device_count"] == 2
    assert result["global_batch"] == 8 and result["precision"] == "float32"
    assert result["torch_threads"] == len(os.sched_getaffinity(0))
    assert result["torch_memory_format"] == "channels_last" and result["peak_gflop_per_s"] > 0
    (row,) = result["widths"]
    assert row["width"] == 0.125 and row["gflop_per_step"] > 0
    for side in ("jax", "torch"):
        assert len(row[side]["ms_all"]) == 2 and row[side]["images_per_s"] > 0
        assert 0 < row[side]["mfu"] < 10
    assert row["ratio"] == pytest.approx(row["jax"]["images_per_s"] / row["torch"]["images_per_s"])
    assert len(row["torch_losses"]) == 2 and all(math.isfinite(x) for x in row["torch_losses"])
    header = "| width | batch | project images/s | PyTorch images/s | ratio | project MFU |"
    assert header in stdout and "\n| 0.125 | 8 | " in stdout
    table = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "table.py"), str(path)],
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0, table.stderr
    assert header in table.stdout and "\n| 0.125 | 8 | " in table.stdout, table.stdout


def _digits_pack(tmp_path) -> str:
    """The embedded digits (1437 train, 360 test images) written as an image folder and packed
    by simclr_jax.data.pack, as the CIFAR-10 pack is made for the device."""
    from PIL import Image

    from configs import digits_simclr
    from simclr_jax.data import dataset, pack, sources

    ds = dataset.load(digits_simclr.get_config().data)
    folder = tmp_path / "digits"
    for split, source in (("train", ds.train), ("test", ds.test)):
        images = sources.read_all(source)
        for i, (image, label) in enumerate(zip(images, source.labels, strict=True)):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / split / str(label) / f"{i:04d}.png")
    pack.pack(str(folder), str(tmp_path / "pack"), canvas=ds.train.canvas)
    return str(tmp_path / "pack")


def _gpu_call(tmp_path, call: str, args: list, **env_settings):
    """benchmarks/gpu_run.sh `call` on the CPU, without tensorflow-datasets importable (the
    device's image has none) and without wheels; (its $OUT, its record)."""
    blocker = tmp_path / "no_tfds" / "tensorflow_datasets"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no tensorflow-datasets here')\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OUT=str(out), WHEELS="", PYTHON=sys.executable, PYTHONPATH=str(blocker.parent))
    env.update(env_settings)
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), call, *args]
        + ["--scratch", str(tmp_path / "scratch")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    log = (out / f"{call}.log").read_text()
    assert "set-up done" in log and "[gpu_run +" in log, log[-3000:]  # time marks
    assert "jax" in (out / f"{call}-gpu.txt").read_text()
    return out, json.loads((out / f"cpu-{call}.json").read_text())


# The calls at a tiny size. Throughput and the PyTorch comparison at the sizes of the two tests
# above (2 devices, batch 8, ResNet-18 width 0.125): their float32 programs then come from the
# session's compilation cache. Throughput in float32 only: the bf16 run is the same code with
# another --precision, and XLA:CPU compiles bf16 programs slowly.
TINY_RECIPE = [
    *("--config", "configs/digits_simclr.py", "--set", "model.name=tiny"),
    *("--set", "pretrain.batch_size=64", "--set", "pretrain.log_every=5"),
    *("--set", "downstream.batch_size=64", "--set", "downstream.label_fraction=1.0"),
    *("--set", "downstream.knn_k=200", "--set", "downstream.linear_iters=20"),
    *("--set", "downstream.linear_l2_grid=(0.01,)", "--precision", "float32"),
    *("--timing-steps", "2", "--downstream-epochs", "1"),
]
TINY_SPEED = [
    *("--model", "tiny", "--batch", "8", "--devices", "2", "--peak-size", "256"),
    *("--throughput-steps", "1", "--throughput-warmup", "0", "--throughput-precisions", "float32"),
    *("--precision", "float32", "--torch-device", "cpu", "--torch-autocast", "none"),
    *("--torch-width", "0.125", "--torch-compile-backend", "aot_eager", "--torch-threads", "1"),
    *("--torch-steps", "2", "--torch-block", "1", "--torch-warmup", "1"),
]


def test_gpu_recipe_call_runs_end_to_end_on_the_cpu(tmp_path):
    """Call 1 (gpu_run.sh recipe) at a tiny size: the digits packed here, the recipe streamed
    from the pack for EPOCHS=3 with the kNN monitor every epoch, the frozen probe and kNN on every
    train label, fine-tune vs scratch, the kNN at initialisation; one record with the figures on
    top. The run must learn: the loss falls and the kNN beats the same network at step 0."""
    pack = _digits_pack(tmp_path)
    out, record = _gpu_call(
        tmp_path, "recipe", TINY_RECIPE, DATA_DIR=pack, EPOCHS="3", KNN_EVERY="1"
    )
    names = {p.name for p in out.iterdir()}  # at most 8 files come back from the device
    assert names == {"recipe-gpu.txt", "recipe.log", "cpu-recipe.json", "metrics.jsonl"} | {
        "knn_curve.png",
        "pretrain.png",
    }
    for png in ("knn_curve.png", "pretrain.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[recipe +" in (out / "recipe.log").read_text()
    parts = record["parts"]
    assert list(parts) == ["recipe"] and parts["recipe"]["status"] == "ok", parts
    assert "--pretrain-by" not in parts["recipe"]["command"]  # EPOCHS: exactly, no plan
    (own,) = os.listdir(tmp_path / "scratch" / "parts" / "recipe")  # recipe_run's, by device
    assert own == "cpu-folder-tiny-float32-recipe.json"

    recipe = parts["recipe"]["result"]
    assert "errors" not in recipe, recipe["errors"]
    assert recipe["dataset"] == "folder" and recipe["data_dir"] == pack
    assert (recipe["train_images"], recipe["test_images"], recipe["epochs"]) == (1437, 360, 3)
    assert recipe["steps"] == 3 * (1437 // 64) == 3 * recipe["steps_per_epoch"]
    assert recipe["planned_epochs"] == 3 and recipe["epochs_cut"] is None
    assert math.isfinite(recipe["final_loss"]) and math.isfinite(recipe["first_logged_loss"])
    assert recipe["timed_images_per_s"] > 0 and recipe["images_per_s"] > 0
    curve = recipe["knn_curve"]  # the monitor, every epoch
    assert [e for e, _ in curve] == [1, 2, 3] and all(0 <= a <= 1 for _, a in curve)
    assert recipe["knn_acc"] == pytest.approx(curve[-1][1], abs=1.5 / 360)  # same encoder
    for key in ("linear_acc", "knn_acc", "knn_acc_at_init"):
        assert 0.0 <= recipe[key] <= 1.0, key
    assert recipe["linear_l2"] == 0.01  # the grid's
    # What the run must show: the loss falls, and the frozen kNN beats the model at step 0.
    assert recipe["final_loss"] < recipe["first_logged_loss"], recipe
    assert recipe["knn_acc"] > recipe["knn_acc_at_init"], recipe
    fts = recipe["fine_tune_vs_scratch"]
    assert fts["epochs"] == 1 and fts["num_labelled"] == 1437
    for run in ("finetune", "scratch"):
        assert 0.0 <= fts[run]["test_acc"] <= 1.0 and len(fts[run]["test_acc_by_epoch"]) == 1
    assert parts["recipe"]["knn_curve_points"]["monitor"] == curve

    # the record: the figures on top, as docs/gpu.md lists them
    assert record["call"] == "recipe" and record["device"] == "cpu"
    for key in ("train_images", "test_images", "epochs", "images_per_s", "linear_acc", "knn_acc"):
        assert record[key] == recipe[key], key
    assert record["knn_curve"] == [[0, recipe["knn_acc_at_init"]], *curve]
    assert record["finetune_vs_scratch"] == fts and record["status"] == {"recipe": "ok"}
    assert record["plan"]["epochs"] == 3 and record["plan"]["rows"][0][0] == "set-up"


def test_gpu_speed_call_runs_end_to_end_on_the_cpu(tmp_path):
    """Call 2 (gpu_run.sh speed) at a tiny size: throughput (float32 here) and the PyTorch
    comparison (torch.compile traced with the aot_eager backend: inductor's code generation is
    too slow for a test on a small CPU); no pack; one record with the figures on top."""
    has_torch = importlib.util.find_spec("torch") is not None
    parts_wanted = "throughput" + (",torch" if has_torch else "")
    out, record = _gpu_call(tmp_path, "speed", TINY_SPEED, PARTS=parts_wanted, DEADLINE_S="1800")
    assert {p.name for p in out.iterdir()} == {"speed-gpu.txt", "speed.log", "cpu-speed.json"}
    parts = record["parts"]
    want = ["torch"] * has_torch + ["throughput_float32"]  # by value; no bf16 asked for here
    assert list(parts) == want and all(parts[p]["status"] == "ok" for p in want), parts

    res = parts["throughput_float32"]["result"]
    assert res["precision"] == "float32" and res["model"] == "tiny" and res["device_count"] == 2
    (step,) = res["parts"]
    assert step["part"] == "pretrain" and step["images_per_s"] > 0 and 0 < step["mfu"] < 10
    assert record["call"] == "speed" and record["device"] == "cpu"
    assert record["images_per_s"] == {"float32": step["images_per_s"]}
    assert record["mfu"] == {"float32": step["mfu"]}
    if has_torch:
        res = parts["torch"]["result"]
        assert res["torch_compile"] and res["torch_compile_backend"] == "aot_eager"
        assert res["torch_device"] == "cpu" and res["precision"] == "float32"
        (row,) = res["widths"]
        ratio = row["jax"]["images_per_s"] / row["torch"]["images_per_s"]
        assert row["ratio"] == pytest.approx(ratio) and record["ratio"] == row["ratio"]
        assert record["torch_images_per_s"] == row["torch"]["images_per_s"]
        assert record["torch_compiled"] is True
        assert all(math.isfinite(x) for x in row["torch_losses"])
        assert 0 < record["project_mfu"] < 10 and 0 < record["torch_mfu"] < 10


def test_gpu_run_gives_each_part_its_time(tmp_path, monkeypatch):
    """The calls' arithmetic, parts faked: the recipe gets the plan's epochs and the plan's end
    of pretraining; the speed call runs by value, keeps torch_eager's reserve for it until torch
    has run, runs it when torch failed, and skips a part that would get less than its plan."""
    import gpu_plan
    import gpu_run

    m = gpu_plan.measured()
    budget = gpu_plan.speed_budget(m)
    used = {"torch": 80, "torch_eager": 36, "throughput_bfloat16": 35}
    calls = []

    def fake_part(self, name, cmd, limit, out_dir, env=None, need=10.0):
        calls.append((name, cmd, limit, need))
        status = "skipped" if limit < need else "failed (exit 1)" if name == "torch" else "ok"
        if limit >= need:
            self.args.started_at -= used.get(name, 0)  # the seconds it took
        self.result["parts"][name] = {"status": status}
        return self.result["parts"][name]

    monkeypatch.setattr(gpu_run.Run, "part", fake_part)
    args = gpu_run.parse_args(["recipe", "--out", str(tmp_path / "a"), "--scratch", str(tmp_path)])
    gpu_run.recipe_call(args, gpu_run.Run(args), {})
    ((name, cmd, limit, _),) = calls
    epochs = gpu_plan.recipe_epochs(m)
    assert name == "recipe" and cmd[cmd.index("--epochs") + 1] == str(epochs)
    by = float(cmd[cmd.index("--pretrain-by") + 1])
    assert by - args.started_at == pytest.approx(gpu_plan.pretrain_ends_s(m, epochs), abs=0.1)
    assert limit == pytest.approx(gpu_plan.RECIPE_DEADLINE_S, abs=2)

    calls.clear()
    argv = [
        "speed",
        "--deadline-s",
        "200",
        "--out",
        str(tmp_path / "b"),
        "--scratch",
        str(tmp_path),
    ]
    args = gpu_run.parse_args(argv)
    gpu_run.speed_call(args, gpu_run.Run(args), {})
    names = [c[0] for c in calls]
    assert names == ["torch", "torch_eager", "throughput_bfloat16", "throughput_float32"]
    limits = {c[0]: (c[2], c[3]) for c in calls}
    eager = budget["torch_eager"]
    assert limits["torch"][0] == pytest.approx(200 - eager, abs=2)
    assert limits["torch_eager"] == (pytest.approx(200 - 80, abs=2), eager)
    assert limits["throughput_bfloat16"][0] == pytest.approx(200 - 80 - 36, abs=2)
    left = pytest.approx(200 - 80 - 36 - 35, abs=2)  # under float32's plan: skipped
    assert limits["throughput_float32"] == (left, budget["throughput_float32"])
    assert "--torch-compile" in calls[0][1] and "--torch-compile" not in calls[1][1]


def _ends(pid: int, within_s: float = 20.0) -> bool:
    """Whether process `pid` is gone or a zombie within `within_s` (a killed process may wait for
    the scheduler on a loaded machine before it dies)."""
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_gpu_run_records_a_failed_a_stopped_and_a_skipped_part(tmp_path):
    """Each part survives the others: one that fails or runs out of its time is recorded (the
    stopped one's whole process group ended) and the next part still runs."""
    import gpu_run

    args = gpu_run.parse_args(["speed", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path)])
    run = gpu_run.Run(args)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "r.json").write_text('{"x": 1}')
    py = sys.executable
    ok = run.part("ok", [py, "-c", "pass"], 60, str(tmp_path / "a"))
    failed = run.part("failed", [py, "-c", "raise SystemExit(3)"], 60, str(tmp_path))
    pid_file = tmp_path / "grandchild.pid"
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
    child += f"'import time; time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
    child += "time.sleep(60)"
    gpu_run.KILL_GRACE_S = 1
    stopped = run.part("stopped", [py, "-c", child], 11, str(tmp_path))
    skipped = run.part("skipped", [py, "-c", "pass"], 5, str(tmp_path))
    assert ok["status"] == "ok" and ok["result"] == {"x": 1}
    assert failed["status"] == "failed (exit 3)" and "result" not in failed
    assert (
        stopped["timed_out"]
        and stopped["status"].startswith("timed out")
        and stopped["wall_s"] < 30
    )
    assert skipped["status"].startswith("skipped") and "rc" not in skipped
    assert _ends(int(pid_file.read_text()))  # the grandchild too: its group was killed
    saved = json.loads((tmp_path / "out" / "cpu-speed.json").read_text())
    assert list(saved["parts"]) == ["ok", "failed", "stopped", "skipped"]
    assert saved["status"]["failed"] == "failed (exit 3)"


def test_gpu_run_keeps_the_curve_of_a_recipe_stopped_in_pretraining(tmp_path):
    """A recipe stopped before its JSON had a curve: the kNN points (in epochs) and pretrain.png
    come from its metrics.jsonl, which goes back too."""
    import gpu_run

    workdir = tmp_path / "recipe"
    workdir.mkdir()
    records = [
        {"step": s, "phase": "pretrain", "loss": 5 - s / 100, "learning_rate": 0.5}
        for s in (10, 20, 30, 40)
    ]
    records[1]["knn_acc"], records[3]["knn_acc"] = 0.3, 0.5
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = gpu_run.parse_args(
        ["recipe", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path)]
    )
    run = gpu_run.Run(args)
    stopped = {"steps_per_epoch": 10, "epochs": 100, "errors": {"pretrain": "Interrupted"}}
    run.result["parts"]["recipe"] = {"status": "timed out after 300 s", "result": stopped}
    gpu_run.collect_recipe(args, run, str(workdir))
    record = json.loads((tmp_path / "out" / "cpu-recipe.json").read_text())
    entry = record["parts"]["recipe"]
    assert entry["knn_curve_points"] == {
        "monitor": [[2, 0.3], [4, 0.5]],
        "init": None,
        "final": None,
    }
    assert record["knn_curve"] == [[2, 0.3], [4, 0.5]] and record["epochs"] == 100
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "cpu-recipe.json",
        "metrics.jsonl",
        "pretrain.png",
        "knn_curve.png",
    }
    for png in ("pretrain.png", "knn_curve.png"):  # as a device without matplotlib returns
        (tmp_path / "out" / png).unlink()
    gpu_run.main(["--draw", str(tmp_path / "out")])  # drawn here afterwards
    assert (tmp_path / "out" / "pretrain.png").exists() and (
        tmp_path / "out" / "knn_curve.png"
    ).exists()


def test_gpu_plan_budget_is_the_docs_table():
    """The budget comes from the committed H200 runs and fits each call; docs/gpu.md holds the
    tables exactly as gpu_plan prints them."""
    import gpu_plan

    m = gpu_plan.measured()
    assert (m["features_images"], m["probe_labels"]) == (20_000, 15_000)
    assert m["streamed_images_per_s"] < m["timed_images_per_s"]  # the streamed path's cost
    epochs = gpu_plan.recipe_epochs(m)

    def total(e):
        return sum(r[1] for r in gpu_plan.recipe_rows(m, e))

    assert total(epochs) <= gpu_plan.RECIPE_DEADLINE_S < total(epochs + 1)
    assert gpu_plan.pretrain_ends_s(m, epochs) < gpu_plan.RECIPE_DEADLINE_S
    assert sum(r[1] for r in gpu_plan.session_rows()) == gpu_plan.SESSION_S
    with open(os.path.join(ROOT, "docs", "gpu.md")) as f:
        assert gpu_plan.table(m) in f.read()


def _fake_wheels(folder, pins: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for dist, version in pins.items():
        (folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"w" * 10)


def test_gpu_plan_refuses_wheels_other_than_the_pins(tmp_path):
    """A second version of one package, one not pinned, another version than the pin, a pin
    without its wheel: each refused, and gpu_run.sh stops before any part runs."""
    import gpu_plan

    pins = gpu_plan.read_pins()
    assert set(pins) == {"ml-collections", "grain", "array-record", "portpicker", "tensorboardx"}
    folder = tmp_path / "whl"
    _fake_wheels(folder, pins)
    assert gpu_plan.check_wheels(str(folder), pins) == []
    (folder / "grain-0.2.15-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")  # stale
    (folder / "numpy-2.0.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (folder / "ml_collections-1.1.0-py3-none-any.whl").rename(
        folder / "ml_collections-1.0.0-py3-none-any.whl"
    )
    (folder / "portpicker-1.6.0-py3-none-any.whl").unlink()
    assert gpu_plan.check_wheels(str(folder), pins) == [
        "grain: 2 wheels (0.2.15, 0.2.18)",
        "numpy: not pinned in device_wheels.txt",
        "ml-collections: 1.0.0, pinned 1.1.0",
        "portpicker==1.6.0: no wheel",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OUT=str(tmp_path / "out"), WHEELS=str(folder), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), "recipe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "REFUSED grain: 2 wheels" in (tmp_path / "out" / "recipe.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["recipe.log"]


def test_gpu_plan_counts_what_travels(tmp_path, capsys, monkeypatch):
    """What a call carries: tracked and untracked-not-ignored files and the carry paths (not the
    ignored rest, not the pack's neighbours); over the limit, the check refuses the call."""
    import gpu_plan

    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    files = {
        "pkg/tracked.py": 100,
        "untracked.md": 50,
        ".gitignore": 0,
        "ignored.log": 1000,
        ".devdata/cifar10_pack/train.array_record": 300,
        ".devdata/cifar10_pack/sub/labels.npy": 200,
        ".devdata/cifar_pack.npz": 5000,  # beside the pack: stays here
    }
    for path, size in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x" * size)
    (root / ".gitignore").write_text("/.whl/\n/.devdata/\nignored.log\n")
    meta = {"splits": {"train": {"num_examples": 50_000}, "test": {"num_examples": 10_000}}}
    (root / ".devdata/cifar10_pack/simclr_pack.json").write_text(json.dumps(meta))
    subprocess.run(["git", "add", "pkg/tracked.py"], cwd=root, check=True)
    _fake_wheels(root / ".whl", gpu_plan.read_pins())
    gitignore = len((root / ".gitignore").read_bytes())
    pack = 300 + 200 + len(json.dumps(meta))
    want = 100 + 50 + gitignore + pack + 5 * 10
    total, lines = gpu_plan.size_report(str(root), list(gpu_plan.CARRY["recipe"]))
    assert total == want and f"  carry .devdata/cifar10_pack: {pack} bytes" in lines
    assert gpu_plan.check("recipe", str(root)) == 0
    printed = capsys.readouterr().out
    assert f"total {want:,} bytes" in printed and "ok; the call: run(command=" in printed
    monkeypatch.setattr(gpu_plan, "TRAVEL_LIMIT", want - 1)
    assert gpu_plan.check("recipe", str(root)) == 1
    assert "REFUSED size" in capsys.readouterr().out


def test_peak_matmul_runs_on_random_operands():
    """The MFU's peak is measured on random data, not on constants (faster on a GPU)."""
    import jax.numpy as jnp
    import throughput

    peak = throughput.Peak(64, jnp.float32)
    for operand in (peak.single[1], peak.multi[1]):
        assert float(jnp.std(operand)) > 0.5 and abs(float(jnp.mean(operand))) < 0.2
    assert len(peak.samples) == 1 and peak.samples[0] > 0


@pytest.mark.torch
def test_torch_nt_xent_is_the_project_loss():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import torch_reference

    from simclr_jax.core import losses

    assert torch_reference.OBJECTIVE_SCALE == losses.OBJECTIVE_SCALE
    assert torch_reference.LARGE_NUM == losses.LARGE_NUM
    z1, z2 = np.random.default_rng(0).normal(size=(2, 12, 16))
    want = float(losses.nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.5))
    got = torch_reference.nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), 0.5).item()
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.torch
def test_torch_model_has_the_flax_model_parameters():
    """Same parameter tensors (sizes, sorted) and BN statistics: the same architecture."""
    pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import torch_reference

    from configs import cifar_simclr
    from simclr_jax.core import networks

    config = cifar_simclr.get_config()
    config.model.width = 0.25
    model = networks.build_model(config.model)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    flax_sizes = sorted(p.size for p in jax.tree.leaves(shapes["params"]))
    flax_stats = sum(p.size for p in jax.tree.leaves(shapes["batch_stats"]))
    m = config.model
    reference = torch_reference.SimCLRModel(0.25, m.head_layers, m.proj_dim, m.head_bn_output)
    assert sorted(p.numel() for p in reference.parameters()) == flax_sizes
    assert torch_reference.parameter_count(reference) == sum(flax_sizes)
    running = [b for name, b in reference.named_buffers() if name.endswith(("_mean", "_var"))]
    assert sum(b.numel() for b in running) == flax_stats


@pytest.mark.torch
def test_torch_lars_is_optax_lars():
    torch = pytest.importorskip("torch")
    import optax
    import torch_reference

    from simclr_jax.core import optim

    rng = np.random.default_rng(0)
    shapes = {"kernel": (3, 3, 4, 8), "bias": (8,), "zero_kernel": (5, 6)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params["zero_kernel"][:] = 0  # |p| = 0: trust ratio 1
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in "abc"]
    tx = optax.lars(
        0.7,
        weight_decay=1e-4,
        weight_decay_mask=optim.decay_mask,
        trust_coefficient=1e-3,
        trust_ratio_mask=optim.decay_mask,
        momentum=0.9,
    )
    want, state = dict(params), tx.init(params)
    ours = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch_reference.LARS(ours.values(), 0.7, weight_decay=1e-4, momentum=0.9)
    for g in grads:
        updates, state = tx.update(g, state, want)
        want = optax.apply_updates(want, updates)
        for k, p in ours.items():
            p.grad = torch.from_numpy(g[k])
        opt.step()
    for k, p in ours.items():
        np.testing.assert_allclose(p.detach().numpy(), np.asarray(want[k]), atol=1e-6)
        assert not np.allclose(p.detach().numpy(), params[k])  # it moved


@pytest.mark.torch
def test_torch_step_trains():
    pytest.importorskip("torch")
    import torch_reference

    losses = torch_reference.self_check(width=0.125, batch=16, steps=4)
    assert len(losses) == 4


def test_conv_layers_ab_writes_its_json_and_tables(tmp_path):
    """The per-convolution A/B: two arms in alternating processes, per layer the rounds' median;
    its layer list is ResNet-18's convolutions at that width (the model's own kernel shapes)."""
    import conv_layers
    import jax

    from simclr_jax.core import networks
    from tests.helpers import tiny_config

    config = tiny_config(**{"model.name": "resnet18", "model.width": 0.125})
    model = networks.build_model(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), True))
    kernels = {
        tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"]["encoder"])[0]
        if jax.tree_util.keystr(path).endswith("['kernel']")
    }
    assert {(k, k, ci, co) for _, ci, co, k, _, _ in conv_layers.scaled(0.125)} == kernels

    stdout = _run(
        "conv_layers.py",
        *("--batch", "2", "--widths", "0.125", "--arms", "auto,default", "--rounds", "1"),
        *("--repeats", "1", "--tag", "t", "--out", str(tmp_path)),
    )
    (path,) = tmp_path.glob("*.json")
    assert path.name == "cpu-conv-layers-b2-t.json"
    result = json.loads(path.read_text())
    assert list(result["arms"]) == ["auto", "default"]
    rows = result["arms"]["default"]["rows"]
    assert result["kind"] == "conv_layers" and result["rounds"] == 1 and len(rows) == 11
    assert sum(r["count"] for r in rows) == 20  # ResNet-18: 17 3x3 convolutions and 3 shortcuts
    for r in rows:
        assert set(r["ms"]) == set(conv_layers.DIRECTIONS) - (
            {"input grad"} if "3->" in r["layer"] else set()
        )
        assert all(ms > 0 for ms in r["ms"].values()) and len(r["samples"]["forward"]) == 1
    assert "| 0.125 | filter grad | " in stdout and "| 0.125 | 3x3 3->8 /1 @32 (x1) | " in stdout


def test_collectives_counts_the_steps_cross_device_traffic(tmp_path):
    """The tiny step on 8 simulated devices: the gradients (every parameter) are all-reduced, z of
    both views is all-gathered over the global batch, and global BN adds its own all-reduces."""
    out = tmp_path / "collectives.json"
    _run(
        "collectives.py",
        *("--devices", "8", "--set", "model.name=tiny", "--batch", "32"),
        *("--precision", "float32", "--out", str(out)),
    )
    result = json.loads(out.read_text())
    ops = result["collectives"]
    assert result["devices"] == 8 and result["global_batch"] == 32
    assert ops["all-reduce"]["elements"] >= result["params"]  # the gradients' mean, at least
    assert ops["all-reduce"]["count"] > 2  # and BN's statistics, layer by layer
    assert ops["all-gather"]["elements"] >= 2 * 32 * 128  # z of both views, every device's rows


def test_the_selector_tables_are_the_committed_reports(capsys):
    """benchmarks/results/digits_selector/selector.md holds every row and mean that
    selector_tables.py computes from the report.json files committed beside it."""
    import selector_tables

    root = os.path.join(ROOT, "benchmarks", "results", "digits_selector")
    selector_tables.main(root)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert sum(line.startswith("| 0, ") or line.startswith("| 1, ") for line in lines) == 10
    with open(os.path.join(root, "selector.md")) as f:
        text = f.read()
    missing = [line for line in lines if not line.endswith(":") and line not in text]
    assert not missing, missing
