"""First contact: the mistakes a new user makes first end in one clear line and exit code 2, no
traceback, and leave the workdir as they found it."""

import json
import os

import pytest

from simclr_jax.app import main
from simclr_jax.errors import ConfigError
from tests.helpers import TINY_FLAGS, run_cli, tiny_config


def _one_error_line(out) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: "), out.stderr  # nothing before it
    return out.stderr.strip()


@pytest.mark.parametrize(
    "args, want",
    [
        (
            ["--config", "configs/digits_simclr.py", "--config.pretrain.epoch=3"],
            "error: config.pretrain.epoch is not a config key; did you mean "
            "config.pretrain.epochs?",
        ),
        (  # no --config: the default one, loaded as the flags are parsed
            ["--config.pretran.epochs=3"],
            "error: config.pretran.epochs is not a config key; did you mean "
            "config.pretrain.epochs?",
        ),
    ],
)
def test_a_misspelt_config_key_is_one_line_naming_the_nearest_key(tmp_path, args, want):
    workdir = tmp_path / "run"
    out = run_cli([*args, "--workdir", str(workdir)], timeout=120)
    assert _one_error_line(out) == want
    assert not workdir.exists()


@pytest.mark.parametrize("data_dir", ["missing", "empty"])
def test_an_unprepared_dataset_says_how_to_prepare_it(tmp_path, data_dir):
    directory = tmp_path / data_dir
    if data_dir == "empty":
        directory.mkdir()
    workdir = tmp_path / "run"
    args = [*TINY_FLAGS, "--workdir", str(workdir), "--config.data.name=cifar10"]
    out = run_cli([*args, f"--config.data.data_dir={directory}"], timeout=120)
    err = _one_error_line(out)
    assert f"Dataset 'cifar10' is not prepared in {directory}" in err
    command = (
        f"pip install tensorflow tensorflow-datasets && tfds build cifar10 --data_dir "
        f"{directory} --file_format=array_record"
    )
    assert command in [line.strip() for line in err.splitlines()]
    assert "splits" not in err
    assert not workdir.exists()  # checked before the workdir is made
    assert data_dir == "empty" or not directory.exists()  # nor was the data_dir made


def test_a_run_that_fails_before_any_work_leaves_the_workdir_as_it_found_it(tmp_path):
    # A global batch larger than the training set: found once the data is loaded and the
    # pretraining stage has begun (views.png written), before its first step.
    bad = {"pretrain.batch_size": 512, "data.max_train_examples": 256}
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(ConfigError, match="larger than the 256 training images"):
        main.run(tiny_config(**bad), str(new), "pretrain")
    assert not (tmp_path / "a").exists()  # every directory the run made is gone

    existing = tmp_path / "existing"
    existing.mkdir()
    old_config = json.loads(tiny_config(**{"pretrain.num_steps": 9}).to_json())
    (existing / "config.json").write_text(json.dumps(old_config))
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError):
        main.run(tiny_config(**bad), str(existing), "pretrain")
    assert sorted(os.listdir(existing)) == ["config.json", "notes.txt"]
    assert json.loads((existing / "config.json").read_text()) == old_config


@pytest.mark.parametrize("name", ["cifar_simclr", "cifar_cpu", "digits_simclr", "imagenet_simclr"])
def test_every_shipped_config_passes_the_config_check(name):
    import importlib

    from simclr_jax.app import validate as config_lib

    config = importlib.import_module(f"configs.{name}").get_config()
    config_lib.validate(config)  # raises ConfigError naming the key otherwise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    shipped = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")
    assert name in shipped and len(shipped) == 4  # a new config joins the list above
