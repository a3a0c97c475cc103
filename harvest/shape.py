"""A job's shape, computed in one place: what runs, what is stored, how big, and what a stage asks for.

``harvest run`` (``runner.prepare`` / ``create_store``), ``harvest plan`` (``sharding.plan``), the
Ray pipeline and ``harvest submit`` all read a job's shape from here, so the store ``run`` lays out
is the store ``plan`` sized, and the resources ``submit`` checks are the resources the pipeline's
actors ask Ray for. Nothing here loads weights or touches a store:

- **hooks**: the spec's patterns expanded against the model (plus ``capture.top_k``'s arrays);
- **blocks**: how many blocks must run, whether the final LayerNorm / unembedding run, the
  one-stage plan;
- **workload**: sequences, width of a micro-batch, captured rows, rows per batch: exact from a
  ``Layout``, else estimated by each prompt source from its own spec section;
- **arrays**: every activation array's shape, dtype, bytes per row, chunk and shard rows (shards in
  whole batches where every batch adds the same rows, so shard ends fall on batch ends);
- **units**: the runs of consecutive batches that own whole shards of every array (what a replica
  is handed at a time);
- **resources**: CPUs and GPUs per stage actor (or per one-stage job's entrypoint), times replicas;
  what a cluster (or the local Ray) lacks for them.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SpecError, did_you_mean
from .hookpoints import HookPoint, expand, topk_points
from .layout import Layout
from .prompts import SOURCES
from .spec import JobSpec

# --- hooks and blocks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagePlan:
    """Which part of the model one stage runs and which hook points it captures."""

    index: int
    n_stages: int
    start: int  #: first block (inclusive)
    stop: int  #: last block (exclusive)
    embed: bool  #: runs the token embedding
    final_norm: bool  #: runs the final LayerNorm
    hooks: tuple[HookPoint, ...]
    unembed: bool = False  #: runs the LM head, on the captured rows only (``capture.top_k``)

    def describe(self) -> str:
        parts = (["embed"] if self.embed else []) + [f"blocks {self.start}..{self.stop - 1}" if self.stop > self.start else "no blocks"]
        return " + ".join(parts + (["ln_final"] if self.final_norm else []) + (["unembed"] if self.unembed else []))


def store_dtype_for(compute_dtype: str, requested: str | None) -> str:
    """Stored dtype: as asked, else the compute dtype; bfloat16 is stored as float32.

    NumPy and Zarr have no bfloat16, and float16 would overflow on exactly the massive
    activations outlier studies look for; float32 holds every bfloat16 value exactly.
    """
    if requested:
        return requested
    return "float32" if compute_dtype == "bfloat16" else compute_dtype


def job_hooks(spec: JobSpec, arch, n_layers: int) -> list[HookPoint]:
    """The spec's hook points for this model, plus the top-k arrays of ``capture.top_k``."""
    capture = spec.capture
    if capture.layers is not None and capture.layers[-1] >= n_layers:
        raise SpecError(f"capture.layers includes {capture.layers[-1]}, but the model has {n_layers} layers")
    hooks = expand(list(capture.hooks), arch, n_layers, list(capture.layers) if capture.layers is not None else None)
    return hooks + (topk_points() if capture.top_k else [])


def needs_unembed(hooks: list[HookPoint]) -> bool:
    return any(p.template.startswith("unembed.") for p in hooks)


def needs_final_norm(hooks: list[HookPoint]) -> bool:
    return needs_unembed(hooks) or any(p.template == "ln_final.hook_normalized" for p in hooks)


def layers_needed(hooks: list[HookPoint], n_layers: int) -> int:
    """Blocks that must run: up to the last hooked one (all of them when the final norm is needed)."""
    if needs_final_norm(hooks):
        return n_layers
    return max((p.layer + 1 for p in hooks if p.layer is not None), default=0)


def single_stage(hooks: list[HookPoint], n_layers: int) -> StagePlan:
    """The whole needed part of the model as one stage: blocks past the last hook are not run."""
    return StagePlan(index=0, n_stages=1, start=0, stop=layers_needed(hooks, n_layers),
                     embed=True, final_norm=needs_final_norm(hooks), hooks=tuple(hooks), unembed=needs_unembed(hooks))


# --- the workload: sequences, rows, micro-batches ----------------------------------------------------

@dataclass(frozen=True)
class Workload:
    batch_size: int
    max_len: int  #: longest sequence: the width of a micro-batch
    n_sequences: int
    n_rows: int  #: captured token rows
    rows_per_batch: int  #: most captured rows in one micro-batch
    estimated: str | None = None  #: how the numbers were estimated (None: exact, from the prompts)
    #: every batch but the last captures exactly ``rows_per_batch`` token rows (estimates assume so)
    fixed_token_rows: bool = True
    n_tokens: int = 0  #: tokens the forward runs over (every position of every sequence; 0: unknown)

    @property
    def n_batches(self) -> int:
        return -(-self.n_sequences // self.batch_size)


def workload_of(layout: Layout) -> Workload:
    """The exact workload of laid-out prompts."""
    rows = np.diff(layout.batch_ends("token"), prepend=0)
    per_batch = int(rows.max(initial=0))
    return Workload(layout.batch_size, layout.max_len, layout.n_sequences, layout.n_rows, per_batch,
                    fixed_token_rows=bool((rows[:-1] == per_batch).all()), n_tokens=layout.tokens_before(layout.n_batches))


def batch_rows(work: Workload, axis: str) -> int | None:
    """Rows every batch but the last adds along ``axis`` (``token`` or ``sequence``); None when they vary.

    Sequences are always ``batch_size`` a batch. Token rows vary when sequences of different lengths are
    captured at every position (``positions: all`` over documents, say); ``last``, ``sample`` or packed
    windows capture the same number from every sequence.
    """
    if axis == "sequence":
        return work.batch_size
    return work.rows_per_batch if work.fixed_token_rows and work.rows_per_batch > 0 else None


def estimate_workload(spec: JobSpec, why: str) -> Workload:
    """Sequences and lengths from the prompt spec alone (no tokenizer): the source estimates its own size."""
    cfg = spec.prompts
    name = cfg.get("source") if isinstance(cfg, Mapping) else None
    if name not in SOURCES:
        hint = did_you_mean(name, SOURCES) if isinstance(name, str) else ""
        raise SpecError(f"prompts.source = {name!r} is not a prompt source{hint}; valid sources: {', '.join(SOURCES)}")
    size = SOURCES[name].estimate(cfg, base_dir=spec.base_dir)
    seq_len, n = size.seq_len, size.n_sequences
    positions = spec.capture.positions
    per_seq = {"all": seq_len, "last": 1, "every": -(-max(seq_len - positions.offset, 0) // positions.every),
               "sample": min(positions.sample, seq_len), "list": len(positions.explicit),
               "source": min(size.source_positions, seq_len)}[positions.kind]
    return Workload(spec.run.batch_size, seq_len, n, n * per_seq, min(spec.run.batch_size, n) * per_seq,
                    estimated=f"{why}: {size.note}", n_tokens=n * seq_len)


# --- the stored arrays -----------------------------------------------------------------------------

def chunk_layout(n: int, row_bytes: int, chunk_mib: float, chunks_per_shard: int,
                 batch_rows: int | None = None) -> tuple[int, int]:
    """(rows per chunk, rows per shard) along the leading axis for a target chunk size.

    With ``batch_rows`` (the rows every batch adds, ``batch_rows``), shards are sized in whole batches
    (``batch_aligned_layout``), so every batch end is a shard end and the job's units of work
    (``unit_bounds``) are as fine as a few batches; without, chunks are about ``chunk_mib`` and
    shards ``chunks_per_shard`` chunks, wherever batches end.
    """
    if batch_rows:  # sized in whole batches
        return batch_aligned_layout(n, row_bytes, chunk_mib, chunks_per_shard, batch_rows)
    target = max(1, int(chunk_mib * 2**20) // max(row_bytes, 1))
    # balance the chunks: edge chunks are stored full-size, so 1.5 target chunks would waste 25%
    chunk = -(-max(n, 1) // -(-max(n, 1) // target))
    shard = chunk * chunks_per_shard
    shard = min(shard, -(-max(n, 1) // chunk) * chunk)
    return chunk, shard


def batch_aligned_layout(n: int, row_bytes: int, chunk_mib: float, chunks_per_shard: int,
                         batch_rows: int) -> tuple[int, int]:
    """(rows per chunk, rows per shard) with every shard end on a batch end.

    The shard is the candidate nearest (by ratio) the ``chunk_mib`` x ``chunks_per_shard`` target among
    ``2^j`` batches' rows (j >= 0) and the divisors of one batch's rows (several shards a batch). Either
    way batch k's end, ``k x batch_rows``, is a shard end every ``2^j`` batches (or at every batch), and
    powers of two keep a job's units short: the arrays' shard spans divide one another, so a unit is the
    longest span, never the product of spans. Chunks are the divisor of the shard nearest ``chunk_mib``
    (zarr needs chunks that tile a shard). An array that one such shard would hold whole is one shard of
    balanced chunks, as ``chunk_layout`` sizes it: its only shard end is the array's end either way.
    """
    target_chunk = max(1.0, chunk_mib * 2**20 / max(row_bytes, 1))
    target = target_chunk * chunks_per_shard
    spans = [batch_rows]
    while spans[-1] < target:
        spans.append(2 * spans[-1])
    shard = min(spans + _divisors(batch_rows), key=lambda c: (abs(np.log(c / target)), -c))
    if shard >= n:
        chunk = -(-max(n, 1) // -(-max(n, 1) // max(1, int(target_chunk))))
        return chunk, -(-max(n, 1) // chunk) * chunk
    n_chunks = min(_divisors(shard), key=lambda d: (abs(np.log(shard / d / target_chunk)), d))
    return shard // n_chunks, shard


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass(frozen=True)
class ArrayPlan:
    """One activation array as the store holds it."""

    point: HookPoint
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    @property
    def shard_bytes(self) -> int:
        return self.shard_rows * self.row_bytes

    @property
    def n_shards(self) -> int:
        return -(-self.shape[0] // self.shard_rows) if self.shape[0] else 0

    def batch_bytes(self, work: Workload) -> int:
        """Bytes one micro-batch adds to this array."""
        rows = work.rows_per_batch if self.point.axis == "token" else work.batch_size
        return rows * self.row_bytes


@dataclass(frozen=True)
class ModelDims:
    """The model sizes the stored arrays depend on (from config.json alone)."""

    d_model: int
    n_heads: int
    d_mlp: int

    @classmethod
    def of(cls, config, arch) -> ModelDims:
        return cls(config.hidden_size, config.num_attention_heads, arch.d_mlp(config))


def array_plans(hooks: list[HookPoint], dims: ModelDims, spec: JobSpec, work: Workload) -> list[ArrayPlan]:
    """The store's activation arrays: shapes, dtypes, chunks and shards (``create_store`` lays out these)."""
    store_dtype = store_dtype_for(spec.model.dtype, spec.capture.dtype)
    capture = spec.capture
    sizes = {
        "d_model": dims.d_model, "d_head": dims.d_model // dims.n_heads,
        "head": len(capture.heads) if capture.heads else dims.n_heads,
        "neuron": len(capture.neurons) if capture.neurons else dims.d_mlp,
        "query": work.max_len, "key": work.max_len, "k": capture.top_k,
    }
    out = []
    for p in hooks:
        dtype = p.dtype or store_dtype
        lead = work.n_rows if p.axis == "token" else work.n_sequences
        shape = (lead, *(sizes[d] for d in p.dims[1:]))
        out.append(array_plan(p, shape, dtype, spec.store.chunk_mib, spec.store.chunks_per_shard,
                              batch_rows(work, p.axis)))
    return out


def array_plan(point: HookPoint, shape: tuple[int, ...], dtype: str, chunk_mib: float,
               chunks_per_shard: int, batch_rows: int | None = None) -> ArrayPlan:
    """One array's plan: chunks of about ``chunk_mib`` along its leading axis, ``chunks_per_shard`` to a shard
    (shards in whole batches when every batch adds ``batch_rows`` rows: ``chunk_layout``)."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    chunk, shard = chunk_layout(shape[0], row_bytes, chunk_mib, chunks_per_shard, batch_rows)
    return ArrayPlan(point, tuple(shape), dtype, chunk, shard)


# --- units of work: what one replica is handed at a time ---------------------------------------------

def unit_bounds(batch_ends: Mapping[str, np.ndarray], shards: list[tuple[str, int, int]]) -> np.ndarray:
    """Batch indices where a unit of work may end: ``[0, b1, b2, ..., n_batches]``.

    A unit is a run of consecutive batches whose rows cover whole shards of *every* array, so no shard
    is ever written by two replicas (zarr 3 loses data without an error when two processes write
    inside one shard). A unit may end after batch k only where, for every array, batch k's row end
    (along its axis) is a shard boundary or the array's end. ``batch_ends``: axis -> end of every
    batch along it (``Layout.batch_ends``); ``shards``: (axis, rows per shard, rows) of each array.
    With no array a unit is a batch.
    """
    n = len(next(iter(batch_ends.values()))) if batch_ends else 0
    ok = np.ones(n, dtype=bool)
    for axis, shard_rows, rows in shards:
        ends = np.asarray(batch_ends[axis], dtype=np.int64)
        ok &= (ends % max(shard_rows, 1) == 0) | (ends >= rows)
    if n:
        ok[-1] = True
    return np.concatenate([[0], np.flatnonzero(ok) + 1]).astype(np.int64)


def job_units(layout: Layout, arrays: list[ArrayPlan]) -> list[tuple[int, int]]:
    """The job's units of work as ``[(first batch, end batch), ...]`` (see ``unit_bounds``)."""
    ends = {"token": layout.batch_ends("token"), "sequence": layout.batch_ends("sequence")}
    bounds = unit_bounds(ends, [(a.point.axis, a.shard_rows, a.shape[0]) for a in arrays])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --- what a stage asks of Ray ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What a job asks Ray for: one actor per stage of each replica, or the entrypoint itself (one of each)."""

    stages: int
    device: str  #: cuda | cpu | auto, as the spec says
    cpus_per_stage: int
    gpus_per_stage: int
    replicas: int = 1

    @property
    def actors(self) -> int:
        return self.stages * self.replicas

    @property
    def in_process(self) -> bool:
        """One stage, one replica: the job's own process computes (no Ray)."""
        return self.actors == 1

    @property
    def cpus(self) -> int:
        return self.actors * self.cpus_per_stage

    @property
    def gpus(self) -> int:
        return self.actors * self.gpus_per_stage

    def describe(self) -> str:
        per = "stage (run in the job's entrypoint)" if self.in_process else "stage actor"
        times = f"run.replicas {self.replicas} x run.stages {self.stages}" if self.replicas > 1 else f"run.stages {self.stages}"
        parts = [f"{self.cpus:g} CPU(s) ({times} x {self.cpus_per_stage:g} per {per}, run.threads)"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU(s) ({times} x {self.gpus_per_stage:g}, model.device {self.device})")
        return " and ".join(parts)


def stage_resources(spec: JobSpec, *, node_cpus: float, gpus: float, nodes: int = 1) -> Resources:
    """CPUs and GPUs per stage actor and the number of replicas, given the cluster.

    ``node_cpus``: CPUs of the largest node; ``gpus``: GPUs in all; ``nodes``: alive nodes.
    Replicas: ``run.replicas``; ``auto`` is as many whole pipelines as the GPUs hold (one per stage),
    or one without GPUs. CPUs: ``run.threads``, else an equal share of a node's CPUs among the stages
    of the replicas that share a node (at least one). GPUs: one per stage on ``model.device: cuda``;
    on ``auto``, one per stage when there are enough GPUs for every stage of every replica.
    The pipeline driver and ``harvest submit`` both call this, so submit checks what the actors ask.
    """
    n = spec.run.stages
    device = spec.model.device
    kind = "cuda" if device.startswith("cuda") else device
    replicas = spec.run.replicas
    if replicas == "auto":
        replicas = max(1, int(gpus) // n) if kind != "cpu" and gpus >= n else 1
    per_node = -(-replicas // max(1, nodes))
    cpus = spec.run.threads or max(1, int(node_cpus) // (n * per_node))
    gpu = 1 if kind == "cuda" or (kind == "auto" and gpus >= n * replicas) else 0
    return Resources(n, kind, cpus, gpu, replicas)


def local_ray_cpus(spec: JobSpec, stages: int, replicas: int) -> int:
    """Logical CPUs of the Ray a job starts on this machine (no ``run.address``): at least one per
    actor thread, so every stage actor can be placed; threads beyond the cores share them."""
    return max(os.cpu_count() or 1, (spec.run.threads or 1) * stages * replicas)


def missing_resources(needs: Resources, have: Mapping[str, float]) -> list[str]:
    """What ``have`` (Ray resource totals) lacks for ``needs``, one phrase per kind; empty when it fits.

    The replica driver checks its Ray cluster with it and ``harvest plan`` this machine.
    """
    out = []
    for kind, need, per in (("CPU", needs.cpus, needs.cpus_per_stage), ("GPU", needs.gpus, needs.gpus_per_stage)):
        if need and have.get(kind, 0) < need:
            out.append(f"{needs.replicas} replica(s) x {needs.stages} stage(s) need {need:g} {kind}(s) ({per:g} per "
                       f"stage actor) but there are {have.get(kind, 0):g}")
    return out


def cluster_capacity(nodes: list[Mapping[str, Any]]) -> tuple[float, float]:
    """(CPUs of the largest node, GPUs in all) from each node's resource totals."""
    node_cpus = max((float(r.get("CPU", 0)) for r in nodes), default=0.0)
    return node_cpus, sum(float(r.get("GPU", 0)) for r in nodes)
