"""Run a job spec: plan it, create or resume its store, drive the stages, report.

``prepare`` does everything that can fail because of the user's input (spec, checkpoint,
hooks, prompts, context length, an existing store) before anything is written, so bad input
never leaves a half-claimed store behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import transformers
import zarr
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from sharding.plan import partition_stages

from ._version import __version__
from .checkpoint import TOKENIZER_FILES, Checkpoint, resolve_checkpoint
from .errors import (FingerprintMismatchError, HarvestError, Interrupted, ModelError, SpecError, StoreError,
                     StoreExistsError)
from .hookpoints import HookPoint, split_name
from .layout import Layout
from .objstore import check_access, is_url
from .prompts import build_source, pad_meta
from .quantize import check_quantization
from .redo import check_redo
from .redo import redo_rows as redo
from .shape import (ArrayPlan, ModelDims, StagePlan, array_plans, job_hooks, job_units, layers_needed, single_stage,
                    store_dtype_for, workload_of)
from .spec import JobSpec
from .stage import check_tensors
from .statistics import THRESHOLD, TOP_K, HitPlan, StatisticsPlan, dettmers_sources, statistics_hooks
from .store import (FORMAT_VERSION, MetaArray, RowMaps, batches_done, consolidate, create_manifest, dumps,
                    first_incomplete, mark_written)
from .store import create_store as create_store_layout
from .store import (STATISTICS_GROUP, is_store, location_exists, open_group, read_provenance, remove_store, statistics_stages,
                    undone_units, write_provenance)
from .worker import StageOptions, StageWorker
from .writer import StageStoreInfo

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A validated, planned job: what will be computed and where every row goes."""

    spec: JobSpec
    ckpt: Checkpoint
    hooks: list[HookPoint]
    layout: Layout
    source: Any
    stages: list[StagePlan]
    store_dtype: str
    arrays: list[ArrayPlan]  #: the activation arrays, as ``harvest.shape`` lays them out
    fingerprint_fields: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(dumps(self.fingerprint_fields).encode()).hexdigest()

    @property
    def path(self) -> Path | str:
        """A local path, or a URL string on object storage (``harvest.objstore``)."""
        return self.spec.store_path()

    def stage_info(self, stage: StagePlan) -> StageStoreInfo:
        return StageStoreInfo(
            path=str(self.path), stage=stage.index,
            arrays=tuple((p.name, p.axis) for p in stage.hooks),
            batch_ends={"token": self.layout.batch_ends("token"), "sequence": self.layout.batch_ends("sequence")},
            batch_starts={"token": np.concatenate([[0], self.layout.batch_ends("token")[:-1]]),
                          "sequence": np.concatenate([[0], self.layout.batch_ends("sequence")[:-1]])},
            on_nonfinite=self.spec.capture.on_nonfinite,
            compute_dtype=self.spec.model.dtype, store_dtype=self.store_dtype,
            fsync=self.spec.store.fsync, direct_io=self.spec.store.direct_io, engine=self.spec.store.writer,
            storage_options=dict(self.spec.store.storage_options),
            statistics=StatisticsPlan(tuple(h for h in self.statistics if stage_runs(stage, h)),
                                      TOP_K, THRESHOLD, self.layout.token_starts(), self.hit_plan(stage),
                                      tuple(int(b) for b in self.unit_bounds))
            if self.spec.capture.statistics else None,
            compacts=stage.index == len(self.stages) - 1,
        )

    @property
    def unit_bounds(self) -> list[int]:
        """First batch of every unit, and the batch count: replicas' units, and the statistics' (any R)."""
        units = job_units(self.layout, self.arrays)
        return [a for a, _ in units] + [units[-1][1] if units else 0]

    def hit_plan(self, stage: StagePlan) -> HitPlan | None:
        """This stage's share of Dettmers' criterion (``harvest.hits``): the LayerNorms feeding linear
        layers of every captured layer it runs, stored or not."""
        sources = dettmers_sources(self.ckpt.config.model_type, self.hooks)
        if not sources:
            return None
        return HitPlan(tuple(s for s in sources if stage.start <= split_name(s)[1] < stage.stop), THRESHOLD,
                       stage.index == stage.n_stages - 1, int(self.ckpt.config.hidden_size))

    def stage_options(self) -> StageOptions:
        spec = self.spec
        return StageOptions(compute_dtype=spec.model.dtype, store_dtype=self.store_dtype, device=spec.model.device,
                            heads=spec.capture.heads, neurons=spec.capture.neurons, threads=spec.run.threads,
                            write_queue=spec.run.write_queue, top_k=spec.capture.top_k,
                            write_threads=spec.run.write_threads, statistics=self.statistics)

    @property
    def statistics(self) -> tuple[str, ...]:
        """Hooks with harvest-time statistics (``capture.statistics``), in forward order."""
        return job_statistics(self.spec, self.ckpt, self.hooks)


def job_statistics(spec: JobSpec, ckpt: Checkpoint, hooks: list[HookPoint]) -> tuple[str, ...]:
    return statistics_hooks(spec.capture.statistics, hooks, ckpt.arch, ckpt.n_layers,
                            layers_needed(hooks, ckpt.n_layers))


def stage_runs(stage: StagePlan, name: str) -> bool:
    """Whether ``stage`` computes hook point ``name`` (stored by it or not)."""
    if any(p.name == name for p in stage.hooks):
        return True
    template, layer = split_name(name)
    return stage.embed if template == "hook_embed" else layer is not None and stage.start <= layer < stage.stop


def prepare(spec: JobSpec) -> Job:
    """Resolve and validate everything; write nothing."""
    ckpt = resolve_checkpoint(spec.model, spec.base_dir)
    config, arch = ckpt.config, ckpt.arch
    hooks = job_hooks(spec, arch, ckpt.n_layers)
    job_statistics(spec, ckpt, hooks)  # a bad capture.statistics fails before any store
    check_selection(spec, ckpt)
    check_quantization(spec.model.quantization, hooks)
    if not ckpt.tokenizer_files():
        # transformers would build an empty tokenizer and every text would become [] (GOTCHAS.md)
        raise ModelError(f"no tokenizer in {ckpt.directory}: none of {', '.join(TOKENIZER_FILES)} is there; "
                         "copy the model's tokenizer files into that directory")
    tokenizer = AutoTokenizer.from_pretrained(ckpt.directory)
    source = build_source(spec.prompts, base_dir=spec.base_dir, tokenizer=tokenizer)
    prompts = list(source.prompts())
    layout = Layout(prompts, spec.capture.positions, spec.run.batch_size)
    if layout.max_len > ckpt.n_ctx:
        longest = int(np.argmax(layout.lengths))
        raise SpecError(
            f"prompt {longest} has {layout.max_len} tokens, longer than the model's context of {ckpt.n_ctx} "
            "(max_position_embeddings); shorten prompts.seq_len or the template"
        )
    if spec.run.stages == 1:
        stages = [single_stage(hooks, ckpt.n_layers)]
    else:
        stages = partition_stages(ckpt, hooks, spec, layout=layout)
    if spec.run.stages == 1:  # (partition_stages checks a pipeline's stages)
        check_tensors(ckpt, stages)  # a missing tensor fails here, not after the store is laid out
    arrays = array_plans(hooks, ModelDims.of(config, arch), spec, workload_of(layout))
    job = Job(spec, ckpt, hooks, layout, source, stages, store_dtype_for(spec.model.dtype, spec.capture.dtype), arrays)
    job.fingerprint_fields = _fingerprint_fields(job, tokenizer)
    return job


def check_selection(spec: JobSpec, ckpt: Checkpoint) -> None:
    """capture.layers, heads and neurons against the model's config (no weights needed)."""
    config, arch = ckpt.config, ckpt.arch
    if spec.capture.layers is not None and spec.capture.layers[-1] >= ckpt.n_layers:
        raise SpecError(f"capture.layers includes {spec.capture.layers[-1]}, but the model has {ckpt.n_layers} layers")
    _check_index("heads", spec.capture.heads, config.num_attention_heads)
    _check_index("neurons", spec.capture.neurons, arch.d_mlp(config))


def _check_index(name: str, values: tuple[int, ...] | None, size: int) -> None:
    if values is not None and values[-1] >= size:
        raise SpecError(f"capture.{name} includes {values[-1]}, but the model has {size} {name} (0..{size - 1})")


def _fingerprint_fields(job: Job, tokenizer) -> dict[str, str]:
    """Everything that determines the stored bytes, one hash per field so a mismatch can be named.

    The stage count and thread count are not in it: they change who computes a row, not its bytes.
    """
    spec = job.spec
    capture = spec.to_dict()["capture"]
    capture.pop("statistics")  # kept beside the rows, not in them: a resume decides (``continue_statistics``)
    capture["hooks"] = [p.name for p in job.hooks]
    capture["store_dtype"] = job.store_dtype
    fields = {
        "model weights": job.ckpt.identity(),
        "model dtype": spec.model.dtype,
        "quantization": spec.model.quantization,
        "prompts": {"spec": job.source.resolved_config(), "inputs": job.source.fingerprint_inputs()},
        "tokenizer": [hashlib.sha256(f.read_bytes()).hexdigest() for f in job.ckpt.tokenizer_files()],
        "capture": capture,
        "batch size": spec.run.batch_size,
        # fsync and direct_io change when bytes reach the disk, not which: a resume may change them
        "store layout": {k: v for k, v in spec.to_dict()["store"].items()
                         if k not in ("path", "root", "fsync", "direct_io", "storage_options") and (k, v) != ("writer", "shards")},
        "format version": FORMAT_VERSION,
    }
    return {k: hashlib.sha256(dumps(v).encode()).hexdigest()[:16] for k, v in fields.items()}


# --- store creation ---------------------------------------------------------------------------------

def create_store(job: Job) -> None:
    """Lay out the job's store: empty activation arrays, row maps, metadata, LayerNorms, tokenizer."""
    spec, layout = job.spec, job.layout
    rows = RowMaps(layout.tokens, layout.seq, layout.pos, layout.input_ids, layout.lengths.astype(np.int32))
    meta = {name: MetaArray(np.stack([pad_meta(p.meta[name], field_spec) for p in layout.prompts]),
                            field_spec.dims, field_spec.description)
            for name, field_spec in job.source.meta_fields().items()}
    create_store_layout(job.path, _provenance(job, status="running"), job.arrays, rows,
                        compressor=spec.store.compressor, level=spec.store.level, n_stages=len(job.stages),
                        n_batches=layout.n_batches, meta=meta, layer_norms=_layer_norms(job),
                        tokenizer_files=job.ckpt.tokenizer_files())


def _layer_norms(job: Job) -> dict[str, np.ndarray]:
    """LayerNorm weights per layer, so analyses can undo or apply them without the model."""
    ckpt, arch = job.ckpt, job.ckpt.arch
    available = ckpt.available_keys()
    names: dict[str, list[str]] = {}
    for short, module in arch.layer_norms.items():
        for part in ("weight", "bias"):
            names[f"{short}.{part[0]}"] = [f"{arch.base}.{arch.blocks}.{i}.{module}.{part}" for i in range(ckpt.n_layers)]
    for part in ("weight", "bias"):
        names[f"ln_final.{part[0]}"] = [f"{arch.base}.{arch.final_norm}.{part}"]
    resolved = {out: [ckpt.resolve_key(k, available) for k in keys] for out, keys in names.items()}
    tensors = ckpt.load_tensors({k for keys in resolved.values() for k in keys if k})
    out = {}
    for name, keys in resolved.items():
        if all(keys):
            stacked = np.stack([tensors[k].float().numpy() for k in keys])
            out[name] = stacked[0] if name.startswith("ln_final") else stacked
    return out


def _provenance(job: Job, status: str) -> dict[str, Any]:
    spec = job.spec
    return {
        "format_version": FORMAT_VERSION,
        "status": status,
        "spec": spec.to_dict(),
        "fingerprint": job.fingerprint,
        "fingerprint_fields": job.fingerprint_fields,
        "model": {
            "path": str(job.ckpt.directory), "name": spec.model.path,
            "revision": job.ckpt.revision or spec.model.revision,  # a hub snapshot's commit hash
            "model_type": job.ckpt.config.model_type, "config": job.ckpt.config.to_diff_dict(),
            "dtype": spec.model.dtype, "quantization": spec.model.quantization,
            "weights": job.ckpt.identity(),
        },
        "store_dtype": job.store_dtype,
        "hooks": [p.name for p in job.hooks],
        "selection": {"heads": list(spec.capture.heads) if spec.capture.heads else None,
                      "neurons": list(spec.capture.neurons) if spec.capture.neurons else None,
                      "positions": spec.capture.positions.to_yaml()},
        "prompts": job.source.resolved_config(),
        "layout": {"n_rows": job.layout.n_rows, "n_sequences": job.layout.n_sequences,
                   "n_batches": job.layout.n_batches, "batch_size": job.layout.batch_size,
                   "max_len": job.layout.max_len},
        "stages": [{"index": s.index, "blocks": [s.start, s.stop], "embed": s.embed, "final_norm": s.final_norm,
                    "hooks": len(s.hooks)} for s in job.stages],
        "software": {"harvest": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def claim_store(job: Job, *, resume: bool, overwrite: bool) -> int:
    """Create, replace or reopen the store; returns the first batch still to compute."""
    path = job.path
    if not location_exists(path):
        create_store(job)
        return 0
    if not is_store(path):
        raise StoreExistsError(f"{path} exists and is not a harvest store; choose another store.path")
    if overwrite:
        open_group(path)  # refuse to delete something that is not a harvest store
        remove_store(path)
        create_store(job)
        return 0
    info = read_provenance(open_group(path))  # read-only until the store is ours to continue
    if not resume:
        raise StoreExistsError(
            f"a store already exists at {path} (status: {info.get('status')}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    if info.get("status") == "creating":  # died while laying out arrays: nothing computed yet
        remove_store(path)
        create_store(job)
        return 0
    _check_fingerprint(info, job, path)
    group = open_group(path, mode="r+")
    job.arrays = stored_layout(job.arrays, group)
    n_stages_before = len(info.get("stages", []))
    start = continue_statistics(job, info, group, first_incomplete(group),
                                same_stages=n_stages_before == len(job.stages))
    if n_stages_before != len(job.stages):
        # a different partition owns different arrays; restart from the common durable prefix
        create_manifest(group, len(job.stages), job.layout.n_batches)
        for i in range(len(job.stages)):
            mark_written(group, i, start)
    info.pop("stopped", None)
    info.update(status="running", stages=_provenance(job, "running")["stages"])
    write_provenance(group, info)
    return start


def continue_statistics(job: Job, info: dict[str, Any], group, start: int, *, same_stages: bool) -> int:
    """Decide how a resumed run continues harvest-time statistics; never let them cover part of a job
    silently. Returns the batch the run starts at.

    Statistics (``capture.statistics``) are kept per unit of work, each from nothing, and folded in unit
    order (``harvest.statistics``): any ``run.replicas`` continues them as they are. Another ``run.stages``
    keeps every unit all the old stages finished (folded into the prefix snapshot) and restarts at the
    first unit that is not (its rows are rewritten whole shards at a time, so the store does not change).
    Only other statistics (``capture.statistics`` changed) cannot continue: the resume still goes on,
    since the activations do not depend on them, but without statistics: the snapshots so far are
    deleted, the provenance records why and from which batch, and the analyses scan the stored rows
    instead. A store that began without statistics cannot gain them mid-job either.
    """
    from .statistics import compact_statistics

    before = ((info.get("spec") or {}).get("capture") or {}).get("statistics") or False
    wanted = job.spec.to_dict()["capture"]["statistics"] or False
    if start == 0 or before == wanted:
        if start == 0 and before != wanted:  # nothing computed yet: the new run starts its own
            if STATISTICS_GROUP in group:
                del group[STATISTICS_GROUP]
            info.setdefault("spec", {}).setdefault("capture", {})["statistics"] = wanted
        elif wanted:
            through = compact_statistics(group)  # with the manifest of the stages that wrote the snapshots
            if not same_stages:
                for stage in statistics_stages(group):  # another partition cannot continue their units
                    del group[f"{STATISTICS_GROUP}/stage_{stage}"]
                if through < start:
                    log.info("run.stages changed: %s restarts at batch %d, the end of the statistics every stage "
                             "finished (batch %d was next)", job.path, through, start)
                start = min(start, through)
        return start
    if before:
        why = "capture.statistics changed"
        if STATISTICS_GROUP in group:
            del group[STATISTICS_GROUP]
        info["statistics_dropped"] = {"batch": start, "reason": why}
        log.warning("harvest-time statistics dropped at batch %d of %s: %s; the analyses will scan the stored rows",
                    start, job.path, why)
    else:
        log.info("no harvest-time statistics for %s: it began without them at batch 0", job.path)
    job.spec = dataclasses.replace(job.spec, capture=dataclasses.replace(job.spec.capture, statistics=False))
    info.setdefault("spec", {}).setdefault("capture", {})["statistics"] = False
    return start


def stored_layout(arrays: list[ArrayPlan], group) -> list[ArrayPlan]:
    """The arrays with the chunk and shard rows the store was laid out with.

    A store keeps the layout it was created with: one made before shards were sized in whole batches
    (``harvest.shape.chunk_layout``) is continued in its own layout, and the units replicas are handed
    (``harvest.shape.job_units``) follow its shards, not the ones a new store would get.
    """
    out = []
    for a in arrays:
        arr = group[a.point.name]
        out.append(dataclasses.replace(a, chunk_rows=int(arr.chunks[0]), shard_rows=int((arr.shards or arr.chunks)[0])))
    return out


def _check_fingerprint(info: dict[str, Any], job: Job, path: Path) -> None:
    if info.get("fingerprint") == job.fingerprint:
        return
    before, now = info.get("fingerprint_fields", {}), job.fingerprint_fields
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    keys = changed_keys(info.get("spec") or {}, job.spec.to_dict())
    what = f"{', '.join(keys or differ) or 'format'} differ"  # spec keys when the spec says which
    raise FingerprintMismatchError(
        f"cannot resume {path}: it was written by a different job ({what}). "
        "Resuming would mix two jobs' rows; use --overwrite to start again, or a new store.path"
    )


#: spec keys that change who computes a row or where the store is, not the stored bytes
_NOT_FINGERPRINTED = {"name", "store.path", "store.root", "store.storage_options", "model.device", "model.hash_weights", "run.stages",
                      "run.threads", "run.write_queue", "run.write_threads", "run.address", "run.max_in_flight",
                      "run.memory_gib", "run.max_restarts", "run.dashboard", "run.replicas",
                      "capture.statistics"}


def changed_keys(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted spec keys whose values differ between two resolved specs (``capture.hooks``), run-only keys left out."""
    out = []
    for key in sorted(set(before) | set(now)):
        name = f"{prefix}{key}"
        if name in _NOT_FINGERPRINTED:
            continue
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{name}.")
        elif dumps(a) != dumps(b):
            out.append(name)
    return out


# --- running -------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What one run did: ``batches`` and ``tokens`` count what it harvested, not the job's size (a
    resume counts only what was left)."""

    path: Path | str
    batches: int
    tokens: int
    seconds: float
    nonfinite: dict[str, int]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def run(spec: JobSpec, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        redo_rows: list[tuple[int, int]] | str | None = None) -> RunResult:
    """Harvest a job into its store (the library call behind ``harvest run``).

    ``redo_rows`` (with ``resume``): token row ranges to re-harvest first, e.g. those
    ``harvest verify`` names as damaged; see :mod:`harvest.redo`.
    """
    if is_url(spec.store_path()):  # a missing bucket or refused credentials fail here, before the model loads
        check_access(spec.store_path())
    job = prepare(spec)
    if redo_rows:  # rewrite the shards holding these rows, then continue as a resume
        redo_rows = check_redo(redo_rows, resume, job.layout.n_rows)  # before the store is touched
    start = claim_store(job, resume=resume, overwrite=overwrite)
    if redo_rows:
        redo(job, redo_rows, progress)
    todo = batches_to_harvest(job, start)
    t0 = time.perf_counter()
    try:
        if len(job.stages) == 1 and job.spec.run.replicas == 1:
            nonfinite = _run_in_process(job, start, progress)
        elif job.spec.run.replicas != 1:
            from sharding.replicas import run_replicas

            nonfinite = run_replicas(job, progress)
        else:
            # Ray (~30 MiB and a second of start-up) is imported by multi-stage jobs only
            from sharding.pipeline import run_pipeline

            nonfinite = run_pipeline(job, start, progress)
    except (Interrupted, KeyboardInterrupt) as exc:
        stopped = exc if isinstance(exc, Interrupted) else Interrupted(2)
        done = record_stop(job.path, "interrupted", f"stopped by {stopped.signal_name}")
        stopped.store, stopped.batches_done, stopped.n_batches = str(job.path), done, job.layout.n_batches
        if stopped is not exc:
            raise stopped from None
        raise
    except BaseException as exc:
        record_stop(job.path, "failed", describe_failure(exc))
        raise
    seconds = time.perf_counter() - t0
    batches = sum(b - a for a, b in todo)
    tokens = sum(job.layout.tokens_before(b) - job.layout.tokens_before(a) for a, b in todo)
    group = open_group(job.path, mode="r+")
    if job.spec.capture.statistics:
        from .statistics import compact_statistics

        compact_statistics(group)  # every unit into the one prefix snapshot
    info = read_provenance(group)
    info.pop("stopped", None)
    info.update(status="complete", completed=_now(),
                last_run={"batches": batches, "tokens": tokens, "seconds": round(seconds, 3)},
                nonfinite=nonfinite)
    write_provenance(group, info)
    consolidate(job.path)
    return RunResult(job.path, batches, tokens, seconds, nonfinite)


def batches_to_harvest(job: Job, start: int) -> list[tuple[int, int]]:
    """The batch ranges this run computes: one pipeline runs on from ``start``; replicas take every unit
    not yet whole, wherever it lies, so a resume of theirs can have holes before ``start`` to fill and
    finished units after it to skip."""
    if job.spec.run.replicas == 1:
        return [(start, job.layout.n_batches)] if start < job.layout.n_batches else []
    return undone_units(open_group(job.path), job_units(job.layout, job.arrays))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def describe_failure(exc: BaseException) -> str:
    """The reason a failed run records: our errors' own message, else the exception's type and message."""
    return str(exc) if isinstance(exc, HarvestError) else f"{type(exc).__name__}: {exc}"


def record_stop(path: Path | str, status: str, reason: str) -> int | None:
    """Mark a run that did not complete (``failed`` or ``interrupted``) with why and when; returns batches done.

    Best effort: the store may be what failed (a full disk), and the original error matters more.
    ``--resume`` continues such a store once the cause is fixed.
    """
    try:
        group = open_group(path, mode="r+")
        info = read_provenance(group)
        info.update(status=status, stopped={"reason": reason, "time": _now()})
        write_provenance(group, info)
        return int(batches_done(group).sum())
    except Exception:  # noqa: BLE001 - never hide the error that stopped the run
        return None


def _run_in_process(job: Job, start: int, progress: bool) -> dict[str, int]:
    stage = job.stages[0]
    worker = StageWorker(job.ckpt, stage, job.stage_options(), job.stage_info(stage), start)
    layout = job.layout
    bar = tqdm(total=layout.tokens_before(layout.n_batches), initial=layout.tokens_before(start),
               unit="tok", unit_scale=True, desc=f"harvest {job.spec.name}", disable=not progress)
    try:
        for k in range(start, layout.n_batches):
            batch = layout.batch(k)
            worker.process(batch, None)
            bar.update(int(batch.lengths.sum()))
        return worker.close()
    except (Interrupted, KeyboardInterrupt):
        # keep what was computed: the writer flushes every batch it was given, partial shards included,
        # and advances the manifest, so a resume redoes only the batch that was being computed
        try:
            worker.close()
        except Exception:  # noqa: BLE001 - the interrupt is what the user must hear about
            worker.abort()
        raise
    except BaseException:
        worker.abort()
        raise
    finally:
        bar.close()


__all__ = ["Job", "RunResult", "prepare", "run", "claim_store", "StoreError"]
