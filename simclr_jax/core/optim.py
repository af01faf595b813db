"""Optimizers and schedules from optax: LARS / SGD-momentum / AdamW with linear warm-up then cosine
decay, the learning rate scaled with the batch size, no weight decay (nor LARS trust ratio) on
biases and BatchNorm parameters."""

import math

import jax
import optax


def decay_mask(params):
    """True for conv/dense kernels, False for biases and BN scale/bias (all of them 1-D)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(section, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up over `warmup_epochs`, cosine decay to 0 at `total_steps`."""
    peak = scaled_learning_rate(section.learning_rate, section.batch_size, section.lr_scaling)
    warmup = min(int(round(section.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(
    section, schedule: optax.Schedule, trust_ratio: bool = True
) -> optax.GradientTransformation:
    """section: a pretrain/downstream config section with optimizer, weight_decay, momentum.

    trust_ratio=False: LARS without its layer-wise trust ratio anywhere (momentum SGD with the
    learning rate inside the momentum, and weight decay on the kernels), as the official LARS
    treats the variables it excludes (pretraining's online linear head)."""
    wd, name = section.weight_decay, section.optimizer
    if name == "lars":
        # As the official SimCLR LARS: biases and BN params skip both decay and trust-ratio scaling.
        return optax.lars(
            schedule,
            weight_decay=wd,
            weight_decay_mask=decay_mask,
            trust_coefficient=0.001,
            trust_ratio_mask=decay_mask if trust_ratio else False,
            momentum=section.momentum,
        )
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.sgd(schedule, momentum=section.momentum),
        )
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
    raise ValueError(f"unknown optimizer {name!r}; use lars, sgd or adamw")


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """The official SimCLR rule: linear (lr * B / 256) or sqrt (lr * sqrt(B))."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    return base_lr
