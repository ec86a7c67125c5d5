from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from platescope import samples
from platescope.sources import InputError, media_kind
from platescope.sources.images import DEFAULT_MAX_PIXELS, decode_image


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    return folder, samples.write_bad_inputs(folder)


def _decode(bad: tuple[Path, dict[str, str]], case: str, **kwargs: int) -> np.ndarray:
    folder, cases = bad
    return decode_image((folder / cases[case]).read_bytes(), name=cases[case], **kwargs)


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("empty_file", "empty_file"),
        ("truncated_jpeg", "truncated_image"),
        ("text_as_jpeg", "not_an_image"),
        ("oversized_image", "too_many_pixels"),
    ],
)
def test_bad_images_raise_their_kind(bad, case, kind):
    with pytest.raises(InputError) as info:
        _decode(bad, case)
    assert info.value.kind == kind
    assert str(info.value).startswith(f"{kind}: ")


def test_truncation_is_not_silently_accepted(bad):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InputError, match="truncated"):
        _decode(bad, "truncated_jpeg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_run_with_pil_accepting_truncated_files(bad, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        _decode(bad, "truncated_jpeg")


def test_unsupported_extension_is_not_a_media_kind(bad):
    _, cases = bad
    assert media_kind(cases["unsupported_extension"]) is None
    assert media_kind(cases["text_as_jpeg"]) == "image"


def test_oversized_message_names_the_size(bad):
    with pytest.raises(InputError) as info:
        _decode(bad, "oversized_image")
    assert "12000x12000" in info.value.message
    assert str(DEFAULT_MAX_PIXELS) in info.value.message


def test_pixel_limit_is_checked_before_decoding(bad):
    # Half a bomb: only a full decode could notice the truncation, so too_many_pixels proves the
    # limit was applied from the header alone.
    folder, cases = bad
    data = (folder / cases["oversized_image"]).read_bytes()
    with pytest.raises(InputError) as info:
        decode_image(data[: len(data) // 2], name="half.png", max_pixels=1_000_000)
    assert info.value.kind == "too_many_pixels"


def test_pil_bomb_error_becomes_too_many_pixels(tmp_path):
    # Above 2 x Image.MAX_IMAGE_PIXELS PIL refuses on its own, even with a huge max_pixels.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    samples.write_png_bomb(tmp_path / "huge.png", side, side)
    with pytest.raises(InputError) as info:
        decode_image((tmp_path / "huge.png").read_bytes(), name="huge.png", max_pixels=10**12)
    assert info.value.kind == "too_many_pixels"


def test_small_max_pixels_applies_to_normal_photos(bad):
    with pytest.raises(InputError) as info:
        _decode(bad, "greyscale_jpeg", max_pixels=100)
    assert info.value.kind == "too_many_pixels"
    assert "160x120" in info.value.message


def test_jpeg_signature_with_broken_header(bad):
    with pytest.raises(InputError) as info:
        decode_image(b"\xff\xd8\xff" + bytes(100), name="broken.jpg")
    assert info.value.kind in {"corrupt_image", "truncated_image"}
    assert "JPEG" in info.value.message


@pytest.mark.parametrize(
    "case",
    ["png_alpha", "png_palette_transparency", "png_16bit", "greyscale_jpeg", "cmyk_jpeg", "exif_rotated"],
)
def test_odd_formats_decode_to_rgb_uint8(bad, case):
    image = _decode(bad, case)
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.flags["C_CONTIGUOUS"]


def test_alpha_is_dropped_not_composited(bad):
    folder, cases = bad
    image = _decode(bad, "png_alpha")
    with Image.open(folder / cases["png_alpha"]) as stored:
        assert stored.mode == "RGBA"
        expected = np.asarray(stored)[:, :, :3]
    assert np.array_equal(image, expected)


def test_16bit_png_scales_to_8bit(bad):
    image = _decode(bad, "png_16bit")
    assert image.shape == (192, 256, 3)
    # Stored value i * 257 must come out as i (the high byte), not clipped to 255.
    assert np.array_equal(image[0, :, 0], np.arange(256, dtype=np.uint8))
    assert np.array_equal(image[..., 0], image[..., 2])


def test_32bit_integer_image_is_treated_as_16bit():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 1000, 40000, 65535]], dtype=np.int32)).save(buffer, "TIFF")
    image = decode_image(buffer.getvalue(), name="i32.tif")
    assert image[0, :, 0].tolist() == [0, 3, 156, 255]


def test_greyscale_jpeg_has_equal_channels_and_matches_luma(bad):
    grey = _decode(bad, "greyscale_jpeg")
    assert grey.shape == (120, 160, 3)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    colour = _decode(bad, "png_alpha").astype(np.float64)
    luma = colour @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey[..., 0] - luma).mean() < 6


def test_cmyk_jpeg_keeps_its_colours(bad):
    cmyk = _decode(bad, "cmyk_jpeg").astype(np.int16)
    original = _decode(bad, "png_alpha").astype(np.int16)  # same photo, stored losslessly
    assert cmyk.shape == original.shape
    assert np.abs(cmyk - original).mean() < 12


def test_exif_orientation_is_applied(bad):
    image = _decode(bad, "exif_rotated")
    assert image.shape == (160, 80, 3)  # stored 160 wide x 80 high
    red = np.array([255, 0, 0])
    assert np.abs(image[5, -5].astype(int) - red).max() < 40  # stored top-left is now top-right
    assert np.abs(image[5, 5].astype(int) - red).max() > 100


def test_decoded_photo_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    assert np.array_equal(decode_image(buffer.getvalue(), name="p.png"), pixels)
