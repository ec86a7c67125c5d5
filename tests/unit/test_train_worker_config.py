"""What training workers are told: Ray Train runs each worker in its own directory, so local paths
given relative to where `platescope train` was started must reach them absolute. (Through the CLI,
with a relative storage: tests/e2e/test_cli_train.py.)"""

from __future__ import annotations

from platescope.config import TrainConfig
from platescope.training.run import for_workers


def test_relative_local_paths_become_absolute_and_uris_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    cfg = TrainConfig(name="run", storage="runs", train="t.json", model="base")
    workers = for_workers(cfg)
    assert workers.storage == str(tmp_path / "runs") and workers.model == str(tmp_path / "base")
    assert (cfg.storage, cfg.model) == ("runs", "base")  # what the export records: as given
    assert for_workers(cfg.model_copy(update={"storage": "file://runs"})).storage == str(tmp_path / "runs")

    remote = TrainConfig(name="run", storage="s3://bucket/runs", train="t.json", model="org/detector")
    assert (for_workers(remote).storage, for_workers(remote).model) == ("s3://bucket/runs", "org/detector")
