"""The parts that pretraining and the downstream stage share (neither imports the other).

* `TrainState` (flax's, plus BatchNorm statistics) and `create_state`, the one way a model's
  variables are initialised, optionally with a pretrained encoder dropped in;
* the `fold_in` tags of the config seed, one independent random stream per use, and `seed_key`;
* the compute dtype of a config;
* what a checkpoint holds (`state_tree`) and what it must agree with to be restored
  (`checkpoint_meta`, `check_meta`), and a network's identity by content (`variables_digest`);
* `restore_encoder`: the pretrained encoder f from a pretraining checkpoint, with the first
  projection-head layers the downstream stage keeps (`start_variables`).
"""

import functools
import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from simclr_jax.core import networks, optim
from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.errors import CheckpointError
from simclr_jax.runtime import cpu_conv, parallel
from simclr_jax.train.checkpoint import Checkpointer, UnreadableCheckpoint

# fold_in tags of the config seed. Pretraining: model init, data order, augmentation. The two
# classifier runs share theirs (data order, augmentation; tag 3 was their head's init, which is
# now zero: not reused); the linear probe's cross-validation folds. The distillation: the
# student's init (shared by the distilled and the labels-only student), its data order and its
# augmentation over the pretraining split (the labels-only student uses the classifier's two).
# Pretraining's online linear head: its init (its own tag, so that the encoder's keys stay).
INIT_KEY, DATA_KEY, AUGMENT_KEY = 0, 1, 2
CLASSIFIER_DATA_KEY, CLASSIFIER_AUGMENT_KEY, LINEAR_KEY = 4, 5, 6
DISTILL_INIT_KEY, DISTILL_DATA_KEY, DISTILL_AUGMENT_KEY = 7, 8, 9
PROBE_INIT_KEY = 10

# Checkpoint metadata keys: the input normalisation (checkpoint_meta), and a pretraining run's
# length (its last step: --mode=downstream restores only a finished pretraining).
NORMALISATION, TOTAL_STEPS = "normalisation", "total_steps"

# Model keys of earlier versions that never changed the parameters: ignored when a checkpoint's or
# a workdir's model is compared with the config's, so runs written before still restore.
LEGACY_MODEL_KEYS = ("conv_impl",)


class TrainState(train_state.TrainState):
    batch_stats: Any = None
    # Pretraining's online linear head (a TrainState of its own: its params, optimizer and step),
    # None without one and in every other stage. Not in `state_tree`: its checkpoint item is
    # separate (pretrain.py), so the state's item reads the same with and without it.
    probe: Any = None


def seed_key(seed: int, tag: int):
    return jax.random.fold_in(jax.random.PRNGKey(seed), tag)


def compute_dtype(config):
    return jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_variables(model, key, image_size: int) -> dict:
    """model.init in inference mode (no BN axis needed); jitted once per (model, image size),
    since compiling the many random initialisers is slow on CPU (modules are hashable)."""
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return model.init(key, dummy, train=False)


def create_state(model, tx, key, image_size: int, encoder: dict | None = None) -> TrainState:
    """Unreplicated state on the default device, initialised from `key`; the encoder f replaced by
    `encoder` ({'params', 'batch_stats'}) when given."""
    variables = init_variables(model, key, image_size)
    params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
    if encoder is not None:
        params["encoder"], batch_stats["encoder"] = encoder["params"], encoder["batch_stats"]
    return TrainState.create(apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=tx)


def state_tree(state: TrainState) -> dict:
    """What a checkpoint holds (the unreplicated state's arrays)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def model_identity(model: dict) -> dict:
    """The model config's keys that decide the parameters (LEGACY_MODEL_KEYS left out)."""
    return {k: v for k, v in model.items() if k not in LEGACY_MODEL_KEYS}


def checkpoint_meta(config, phase: str) -> dict:
    """What a checkpoint must agree with to be restored: the model and the data it was made for
    (with `data.identity`, each split's source, size and fingerprint, where the loader set it),
    and the input normalisation its network was trained on (data.mean / data.std, where set)."""
    meta = {
        "phase": phase,
        "model": model_identity(config.model.to_dict()),
        "data": {"name": config.data.name, "image_size": config.data.image_size},
    }
    identity = config.data.get("identity")
    if identity:
        meta["data_identity"] = _plain(identity)
    stats = _normalisation(config)
    if stats:
        meta[NORMALISATION] = stats
    return meta


def _normalisation(config) -> dict | None:
    """{'mean', 'std'} of config.data, None while they are unset (() until the data is loaded)."""
    mean, std = (list(config.data.get(k) or ()) for k in ("mean", "std"))
    return {"mean": mean, "std": std} if mean and std else None


def _plain(tree):
    """ConfigDicts and tuples as the dicts and lists a checkpoint's JSON metadata reads back."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(v) for v in tree]
    return tree


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, tuple]]:
    """(dotted key, (old, new)) for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", (a, b)))
    return out


def _split_change(role: str, got: dict | None, want: dict) -> str:
    """One clause on how a split's identity changed: another source or size, or other contents."""
    same = ("source", "num_examples")
    if got and all(got.get(k) == want[k] for k in same):  # the same files, rewritten
        return (
            f"its {role} split {want['source']} holds other images now (the same "
            f"{want['num_examples']}, other contents)"
        )
    was = f"{got.get('source')} ({got.get('num_examples')} images)" if got else "not recorded"
    return (
        f"its {role} split was {was}, the config now reads {want['source']} "
        f"({want['num_examples']} images)"
    )


def check_meta(meta: dict, config, where: str) -> None:
    """Raises CheckpointError when the checkpoint metadata `meta` (in `where`) is not `config`'s.
    What one side does not record (a checkpoint written before the data identity or the
    normalisation was, a config whose statistics are not computed yet) is unknown, not a
    mismatch: it is checked on the rest."""
    want = checkpoint_meta(config, meta.get("phase", "pretrain"))
    got_data, want_data = meta.get("data_identity"), want.get("data_identity")
    if got_data and want_data and got_data != want_data:
        changed = [k for k in want_data if got_data.get(k) != want_data[k]]
        clauses = "; ".join(_split_change(k, got_data.get(k), want_data[k]) for k in changed)
        raise CheckpointError(
            f"The checkpoint in {where} was trained on other data: {clauses}. Resuming would go "
            f"on in another order over other images: point config.data at the data it was "
            f"trained on, or use another --workdir."
        )
    got_stats, want_stats = meta.get(NORMALISATION), want.get(NORMALISATION)
    if got_stats and want_stats and got_stats != want_stats:
        raise CheckpointError(
            f"The checkpoint in {where} was trained on inputs normalised with mean "
            f"{got_stats['mean']} / std {got_stats['std']}, and the config now reads "
            f"{want_stats['mean']} / {want_stats['std']}: set config.data.mean and config.data.std "
            f"to the checkpoint's (or () for the data's own statistics, what a run computes when "
            f"they are unset), or use another --workdir / --config.restore."
        )
    for key in ("model", "data"):
        got = meta.get(key)
        if key == "model" and isinstance(got, dict):
            got = model_identity(got)
        if got != want[key]:
            if isinstance(got, dict):
                diffs = changed_keys(got, want[key])
                said = ", ".join(f"{key}.{k} {a!r} (config: {b!r})" for k, (a, b) in diffs)
            else:  # nothing readable recorded
                said = f"{got!r} (config: {want[key]!r})"
            raise CheckpointError(
                f"The checkpoint in {where} was made for another {key}: {said}. Use the config "
                f"the checkpoint was trained with, or another --workdir / --config.restore."
            )


def checked_restore(
    ckpt: Checkpointer, target: Any, config, extra: dict | None = None, fall_back: bool = True
) -> tuple[Any, dict, int] | None:
    """The newest readable checkpoint in `ckpt` made for `config`'s model and data (with the
    items of their own in `extra` that it holds: `Checkpointer.restore`; fall_back: as
    Checkpointer.restore_latest's)."""
    check = functools.partial(check_meta, config=config, where=ckpt.directory)
    return ckpt.restore_matching(target, check, extra, fall_back)


def simclr_model(config):
    """The SimCLR model (f and g) as pretraining builds and trains it (global BN over the pmap
    axis, the compute dtype, the CPU's convolution); one object, so that its initialisation
    compiles once per process."""
    return networks.build_model(
        config.model,
        bn_axis_name=parallel.AXIS,
        dtype=compute_dtype(config),
        conv=cpu_conv.conv_module(),
    )


def abstract_pretrain_tree(config) -> dict:
    """Shapes, dtypes and placement (default device) of a pretraining checkpoint's tree: the
    restore target, built as pretraining builds its state but traced only (no init compiled).

    The optimizer state's structure depends on the optimizer, not on the schedule's values, so a
    constant schedule stands in for pretraining's.
    """
    tx = optim.make_optimizer(config.pretrain, optax.constant_schedule(0.0))
    key = seed_key(config.seed, INIT_KEY)
    return abstract_state_tree(simclr_model(config), tx, key, config.data.image_size)


def abstract_state_tree(model, tx, key, image_size: int) -> dict:
    """Shapes, dtypes and placement (default device) of the checkpoint tree of `create_state(model,
    tx, key, image_size)`, traced only: a restore target that compiles no initialisation."""
    shapes = jax.eval_shape(lambda: state_tree(create_state(model, tx, key, image_size)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def kept_head(head: dict, layers: int) -> dict:
    """The entries (dense<i>, bn<i>) of the projection head's layers 1..`layers` in `head` (its
    'params' or 'batch_stats' collection), by name."""
    keep = {}
    for name, value in head.items():
        index = re.fullmatch(r"(?:dense|bn)(\d+)", name)
        if index is None:
            raise ValueError(f"unexpected projection head entry {name!r}")
        if int(index.group(1)) <= layers:
            keep[name] = value
    return keep


def start_variables(variables: dict, layers: int) -> dict:
    """What a downstream run starts from, from a SimCLR model's variables ({'params',
    'batch_stats'} of f and g): {'params', 'batch_stats'} of f, and with `layers` > 0 'head':
    {'params', 'batch_stats'} of the projection head's first `layers` layers."""
    start = {
        "params": variables["params"]["encoder"],
        "batch_stats": variables["batch_stats"]["encoder"],
    }
    if layers > 0:
        start["head"] = {
            c: kept_head(dict(variables[c].get("head", {})), layers)
            for c in ("params", "batch_stats")
        }
    return start


def restore_encoder(config, source: str) -> tuple[dict, int]:
    """The pretrained f from the newest checkpoint in `source`, with the projection head's first
    downstream.ft_proj_selector layers (`start_variables`): (variables, step). It only reads:
    `source` is left as it is.

    Raises CheckpointError when `source` holds no checkpoint, when its newest is unreadable (no
    older one stands in: encoder.msgpack and the run's report are the newest one's), or when it was
    made for another model or data (checked on the metadata first, so a shape mismatch never
    hides the cause).
    """
    ckpt = Checkpointer(source, create=False, async_save=False)
    try:
        found = checked_restore(ckpt, abstract_pretrain_tree(config), config, fall_back=False)
    except UnreadableCheckpoint as err:
        raise CheckpointError(
            f"{err} The encoder is the newest pretraining checkpoint: rerun --mode=pretrain (or "
            f"all) with that run's --workdir, which sets it aside and redoes its steps from the "
            f"one before."
        ) from None
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(
            f"No readable pretraining checkpoint in {source}. Pretrain first (--mode=all or "
            f"pretrain with this --workdir), or point --config.restore at a finished run."
        )
    tree, _, step = found
    return start_variables(tree, ft_proj_selector(config)), int(step)


def variables_digest(variables) -> str:
    """A short fingerprint of a tree of arrays (each leaf's path, dtype, shape and bytes): what a
    run's checkpoints record of the encoder it started from, so that a copied or moved workdir (or
    another path to the same run) is the same encoder, and another encoder is not."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]
