"""The detect job on a local Ray: table, counts, bad inputs, agreement with the detector, S3, incremental."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from platescope import samples, storage
from platescope.config import DetectConfig
from platescope.pipeline.run import PreflightError, run_detect
from platescope.schema import DETECTIONS_SCHEMA

pytestmark = pytest.mark.usefixtures("local_ray")


def read_rows(run_dir: str) -> list[dict]:
    table = pq.read_table(storage.join(run_dir, "data"), filesystem=storage.filesystem(run_dir)[0]
                          if not storage.is_s3(run_dir) else None)
    assert table.schema.equals(DETECTIONS_SCHEMA, check_metadata=False)
    return table.to_pylist()


def config(tmp_path, inputs, model, **kw) -> DetectConfig:
    kw.setdefault("threshold", 0.0)
    kw.setdefault("progress", False)
    kw.setdefault("num_inputs_per_shard", 4)
    kw.setdefault("max_error_fraction", 1.0)
    return DetectConfig(input=inputs, output=str(tmp_path / "out"), model=model, **kw)


def test_images_video_and_bad_inputs_become_one_row_each(tmp_path, tiny_model, mixed_inputs):
    cfg = config(tmp_path, [str(mixed_inputs.root)], tiny_model, run_id="mixed", video_fps=2)
    summary = run_detect(cfg).summary
    rows = read_rows(str(tmp_path / "out" / "mixed"))

    by_uri: dict[str, list[dict]] = {}
    for r in rows:
        by_uri.setdefault(os.path.basename(r["source_uri"]), []).append(r)
    # Every good image: exactly one row, no error, boxes inside the image.
    for name in mixed_inputs.images:
        (row,) = by_uri[name]
        assert row["error"] is None and row["frame_index"] is None
        assert (row["width"], row["height"]) == (640, 480)
        assert len(row["boxes"]) == len(row["scores"]) == len(row["labels"]) > 0
        boxes = np.array(row["boxes"])
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # The video: frames sampled at 2 fps from a 10 fps, 40-frame clip -> frames 0,5,...,35.
    frames = sorted(by_uri["clip.mp4"], key=lambda r: r["frame_index"])
    assert [r["frame_index"] for r in frames] == list(range(0, 40, 5))
    assert [r["timestamp_s"] for r in frames] == pytest.approx([i * 0.5 for i in range(8)], abs=1e-6)
    # Bad inputs: one error row each, naming the problem; odd but valid formats detect normally.
    expect_error = {"empty_file": "empty_file", "truncated_jpeg": "truncated_image", "text_as_jpeg": "not_an_image",
                    "oversized_image": "too_many_pixels", "corrupt_video": "corrupt_video",
                    "audio_only_video": "no_video_stream"}
    for case, kind in expect_error.items():
        (row,) = by_uri[mixed_inputs.bad[case]]
        assert row["error"] and row["error"].startswith(kind + ":"), (case, row["error"])
        assert row["boxes"] == []
    for case in ("png_alpha", "png_palette_transparency", "png_16bit", "greyscale_jpeg", "cmyk_jpeg"):
        (row,) = by_uri[mixed_inputs.bad[case]]
        assert row["error"] is None, (case, row["error"])
    (rotated,) = by_uri[mixed_inputs.bad["exif_rotated"]]
    assert rotated["height"] > rotated["width"]
    # A video cut short: the frames before the damage, then one error row saying where it stopped.
    cut = by_uri[mixed_inputs.bad["truncated_video"]]
    assert cut[-1]["error"].startswith("corrupt_video:") and cut[-1]["frame_index"] is None
    assert all(r["error"] is None for r in cut[:-1])
    assert mixed_inputs.bad["unsupported_extension"] not in by_uri  # skipped, counted
    assert summary["inputs_skipped_unsupported"] == 1
    assert summary["rows"] == len(rows)
    assert summary["frames"] == 8 + len(cut) - 1
    assert summary["errors"] == sum(1 for r in rows if r["error"])
    assert summary["errors_by_kind"]["empty_file"] == 1
    assert summary["complete"] and summary["shards_resumed"] == 0
    saved = json.loads((tmp_path / "out" / "mixed" / "summary.json").read_text())
    assert saved["rows"] == summary["rows"]
    assert (tmp_path / "out" / "mixed" / "manifest.parquet").exists()


def test_rows_match_the_detector_run_directly(tmp_path, tiny_model, scene_dir):
    from platescope.detectors.hf import HFDetector
    from platescope.sources.images import decode_image

    # The exact decode: a JPEG draft (on by default) gives slightly different pixels by design.
    cfg = config(tmp_path, [str(scene_dir)], tiny_model, run_id="parity", batch_size=3, jpeg_draft=False)
    run_detect(cfg)
    rows = {r["source_uri"]: r for r in read_rows(str(tmp_path / "out" / "parity"))}
    detector = HFDetector(tiny_model, threshold=0.0)
    assert rows and all(r["model"] == detector.model_id for r in rows.values())
    for uri, row in rows.items():
        (expected,) = detector.detect([decode_image(Path(uri).read_bytes(), name=uri, max_pixels=10**8)])
        np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), expected.boxes, atol=1e-3)
        np.testing.assert_allclose(row["scores"], expected.scores, atol=1e-4)
        assert row["labels"] == expected.labels


def test_strict_makes_unsupported_files_error_rows(tmp_path, tiny_model, scene_dir):
    (scene_dir / "notes.txt").write_text("not an image")
    cfg = config(tmp_path, [str(scene_dir)], tiny_model, run_id="strict", strict=True)
    summary = run_detect(cfg).summary
    errors = [r for r in read_rows(str(tmp_path / "out" / "strict")) if r["error"]]
    assert [os.path.basename(r["source_uri"]) for r in errors] == ["notes.txt"]
    assert errors[0]["error"].startswith("unsupported_type:")
    assert summary["inputs_skipped_unsupported"] == 0


def test_incremental_processes_only_new_inputs(tmp_path, tiny_model, scene_dir):
    first = run_detect(config(tmp_path, [str(scene_dir)], tiny_model, run_id="night-1")).summary
    samples.write_image_dataset(str(scene_dir / "day2"), 3, seed=7)
    second = run_detect(config(tmp_path, [str(scene_dir)], tiny_model, run_id="night-2", incremental=True)).summary
    rows = read_rows(str(tmp_path / "out" / "night-2"))
    assert first["rows"] > 0
    assert second["rows"] == 3 == len(rows)
    assert all("/day2/" in r["source_uri"] for r in rows)
    third = run_detect(config(tmp_path, [str(scene_dir)], tiny_model, run_id="night-3", incremental=True)).summary
    assert third["rows"] == 0 and third["inputs"] == 0


def test_s3_inputs_model_and_output(tmp_path, tiny_model, scene_dir, s3_env, s3_bucket):
    """S3 access given in the config reaches the Ray workers (this Ray started before the env was set)."""
    awkward = ["a b/plate #1.jpg", "100% sure/ümlaut 車.jpg", "plain.jpg"]
    originals = sorted(p for p in os.listdir(scene_dir) if p.endswith(".jpg"))[: len(awkward)]
    for key, name in zip(awkward, originals):
        storage.write_bytes_atomic(f"{s3_bucket}/in/{key}", (scene_dir / name).read_bytes())
    for name in os.listdir(tiny_model):
        storage.write_bytes_atomic(f"{s3_bucket}/models/tiny/{name}", (Path(tiny_model) / name).read_bytes())
    cfg = DetectConfig(input=[f"{s3_bucket}/in/"], output=f"{s3_bucket}/out", model=f"{s3_bucket}/models/tiny",
                       run_id="s3run", threshold=0.0, progress=False,
                       s3={"endpoint_url": s3_env.endpoint_url, "access_key_id": s3_env.access_key_id,
                           "secret_access_key": s3_env.secret_access_key})
    summary = run_detect(cfg).summary
    assert summary["rows"] == 3 and summary["errors"] == 0
    fs, path = storage.filesystem(f"{s3_bucket}/out/s3run/data")
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted(r["source_uri"] for r in rows) == sorted(f"{s3_bucket}/in/{k}" for k in awkward)
    assert storage.exists(f"{s3_bucket}/out/s3run/summary.json")
    assert f"{s3_bucket}/models/tiny@" in rows[0]["model"]


def test_preflight_names_the_problem(tmp_path, tiny_model, scene_dir):
    with pytest.raises(PreflightError, match="model .*nope.*no such directory"):
        run_detect(config(tmp_path, [str(scene_dir)], str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreflightError, match=f"input {empty}: is empty"):
        run_detect(config(tmp_path, [str(empty)], tiny_model))
    with pytest.raises(PreflightError, match="input .*missing: does not exist"):
        run_detect(config(tmp_path, [str(tmp_path / "missing")], tiny_model))
    assert not os.path.exists(tmp_path / "out")  # nothing written before the inputs are known good
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config(tmp_path, [str(scene_dir)], tiny_model)
    cfg.output = str(blocker / "out")
    with pytest.raises(PreflightError, match="output .*cannot be written"):
        run_detect(cfg)


@pytest.fixture
def scene_dir(tmp_path):
    folder = tmp_path / "scenes"
    samples.write_image_dataset(str(folder), 6, seed=3)
    os.remove(folder / "annotations.json")
    return folder


def test_rerun_of_a_finished_run_does_no_work(tmp_path, tiny_model, scene_dir):
    cfg = config(tmp_path, [str(scene_dir)], tiny_model, run_id="again")
    first = run_detect(cfg).summary
    shutil.rmtree(scene_dir)  # the inputs are gone: a finished run must not need them again
    second = run_detect(cfg).summary
    assert second["rows"] == first["rows"] and second["shards_resumed"] == second["shards"]


@pytest.mark.shared_data
def test_real_plate_images_and_traffic_footage(tmp_path, tiny_model, shared_data_dir):
    """Real JPEGs and a real H.264 clip (1280x720, 30 fps, 140 frames) through the whole job."""
    images = sorted((shared_data_dir / "plates" / "images").glob("*.jpg"))[:12]
    folder = tmp_path / "real"
    folder.mkdir()
    for p in images:
        (folder / p.name).symlink_to(p)
    clip = shared_data_dir / "footage" / "uk_roundabout.mp4"
    cfg = config(tmp_path, [str(folder), str(clip)], tiny_model, run_id="real", video_fps=2,
                 max_error_fraction=0.0)
    summary = run_detect(cfg).summary
    rows = read_rows(str(tmp_path / "out" / "real"))
    frames = sorted(r["frame_index"] for r in rows if r["frame_index"] is not None)
    assert summary["errors"] == 0 and summary["images"] == 12
    # 4.7 s at 2 fps: one frame every 15 of 30, from frame 0.
    assert frames == list(range(0, 140, 15))
    assert all((r["width"], r["height"]) == (1280, 720) for r in rows if r["frame_index"] is not None)


def test_florence2_runs_through_the_same_pipeline_and_table(tmp_path, mixed_inputs):
    from platescope.detectors.florence2 import Florence2Detector
    from platescope.detectors.florence2_tiny import build_florence2_scripted_dir

    prompt = "<CAPTION_TO_PHRASE_GROUNDING> licence plate"
    model = build_florence2_scripted_dir(str(tmp_path / "florence2"), prompt=prompt,
                                         answer="licence plate<loc_100><loc_200><loc_300><loc_400>")
    cfg = config(tmp_path, [str(mixed_inputs.root)], model, run_id="prompted", detector="florence2", prompt=prompt,
                 max_new_tokens=16, video_fps=1)
    summary = run_detect(cfg).summary
    rows = read_rows(str(tmp_path / "out" / "prompted"))
    assert summary["rows"] == len(rows) and {r["prompt"] for r in rows} == {prompt}
    by_name = {os.path.basename(r["source_uri"]): r for r in rows if r["frame_index"] is None}
    assert by_name[mixed_inputs.bad["truncated_jpeg"]]["error"].startswith("truncated_image")
    # The rows carry exactly what the detector finds on the same image, outside Ray.
    name = mixed_inputs.images[0]
    from PIL import Image

    direct = Florence2Detector(model, prompt=prompt, threshold=0.0, device="cpu", max_new_tokens=16).detect(
        [np.asarray(Image.open(mixed_inputs.root / "scenes" / name).convert("RGB"))])[0]
    row = by_name[name]
    assert row["error"] is None and row["model"].startswith(model + "@") and row["labels"] == ["licence plate"]
    np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), direct.boxes, atol=1e-4)
    assert row["labels"] == direct.labels


def _perturbed_copy(model_dir: str, dest: Path) -> None:
    """The same model with every weight nudged: another weights hash, same config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    weights = load_file(str(dest / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}, str(dest / "model.safetensors"))


def test_resume_refuses_other_weights_and_adopts_a_run_without_fingerprint(tmp_path, tiny_model, scene_dir):
    from platescope.detectors.loading import hash_weights

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = config(tmp_path, [str(scene_dir)], str(model), run_id="weights")
    run_detect(cfg)
    run_dir = tmp_path / "out" / "weights"
    recorded = json.loads((run_dir / "fingerprint.json").read_text())["fields"]
    rows = read_rows(str(run_dir))
    assert {r["model"] for r in rows} == {f"{model}@{recorded['model_weights']}"}  # as the detector names it

    shutil.rmtree(model)
    _perturbed_copy(tiny_model, model)  # same path, new weights
    new_hash = hash_weights(str(model))
    with pytest.raises(PreflightError, match=f"model_weights \"{recorded['model_weights']}\" -> \"{new_hash}\""):
        run_detect(cfg)
    assert json.loads((run_dir / "fingerprint.json").read_text())["fields"] == recorded

    # A run folder from before fingerprints: accepted, and from now on held to this config's.
    (run_dir / "fingerprint.json").unlink()
    again = run_detect(cfg.model_copy(update={"batch_size": 2})).summary
    assert again["shards_resumed"] == again["shards"]
    assert json.loads((run_dir / "fingerprint.json").read_text())["fields"]["model_weights"] == new_hash
    with pytest.raises(PreflightError, match="threshold 0.0 -> 0.7"):
        run_detect(cfg.model_copy(update={"threshold": 0.7}))


def test_s3_model_weights_hash_matches_the_detectors(tmp_path, tiny_model, scene_dir, s3_env, s3_bucket):
    """The fingerprint hashes an s3:// model by streaming it; the detector hashes its downloaded copy."""
    from platescope.pipeline.fingerprint import weights_id

    for name in os.listdir(tiny_model):
        storage.write_bytes_atomic(f"{s3_bucket}/models/tiny/{name}", (Path(tiny_model) / name).read_bytes())
    storage.write_bytes_atomic(f"{s3_bucket}/models/tiny/sub/ignored.safetensors", b"not top level")
    from platescope.detectors.loading import hash_weights

    assert weights_id("model", f"{s3_bucket}/models/tiny", None) == hash_weights(tiny_model)
    assert weights_id("model", f"{s3_bucket}/models/tiny/", None) == hash_weights(tiny_model)  # cached now


def test_resources_no_node_can_grant_fail_before_the_manifest(tmp_path, tiny_model, scene_dir):
    cases = {"num_gpus_per_actor": (8, "num_gpus_per_actor 8: no node can hold a detector actor; the largest "
                                       "node has 2 CPUs and 0 GPUs"),
             "num_cpus_per_decoder": (64, "num_cpus_per_decoder 64: no node can run a decode task"),
             "num_cpus_per_actor": (2, "num_cpus_per_actor 2: no node holds a detector actor beside a decode task"),
             "num_actors_min": (3, "num_actors_min 3: the cluster holds at most 1 detector actors")}
    for field, (value, message) in cases.items():
        update = {field: value}
        if field == "num_actors_min":
            update["num_actors_max"] = value
        cfg = config(tmp_path, [str(scene_dir)], tiny_model, run_id=f"res-{field}", **update)
        with pytest.raises(PreflightError, match=message):
            run_detect(cfg)
        assert not (tmp_path / "out" / f"res-{field}").exists()
