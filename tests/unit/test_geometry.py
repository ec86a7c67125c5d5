"""The input geometry read from a saved processor config reproduces the processor itself: the same
output sizes and the same pixel values, for every processor family it claims to know."""

from __future__ import annotations

import json

import numpy as np
import pytest

from platescope.detectors.geometry import geometry_from_config, pixel_arrays, read_geometry, to_pixel_values

# (processor class, size config): fixed, shortest/longest (both the DETR and the YOLOS rounding), max h/w
PROCESSORS = [
    ("RTDetrImageProcessor", {"height": 384, "width": 384}),
    ("RTDetrImageProcessor", {"height": 96, "width": 160}),
    ("DetrImageProcessor", {"shortest_edge": 128, "longest_edge": 224}),
    ("DetrImageProcessor", {"max_height": 200, "max_width": 150}),
    ("ConditionalDetrImageProcessor", {"shortest_edge": 120, "longest_edge": 200}),
    ("DeformableDetrImageProcessor", {"shortest_edge": 100, "longest_edge": 333}),
    ("YolosImageProcessor", {"shortest_edge": 128, "longest_edge": 224}),
    ("YolosImageProcessor", {"shortest_edge": 120, "longest_edge": 1333}),
]
# height x width: landscape 16:9, portrait, square, already at the shortest edge, tiny, odd primes
IMAGE_SIZES = [(72, 128), (128, 72), (97, 97), (128, 300), (120, 90), (5, 3), (101, 211), (211, 101), (33, 480)]


def _saved_processor(tmp_path, name: str, size: dict) -> str:
    import transformers
    from transformers.utils import is_torchvision_available

    cls = getattr(transformers, name if is_torchvision_available() else f"{name}Pil")
    path = tmp_path / f"{name}-{'-'.join(map(str, size.values()))}"
    cls(size=size).save_pretrained(str(path))
    return str(path)


@pytest.fixture(params=PROCESSORS, ids=lambda p: f"{p[0]}-{'x'.join(map(str, p[1].values()))}")
def processor_dir(request, tmp_path) -> str:
    return _saved_processor(tmp_path, *request.param)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so a resampling filter that differs by a pixel shows
    ramp = np.add.outer(np.arange(height), np.arange(width))[..., None] * np.array([3, 5, 7])
    return ((ramp + rng.integers(0, 60, (height, width, 3))) % 256).astype(np.uint8)


def test_pixel_values_equal_the_processors_own(processor_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(processor_dir)
    geometry = read_geometry(processor_dir)
    assert geometry is not None
    for seed, (h, w) in enumerate(IMAGE_SIZES):
        image = _image(h, w, seed)
        try:
            expected = processor(images=[image], return_tensors="pt", input_data_format="channels_last")
        except ValueError:  # too small for the model: the processor cannot take it, nor can we
            assert min(geometry.output_size(h, w)) == 0
            with pytest.raises(ValueError, match="too small"):
                geometry.resize(image)
            continue
        resized = geometry.resize(image)
        assert resized.dtype == np.uint8 and resized.shape[:2] == geometry.output_size(h, w)
        got = to_pixel_values([resized], geometry, "cpu")
        assert got["pixel_values"].shape == expected["pixel_values"].shape, (h, w)
        np.testing.assert_allclose(got["pixel_values"].numpy(), expected["pixel_values"].numpy(), atol=1e-5,
                                   err_msg=f"{h}x{w}")
        if "pixel_mask" in expected:
            np.testing.assert_array_equal(got["pixel_mask"].numpy(), expected["pixel_mask"].numpy())


def test_a_padding_processor_pads_a_mixed_batch_as_it_does(tmp_path):
    from transformers import AutoImageProcessor

    path = _saved_processor(tmp_path, "DetrImageProcessor", {"shortest_edge": 96, "longest_edge": 160})
    processor = AutoImageProcessor.from_pretrained(path)
    geometry = read_geometry(path)
    images = [_image(72, 128, 1), _image(128, 72, 2), _image(50, 50, 3)]
    expected = processor(images=images, return_tensors="pt", input_data_format="channels_last")
    got = to_pixel_values([geometry.resize(im) for im in images], geometry, "cpu")
    np.testing.assert_allclose(got["pixel_values"].numpy(), expected["pixel_values"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(got["pixel_mask"].numpy(), expected["pixel_mask"].numpy())


@pytest.mark.parametrize("name, size, shapes", [
    ("DetrImageProcessor", {"shortest_edge": 96, "longest_edge": 160}, [(72, 128), (128, 72), (50, 50)]),  # pads
    ("RTDetrImageProcessor", {"height": 64, "width": 96}, [(720, 1280), (300, 200)]),  # no normalise, no pad
    ("YolosImageProcessor", {"shortest_edge": 96, "longest_edge": 160}, [(72, 128), (90, 120)]),  # normalises, pads
])
def test_numpy_pixel_values_are_torch_s_bit_for_bit(tmp_path, name, size, shapes):
    geometry = read_geometry(_saved_processor(tmp_path, name, size))
    images = [geometry.resize(_image(h, w, seed)) for seed, (h, w) in enumerate(shapes)]
    groups = [images] if geometry.do_pad else [[im] for im in images]  # a fixed-size processor: one size a batch
    for group in groups:
        want = to_pixel_values(group, geometry, "cpu")
        got = pixel_arrays(group, geometry)
        assert sorted(got) == sorted(want)
        for key, array in got.items():
            assert array.dtype == want[key].numpy().dtype and array.flags.c_contiguous
            np.testing.assert_array_equal(array, want[key].numpy(), err_msg=key)


def test_a_fixed_size_processor_refuses_a_mixed_batch(tmp_path):
    geometry = read_geometry(_saved_processor(tmp_path, "RTDetrImageProcessor", {"height": 64, "width": 64}))
    with pytest.raises(ValueError, match="different sizes"):
        to_pixel_values([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)], geometry, "cpu")


def test_an_unknown_or_incomplete_processor_gives_no_geometry(tmp_path):
    path = _saved_processor(tmp_path, "DetrImageProcessor", {"shortest_edge": 96, "longest_edge": 160})
    config = json.loads((tmp_path / path / "preprocessor_config.json").read_text())
    assert geometry_from_config(config) is not None
    assert geometry_from_config({**config, "image_processor_type": "SomeNewImageProcessor"}) is None
    assert geometry_from_config({k: v for k, v in config.items() if k != "resample"}) is None
    assert geometry_from_config({**config, "size": {"shortest_edge": 96}}) is None  # a rule DETR lacks
    assert geometry_from_config({**config, "do_resize": False}) is None
    assert read_geometry(str(tmp_path / "no-such-model")) is None


def test_the_old_size_spelling_is_read_as_shortest_and_longest_edge(tmp_path):
    path = _saved_processor(tmp_path, "DetrImageProcessor", {"shortest_edge": 96, "longest_edge": 160})
    config = json.loads((tmp_path / path / "preprocessor_config.json").read_text())
    old = geometry_from_config({**config, "size": 96, "max_size": 160})
    assert old == geometry_from_config(config)
