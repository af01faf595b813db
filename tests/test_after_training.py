"""What a user gets from a finished run (the session's shared tiny `run.py` run): the encoder in their own
code (`load_encoder`, checked against the model's own `encode`), the pictures (made from the run's
own data and keys), the console (log lines above the progress bars, the closing summary), and the
workdir itself (moved and rerun as it is, or refused)."""

import json
import os
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

import simclr_jax
from simclr_jax import pretrained
from simclr_jax.core import augment, networks
from simclr_jax.data import dataset, sources
from simclr_jax.errors import CheckpointError
from simclr_jax.report import build, pictures, plots
from simclr_jax.runtime import files
from simclr_jax.train.state import DATA_KEY, compute_dtype, restore_encoder, seed_key
from tests.helpers import FINISHED_FLAGS, FINISHED_STEPS, checkpoint_tree, run_cli

STEPS = FINISHED_STEPS  # two epochs of 256 images at batch 32: the kNN monitor runs twice


@pytest.fixture(scope="module")
def run(finished_run):
    """The session's shared finished run (read only: tests that change it copy it)."""
    workdir = finished_run["workdir"]
    config = pretrained.read_config(workdir)
    out = SimpleNamespace(stdout=finished_run["stdout"], stderr=finished_run["stderr"])
    return {
        "workdir": workdir,
        "out": out,
        "config": config,
        "ds": dataset.load(config.data),
        "args": FINISHED_FLAGS,  # the command, but its --workdir
    }


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------- load_encoder


def test_load_encoder_matches_the_models_own_encode(run):
    workdir, config, ds = run["workdir"], run["config"], run["ds"]
    enc = simclr_jax.load_encoder(workdir)  # the workdir: its newest pretraining checkpoint
    assert enc.step == STEPS and enc.source.endswith(os.path.join("checkpoints", "pretrain"))
    images = ds.test.read(np.arange(20))  # (20, S, S, 3) uint8

    # The model's own encode, with f as downstream restores it.
    f, step = restore_encoder(config, os.path.join(workdir, "checkpoints", "pretrain"))
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    spec = augment.spec_from_config(config)  # the run's input size and normalisation
    x = augment.downstream_batch(None, 0, images, None, train=False, image_size=spec.image_size)
    x = dataset.normalize(x, spec)
    variables = {"params": {"encoder": f["params"]}, "batch_stats": {"encoder": f["batch_stats"]}}
    want_h = model.apply(variables, x, train=False, method="encode")
    h = enc(images)
    assert h.shape == want_h.shape == (20, networks.build_encoder(config.model).feat_dim)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc(images / 255.0), want_h, rtol=1e-4, atol=1e-5)  # float input
    np.testing.assert_allclose(enc(images, batch_size=7), want_h, rtol=1e-5, atol=1e-6)

    # z, with g from the same checkpoint.
    tree = checkpoint_tree(workdir, STEPS)
    full = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    want_h2, want_z = model.apply(full, x, train=False)
    h2, z = enc(images, projection=True)
    np.testing.assert_allclose(h2, want_h2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, enc.variables, full)
    jax.tree.map(np.testing.assert_array_equal, enc.encoder_variables, f)


def test_load_encoder_gives_each_head_layer_as_the_model_does(run, tmp_path):
    """encoder(images, layer=k): the output of the first k head layers, as the model's own apply
    gives it (0 = h, head_layers = z); by default the run's downstream.ft_proj_selector, and a
    downstream-only workdir's own when load_encoder follows its config.restore."""
    workdir, config, ds = run["workdir"], run["config"], run["ds"]
    enc = simclr_jax.load_encoder(workdir)
    assert enc.layer == 0 and config.model.head_layers == 3
    images = ds.test.read(np.arange(12))
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    x = pretrained.preprocess(images, augment.spec_from_config(config))
    h, z = model.apply(enc.variables, x, train=False)
    want_1 = model.apply(enc.variables, x, False, 1, method="features")
    np.testing.assert_allclose(enc(images, layer=1), want_1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enc(images, layer=0), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc(images, layer=3), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(enc(images, layer=-1), enc(images, layer=3))  # the official -1
    assert want_1.shape == (12, h.shape[1])  # hidden dim 0: the feature dim
    with pytest.raises(ValueError, match="layer must be in 0..3 or -1"):
        enc(images, layer=4)
    # A workdir that ran only the downstream stage at selector 2, from this run's encoder.
    downstream_dir = tmp_path / "downstream"
    downstream_dir.mkdir()
    other = json.loads(open(os.path.join(workdir, "config.json")).read())
    other["restore"], other["downstream"]["ft_proj_selector"] = workdir, 2
    (downstream_dir / "config.json").write_text(json.dumps(other))
    chained = simclr_jax.load_encoder(str(downstream_dir))
    assert chained.layer == 2
    np.testing.assert_array_equal(chained(images), enc(images, layer=2))


def test_the_portable_export_is_the_final_state(run):
    workdir = run["workdir"]
    path = os.path.join(workdir, pretrained.EXPORT_FILE)
    exported = simclr_jax.load_encoder(path)
    tree = checkpoint_tree(workdir, STEPS)
    assert exported.step is None and exported.source == path
    jax.tree.map(np.testing.assert_array_equal, exported.variables, {
        "params": tree["params"], "batch_stats": tree["batch_stats"]
    })  # fmt: skip
    images = run["ds"].test.read(np.arange(8))
    from_ckpt = simclr_jax.load_encoder(os.path.join(workdir, "checkpoints", "pretrain"))
    np.testing.assert_array_equal(exported(images), from_ckpt(images))


def test_a_relative_restore_is_the_workdirs_and_a_loop_is_one_line(run, tmp_path, monkeypatch):
    """A workdir that ran --mode=downstream from another run: its config.json's relative
    `restore` is taken relative to that workdir, wherever the caller stands; a chain of restores
    that comes back to where it started is a CheckpointError naming the chain."""
    import shutil

    shutil.copytree(run["workdir"], tmp_path / "pretrained", ignore=shutil.ignore_patterns("*.png"))
    config = json.load(open(os.path.join(run["workdir"], "config.json")))
    for name, restore in (("down", "../pretrained"), ("a", "../b"), ("b", "../a")):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "config.json", "w") as f:
            json.dump({**config, "restore": restore}, f)
    monkeypatch.chdir(tmp_path / "a")  # '../pretrained' from here is no run
    enc = simclr_jax.load_encoder(str(tmp_path / "down"))
    assert enc.source == str(tmp_path / "pretrained" / "checkpoints" / "pretrain")
    with pytest.raises(CheckpointError, match="chain loops") as err:
        simclr_jax.load_encoder(str(tmp_path / "a"))
    assert "\n" not in str(err.value) and str(tmp_path / "b") in str(err.value)


def test_load_encoder_refuses_a_directory_without_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="holds no pretrained encoder"):
        simclr_jax.load_encoder(str(tmp_path))


# ----------------------------------------------------------------------------- pictures


def test_the_pictures_are_written_and_linked_from_the_report(run):
    workdir = run["workdir"]
    sizes = {}
    for name in (files.VIEWS_PNG, files.PRETRAIN_PNG, files.NEIGHBOURS_PNG):
        with Image.open(os.path.join(workdir, name)) as im:
            sizes[name] = im.size
    assert sizes[files.VIEWS_PNG] == (1020, 420)  # 8 columns x (source, view 1, view 2)
    assert sizes[files.PRETRAIN_PNG] == (1260, 360)  # loss, learning rate, kNN: 3 panels
    assert sizes[files.NEIGHBOURS_PNG] == (790, 1160)  # 8 test images x (itself + 5 neighbours)
    md = open(os.path.join(workdir, build.REPORT_MD)).read()
    for name in (files.VIEWS_PNG, files.PRETRAIN_PNG, files.NEIGHBOURS_PNG):
        assert f"]({name})" in md


def test_views_are_the_first_steps_own(run, tmp_path):
    config, ds = run["config"], run["ds"]
    v = pictures.first_views(config, ds.pretrain)
    # Step 0's global batch, as the stream feeds it to pretrain_step: the first 32 of the
    # first epoch's permutation.
    perm = jax.random.permutation(jax.random.fold_in(seed_key(0, DATA_KEY), 0), len(ds.pretrain))
    batch_ids = np.asarray(perm)[:32]
    train_images = sources.read_all(ds.pretrain)
    np.testing.assert_array_equal(v["ids"], batch_ids[:8])
    np.testing.assert_array_equal(v["sources"], train_images[batch_ids[:8]])
    spec = augment.spec_from_config(config)
    v1, v2 = augment.two_views(seed_key(0, 2), 0, train_images[batch_ids], batch_ids, spec)
    np.testing.assert_allclose(v["view1"], v1[:8], atol=1e-6)
    np.testing.assert_allclose(v["view2"], v2[:8], atol=1e-6)
    assert not np.allclose(v["view1"], v["view2"])
    fig = pictures.write_views(config, ds, str(tmp_path))
    assert len(fig.axes) == 24 and [ax.get_ylabel() for ax in fig.axes[::8]] == [
        "source", "view 1", "view 2"
    ]  # fmt: skip
    np.testing.assert_array_equal(  # the run's picture is this one
        _pixels(os.path.join(tmp_path, files.VIEWS_PNG)),
        _pixels(os.path.join(run["workdir"], files.VIEWS_PNG)),
    )


def test_pretrain_picture_shows_the_runs_records(run, tmp_path):
    workdir, config = run["workdir"], run["config"]
    for name in ("metrics.jsonl", "config.json"):
        (tmp_path / name).write_text(open(os.path.join(workdir, name)).read())
    fig = pictures.write_pretrain_curves(config, str(tmp_path), num_classes=10)
    records = [r for r in build.read_records(str(tmp_path / "metrics.jsonl"))]
    records = [r for r in records if r["phase"] == "pretrain"]
    loss_ax, lr_ax, knn_ax = fig.axes
    assert loss_ax.get_ylabel() == "NT-Xent loss" and loss_ax.get_xlabel() == "step"
    np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), [r["loss"] for r in records])
    np.testing.assert_array_equal(lr_ax.lines[0].get_ydata(), [r["learning_rate"] for r in records])
    knn = [r["knn_acc"] for r in records if "knn_acc" in r]
    assert len(knn) == 2 and list(knn_ax.lines[0].get_ydata()) == knn
    assert any("chance" in line.get_label() for line in knn_ax.lines)
    # The online linear head beside it (on by default: digits has labels): its test accuracy at
    # the kNN points, its train-view accuracy at every record.
    lines = {line.get_label(): line for line in knn_ax.lines}
    head_test = [r["online_probe_test_acc"] for r in records if "online_probe_test_acc" in r]
    assert len(head_test) == 2
    assert list(lines["online linear head (test)"].get_ydata()) == head_test
    train = lines["online linear head (train views)"]
    assert list(train.get_ydata()) == [r["online_probe_acc"] for r in records]
    assert list(train.get_xdata()) == [r["step"] for r in records]
    np.testing.assert_array_equal(
        _pixels(tmp_path / files.PRETRAIN_PNG), _pixels(os.path.join(workdir, files.PRETRAIN_PNG))
    )


def test_the_report_shows_the_online_probe_beside_the_knn_monitor(run):
    workdir = run["workdir"]
    rep = json.load(open(os.path.join(workdir, build.REPORT_JSON)))
    records = build.read_records(os.path.join(workdir, "metrics.jsonl"))
    records = [r for r in records if r["phase"] == "pretrain"]
    head, pre = rep["pretrain"]["online_probe"], rep["pretrain"]
    assert head["on"] and head["off_because"] is None
    points = [r for r in records if "knn_acc" in r]
    assert head["test_curve"] == [[r["step"], r["online_probe_test_acc"]] for r in points]
    assert head["train_acc"] == records[-1]["online_probe_acc"]
    assert head["test_acc"] == points[-1]["online_probe_test_acc"]
    md = open(os.path.join(workdir, build.REPORT_MD)).read()
    assert f"train-view top-1 {100 * head['train_acc']:.2f}%" in md
    assert f"test top-1 {100 * head['test_acc']:.2f}% at step {STEPS}" in md
    for r in points:  # the monitor's points, both evaluations side by side
        row = (
            f"| {r['step']} | {100 * r['knn_acc']:.2f}% | {100 * r['online_probe_test_acc']:.2f}% "
            f"| {100 * r['online_probe_acc']:.2f}% |"
        )
        assert row in md, row
    assert pre["knn_curve"] == [[r["step"], r["knn_acc"]] for r in points]


def test_one_outlier_does_not_set_the_loss_axis(tmp_path):
    records = [
        {"step": s, "loss": 6.0 - 0.05 * s, "learning_rate": 0.1} for s in range(1, 41)
    ]  # fmt: skip
    records[0]["loss"] = 1e4  # a spike at the first step
    fig = plots.pretrain_curves(records, str(tmp_path / "p.png"), "t")
    lo, hi = fig.axes[0].get_ylim()
    assert hi < 10 and lo < 4.0  # the other 39 points span 4.0 .. 5.9
    assert len(fig.axes) == 2  # no kNN records: no kNN panel
    assert fig.axes[0].lines[1].get_label() == "off the axis"  # the spike, marked at the edge


def test_neighbours_are_the_nearest_in_h_space(run, tmp_path):
    workdir, config, ds = run["workdir"], run["config"], run["ds"]
    source = os.path.join(workdir, "checkpoints", "pretrain")
    fig, nn = pictures.write_neighbours(config, ds, str(tmp_path), source)
    assert len(fig.axes) == 8 * 6
    np.testing.assert_array_equal(ds.test_labels[nn["queries"]], np.arange(8))  # a class each
    # The same neighbours from load_encoder's h: the top-5 cosine similarities agree.
    enc = simclr_jax.load_encoder(workdir)
    bank = np.asarray(enc(sources.read_all(ds.train)), np.float64)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = np.asarray(enc(ds.test.read(nn["queries"])), np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ bank.T  # (8, N)
    np.testing.assert_allclose(np.sort(sims, axis=1)[:, ::-1][:, :5], nn["sims"], atol=1e-4)
    chosen = np.take_along_axis(sims, nn["neighbours"], axis=1)
    np.testing.assert_allclose(chosen, nn["sims"], atol=1e-4)
    with Image.open(tmp_path / files.NEIGHBOURS_PNG) as a:
        with Image.open(os.path.join(workdir, files.NEIGHBOURS_PNG)) as b:
            assert a.size == b.size


def test_classifier_plots_say_what_they_show_and_mark_chance(tmp_path):
    curve = {"epoch": [1, 2], "test_acc": [0.3, 0.5], "train_acc": [0.2, 0.6]}
    curve |= {"test_loss": [2.0, 1.5], "train_loss": [2.1, 1.2]}
    rep = {
        "finetune": curve,
        "scratch": curve,
        "num_labelled": 72,
        "chance": {"test_acc": 0.1},
        "config": {"data": {"name": "digits"}},
    }
    acc = plots.classifier_curves(rep, "acc", str(tmp_path / "a.png"))
    assert acc.axes[0].get_ylabel().startswith("classifier accuracy")
    chance = [line for line in acc.axes[0].lines if "chance" in line.get_label()]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.1, 0.1]
    loss = plots.classifier_curves(rep, "loss", str(tmp_path / "l.png"))
    assert loss.axes[0].get_ylabel().startswith("classifier cross-entropy loss")
    assert not any("chance" in line.get_label() for line in loss.axes[0].lines)


# ----------------------------------------------------------------------------- console


def test_the_console_ends_with_the_numbers_and_the_report_path(run):
    workdir, out = run["workdir"], run["out"]
    lines = out.stdout.strip().splitlines()
    rep = json.load(open(os.path.join(workdir, build.REPORT_JSON)))
    ft = rep["finetune"]["final_test_acc"]
    assert lines[0] == f"done: results in {workdir}"
    assert any(f"fine-tuned from SimCLR {100 * ft:.2f}%" in line for line in lines)
    assert any("linear probe" in line and "kNN" in line for line in lines)
    assert lines[-1] == f"  report: {os.path.join(workdir, build.REPORT_MD)}"
    assert os.path.isabs(lines[-1].split("report: ")[1])


def test_log_lines_print_above_the_progress_bars(run):
    err = run["out"].stderr
    assert "pretrain: compiling the first step" in err
    # Logged while a bar is on screen (one per classifier epoch): each starts a line of its own,
    # where a plain print would continue the bar's line.
    logged = [line for line in err.split("\n") if "test acc" in line and "epoch" in line]
    epochs = run["config"].downstream.epochs
    assert len(logged) == 2 * epochs  # fine-tuned and scratch
    for line in logged:
        assert line.split("\r")[-1].startswith("I"), repr(line)


def test_a_legal_but_odd_setting_is_warned_of_once_in_the_log_and_the_report(run):
    """The shared run's classifier warm-up (3 epochs) is as long as its 3-epoch runs (app/data_checks.py)."""
    workdir, err = run["workdir"], run["out"].stderr
    note = "downstream.warmup_epochs=3 is 6 steps and the 3-epoch classifier run has 6"
    assert err.count(note) == 1, err[-3000:]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert any(w.startswith(note) for w in config["warnings"])
    md = open(os.path.join(workdir, build.REPORT_MD)).read()
    assert "## Warnings" in md and f"- {note}" in md


# ----------------------------------------------------------------------------- the workdir


def _files(workdir: str) -> dict:
    """Every file under `workdir`, by relative path: its bytes."""
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def test_a_moved_workdir_redoes_nothing_and_a_refused_rerun_changes_no_file(run, tmp_path):
    """A workdir holds no path of its own: moved elsewhere and rerun with the same command, it
    retrains nothing (its classifier runs know their encoder by content) and ends with the same
    records and report. Rerun there with a pretraining setting it was not made with, it is
    refused in one line naming the key; with a checkpoint made for other data, too; and neither
    refusal changes a file (views.png included). Slower than most (three runs of run.py: 35 s, and
    100 s under heavy load, on the shared 2-core machine): the one rerun that goes through every
    stage is what shows that nothing is redone; the two refusals stop after loading the data."""
    from tests.test_stops import _numbers, _report

    moved = str(tmp_path / "elsewhere" / "run")
    shutil.copytree(run["workdir"], moved)
    classifier_steps = sorted(os.listdir(os.path.join(moved, "checkpoints", "finetune")))
    out = run_cli([*run["args"], "--workdir", moved])
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [line for line in out.stderr.splitlines() if "finished: training skipped" in line]
    assert len(skipped) == 2 and "finetune:" in skipped[0] and "scratch:" in skipped[1], skipped
    assert "starting it anew" not in out.stderr
    assert f"pretraining: step {STEPS}, loss " in out.stdout, out.stdout  # its last record
    assert sorted(os.listdir(os.path.join(moved, "checkpoints", "finetune"))) == classifier_steps
    assert _numbers(moved) == _numbers(run["workdir"])
    assert _report(moved) == _report(run["workdir"])

    before = _files(moved)
    out = run_cli([*run["args"], "--workdir", moved, "--config.pretrain.learning_rate=1.0"])
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "other settings (pretrain.learning_rate: 2.0 -> 1.0)" in last
    assert "--config.overwrite=True" in last and "Traceback" not in out.stderr
    assert _files(moved) == before

    # The newest pretraining checkpoint made for other images (a split's fingerprint changed).
    meta_path = os.path.join(moved, "checkpoints", "pretrain", str(STEPS), "meta", "metadata")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["data_identity"]["pretrain"]["fingerprint"] = "0" * 16
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = _files(moved)
    out = run_cli([*run["args"], "--workdir", moved])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "was trained on other data" in out.stderr.strip().splitlines()[-1]
    assert _files(moved) == before
