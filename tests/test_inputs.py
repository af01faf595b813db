"""Bad input is refused before any work, in one line that names the key and the fix; legal but odd
settings are warned of once, in the log and the report (docs/inputs.md):

* every leaf key of every configs/*.py against values derived from its type and its rule (NaN,
  inf, far out of range, just outside its range, the wrong type, an unknown choice), in process;
* a few of them on the command line: exit 2, one stderr line, the workdir untouched;
* what needs the data (app/data_checks.py), the report's warnings, the public encoder's inputs, the
  messages that named the wrong problem (an unknown tfds name, a checkpoint of other data), the
  linear probe's convergence flag.
"""

import importlib
import json
import logging
import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from simclr_jax import pretrained
from simclr_jax.app import data_checks, main, rules
from simclr_jax.app import validate as config_lib
from simclr_jax.core import networks
from simclr_jax.data import catalog, dataset
from simclr_jax.errors import CheckpointError, ConfigError, DataError, InputError
from simclr_jax.evaluation import linear_probe as probe
from simclr_jax.report import build
from simclr_jax.train.state import check_meta, checkpoint_meta
from tests.helpers import REPO, TINY_FLAGS, run_cli, tiny_config

CONFIG_NAMES = sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and f[0] != "_"
)
# Keys that any value of their type may take, with the reason. None today: every key has a rule
# by its meaning (free text is still checked to be a string).
ALLOWED: dict[str, str] = {}


def _defaults() -> dict:
    """{key: (a config that has it, its value there)} over every leaf of every shipped config."""
    out = {}
    for name in CONFIG_NAMES:
        for key, value in rules.leaves(importlib.import_module(f"configs.{name}").get_config()):
            out.setdefault(key, (name, value))
    return out


DEFAULTS = _defaults()


def test_every_config_key_has_a_rule():
    """A key added to a config without a rule in config.RULES fails here (and so is validated
    by its meaning before it ships)."""
    missing = [k for k in DEFAULTS if rules.rule_for(k) is None and k not in ALLOWED]
    assert not missing, f"config keys without a rule in simclr_jax/app/validate.py RULES: {missing}"


def _outside(rule) -> list:
    """Values just outside the rule's range: its open bounds, one below / above its closed ones."""
    step = 1 if rule.kind == rules.INT else 0.5
    out = []
    if rule.lo is not None:
        out += [rule.lo] if rule.open_lo and not rule.zero_ok else []
        below = rule.lo - step
        out += [] if rule.zero_ok and below == 0 else [below]
    if rule.hi is not None:
        out += [rule.hi] if rule.open_hi else []
        out.append(rule.hi + step)
    return out


def _bad_values(key: str, default) -> list:
    """What a key must refuse, derived from the type of its shipped value and from its rule."""
    rule = rules.rule_for(key)
    nan, inf = math.nan, math.inf
    if isinstance(default, bool) or (default is None and rule.kind == rules.BOOL):
        return ["yes", 1] + ([] if rule.none_ok else [None])
    if isinstance(default, str):
        return [123, None] + (["no-such-choice"] if rule.choices else []) + [" "] * rule.nonempty
    if isinstance(default, tuple | list):
        n = max(rule.lengths or (1,))
        bad = [(x,) * n for x in (nan, inf, -inf, -1e9, "x", None, *_outside(rule))]
        lengths = [(0.5,) * (n + 1)] if rule.lengths else []  # a length it does not take
        return bad + ["x", None, 5, *lengths] + ([] if 0 in rule.lengths else [()])
    big = -(10**9) if isinstance(default, int) else -1e9
    bad = [nan, inf, -inf, big, "x", None, True, *_outside(rule)]
    return bad + ([1.5] if isinstance(default, int) else [])


def _with(name: str, key: str, value) -> ml_collections.ConfigDict:
    """Config `name` with `key` set to `value`, whatever its type (a ConfigDict built from a dict
    takes any value; ml_collections' own type check would refuse some before ours could)."""
    d = importlib.import_module(f"configs.{name}").get_config().to_dict()
    node = d
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_each_key_refuses_its_bad_values_naming_itself(key):
    name, default = DEFAULTS[key]
    config_lib.validate(_with(name, key, default))  # the shipped value passes
    for value in _bad_values(key, default):
        with pytest.raises(ConfigError) as err:
            config_lib.validate(_with(name, key, value))
        message = str(err.value)
        assert message.startswith(f"config.{key}: ") and "\n" not in message, (value, message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.std": ()}, "config.data.std: set both data.mean and data.std"),
        ({"data.mean": ()}, "config.data.mean: set both data.mean and data.std"),
        ({"model.width": 0.1}, "config.model.width: tiny has 8 base channels, so width 0.1"),
        ({"distill.model.width": 0.01}, "config.distill.model.width: tiny has 8 base channels"),
        ({"pretrain.epochs": 0, "pretrain.num_steps": 0}, "config.pretrain.epochs: set"),
        (
            {"distributed.num_processes": 2, "distributed.process_id": 2},
            "config.distributed.process_id: must be below distributed.num_processes=2",
        ),
    ],
)
def test_keys_that_only_fail_together_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as err:
        config_lib.validate(tiny_config(**overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "flag, want",
    [
        pytest.param(
            "--config.pretrain.temperature=inf",
            "config.pretrain.temperature: must be a finite number > 0 (NT-Xent's tau: 0.5 on "
            "CIFAR-10, 0.1 on ImageNet), got inf",
            id="temperature",
        ),
        pytest.param(
            "--config.data.std=(0,0,0)",
            "config.data.std: must be () or 3 numbers in (0, 1] (per channel, of pixels in "
            "[0, 1]: divide 0..255 statistics by 255; () = computed), got (0, 0, 0)",
            id="std",
        ),
        pytest.param(
            "--config.pretrain.num_steps=-1",
            "config.pretrain.num_steps: must be >= 0 (0 = pretrain.epochs; > 0 overrides it), "
            "got -1",
            id="num_steps",
        ),
        pytest.param(
            "--config.pretrain.momentum=nan",
            "config.pretrain.momentum: must be a finite number in [0, 1) (at 1 the velocity "
            "never decays), got nan",
            id="momentum",
        ),
    ],
)
def test_a_bad_value_on_the_command_line_is_one_line_and_touches_nothing(tmp_path, flag, want):
    """One subprocess per case (~5 s each: jax's import): exit 2, one stderr line, and a workdir
    that holds a file is left as it was."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    out = run_cli([*TINY_FLAGS, flag, "--workdir", str(workdir)], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr == f"error: {want}\n"
    assert os.listdir(workdir) == ["notes.txt"] and (workdir / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- with the data


def _one_class_folder(root) -> str:
    for split, count in (("train", 4), ("test", 2)):
        os.makedirs(os.path.join(root, split, "cat"))
        for i in range(count):
            pixels = np.full((12, 12, 3), 40 * i, np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, "cat", f"{i}.png"))
    return str(root)


def test_a_labelled_split_with_one_class_is_refused_before_the_workdir(tmp_path):
    root = _one_class_folder(tmp_path / "images")
    config = tiny_config(**{"data.name": "folder", "data.data_dir": root})
    workdir = tmp_path / "run"
    with pytest.raises(DataError, match=r"train holds one class, so every accuracy") as err:
        main.run(config, str(workdir), "all")
    assert "\n" not in str(err.value) and not workdir.exists()


@pytest.fixture(scope="module")
def digits():
    config = tiny_config()
    return config, dataset.load(config.data)


def test_legal_but_odd_settings_are_warned_of_once(digits, caplog):
    config, ds = digits  # tiny: batch 32 over 11 labelled images, 4 steps of a 10-epoch warm-up
    with caplog.at_level(logging.WARNING, logger="simclr_jax.app.data_checks"):
        notes = data_checks.check(config, "all", ds, ds)
    assert [r.getMessage() for r in caplog.records] == list(notes)
    assert notes[0].startswith("pretrain.warmup_epochs=10 is 80 steps and pretraining has 4")
    assert notes[1].startswith("downstream.batch_size=32 is larger than the 11 labelled images")
    assert len(notes) == 2  # the classifier run has one step: no warm-up to speak of
    assert data_checks.check(config, "pretrain", ds, None) == notes[:1]  # only the stage it runs
    config.pretrain.knn_every = 1  # 4 steps of 8 an epoch: the monitor would never run
    assert "the kNN monitor never runs" in data_checks.check(config, "pretrain", ds, None)[1]
    from configs import digits_simclr

    demo = digits_simclr.get_config()
    demo_data = dataset.load(demo.data)
    assert data_checks.check(demo, "all", demo_data, demo_data) == ()  # the demo's are all plain
    assert data_checks.check(demo, "distill", demo_data, demo_data) == ()


def test_a_distill_batch_larger_than_its_images_is_refused(digits):
    config, ds = digits
    config = tiny_config(**{"distill.batch_size": 512})  # 256 images to distil over
    with pytest.raises(
        ConfigError, match=r"config\.distill\.batch_size=512 is larger than the 256"
    ):
        data_checks.check(config, "distill", ds, ds)


def test_the_report_lists_the_warnings_and_the_probe_that_did_not_converge(tmp_path):
    config = json.loads(tiny_config().to_json())
    config["warnings"] = ["downstream.batch_size=32 is larger than the 11 labelled images"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    note = "the final fit had not converged after 20 L-BFGS iterations"
    record = {"step": 20, "phase": "linear", "test_acc": 0.5, "l2": 0.01}
    record.update(preprocessing="raw", not_converged=note, converged=False)
    curve = {"step": 1, "phase": "finetune", "epoch": 1, "test_acc": 0.4, "test_loss": 1.0}
    curve.update(accuracy=0.3, loss=1.2)  # a classifier curve for the plots to draw
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(curve) + "\n")
    rep = build.write(str(tmp_path))
    assert rep["warnings"] == [
        config["warnings"][0],
        f"SimCLR encoder, frozen: logistic regression: {note}",
    ]
    md = (tmp_path / "report.md").read_text()
    assert "## Warnings\n\n- downstream.batch_size=32 is larger than" in md
    assert "(raw, L2 0.01, not converged)" in md


def test_the_linear_probe_says_when_its_fits_did_not_converge():
    """~7 s on a busy 2-core machine: compiling the L-BFGS fit for its few iterations."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), np.arange(40) % 2
    x[:, 0] += 4 * y  # separable: at a small penalty 5 L-BFGS steps are far from the optimum
    short = probe.linear_probe(x, y, x, y, 2, l2_grid=(1e-4, 1e-3), folds=2, iters=5, seed=0)
    assert not short["converged"] and short["grad_max"] > probe.GRAD_TOL
    assert short["cv_fits"] >= 4 and short["cv_unconverged"] == short["cv_fits"]
    note = probe.convergence_note(short)
    assert note.startswith("the final fit had not converged after 5 L-BFGS iterations")
    assert f"{short['cv_fits']} of the {short['cv_fits']} cross-validation fits" in note
    # (A converged fit, flagged as one: tests/test_evaluate.py, against scikit-learn.)


# ----------------------------------------------------------------------------- messages


def test_an_unknown_tfds_name_says_so_not_that_it_is_unprepared(tmp_path):
    config = tiny_config(**{"data.name": "cifar100x", "data.data_dir": str(tmp_path / "none")})
    with pytest.raises(DataError) as err:
        dataset.load(config.data)
    message = str(err.value)
    assert message.startswith("config.data.name='cifar100x' is not a tfds dataset: did you mean")
    assert "'cifar100'" in message and "prepare" not in message and "\n" not in message
    catalog.check_tfds_name("cifar10")  # a known name passes (prepared or not)


def test_a_checkpoint_of_other_data_or_model_names_what_differs():
    config = tiny_config()
    ident = {"source": "digits/train", "num_examples": 256, "fingerprint": "a" * 16}
    with config.unlocked():
        config.data.identity = {"pretrain": ident, "train": ident, "test": dict(ident)}
    meta = json.loads(json.dumps(checkpoint_meta(config, "pretrain")))
    meta["data_identity"]["train"]["num_examples"] = 200
    meta["data_identity"]["test"]["fingerprint"] = "b" * 16
    with pytest.raises(CheckpointError) as err:
        check_meta(meta, config, "/w")
    message = str(err.value)
    assert "was trained on other data: its " in message
    assert "its train split was digits/train (200 images), the config now reads" in message
    assert "its test split digits/train holds other images now (the same 256" in message
    assert "{" not in message and "\n" not in message
    meta = json.loads(json.dumps(checkpoint_meta(config, "pretrain")))
    meta["model"]["width"] = 0.25
    with pytest.raises(
        CheckpointError, match=r"another model: model\.width 0\.25 \(config: 0\.125\)"
    ):
        check_meta(meta, config, "/w")


# ----------------------------------------------------------------------------- the public API


def _encoder():
    """An Encoder without variables: its inputs are refused before anything runs."""
    config = tiny_config()
    return pretrained.Encoder(networks.build_model(config.model), None, config, None, "nowhere")


@pytest.mark.parametrize(
    "images, message",
    [
        (
            np.zeros((16, 16, 3), np.uint8),
            r"got shape \(16, 16, 3\) \(one image: pass images\[None\]\)",
        ),
        (np.zeros((0, 16, 16, 3), np.uint8), r"images holds no pixels \(shape \(0, 16, 16, 3\)\)"),
        (np.full((2, 16, 16, 3), np.nan, np.float32), "NaN or infinite pixels"),
        (np.full((2, 16, 16, 3), np.inf, np.float32), "NaN or infinite pixels"),
        (np.zeros((2, 16, 16, 3), np.int32), "must be uint8 or float in"),
        (
            np.zeros((2, 16, 16, 3), np.uint8),
            r"layer must be in 0\.\.3 or -1 \(0 = h, 3 or -1 = z\)",
        ),
    ],
    ids=["one image", "empty", "nan", "inf", "int32", "layer -2"],
)
def test_the_encoder_refuses_what_is_not_a_batch_of_finite_images(images, message):
    layer = -2 if "layer" in message else None
    with pytest.raises(InputError, match=message):
        _encoder()(images, layer=layer)
