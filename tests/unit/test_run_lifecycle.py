"""Pieces of the run lifecycle that need no Ray: resource rules, fingerprints, storage error classes."""

from __future__ import annotations

import pytest

from platescope.pipeline import fingerprint
from platescope.pipeline.errors import PreflightError, StorageFailure, describe, find, is_unreachable
from platescope.pipeline.resources import check_requests

NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 1e10}


def check(nodes, types=(), **kw):
    args = {"num_cpus_per_actor": 1.0, "num_gpus_per_actor": 0.0, "num_cpus_per_decoder": 0.5, "num_actors_min": 1}
    args.update(kw)
    check_requests(nodes=list(nodes), node_types=list(types), **args)


@pytest.mark.parametrize(("kw", "message"), [
    ({"num_cpus_per_actor": 1e9}, "num_cpus_per_actor 1e+09: no node can hold a detector actor; the largest node "
                                  "has 8 CPUs and 1 GPUs"),
    ({"num_gpus_per_actor": 8}, "num_gpus_per_actor 8: no node can hold a detector actor"),
    ({"num_cpus_per_decoder": 64}, "num_cpus_per_decoder 64: no node can run a decode task"),
    ({"num_cpus_per_actor": 8}, "num_cpus_per_actor 8: no node holds a detector actor beside a decode task"),
    ({"num_actors_min": 8}, "num_actors_min 8: the cluster holds at most 7 detector actors"),
    ({"num_actors_min": 2, "num_gpus_per_actor": 1}, "num_actors_min 2: the cluster holds at most 1 detector"),
])
def test_requests_no_node_can_grant_are_refused_naming_the_field(kw, message):
    with pytest.raises(PreflightError) as refused:
        check([NODE], **kw)
    assert message in str(refused.value)


def test_requests_that_fit_pass():
    check([NODE], num_cpus_per_actor=7.5, num_cpus_per_decoder=0.5)
    check([NODE], num_actors_min=7)
    check([{"CPU": 2.0}, {"CPU": 2.0}], num_cpus_per_actor=2, num_actors_min=1)  # decoder on the other node
    check([NODE, {"CPU": 4.0, "GPU": 4.0}], num_gpus_per_actor=2, num_cpus_per_actor=2)


def test_autoscaler_node_types_count_as_nodes():
    gpu_type = {"CPU": 16.0, "GPU": 4.0}
    check([{"CPU": 2.0}], types=[gpu_type], num_gpus_per_actor=4, num_cpus_per_actor=8, num_actors_min=10)
    with pytest.raises(PreflightError, match="num_gpus_per_actor 8: .*1 autoscaler node types"):
        check([{"CPU": 2.0}], types=[gpu_type], num_gpus_per_actor=8)


def test_fingerprint_differences_name_old_and_new_values():
    old = {"threshold": 0.3, "model": "/m", "model_weights": "aaaaaaaaaaaa", "prompt": None}
    new = {"threshold": 0.5, "model": "/m", "model_weights": "bbbbbbbbbbbb", "prompt": None}
    assert fingerprint.differences(old, new) == ['model_weights "aaaaaaaaaaaa" -> "bbbbbbbbbbbb"',
                                                 "threshold 0.3 -> 0.5"]
    # A hub commit unknown offline on one side: the same hub id is not a difference.
    hub = {"model": "org/detr", "model_weights": "abc123"}
    assert fingerprint.differences(hub, {"model": "org/detr", "model_weights": None}) == []
    assert fingerprint.differences(hub, {"model": "org/other", "model_weights": None}) == [
        'model "org/detr" -> "org/other"', 'model_weights "abc123" -> null']


def test_the_jpeg_draft_rule_is_part_of_the_fingerprint(tmp_path):
    from platescope.config import DetectConfig
    from platescope.sources.images import DRAFT_SLACK

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")

    def fields(**kw):
        return fingerprint.compute(DetectConfig(input=["x"], output="y", model=str(model), **kw))

    drafted, exact = fields(), fields(jpeg_draft=False)
    assert drafted["jpeg_draft_slack"] == DRAFT_SLACK and exact["jpeg_draft_slack"] is None
    # A run started before the rule was recorded decoded drafts by another rule: it does not resume
    # with drafts on, and one without drafts still does.
    before = {k: v for k, v in drafted.items() if k != "jpeg_draft_slack"}
    assert fingerprint.differences(before, drafted) == [f"jpeg_draft_slack null -> {DRAFT_SLACK}"]
    assert fingerprint.differences({k: v for k, v in exact.items() if k != "jpeg_draft_slack"}, exact) == []


def test_storage_errors_are_classified_and_described_in_one_line():
    import botocore.exceptions

    down = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
    assert is_unreachable(down) and is_unreachable(ConnectionRefusedError(111, "refused"))
    assert not is_unreachable(PermissionError("Access Denied")) and not is_unreachable(ValueError("x"))
    try:
        try:
            raise down
        except Exception as e:
            raise OSError("wrapped") from e
    except OSError as wrapped:
        assert is_unreachable(wrapped)
    failure = StorageFailure.of("writing", "s3://b/k", down)
    assert str(failure) == ('storage failed writing s3://b/k: EndpointConnectionError: Could not connect to the '
                            'endpoint URL: "http://127.0.0.1:1/b/k"')
    outer = RuntimeError("task failed")
    outer.__cause__ = failure
    assert find(outer, StorageFailure) is failure
    assert describe(ValueError("two\nlines")) == "ValueError: two lines"
