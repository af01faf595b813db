"""SimCLR data augmentation: pure functions of a `jax.random` key, run on the accelerator.

* the single-image ops (`image_ops.py`): random resized crop, flip, colour jitter, grayscale,
  Gaussian blur, the classifier's pad-crop-flip;
* `simclr_view`, the SimCLR pipeline crop -> flip -> colour jitter -> grayscale -> blur;
* the batched entry points `two_views` (pretraining), `downstream_batch` (classifier) and
  `resized_crop_flip_batch` (the distilled student's view, when asked for): uint8 batches, one
  key per example from its *global* index, so a view never depends on how many devices run the
  step.

Everything is jit- and vmap-able (static shapes, `jnp.where` for random application).
"""

import types
from functools import partial

import jax
import jax.numpy as jnp

from simclr_jax.core.image_ops import (
    _to_float,
    color_jitter,
    crop_flip,
    gaussian_blur,
    random_flip,
    random_grayscale,
    random_resized_crop,
)
from simclr_jax.data import dataset


def simclr_view(key, image_uint8, cfg):
    """One SimCLR view of a (H, W, 3) uint8 image -> float32 (S, S, 3) in [0, 1], S = image_size.

    `cfg` has attributes image_size, crop_scale_min, flip_prob, jitter_strength, jitter_prob,
    grayscale_prob and blur_prob; they are read as Python values (close over cfg when jitting).
    """
    crop_key, flip_key, jitter_key, gray_key, blur_key = jax.random.split(key, 5)
    image = _to_float(image_uint8)
    image = random_resized_crop(crop_key, image, cfg.image_size, scale=(cfg.crop_scale_min, 1.0))
    image = random_flip(flip_key, image, cfg.flip_prob)
    image = color_jitter(jitter_key, image, cfg.jitter_strength, cfg.jitter_prob)
    image = random_grayscale(gray_key, image, cfg.grayscale_prob)
    if cfg.blur_prob > 0:  # static: no blur in the graph when it is off (the CIFAR setting)
        image = gaussian_blur(blur_key, image, cfg.blur_prob)
    return image


def spec_from_config(config) -> types.SimpleNamespace:
    """What the input side reads: the config's augment section, the output size and the dataset's
    channel statistics (`data.normalize`), as a plain namespace closed over when jitting."""
    mean, std = dataset.input_stats(config)
    size = config.data.image_size
    return types.SimpleNamespace(**config.augment.to_dict(), image_size=size, mean=mean, std=std)


def example_keys(key, step, example_ids):
    """Per-example keys fold_in(fold_in(key, step), id) for global example ids (B,) -> (B, ...)."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, example_ids)


def two_views(key, step, images_uint8, example_ids, cfg):
    """Two SimCLR views of a (B, H, W, 3) uint8 batch -> two float32 (B, S, S, 3).

    `example_ids` (B,) are global indices, so an example's views are the same whether the
    batch runs whole or split across devices. View v of an example uses fold_in(its key, v).
    """
    batch = images_uint8.shape[0]
    keys = example_keys(key, step, example_ids)  # (B,)
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    view_keys = jnp.concatenate([fold(keys, 0), fold(keys, 1)])  # (2B,): all view 0, then view 1
    # Both views in one flat vmap over 2B: traced and compiled once (a vmap nested over the view
    # axis compiles more slowly on CPU: benchmarks/README.md, compile times).
    images = jnp.concatenate([images_uint8, images_uint8])  # (2B, H, W, 3)
    views = jax.vmap(lambda k, image: simclr_view(k, image, cfg))(view_keys, images)
    return views[:batch], views[batch:]  # (B, S, S, 3) each


def resized_crop_flip_batch(key, step, images_uint8, example_ids, image_size, scale_min, flip_prob):
    """(B, H, W, 3) uint8 -> float32 (B, S, S, 3) in [0, 1]: a random resized crop (area in
    [scale_min, 1]) and a flip with probability flip_prob, no colour: the official SimCLRv2
    distillation's view (its preprocessing with colour distortion off). Per-example keys as
    two_views."""
    keys = example_keys(key, step, example_ids)

    def view(k, image):
        crop_key, flip_key = jax.random.split(k)
        image = random_resized_crop(crop_key, _to_float(image), image_size, scale=(scale_min, 1.0))
        return random_flip(flip_key, image, flip_prob)

    return jax.vmap(view)(keys, images_uint8)


def downstream_batch(
    key, step, images_uint8, example_ids, train: bool, image_size, flip_prob: float = 0.5
):
    """(B, H, W, 3) uint8 -> float32 (B, S, S, 3) in [0, 1] for the classifier, S = image_size.

    Images are first resized to S if stored at another size. Training adds crop_flip with
    per-example keys (same derivation as two_views) and padding S // 8 (4 px at 32 px, the
    usual CIFAR setting); evaluation is deterministic.
    """
    images = _to_float(images_uint8)
    batch, height, width, channels = images.shape
    if (height, width) != (image_size, image_size):
        shape = (batch, image_size, image_size, channels)
        images = jnp.clip(jax.image.resize(images, shape, method="linear"), 0.0, 1.0)
    if not train:
        return images
    keys = example_keys(key, step, example_ids)
    pad = max(1, image_size // 8)
    return jax.vmap(partial(crop_flip, pad=pad, flip_prob=flip_prob))(keys, images)
