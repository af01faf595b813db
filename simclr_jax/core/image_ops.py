"""The single-image augmentation ops: `op(key, image, ...) -> image` on a float32 (H, W, C) image in
[0, 1], pure functions of a `jax.random` key: random resized crop, flip, colour jitter, grayscale,
Gaussian blur, and the classifier's pad-crop-flip (`augment.py` composes them into views).

Every op is jit- and vmap-able: static shapes, random application via `jnp.where` (under vmap a
`lax.cond` becomes a select anyway), a clip to [0, 1] after each op. Colour arithmetic is
elementwise, not matmuls, so it stays float32 on TPU (a default-precision matmul rounds to bf16).
"""

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)

# Candidate boxes drawn at once by random_resized_crop (torchvision tries 10 in a loop).
_CROP_ATTEMPTS = 10


def _uniforms(key, n: int) -> jnp.ndarray:
    """(n,) uniforms in [0, 1) from one draw, rounded up to a power of two.

    One draw per op keeps the number of threefry calls low, and XLA:CPU compiles threefry for
    some sizes far slower than for powers of two (benchmarks/README.md, compile times).
    """
    return jax.random.uniform(key, (1 << (n - 1).bit_length(),))[:n]


def _to_float(image_uint8: jnp.ndarray) -> jnp.ndarray:
    """uint8 [0, 255] -> float32 [0, 1], any shape."""
    return image_uint8.astype(jnp.float32) / 255.0


# ----------------------------------------------------------------------------- crop and flip


def _crop_box(key, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]):
    """Samples an integer crop box (top, left, h, w) exactly as torchvision's RandomResizedCrop.

    All `_CROP_ATTEMPTS` candidates are drawn at once and the first that fits is kept; if none
    fits, the fallback is torchvision's central crop with the aspect ratio clamped to `ratio`.
    Returns four int32 scalars.
    """
    n = _CROP_ATTEMPTS
    u = _uniforms(key, 2 * n + 2)  # (area, log-ratio) x n, then top, left
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:n])  # (n,)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[n : 2 * n])  # (n,)
    w = jnp.round(jnp.sqrt(area * aspect))  # (n,), round-half-even like Python's round
    h = jnp.round(jnp.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n,)
    found, first = fits.any(), jnp.argmax(fits)

    # Fallback (static): whole image, or the largest central box with a ratio inside `ratio`.
    fb_h, fb_w = height, width
    if width / height < min(ratio):
        fb_h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fb_w = int(round(height * max(ratio)))

    h = jnp.where(found, h[first], fb_h).astype(jnp.int32)
    w = jnp.where(found, w[first], fb_w).astype(jnp.int32)
    # Uniform integer offsets in [0, height - h] and [0, width - w].
    top = jnp.minimum(jnp.floor(u[2 * n] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum(jnp.floor(u[2 * n + 1] * (width - w + 1)).astype(jnp.int32), width - w)
    top = jnp.where(found, top, (height - fb_h) // 2)
    left = jnp.where(found, left, (width - fb_w) // 2)
    return top, left, h, w


def random_resized_crop(
    key, image, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> jnp.ndarray:
    """Random-area, random-aspect crop of a (H, W, C) image, resized to (out_size, out_size, C).

    The box is sampled as torchvision / official SimCLR do (area fraction uniform in `scale`,
    aspect ratio log-uniform in `ratio`). The crop and resize are one static-shape resampling
    (`jax.image.scale_and_translate`, bilinear, antialiased when shrinking) that maps the box
    onto the output grid, so no dynamic slice is needed. Unlike crop-then-resize, output pixels
    at the box edge may take up to half a pixel of context from just outside the box.
    """
    height, width, channels = image.shape
    top, left, h, w = _crop_box(key, height, width, scale, ratio)
    # Output coordinate = input coordinate * scale + translation (half-pixel centres).
    scale_yx = jnp.stack([out_size / h, out_size / w])  # (2,)
    shift_yx = -jnp.stack([top, left]) * scale_yx  # (2,)
    out = jax.image.scale_and_translate(
        image, (out_size, out_size, channels), (0, 1), scale_yx, shift_yx, method="linear"
    )
    return jnp.clip(out, 0.0, 1.0)


def random_flip(key, image, p=0.5):
    """Flips a (H, W, C) image left-right with probability p."""
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


def crop_flip(key, image, pad: int = 4, flip_prob: float = 0.5):
    """Downstream augmentation: reflect-pad by `pad`, random crop back to (H, W), flip with
    probability flip_prob."""
    height, width, channels = image.shape
    u = _uniforms(key, 3)  # top, left, flip
    top, left = jnp.minimum(jnp.floor(u[:2] * (2 * pad + 1)).astype(jnp.int32), 2 * pad)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))  # (H, W, C)
    return jnp.where(u[2] < flip_prob, out[:, ::-1], out)


# ----------------------------------------------------------------------------- colour


def to_grayscale(image):
    """(H, W, 3) -> (H, W, 3) luma, the same value in every channel."""
    gray = _LUMA[0] * image[..., 0] + _LUMA[1] * image[..., 1] + _LUMA[2] * image[..., 2]
    return jnp.broadcast_to(gray[..., None], image.shape)


def random_grayscale(key, image, p=0.2):
    """Replaces a (H, W, 3) image by its grayscale with probability p."""
    return jnp.where(jax.random.bernoulli(key, p), to_grayscale(image), image)


def _blend(image, other, factor):
    """factor * image + (1 - factor) * other, clipped; factor == 1 returns image exactly."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _rgb_to_hsv(image):
    """(..., 3) RGB -> hue, saturation, value, each (...), hue in [0, 1) (as torchvision)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc, minc = image.max(-1), image.min(-1)
    chroma = maxc - minc
    gray = chroma == 0
    sat = chroma / jnp.where(gray, 1.0, maxc)
    safe = jnp.where(gray, 1.0, chroma)  # avoid 0/0 on gray pixels, whose hue is 0
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = jnp.where(
        maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)
    )  # sextant-relative hue in [-1, 5)
    hue = jnp.where(gray, 0.0, hue)
    return (hue / 6.0) % 1.0, sat, maxc


def _hsv_to_rgb(hue, sat, val):
    """Inverse of _rgb_to_hsv: three (...) arrays -> (..., 3) RGB."""
    h6 = hue * 6.0
    sector = jnp.floor(h6).astype(jnp.int32) % 6
    frac = h6 - jnp.floor(h6)
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    # Per sector (0..5), which of (v, q, p, t) each channel takes.
    table = {"r": (val, q, p, p, t, val), "g": (t, val, val, q, p, p), "b": (p, p, t, val, val, q)}
    channels = [jnp.select([sector == i for i in range(6)], table[c]) for c in "rgb"]
    return jnp.stack(channels, axis=-1)


def _adjust_brightness(image, factor):
    return jnp.clip(image * factor, 0.0, 1.0)


def _adjust_contrast(image, factor):
    return _blend(image, to_grayscale(image).mean(), factor)  # blend with the mean gray level


def _adjust_saturation(image, factor):
    return _blend(image, to_grayscale(image), factor)


def _adjust_hue(image, delta):
    """Rotates hue by delta (in turns) through RGB -> HSV -> RGB, as torchvision."""
    hue, sat, val = _rgb_to_hsv(image)
    return jnp.clip(_hsv_to_rgb((hue + delta) % 1.0, sat, val), 0.0, 1.0)


def color_jitter(key, image, strength: float, p=0.8):
    """SimCLR colour distortion of a (H, W, 3) image, applied with probability p.

    Brightness, contrast and saturation factors are uniform in [1 - 0.8 s, 1 + 0.8 s] (floored
    at 0), the hue shift uniform in [-0.2 s, 0.2 s] turns, with s = strength. As torchvision:
    brightness scales, contrast blends with the mean gray level, saturation with the grayscale
    image, and hue is shifted through RGB -> HSV -> RGB (exact, not a YIQ approximation). The
    four ops run in a random order (a random permutation indexing `lax.switch`), each clipped.
    """
    u = _uniforms(key, 9)  # 3 factors, hue shift, 4 sort keys, apply
    bcs, hue = 0.8 * strength, 0.2 * strength
    lo = jnp.maximum(0.0, 1.0 - bcs)
    factors = lo + (1.0 + bcs - lo) * u[:3]  # (3,) uniform in [max(0, 1 - bcs), 1 + bcs]
    ops = (
        partial(_adjust_brightness, factor=factors[0]),
        partial(_adjust_contrast, factor=factors[1]),
        partial(_adjust_saturation, factor=factors[2]),
        partial(_adjust_hue, delta=hue * (2.0 * u[3] - 1.0)),
    )
    order = jnp.argsort(u[4:8])  # (4,) a uniformly random permutation of the ops
    # A loop rather than 4 unrolled stages: under vmap each switch evaluates all 4 branches, so
    # unrolling would trace (and compile) 16 ops instead of 4.
    out = lax.fori_loop(0, len(ops), lambda i, x: lax.switch(order[i], ops, x), image)
    return jnp.where(u[8] < p, out, image)


# ----------------------------------------------------------------------------- blur


def _blur_axis(image, kernel, axis: int):
    """Correlates `image` with a 1-D (K,) kernel along `axis`, reflect-padded to keep the size."""
    radius = kernel.shape[0] // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="reflect")
    size = image.shape[axis]
    taps = [
        kernel[t] * lax.slice_in_dim(padded, t, t + size, axis=axis) for t in range(kernel.shape[0])
    ]
    return sum(taps)


def gaussian_blur(key, image, p=0.5, kernel_frac=0.1, sigma=(0.1, 2.0)):
    """Separable Gaussian blur of a (H, W, C) image, applied with probability p.

    As official SimCLR: kernel size 2 * (int(kernel_frac * H) // 2) + 1 (3 taps at 32 px,
    23 at 224 px), sigma uniform in `sigma`. Borders are reflect-padded (as torchvision).
    """
    radius = int(image.shape[0] * kernel_frac) // 2
    if radius == 0:  # a one-tap kernel is the identity
        return image
    u = _uniforms(key, 2)  # sigma, apply
    s = sigma[0] + (sigma[1] - sigma[0]) * u[0]
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)  # (K,)
    kernel = jnp.exp(-(x**2) / (2.0 * s**2))
    kernel = kernel / kernel.sum()
    blurred = _blur_axis(_blur_axis(image, kernel, 0), kernel, 1)
    blurred = jnp.clip(blurred, 0.0, 1.0)
    return jnp.where(u[1] < p, blurred, image)


# ----------------------------------------------------------------------------- pipelines
