"""Torch threads per detector actor: decided on the node the actor runs on, never on the driver."""

from __future__ import annotations

import os

import pytest

from platescope.config import DetectConfig
from platescope.pipeline import actor
from platescope.pipeline.actor import decide_num_threads
from platescope.pipeline.stage import DetectorSpec
from platescope.storage import S3Options


def cfg(**kw) -> DetectConfig:
    return DetectConfig(input=["unused"], output="unused", model="unused", **kw)


def test_the_spec_carries_no_thread_count_measured_on_the_driver(monkeypatch):
    # A driver with 96 cores (a laptop submitting to a cluster has its own count; neither matters).
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    spec = DetectorSpec.from_config(cfg(num_actors_max=4), S3Options(), num_gpus=0.0)
    assert spec.num_threads is None
    values = spec.model_dump().values()
    assert 96 not in values and 24 not in values
    # What the actor needs to decide for itself.
    assert (spec.num_gpus, spec.num_actors_max, spec.num_cpus_per_actor) == (0.0, 4, 1.0)


def test_the_configured_thread_count_travels_and_wins():
    spec = DetectorSpec.from_config(cfg(num_threads_per_actor=3, num_actors_max=4), S3Options(), num_gpus=0.0)
    assert spec.num_threads == 3
    assert decide_num_threads(configured=3, on_gpu=False, node_cpus=64, num_actors_max=1,
                              num_cpus_per_actor=1, cores=64) == 3
    assert decide_num_threads(configured=3, on_gpu=True, node_cpus=64, num_actors_max=1,
                              num_cpus_per_actor=1, cores=64) == 3


@pytest.mark.parametrize(("node_cpus", "num_actors_max", "num_cpus_per_actor", "cores", "expected"), [
    (16, 1, 1, 16, 16),  # one actor: the whole node
    (16, 4, 1, 16, 4),  # four actors may share the node: a quarter each
    (16, 100, 1, 16, 1),  # more actors than CPUs: at least one thread
    (16, 100, 4, 16, 4),  # ... and at least the CPUs it reserved; only 4 such actors fit on 16 CPUs
    (16, 8, 8, 16, 8),  # two 8-CPU actors fit, whatever the maximum
    (32, 2, 1, 8, 8),  # Ray told of 32 CPUs on an 8-core machine: no more threads than cores
    (2, 1, 0.5, 2, 2),  # fractional reservations
])
def test_an_actor_takes_its_share_of_its_own_node(node_cpus, num_actors_max, num_cpus_per_actor, cores, expected):
    assert decide_num_threads(configured=None, on_gpu=False, node_cpus=node_cpus, num_actors_max=num_actors_max,
                              num_cpus_per_actor=num_cpus_per_actor, cores=cores) == expected


def test_on_gpu_ray_s_default_stands():
    assert decide_num_threads(configured=None, on_gpu=True, node_cpus=64, num_actors_max=1,
                              num_cpus_per_actor=1, cores=64) is None


def test_the_actor_decides_from_the_cpus_of_the_machine_it_runs_on(monkeypatch):
    """Outside Ray (the benchmark builds a detector in-process) the node is this machine."""
    import sys

    # A Ray another test left running in this process would otherwise answer for the node.
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    spec = DetectorSpec.from_config(cfg(num_actors_max=2), S3Options(), num_gpus=0.0)
    monkeypatch.setattr(actor, "_usable_cores", lambda: 12)
    assert actor.spec_num_threads(spec) == 6
    monkeypatch.setattr(actor, "_usable_cores", lambda: 4)
    assert actor.spec_num_threads(spec) == 2
