"""Re-harvest chosen token rows of a store in place: the repair ``harvest verify`` prescribes.

``harvest run SPEC --resume --redo-rows A:B[,C:D...]`` recomputes the batches that cover rows A:B
and rewrites, in every activation array, the shards that hold any of those rows; every other file
of the store is left as it is, and the store ends byte-identical to an uninterrupted run.

Why whole shards, recomputed: a shard is one file written by one writer (zarr would otherwise read
the old, possibly damaged, shard back to merge into it), so a repair rewrites whole shards. Their
other rows are *recomputed*, not read back: a shard next to the damage may itself be unreadable,
and recomputing makes the result depend only on the spec, as a fresh run does. So the batches run
are those covering, in each array, the shards that overlap the asked rows (rounded out to whole
batches); rows computed for one array's shard but outside another array's rewritten shards are
dropped for that array. Shard boundaries differ between arrays (their rows differ in bytes), which
is why the batch range is the union over arrays, taken once (not closed under shard overlap, which
could spread over the whole store).

The repair runs in this process as a single stage with every hook point (the stage count does not
change the stored bytes; see the fingerprint), through the same ``ArrayWriter`` a run writes with.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import NonFiniteActivationError, SpecError
from .objstore import is_url, join, remove_objects
from .shape import single_stage
from .shards import ChunkGrid
from .stage import Stage, resolve_device
from .store import open_group
from .writer import ArrayWriter, EventLoops, _explain

#: a planned job (:class:`harvest.runner.Job`); named, not imported, since the runner calls this module
Job = Any


def parse_rows(text: str, n_rows: int | None = None) -> list[tuple[int, int]]:
    """``"A:B,C:D"`` -> ``[(A, B), (C, D)]``: token rows, end exclusive; a one-line error otherwise."""
    ranges = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise SpecError(f"--redo-rows takes token row ranges A:B (end exclusive), comma-separated, "
                            f"e.g. 0:512,2048:4096; got {part!r}") from None
        if not 0 <= a < b:
            raise SpecError(f"--redo-rows {part}: a range A:B needs 0 <= A < B")
        if n_rows is not None and b > n_rows:
            raise SpecError(f"--redo-rows {part}: the store has {n_rows} token rows (0:{n_rows})")
        ranges.append((a, b))
    return ranges


def check_redo(rows: str | list[tuple[int, int]], resume: bool, n_rows: int) -> list[tuple[int, int]]:
    """The ranges of ``--redo-rows``, checked against the job's rows; it needs ``--resume``."""
    if not resume:
        raise SpecError("--redo-rows repairs an existing store: give --resume with it")
    return parse_rows(rows if isinstance(rows, str) else ",".join(f"{a}:{b}" for a, b in rows), n_rows)


@dataclass(frozen=True)
class Target:
    """Rows [start, stop) of one array to rewrite: whole shards."""

    array: str
    axis: str  #: "token" | "sequence"
    start: int
    stop: int


@dataclass
class RedoPlan:
    batches: list[int]
    targets: list[Target]

    @property
    def rows(self) -> int:
        return sum(t.stop - t.start for t in self.targets if t.axis == "token")


def plan_redo(job: Job, ranges: list[tuple[int, int]], shard_rows: dict[str, int]) -> RedoPlan:
    """Which batches to recompute and which shards of which arrays to rewrite.

    ``shard_rows``: array name -> rows (or sequences) per shard along its leading axis.
    """
    layout = job.layout
    targets: set[Target] = set()
    batches: set[int] = set()
    for a, b in ranges:
        s0, s1 = int(layout.seq[a]), int(layout.seq[b - 1]) + 1
        for point in job.hooks:
            lo, hi = (a, b) if point.axis == "token" else (s0, s1)
            size = shard_rows[point.name]
            n = layout.n_rows if point.axis == "token" else layout.n_sequences
            start, stop = lo // size * size, min(-(-hi // size) * size, n)
            targets.add(Target(point.name, point.axis, start, stop))
            seqs = (int(layout.seq[start]), int(layout.seq[stop - 1]) + 1) if point.axis == "token" else (start, stop)
            batches.update(range(seqs[0] // layout.batch_size, (seqs[1] - 1) // layout.batch_size + 1))
    return RedoPlan(sorted(batches), sorted(targets, key=lambda t: (t.array, t.start)))


def redo_rows(job: Job, ranges: list[tuple[int, int]], progress: bool = False) -> RedoPlan:
    """Recompute and rewrite the shards covering ``ranges`` (token rows); returns what was done."""
    ranges = check_redo(ranges, True, job.layout.n_rows)
    group = open_group(job.path, mode="r+")
    arrays = {p.name: group[p.name] for p in job.hooks}
    plan = plan_redo(job, ranges, {name: (arr.shards or arr.chunks)[0] for name, arr in arrays.items()})
    buffers = {t: np.zeros((t.stop - t.start, *arrays[t.array].shape[1:]), dtype=arrays[t.array].dtype)
               for t in plan.targets}

    options = job.stage_options()
    if options.threads:
        torch.set_num_threads(options.threads)
    stage = Stage(job.ckpt, single_stage(job.hooks, job.ckpt.n_layers), compute_dtype=options.compute_dtype,
                  store_dtype=getattr(torch, options.store_dtype), device=resolve_device(options.device),
                  heads=options.heads, neurons=options.neurons, top_k=options.top_k)
    by_array: dict[str, list[Target]] = {}
    for t in plan.targets:
        by_array.setdefault(t.array, []).append(t)
    for k in tqdm(plan.batches, desc=f"redo {job.spec.name}", unit="batch", disable=not progress):
        batch = job.layout.batch(k)
        _, captured = stage.run(batch, None)
        for name, targets in by_array.items():
            data = captured[name].detach().cpu().numpy()
            _check_finite(job, name, k, data)
            first = batch.rows[0] if targets[0].axis == "token" else batch.sequences[0]
            for t in targets:
                lo, hi = max(first, t.start), min(first + len(data), t.stop)
                if lo < hi:
                    part = data[lo - first: hi - first]
                    buffers[t][(slice(lo - t.start, hi - t.start), *(slice(0, n) for n in part.shape[1:]))] = part

    loops = EventLoops(_single_thread_pool())
    try:
        for t in plan.targets:
            arr = arrays[t.array]
            _remove_shards(job, arr, t)  # zarr would read the old (maybe damaged) shard back to merge into it
            writer = ArrayWriter(arr, t.start, loops)
            writer.append(t.start, buffers[t])
            writer.flush()
    except BaseException as exc:
        raise _explain(exc, str(job.path)) from None
    finally:
        loops.close()
    return plan


def _single_thread_pool():
    return ThreadPoolExecutor(1, thread_name_prefix="redo-io")


def _remove_shards(job: Job, arr, t: Target) -> None:
    grid = ChunkGrid.from_metadata(arr.metadata.to_dict())
    keys = [grid.key((i, *rest)) for i in range(t.start // grid.unit[0], -(-t.stop // grid.unit[0]))
            for rest in itertools.product(*(range(g) for g in grid.grid[1:]))]
    if is_url(job.path):  # a store in a bucket: delete the objects
        remove_objects(join(str(job.path), t.array), keys)
        return
    for key in keys:
        (job.path / t.array / key).unlink(missing_ok=True)


def _check_finite(job: Job, name: str, batch: int, data: np.ndarray) -> None:
    if job.spec.capture.on_nonfinite != "fail" or data.dtype.kind != "f" or np.isfinite(data).all():
        return
    raise NonFiniteActivationError(f"{int(data.size - np.isfinite(data).sum())} NaN/inf value(s) in {name}, batch "
                                   f"{batch}, while redoing rows; nothing of the store was rewritten")
