"""Run a job spec: plan it, create or resume its store, drive the stages, report.

``prepare`` does everything that can fail because of the user's input (spec, checkpoint,
hooks, prompts, context length, an existing store) before anything is written, so bad input
never leaves a half-claimed store behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checkpoint import Checkpoint, resolve_checkpoint
from .errors import FingerprintMismatchError, HarvestError, SpecError, StoreError, StoreExistsError
from .hookpoints import HookPoint, expand, topk_points
from .layout import Layout
from .prompts import build_source
from .spec import JobSpec
from .stage import StagePlan, store_dtype_for
from .store import (ATTRS_KEY, FORMAT_VERSION, create_activation_array, create_manifest, dumps, first_incomplete,
                    open_group, remove_store, write_files, write_small)
from .worker import StageOptions
from .writer import StageStoreInfo


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
    fingerprint_fields: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(dumps(self.fingerprint_fields).encode()).hexdigest()

    @property
    def path(self) -> Path:
        return self.spec.store_path()

    def array_shape(self, point: HookPoint) -> tuple[int, ...]:
        config = self.ckpt.config
        sizes = {
            "d_model": config.hidden_size,
            "d_head": config.hidden_size // config.num_attention_heads,
            "head": len(self.spec.capture.heads) if self.spec.capture.heads else config.num_attention_heads,
            "neuron": len(self.spec.capture.neurons) if self.spec.capture.neurons else self.ckpt.arch.d_mlp(config),
            "query": self.layout.max_len, "key": self.layout.max_len,
            "k": self.spec.capture.top_k,
        }
        lead = self.layout.n_rows if point.axis == "token" else self.layout.n_sequences
        return (lead, *(sizes[d] for d in point.dims[1:]))

    def stage_info(self, stage: StagePlan) -> StageStoreInfo:
        return StageStoreInfo(
            path=str(self.path), stage=stage.index,
            arrays=tuple((p.name, p.axis) for p in stage.hooks),
            batch_ends={"token": self.layout.batch_ends("token"), "sequence": self.layout.batch_ends("sequence")},
            batch_starts={"token": np.concatenate([[0], self.layout.batch_ends("token")[:-1]]),
                          "sequence": np.concatenate([[0], self.layout.batch_ends("sequence")[:-1]])},
            on_nonfinite=self.spec.capture.on_nonfinite,
            fsync=self.spec.store.fsync, direct_io=self.spec.store.direct_io, engine=self.spec.store.writer,
        )

    def stage_options(self) -> StageOptions:
        spec = self.spec
        return StageOptions(compute_dtype=spec.model.dtype, store_dtype=self.store_dtype, device=spec.model.device,
                            heads=spec.capture.heads, neurons=spec.capture.neurons, threads=spec.run.threads,
                            write_queue=spec.run.write_queue, top_k=spec.capture.top_k,
                            write_threads=spec.run.write_threads)


def single_stage(hooks: list[HookPoint], n_layers: int) -> StagePlan:
    """The whole needed part of the model as one stage: blocks past the last hook are not run."""
    return StagePlan(index=0, n_stages=1, start=0, stop=layers_needed(hooks, n_layers),
                     embed=True, final_norm=needs_final_norm(hooks), hooks=tuple(hooks), unembed=needs_unembed(hooks))


def needs_unembed(hooks: list[HookPoint]) -> bool:
    return any(p.template.startswith("unembed.") for p in hooks)


def needs_final_norm(hooks: list[HookPoint]) -> bool:
    return needs_unembed(hooks) or any(p.template == "ln_final.hook_normalized" for p in hooks)


def layers_needed(hooks: list[HookPoint], n_layers: int) -> int:
    if needs_final_norm(hooks):
        return n_layers
    return max((p.layer + 1 for p in hooks if p.layer is not None), default=0)


def prepare(spec: JobSpec) -> Job:
    """Resolve and validate everything; write nothing."""
    from transformers import AutoTokenizer

    ckpt = resolve_checkpoint(spec.model, spec.base_dir)
    config, arch = ckpt.config, ckpt.arch
    hooks = expand(list(spec.capture.hooks), arch, ckpt.n_layers,
                   list(spec.capture.layers) if spec.capture.layers is not None else None)
    if spec.capture.top_k:
        hooks += topk_points()
    if spec.capture.layers is not None and spec.capture.layers[-1] >= ckpt.n_layers:
        raise SpecError(f"capture.layers includes {spec.capture.layers[-1]}, but the model has {ckpt.n_layers} layers")
    _check_index("heads", spec.capture.heads, config.num_attention_heads)
    _check_index("neurons", spec.capture.neurons, arch.d_mlp(config))
    if spec.model.quantization:
        from sharding.quantize import check_quantization

        check_quantization(spec.model.quantization, hooks)
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
        from sharding.plan import partition_stages

        stages = partition_stages(ckpt, hooks, spec, layout=layout)
    job = Job(spec, ckpt, hooks, layout, source, stages, store_dtype_for(spec.model.dtype, spec.capture.dtype))
    job.fingerprint_fields = _fingerprint_fields(job, tokenizer)
    return job


def _check_index(name: str, values: tuple[int, ...] | None, size: int) -> None:
    if values is not None and values[-1] >= size:
        raise SpecError(f"capture.{name} includes {values[-1]}, but the model has {size} {name} (0..{size - 1})")


def _fingerprint_fields(job: Job, tokenizer) -> dict[str, str]:
    """Everything that determines the stored bytes, one hash per field so a mismatch can be named.

    The stage count and thread count are not in it: they change who computes a row, not its bytes.
    """
    spec = job.spec
    capture = spec.to_dict()["capture"]
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
                         if k not in ("path", "root", "fsync", "direct_io") and (k, v) != ("writer", "shards")},
        "format version": FORMAT_VERSION,
    }
    return {k: hashlib.sha256(dumps(v).encode()).hexdigest()[:16] for k, v in fields.items()}


# --- store creation ---------------------------------------------------------------------------------

def create_store(job: Job) -> None:
    import zarr

    spec, layout, path = job.spec, job.layout, job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    group.attrs[ATTRS_KEY] = _provenance(job, status="creating")
    for point in job.hooks:
        create_activation_array(
            group, point.name, job.array_shape(point), point.dims, point.dtype or job.store_dtype,
            chunk_mib=spec.store.chunk_mib, chunks_per_shard=spec.store.chunks_per_shard,
            compressor=spec.store.compressor, level=spec.store.level,
            attributes={"hook": point.template, "layer": point.layer,
                        **({"zero_past": "seq_length"} if point.axis == "sequence" else {})},
        )
    write_small(group, "tokens", layout.tokens, ("token",))
    write_small(group, "seq", layout.seq, ("token",))
    write_small(group, "pos", layout.pos, ("token",))
    write_small(group, "input_ids", layout.input_ids, ("sequence", "position"))
    write_small(group, "seq_length", layout.lengths.astype(np.int32), ("sequence",))
    _write_meta(group.require_group("meta"), job)
    _write_layer_norms(group.require_group("model"), job)
    write_files(group.require_group("tokenizer"), job.ckpt.tokenizer_files())
    create_manifest(group, len(job.stages), layout.n_batches)
    group.attrs[ATTRS_KEY] = _provenance(job, status="running")


def _write_meta(group, job: Job) -> None:
    from .prompts.base import pad_meta

    for name, field_spec in job.source.meta_fields().items():
        values = np.stack([pad_meta(p.meta[name], field_spec) for p in job.layout.prompts])
        write_small(group, name, values, ("sequence", *field_spec.dims), {"description": field_spec.description})


def _write_layer_norms(group, job: Job) -> None:
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
    for out, keys in resolved.items():
        if not all(keys):
            continue
        stacked = np.stack([tensors[k].float().numpy() for k in keys])
        if out.startswith("ln_final"):
            write_small(group, out, stacked[0], ("d_model",))
        else:
            write_small(group, out, stacked, ("layer", "d_model"))


def _provenance(job: Job, status: str) -> dict[str, Any]:
    import numcodecs
    import torch
    import transformers
    import zarr

    spec = job.spec
    return {
        "format_version": FORMAT_VERSION,
        "status": status,
        "spec": spec.to_dict(),
        "fingerprint": job.fingerprint,
        "fingerprint_fields": job.fingerprint_fields,
        "model": {
            "path": str(job.ckpt.directory), "name": spec.model.path, "revision": spec.model.revision,
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
    if not path.exists():
        create_store(job)
        return 0
    if not (path / "zarr.json").is_file():
        raise StoreExistsError(f"{path} exists and is not a harvest store; choose another store.path")
    if overwrite:
        open_group(path)  # refuse to delete something that is not a harvest store
        remove_store(path)
        create_store(job)
        return 0
    group = open_group(path, mode="r+")
    info = dict(group.attrs[ATTRS_KEY])
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
    n_stages_before = len(info.get("stages", []))
    start = first_incomplete(group)
    if n_stages_before != len(job.stages):
        # a different partition owns different arrays; restart from the common durable prefix
        create_manifest(group, len(job.stages), job.layout.n_batches)
        if start:
            for i in range(len(job.stages)):
                group[f"_progress/stage_{i}"][:start] = 1
    info.update(status="running", stages=_provenance(job, "running")["stages"])
    group.attrs[ATTRS_KEY] = info
    return start


def _check_fingerprint(info: dict[str, Any], job: Job, path: Path) -> None:
    if info.get("fingerprint") == job.fingerprint:
        return
    before, now = info.get("fingerprint_fields", {}), job.fingerprint_fields
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    raise FingerprintMismatchError(
        f"cannot resume {path}: it was written by a different job ({', '.join(differ) or 'format'} differ). "
        "Resuming would mix two jobs' rows; use --overwrite to start again, or a new store.path"
    )


# --- running -------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    path: Path
    batches: int
    tokens: int
    seconds: float
    nonfinite: dict[str, int]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def run(spec: JobSpec, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Harvest a job into its store (the library call behind ``harvest run``)."""
    job = prepare(spec)
    start = claim_store(job, resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    if len(job.stages) == 1:
        nonfinite = _run_in_process(job, start, progress)
    else:
        from sharding.pipeline import run_pipeline

        nonfinite = run_pipeline(job, start, progress)
    seconds = time.perf_counter() - t0
    tokens = int(job.layout.lengths[job.layout.batch_sequences(start)[0]:].sum()) if start < job.layout.n_batches else 0
    group = open_group(job.path, mode="r+")
    info = dict(group.attrs[ATTRS_KEY])
    info.update(status="complete", completed=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                last_run={"batches": job.layout.n_batches - start, "tokens": tokens, "seconds": round(seconds, 3)},
                nonfinite=nonfinite)
    group.attrs[ATTRS_KEY] = info
    return RunResult(job.path, job.layout.n_batches - start, tokens, seconds, nonfinite)


def _run_in_process(job: Job, start: int, progress: bool) -> dict[str, int]:
    from tqdm.auto import tqdm

    from .worker import StageWorker

    stage = job.stages[0]
    worker = StageWorker(job.ckpt, stage, job.stage_options(), job.stage_info(stage), start)
    layout = job.layout
    bar = tqdm(total=int(layout.lengths.sum()), initial=int(layout.lengths[:layout.batch_sequences(start)[0]].sum())
               if start < layout.n_batches else int(layout.lengths.sum()),
               unit="tok", unit_scale=True, desc=f"harvest {job.spec.name}", disable=not progress)
    try:
        for k in range(start, layout.n_batches):
            batch = layout.batch(k)
            worker.process(batch, None)
            bar.update(int(batch.lengths.sum()))
        return worker.close()
    except BaseException:
        worker.abort()
        raise
    finally:
        bar.close()


def describe_failure(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HarvestError) else f"{type(exc).__name__}: {exc}"


__all__ = ["Job", "RunResult", "prepare", "run", "claim_store", "StoreError"]
