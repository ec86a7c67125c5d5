"""The detector actor pool on a local Ray, end to end to the Parquet table: an image the model
itself fails on, an autoscaling pool, and threads decided on the actor's node."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from platescope import samples
from platescope.config import DetectConfig
from platescope.pipeline.run import run_detect
from platescope.pipeline.stage import DetectorSpec

pytestmark = pytest.mark.usefixtures("local_ray")


def read_rows(run_dir) -> list[dict]:
    return pq.read_table(os.path.join(run_dir, "data")).to_pylist()


def _model_without_known_geometry(tiny_model: str, dest) -> str:
    """The tiny model with its processor config missing `resample` (the processor takes its class
    default): the decode tasks cannot know the geometry, so images reach the detector whole and its
    own processor prepares them."""
    shutil.copytree(tiny_model, dest)
    config_path = dest / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    del config["resample"]
    config_path.write_text(json.dumps(config))
    return str(dest)


@pytest.mark.parametrize("geometry", ["unknown", "known"])
def test_an_image_the_model_cannot_take_is_one_error_row(tmp_path, tiny_model, geometry):
    """A 1 x 3000 strip is a valid PNG, but the YOLOS geometry (longest edge 224) scales it to a
    height of 0. Where the detector's processor meets it, the model fails on it alone: one
    detector_failed row while its batch neighbours are detected. Where the decode tasks know the
    geometry, they find it first: one too_small row."""
    model = tiny_model if geometry == "known" else _model_without_known_geometry(tiny_model, tmp_path / "m")
    folder = tmp_path / "in"
    samples.write_image_dataset(str(folder), 4, seed=11, size=(320, 240))
    os.remove(folder / "annotations.json")
    Image.fromarray(np.full((1, 3000, 3), 200, np.uint8)).save(folder / "strip.png")
    # One shard, one batch: the strip arrives in a batch with the four scenes.
    cfg = DetectConfig(input=[str(folder)], output=str(tmp_path / "out"), model=model, run_id="fails",
                       threshold=0.0, progress=False, batch_size=8, num_inputs_per_shard=8,
                       max_error_fraction=1.0)
    summary = run_detect(cfg).summary
    rows = {os.path.basename(r["source_uri"]): r for r in read_rows(tmp_path / "out" / "fails")}
    assert sorted(rows) == sorted(os.listdir(folder))
    strip = rows.pop("strip.png")
    kind = "detector_failed" if geometry == "unknown" else "too_small"
    assert strip["error"].startswith(kind), strip["error"]
    assert strip["boxes"] == []
    if geometry == "unknown":
        assert (strip["width"], strip["height"]) == (3000, 1)
    assert all(r["error"] is None and len(r["boxes"]) > 0 for r in rows.values())
    assert summary["errors_by_kind"] == {kind: 1} and summary["rows"] == 5 and summary["complete"]


def test_an_autoscaling_pool_writes_exactly_one_row_per_input(tmp_path, tiny_model):
    folder = tmp_path / "in"
    samples.write_image_dataset(str(folder), 6, seed=12, size=(160, 120))
    os.remove(folder / "annotations.json")
    # Between one and two actors on the two CPUs of the test's Ray, with room left to decode.
    cfg = DetectConfig(input=[str(folder)], output=str(tmp_path / "out"), model=tiny_model, run_id="pool",
                       threshold=0.0, progress=False, batch_size=1, num_inputs_per_shard=2,
                       num_actors_min=1, num_actors_max=2, num_cpus_per_actor=0.5, num_cpus_per_decoder=0.25)
    summary = run_detect(cfg).summary
    rows = read_rows(tmp_path / "out" / "pool")
    uris = [r["source_uri"] for r in rows]
    assert sorted(uris) == sorted(str(p) for p in folder.iterdir()) and len(set(uris)) == len(uris) == 6
    assert all(r["error"] is None for r in rows)
    assert summary["rows"] == 6 and summary["shards_done"] == 3 and summary["complete"]


def test_an_actor_sizes_its_threads_from_its_own_node():
    """Inside a Ray worker the node's CPUs come from Ray (the test's Ray has 2), not the driver."""
    import ray

    from platescope.pipeline import actor

    @ray.remote(num_cpus=0.5)
    def decide(spec):
        return actor._node_cpus(), actor.spec_num_threads(spec)

    spec = DetectorSpec(model="unused", num_threads=None, num_gpus=0.0, num_cpus_per_actor=0.5, num_actors_max=2)
    node_cpus, threads = ray.get(decide.remote(spec))
    assert node_cpus == ray.cluster_resources()["CPU"] == 2
    assert threads == 1  # two actors may share two CPUs
