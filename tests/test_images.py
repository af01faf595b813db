"""images.py: decoding every kind of file to the uint8 canvas, the resize-and-crop policy, the
ImageFolder scan and its one-line errors, and the verifying pass that skips unreadable files."""

import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from simclr_jax.data import folders, images
from simclr_jax.errors import DataError
from tests.folder_fixture import ORIENTATION, write_folder

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _close(pixel, colour, tolerance=40) -> bool:
    """JPEG-tolerant colour comparison."""
    return bool(np.abs(np.asarray(pixel, int) - np.asarray(colour)).max() <= tolerance)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    return root, write_folder(root)


# --- decode: every mode -> RGB uint8 of the canvas size ----------------------------------------


def _in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(_noise(30, 40))
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    if mode == "P+transparency":
        im = rgb.convert("P")
        im.info["transparency"] = 0
        return im
    if mode in ("I;16", "I;16B", "I", "F"):
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(dtype))
    return rgb.convert(mode)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("P+transparency", "PNG"),
        ("PA", "TIFF"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("YCbCr", "TIFF"),
        ("I;16", "PNG"),
        ("I;16B", "TIFF"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("1", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("L", "PPM"),
    ],
)
def test_every_mode_decodes_to_rgb_canvas(mode, fmt):
    data = _encode(_in_mode(mode), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode.split("+")[0]  # the branch is exercised
    out = images.decode(data, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_sixteen_bit_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)  # (64,) 0 .. 65535
    for fmt, dtype in (("PNG", np.uint16), ("TIFF", np.int32)):  # I;16 and I
        path = tmp_path / f"ramp.{fmt.lower()}"
        Image.fromarray(np.tile(ramp, (64, 1)).astype(dtype)).save(path, fmt)
        out = images.decode(path, 64)  # 64 x 64: passthrough, so exactly value >> 8
        np.testing.assert_array_equal(out[5, :, 0], ramp >> 8)
        assert out.min() == 0 and out.max() == 255 and np.all(out[..., 0] == out[..., 2])


def test_alpha_and_palette_transparency_composite_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[1, 0] = (255, 0, 0, 255)  # opaque red stays red
    out = images.decode(_encode(Image.fromarray(rgba), "PNG"), 2)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (127, 127, 127)
    assert tuple(out[1, 0]) == RED
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 1), 1)
    out = images.decode(_encode(palette, "PNG", transparency=0), 2)  # index 0 transparent
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == RED


def test_float_values_are_clipped():
    values = np.array([[-10.0, 100.4, 300.0, 7.6]], np.float32).repeat(4, axis=0)  # (4, 4)
    out = images.decode(_encode(Image.fromarray(values), "TIFF"), 4)
    np.testing.assert_array_equal(out[0, :, 1], [0, 100, 255, 8])


def test_exif_orientation_six_comes_out_rotated():
    stored = np.empty((30, 40, 3), np.uint8)  # 40 wide, 30 high
    stored[:] = BLUE
    stored[:15, :20] = RED  # top-left quadrant
    plain = Image.fromarray(stored)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # display turned 90 degrees clockwise: 30 wide, 40 high
    # Untagged, canvas 30 keeps columns 5..35: red top-left. Tagged, the red quadrant is the
    # displayed top-right (x >= 15, y < 20); canvas 30 keeps rows 5..35: red at y < 15, x >= 15.
    upright = images.decode(_encode(plain, "JPEG", quality=95), 30)
    turned = images.decode(_encode(plain, "JPEG", quality=95, exif=exif), 30)
    assert _close(upright[3, 3], RED) and _close(upright[3, 26], BLUE)
    assert _close(turned[3, 26], RED) and _close(turned[3, 3], BLUE)
    assert _close(turned[26, 26], BLUE) and _close(turned[26, 3], BLUE)


# --- to_canvas: the resize-and-crop policy -----------------------------------------------------


def test_canvas_sized_image_passes_through_bitwise():
    image = _noise(32, 32)
    assert images.to_canvas(image, 32) is image
    np.testing.assert_array_equal(images.decode(_encode(Image.fromarray(image), "PNG"), 32), image)


@pytest.mark.parametrize("canvas", [30, 15, 48])  # crop only, shrink, enlarge
def test_shorter_side_resized_and_centre_kept(canvas):
    wide = np.empty((30, 90, 3), np.uint8)  # thirds: red | green | blue
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = RED, (0, 255, 0), BLUE
    for image in (wide, wide.transpose(1, 0, 2)):  # and the same image standing up
        out = images.to_canvas(image, canvas)
        assert out.shape == (canvas, canvas, 3) and out.dtype == np.uint8
        inner = out[2:-2, 2:-2]  # the centre third only (bicubic may ring at its edges)
        assert np.all(inner[..., 1] >= 250) and np.all(inner[..., [0, 2]] <= 5)


def test_to_canvas_shrinks_with_antialiasing():
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255  # finest pattern: averages to grey
    out = images.to_canvas(np.repeat(checker[..., None], 3, axis=-1).astype(np.uint8), 16)
    assert np.abs(out.astype(int) - 128).max() < 10


def test_to_canvas_rejects_other_arrays():
    with pytest.raises(ValueError, match="uint8"):
        images.to_canvas(np.zeros((8, 8, 3), np.float32), 8)


# --- unreadable files ---------------------------------------------------------------------------


def test_truncated_and_random_files_raise_bad_image(tmp_path):
    jpeg = _encode(Image.fromarray(_noise(40, 48)), "JPEG", quality=90)
    cases = {"cut.jpg": jpeg[: len(jpeg) // 2], "random.png": os.urandom(600), "empty.jpg": b""}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(images.BadImage) as err:
            images.decode(path, 16)
        assert err.value.path == str(path) and "\n" not in str(err.value)
        with pytest.raises(images.BadImage, match="^<bytes>: "):
            images.decode(data, 16)


def test_decompression_bombs_are_bad_images(monkeypatch):
    data = _encode(Image.fromarray(_noise(30, 40)), "PNG")  # 1,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow only warns up to twice this
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(images.BadImage, match="MAX_IMAGE_PIXELS"):
            images.decode(data, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises
    with pytest.raises(images.BadImage, match="DecompressionBombError"):
        images.decode(data, 16)


def test_fixture_files_all_decode_but_the_corrupt_ones(folder):
    root, info = folder
    for split in ("train", "test", "unlabelled"):
        for rel in folders.scan_split(root, split).files:
            if rel in info["corrupt"]:
                with pytest.raises(images.BadImage):
                    images.decode(os.path.join(root, rel), 24)
            else:
                assert images.decode(os.path.join(root, rel), 24).shape == (24, 24, 3)


# --- scan_split ---------------------------------------------------------------------------------


def test_scan_split_labels_classes_and_order(folder):
    root, info = folder
    train = folders.scan_split(root, "train")
    assert train.classes == ("cat", "dog", "ship") and train.split == "train"
    assert len(train) == info["train"] and train.labels.dtype == np.int32
    np.testing.assert_array_equal(train.labels, np.repeat([0, 1, 2], 6))
    assert all(
        f.startswith(f"train/{train.classes[y]}/")
        for f, y in zip(train.files, train.labels, strict=True)
    )
    assert list(train.files) == sorted(train.files)
    unlabelled = folders.scan_split(root, "unlabelled")
    assert unlabelled.classes == () and len(unlabelled) == info["unlabelled"] + 2
    assert np.all(unlabelled.labels == -1)
    assert folders.scan_split(root, "test").fingerprint() != train.fingerprint()


def test_scan_split_order_and_fingerprint_ignore_where_and_how_written(folder, tmp_path):
    root, _ = folder
    train = folders.scan_split(root, "train")
    copy = tmp_path / "copy"
    for rel in reversed(train.files):  # created in the opposite order, elsewhere
        os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), copy / rel)
    again = folders.scan_split(str(copy), "train")
    assert again.files == train.files and again.fingerprint() == train.fingerprint()
    np.testing.assert_array_equal(again.labels, train.labels)


def test_fingerprint_follows_added_and_removed_files(folder, tmp_path):
    root, _ = folder
    shutil.copytree(os.path.join(root, "train"), tmp_path / "train")
    split = folders.scan_split(str(tmp_path), "train")
    before, dog = split.fingerprint(), tmp_path / split.files[6]  # the first dog
    extra = tmp_path / "train" / "dog" / "zzz.png"
    shutil.copyfile(dog, extra)
    added = folders.scan_split(str(tmp_path), "train")
    assert len(added) == 19 and added.fingerprint() != before
    os.remove(extra)
    assert folders.scan_split(str(tmp_path), "train").fingerprint() == before
    os.remove(dog)
    assert folders.scan_split(str(tmp_path), "train").fingerprint() != before


def test_hidden_nested_and_other_files(tmp_path):
    png = _encode(Image.fromarray(_noise(8, 8)), "PNG")
    for rel in ("a/1.png", "a/deep/er/2.JPG", "a/.hidden.png", "a/.cache/3.png", "a/notes.txt"):
        os.makedirs(tmp_path / "train" / os.path.dirname(rel), exist_ok=True)
        (tmp_path / "train" / rel).write_bytes(png)
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")
    split = folders.scan_split(str(tmp_path), "train")
    assert split.files == ("train/a/1.png", "train/a/deep/er/2.JPG") and split.classes == ("a",)


# --- scan_split's errors: one line naming the path ----------------------------------------------


def _one_line_error(root, split, *needles):
    with pytest.raises(DataError) as err:
        folders.scan_split(str(root), split)
    message = str(err.value)
    assert "\n" not in message and str(root) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_scan_split_errors_name_the_path_and_the_fix(tmp_path):
    _one_line_error(tmp_path / "nowhere", "train", "does not exist", "DIR/train/<class>")
    (tmp_path / "test").mkdir()
    _one_line_error(tmp_path, "train", "no train/ folder", "it has test/", "DIR/test/<class>")
    _one_line_error(tmp_path, "test", "holds no image files", "one folder per class")
    png = _encode(Image.fromarray(_noise(8, 8)), "PNG")
    (tmp_path / "test" / "loose.png").write_bytes(png)
    (tmp_path / "test" / "cat").mkdir()
    _one_line_error(tmp_path, "test", "both loose image files", "loose.png", "cat")
    os.remove(tmp_path / "test" / "loose.png")
    (tmp_path / "test" / "dog").mkdir()
    (tmp_path / "test" / "dog" / "1.png").write_bytes(png)
    (tmp_path / "test" / "cat" / "readme.txt").write_text("not an image")
    _one_line_error(tmp_path, "test", "Class folder(s) cat under", "hold no image files")


# --- verify -------------------------------------------------------------------------------------


def test_verify_skips_corrupt_files_with_one_warning(folder, caplog):
    root, info = folder
    split = folders.scan_split(root, "unlabelled")
    with caplog.at_level(logging.WARNING, logger="simclr_jax.data.images"):
        kept, bad = folders.verify(root, split, 24, max_bad_fraction=0.2, num_threads=2)
    assert bad == info["corrupt"] and len(kept) == info["unlabelled"]
    assert kept.files == tuple(f for f in split.files if f not in bad)
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith(f"Skipped 2 unreadable file(s) of 22 under {root}/unlabelled: ")
    assert all(f"{b} (" in message for b in bad) and "\n" not in message


def test_verify_keeps_labels_with_their_files(folder, tmp_path, caplog):
    root, info = folder
    shutil.copytree(os.path.join(root, "train"), tmp_path / "train")
    shutil.copyfile(os.path.join(root, info["corrupt"][0]), tmp_path / "train" / "dog" / "x.jpg")
    split = folders.scan_split(str(tmp_path), "train")
    kept, bad = folders.verify(str(tmp_path), split, 24, max_bad_fraction=0.1)
    assert bad == ["train/dog/x.jpg"] and len(kept) == 18
    np.testing.assert_array_equal(kept.labels, np.repeat([0, 1, 2], 6))
    assert kept.fingerprint() == folders.scan_split(root, "train").fingerprint()
    good, none = folders.verify(root, folders.scan_split(root, "train"), 24, 0.0)
    assert none == [] and len(good) == 18


def test_verify_raises_above_the_bad_fraction(folder):
    root, info = folder
    split = folders.scan_split(root, "unlabelled")
    with pytest.raises(DataError) as err:
        folders.verify(root, split, 24, max_bad_fraction=0.05)
    assert str(err.value) == (
        f"2 of 22 files under {root}/unlabelled could not be read (first few: "
        f"{', '.join(info['corrupt'])}); more than data.max_bad_fraction=0.05. Fix or remove "
        f"them, or raise config.data.max_bad_fraction."
    )
    only_bad = split.take([split.files.index(f) for f in info["corrupt"]])
    with pytest.raises(DataError, match="None of the 2 files under .* could be read"):
        folders.verify(root, only_bad, 24, max_bad_fraction=1.0)
