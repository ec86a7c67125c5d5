"""The detect graph as stages a user's own Ray Data pipeline can use: shards in, detection rows out,
the same as the plain detector on the same images."""

from __future__ import annotations

import os

import numpy as np
import pytest

from platescope import samples
from platescope.detectors.hf import HFDetector
from platescope.pipeline.stage import DetectorSpec, decode_stage, detect_stage, model_geometry, shards_dataset
from platescope.sources.images import decode_image
from platescope.storage import S3Options

pytestmark = pytest.mark.usefixtures("local_ray")


def test_decode_and_detect_stages_in_a_users_pipeline(tmp_path, tiny_model):
    import ray

    folder = tmp_path / "in"
    samples.write_image_dataset(str(folder), 5, seed=3, size=(320, 180))
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    shards = [{"shard": f"i{i:06d}", "entries": [{"uri": p, "kind": "image"}]} for i, p in enumerate(paths)]
    geometry = model_geometry("hf", tiny_model, None)
    assert geometry is not None
    spec = DetectorSpec(model=tiny_model, threshold=0.0, device="cpu", geometry=geometry, num_cpus_per_actor=0.5)

    ds = ray.data.from_items(shards)
    ds = decode_stage(ds, s3=None, video_fps=1.0, geometry=geometry, num_cpus=0.25)
    ds = detect_stage(ds, spec, batch_size=2)
    rows = {r["source_uri"]: r for r in ds.take_all()}

    assert sorted(rows) == paths
    plain = HFDetector(tiny_model, threshold=0.0, device="cpu", num_threads=1)
    for path in paths:
        with open(path, "rb") as f:
            (expected,) = plain.detect([decode_image(f.read(), name=path)])
        row = rows[path]
        assert (row["width"], row["height"], row["error"]) == (320, 180, None)
        np.testing.assert_allclose(np.asarray(row["boxes"], np.float32).reshape(-1, 4), expected.boxes, atol=1.0)
        np.testing.assert_allclose(row["scores"], expected.scores, atol=1e-3)


def test_a_spec_never_shows_the_keys_it_carries():
    spec = DetectorSpec(model="m", s3=S3Options(access_key_id="AKIAEXAMPLE", secret_access_key="wJalrXUtnFEMI/K7MDENG"))
    for text in (repr(spec), str(spec), str(spec.model_dump())):
        assert "wJalrXUtnFEMI" not in text and "AKIAEXAMPLE" not in text
    assert spec.s3.secret_access_key == "wJalrXUtnFEMI/K7MDENG"  # still there for the actor that needs it
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != "wJalrXUtnFEMI/K7MDENG"


def test_decoded_blocks_hold_whole_detector_batches(tmp_path):
    """A shard's images come in blocks of BATCHES_PER_BLOCK batches: the detector starts before the
    whole shard is decoded and never gets a short remainder batch from the middle of a shard."""
    import ray

    from platescope.detectors.geometry import geometry_from_config
    from platescope.pipeline.stage import BATCHES_PER_BLOCK

    geometry = geometry_from_config({
        "image_processor_type": "RTDetrImageProcessor", "do_resize": True, "size": {"height": 64, "width": 96},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_pad": False})
    batch_size, images = 2, 2 * BATCHES_PER_BLOCK * 2 + 3
    folder = tmp_path / "in"
    samples.write_image_dataset(str(folder), images, seed=5, size=(320, 180))
    entries = [{"uri": str(p), "kind": "image"} for p in sorted(folder.glob("*.jpg"))]
    default = ray.data.DataContext.get_current().target_max_block_size
    ds = shards_dataset([{"shard": "i000000", "entries": entries}], geometry=geometry, batch_size=batch_size)
    assert ray.data.DataContext.get_current().target_max_block_size == default  # other datasets keep theirs
    ds = decode_stage(ds, s3=None, video_fps=1.0, geometry=geometry, num_cpus=0.25)
    sizes = [len(block["seq"]) for block in ds.iter_batches(batch_size=None, batch_format="numpy")]
    block = batch_size * BATCHES_PER_BLOCK
    assert sorted(sizes) == [3, block, block]  # a batch_size of None gives Ray Data's blocks as they are
