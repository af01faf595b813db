"""Config validation: every check that can fail before any work starts, with a message that names
the config key and the fix."""

import math

import jax
import ml_collections

from simclr_jax.errors import ConfigError

DATASET_CHOICES_HINT = (
    "'digits' (embedded), 'folder' (with config.data.data_dir=DIR) or a tfds image dataset name"
)
_HINT = "'digits', 'folder' (with data_dir=DIR) or a tfds image dataset name"
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
PRECISIONS = ("float32", "bfloat16")
MODES = ("pretrain", "downstream", "distill", "all")
# The classifier runs of the downstream comparison (downstream.runs.<run>: their own settings).
CLASSIFIER_RUNS = ("finetune", "scratch", "finetune_long", "scratch_long")
TEACHERS = ("finetune", "finetune_long")  # the downstream runs a student can distil from


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {msg}")


def _check_positive(c: ml_collections.ConfigDict, section: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        v = c[section][k]
        _check(isinstance(v, int | float) and v > 0, f"{section}.{k}", f"must be > 0, got {v!r}")


def _check_prob(c: ml_collections.ConfigDict, section: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        v = c[section][k]
        _check(0.0 <= v <= 1.0, f"{section}.{k}", f"must be a probability in [0, 1], got {v!r}")


def validate(config: ml_collections.ConfigDict, mode: str = "all") -> None:
    """Raises ConfigError on the first value that cannot work; returns None when all is well."""
    _check(mode in MODES, "mode", f"--mode must be one of {MODES}, got {mode!r}")
    _check(config.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
    _check(bool(config.data.name), "data.name", f"set a dataset: {DATASET_CHOICES_HINT}")
    _check_positive(config, "data", ("image_size", "prefetch"))
    _check_data(config.data)
    _check_model(config)
    _check_augment(config)
    for section in ("pretrain", "downstream") + (("distill",) if "distill" in config else ()):
        _check_optimization(config, section)
    _check_pretrain(config)
    _check_downstream(config)
    if "distill" in config:
        _check_distill(config, mode)
    check_batch_sizes(config)


def _check_data(d: ml_collections.ConfigDict) -> None:
    for role in ("pretrain", "train", "test"):
        names = [p.strip() for p in str(d[f"{role}_split"]).split("+")]
        _check(all(names), f"data.{role}_split", "name a split ('train', 'unlabelled', 'a+b')")
    _check(
        d.name != "folder" or bool(d.data_dir),
        "data.data_dir",
        "config.data.name=folder needs config.data.data_dir=DIR (DIR/train/<class>/*.jpg, "
        "DIR/test/<class>/*.jpg, optionally DIR/unlabelled/*.jpg)",
    )
    _check(d.canvas >= 0, "data.canvas", "must be >= 0 (0 = the dataset's own size)")
    _check(d.cache_gb >= 0, "data.cache_gb", "must be >= 0 (0 = always stream)")
    _check(d.read_threads >= 0, "data.read_threads", "must be >= 0 (0 = one per core)")
    _check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
    _check(
        0 <= d.get("validation_fraction", 0.0) < 1,
        "data.validation_fraction",
        "must be in [0, 1) (0 = score the test split; e.g. 0.2 to choose settings on validation)",
    )


def _check_model(config: ml_collections.ConfigDict) -> None:
    from simclr_jax import models  # models registers the valid names

    _check(
        config.model.name in models.MODELS,
        "model.name",
        f"unknown model {config.model.name!r}; choose one of {sorted(models.MODELS)}",
    )
    _check(config.model.stem in models.STEMS, "model.stem", f"must be one of {models.STEMS}")
    _check_positive(config, "model", ("width", "head_layers", "proj_dim"))


def _check_augment(config: ml_collections.ConfigDict) -> None:
    _check_prob(config, "augment", ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"))
    _check(
        0.0 < config.augment.crop_scale_min <= 1.0,
        "augment.crop_scale_min",
        "must be in (0, 1]",
    )
    _check(config.augment.jitter_strength >= 0, "augment.jitter_strength", "must be >= 0")


def _check_optimization(config: ml_collections.ConfigDict, section: str) -> None:
    s = config[section]
    _check(s.optimizer in OPTIMIZERS, f"{section}.optimizer", f"must be one of {OPTIMIZERS}")
    _check(s.lr_scaling in LR_SCALINGS, f"{section}.lr_scaling", f"one of {LR_SCALINGS}")
    _check_positive(config, section, ("batch_size", "learning_rate"))
    _check(s.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
    _check(s.warmup_epochs >= 0, f"{section}.warmup_epochs", "must be >= 0")


def _check_pretrain(config: ml_collections.ConfigDict) -> None:
    pc = config.pretrain
    _check_positive(config, "pretrain", ("temperature", "log_every", "keep_checkpoints"))
    _check(
        pc.epochs > 0 or pc.num_steps > 0,
        "pretrain.epochs",
        "set pretrain.epochs > 0 or pretrain.num_steps > 0",
    )
    _check(pc.checkpoint_every >= 0, "pretrain.checkpoint_every", "must be >= 0")
    _check(pc.knn_every >= 0, "pretrain.knn_every", "must be >= 0 (0 = off)")


def _check_downstream(config: ml_collections.ConfigDict) -> None:
    dc = config.downstream
    _check(0.0 < dc.label_fraction <= 1.0, "downstream.label_fraction", "must be in (0, 1]")
    _check_positive(config, "downstream", ("epochs", "linear_iters", "knn_k"))
    _check(dc.long_epochs >= 0, "downstream.long_epochs", "must be >= 0 (0 = off)")
    grid = tuple(dc.linear_l2_grid)
    _check(
        bool(grid) and all(isinstance(v, int | float) and v >= 0 for v in grid),
        "downstream.linear_l2_grid",
        f"must be one or more penalties >= 0, got {grid!r}",
    )
    _check(
        dc.linear_folds >= 0, "downstream.linear_folds", "must be >= 0 (< 2: no cross-validation)"
    )
    _check(dc.checkpoint_every >= 0, "downstream.checkpoint_every", "must be >= 0")
    k, layers = dc.get("ft_proj_selector", 0), config.model.head_layers
    _check(
        isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= layers,
        "downstream.ft_proj_selector",
        f"must be an integer in 0..model.head_layers={layers} (0 = h, k = the k-th projection "
        f"head layer's output, {layers} = z), got {k!r}",
    )
    _check_runs(dc.get("runs") or {})
    if dc.get("data") is not None:
        _check_transfer(dc.data)


def _check_transfer(t: ml_collections.ConfigDict) -> None:
    """downstream.data: the transfer dataset ('' = the pretraining data; its other keys unread)."""
    key = "downstream.data"
    _check(isinstance(t.name, str), f"{key}.name", f"'' (the pretraining data) or {_HINT}")
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
        names = [p.strip() for p in str(t[f"{role}_split"]).split("+")]
        _check(all(names), f"{key}.{role}_split", "name a labelled split ('train', 'test')")
    _check(t.max_train_examples >= 0, f"{key}.max_train_examples", "must be >= 0 (0 = all)")
    _check(
        0 <= t.validation_fraction < 1,
        f"{key}.validation_fraction",
        "must be in [0, 1) (0 = score its test split; e.g. 0.2 to choose settings on validation)",
    )


def _check_runs(runs) -> None:
    """downstream.runs: per classifier run, a peak learning rate >= 0 (0 = downstream's) and a
    string saying what it was chosen on."""
    for run in runs:
        _check(run in CLASSIFIER_RUNS, f"downstream.runs.{run}", f"not one of {CLASSIFIER_RUNS}")
        lr, chosen = runs[run].get("learning_rate", 0.0), runs[run].get("chosen_on", "")
        _check(
            isinstance(lr, int | float) and not isinstance(lr, bool) and lr >= 0,
            f"downstream.runs.{run}.learning_rate",
            f"must be >= 0 (0 = downstream.learning_rate), got {lr!r}",
        )
        _check(isinstance(chosen, str), f"downstream.runs.{run}.chosen_on", "must be a string")


def _check_distill(config: ml_collections.ConfigDict, mode: str) -> None:
    from simclr_jax import models  # models registers the valid names

    d = config.distill
    _check(
        d.teacher in TEACHERS, "distill.teacher", f"must be one of {TEACHERS}, got {d.teacher!r}"
    )
    _check(
        mode != "distill" or d.teacher != "finetune_long" or config.downstream.long_epochs > 0,
        "distill.teacher",
        "'finetune_long' needs downstream.long_epochs > 0; set it, or distill.teacher=finetune",
    )
    _check_positive(config, "distill", ("temperature", "epochs", "labels_epochs"))
    _check_positive(config, "distill", ("labels_learning_rate",))
    _check(
        d.model.name == "" or d.model.name in models.MODELS,
        "distill.model.name",
        f"unknown model {d.model.name!r}; '' (the teacher's) or one of {sorted(models.MODELS)}",
    )
    _check(d.model.width >= 0, "distill.model.width", "must be >= 0 (0 = model.width)")
    _check(isinstance(d.chosen_on, str), "distill.chosen_on", "must be a string")


def ft_proj_selector(config) -> int:
    """Which features the downstream stage reads: 0 = h, k = the output of the projection head's
    first k layers (downstream.ft_proj_selector; 0 in configs written before it existed)."""
    return int(config.downstream.get("ft_proj_selector", 0))


def run_learning_rate(dc, run: str) -> float:
    """The peak learning rate (before batch scaling) of classifier run `run`: its own
    downstream.runs.<run>.learning_rate, or downstream.learning_rate where that is 0 or unset."""
    own = ((dc.get("runs") or {}).get(run) or {}).get("learning_rate") or 0.0
    return float(own) if own > 0 else float(dc["learning_rate"])


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


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """The official SimCLR rule: linear (lr * B / 256) or sqrt (lr * sqrt(B))."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    return base_lr
