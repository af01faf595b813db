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


def test_recipe_run_packs_data_then_pretrains_and_probes_from_the_pack(tmp_path):
    """The accelerator's one-call script, on the CPU: --pack writes a data file small enough to
    send, then a run from it times the step, sizes the epochs to the budget, pretrains and
    evaluates the frozen encoder on every train label."""
    npz = tmp_path / "digits.npz"
    stdout = _run("recipe_run.py", "--config", "configs/digits_simclr.py", "--pack", str(npz))
    stdout += _run(
        "recipe_run.py",
        *("--config", "configs/digits_simclr.py", "--npz", str(npz), "--minutes", "0.1"),
        *("--set", "pretrain.batch_size=64", "--set", "seed=3", "--set", "pretrain.log_every=5"),
        *("--precision", "float32", "--timing-steps", "2"),
        *("--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "results")),
    )
    assert "1437 train images" in stdout, stdout
    (path,) = (tmp_path / "results").glob("*.json")
    assert path.name == "cpu-digits-resnet18-float32-recipe.json"
    result = json.loads(path.read_text())
    assert result["train_images"] == 1437 and result["test_images"] == 360
    assert result["epochs"] >= 1 and result["steps"] == result["epochs"] * (1437 // 64)
    assert result["timed_images_per_s"] > 0 and result["images_per_s"] > 0
    assert 0.0 <= result["knn_acc"] <= 1.0 and 0.0 <= result["linear_acc"] <= 1.0
    assert result["linear_l2"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the grid, widened
    assert math.isfinite(result["final_loss"])
    # What the run must show: the loss falls, and the frozen kNN beats the model at step 0.
    assert result["final_loss"] < result["first_logged_loss"], result
    assert result["knn_acc"] > result["knn_acc_at_init"], result


@pytest.mark.torch
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


def _tiny_pack(tmp_path) -> str:
    """A 3-class folder (120 train, 30 test images) packed at 16 px by the pack CLI."""
    from tests.folder_fixture import write_folder

    folder = tmp_path / "images"
    write_folder(str(folder), train_per_class=40, test_per_class=10, unlabelled=0, corrupt=0)
    os.rmdir(folder / "unlabelled")  # empty: not a split
    pack = tmp_path / "pack"
    done = subprocess.run(
        [sys.executable, "-m", "simclr_jax.pack", str(folder), str(pack), "--canvas", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(pack)


# gpu_run.sh at a tiny size: the recipe's overrides, then throughput's and the PyTorch part's.
# Throughput and the PyTorch comparison at the sizes of the two tests above (2 devices, batch 8,
# ResNet-18 width 0.125): their float32 programs then come from the session's compilation cache.
# Throughput in float32 only: the bf16 run is the same code with another --precision, and
# XLA:CPU compiles bf16 programs slowly.
TINY_GPU_RUN = [
    *("--set", "model.name=tiny", "--set", "pretrain.batch_size=32", "--set", "data.image_size=16"),
    *("--set", "downstream.batch_size=32", "--set", "pretrain.log_every=1"),
    *("--set", "downstream.linear_iters=20", "--set", "downstream.linear_l2_grid=(0.01,)"),
    *("--precision", "float32", "--timing-steps", "2", "--downstream-epochs", "1"),
    *("--model", "tiny", "--batch", "8", "--devices", "2", "--peak-size", "256"),
    *("--throughput-steps", "1", "--throughput-warmup", "0", "--throughput-precisions", "float32"),
    *("--torch-device", "cpu", "--torch-autocast", "none", "--torch-width", "0.125"),
    *("--torch-compile-backend", "aot_eager", "--torch-threads", "1"),
    *("--torch-steps", "2", "--torch-block", "1", "--torch-warmup", "1"),
]


def test_gpu_run_sh_runs_every_part_end_to_end_on_the_cpu(tmp_path):
    """The prepared one-call GPU run (benchmarks/gpu_run.sh -> gpu_run.py) on the CPU at a tiny
    size, without tensorflow-datasets (the device's image has none): a pack made here; the
    recipe streamed from it with the kNN monitor every epoch, the frozen probe and kNN on every
    train label, fine-tune vs scratch; throughput (float32 here); the PyTorch comparison
    (torch.compile traced with the aot_eager backend: inductor's code generation is too slow
    for a test on a small CPU, so the GPU's own backend is not run here). One JSON holds every part."""
    has_torch = importlib.util.find_spec("torch") is not None
    pack = _tiny_pack(tmp_path)
    blocker = tmp_path / "no_tfds" / "tensorflow_datasets"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no tensorflow-datasets here')\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OUT=str(out), WHEELS="", PYTHON=sys.executable, DATA_DIR=pack, EPOCHS="3")
    env.update(KNN_EVERY="1", PYTHONPATH=str(blocker.parent))
    env["PARTS"] = "recipe,throughput" + (",torch" if has_torch else "")
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), *TINY_GPU_RUN]
        + ["--scratch", str(tmp_path / "scratch")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names == {"gpu.txt", "gpu_run.log", "gpu_run.json", "knn_curve.png", "pretrain.png"} | {
        "metrics.jsonl"
    }  # at most 8 files come back from the device
    for png in ("knn_curve.png", "pretrain.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "jax" in (out / "gpu.txt").read_text()
    log = (out / "gpu_run.log").read_text()
    assert "set-up done" in log and "[gpu_run +" in log and "[recipe +" in log  # time marks
    result = json.loads((out / "gpu_run.json").read_text())
    parts = result["parts"]
    want = ["recipe", "throughput_float32"] + ["torch"] * has_torch
    assert list(parts) == want and all(parts[p]["status"] == "ok" for p in want), parts

    recipe = parts["recipe"]["result"]
    assert "errors" not in recipe, recipe["errors"]
    assert recipe["dataset"] == "folder" and recipe["data_dir"] == pack
    assert (recipe["train_images"], recipe["test_images"], recipe["epochs"]) == (120, 30, 3)
    assert recipe["steps"] == 3 * (120 // 32) == 3 * recipe["steps_per_epoch"]
    assert math.isfinite(recipe["final_loss"]) and math.isfinite(recipe["first_logged_loss"])
    assert recipe["timed_images_per_s"] > 0 and recipe["images_per_s"] > 0
    curve = recipe["knn_curve"]  # the monitor, every epoch
    assert [e for e, _ in curve] == [1, 2, 3] and all(0 <= a <= 1 for _, a in curve)
    assert recipe["knn_acc"] == pytest.approx(curve[-1][1], abs=1.5 / 30)  # same encoder
    for key in ("linear_acc", "knn_acc", "knn_acc_at_init"):
        assert 0.0 <= recipe[key] <= 1.0, key
    fts = recipe["fine_tune_vs_scratch"]
    assert fts["epochs"] == 1 and fts["num_labelled"] == 120
    for run in ("finetune", "scratch"):
        assert 0.0 <= fts[run]["test_acc"] <= 1.0 and len(fts[run]["test_acc_by_epoch"]) == 1
    assert parts["recipe"]["knn_curve_points"]["monitor"] == curve

    res = parts["throughput_float32"]["result"]
    assert res["precision"] == "float32" and res["model"] == "tiny" and res["device_count"] == 2
    (step,) = res["parts"]
    assert step["part"] == "pretrain" and step["images_per_s"] > 0 and 0 < step["mfu"] < 10
    head = result["headline"]
    assert head["epochs"] == 3 and head["linear_acc"] == recipe["linear_acc"]
    assert head["finetune_test_acc"] == fts["finetune"]["test_acc"]
    assert (
        head["throughput_float32_mfu"] == parts["throughput_float32"]["result"]["parts"][0]["mfu"]
    )
    if has_torch:
        res = parts["torch"]["result"]
        assert res["torch_compile"] and res["torch_compile_backend"] == "aot_eager"
        assert res["torch_device"] == "cpu" and res["precision"] == "float32"
        (row,) = res["widths"]
        ratio = row["jax"]["images_per_s"] / row["torch"]["images_per_s"]
        assert row["ratio"] == pytest.approx(ratio) and head["torch"]["ratio"] == row["ratio"]
        assert all(math.isfinite(x) for x in row["torch_losses"])
        assert 0 < head["torch"]["project_mfu"] < 10 and 0 < head["torch"]["torch_mfu"] < 10


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

    args = gpu_run.parse_args(["--out", str(tmp_path / "out"), "--scratch", str(tmp_path)])
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
    saved = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert list(saved["parts"]) == ["ok", "failed", "stopped", "skipped"]
    assert saved["headline"]["status"]["failed"] == "failed (exit 3)"


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
    args = gpu_run.parse_args(["--out", str(tmp_path / "out"), "--scratch", str(tmp_path)])
    run = gpu_run.Run(args)
    stopped = {"steps_per_epoch": 10, "epochs": 100, "errors": {"pretrain": "Interrupted"}}
    run.result["parts"]["recipe"] = {"status": "timed out after 300 s", "result": stopped}
    gpu_run.collect_recipe(args, run, str(workdir))
    entry = json.loads((tmp_path / "out" / "gpu_run.json").read_text())["parts"]["recipe"]
    assert entry["knn_curve_points"] == {
        "monitor": [[2, 0.3], [4, 0.5]],
        "init": None,
        "final": None,
    }
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "gpu_run.json",
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


@pytest.mark.torch
def test_torch_nt_xent_is_the_project_loss():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import torch_reference

    from simclr_jax import losses

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
    from simclr_jax import models

    config = cifar_simclr.get_config()
    config.model.width = 0.25
    model = models.build_model(config.model)
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

    from simclr_jax import optim

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

    from simclr_jax import models
    from tests.helpers import tiny_config

    config = tiny_config(**{"model.name": "resnet18", "model.width": 0.125})
    model = models.build_model(config.model)
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


def test_peak_matmul_runs_on_random_operands():
    """The MFU's peak is measured on random data, not on constants (faster on a GPU)."""
    import jax.numpy as jnp
    import throughput

    peak = throughput.Peak(64, jnp.float32)
    for operand in (peak.single[1], peak.multi[1]):
        assert float(jnp.std(operand)) > 0.5 and abs(float(jnp.mean(operand))) < 0.2
    assert len(peak.samples) == 1 and peak.samples[0] > 0
