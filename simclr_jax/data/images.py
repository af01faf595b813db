"""Image files as the encoder's uint8 canvas: decoding real-world files. On the host, free of jax:

* `to_canvas`: any (H, W, 3) uint8 image -> the square (canvas, canvas, 3) the encoder reads
  (shorter side resized to the canvas, longer side centre-cropped; a canvas-sized image as is);
* `decode`: one file (path or bytes) -> that canvas, whatever Pillow mode it opens in (grey,
  palette, alpha, CMYK, 16-bit, float, EXIF-rotated); anything unreadable raises `BadImage`.

The ImageFolder layout those files come in is `folders.py`'s.
"""

import functools
import io
import os

import numpy as np
from PIL import Image, ImageOps

from simclr_jax.errors import DataError

# The Pillow formats the image extensions folders.py scans for hold (MPO: multi-picture JPEGs
# from cameras). Opening only these keeps Pillow's exotic plugins (EPS runs Ghostscript) away from files found on disk.
_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


class BadImage(DataError):
    """A file that does not decode to an image; `path` is '<bytes>' for in-memory data.

    A DataError, so that one escaping a data stream reads as one line naming the file (run.py),
    not as a bug's traceback.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, " ".join(str(reason).split())  # one line
        super().__init__(f"{self.path}: {self.reason}")


def to_canvas(image: np.ndarray, canvas: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (canvas, canvas, 3) uint8: the shorter side resized to `canvas`, the
    longer side centre-cropped to it.

    The resize is Pillow's bicubic (antialiased when shrinking, `reducing_gap` off), computed
    for the centred square only (`box`): the same pixels as resizing the whole image and then
    cropping, with the crop exactly centred rather than rounded to a whole pixel. No resampling
    where the scale is 1: a canvas x canvas image is returned as is (CIFAR at canvas 32 passes
    through bitwise), and one whose shorter side is already `canvas` is only cropped.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"to_canvas needs an (H, W, 3) uint8 image; got {image.dtype} {image.shape}"
        )
    h, w = image.shape[:2]
    if (h, w) == (canvas, canvas):
        return image
    side = min(h, w)
    if side == canvas:  # whole-pixel crop (rounded down), so the kept pixels stay bitwise
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]
    top, left = (h - side) / 2, (w - side) / 2
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(image).resize((canvas, canvas), Image.BICUBIC, box=box))


def decode(data: bytes | str | os.PathLike, canvas: int) -> np.ndarray:
    """A JPEG/PNG/BMP/GIF/WebP/TIFF/PNM file (a path, or its bytes) -> (canvas, canvas, 3) uint8.

    Upright as its EXIF orientation says, in RGB whatever its mode (`_to_rgb`), then `to_canvas`.
    Decoded in full, so a truncated file raises rather than coming out partly grey (as long as
    nobody turned on PIL.ImageFile.LOAD_TRUNCATED_IMAGES). Any failure, and any image over
    PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb), raises `BadImage`.
    """
    in_memory = isinstance(data, bytes | bytearray | memoryview)
    name = "<bytes>" if in_memory else os.fspath(data)
    try:
        with Image.open(io.BytesIO(data) if in_memory else data, formats=_formats()) as im:
            _check_pixels(im.size)
            im.load()  # the full decode: truncated data raises here
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except BadImage:
        raise
    except Image.UnidentifiedImageError as err:  # its message repeats the path or a BytesIO repr
        raise BadImage(name, "not a JPEG, PNG, BMP, GIF, WebP, TIFF or PNM image") from err
    except Exception as err:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise BadImage(name, f"{type(err).__name__}: {err}") from err
    return to_canvas(rgb, canvas)


@functools.cache
def _formats() -> tuple[str, ...]:
    """_FORMATS less any this Pillow lacks (Image.open raises KeyError on an unknown name)."""
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _check_pixels(size: tuple[int, int]) -> None:
    """Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS and only warns above
    it: both are a bad file here. Checked by hand, since a warnings filter cannot be set for one
    thread (verify decodes on many); Pillow's own warning still shows, once."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise Image.DecompressionBombError(
            f"{size[0]}x{size[1]} pixels, over PIL.Image.MAX_IMAGE_PIXELS={limit}"
        )


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode -> (H, W, 3) uint8."""
    if im.mode in _SIXTEEN_BIT:
        # 16-bit grey PNG/TIFF (I;16*, or I in older Pillow): keep the top 8 bits, so the full
        # 0..65535 range maps to 0..255. Pillow's convert() clips at 255 instead (all white).
        return _grey(np.asarray(im).astype(np.int64).clip(0, 65535) >> 8)
    if im.mode == "F":  # float: values taken as 0..255, outside clipped, NaN black
        return _grey(np.clip(np.rint(np.nan_to_num(np.asarray(im), nan=0.0)), 0, 255))
    if im.mode in _ALPHA or "transparency" in im.info:  # incl. palette / tRNS transparency
        return _over_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # L, 1, P, CMYK, YCbCr


def _grey(values: np.ndarray) -> np.ndarray:
    """(H, W) values in 0..255 -> (H, W, 3) uint8."""
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3): composited over white, rounded. Transparent logos and icons
    are drawn for a white page; dropping alpha (convert('RGB')) shows whatever colour the
    transparent pixels happen to store, most often black."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
