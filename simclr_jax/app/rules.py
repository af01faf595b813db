"""The rule of every config key: its type, and its range or choices by what the value means (a
probability, a count, a temperature, ...), with a hint the messages repeat. `app/validate.py`
checks each leaf of a config against its rule; a key without one is not checked, and
tests/test_inputs.py walks every key of configs/*.py and fails for one.
"""

import dataclasses
import fnmatch
import math

import ml_collections

DATASET_CHOICES_HINT = (
    "'digits' (embedded), 'folder' (with config.data.data_dir=DIR) or a tfds image dataset name"
)
_HINT = "'digits', 'folder' (with data_dir=DIR) or a tfds image dataset name"
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
PRECISIONS = ("float32", "bfloat16")
MODES = ("pretrain", "downstream", "distill", "all")
# The classifier runs of the downstream comparison (downstream.runs.<run>: their own settings).
TEACHERS = ("finetune", "finetune_long")  # the downstream runs a student can distil from
# The distilled student's augmentation (distill.student_view): the classifiers' pad-and-translate
# crop and flip (the default), or the official distillation's random resized crop and flip.
STUDENT_VIEWS = ("translate", "resized_crop")
# The smallest image side anything can be learned from: below it a crop, a flip or the network's
# stride-2 stages (8x8 -> 1x1 for the CIFAR stem) leave nothing to tell apart.
MIN_IMAGE_SIZE = 8
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: seed 2**32 is seed 0 again

INT, NUMBER, NUMBERS, BOOL, STR = "int", "number", "numbers", "bool", "str"


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a config value may be. kind: INT, NUMBER (finite int or float), NUMBERS (a tuple of
    them, `lengths` long), BOOL or STR (one of `choices` where given; `nonempty`). Numbers lie in
    [lo, hi] (`open_lo` / `open_hi`: the bound itself excluded; None: unbounded), or are 0 where
    `zero_ok` (0 = off / the default). `hint` says what the value means."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    zero_ok: bool = False
    choices: tuple | None = None
    nonempty: bool = False
    lengths: tuple[int, ...] = ()
    hint: str = ""
    none_ok: bool = False  # None = decided at run time (see `hint`)

    def range_text(self) -> str:
        """'> 0', 'in [0, 1)', 'in -1..3', '0 or >= 8'."""
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.kind == INT:
                text = f"in {lo}..{hi}"
            else:
                left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
                text = f"in {left}{lo:g}, {hi:g}{right}"
        elif lo is not None:
            text = f"{'>' if self.open_lo else '>='} {lo:g}"
        elif hi is not None:
            text = f"{'<' if self.open_hi else '<='} {hi:g}"
        else:
            text = ""
        return f"0 or {text}" if self.zero_ok and text else text

    def _in_range(self, v) -> bool:
        if self.zero_ok and v == 0:
            return True
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)

    def _number_problem(self, v, what: str) -> str | None:
        """Why the number `v` breaks the rule ('must be ...'), or None."""
        span = self.range_text()
        if isinstance(v, bool) or not isinstance(v, int if self.kind == INT else int | float):
            return f"must be {what} {span}".rstrip()
        if not math.isfinite(v):
            return f"must be a finite number {span}".rstrip()
        return None if self._in_range(v) else f"must be {span}"

    def problem(self, v) -> str | None:
        """Why `v` breaks the rule, as 'must be ..., got V', or None when it is fine."""
        hint = f" ({self.hint})" if self.hint else ""
        if self.none_ok and v is None:
            return None
        if self.kind == BOOL:
            why = None if isinstance(v, bool) else "must be True or False"
        elif self.kind == STR:
            why = _string_problem(v, self.choices, self.nonempty)
        elif self.kind == NUMBERS:
            why = self._numbers_problem(v)
        else:
            why = self._number_problem(v, "an integer" if self.kind == INT else "a number")
        return None if why is None else f"{why}{hint}, got {v!r}"

    def _numbers_problem(self, v) -> str | None:
        span = self.range_text()
        count = " or ".join(str(n) for n in self.lengths if n) or "one or more"
        what = f"{'() or ' if 0 in self.lengths else ''}{count} numbers {span}".rstrip()
        if not isinstance(v, tuple | list) or len(v) not in (self.lengths or range(1, 2**31)):
            return f"must be {what}"
        bad = [x for x in v if self._number_problem(x, "a number") is not None]
        return f"must be {what}" if bad else None


def _string_problem(v, choices, nonempty: bool) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    if choices is not None and v not in choices:
        return f"must be one of {choices}"
    return "must not be empty" if nonempty and not v.strip() else None


def _int(lo: int, hi: int | None = None, hint: str = "", **kw) -> Rule:
    return Rule(INT, lo, hi, hint=hint, **kw)


def _count(hint: str = "") -> Rule:
    """An integer > 0."""
    return Rule(INT, 0, open_lo=True, hint=hint)


def _number(lo=None, hi=None, hint: str = "", **kw) -> Rule:
    return Rule(NUMBER, lo, hi, hint=hint, **kw)


def _positive(hint: str = "") -> Rule:
    """A finite number > 0."""
    return Rule(NUMBER, 0, open_lo=True, hint=hint)


def _prob(hint: str = "") -> Rule:
    return Rule(NUMBER, 0, 1, hint=hint or "a probability")


def _string(hint: str = "", choices=None, nonempty: bool = False) -> Rule:
    return Rule(STR, choices=choices, nonempty=nonempty, hint=hint)


_STATS = "per channel, of pixels in [0, 1]: divide 0..255 statistics by 255; () = computed"
_SPLIT = _string("a split name; 'a+b' joins splits", nonempty=True)


def _optimization(section: str) -> dict[str, Rule]:
    """The keys every trained section (pretrain, downstream, distill) has."""
    rules = {
        "batch_size": _count("global: split over every device of every process"),
        "optimizer": _string(choices=OPTIMIZERS),
        "learning_rate": _positive("the base rate, scaled by lr_scaling"),
        "lr_scaling": _string(choices=LR_SCALINGS),
        "warmup_epochs": _number(0, hint="linear warm-up, then cosine decay"),
        "weight_decay": _number(0),
        "momentum": _number(0, 1, open_hi=True, hint="at 1 the velocity never decays"),
    }
    return {f"{section}.{k}": v for k, v in rules.items()}


def _models() -> tuple[str, ...]:
    from simclr_jax.core import resnet  # flax: imported when the rules are built

    return tuple(sorted(resnet.MODELS))


def _stems() -> tuple[str, ...]:
    from simclr_jax.core import resnet

    return resnet.STEMS


def _rules() -> dict[str, Rule]:
    """Every leaf key of a config and its rule ('*' matches one path component)."""
    transfer = "downstream.data"
    return {
        "seed": _int(0, MAX_SEED, "every RNG key is folded from it"),
        "settings_chosen_on": _string("free text, shown in the report"),
        "precision": _string(choices=PRECISIONS),
        "restore": _string("'' or the checkpoint directory or workdir to restore f from"),
        "overwrite": Rule(BOOL),
        "data.name": _string(DATASET_CHOICES_HINT, nonempty=True),
        "data.data_dir": _string("a folder, or tfds' data_dir ('' = tfds' default)"),
        "data.pretrain_split": _SPLIT,
        "data.train_split": _SPLIT,
        "data.test_split": _SPLIT,
        "data.image_size": _int(
            MIN_IMAGE_SIZE, hint="the views' side: smaller leaves nothing to crop"
        ),
        "data.canvas": _int(MIN_IMAGE_SIZE, zero_ok=True, hint="0 = the dataset's own size"),
        "data.cache_gb": _number(0, hint="0 = always stream"),
        "data.read_threads": _int(0, hint="0 = one per core"),
        "data.prefetch": _count("batches read ahead"),
        "data.max_bad_fraction": _number(0, 1, hint="of a split's files that may not decode"),
        "data.mean": Rule(NUMBERS, 0, 1, lengths=(0, 3), hint=_STATS),
        "data.std": Rule(NUMBERS, 0, 1, open_lo=True, lengths=(0, 3), hint=_STATS),
        "data.max_train_examples": _int(0, hint="0 = all"),
        "data.validation_fraction": _number(0, 1, open_hi=True, hint="0 = score the test split"),
        "augment.crop_scale_min": _number(0, 1, open_lo=True, hint="the crop's smallest area"),
        "augment.flip_prob": _prob(),
        "augment.jitter_strength": _number(0, hint="s of the colour jitter"),
        "augment.jitter_prob": _prob(),
        "augment.grayscale_prob": _prob(),
        "augment.blur_prob": _prob(),
        "model.name": _string(choices=_models()),
        "model.width": _positive("the channel multiplier"),
        "model.stem": _string(choices=_stems()),
        "model.head_layers": _count("the projection head's linear layers"),
        "model.head_hidden_dim": _int(0, hint="0 = the encoder's feature dim"),
        "model.proj_dim": _count("z's dimension"),
        "model.head_bn_output": Rule(BOOL),
        **_optimization("pretrain"),
        "pretrain.epochs": _int(0, hint="0 with pretrain.num_steps > 0"),
        "pretrain.num_steps": _int(0, hint="0 = pretrain.epochs; > 0 overrides it"),
        "pretrain.temperature": _positive("NT-Xent's tau: 0.5 on CIFAR-10, 0.1 on ImageNet"),
        "pretrain.log_every": _count("steps"),
        "pretrain.checkpoint_every": _int(0, hint="steps; 0 = at the end only"),
        "pretrain.keep_checkpoints": _count(),
        "pretrain.knn_every": _int(0, hint="epochs; 0 = off"),
        "pretrain.online_probe": Rule(
            BOOL, none_ok=True, hint="None = on where every pretraining image has a label"
        ),
        **_optimization("downstream"),
        "downstream.epochs": _count(),
        "downstream.long_epochs": _int(0, hint="0 = off"),
        "downstream.label_fraction": _number(0, 1, open_lo=True),
        "downstream.runs.*.learning_rate": _number(0, hint="0 = downstream.learning_rate"),
        "downstream.runs.*.chosen_on": _string("'' = settings_chosen_on"),
        "downstream.linear_l2_grid": Rule(NUMBERS, 0, hint="L2 penalties"),
        "downstream.linear_folds": _int(0, hint="< 2: no cross-validation"),
        "downstream.linear_iters": _count("L-BFGS iterations of each fit"),
        "downstream.pixel_size": _int(MIN_IMAGE_SIZE, zero_ok=True, hint="0 = data.image_size"),
        "downstream.knn_k": _count(),
        "downstream.knn_temperature": _positive("T of the kNN vote's exp(similarity / T)"),
        "downstream.checkpoint_every": _int(0, hint="steps; 0 = at each test evaluation"),
        f"{transfer}.name": _string(f"'' (the pretraining data) or {_HINT}"),
        f"{transfer}.data_dir": _string("as data.data_dir"),
        f"{transfer}.train_split": _SPLIT,
        f"{transfer}.test_split": _SPLIT,
        f"{transfer}.max_train_examples": _int(0, hint="0 = all"),
        f"{transfer}.validation_fraction": _number(0, 1, open_hi=True, hint="0 = its test split"),
        "downstream.ft_proj_selector": _int(-1, hint="-1 = model.head_layers"),
        "distill.teacher": _string(choices=TEACHERS),
        "distill.temperature": _positive("T of softmax(logits / T)"),
        "distill.epochs": _count(),
        **_optimization("distill"),
        "distill.model.name": _string(choices=("",) + _models()),
        "distill.model.width": _number(0, hint="0 = model.width"),
        "distill.labels_epochs": _count(),
        "distill.labels_learning_rate": _positive(),
        "distill.chosen_on": _string("'' = settings_chosen_on"),
        "distill.student_view": _string(choices=STUDENT_VIEWS),
        "distributed.enabled": Rule(BOOL),
        "distributed.coordinator_address": _string("host:port, '' = auto-detect"),
        "distributed.num_processes": _int(0, hint="0 = auto-detect"),
        "distributed.process_id": _int(-1, hint="-1 = auto-detect"),
    }


RULES = _rules()


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted leaf key (exact, else a '*' pattern of RULES), or None."""
    if key in RULES:
        return RULES[key]
    return next((r for k, r in RULES.items() if "*" in k and fnmatch.fnmatchcase(key, k)), None)


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config (ConfigDict or dict), in order."""
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
