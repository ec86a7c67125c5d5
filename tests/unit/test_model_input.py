"""Decoding straight to the model's input size: the same pixels as decoding whole and resizing, with
the full image's (oriented) size kept for the boxes; a JPEG draft stays close to them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from platescope.detectors.geometry import geometry_from_config
from platescope.sources import InputError
from platescope.sources.images import decode_image, decode_image_for_model

BASE = {"do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_pad": False}
FIXED = geometry_from_config({**BASE, "image_processor_type": "RTDetrImageProcessor",
                              "size": {"height": 96, "width": 96}})
ASPECT = geometry_from_config({**BASE, "image_processor_type": "DetrImageProcessor",
                               "size": {"shortest_edge": 90, "longest_edge": 160}})


def _photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([(xs * 255 // width), (ys * 255 // height), ((xs + ys) % 64) * 4], axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, fmt, exif=exif, quality=95)
    else:
        image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("geometry", [FIXED, ASPECT], ids=["fixed", "aspect"])
@pytest.mark.parametrize("fmt,orientation", [("JPEG", None), ("PNG", None), ("JPEG", 6), ("JPEG", 3)])
def test_without_draft_it_is_decode_then_resize(geometry, fmt, orientation):
    data = _photo(320, 200, fmt, orientation)
    whole = decode_image(data, name="x")
    image, width, height = decode_image_for_model(data, geometry, name="x", draft=False)
    assert (height, width) == whole.shape[:2]  # the oriented full size: 200x320 turned is 320x200
    np.testing.assert_array_equal(image, geometry.resize(whole))


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_jpeg_draft_keeps_the_full_size_and_comes_close_to_the_full_decode(orientation):
    data = _photo(1280, 720, "JPEG", orientation)
    exact, w0, h0 = decode_image_for_model(data, ASPECT, name="x", draft=False)
    drafted, w1, h1 = decode_image_for_model(data, ASPECT, name="x", draft=True)
    assert (w0, h0) == (w1, h1) == ((1280, 720) if orientation is None else (720, 1280))
    assert drafted.shape == exact.shape
    # An 8x reduction is possible here (1280x720 -> 90 high); the DCT scaling smooths a little
    # differently from the bilinear filter, so pixels move a few levels, not more.
    difference = np.abs(drafted.astype(int) - exact.astype(int))
    assert 0 < difference.mean() < 4


def _fixed(height: int, width: int):
    return geometry_from_config({**BASE, "image_processor_type": "RTDetrImageProcessor",
                                 "size": {"height": height, "width": width}})


@pytest.mark.parametrize("side,drafted", [(384, True), (400, True), (420, False)])
def test_a_draft_may_come_out_a_little_smaller_than_the_model_input(side, drafted):
    """Half of 720 is 360: close enough to a 384- or 400-pixel input (DRAFT_SLACK) to decode at half
    scale and enlarge slightly, not to a 420-pixel one, which gets the whole decode."""
    data = _photo(1280, 720, "JPEG")
    geometry = _fixed(side, side)
    exact, _, _ = decode_image_for_model(data, geometry, name="x", draft=False)
    image, width, height = decode_image_for_model(data, geometry, name="x", draft=True)
    assert (width, height) == (1280, 720) and image.shape == exact.shape == (side, side, 3)
    difference = np.abs(image.astype(int) - exact.astype(int)).mean()
    assert (0 < difference < 4) if drafted else difference == 0


def test_an_image_too_small_for_the_model_is_an_input_error():
    yolos = geometry_from_config({**BASE, "image_processor_type": "YolosImageProcessor",
                                  "size": {"shortest_edge": 128, "longest_edge": 224}})
    with pytest.raises(InputError) as e:
        decode_image_for_model(_photo(480, 20, "PNG"), yolos, name="x")
    assert e.value.kind == "too_small" and "480x20" in e.value.message


def test_bad_bytes_are_the_same_input_errors_as_a_whole_decode():
    for data, kind in [(b"", "empty_file"), (b"hello world, not an image", "not_an_image"),
                       (_photo(200, 100)[:300], "truncated_image")]:
        with pytest.raises(InputError) as e:
            decode_image_for_model(data, FIXED, name="x")
        assert e.value.kind == kind
