"""Refuse resource requests the cluster can never grant, instead of waiting for them forever.

Ray queues a task or actor whose request no node can hold, and Ray Data then waits without end. So
before any work the run checks its requests against the cluster:

- some node must hold one detector actor (num_cpus_per_actor CPUs and num_gpus_per_actor GPUs on
  the same node), and some node one decode task (num_cpus_per_decoder CPUs);
- on a cluster that reports no autoscaler node types, the nodes there now must also hold
  num_actors_min actors and one decode task at the same time (the pool starts that many actors
  before the first batch, and decoding must run beside them).

"Nodes" are the live nodes plus, on an autoscaling cluster (KubeRay, `ray up`), every node type the
autoscaler reports it can add. An autoscaler that reports no node types cannot be asked: the check
is then against the current nodes only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from platescope.pipeline.errors import PreflightError

log = logging.getLogger(__name__)


def _live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type the autoscaler can add (none when it reports no config)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older head or no autoscaler: current nodes only
        log.debug("no autoscaler cluster config: %s", e)
        return []
    if not config:
        return []
    return [{k: float(v) for k, v in group.resources.items()} for group in config.node_group_configs
            if group.max_count != 0 and group.resources]


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_requests(*, num_cpus_per_actor: float, num_gpus_per_actor: float, num_cpus_per_decoder: float,
                   num_actors_min: int, nodes: list[dict[str, Any]] | None = None,
                   node_types: list[dict[str, Any]] | None = None) -> None:
    """Raise PreflightError naming the field when the cluster can never grant it (nodes and
    node_types default to the connected Ray cluster's)."""
    nodes = _live_nodes() if nodes is None else nodes
    node_types = _autoscaler_node_types() if node_types is None else node_types
    shapes = nodes + node_types
    if not shapes:
        return
    cpu = max(float(s.get("CPU", 0)) for s in shapes)
    gpu = max(float(s.get("GPU", 0)) for s in shapes)
    where = (f"the largest node has {_fmt(cpu)} CPUs and {_fmt(gpu)} GPUs ({len(nodes)} node"
             f"{'s' if len(nodes) != 1 else ''} now"
             + (f", {len(node_types)} autoscaler node types" if node_types else ", no autoscaler node types")
             + ")")
    if num_cpus_per_decoder > cpu:
        raise PreflightError(f"num_cpus_per_decoder {_fmt(num_cpus_per_decoder)}: no node can run a decode "
                             f"task; {where}")
    if num_cpus_per_actor > cpu:
        raise PreflightError(f"num_cpus_per_actor {_fmt(num_cpus_per_actor)}: no node can hold a detector "
                             f"actor; {where}")
    if num_gpus_per_actor > gpu:
        raise PreflightError(f"num_gpus_per_actor {_fmt(num_gpus_per_actor)}: no node can hold a detector "
                             f"actor; {where}")

    def fits(s: dict[str, Any]) -> int:
        n = math.floor(float(s.get("CPU", 0)) / num_cpus_per_actor + 1e-9)
        if num_gpus_per_actor > 0:
            n = min(n, math.floor(float(s.get("GPU", 0)) / num_gpus_per_actor + 1e-9))
        return max(n, 0)

    if not any(fits(s) for s in shapes):
        raise PreflightError(f"num_cpus_per_actor {_fmt(num_cpus_per_actor)} with num_gpus_per_actor "
                             f"{_fmt(num_gpus_per_actor)}: no node has both at once; {where}")
    if node_types:
        return  # the autoscaler can add nodes: what is there now does not bound the pool
    # num_actors_min actors and one decode task at once, on the nodes there are: try each node as
    # the decoder's, the actors packed on what is left of it and on every other node.
    capacity = [fits(s) for s in nodes]
    best = 0
    for i, s in enumerate(nodes):
        left = float(s.get("CPU", 0)) - num_cpus_per_decoder
        if left < 0:
            continue
        here = min(capacity[i], math.floor(left / num_cpus_per_actor + 1e-9))
        best = max(best, here + sum(capacity) - capacity[i])
    if best == 0:
        raise PreflightError(
            f"num_cpus_per_actor {_fmt(num_cpus_per_actor)}: no node holds a detector actor beside a decode "
            f"task (num_cpus_per_decoder {_fmt(num_cpus_per_decoder)}), so decoding could never run; {where}")
    if best < num_actors_min:
        total_cpu = sum(float(s.get("CPU", 0)) for s in nodes)
        total_gpu = sum(float(s.get("GPU", 0)) for s in nodes)
        raise PreflightError(
            f"num_actors_min {num_actors_min}: the cluster holds at most {best} detector actors "
            f"({_fmt(num_cpus_per_actor)} CPUs, {_fmt(num_gpus_per_actor)} GPUs each) beside a decode task "
            f"({_fmt(num_cpus_per_decoder)} CPUs); it has {_fmt(total_cpu)} CPUs and {_fmt(total_gpu)} GPUs "
            f"on {len(nodes)} node{'s' if len(nodes) != 1 else ''} and reports no autoscaler node types")
