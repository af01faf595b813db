"""Tests of simclr_jax.core.augment: shapes, ranges, determinism, application rates, reference
formulas (torchvision's crop sampling, colorsys HSV, numpy blur) and device-count invariance.

Compiles dominate the run time on CPU, so tests share jitted functions where they can (e.g. one
colour-jitter compile with strength and p traced serves four tests)."""

import colorsys
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simclr_jax.core import augment, image_ops

N_KEYS = 4000  # keys per rate test: binomial sd <= 0.008
LUMA = np.array([0.2989, 0.587, 0.114], np.float32)


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            image_size=32,
            crop_scale_min=0.08,
            flip_prob=0.5,
            jitter_strength=0.5,
            jitter_prob=0.8,
            grayscale_prob=0.2,
            blur_prob=0.5,  # > 0 so the blur branch of the pipeline is exercised too
        )
    )
    cfg.update(overrides)
    return cfg


def _image(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


def _uint8(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


def _keys(n=N_KEYS, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _assert_rate(hits, p):
    """Asserts a Bernoulli(p) rate within 4.5 binomial standard deviations."""
    n = hits.size
    tol = 4.5 * math.sqrt(p * (1 - p) / n)
    assert abs(float(np.mean(hits)) - p) < tol, (float(np.mean(hits)), p, tol)


# ----------------------------------------------------------------------------- crop


def _torchvision_crop_params(rng, height, width, scale, ratio):
    """numpy transcription of torchvision RandomResizedCrop.get_params."""
    for _ in range(10):
        target_area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    h, w = height, width
    if width / height < min(ratio):
        h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(height * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    "height, width, scale", [(32, 32, (0.08, 1.0)), (20, 40, (0.6, 1.0))], ids=["square", "wide"]
)
def test_crop_box_statistics_match_torchvision(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    sample = jax.jit(jax.vmap(lambda k: image_ops._crop_box(k, height, width, scale, ratio)))
    top, left, h, w = (np.asarray(a) for a in sample(_keys()))
    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_crop_params(rng, height, width, scale, ratio) for _ in top])

    # Every box lies inside the image.
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (top + h <= height).all()
    assert (left >= 0).all() and (left + w <= width).all()
    area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    assert scale[0] * 0.8 < area.mean() < scale[1]
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(np.log(w / h).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.03
    # Same rate of the central fallback box.
    fallback = _torchvision_crop_params(rng, height, width, (2.0, 2.0), ratio)  # never fits
    is_fb = (top == fallback[0]) & (left == fallback[1]) & (h == fallback[2]) & (w == fallback[3])
    ref_fb = (ref == np.array(fallback)).all(axis=1)
    assert abs(is_fb.mean() - ref_fb.mean()) < 0.03
    # Offsets are uniform over the valid range: mean relative position 1/2.
    free = (height - h)[~is_fb]
    assert abs((top[~is_fb][free > 0] / free[free > 0]).mean() - 0.5) < 0.03


def test_full_crop_reproduces_image():
    image = _image((16, 16, 3))
    # scale traced: one compile serves both calls.
    crop = jax.jit(lambda s: image_ops.random_resized_crop(jax.random.key(3), image, 16, s, (1, 1)))
    np.testing.assert_allclose(crop(jnp.array([1.0, 1.0])), image, atol=1e-6)
    # ... and a smaller (square) crop does not.
    assert not np.allclose(crop(jnp.array([0.08, 0.5])), image, atol=1e-3)


def test_crop_resamples_the_sampled_box():
    # Channel 0 encodes the row, channel 1 the column: bilinear resampling of a ramp is exact,
    # so the output must equal the box's sampling grid (clamped at the image border).
    size, out_size = 48, 32
    rows = np.arange(size, dtype=np.float32) / (size - 1)
    image = np.stack([*np.meshgrid(rows, rows, indexing="ij"), np.zeros((size, size))], -1)
    image = jnp.asarray(image, jnp.float32)
    scale, ratio = (0.1, 0.4), (3 / 4, 4 / 3)  # boxes <= 31 px < out_size: upsampling only
    keys = _keys(8, seed=1)
    box_and_crop = lambda k: (
        image_ops._crop_box(k, size, size, scale, ratio),
        image_ops.random_resized_crop(k, image, out_size, scale=scale),
    )
    boxes, outs = jax.jit(jax.vmap(box_and_crop))(keys)
    grid = np.arange(out_size) + 0.5
    for out, (top, left, h, w) in zip(np.asarray(outs), zip(*boxes, strict=True), strict=True):
        assert h <= out_size and w <= out_size
        want_rows = np.clip(top + grid * h / out_size - 0.5, 0, size - 1) / (size - 1)
        want_cols = np.clip(left + grid * w / out_size - 0.5, 0, size - 1) / (size - 1)
        np.testing.assert_allclose(out[:, 0, 0], want_rows, atol=1e-5)
        np.testing.assert_allclose(out[0, :, 1], want_cols, atol=1e-5)


# ----------------------------------------------------------------------------- flip, crop_flip


def test_flip_rate_and_values():
    image = np.asarray(_image((4, 4, 3)))
    out = np.asarray(jax.jit(jax.vmap(lambda k: image_ops.random_flip(k, image)))(_keys()))
    flipped = (out == image[:, ::-1]).all(axis=(1, 2, 3))
    same = (out == image).all(axis=(1, 2, 3))
    assert (flipped ^ same).all()  # each output is exactly one of the two
    _assert_rate(flipped, 0.5)


def test_crop_flip_is_a_window_of_the_padded_image():
    image, pad = _image((8, 8, 3)), 2
    padded = np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    outs = np.asarray(jax.jit(jax.vmap(lambda k: image_ops.crop_flip(k, image, pad)))(_keys(64)))
    assert outs.shape == (64, 8, 8, 3) and outs.dtype == np.float32
    seen = set()
    for out in outs:
        matches = [
            (i, j, flip)
            for i in range(2 * pad + 1)
            for j in range(2 * pad + 1)
            for flip in (False, True)
            if np.array_equal(out, padded[i : i + 8, j : j + 8][:, :: -1 if flip else 1])
        ]
        assert matches, "output is not a (flipped) window of the reflect-padded image"
        seen.update(matches)
    assert len({(i, j) for i, j, _ in seen}) > 15  # most of the 25 offsets are used
    assert {flip for _, _, flip in seen} == {False, True}


# ----------------------------------------------------------------------------- colour


def test_to_grayscale_luma_and_equal_channels():
    image = _image((5, 6, 3))
    gray = np.asarray(image_ops.to_grayscale(image))
    want = np.asarray(image) @ LUMA
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], want, atol=1e-6)


def test_random_grayscale_rate():
    image = np.asarray(_image((4, 4, 3)))
    out = np.asarray(jax.jit(jax.vmap(lambda k: image_ops.random_grayscale(k, image)))(_keys()))
    is_gray = ((out[..., :1] == out[..., 1:]).all(axis=-1)).all(axis=(1, 2))
    unchanged = (out == image).all(axis=(1, 2, 3))
    assert (is_gray ^ unchanged).all()
    _assert_rate(is_gray, 0.2)


JITTER_IMAGE = _image((4, 4, 3), seed=5)


@pytest.fixture(scope="module")
def jitter():
    """color_jitter on JITTER_IMAGE for (N_KEYS,) keys; strength and p traced: one compile."""
    batched = jax.jit(jax.vmap(image_ops.color_jitter, in_axes=(0, None, None, None)))
    return lambda strength, p: np.asarray(batched(_keys(), JITTER_IMAGE, strength, p))


def test_color_jitter_rate_and_range(jitter):
    out = jitter(0.5, 0.8)
    changed = (out != np.asarray(JITTER_IMAGE)).any(axis=(1, 2, 3))
    _assert_rate(changed, 0.8)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_color_jitter_strength_zero_is_identity(jitter):
    out = jitter(0.0, 1.0)
    np.testing.assert_allclose(out, np.broadcast_to(JITTER_IMAGE, out.shape), atol=2e-6)
    # ... while a real strength moves every image.
    moved = np.abs(jitter(1.0, 1.0) - np.asarray(JITTER_IMAGE)).max(axis=(1, 2, 3))
    assert (moved > 1e-3).mean() > 0.99


def _np_hue(x, delta):
    hsv = [colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]
    rgb = [colorsys.hsv_to_rgb((h + delta) % 1, s, v) for h, s, v in hsv]
    return np.clip(np.array(rgb).reshape(x.shape), 0, 1)


def _np_jitter(x, factors, delta, order):
    """numpy colour jitter: ops 0..3 = brightness, contrast, saturation, hue, in `order`."""
    blend = lambda a, b, f: np.clip(f * a + (1 - f) * b, 0, 1)
    ops = [
        lambda x: np.clip(x * factors[0], 0, 1),
        lambda x: blend(x, (x @ LUMA).mean(), factors[1]),
        lambda x: blend(x, (x @ LUMA)[..., None], factors[2]),
        lambda x: _np_hue(x, delta),
    ]
    for o in order:
        x = ops[o](x)
    return x


def test_color_jitter_matches_numpy_in_random_order(jitter):
    out = jitter(1.0, 1.0)
    orders, order_matters = set(), 0
    for key, got in zip(_keys(16), out[:16], strict=True):
        # The documented sampling: 3 factors in [0.2, 1.8], hue shift in [-0.2, 0.2], sort keys.
        u = np.asarray(image_ops._uniforms(key, 9))
        factors, delta, order = 0.2 + 1.6 * u[:3], 0.2 * (2 * u[3] - 1), tuple(np.argsort(u[4:8]))
        want = _np_jitter(np.asarray(JITTER_IMAGE), factors, delta, order)
        np.testing.assert_allclose(got, want, atol=1e-5)
        orders.add(order)
        fixed = _np_jitter(np.asarray(JITTER_IMAGE), factors, delta, (0, 1, 2, 3))
        order_matters += not np.allclose(want, fixed, atol=1e-4)
    # Many permutations occur, and mostly a fixed order would have given another image.
    assert len(orders) > 6 and order_matters > 8


def test_hsv_and_hue_shift_match_colorsys():
    pixels = np.random.default_rng(1).uniform(size=(200, 3)).astype(np.float32)
    pixels[:4] = [[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1]]  # gray and primaries
    hsv = np.stack([np.asarray(a) for a in image_ops._rgb_to_hsv(jnp.asarray(pixels))], -1)
    want = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    np.testing.assert_allclose(hsv, want, atol=1e-5)
    shifted = np.asarray(image_ops._adjust_hue(jnp.asarray(pixels), 0.15))
    np.testing.assert_allclose(shifted, _np_hue(pixels, 0.15), atol=1e-5)


# ----------------------------------------------------------------------------- blur


def test_gaussian_blur_matches_numpy_reference():
    blur = jax.jit(image_ops.gaussian_blur)  # p and sigma traced: one compile for the 3 calls
    image = _image((30, 30, 3))  # int(0.1 * 30) // 2 = 1: a 3-tap kernel
    out = np.asarray(blur(jax.random.key(0), image, 1.0, sigma=(1.0, 1.0)))
    k = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / 2)
    k /= k.sum()
    padded = np.pad(np.asarray(image), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    rows = sum(k[t] * padded[t : t + 30] for t in range(3))
    want = sum(k[t] * rows[:, t : t + 30] for t in range(3))
    np.testing.assert_allclose(out, want, atol=1e-6)
    # p = 0 never blurs; a constant image is a fixed point.
    assert np.array_equal(blur(jax.random.key(0), image, 0.0), image)
    flat = jnp.full((30, 30, 3), 0.3)
    np.testing.assert_allclose(blur(jax.random.key(0), flat, 1.0), flat, atol=1e-6)


# ----------------------------------------------------------------------------- pipelines


def test_example_keys_derivation():
    key, ids = jax.random.key(7), jnp.array([3, 0, 11], jnp.int32)
    keys = augment.example_keys(key, 5, ids)
    for k, i in zip(keys, ids, strict=True):
        want = jax.random.fold_in(jax.random.fold_in(key, 5), i)
        assert np.array_equal(jax.random.key_data(k), jax.random.key_data(want))
    other = augment.example_keys(key, 6, ids)
    assert not np.array_equal(jax.random.key_data(keys), jax.random.key_data(other))


BATCH, STEP = 16, 3


@pytest.fixture(scope="module")
def views():
    """two_views, jitted once, and its output on a batch that is a slice of a dataset."""
    cfg = _cfg()
    fn = jax.jit(lambda k, s, x, i: augment.two_views(k, s, x, i, cfg))
    images = _uint8((BATCH, 40, 40, 3), seed=2)  # stored 40 px, views 32 px
    ids = jnp.arange(100, 100 + BATCH, dtype=jnp.int32)
    return cfg, fn, images, ids, fn(jax.random.key(0), STEP, images, ids)


def test_two_views_shapes_range_and_distinctness(views):
    _, fn, images, ids, (v1, v2) = views
    for v in (v1, v2):
        assert v.shape == (BATCH, 32, 32, 3) and v.dtype == jnp.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    assert not np.allclose(v1, v2)
    w1, _ = fn(jax.random.key(0), STEP + 1, images, ids)  # another step, other views
    assert not np.allclose(v1, w1)
    u1, _ = fn(jax.random.key(0), STEP, images, ids)  # same inputs, same views
    assert np.array_equal(u1, v1)


def test_simclr_view_eager_equals_jitted_two_views(views):
    # The eager single-image pipeline vs the jitted, vmapped one, given the documented key
    # derivation fold_in(fold_in(fold_in(key, step), example_id), view).
    cfg, _, images, ids, (_, v2) = views
    example_key = augment.example_keys(jax.random.key(0), STEP, ids)[5]
    got = augment.simclr_view(jax.random.fold_in(example_key, 1), images[5], cfg)
    assert got.shape == (32, 32, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, v2[5], atol=1e-5)


def test_two_views_invariant_to_sharding_and_order(views):
    cfg, fn, images, ids, (v1, v2) = views
    n = 4
    if jax.local_device_count() >= n:  # one shard per (simulated) device
        step = jax.pmap(lambda x, i: augment.two_views(jax.random.key(0), STEP, x, i, cfg))
        s1, s2 = step(images.reshape(n, -1, 40, 40, 3), ids.reshape(n, -1))
    else:  # single device: the same shards one after the other
        shards = [
            fn(jax.random.key(0), STEP, x, i)
            for x, i in zip(*(a.reshape(n, -1, *a.shape[1:]) for a in (images, ids)), strict=True)
        ]
        s1, s2 = (np.stack(s) for s in zip(*shards, strict=True))
    assert np.array_equal(np.asarray(s1).reshape(v1.shape), v1)
    assert np.array_equal(np.asarray(s2).reshape(v2.shape), v2)
    # Order within the batch does not matter either: views follow the example id.
    perm = np.random.default_rng(0).permutation(BATCH)
    p1, _ = fn(jax.random.key(0), STEP, images[perm], ids[perm])
    assert np.array_equal(p1, np.asarray(v1)[perm])


def test_downstream_batch_eval_and_train():
    batch = jax.jit(augment.downstream_batch, static_argnames=("train", "image_size"))
    images, ids, key = (
        _uint8((6, 32, 32, 3), seed=3),
        jnp.arange(6, dtype=jnp.int32),
        jax.random.key(1),
    )
    ev = batch(key, 0, images, ids, train=False, image_size=32)
    assert ev.dtype == jnp.float32
    np.testing.assert_allclose(ev, np.asarray(images, np.float32) / 255, rtol=1e-6, atol=0)
    resized = batch(key, 0, images, ids, train=False, image_size=24)
    assert resized.shape == (6, 24, 24, 3)
    assert float(resized.min()) >= 0.0 and float(resized.max()) <= 1.0

    tr = batch(key, 0, images, ids, train=True, image_size=32)
    assert tr.shape == (6, 32, 32, 3) and tr.dtype == jnp.float32
    assert not np.array_equal(tr, ev)
    # Per-example keys from global ids, as two_views: example 4 gets crop_flip(its key).
    keys = augment.example_keys(key, 0, ids)
    np.testing.assert_allclose(tr[4], image_ops.crop_flip(keys[4], ev[4], pad=4), atol=1e-6)
