"""Decode one still image's bytes into the RGB array every detector expects.

Every way an input can be bad ends in an `InputError` with a stable kind, so the pipeline writes an
error row instead of crashing or silently dropping the object. Pixel data is decoded fully here (not
lazily) because PIL's lazy decoding would otherwise surface truncation later, in a detector actor,
as an unexplained crash.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from platescope.sources import InputError

if TYPE_CHECKING:
    from platescope.detectors.geometry import InputGeometry

logger = logging.getLogger(__name__)

# 100 megapixels is a 10000 x 10000 photo: larger than any camera or plate crop we expect, and its
# RGB array (300 MB) is about the most a decode task should hold. Anything larger is treated as a
# decompression bomb: a few kilobytes of PNG can claim gigapixels.
DEFAULT_MAX_PIXELS = 100_000_000

# File signatures, only to word the error better when PIL cannot parse a header.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"RIFF": "WEBP",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF8": "GIF",
}


def decode_image(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H x W x 3 uint8 RGB of `data`, rotated as its EXIF orientation says.

    `name` only words messages (the caller prefixes the input's URI itself). The pixel budget is
    checked against the header's size before any pixel is decoded, so a bomb costs no memory.
    """
    if not data:
        raise InputError("empty_file", "the file is empty (0 bytes)")
    image = _open(data, max_pixels=max_pixels)
    return _decode(image, name=name)


def decode_image_for_model(data: bytes, geometry: InputGeometry, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                           draft: bool = True) -> tuple[np.ndarray, int, int]:
    """(the image at the model's input size, its width, its height), as `decode_image` and then
    `geometry.resize` would give, but decoding a JPEG at 1/2, 1/4 or 1/8 scale when `draft` is on
    and that scale is still about the model's input size or larger (see DRAFT_SLACK; the DCT skips
    the detail the resize would throw away). Width and height are the full image's, after EXIF
    orientation: boxes are scaled back to them."""
    if not data:
        raise InputError("empty_file", "the file is empty (0 bytes)")
    image = _open(data, max_pixels=max_pixels)
    width, height = image.size
    if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    out_h, out_w = geometry.output_size(height, width)
    if min(out_h, out_w) < 1:
        raise InputError("too_small", f"{image.format} {width}x{height} shrinks to nothing at the model's input size")
    if draft and image.format == "JPEG":
        stored = (out_w, out_h) if image.size == (width, height) else (out_h, out_w)
        image.draft(None, draft_request(stored))  # the largest reduction that gives at least that
    oriented = _decode_oriented(image, name=name)
    if oriented.mode == "RGB":  # the usual case: resized as it is, not through an array and back
        return geometry.resize_image(oriented), width, height
    return geometry.resize(_to_rgb_array(oriented)), width, height


# A draft may come out up to this much smaller than the model's input, which the resize then enlarges
# by at most 1/(1 - DRAFT_SLACK) = 1.11x: so a 1280x720 JPEG for a 384x384 input decodes at half
# scale (640x360) instead of whole. Measured on the val set through `detect --ground-truth` with the
# first default model (384x384; the 107 720p images are where it applies): AP 0.429 -> 0.428, AP50
# 0.815 -> 0.819, AP75 0.385 -> 0.391; the decode and resize went from 7.7 to 3.8 ms of CPU (8.5-13 to
# 5.7 when busy).
DRAFT_SLACK = 0.1


def draft_request(size: tuple[int, int]) -> tuple[int, int]:
    """The smallest decoded (width, height) a JPEG draft may give for a model input of `size`."""
    width, height = (max(1, math.ceil(side * (1 - DRAFT_SLACK))) for side in size)
    return width, height


# EXIF orientations that swap width and height (the transposes and the 90-degree turns).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a mangled EXIF block: treated as unrotated, as below
        return 1


def _decode(image: Image.Image, *, name: str) -> np.ndarray:
    return _to_rgb_array(_decode_oriented(image, name=name))


def _decode_oriented(image: Image.Image, *, name: str) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied), in the mode it decoded to."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned on PIL's global "accept truncated files" switch; then a
        # half-uploaded JPEG would decode to grey padding and be reported as a fine image.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; platescope needs it False")
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # PIL plugins raise OSError, ValueError, SyntaxError, struct.error...
        kind = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise InputError(
            kind, f"{image.format} {image.width}x{image.height} failed to decode: {exc}"
        ) from exc

    return _apply_exif_orientation(image, name=name)


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse only the header, and refuse images above the pixel budget before decoding them."""
    try:
        # PIL's own bomb check warns above Image.MAX_IMAGE_PIXELS; ours below is the one that
        # decides, so its warning would only be noise in the logs of every large photo.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # PIL refuses above 2 x Image.MAX_IMAGE_PIXELS whatever max_pixels says; still a bomb.
        raise InputError("too_many_pixels", f"{exc} (PIL's own limit; platescope's is {max_pixels})") from exc
    except UnidentifiedImageError as exc:
        signature = next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)
        if signature is None:
            head = data[:16]
            raise InputError(
                "not_an_image", f"not a known image format ({len(data)} bytes, starts {head!r})"
            ) from exc
        raise InputError(
            "corrupt_image",
            f"{signature} header could not be parsed, truncated or corrupt ({len(data)} bytes)",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        kind = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise InputError(kind, f"image header could not be read ({len(data)} bytes): {exc}") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            "too_many_pixels",
            f"{image.format} is {width}x{height} = {width * height} pixels, limit {max_pixels}",
        )
    if width <= 0 or height <= 0:
        raise InputError("corrupt_image", f"{image.format} header says {width}x{height}")
    return image


def _apply_exif_orientation(image: Image.Image, *, name: str) -> Image.Image:
    """Rotate to how viewers (and whoever drew the ground-truth boxes) see the photo."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright photo
        return image
    except Exception as exc:  # noqa: BLE001 - EXIF parsing fails in many ways (struct, key, type)
        # A mangled EXIF block should not throw away a photo whose pixels decoded fine; the
        # orientation is then unknown and the stored one is the best guess.
        logger.warning("%s: EXIF orientation unreadable, using stored orientation: %s", name, exc)
        return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF; Pillow may hand it over as 32-bit "I"). PIL's own
        # convert("L") clips at 255 on some versions, which turns most of the image white; the
        # high byte keeps the full tonal range. Values above 16 bits (true 32-bit TIFFs) saturate.
        grey = np.asarray(image).astype(np.int64, copy=False)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        # Float images carry no agreed scale; stretch to the observed range rather than clip.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        grey = np.nan_to_num(scaled).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode != "RGB":
        # Alpha (RGBA, LA, PA, P with a transparent index) is dropped, not composited: that is
        # what transformers' `convert_rgb` and the usual dataset loaders do, so a detector sees
        # the same pixels here as it did in training. L, 1, P, CMYK (Pillow undoes the Adobe
        # inversion on read) and YCbCr all have exact conversions in PIL.
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array)
