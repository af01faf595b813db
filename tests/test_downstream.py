"""Downstream: the labelled subset, the classifier step, the report, and the whole path end to end
(pretrain -> fine-tune vs scratch -> linear probe and kNN -> report; then --mode=downstream)."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from simclr_jax.app import main
from simclr_jax.app import validate as config_lib
from simclr_jax.core import augment, networks, optim
from simclr_jax.data import dataset, sources, stream
from simclr_jax.errors import CheckpointError, ConfigError
from simclr_jax.evaluation import frozen as evaluate
from simclr_jax.report import build as report
from simclr_jax.report import markdown as report_md
from simclr_jax.runtime import files, parallel
from simclr_jax.runtime.records import MetricWriter
from simclr_jax.stages import downstream
from simclr_jax.train import classifier, supervised
from simclr_jax.train import state as train_state
from simclr_jax.train.checkpoint import Checkpointer
from tests.helpers import TINY_FLAGS, checkpoint_tree, run_cli, tiny_config


def _config(**overrides):
    """tiny_config on every digits image, 64 images a pretraining step, two classifier epochs."""
    settings = {
        "data.max_train_examples": 0,
        "pretrain.batch_size": 64,
        "downstream.epochs": 2,
        "downstream.label_fraction": 0.1,
        "downstream.long_epochs": 3,
        "data.mean": (),  # computed from the train split, as in a real run
        "data.std": (),
    }
    return tiny_config(**(settings | overrides))


def _phase(records, phase):
    return [r for r in records if r["phase"] == phase]


# ----------------------------------------------------------------------------- labelled subset


def test_labelled_subset_is_class_balanced_and_deterministic():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    np.random.default_rng(1).shuffle(labels)
    a = dataset.labelled_subset(labels, 0.1, 10, seed=3)
    counts = np.bincount(labels[a], minlength=10)
    assert counts.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # round(0.1 * class size)
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, dataset.labelled_subset(labels, 0.1, 10, seed=3))
    assert not np.array_equal(a, dataset.labelled_subset(labels, 0.1, 10, seed=4))
    tiny = dataset.labelled_subset(labels, 0.001, 10, seed=3)  # at least one image a class
    assert np.bincount(labels[tiny], minlength=10).tolist() == [1] * 10
    np.testing.assert_array_equal(
        dataset.labelled_subset(labels, 1.0, 10, 0), np.arange(len(labels))
    )


def test_a_validation_split_is_held_out_of_train_and_pretraining():
    c = _config(**{"data.validation_fraction": 0.2}).data
    ds = dataset.load(c)
    held, kept = ds.test, ds.train  # the validation split stands where the test split was
    assert held.name.endswith("[validation]") and ds.pretrain is kept
    whole = dataset.load(_config().data).train  # the same train split, nothing held out
    ids = dataset.validation_ids(whole.labels, 0.2)
    rest = np.setdiff1d(np.arange(len(whole)), ids)  # disjoint: kept out of train and pretraining
    assert len(held) == len(ids) and len(kept) == len(rest) == 1437 - len(ids)
    np.testing.assert_array_equal(sources.read_all(held), whole.read(ids))
    np.testing.assert_array_equal(sources.read_all(kept), whole.read(rest))
    np.testing.assert_array_equal(held.labels, whole.labels[ids])
    counts = np.bincount(held.labels, minlength=10)
    assert abs(len(ids) - 0.2 * 1437) <= 10 and counts.min() >= 0.8 * counts.max() - 2
    assert dataset.identity(ds)["test"] != dataset.identity(dataset.load(_config().data))["test"]
    c.pretrain_split = "train+test"  # pretraining would read the held-out images: refused
    with pytest.raises(dataset.ConfigError, match="validation_fraction"):
        dataset.load(c)


def test_random_init_bn_statistics_are_the_labelled_images():
    """The random-init baseline's BN statistics, estimated on images, make the frozen (inference
    mode) features exactly the training-mode features of those images."""
    c = _config(**{"data.mean": (0.3,) * 3, "data.std": (0.3,) * 3})
    ds = dataset.load(c.data)
    initial = downstream.random_encoder(c)
    ids = np.arange(64)
    est = evaluate.estimate_batch_stats(c, ds.train, ids, initial, chunk=64)
    chunked = evaluate.estimate_batch_stats(c, ds.train, ids, initial, chunk=16)
    model = networks.build_model(c.model)
    x = dataset.normalize(
        augment.downstream_batch(None, 0, ds.train.read(ids), None, False, c.data.image_size),
        augment.spec_from_config(c),
    )

    def variables(enc):
        return {
            "params": {"encoder": enc["params"]},
            "batch_stats": {"encoder": enc["batch_stats"]},
        }

    frozen = model.apply(variables(est), x, False, method="encode")
    trained, _ = model.apply(variables(initial), x, True, method="encode", mutable=["batch_stats"])
    np.testing.assert_allclose(frozen, trained, rtol=1e-4, atol=1e-4)
    init_mean = jax.tree.leaves(initial["batch_stats"])[0]
    assert float(np.abs(jax.tree.leaves(est["batch_stats"])[0] - init_mean).max()) > 1e-3
    for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(chunked), strict=True):
        assert np.all(np.isfinite(b)) and a.shape == b.shape  # chunk statistics averaged


def test_epoch_indices_repeat_a_subset_smaller_than_a_batch():
    subset = np.array([3, 7, 9])
    np.testing.assert_array_equal(supervised.epoch_indices(subset, 2), subset)
    assert supervised.epoch_indices(subset, 8).tolist() == [3, 7, 9] * 3


# ----------------------------------------------------------------------------- classifier step


@pytest.fixture(scope="module")
def step_setup():
    config = _config(**{"data.mean": (0.5,) * 3, "data.std": (0.29,) * 3})  # random images
    dc = config.downstream
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(64, dtype=np.int32) % 10
    schedule = optim.make_schedule(dc, 2, 4)
    model, p_step = classifier.make_classifier_step(config, schedule, num_classes=10)
    source = sources.ArraySource(images, labels, "random")
    order = stream.Order(train_state.seed_key(0, 4), 64, dc.batch_size)
    aug_key = parallel.replicate(train_state.seed_key(0, 5))

    def args(step):  # step's rows over every local device, as the stream gives them
        batch = stream.Reader(source, labels=True)(order.local(step))
        return jax.tree.map(parallel.shard, batch), aug_key

    return config, model, optim.make_optimizer(dc, schedule), p_step, args


def _train(step_setup, encoder=None, steps=3):
    _, model, tx, p_step, args = step_setup
    state = train_state.create_state(model, tx, train_state.seed_key(0, 3), 32, encoder)
    rstate, losses = parallel.replicate(state), []
    for step in range(steps):
        rstate, metrics = p_step(rstate, *args(step))
        losses.append(float(metrics["loss"][0]))
        assert 0.0 <= float(metrics["accuracy"][0]) <= 1.0
    return np.array(losses), parallel.unreplicate(rstate)


def test_scratch_runs_with_the_same_seed_are_identical(step_setup):
    a_losses, a = _train(step_setup)
    b_losses, b = _train(step_setup)
    assert np.all(np.isfinite(a_losses))
    np.testing.assert_array_equal(a_losses, b_losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.batch_stats, b.batch_stats)


def test_pretrained_init_copies_the_encoder_and_keeps_the_head(step_setup):
    config, model, tx, _, _ = step_setup
    key = train_state.seed_key(0, 3)
    sc = train_state.create_state(model, tx, key, 32)
    # A SimCLR model's encoder subtree has the classifier encoder's structure (traced only).
    simclr = jax.eval_shape(
        lambda: train_state.init_variables(networks.build_model(config.model), key, 32)
    )
    for col in ("params", "batch_stats"):
        assert jax.tree.structure(simclr[col]["encoder"]) == jax.tree.structure(
            sc.params["encoder"] if col == "params" else sc.batch_stats["encoder"]
        )
    # Recognisable "pretrained" values: the fresh init shifted.
    encoder = {
        "params": jax.tree.map(lambda x: x + 0.25, sc.params["encoder"]),
        "batch_stats": jax.tree.map(lambda x: x + 0.5, sc.batch_stats["encoder"]),
    }
    ft = train_state.create_state(model, tx, key, 32, encoder)
    jax.tree.map(np.testing.assert_array_equal, ft.params["encoder"], encoder["params"])
    jax.tree.map(np.testing.assert_array_equal, ft.batch_stats["encoder"], encoder["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, ft.params["head"], sc.params["head"])
    assert jax.tree.structure(ft.params) == jax.tree.structure(sc.params)
    assert jax.tree.structure(ft.opt_state) == jax.tree.structure(sc.opt_state)
    assert int(ft.step) == 0


def test_finetune_and_scratch_from_the_same_encoder_give_identical_records(tmp_path):
    """Only the encoder differs between the two runs: handed the scratch run's own starting
    encoder as the 'pretrained' one, the fine-tune run must log exactly the scratch run's records."""
    config = _config(**{"data.max_train_examples": 256, "downstream.long_epochs": 0})
    ds = dataset.load(config.data)
    config = dataset.with_stats(config, ds)
    subset = dataset.labelled_subset(ds.train_labels, 0.1, ds.num_classes, config.seed)
    same = downstream.random_encoder(config)  # what scratch starts from
    starts = {
        downstream.FINETUNE: (same, {"dir": "-", "step": 0}),
        downstream.SCRATCH: (same, None),
    }
    writer = MetricWriter(str(tmp_path))
    downstream.compare(config, ds, str(tmp_path), writer, subset, starts)
    writer.close()
    records = files.read_records(str(tmp_path / files.METRICS_FILE))
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("phase", "images_per_s")} for r in rs
    ]
    ft, sc = strip(_phase(records, "finetune")), strip(_phase(records, "scratch"))
    assert len(ft) == 2 and ft == sc


def test_each_classifier_run_trains_at_its_own_learning_rate(tmp_path, caplog):
    """downstream.runs.scratch.learning_rate: scratch's logged schedule is the fine-tuned one's at
    its own peak, its checkpoints say so, and a changed rate retrains scratch (the old run's
    checkpoints are not resumed) while the finished fine-tuned run is left as it was."""
    config = _config(**{"data.max_train_examples": 256, "downstream.long_epochs": 0})
    config.downstream.runs.scratch.learning_rate = 0.05  # fine-tuned: the shared 0.01
    ds = dataset.load(config.data)
    config = dataset.with_stats(config, ds)
    subset = dataset.labelled_subset(ds.train_labels, 0.1, ds.num_classes, config.seed)
    same = downstream.random_encoder(config)
    starts = {
        downstream.FINETUNE: (same, {"dir": "-", "step": 0}),
        downstream.SCRATCH: (same, None),
    }

    def compare(cfg):
        writer = MetricWriter(str(tmp_path))
        downstream.compare(cfg, ds, str(tmp_path), writer, subset, starts)
        writer.close()
        return files.read_records(str(tmp_path / files.METRICS_FILE))

    def saved_lr(phase):
        ckpt = Checkpointer(str(tmp_path / "checkpoints" / phase))
        try:
            return ckpt.read_meta(ckpt.steps()[-1])["run"]["downstream"]["learning_rate"]
        finally:
            ckpt.close()

    records = compare(config)
    ft, sc = _phase(records, "finetune"), _phase(records, "scratch")
    assert max(r["learning_rate"] for r in sc) == pytest.approx(0.05)
    assert [r["learning_rate"] for r in sc] == pytest.approx([5 * r["learning_rate"] for r in ft])
    assert {r["peak_learning_rate"] for r in ft} == {0.01} and sc[-1]["peak_learning_rate"] == 0.05
    assert (saved_lr("finetune"), saved_lr("scratch")) == (0.01, 0.05)

    config.downstream.runs.scratch.learning_rate = 0.02
    with caplog.at_level("WARNING"):
        records = compare(config)
    assert (
        "downstream.learning_rate: 0.05 -> 0.02" in caplog.text
        and "starting it anew" in caplog.text
    )
    assert _phase(records, "finetune") == ft  # finished: not retrained
    assert _phase(records, "scratch")[-1]["peak_learning_rate"] == 0.02
    assert (saved_lr("finetune"), saved_lr("scratch")) == (0.01, 0.02)


def test_a_run_that_named_its_encoder_by_directory_is_still_that_run(tmp_path):
    """Classifier runs now know their encoder by step and digest (a moved workdir keeps them);
    those written before named its directory. Such a run is kept where its record is what that
    version wrote for this encoder (`earlier`), and started anew where it is not."""
    config = tiny_config()
    new = supervised.run_meta(config, "finetune", 1, {"step": 4, "digest": "0123456789abcdef"})
    old = supervised.run_meta(
        config, "finetune", 1, {"dir": "/old/run/checkpoints/pretrain", "step": 4}
    )
    directory = str(tmp_path / "finetune")
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(1, {"w": np.zeros(3, np.float32)}, old)
    ckpt.close()
    kept = supervised.open_run_checkpoints(directory, config, new, earlier=old["run"])
    assert kept.steps() == [1]
    kept.close()
    moved = {**old["run"], "encoder": {"dir": "/elsewhere/checkpoints/pretrain", "step": 4}}
    anew = supervised.open_run_checkpoints(directory, config, new, earlier=moved)
    assert anew.steps() == []
    anew.close()


@pytest.mark.parametrize(
    "run, value, message",
    [
        ("scratch", -0.1, "downstream.runs.scratch.learning_rate: must be >= 0"),
        ("finetune_long", float("nan"), "downstream.runs.finetune_long.learning_rate: must be"),
        ("scratch_longer", 0.1, "downstream.runs.scratch_longer: not one of"),
    ],
)
def test_a_bad_run_learning_rate_is_a_config_error_naming_the_key(run, value, message):
    config = _config()
    with config.downstream.runs.unlocked():
        config.downstream.runs[run] = {"learning_rate": value, "chosen_on": ""}
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_a_bad_run_learning_rate_on_the_command_line_is_one_line_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    bad = "--config.downstream.runs.scratch.learning_rate=-1"  # after TINY_FLAGS' 0: it wins
    out = run_cli([*TINY_FLAGS, bad, "--workdir", str(workdir)], timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip() == (
        "error: config.downstream.runs.scratch.learning_rate: must be >= 0 (0 = "
        "downstream.learning_rate), got -1.0"
    )
    assert not workdir.exists()


def test_a_run_without_its_own_learning_rate_takes_the_shared_one():
    dc = _config(**{"downstream.runs.scratch_long.learning_rate": 0.3}).downstream
    assert supervised.run_learning_rate(dc, "scratch_long") == 0.3
    assert supervised.run_learning_rate(dc, "scratch") == dc.learning_rate == 0.01
    meta = {p: supervised.run_meta(_config(), p, 2, None) for p in ("scratch", "scratch_long")}
    other = supervised.run_meta(_config(**{"downstream.runs.scratch_long.learning_rate": 0.3}),
                                "scratch_long", 2, None)  # fmt: skip
    assert other["run"] != meta["scratch_long"]["run"]
    assert other["run"]["downstream"]["learning_rate"] == 0.3


# ----------------------------------------------------------------------------- report


def _synthetic_workdir(tmp_path, config=None, peaks=None):
    """A workdir's config.json and metrics.jsonl; peaks: {phase: the peak_learning_rate its test
    records carry, as compare writes them} (none: a workdir from before downstream.runs)."""
    config = config or _config()
    (tmp_path / files.CONFIG_FILE).write_text(config.to_json())
    rows = [
        {"step": 2, "phase": "pretrain", "loss": 5.0, "images_per_s": 64.0},
        {"step": 4, "phase": "pretrain", "loss": 4.0, "images_per_s": 128.0, "knn_acc": 0.5},
    ]
    # Short runs still climbing (not converged); the long ones flat at the end.
    for phase, base, epochs in (("finetune", 0.6, 2), ("scratch", 0.3, 2)):
        for suffix, n in (("", epochs), ("_long", 10)):
            for epoch in range(1, n + 1):
                flat = suffix and epoch > 5
                rows.append(
                    {
                        "step": 4 * epoch,
                        "phase": phase + suffix,
                        "loss": 2.0 / (5 if flat else epoch),
                        "accuracy": base + 0.05 * (5 if flat else epoch) / (5 if suffix else 1),
                        "learning_rate": 0.01,
                        "epoch": epoch,
                        "test_loss": 2.5 / epoch,
                        "test_acc": base
                        + 0.1 * (5 if flat else min(epoch, 5)) / (5 if suffix else 1),
                        "images_per_s": 32.0,
                        "subset": "abc",
                    }
                    | ({"peak_learning_rate": peaks[phase + suffix]} if peaks else {})
                )
    frozen = {"chance": 0.1, "linear_pixels": 0.75, "knn_pixels": 0.6, "linear_random": 0.4}
    frozen |= {"knn_random": 0.3, "linear": 0.7, "knn": 0.65}
    for phase, acc in frozen.items():
        rows.append(
            {"step": 0, "phase": phase, "test_acc": acc, "test_loss": 1.0, "num_labelled": 144,
             "num_test": 360, "subset": "abc", "k": 20, "wall_s": 0.5}
            | ({"encoder_step": 4} if phase in ("linear", "knn") else {})
        )  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "pha'  # torn last line
    (tmp_path / files.METRICS_FILE).write_text(text)


def test_report_from_a_synthetic_metrics_file(tmp_path):
    _synthetic_workdir(tmp_path)
    rep = report.write(str(tmp_path))
    for name in (files.REPORT_JSON, files.REPORT_MD, files.ACCURACY_PNG, files.LOSS_PNG):
        assert (tmp_path / name).stat().st_size > 0
    on_disk = json.loads((tmp_path / files.REPORT_JSON).read_text())
    assert on_disk["finetune"]["epoch"] == [1, 2] and len(on_disk["scratch_long"]["epoch"]) == 10
    assert on_disk["finetune"]["test_acc"] == pytest.approx([0.7, 0.8])
    assert on_disk["scratch"]["train_loss"] == pytest.approx([2.0, 1.0])
    assert on_disk["finetune"]["final_test_acc"] == pytest.approx(0.8)
    assert "best_test_acc" not in on_disk["finetune"]  # nothing chosen on the test set
    assert on_disk["finetune"]["not_converged"] and not on_disk["finetune_long"]["not_converged"]
    assert on_disk["linear"]["test_acc"] == 0.7 and on_disk["knn_pixels"]["test_acc"] == 0.6
    assert on_disk["num_labelled"] == 144 and on_disk["subset"] == "abc"
    assert on_disk["encoder_step"] == 4 and on_disk["config"]["model"]["name"] == "tiny"
    # Wall times come back from the logged rates: 2 steps x 64 images at 64 and at 128 img/s.
    assert on_disk["wall_s"]["pretrain"] == pytest.approx(2 * 64 / 64 + 2 * 64 / 128)
    assert on_disk["wall_s"]["finetune"] == pytest.approx(2 * 4 * 32 / 32)
    s = report.summary(rep)
    assert s["pretrained_minus_scratch"] == pytest.approx(0.3)
    assert s["linear_minus_pixels"] == pytest.approx(-0.05)
    assert s["knn_minus_pixels"] == pytest.approx(0.05)
    md = (tmp_path / files.REPORT_MD).read_text()
    table = md[md.index("| Method |") : md.index("## Findings")]
    for row in ("Chance", "Raw pixels: logistic", "Raw pixels: kNN", "Random-init encoder"):
        assert f"| {row}" in table
    assert table.count("| 144 |") == 10  # every method but chance on the same labelled images
    assert "80.00%" in table and "75.00%" in table and "2 epochs, lr 0.01 (not converged)" in table
    assert "10 epochs, lr 0.01 |" in table  # the long runs converged, at the shared rate
    findings = md[md.index("## Findings") : md.index("## Pretraining")]
    assert "-5.00 points** — **below the baseline**" in findings
    assert "+5.00 points" in findings and "+30.00 points" in findings
    assert "every* train label" in md and "Best epoch" not in md
    assert "Each classifier's learning rate, chosen on: as the settings above:" in md
    assert "- Classifier trained from scratch, 10 epochs: peak lr 0.01." in md  # the shared one
    with open(tmp_path / files.ACCURACY_PNG, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_report_says_each_classifiers_learning_rate_and_what_it_was_chosen_on(tmp_path):
    chosen = "validation (scratch's own search)"
    config = _config(**{"downstream.runs.scratch_long.chosen_on": chosen})
    peaks = {"finetune": 0.01, "scratch": 0.01, "finetune_long": 0.01, "scratch_long": 0.05}
    _synthetic_workdir(tmp_path, config, peaks)
    rep = report.write(str(tmp_path))
    assert {run: rep[run]["learning_rate"] for run in report.RUNS} == peaks  # as logged
    assert rep["scratch_long"]["chosen_on"] == chosen
    assert rep["finetune"]["chosen_on"] == config.settings_chosen_on  # no run-specific one
    md = (tmp_path / files.REPORT_MD).read_text()
    table = md[md.index("| Method |") : md.index("## Findings")]
    assert "| Classifier trained from scratch, 10 epochs, lr 0.05 |" in table
    assert "| Classifier fine-tuned from the SimCLR encoder, 2 epochs, lr 0.01 (not" in table
    header = md[: md.index("| Method |")]
    assert f"- Classifier trained from scratch, 10 epochs: peak lr 0.05, chosen on: {chosen}." in (
        header
    )
    assert "2 epochs: peak lr 0.01, chosen on: as the settings above." in header


def test_the_report_says_why_the_online_probe_was_off(tmp_path):
    """No online-head records: off by the config, off for the pretraining split's images without
    labels (the count the run writes to config.json), or nothing said (pretraining records
    written before the head existed)."""
    cases = {
        "off (pretrain.online_probe=False)": {"pretrain.online_probe": False},
        "off (20 pretraining images (data.pretrain_split='train') have no label)": {
            "data.pretrain_unlabelled": 20
        },
        None: {"data.pretrain_unlabelled": 0},
    }
    for said, overrides in cases.items():
        config = _config()
        with config.unlocked():
            for key, value in overrides.items():
                section, name = key.split(".")
                config[section][name] = value
        _synthetic_workdir(tmp_path, config)
        rep = report.build(str(tmp_path))
        md = report_md.markdown(rep)
        if said is None:
            assert rep["pretrain"]["online_probe"] is None and "Online linear head" not in md
        else:
            assert f"Online linear head: {said}." in md, md
            assert rep["pretrain"]["online_probe"]["on"] is False


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_then_downstream_only_then_a_mismatched_model(tmp_path):
    workdir = str(tmp_path / "run")
    summary = main.run(_config(), workdir, "all")
    out = summary["downstream"]
    n_labelled = out["num_labelled"]
    assert 130 <= n_labelled <= 160  # 10% of the 1,437 digits train images, per class
    for key in report.RUNS + report.FROZEN:
        assert 0.0 <= out[f"{key}_test_acc"] <= 1.0, key

    records = files.read_records(os.path.join(workdir, files.METRICS_FILE))
    for phase, epochs in (("finetune", 2), ("scratch", 2), ("finetune_long", 3)):
        evals = [r for r in _phase(records, phase) if "test_acc" in r]
        assert [r["epoch"] for r in evals] == list(range(1, epochs + 1))
        assert all({"loss", "accuracy", "test_loss", "test_acc"} <= set(r) for r in evals)
    # Every method and baseline saw exactly the classifiers' labelled images.
    config = dataset.with_stats(_config(), dataset.load(_config().data))
    ds = dataset.load(config.data)
    subset = dataset.labelled_subset(ds.train_labels, 0.1, ds.num_classes, config.seed)
    digest = dataset.subset_digest(subset)
    for phase in report.FROZEN + report.RUNS:
        rows = _phase(records, phase)
        assert rows and all(r["subset"] == digest for r in rows if "test_acc" in r), phase
    for phase in report.FROZEN[1:]:
        assert _phase(records, phase)[0]["num_labelled"] == n_labelled == len(subset)

    rep = json.loads(open(os.path.join(workdir, files.REPORT_JSON)).read())
    for run in report.RUNS:
        assert rep[run]["wall_s"] > 0 and rep[run]["subset"] == digest
    assert rep["pretrain"]["steps"] == 4 and rep["encoder_step"] == 4
    assert rep["config"]["data"]["mean"] == pytest.approx(list(ds.channel_stats()[0]))
    md = open(os.path.join(workdir, files.REPORT_MD)).read()
    assert md.startswith("# ") and "| Method |" in md and digest in md
    for png in (files.ACCURACY_PNG, files.LOSS_PNG):
        assert os.path.getsize(os.path.join(workdir, png)) > 0
    for phase in report.RUNS:
        assert os.listdir(os.path.join(workdir, "checkpoints", phase))

    # --mode=downstream on the same workdir: no pretraining, the classifier runs are finished
    # (restored, not retrained), the probes rerun and replace their records.
    before = len(_phase(records, "pretrain"))
    again = main.run(_config(), workdir, "downstream")["downstream"]
    records = files.read_records(os.path.join(workdir, files.METRICS_FILE))
    assert len(_phase(records, "pretrain")) == before
    for phase in ("finetune", "scratch"):
        assert len(_phase(records, phase)) == 2
        assert again[f"{phase}_test_acc"] == out[f"{phase}_test_acc"]
    for phase in report.FROZEN:
        assert len(_phase(records, phase)) == 1
    assert again["knn_test_acc"] == pytest.approx(out["knn_test_acc"])

    # The encoder restored into the classifier is the pretraining checkpoint's, bitwise.
    encoder, step = train_state.restore_encoder(config, main.pretrain_dir(workdir))
    saved = checkpoint_tree(workdir, 4)
    classifier_model = networks.build_model(config.model, num_classes=10)
    state = train_state.create_state(
        classifier_model, optax.sgd(0.1), jax.random.key(0), 32, encoder
    )
    assert step == 4
    for col in ("params", "batch_stats"):
        got, want = getattr(state, col)["encoder"], saved[col]["encoder"]
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)

    # Another model restoring this run's encoder: a clear CheckpointError.
    other = _config(**{"model.width": 2.0})
    other.restore = workdir
    with pytest.raises(CheckpointError, match="model"):
        main.run(other, str(tmp_path / "other"), "downstream")


def test_the_classifier_state_without_compiled_init_is_create_states():
    """classifier.initial_state skips compiling the model's initialisers: it must give exactly
    what the generic create_state gives with the same encoder (a zero head)."""
    config = _config(**{"data.mean": (0.5,) * 3, "data.std": (0.29,) * 3})
    model = networks.build_model(config.model, num_classes=10)
    encoder = downstream.random_encoder(config)
    tx = optax.sgd(0.1, momentum=0.9)
    fast = classifier.initial_state(model, tx, encoder, 32)
    slow = train_state.create_state(model, tx, jax.random.key(3), 32, encoder)
    for col in ("params", "batch_stats", "opt_state"):
        a, b = getattr(fast, col), getattr(slow, col)
        assert jax.tree.structure(a) == jax.tree.structure(b), col
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_the_demo_config_uses_the_rates_its_validation_search_picked():
    """configs/digits_simclr.py's per-run rates are benchmarks/results/digits_settings' picks."""
    from configs import digits_simclr

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "results", "digits_settings", "choices.json")
    with open(path) as f:
        picks = json.load(f)["lr"]
    dc = digits_simclr.get_config().downstream
    assert {run: supervised.run_learning_rate(dc, run) for run in report.RUNS} == picks
    assert all(dc.runs[run].chosen_on.startswith("validation") for run in report.RUNS)
