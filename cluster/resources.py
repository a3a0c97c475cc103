"""What a job asks the cluster for, and the refusal when the cluster has less.

The figures come from ``harvest.shape.stage_resources``: the pipeline's driver asks Ray for the
same per-stage CPUs and GPUs for its actors, so what ``submit`` checks is what the job will ask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.util.state import list_nodes

from harvest.errors import ClusterResourcesError
from harvest.shape import Resources, cluster_capacity, stage_resources


def job_needs(spec, nodes: list[Mapping[str, Any]] = ()) -> Resources:
    """CPUs and GPUs per stage of ``spec`` on a cluster of ``nodes`` (resource totals; none: unknown).

    ``model.device: auto`` takes GPUs when the cluster has one for every stage; a pipeline's stages
    then run on GPU nodes whatever node its driver lands on.
    """
    node_cpus, gpus = cluster_capacity(list(nodes))
    return stage_resources(spec, node_cpus=node_cpus, gpus=gpus, nodes=max(1, len(nodes)))


def entrypoint_resources(needs: Resources) -> dict[str, float]:
    """Resources of the entrypoint: a one-stage, one-replica job computes in it; a Ray driver needs none."""
    if not needs.in_process:
        return {}
    out = {"entrypoint_num_cpus": float(needs.cpus_per_stage)}
    if needs.gpus_per_stage:
        out["entrypoint_num_gpus"] = float(needs.gpus_per_stage)
    return out


def cluster_nodes(url: str) -> list[dict[str, float]]:
    """Resource totals of each alive node of the cluster (what ``ray.nodes()`` reports)."""
    nodes = list_nodes(address=url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [{k: float(v) for k, v in (node.resources_total or {}).items()} for node in nodes]


def total(nodes: list[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


def check_resources(needs: Resources, have: dict[str, float], url: str, n_nodes: int) -> None:
    """Raise ``ClusterResourcesError`` naming what the plan needs and what the cluster has."""
    short = [kind for kind, need in (("CPU", needs.cpus), ("GPU", needs.gpus)) if need and have.get(kind, 0) < need]
    if short:
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        raise ClusterResourcesError(
            f"the job needs {needs.describe()}, but the cluster at {url} has {has} (ray.cluster_resources() "
            f"over {n_nodes} alive node(s)); add nodes with {' and '.join(short)}s, lower run.replicas, run.stages or "
            "run.threads (see `harvest plan SPEC`), or pass --no-resource-check if the cluster autoscales")

