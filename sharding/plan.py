"""The partition plan: which blocks each pipeline stage runs and what memory it needs, from the config alone.

Nothing here loads weights. The model is built on the meta device (one block is enough: all blocks
of GPT-J / GPT-NeoX are alike) to count parameters; the job's prompts give the micro-batch shape
(exactly when the checkpoint has a tokenizer, else an estimate from the prompt spec); the store
layout gives the chunk and shard sizes that the writers buffer.

A stage's memory, in bytes (``e`` = bytes per element of the compute dtype)::

    weights      embedding (first stage) + its blocks + final LayerNorm (last stage), by dtype or
                 quantisation (int8: 1 byte + a float32 scale per output row; nf4/fp4: ~0.52 byte)
    activations  one micro-batch through one block and the hidden states around it: tokens x
                 (6 d_model + 3 d_mlp) x e (measured: 1.5x the live tensors of a block), plus
                 B x heads x seq^2 attention weights when the stage captures patterns (eager
                 attention), plus on CPU ~48 KiB per token that the allocator keeps
    capture      the micro-batches of captures alive at once (the writer's queue and three more);
                 with zarr's pipeline (compression, or ``store.writer: zarr``) also one shard buffer
                 per array and one shard's encoding copy per write thread; with O_DIRECT one chunk of
                 staging per array (``harvest.shards`` otherwise writes from the captured batch itself)
    process      a process after importing torch, transformers and zarr (and Ray in an actor), and
                 with harvest-time statistics torch.compile's share (their kernels are compiled)
    loading      while loading: the stage's tensors as mapped from the files, plus converted or
                 quantised copies when the file dtype differs or the weights are quantised

Partition: contiguous runs of the blocks that must run (blocks past the last hooked one never do);
the embedding goes with the first stage, the final LayerNorm with the last, and the unembedding too
when ``capture.top_k`` asks for predictions (then it runs on the captured rows only). Among the partitions whose every stage fits its memory, the one with the smallest
slowest stage (forward FLOPs plus capture work per token) wins, ties broken by memory headroom.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvest.architectures import architecture_for
from harvest.checkpoint import Checkpoint, checkpoint_directory, looks_like_hub_name
from harvest.errors import CheckpointNotFoundError, ModelError, PlanDoesNotFitError, SpecError
from harvest.hookpoints import HookPoint
from harvest.layout import Layout
from harvest.prompts import build_source
from harvest.rowpass import COMPILE_ENV
from harvest.shape import (ArrayPlan, ModelDims, StagePlan, Workload, array_plans, estimate_workload, job_hooks,
                           layers_needed, needs_final_norm, needs_unembed, single_stage, workload_of)
from harvest.shape import Resources, batch_rows, local_ray_cpus, missing_resources, stage_resources, unit_bounds
from harvest.spec import JobSpec
from harvest.summary import human
from harvest.writer import write_threads_for

from .speed import Speed, job_speed

MIB, GIB = 2**20, 2**30
#: resident memory of a process that imported torch, transformers and zarr, built a model skeleton and
#: ran a forward with a writer thread, weights and activations apart (measured here: ~340 MiB after
#: the imports and the store's creation, a Ray stage actor 335 MiB before loading its weights, and
#: ~60 MiB more once batches flow: thread pools, allocator arenas. With zarr's write pipeline it was
#: ~130 MiB more: its per-shard copies kept arenas grown; the hand-encoded shards make none)
PROCESS_BYTES = 400 * MIB
#: what torch.compile adds to a process that compiles the statistics' kernels (``harvest.running``):
#: dynamo and inductor imported, two kernels built (measured: ~105 MiB in a plain process, ~150 MiB more
#: in a Ray stage actor); none with ``capture.statistics: false`` or ``HARVEST_COMPILE=0``
COMPILE_BYTES = 128 * MIB
#: CPU only: what glibc's allocator keeps per token of a micro-batch beyond the live tensors (fitted
#: on GPT-NeoX shapes with d_model 512..2048, 512..4096 tokens per micro-batch)
CPU_BYTES_PER_TOKEN = 48 * 1024
#: micro-batches of captures alive at once besides the writer's queue: the one being captured and the
#: one being written; the queue holds up to run.write_queue more when the writer lags (a slow disk, or
#: a busy CPU), so the peak counts them all
CAPTURES_OUTSIDE_QUEUE = 2
#: a CUDA context and the kernels torch loads into it
CUDA_CONTEXT_BYTES = 600 * MIB
#: copying, checking and writing one stored byte, in forward FLOP-equivalents (from BENCH.md: an
#: all-neuron capture of ~94 KB/token costs ~10% of a 160M-parameter forward)
CAPTURE_FLOPS_PER_BYTE = 150
#: partitions within this fraction of the best compute balance compete on memory headroom
BALANCE_SLACK = 0.02
#: bytes per element of a compute dtype (numpy has no bfloat16)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: bytes per weight of a quantised nn.Linear, and per output row (int8's float32 scale)
QUANT_BYTES = {"int8": (1.0, 4), "nf4": (0.5 + 1 / 64, 0), "fp4": (0.5 + 1 / 64, 0)}


# --- the model, counted on the meta device --------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    model_type: str
    d_model: int
    d_mlp: int
    n_heads: int
    n_layers: int
    vocab: int
    n_ctx: int
    embed_params: int
    block_params: int
    #: weights of the nn.Linear layers of one block (what quantisation shrinks), and their output rows
    block_linear_params: int
    block_linear_rows: int
    final_norm_params: int
    unembed_params: int
    #: parameter names inside one block, and of the embedding / final norm (for the tensor check)
    block_names: tuple[str, ...]
    embed_names: tuple[str, ...]
    final_names: tuple[str, ...]
    unembed_names: tuple[str, ...]
    #: dtype of the tensors in the weight files (None: unknown, assume the compute dtype)
    file_dtype: str | None

    @property
    def total_params(self) -> int:
        return self.embed_params + self.n_layers * self.block_params + self.final_norm_params + self.unembed_params

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ModelShape:
        config, arch = ckpt.config, ckpt.arch
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1  # every block is alike; one is enough to count
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(one)
        base = getattr(model, arch.base)
        block = getattr(base, arch.blocks)[0]
        embed, final, unembed = getattr(base, arch.embed), getattr(base, arch.final_norm), getattr(model, arch.unembed)
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return cls(
            model_type=config.model_type, d_model=config.hidden_size, d_mlp=arch.d_mlp(config),
            n_heads=config.num_attention_heads, n_layers=config.num_hidden_layers,
            vocab=config.vocab_size, n_ctx=config.max_position_embeddings,
            embed_params=count(embed), block_params=count(block),
            block_linear_params=sum(m.weight.numel() for m in linears),
            block_linear_rows=sum(m.out_features for m in linears),
            final_norm_params=count(final), unembed_params=count(unembed),
            block_names=tuple(n for n, _ in block.named_parameters()),
            embed_names=tuple(n for n, _ in embed.named_parameters()),
            final_names=tuple(n for n, _ in final.named_parameters()),
            unembed_names=tuple(n for n, _ in unembed.named_parameters()),
            file_dtype=_file_dtype(ckpt),
        )


def _file_dtype(ckpt: Checkpoint) -> str | None:
    """The dtype of the block weights in the files (headers only), else what config.json says."""
    if ckpt.weight_files:
        names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        with safe_open(ckpt.weight_files[-1], framework="pt") as f:
            for key in f.keys():
                dtype = names.get(f.get_slice(key).get_dtype())
                if dtype:
                    return dtype
    declared = getattr(ckpt.config, "dtype", None)  # transformers 5 reads config.json's torch_dtype into it
    return str(declared).replace("torch.", "") if declared is not None else None


# --- the work: micro-batches and stored arrays ----------------------------------------------------

def workload_for(spec: JobSpec, ckpt: Checkpoint) -> Workload:
    """The micro-batch shape and row counts: exact from the prompts when a tokenizer is there."""
    if ckpt.tokenizer_files():
        tokenizer = AutoTokenizer.from_pretrained(ckpt.directory)
        source = build_source(spec.prompts, base_dir=spec.base_dir, tokenizer=tokenizer)
        return workload_of(Layout(list(source.prompts()), spec.capture.positions, spec.run.batch_size))
    return estimate_workload(spec, f"no tokenizer in {ckpt.directory}")


# --- per-stage estimates ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StageEstimate:
    plan: StagePlan
    device: str  #: "cpu" or "cuda"
    params: int
    weights: int
    loading: int  #: peak while loading the weights (host memory)
    activations: int
    capture: int
    process: int
    flops_per_token: float
    budget: int | None = None  #: memory this stage may use (None: not checked per stage)

    @property
    def peak(self) -> int:
        """Peak on the stage's device (GPU memory on CUDA, process memory on CPU)."""
        if self.device == "cuda":
            return CUDA_CONTEXT_BYTES + self.weights + self.activations
        return self.process + max(self.loading, self.weights + self.activations + self.capture)

    @property
    def host(self) -> int:
        """Host memory of the stage's process (equals ``peak`` on CPU)."""
        if self.device == "cuda":
            return self.process + max(self.loading, self.capture)
        return self.peak

    @property
    def shortfall(self) -> int:
        return max(0, self.peak - self.budget) if self.budget is not None else 0


@dataclass
class _Costs:
    """Per-block and per-end vectors from which any stage's estimate is summed."""

    shape: ModelShape
    spec: JobSpec
    work: Workload
    device: str
    n_blocks: int
    dtype_bytes: int
    block_weights: int
    block_fp: int
    block_file: int
    block_flops: float
    capture_bytes: np.ndarray  #: per unit (0 = embed, 1..n = blocks, n+1 = final): bytes per batch
    shard_bytes: np.ndarray  #: per unit: sum of shard buffers
    max_shard: np.ndarray  #: per unit: largest shard
    n_arrays: np.ndarray  #: per unit: arrays written
    stored_per_token: np.ndarray  #: per unit: stored bytes per token (capture work)
    eager: np.ndarray  #: per unit: captures attention patterns

    @property
    def compiles(self) -> bool:
        """The stages build the statistics' compiled kernels (``harvest.running.CompiledKernel``)."""
        return bool(self.spec.capture.statistics) and os.environ.get(COMPILE_ENV, "1") != "0"

    def stage(self, index: int, n_stages: int, start: int, stop: int, final_norm: bool, unembed: bool,
              hooks: tuple[HookPoint, ...], budget: int | None = None) -> StageEstimate:
        s, w = self.shape, self.work
        embed = index == 0
        units = ([0] if embed else []) + list(range(start + 1, stop + 1)) + ([self.n_blocks + 1] if final_norm else [])
        e = self.dtype_bytes
        n = stop - start
        small = ((s.embed_params if embed else 0) + (s.final_norm_params if final_norm else 0)
                 + (s.unembed_params if unembed else 0))
        weights = n * self.block_weights + small * e
        fp = n * self.block_fp + small * e
        file = n * self.block_file + small * ITEMSIZE.get(s.file_dtype or self.spec.model.dtype, e)
        tokens = w.batch_size * w.max_len
        activations = tokens * (6 * s.d_model + 3 * s.d_mlp) * e if n else 2 * tokens * s.d_model * e
        if self.eager[units].any():
            activations += w.batch_size * s.n_heads * w.max_len ** 2 * (2 * e + 4)
        if unembed:  # logits of the captured rows, and their top-k
            activations += w.rows_per_batch * s.vocab * e * 2
        if self.device == "cpu":
            activations += tokens * CPU_BYTES_PER_TOKEN
        per_batch = int(self.capture_bytes[units].sum())
        queued = per_batch * (self.spec.run.write_queue + CAPTURES_OUTSIDE_QUEUE)
        writing = write_threads_for(self.spec.run.write_threads, self.device, int(self.n_arrays[units].sum()))
        store = self.spec.store
        if store.writer == "zarr" or store.compressor != "none":  # zarr's pipeline: whole shards in memory
            encoding = writing * int(self.max_shard[units].max(initial=0))  # shards being encoded at once
            capture = queued + int(self.shard_bytes[units].sum()) + encoding
        else:  # harvest.shards writes each chunk from its slice of the batch: no shard is ever held
            staging = int(self.shard_bytes[units].sum()) // store.chunks_per_shard if store.direct_io else 0
            capture = queued + staging
        if self.device == "cuda":
            activations += per_batch  # captures are selected on the device before the copy to host
        process = PROCESS_BYTES + (COMPILE_BYTES if self.compiles else 0)
        flops = n * self.block_flops + (2 * s.d_model if embed else 0) + (10 * s.d_model if final_norm else 0)
        flops += float(self.stored_per_token[units].sum()) * CAPTURE_FLOPS_PER_BYTE
        if unembed:
            flops += 2.0 * s.unembed_params * w.n_rows / max(w.n_sequences * w.max_len, 1)
        plan = StagePlan(index=index, n_stages=n_stages, start=start, stop=stop, embed=embed,
                         final_norm=final_norm, hooks=hooks, unembed=unembed)
        # tensors are mapped from the files; a dtype conversion copies them, quantisation makes packed copies
        converted = (s.file_dtype or self.spec.model.dtype) != self.spec.model.dtype
        loading = file + (fp if converted else 0) + (weights if self.spec.model.quantization else 0)
        return StageEstimate(plan, self.device, params=n * s.block_params + small, weights=weights,
                             loading=loading, activations=activations, capture=capture, process=process,
                             flops_per_token=flops, budget=budget)


def _costs(shape: ModelShape, spec: JobSpec, work: Workload, arrays: list[ArrayPlan], device: str,
           n_blocks: int) -> _Costs:
    e = ITEMSIZE[spec.model.dtype]
    file_e = ITEMSIZE.get(shape.file_dtype or spec.model.dtype, e)
    other = shape.block_params - shape.block_linear_params
    if spec.model.quantization:
        per_weight, per_row = QUANT_BYTES[spec.model.quantization]
        block_weights = int(shape.block_linear_params * per_weight + shape.block_linear_rows * per_row + other * e)
    else:
        block_weights = shape.block_params * e
    n_units = n_blocks + 2
    capture = np.zeros(n_units, dtype=np.int64)
    shard = np.zeros(n_units, dtype=np.int64)
    biggest = np.zeros(n_units, dtype=np.int64)
    count = np.zeros(n_units, dtype=np.int64)
    stored = np.zeros(n_units)
    eager = np.zeros(n_units, dtype=bool)
    for a in arrays:
        p = a.point
        u = 0 if p.template == "hook_embed" else p.layer + 1 if p.layer is not None else n_units - 1
        capture[u] += a.batch_bytes(work)
        shard[u] += a.shard_bytes
        biggest[u] = max(biggest[u], a.shard_bytes)
        count[u] += 1
        stored[u] += a.nbytes / max(work.n_rows, 1)
        eager[u] |= p.template == "attn.hook_pattern"
    # per token: 2 FLOPs per weight, plus attention over on average half the sequence (QK and AV)
    block_flops = 2.0 * shape.block_params + 2.0 * work.max_len * shape.d_model
    return _Costs(shape, spec, work, device, n_blocks, e, block_weights, shape.block_params * e,
                  shape.block_params * file_e, block_flops, capture, shard, biggest, count, stored, eager)


# --- the partition ------------------------------------------------------------------------------------

def _minmax(n_blocks: int, n_stages: int, key) -> tuple[float, list[tuple[int, int]]]:
    """Contiguous split of ``n_blocks`` into ``n_stages`` non-empty runs minimising max ``key(j, a, b)``."""
    inf = float("inf")
    best = [[inf] * (n_blocks + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_blocks + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for j in range(1, n_stages + 1):
        for b in range(j, n_blocks - (n_stages - j) + 1):
            for a in range(j - 1, b):
                if best[j - 1][a] == inf:
                    continue
                value = max(best[j - 1][a], key(j - 1, a, b))
                if value < best[j][b]:
                    best[j][b], cut[j][b] = value, a
    runs, b = [], n_blocks
    for j in range(n_stages, 0, -1):
        a = cut[j][b]
        runs.append((a, b))
        b = a
    return best[n_stages][n_blocks], runs[::-1]


def partition(costs: _Costs, hooks: list[HookPoint], n_stages: int, final_norm: bool, unembed: bool,
              budgets: list[int | None]) -> list[StageEstimate]:
    """The best contiguous partition (see the module doc); it may not fit: check ``shortfall``."""
    n = costs.n_blocks

    def est(j: int, a: int, b: int) -> StageEstimate:
        last = j == n_stages - 1
        return costs.stage(j, n_stages, a, b, final_norm and last, unembed and last, (), budgets[j])

    memo: dict[tuple[int, int, int], StageEstimate] = {}

    def get(j: int, a: int, b: int) -> StageEstimate:
        if (j, a, b) not in memo:
            memo[(j, a, b)] = est(j, a, b)
        return memo[(j, a, b)]

    fits = lambda s: s.budget is None or s.peak <= s.budget  # noqa: E731
    slowest, runs = _minmax(n, n_stages, lambda j, a, b: get(j, a, b).flops_per_token if fits(get(j, a, b)) else float("inf"))
    if slowest == float("inf"):  # nothing fits: the partition that misses by the least
        _, runs = _minmax(n, n_stages, lambda j, a, b: float(get(j, a, b).shortfall))
    else:
        limit = slowest * (1 + BALANCE_SLACK)

        def headroom(j: int, a: int, b: int) -> float:
            s = get(j, a, b)
            if not fits(s) or s.flops_per_token > limit:
                return float("inf")
            return s.peak / s.budget if s.budget else s.peak / GIB
        _, runs = _minmax(n, n_stages, headroom)
    out = []
    for j, (a, b) in enumerate(runs):
        last = j == n_stages - 1
        mine = tuple(p for p in hooks if _owner(p, runs, n_stages) == j)
        out.append(costs.stage(j, n_stages, a, b, final_norm and last, unembed and last, mine, budgets[j]))
    return out


def _owner(point: HookPoint, runs: list[tuple[int, int]], n_stages: int) -> int:
    if point.template == "hook_embed":
        return 0
    if point.layer is None:  # ln_final, the unembedding's top-k
        return n_stages - 1
    return next(j for j, (a, b) in enumerate(runs) if a <= point.layer < b)


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A job's partition, per-stage memory, store size and file layout, computed without weights."""

    spec: JobSpec
    directory: Path
    shape: ModelShape
    hooks: list[HookPoint]
    work: Workload
    arrays: list[ArrayPlan]
    stages: list[StageEstimate]
    device: str
    budget_source: str
    #: CPU on one machine: all stages and the driver share this much memory (None: per-stage budgets)
    shared_budget: int | None = None
    driver: int = 0  #: the driver process and the hidden states in flight in Ray's object store
    problems: list[str] = field(default_factory=list)
    #: what the actors ask of Ray on this machine (``run.replicas: auto`` resolved against its GPUs)
    resources: Resources | None = None
    speed: Speed | None = None  #: expected tokens/s and write bandwidth (``plan_job``)

    @property
    def replicas(self) -> int:
        return self.resources.replicas if self.resources is not None else 1

    @property
    def store_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays) + self.work.n_rows * 16  # + tokens/seq/pos

    @property
    def bytes_per_token(self) -> float:
        return self.store_bytes / max(self.work.n_rows, 1)

    @property
    def n_files(self) -> int:
        """Activation shard files and array metadata (small arrays: about two files each)."""
        return sum(a.n_shards + 1 for a in self.arrays)

    @property
    def total_memory(self) -> int:
        """Host memory of every replica's stages and the driver, all on one machine."""
        return self.replicas * sum(s.host for s in self.stages) + self.driver

    @property
    def fits(self) -> bool:
        return not self.problems

    def check(self) -> None:
        if self.problems:
            raise PlanDoesNotFitError("; ".join(self.problems))


def plan_job(spec: JobSpec, *, probe: bool = False, tokens_per_second: float | None = None) -> Plan:
    """Plan a job from its spec without loading weights (``harvest plan``): see ``format_plan``.

    ``probe``: measure this machine's matmul rate and the store target's write speed (``sharding.speed``;
    ``harvest plan`` does unless ``--no-probe``); ``tokens_per_second``: one replica's rate, as the user
    knows it, instead of the compute probe.
    """
    ckpt = planning_checkpoint(spec)
    hooks = job_hooks(spec, ckpt.arch, ckpt.n_layers)
    plan = build_plan(ckpt, hooks, spec, workload_for(spec, ckpt))
    threads = plan.resources.cpus_per_stage if plan.device == "cpu" else None
    plan.speed = job_speed(plan, plan.replicas, tokens_per_second=tokens_per_second, probe=probe, threads=threads)
    return plan


def partition_stages(ckpt: Checkpoint, hooks: list[HookPoint], spec: JobSpec, layout=None) -> list[StagePlan]:
    """The stages of a pipeline job (``spec.run.stages`` > 1), refusing one that does not fit.

    Also checks, from the safetensors headers, that the checkpoint holds every tensor each stage
    will load, so a broken checkpoint fails before a store is created.
    """
    work = workload_of(layout) if layout is not None else estimate_workload(spec, "no prompts given")
    plan = build_plan(ckpt, hooks, spec, work)
    plan.check()
    stages = [s.plan for s in plan.stages]
    if ckpt.weight_files:
        for stage in stages:
            missing = missing_tensors(ckpt, plan.shape, stage)
            if missing:
                raise ModelError(
                    f"checkpoint {ckpt.directory} lacks {len(missing)} tensor(s) that stage {stage.index} "
                    f"({stage.describe()}) needs, e.g. {', '.join(missing[:3])}; the files are incomplete "
                    "or belong to a different config"
                )
    return stages


def build_plan(ckpt: Checkpoint, hooks: list[HookPoint], spec: JobSpec, work: Workload) -> Plan:
    shape = ModelShape.of(ckpt)
    n_stages = spec.run.stages
    n_blocks = layers_needed(hooks, shape.n_layers)
    if n_stages > max(n_blocks, 1):
        last = max((p.layer for p in hooks if p.layer is not None), default=None)
        why = (f"the last hooked block is {last}, so only blocks 0..{last} run" if last is not None
               else "no block needs to run for these hooks")
        raise SpecError(f"run.stages is {n_stages}, but only {n_blocks} block(s) run ({why}); every stage needs "
                        f"at least one block: use run.stages <= {max(n_blocks, 1)}")
    device = target_device(spec)
    arrays = array_plans(hooks, ModelDims(shape.d_model, shape.n_heads, shape.d_mlp), spec, work)
    budgets, shared, source = _budgets(spec, n_stages, device)
    costs = _costs(shape, spec, work, arrays, device, n_blocks)
    if n_stages == 1:
        one = single_stage(hooks, shape.n_layers)
        stages = [costs.stage(0, 1, one.start, one.stop, one.final_norm, one.unembed, one.hooks, budgets[0])]
    else:
        stages = partition(costs, hooks, n_stages, needs_final_norm(hooks), needs_unembed(hooks), budgets)
    resources = local_resources(spec, device)
    driver = 0
    if n_stages > 1:
        # hidden states in Ray's object store: those in flight, plus those each stage's output keeps until
        # the next stage's writer has made them durable (up to one shard of its arrays, in batches), per replica
        in_flight = spec.run.max_in_flight or 2 * n_stages
        hidden = work.batch_size * work.max_len * shape.d_model * ITEMSIZE[spec.model.dtype]
        by_name = {a.point.name: a for a in arrays}
        kept = 0
        for s in stages[1:]:
            rows = [by_name[p.name].shard_rows / max(work.rows_per_batch if p.axis == "token" else work.batch_size, 1)
                    for p in s.plan.hooks]
            kept += min(work.n_batches, math.ceil(max(rows, default=0)) + 1)
        driver = PROCESS_BYTES + resources.replicas * (in_flight * (n_stages - 1) + kept) * hidden
    elif not resources.in_process:  # one-stage replicas: a Ray driver beside the actors
        driver = PROCESS_BYTES
    plan = Plan(spec, ckpt.directory, shape, hooks, work, arrays, stages, device, source, shared, driver,
                resources=resources)
    plan.problems = _problems(plan)
    return plan


def _problems(plan: Plan) -> list[str]:
    out = []
    hint = "more stages (run.stages), model.quantization: int8 or nf4, a smaller run.batch_size or store.chunk_mib"
    for s in plan.stages:
        if s.shortfall:
            out.append(f"stage {s.plan.index} ({s.plan.describe()}) needs {_gib(s.peak)} but has {_gib(s.budget)} "
                       f"({plan.budget_source}): short by {_gib(s.shortfall)}; try {hint}")
    if plan.shared_budget is not None and plan.total_memory > plan.shared_budget:
        short = plan.total_memory - plan.shared_budget
        r = plan.replicas
        who = (f"the {r} replicas x {len(plan.stages)} stages and the driver" if r > 1 else
               f"the {len(plan.stages)} stages and the driver" if len(plan.stages) > 1 else "the job")
        out.append(f"{who} need {_gib(plan.total_memory)} together but {plan.budget_source} is "
                   f"{_gib(plan.shared_budget)}: short by {_gib(short)}; try "
                   + ("fewer run.replicas, " if r > 1 else "")
                   + "model.quantization: int8 or nf4, fewer stages, a smaller run.batch_size or store.chunk_mib")
    out += placement_problems(plan)
    return out


def runs_locally(spec: JobSpec) -> bool:
    """The job would start its own Ray (or none) on this machine: no run.address, no $RAY_ADDRESS."""
    return not (spec.run.address or os.environ.get("RAY_ADDRESS"))


def local_gpus(device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" and torch.cuda.is_available() else 0


def local_resources(spec: JobSpec, device: str) -> Resources:
    """What the actors ask of Ray on this machine (``run.replicas: auto`` resolved against its GPUs)."""
    return stage_resources(spec, node_cpus=os.cpu_count() or 1, gpus=local_gpus(device))


def placement_problems(plan: Plan) -> list[str]:
    """What this machine lacks to place the plan's actors, when the job would run on a local Ray.

    The comparison ``harvest.shape.missing_resources`` (the replica driver's check of its Ray cluster too),
    against what the local Ray is started with (``harvest.shape.local_ray_cpus``) and this machine's
    GPUs. A CUDA plan on a machine with no GPU at all is a plan for another machine: not checked here
    (as its GPU memory is not), and the plan says so.
    """
    res = plan.resources
    if res is None or not runs_locally(plan.spec) or (res.gpus and not local_gpus(plan.device)):
        return []
    have = {"CPU": local_ray_cpus(plan.spec, res.stages, res.replicas), "GPU": local_gpus(plan.device)}
    return [f"{line} on this machine (a local Ray); lower run.replicas or run.stages, or use a cluster (run.address)"
            for line in missing_resources(res, have)]


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def target_device(spec: JobSpec) -> str:
    device = spec.model.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _budgets(spec: JobSpec, n_stages: int, device: str) -> tuple[list[int | None], int | None, str]:
    """Memory per stage (or shared by all, on one CPU machine) and where the figure comes from."""
    given = spec.run.memory_gib
    if given is not None:
        values = list(given) if isinstance(given, (list, tuple)) else [given] * n_stages
        return [int(v * GIB) for v in values], None, "run.memory_gib"
    address = spec.run.address or os.environ.get("RAY_ADDRESS")
    if address:
        return [None] * n_stages, None, "not checked: a cluster's memory is unknown here; set run.memory_gib"
    if device == "cuda":
        if not torch.cuda.is_available():
            return [None] * n_stages, None, "not checked: no GPU here; set run.memory_gib"
        count = torch.cuda.device_count()
        if count < n_stages:
            raise PlanDoesNotFitError(f"run.stages is {n_stages} but this machine has {count} GPU(s), one per stage; "
                                      "use fewer stages, or a cluster (run.address) with more GPUs")
        props = [torch.cuda.get_device_properties(i) for i in range(n_stages)]
        return [p.total_memory for p in props], None, f"GPU memory ({props[0].name})"
    return [None] * n_stages, int(psutil.virtual_memory().available), "this machine's available memory"


def planning_checkpoint(spec: JobSpec) -> Checkpoint:
    """The checkpoint directory; only config.json is needed (no weights, no tokenizer).

    A hub name resolves through the Hugging Face cache (config and tokenizer files only).
    """
    directory = spec.resolve(spec.model.path)
    revision = None
    if not directory.is_dir() and looks_like_hub_name(spec.model.path):
        directory, revision = checkpoint_directory(spec.model, spec.base_dir, weights=False)
    if not (directory / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"no config.json in {directory}: planning needs a local directory with the model's config.json "
            "(weights and tokenizer are optional), e.g. jobs/configs/gpt-j-6b, or a hub name"
        )
    ckpt = Checkpoint(directory, spec.model, revision)
    architecture_for(ckpt.config.model_type)
    return ckpt


def missing_tensors(ckpt: Checkpoint, shape: ModelShape, stage: StagePlan) -> list[str]:
    """Checkpoint tensor names a stage loads that are not in the files (headers only)."""
    arch = ckpt.arch
    wanted = [f"{arch.base}.{arch.blocks}.{i}.{n}" for i in range(stage.start, stage.stop) for n in shape.block_names]
    if stage.embed:
        wanted += [f"{arch.base}.{arch.embed}.{n}" for n in shape.embed_names]
    if stage.final_norm:
        wanted += [f"{arch.base}.{arch.final_norm}.{n}" for n in shape.final_names]
    available = ckpt.available_keys()
    missing = [k for k in wanted if ckpt.resolve_key(k, available) is None]
    if stage.unembed:  # under its own name, a file alias (NeoX: embed_out), or tied to the embedding
        tied = getattr(ckpt.config, "tie_word_embeddings", False)
        for n in shape.unembed_names:
            names = [f"{arch.unembed}.{n}"] + [f"{alias}.{n}" for alias in arch.unembed_file_aliases]
            if not any(k in available for k in names) and not (tied and n == "weight"):
                missing.append(names[0])
    return missing


# --- printing -------------------------------------------------------------------------------------------

def plan_units(plan: Plan) -> list[tuple[int, int]]:
    """The job's units of work (``harvest.shape.unit_bounds``), each batch taken at the most rows one holds.

    Exact when every batch captures as many rows (``positions: last``, full windows); otherwise a guide.
    """
    w = plan.work
    k = np.arange(1, w.n_batches + 1)
    ends = {"token": np.minimum(k * w.rows_per_batch, w.n_rows), "sequence": np.minimum(k * w.batch_size, w.n_sequences)}
    bounds = unit_bounds(ends, [(a.point.axis, a.shard_rows, a.shape[0]) for a in plan.arrays])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def format_replicas(plan: Plan) -> list[str]:
    """Replicas x stages, what they ask of Ray here, and the units the replicas share."""
    spec = plan.spec
    res = plan.resources or local_resources(spec, plan.device)
    units = plan_units(plan)
    largest = max((b - a for a, b in units), default=0)
    lines = [f"{res.replicas} replica(s) x {len(plan.stages)} stage(s) = {res.actors} "
             f"{'process (no Ray)' if res.in_process else 'Ray stage actor(s)'}, asking for {res.describe()}"
             + (" (run.replicas: auto, resolved on this machine)" if spec.run.replicas == "auto" else ""),
             *(["  placement not checked: no GPU on this machine (a plan for another one)"]
               if res.gpus and runs_locally(spec) and not local_gpus(plan.device) else []),
             f"  units of work (runs of batches owning whole shards of every array, handed to replicas one at a time): "
             f"{len(units)}, the largest {largest} batch(es)"]
    if any(batch_rows(plan.work, a.point.axis) is None for a in plan.arrays):
        lines.append("  shards of the token arrays cannot be sized in whole batches: batches capture different numbers "
                     "of token rows (sequences of different lengths, captured at every position), so units end only "
                     "where their shard ends meet batch ends")
    if res.replicas > 1 and len(units) < 2 * res.replicas:
        lines.append(f"  note: {len(units)} unit(s) for {res.replicas} replicas: shards span many batches, so some "
                     "replicas idle; smaller shards (store.chunk_mib, store.chunks_per_shard) or a run.batch_size "
                     "whose rows fill whole shards give more units")
    return lines


def format_plan(plan: Plan) -> str:
    s, spec, w = plan.shape, plan.spec, plan.work
    quant = spec.model.quantization or "none"
    lines = [
        f"plan for {spec.name}: {s.model_type}, {s.n_layers} layers, d_model {s.d_model}, {s.n_heads} heads, "
        f"d_mlp {s.d_mlp}, {s.total_params / 1e9:.2f} B parameters, of which the unembedding ({s.unembed_params / 1e9:.2f} B) "
        f"runs only for capture.top_k (config: {plan.directory / 'config.json'})",
        f"compute: {spec.model.dtype}, quantization {quant}, on {plan.device}; weight files: "
        f"{s.file_dtype or 'unknown dtype'}",
        f"prompts: {w.n_sequences} sequences of up to {w.max_len} tokens, {w.n_rows} captured rows, "
        f"{w.n_batches} micro-batches of {w.batch_size}"
        + (f" (ESTIMATE: {w.estimated})" if w.estimated else ""),
        "",
        f"{len(plan.stages)} stage(s); memory budget: {plan.budget_source}",
        f"  {'stage':<6}{'runs':<28}{'params':>9}{'weights':>11}{'activ.':>11}{'capture':>11}{'process':>10}"
        f"{'peak':>11}{'budget':>11}{'hooks':>7}{'GFLOP/tok':>11}",
    ]
    for e in plan.stages:
        lines.append(
            f"  {e.plan.index:<6}{e.plan.describe():<28}{e.params / 1e6:>8.0f}M{human(e.weights):>11}"
            f"{human(e.activations):>11}{human(e.capture):>11}{human(e.process):>10}{human(e.peak):>11}"
            f"{(human(e.budget) if e.budget else '-'):>11}{len(e.plan.hooks):>7}{e.flops_per_token / 1e9:>11.2f}"
        )
    if plan.device == "cuda":
        lines.append("  (peak = GPU memory; host memory per stage: "
                     + ", ".join(human(e.host) for e in plan.stages) + ")")
    if plan.driver:
        lines.append(f"  driver + hidden states in flight or kept until durable (Ray object store): {human(plan.driver)}")
    if plan.shared_budget is not None:
        lines.append(f"  all together: {human(plan.total_memory)} of {human(plan.shared_budget)}")
    lines += ["", f"store: {len(plan.arrays)} arrays, {human(plan.bytes_per_token)} per captured token, "
                  f"{human(plan.store_bytes)} in all (before compression: {spec.store.compressor})"]
    # the plan knows bytes per token but neither the tokens/s the device will reach nor the target's write
    # speed, so it states the bandwidth per rate and warns of nothing (bench/writer_throughput.py measures a target)
    per_10k = plan.bytes_per_token * 1e4 / 1e9
    lines.append(f"  write bandwidth needed: {per_10k:.2f} GB/s per 10k captured tokens/s "
                 f"(bytes per token x tokens/s; store.fsync: {spec.store.fsync}, store.direct_io: "
                 f"{str(spec.store.direct_io).lower()})")
    groups: dict[tuple, list[ArrayPlan]] = {}
    for a in plan.arrays:
        groups.setdefault((a.shape[1:], a.chunk_rows, a.shard_rows), []).append(a)
    for (row, chunk, shard), members in groups.items():
        a = members[0]
        lines.append(f"  {len(members):>4} x {a.point.axis} x {'x'.join(map(str, row))}: chunks of {chunk} rows "
                     f"({human(chunk * a.row_bytes)}), shards of {shard} rows ({human(a.shard_bytes)}), "
                     f"{a.n_shards} shard file(s) each")
    lines.append(f"  files: {plan.n_files} for the activations (shards + metadata), plus ~{2 * 12} for row maps, "
                 "LayerNorms, tokenizer and progress")
    lines += [""] + format_replicas(plan)
    if plan.speed is not None:
        lines += [""] + plan.speed.lines()
    lines.append("")
    lines += [f"DOES NOT FIT: {p}" for p in plan.problems] or ["fits: yes"]
    return "\n".join(lines)
