"""Config validation: every check that can fail before any work starts, with a one-line message
that names the config key, what its value means and the fix.

Every leaf key of a config has a `Rule` in RULES (its type, range or choices, by what the value
means: a probability, a count, a temperature, ...), and `validate` checks each leaf it finds
against its rule, then the checks between keys (a selector within the head's layers, a batch that
splits over the devices, ...). A key without a rule is not checked: tests/test_inputs.py walks
every key of configs/*.py and fails for one. What needs the data (a batch larger than the
training set, a labelled split with one class) is `app/data_checks.py`'s, once the data is loaded.
"""

import jax
import ml_collections

from simclr_jax.app.rules import (
    MODES,
    leaves,
    rule_for,
)
from simclr_jax.core import resnet
from simclr_jax.errors import ConfigError
from simclr_jax.train.supervised import CLASSIFIER_RUNS


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {msg}")


def check_values(config, mode: str = "all") -> None:
    """Every check that needs neither the data nor the devices: each leaf against its rule, then
    the checks between keys. Raises ConfigError on the first problem."""
    _check(mode in MODES, "mode", f"--mode must be one of {MODES}, got {mode!r}")
    for key, value in leaves(config):
        rule = rule_for(key)
        why = rule.problem(value) if rule is not None else None
        _check(why is None, key, why)
    _check_data(config.data)
    _check_model(config)
    _check_pretrain(config.pretrain)
    _check_downstream(config)
    if "distill" in config:
        _check_distill(config, mode)
    dist = config.get("distributed") or {}
    _check(
        not 0 < dist.get("num_processes", 0) <= dist.get("process_id", -1),
        "distributed.process_id",
        f"must be below distributed.num_processes={dist.get('num_processes')} (processes count "
        f"from 0), got {dist.get('process_id')!r}",
    )


def validate(config: ml_collections.ConfigDict, mode: str = "all") -> None:
    """Raises ConfigError on the first value that cannot work; returns None when all is well."""
    check_values(config, mode)
    check_batch_sizes(config)


def _split_names(value) -> list[str]:
    return [p.strip() for p in str(value).split("+")]


def _check_data(d: ml_collections.ConfigDict) -> None:
    for role in ("pretrain", "train", "test"):
        names = _split_names(d[f"{role}_split"])
        _check(all(names), f"data.{role}_split", "name a split ('train', 'unlabelled', 'a+b')")
    _check(
        d.name != "folder" or bool(d.data_dir),
        "data.data_dir",
        "config.data.name=folder needs config.data.data_dir=DIR (DIR/train/<class>/*.jpg, "
        "DIR/test/<class>/*.jpg, optionally DIR/unlabelled/*.jpg)",
    )
    mean, std = tuple(d.get("mean", ())), tuple(d.get("std", ()))
    _check(
        bool(mean) == bool(std),
        "data.mean" if std else "data.std",
        f"set both data.mean and data.std (three values each), or leave both () to compute them "
        f"from the train split; got mean {mean}, std {std}",
    )


def _check_model(config: ml_collections.ConfigDict) -> None:
    _check_width(config.model.name, config.model.width, "model.width")


def _check_width(name: str, width: float, key: str) -> None:
    """width x the network's base channels must leave at least one channel."""

    base = resnet.MODELS[name]().num_filters
    _check(
        int(base * width) >= 1,
        key,
        f"{name} has {base} base channels, so width {width!r} leaves none; set >= {1 / base:g}",
    )


def _check_pretrain(pc: ml_collections.ConfigDict) -> None:
    _check(
        pc.epochs > 0 or pc.num_steps > 0,
        "pretrain.epochs",
        "set pretrain.epochs > 0 or pretrain.num_steps > 0",
    )


def _check_downstream(config: ml_collections.ConfigDict) -> None:
    dc = config.downstream
    k, layers = dc.get("ft_proj_selector", 0), config.model.head_layers
    _check(
        -1 <= k <= layers,
        "downstream.ft_proj_selector",
        f"must be an integer in -1..model.head_layers={layers} (0 = h, k = the k-th projection "
        f"head layer's output, {layers} or -1 = z), got {k!r}",
    )
    for run in dc.get("runs") or {}:
        _check(run in CLASSIFIER_RUNS, f"downstream.runs.{run}", f"not one of {CLASSIFIER_RUNS}")
    if dc.get("data") is not None:
        _check_transfer(dc.data)


def _check_transfer(t: ml_collections.ConfigDict) -> None:
    """downstream.data: the transfer dataset ('' = the pretraining data; its other keys unread)."""
    key = "downstream.data"
    if not t.name:
        _check(
            not t.data_dir,
            f"{key}.data_dir",
            f"is read only with {key}.name set: also set {key}.name (e.g. 'folder'), or drop it",
        )
        return
    _check(
        t.name != "folder" or bool(t.data_dir),
        f"{key}.data_dir",
        f"{key}.name=folder needs {key}.data_dir=DIR (DIR/train/<class>/*, DIR/test/<class>/*)",
    )
    for role in ("train", "test"):
        _check(
            all(_split_names(t[f"{role}_split"])),
            f"{key}.{role}_split",
            "name a labelled split ('train', 'test')",
        )


def _check_distill(config: ml_collections.ConfigDict, mode: str) -> None:
    d = config.distill
    _check(
        mode != "distill" or d.teacher != "finetune_long" or config.downstream.long_epochs > 0,
        "distill.teacher",
        "'finetune_long' needs downstream.long_epochs > 0; set it, or distill.teacher=finetune",
    )
    if d.model.width:
        _check_width(d.model.name or config.model.name, d.model.width, "distill.model.width")


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Every global batch must split evenly over all devices (of all processes)."""
    n = jax.device_count()
    keys = ("pretrain.batch_size", "downstream.batch_size")
    for key in keys + (("distill.batch_size",) if "distill" in config else ()):
        section, name = key.split(".")
        b = config[section][name]
        _check(
            b % n == 0,
            key,
            f"global batch {b} does not split over {n} devices; use a multiple of {n} "
            f"(e.g. {max(n, b - b % n)} or {b - b % n + n}).",
        )
