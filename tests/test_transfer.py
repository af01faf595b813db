"""Transfer evaluation (downstream.data): a finished run's encoder evaluated on another dataset.

`--mode=downstream --config.restore=RUN --config.downstream.data.name=folder` on a finished tiny
digits run: every record is the folder's (sizes, classes, chance, baselines), the report names
both datasets; the classifiers keep head layer 1 (downstream.ft_proj_selector=1); a stop and its
rerun on 8 simulated devices end with the 1-device run's records; a changed transfer dataset
starts the classifier runs anew; bad values are one-line errors before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simclr_jax.app import main
from simclr_jax.app import validate as config_lib
from simclr_jax.data import dataset
from simclr_jax.errors import ConfigError, DataError
from simclr_jax.report import build
from simclr_jax.train import supervised
from simclr_jax.train.checkpoint import Checkpointer
from tests.folder_fixture import write_folder
from tests.helpers import REPO, TINY_FLAGS, run_cli, tiny_config

# 18 labelled folder images (3 classes), batch 32: one classifier step an epoch, 3 epochs.
TRANSFER = [
    "--mode=downstream",
    "--config.downstream.data.name=folder",
    "--config.downstream.label_fraction=1.0",
    "--config.downstream.epochs=3",
    "--config.downstream.learning_rate=0.3",
    "--config.downstream.linear_folds=0",
    "--config.downstream.knn_k=5",
    # SimCLRv2's fine-tuning from head layer 1: the one command-line run of a selector > 0 (its
    # resume and device invariance are checked here, with the transfer's).
    "--config.downstream.ft_proj_selector=1",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished tiny digits run (4 pretraining steps) and a small image folder."""
    root = tmp_path_factory.mktemp("transfer")
    images = str(root / "images")
    write_folder(images, corrupt=0)
    workdir = str(root / "run")
    config = tiny_config(**{"pretrain.num_steps": 4})
    config.data.mean, config.data.std = (), ()  # computed, as the command line's runs do
    main.run(config, workdir, "pretrain")
    return workdir, images


def _flags(pretrained, workdir):
    run, images = pretrained
    data_dir = f"--config.downstream.data.data_dir={images}"
    return [*TINY_FLAGS, *TRANSFER, data_dir, f"--config.restore={run}", "--workdir", workdir]


def _checkpoint_structure(workdir, run, step):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415

    path = epath.Path(os.path.join(workdir, "checkpoints", run, str(step), "state"))
    return ocp.PyTreeCheckpointHandler().metadata(path).tree


def _records(workdir):
    return build.read_records(os.path.join(workdir, build.METRICS_FILE))


def _by_phase(workdir):
    out = {}
    for r in _records(workdir):
        out.setdefault(r["phase"], []).append({k: v for k, v in r.items() if not k.endswith("_s")})
    return out


def test_a_finished_run_is_evaluated_on_a_folder_alike_on_1_and_8_devices_and_after_a_stop(
    pretrained, tmp_path
):
    """--mode=downstream on a folder dataset from a finished run gives the same report on 1 and 8
    devices and after a stop. Slower than most (~30 s on 2 cores): three run.py processes, since
    the device count is fixed when jax starts."""
    one = str(tmp_path / "one")
    out = run_cli(_flags(pretrained, one), devices=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Loaded the transfer dataset folder: 18 labelled train / 9 test images, 3 classes" in (
        out.stderr
    )
    got = _by_phase(one)
    assert got["chance"][0]["test_acc"] == pytest.approx(1 / 3)  # the folder's 3 classes
    for phase in build.FROZEN:  # every baseline on the folder's images
        (r,) = got[phase]
        assert (r["dataset"], r["num_classes"], r["num_labelled"], r["num_test"]) == (
            "folder", 3, 18, 9,
        ), phase  # fmt: skip
    for phase in ("finetune", "scratch"):
        assert [r["epoch"] for r in got[phase]] == [1, 2, 3]
    rep = json.load(open(os.path.join(one, build.REPORT_JSON)))
    assert rep["datasets"]["pretrain"] == {"name": "digits", "split": "train"}
    assert rep["datasets"]["downstream"]["name"] == "folder" and rep["num_classes"] == 3
    md = open(os.path.join(one, build.REPORT_MD)).read()
    assert md.startswith("# SimCLR on digits, evaluated on folder")
    assert "Pretrained on digits (train), evaluated on folder (train 100% labelled / test" in md
    config = json.load(open(os.path.join(one, "config.json")))
    assert config["downstream"]["data"]["identity"]["test"]["num_examples"] == 9
    # The classifiers keep head layer 1 (selector 1): their checkpoints hold it, the report says so.
    assert "head layer 1 of 3" in md
    for run in ("finetune", "scratch"):
        params = _checkpoint_structure(one, run, 3)["params"]
        assert set(params) == {"encoder", "proj", "head"}, run
        assert set(params["proj"]) == {"dense1", "bn1"}, run

    # On 8 devices, stopped during the fine-tuning's second step, then rerun: it resumes, and
    # ends with the 1-device run's records (8 devices sum in another order: float32 drift).
    eight = str(tmp_path / "eight")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    worker = os.path.join(REPO, "tests", "signal_worker.py")
    stopped = subprocess.run(
        [sys.executable, worker, "finetune@2", "SIGTERM", "--", *_flags(pretrained, eight)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    rerun = run_cli(_flags(pretrained, eight), devices=8)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "finetune: checkpoint of step 2" in rerun.stderr and "(resuming)" in rerun.stderr
    assert "starting it anew" not in rerun.stderr
    again = _by_phase(eight)
    assert set(again) == set(got)
    for phase, rows in got.items():
        assert len(again[phase]) == len(rows), phase
        for a, b in zip(rows, again[phase], strict=True):
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (phase, key)
                else:
                    assert b[key] == value, (phase, key)


def _transfer_config(images):
    config = tiny_config(**{"downstream.data.name": "folder", "downstream.data.data_dir": images})
    ds = dataset.load(config.data)
    return dataset.with_stats(config, ds, dataset.load_downstream(config, ds))


def test_a_changed_transfer_dataset_starts_the_classifier_runs_anew(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    write_folder(first, corrupt=0, unlabelled=0)
    write_folder(second, corrupt=0, unlabelled=0, seed=1)  # other pixels, same layout
    config_a, config_b = _transfer_config(first), _transfer_config(second)
    meta_a = supervised.run_meta(config_a, "finetune", 1, None)
    meta_b = supervised.run_meta(config_b, "finetune", 1, None)
    assert meta_a["run"]["downstream_data"]["test"]["source"] == f"folder:{first}/test"
    assert meta_a["run"]["downstream_data"] != meta_b["run"]["downstream_data"]
    # Without a transfer dataset the metadata is today's (runs written before still resume).
    plain = dataset.with_stats(tiny_config(), dataset.load(tiny_config().data))
    assert "downstream_data" not in supervised.run_meta(plain, "finetune", 1, None)["run"]

    directory = str(tmp_path / "checkpoints" / "finetune")
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(1, {"w": np.zeros(3, np.float32)}, meta_a)
    ckpt.close()
    kept = supervised.open_run_checkpoints(directory, config_a, meta_a)  # the same dataset
    assert kept.steps() == [1]
    kept.close()
    anew = supervised.open_run_checkpoints(directory, config_b, meta_b)  # another one
    assert anew.steps() == []
    anew.close()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"downstream.data.name": "folder"}, "config.downstream.data.data_dir"),
        ({"downstream.data.data_dir": "/x"}, "config.downstream.data.data_dir"),
        (
            {"downstream.data.name": "digits", "downstream.data.validation_fraction": 1.0},
            "config.downstream.data.validation_fraction",
        ),
        (
            {"downstream.data.name": "digits", "downstream.data.test_split": "test+"},
            "config.downstream.data.test_split",
        ),
    ],
)
def test_a_bad_transfer_value_is_a_config_error_naming_the_key(overrides, key):
    config = tiny_config()
    with config.unlocked():
        for k, v in overrides.items():
            node = config
            *path, last = k.split(".")
            for part in path:
                node = node[part]
            node[last] = v
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(config)


def test_an_unknown_transfer_dataset_is_one_line_before_any_work(tmp_path):
    config = tiny_config(**{"downstream.data.name": "nosuchset"})
    config.downstream.data.data_dir = str(tmp_path)
    workdir = str(tmp_path / "run")
    with pytest.raises(DataError) as err:
        main.run(config, workdir, "all")  # fails on loading, before pretraining
    assert "\n" not in str(err.value) and "config.downstream.data.name='nosuchset'" in str(
        err.value
    )
    assert not os.path.exists(workdir)
