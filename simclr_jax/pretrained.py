"""The trained encoder in your own code: `load_encoder(path)` -> `Encoder`, a function from images
to h (and z), with its variables and the run's config; and the portable copy of the variables
that a finished pretraining run writes beside its checkpoints (`encoder.msgpack`,
flax.serialization), which `load_encoder` reads as well.

    from simclr_jax import load_encoder

    encoder = load_encoder("runs/digits")  # a workdir, its checkpoint directory or encoder.msgpack
    h = encoder(images)                     # (N, H, W, 3) uint8, or float in [0, 1] -> (N, F)
    h, z = encoder(images, projection=True)
    g1 = encoder(images, layer=1)           # the projection head's first layer's output

`encoder(images)` returns the features of the run's downstream.ft_proj_selector (`Encoder.layer`:
0 = h, k = the k-th head layer's output; -1, the official code's 'last layer', is head_layers),
what its downstream stage read. `images` is always a batch: one image is `image[None]`.

Images go through the evaluations' preprocessing (`preprocess`), and f runs with BatchNorm in
inference mode: the features are those the linear probe and the kNN classifier of the run see.
"""

import dataclasses
import functools
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from simclr_jax.core import augment, networks
from simclr_jax.core.networks import ft_proj_selector, resolve_selector
from simclr_jax.data import dataset
from simclr_jax.errors import CheckpointError, InputError
from simclr_jax.runtime.files import CONFIG_FILE, ENCODER_FILE, checkpoint_dir
from simclr_jax.train.checkpoint import Checkpointer, has_steps
from simclr_jax.train.state import abstract_pretrain_tree, checked_restore, compute_dtype

EXPORT_FILE = ENCODER_FILE  # in the workdir: {'params', 'batch_stats'} of f and g
_INPUT_KEYS = ("image_size", "mean", "std")  # what `preprocess` reads of the spec


def preprocess(images, spec):
    """(N, H, W, 3) pixels in [0, 255] -> what f is fed at evaluation: float32 (N, S, S, 3),
    resized to S = spec.image_size (`augment.downstream_batch` with train=False), normalised with
    the run's statistics (`data.normalize`). spec: `augment.spec_from_config(run config)`."""
    x = augment.downstream_batch(None, 0, images, None, train=False, image_size=spec.image_size)
    return dataset.normalize(x, spec)


@functools.partial(jax.jit, static_argnames=("model", "spec_items", "projection", "layer"))
def _embed(model, variables, pixels, *, spec_items: tuple, projection: bool, layer: int):
    x = preprocess(pixels, types.SimpleNamespace(**dict(spec_items)))
    if projection:
        return model.apply(variables, x, train=False)  # (h, z)
    # h (layer 0) or the first `layer` head layers' output
    return model.apply(variables, x, train=False, method="features", layer=layer)


def _pixels(images) -> np.ndarray | jax.Array:
    """A batch of images as f's evaluation reads them: uint8 as they are; float in [0, 1] scaled
    to [0, 255] (kept float: no rounding); one channel repeated to three, as the data loader does.
    Raises InputError for what is not a non-empty (N, H, W, 3) or (N, H, W, 1) batch of finite
    pixels: a single (H, W, 3) image would otherwise read as H images of W x 3 pixels."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        one = " (one image: pass images[None])" if len(shape) == 3 and shape[-1] in (1, 3) else ""
        raise InputError(
            f"images must be a batch (N, H, W, 3) or (N, H, W, 1), got shape {shape}{one}"
        )
    if 0 in shape:
        raise InputError(f"images holds no pixels (shape {shape}): pass at least one image")
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.dtype == jnp.uint8:
        return images
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise InputError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if not bool(jnp.all(jnp.isfinite(images))):
        raise InputError("images hold NaN or infinite pixels: pass finite values in [0, 1]")
    if float(jnp.max(images)) > 1.0 + 1e-3 or float(jnp.min(images)) < -1e-3:
        raise InputError("float images must be in [0, 1] (pass uint8 for pixels in 0..255)")
    return images.astype(jnp.float32) * 255.0


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A pretrained SimCLR model as a function: `encoder(images, layer=k)` -> the k-th projection
    head layer's output (0: h; by default `layer`, the run's downstream.ft_proj_selector),
    `encoder(images, projection=True) -> (h, z)`, in batches of `batch_size`.

    `variables` are the model's ({'params': {'encoder', 'head'}, 'batch_stats': {...}}, what
    `model.apply` takes; f alone: `encoder_variables`, for `networks.build_encoder(config.model)`);
    `config` is the run's, `step` the pretraining step they come from (None: read from an export).
    """

    model: nn.Module  # networks.SimCLRModel: f then g
    variables: dict
    config: ml_collections.ConfigDict
    step: int | None
    source: str  # the checkpoint directory or file they were read from
    layer: int = 0  # what `encoder(images)` returns: 0 = h, k = the k-th head layer's output

    @property
    def encoder_variables(self) -> dict:
        v = self.variables
        return {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]}

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def _spec_items(self) -> tuple:
        """The input side's settings as a hashable (static) argument of the jitted embedding."""
        spec = augment.spec_from_config(self.config)
        return tuple(sorted((k, v) for k, v in vars(spec).items() if k in _INPUT_KEYS))

    def __call__(
        self, images, projection: bool = False, batch_size: int = 256, layer: int | None = None
    ):
        layers = self.config.model.head_layers
        if layer is not None and not -1 <= int(layer) <= layers:
            raise InputError(
                f"layer must be in 0..{layers} or -1 (0 = h, {layers} or -1 = z), got {layer}"
            )
        layer = self.layer if layer is None else resolve_selector(layer, layers)
        pixels = _pixels(
            images if isinstance(images, np.ndarray | jax.Array) else np.asarray(images)
        )
        outs = [
            _embed(
                self.model,
                self.variables,
                pixels[i : i + batch_size],
                spec_items=self._spec_items,
                projection=projection,
                layer=layer,
            )
            for i in range(0, len(pixels), batch_size)
        ]
        if projection:
            return jnp.concatenate([h for h, _ in outs]), jnp.concatenate([z for _, z in outs])
        return jnp.concatenate(outs)


def export(variables: dict, path: str) -> None:
    """Writes the model's variables ({'params', 'batch_stats'}, f and g) to `path` with
    flax.serialization (msgpack; readable without this project), atomically."""
    payload = serialization.to_bytes(jax.device_get(variables))
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)


def read_config(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"No {CONFIG_FILE} in {directory}: load_encoder reads the run's config from there "
            f"(the workdir of the run)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _restore(config, directory: str) -> tuple[dict, int]:
    """The model's variables (f and g) of the newest checkpoint in `directory` made for `config`."""
    ckpt = Checkpointer(directory, create=False, async_save=False)
    try:
        found = checked_restore(ckpt, abstract_pretrain_tree(config), config)
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(f"No readable pretraining checkpoint in {directory}.")
    tree, _, step = found
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, int(step)


def _locate(path: str) -> tuple[str, str, str]:
    """(kind 'checkpoint' | 'export', where, the run's directory) for a workdir, a pretraining
    checkpoint directory or an export file."""
    if os.path.isfile(path):
        return "export", path, os.path.dirname(path)
    ckpt_dir = checkpoint_dir(path, "pretrain")
    if has_steps(ckpt_dir):  # a workdir: its checkpoints are the newest state
        return "checkpoint", ckpt_dir, path
    if os.path.isfile(os.path.join(path, EXPORT_FILE)):  # a workdir holding the export only
        return "export", os.path.join(path, EXPORT_FILE), path
    if has_steps(path):  # <workdir>/checkpoints/pretrain
        return "checkpoint", path, os.path.dirname(os.path.dirname(path))
    return "", path, path


def load_encoder(path: str, _chain: tuple[str, ...] = ()) -> Encoder:
    """The pretrained encoder of a run: `path` is its workdir, its pretraining checkpoint
    directory (`<workdir>/checkpoints/pretrain`: the newest checkpoint) or an `encoder.msgpack`;
    the model is built from the run's own config.json. A workdir that ran --mode=downstream from
    another run's checkpoint (config.restore) leads to that run (its `layer` is then the
    selector of the workdir passed: what that workdir's downstream stage read).

    A relative `restore` in a config.json is taken relative to that workdir (runs record it
    absolute). Raises CheckpointError when `path` holds none of these, or when the chain of
    `restore`s leads back to a workdir it passed."""
    path = os.path.abspath(os.path.expanduser(path))
    if path in _chain:
        raise CheckpointError(
            f"The config.restore chain loops ({' -> '.join([*_chain, path])}), so it never reaches "
            f"a pretrained encoder: point config.restore in {_chain[-1]}/{CONFIG_FILE} at a "
            f"pretraining run's workdir."
        )
    kind, where, run_dir = _locate(path)
    if not kind:
        config = read_config(path) if os.path.isfile(os.path.join(path, CONFIG_FILE)) else None
        if config is not None and config.get("restore"):
            restore = os.path.join(path, os.path.expanduser(config.restore))  # abs stays abs
            # The features this workdir's downstream stage read, not those of the run it restored
            return dataclasses.replace(
                load_encoder(restore, (*_chain, path)), layer=ft_proj_selector(config)
            )
        raise CheckpointError(
            f"{path} holds no pretrained encoder: pass a workdir of a pretraining run, its "
            f"checkpoints/pretrain directory, or an {EXPORT_FILE} (with its config.json beside it)."
        )
    config = read_config(run_dir)
    model = networks.build_model(config.model, dtype=compute_dtype(config))
    if kind == "checkpoint":
        variables, step = _restore(config, where)
    else:
        with open(where, "rb") as f:
            variables = jax.tree.map(jnp.asarray, serialization.msgpack_restore(f.read()))
        step = None
    return Encoder(model, variables, config, step, where, layer=ft_proj_selector(config))
