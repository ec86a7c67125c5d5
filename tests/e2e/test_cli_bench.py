"""`platescope bench`: each benchmark runs through the CLI on small sizes and reports figures that
hang together. Its timings are what it is for, and are never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "platescope", "bench"]


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "figures.json"
    proc = subprocess.run([*CLI, *args, "--json", str(out)], check=False, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert all(f"{key} " in proc.stdout for key in figures)  # printed as well as written
    return figures


def test_bench_detect_measures_both_sides_on_the_same_images(tmp_path, scenes):
    f = bench(tmp_path, "detect", "--images", str(scenes), "--preset", "yolos-tiny-test", "--num-images", "6",
              "--batch-size", "3")
    assert f["images"] == 6 and f["errors"] == 0
    assert f["detector_images_per_s"] > 0 and f["detect_images_per_s_total"] > 0
    assert f["ratio_total"] == round(f["detect_images_per_s_total"] / f["detector_images_per_s"], 3)


def test_bench_detect_vs_naive_runs_both_whole_processes_and_splits_the_cpu(tmp_path, scenes):
    f = bench(tmp_path, "detect", "--vs-naive", "--images", str(scenes), "--preset", "rtdetr-tiny-test",
              "--num-images", "4", "--batch-size", "2")
    assert f["images"] == 4 and f["detect_errors"] == 0
    # the same model and threshold on the same images: the same boxes, whichever way they were run
    assert f["detect_boxes"] == f["naive_boxes"] > 0
    assert abs(f["speedup"] - f["naive_s"] / f["detect_s"]) < 0.01  # both times printed rounded
    assert 0 < f["detect_first_result_s"] <= f["detect_s"] and 0 < f["naive_first_result_s"] <= f["naive_s"]
    # detect's tree (Ray's processes included) used CPU, and at least what its phases account for
    assert f["detect_cpu_s"] > 0 and f["naive_cpu_s"] > 0
    assert 0 < f["detect_cpu_s_before_first_result"] <= f["detect_cpu_s"]
    phases = [f[f"cpu_ms_per_image_{p}"] for p in ("decode", "preprocess", "postprocess", "actor_other")]
    assert all(v >= 0 for v in phases) and f["cpu_ms_per_image_decode"] > 0 and f["cpu_ms_per_image_rest"] > 0
    assert abs(f["cpu_ms_per_image_outside_model_in_actor"] - sum(phases[1:])) <= 0.02  # each rounded


def test_bench_evaluate_scores_the_generated_table_beside_pycocotools(tmp_path):
    f = bench(tmp_path, "evaluate", "--rows", "300", "--pycocotools")
    assert f["rows"] == 300 and f["boxes"] > 0 and f["detections"] > 0 and 0.0 < f["map"] < 1.0
    assert f["evaluate_peak_rss_mib"] > 0 and f["pycocotools_peak_rss_mib"] > 0


def test_bench_incremental_finds_exactly_last_nights_inputs(tmp_path):
    f = bench(tmp_path, "incremental", "--runs", "5", "--inputs", "300")
    assert f["inputs_seen_before"] == 300 and f["peak_rss_mib"] > 0


def test_bench_video_samples_every_frame_and_sees_frames_waiting(tmp_path, tiny_model):
    f = bench(tmp_path, "video", "--frames", "120", "--size", "320x240", "--model", tiny_model)
    assert f["frames"] == 120 and f["frame_size"] == "320x240"
    assert f["video_if_held_whole_mib"] == round(120 * 320 * 240 * 3 / 2**20)
    # Decoded frames reach the detector through the object store, so some were seen waiting there:
    # read after every step of Ray Data's scheduling loop, this cannot miss them (a sampling thread could).
    assert 0 < f["object_store_peak_mib"] <= 1.5 * f["video_if_held_whole_mib"]
    assert max(f["object_store_peak_mib_by_operator"].values()) > 0
    # counted in frames as the decoder ships them: at least one waited, never more than the video has
    assert f["shipped_frame_mib"] > 0 and 1 <= f["frames_waiting_at_peak"] <= 1.1 * f["frames"]


def test_bench_video_decode_options_times_each_setting_and_checks_the_frames(tmp_path):
    from platescope import samples

    video = tmp_path / "clip.mp4"
    samples.write_video(str(video), num_frames=60, fps=30, size=(160, 120))
    f = bench(tmp_path, "video", "--decode-options", str(video), "--video-fps", "5")
    runs = {k: v for k, v in f.items() if k.startswith("clip.mp4 ")}
    assert len(runs) == 6 and all(r["wall_s"] >= 0 and r["frames"] > 0 for r in runs.values())
    assert runs["clip.mp4 AUTO/DEFAULT"]["frames"] == 10  # 2 s at 5 fps
    # threading never changes what is decoded: the same frames, pixel for pixel
    assert all(runs[f"clip.mp4 {t}/DEFAULT"]["identical"] for t in ("AUTO", "SLICE", "FRAME", "NONE"))
