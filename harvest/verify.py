"""``harvest verify``: prove a store intact, or name every damaged chunk and how to repair it.

Every stored object of every array is read straight from disk (threads in parallel, no zarr decode)
and checked with :mod:`harvest.shards`: each shard index (its crc32c, its offsets and lengths inside
the file), each inner chunk's crc32c, and that every shard holding rows the progress manifest counts
as written is there. Each damage is reported with the token rows (or sequences) and the batches it
covers, and the repair: ``harvest run SPEC --resume --redo-rows A:B`` for activations, which
re-harvests only those batches.

Library use::

    from harvest.verify import verify_store
    report = verify_store("stores/demo.zarr")
    report.ok, print(report.format())
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptChunkError, StoreError
from .store import MANIFEST_GROUP, batches_done, open_group, read_provenance
from .shards import MISSING_CHUNK, MISSING_SHARD, ChunkGrid, ChunkProblem, check_shard

#: stores larger than this get a progress bar (when asked for one)
PROGRESS_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Damage:
    """One damaged chunk (or shard, or metadata file) of one array."""

    array: str
    file: str  #: the stored object, relative to the store
    what: str
    chunk: tuple[int, ...] | None = None  #: inner-chunk coordinates; None when the whole shard is unreadable
    axis: str | None = None  #: leading axis: "token", "sequence" or another (small arrays)
    span: tuple[int, int] | None = None  #: [start, stop) along the leading axis
    rows: tuple[int, int] | None = None  #: token rows [start, stop) covered
    batches: tuple[int, int] | None = None  #: batches [first, last] covered (inclusive)
    fix: str = ""

    def line(self) -> str:
        where = f"chunk {','.join(map(str, self.chunk))}" if self.chunk is not None else "shard"
        cover = []
        if self.axis == "sequence" and self.span:
            cover.append(f"sequences {self.span[0]}:{self.span[1]}")
        if self.rows:
            cover.append(f"token rows {self.rows[0]}:{self.rows[1]}")
        elif self.axis not in ("token", "sequence") and self.span:
            cover.append(f"{self.axis or 'axis 0'} {self.span[0]}:{self.span[1]}")
        if self.batches:
            b0, b1 = self.batches
            cover.append(f"batch {b0}" if b0 == b1 else f"batches {b0}-{b1}")
        return f"{self.array} {where} ({self.file}): {self.what}" + (f"; {', '.join(cover)}" if cover else "")


@dataclass
class VerifyReport:
    path: str
    arrays: int = 0
    objects: int = 0  #: shard / chunk files checked
    bytes_read: int = 0
    seconds: float = 0.0
    damages: list[Damage] = field(default_factory=list)
    spec_name: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damages

    def redo_rows(self) -> list[tuple[int, int]]:
        """Token-row ranges to re-harvest (merged), for every damaged activation chunk."""
        spans = sorted(d.rows for d in self.damages if d.rows and "--redo-rows" in d.fix)
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b) for a, b in merged]

    def repair_commands(self) -> list[str]:
        cmds = []
        rows = self.redo_rows()
        if rows:
            cmds.append(redo_command(rows, self.spec_name))
        for d in self.damages:
            if "--redo-rows" not in d.fix and d.fix not in cmds:
                cmds.append(d.fix)
        return cmds

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "arrays": self.arrays, "objects": self.objects,
                "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3),
                "damages": [{**asdict(d), "line": d.line()} for d in self.damages],
                "repair": self.repair_commands()}

    def format(self) -> str:
        rate = f", {self.bytes_read / 2**20 / self.seconds:,.0f} MiB/s" if self.seconds else ""
        head = (f"checked {self.arrays} arrays, {self.objects} files, {self.bytes_read / 2**20:,.1f} MiB "
                f"in {self.seconds:.2f} s{rate}")
        if self.ok:
            return f"{self.path}: intact ({head})"
        lines = [f"{self.path}: DAMAGED, {len(self.damages)} damaged chunk(s) ({head})"]
        lines += [f"damaged  {d.line()}" for d in self.damages]
        lines += [f"repair   {c}" for c in self.repair_commands()]
        return "\n".join(lines)


def redo_command(rows: list[tuple[int, int]], spec_name: str | None = None) -> str:
    ranges = ",".join(f"{a}:{b}" for a, b in rows)
    who = f"  (SPEC: the job spec of '{spec_name}')" if spec_name else ""
    return f"harvest run SPEC --resume --redo-rows {ranges}{who}"


# --- the store's row and batch maps ---------------------------------------------------------------

class RowMap:
    """Token rows <-> sequences <-> batches, from the store's ``seq`` array and its batch size.

    When ``seq`` itself is unreadable, rows and batches are reported as unknown (None).
    """

    def __init__(self, group, info: dict[str, Any]):
        self.batch_size = int((info.get("layout") or {}).get("batch_size") or 0) or None
        try:
            self.seq = np.asarray(group["seq"][...], dtype=np.int64) if "seq" in group else None
        except Exception:  # noqa: BLE001 - a damaged row map is reported by the file check itself
            self.seq = None

    def rows_of_sequences(self, s0: int, s1: int) -> tuple[int, int] | None:
        if self.seq is None:
            return None
        return int(np.searchsorted(self.seq, s0, side="left")), int(np.searchsorted(self.seq, s1, side="left"))

    def sequences_of_rows(self, r0: int, r1: int) -> tuple[int, int] | None:
        if self.seq is None or r1 <= r0 or r1 > len(self.seq):
            return None
        return int(self.seq[r0]), int(self.seq[r1 - 1]) + 1

    def batches_of_sequences(self, s0: int, s1: int) -> tuple[int, int] | None:
        if not self.batch_size or s1 <= s0:
            return None
        return s0 // self.batch_size, (s1 - 1) // self.batch_size

    def claimed_rows(self, done: np.ndarray | None) -> np.ndarray | None:
        """Per token row: whether the manifest counts its batch as written (None: unknown)."""
        if done is None or self.seq is None or not self.batch_size:
            return None
        batch = self.seq // self.batch_size
        return done[np.minimum(batch, len(done) - 1)] if len(done) else np.zeros(len(self.seq), bool)


# --- checking --------------------------------------------------------------------------------------

def _array_dirs(root: Path) -> list[tuple[str, Path, dict[str, Any] | None, str | None]]:
    """(name, folder, metadata or None, error) of every array under the store, in path order."""
    out = []
    for meta_file in sorted(root.rglob("zarr.json")):
        folder = meta_file.parent
        name = folder.relative_to(root).as_posix()
        try:
            meta = json.loads(meta_file.read_bytes())
        except (OSError, ValueError) as exc:
            out.append((name, folder, None, f"zarr.json unreadable ({exc})"))
            continue
        if meta.get("node_type") == "array":
            out.append((name, folder, meta, None))
    return out


def _check_file(path: Path, grid: ChunkGrid, unit: tuple[int, ...]) -> tuple[list[ChunkProblem], int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return check_shard(None, grid, unit), 0
    return check_shard(data, grid, unit), len(data)


def verify_store(path: str | Path, *, workers: int | None = None, progress: bool = False,
                 arrays: set[str] | None = None, span: tuple[int, int] | None = None) -> VerifyReport:
    """Check every chunk of every array of a store; see the module docstring.

    ``arrays`` / ``span``: check only these arrays, and only their shards overlapping [start, stop)
    of the leading axis (to name the damage an analysis hit without reading the whole store).
    """
    t0 = time.perf_counter()
    root = Path(path)
    group = open_group(root)
    if not root.is_dir():
        raise StoreError(f"harvest verify reads a store on the local file system; {root} is not a folder")
    info = read_provenance(group)
    report = VerifyReport(str(root), spec_name=info.get("spec", {}).get("name"))
    hooks = set(info.get("hooks", []))
    rowmap = RowMap(group, info)
    try:
        done = batches_done(group) if MANIFEST_GROUP in group else None  # no manifest: every row should be there
    except Exception as exc:  # noqa: BLE001 - the manifest's own files are checked below
        done = None
        report.damages.append(Damage("_progress", "_progress", f"progress manifest unreadable ({_short(exc)})",
                                     fix=rebuild_fix("_progress")))
    claimed = rowmap.claimed_rows(done)

    tasks = []
    for name, folder, meta, error in _array_dirs(root):
        if arrays is not None and name not in arrays:
            continue
        if meta is None:
            report.damages.append(Damage(name, f"{name}/zarr.json", error or "unreadable", fix=rebuild_fix(name)))
            continue
        report.arrays += 1
        grid = ChunkGrid.from_metadata(meta)
        dims = tuple(meta.get("dimension_names") or ())
        axis = dims[0] if dims else None
        for unit in grid.units():
            if span is not None and grid.shape:
                lo, hi = _unit_span(grid, unit)
                if hi <= span[0] or lo >= span[1]:
                    continue
            file = folder / grid.key(unit)
            tasks.append((name, grid, axis, unit, file))
    total = sum(f.stat().st_size for *_, f in tasks if f.is_file())
    bar = None
    if progress and total >= PROGRESS_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify")

    def run(task):
        name, grid, axis, unit, file = task
        problems, n = _check_file(file, grid, unit)
        if bar is not None:
            bar.update(n)
        return task, problems, n

    n_workers = workers or min(8, (os.cpu_count() or 1) * 2)
    try:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="verify") as pool:
            results = list(pool.map(run, tasks))
    finally:
        if bar is not None:
            bar.close()
    for (name, grid, axis, unit, file), problems, n in results:
        report.objects += 1
        report.bytes_read += n
        for problem in problems:
            if problem.what in (MISSING_SHARD, MISSING_CHUNK):
                span = _unit_span(grid, unit) if problem.coords is None else grid.lead_span(problem.coords)
                if name not in hooks or not _claimed(claimed, axis, span, rowmap):
                    continue  # never written: reads as the fill value, as the manifest says
            report.damages.append(_damage(name, root, file, grid, axis, unit, problem, rowmap, hooks))
    report.damages.sort(key=lambda d: (d.array, d.span or (0, 0), d.chunk or ()))
    report.seconds = time.perf_counter() - t0
    return report


def _unit_span(grid: ChunkGrid, unit: tuple[int, ...]) -> tuple[int, int]:
    if not grid.shape:
        return 0, 1
    start = unit[0] * grid.unit[0]
    return start, min(start + grid.unit[0], grid.shape[0])


def _claimed(claimed: np.ndarray | None, axis: str | None, span: tuple[int, int], rowmap: RowMap) -> bool:
    if claimed is None:
        return True  # no manifest to go by: every row should be there
    if axis == "sequence":
        rows = rowmap.rows_of_sequences(*span)
        return rows is None or bool(claimed[rows[0]:rows[1]].any())
    return bool(claimed[span[0]:span[1]].any())


def _damage(name: str, root: Path, file: Path, grid: ChunkGrid, axis: str | None, unit: tuple[int, ...],
            problem: ChunkProblem, rowmap: RowMap, hooks: set[str]) -> Damage:
    span = grid.lead_span(problem.coords) if problem.coords is not None else _unit_span(grid, unit)
    rows = batches = None
    if axis == "token":
        rows = span
        seqs = rowmap.sequences_of_rows(*span)
        batches = rowmap.batches_of_sequences(*seqs) if seqs else None
    elif axis == "sequence":
        rows = rowmap.rows_of_sequences(*span)
        batches = rowmap.batches_of_sequences(*span)
    fix = "harvest run SPEC --resume --redo-rows" if name in hooks and rows else rebuild_fix(name)
    if name not in hooks:
        rows = rows if axis in ("token", "sequence") else None
        batches = None
    return Damage(name, file.relative_to(root).as_posix(), problem.what, problem.coords, axis, span, rows, batches, fix)


def rebuild_fix(name: str) -> str:
    """How to repair an array that ``--redo-rows`` does not rewrite."""
    if name.startswith("analysis/index"):
        return "harvest index STORE  (rebuilds analysis/index)"
    if name.startswith("analysis/"):
        part = name.split("/")[1]
        return f"harvest analyze {part} STORE  (rewrites analysis/{part})"
    return (f"harvest run SPEC --overwrite  ({name} is written when the store is created; "
            "recreating the store rewrites it)")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


# --- naming the damage when an analysis hits a bad checksum ------------------------------------------

def is_checksum_error(exc: BaseException) -> bool:
    """zarr's crc32c codec raises a bare ValueError with this text; the sharding codec lets it through."""
    return isinstance(exc, ValueError) and "checksum do not match" in str(exc)


def corrupt_chunk_error(path: str | Path, array: str | None = None, rows: tuple[int, int] | None = None,
                        report: VerifyReport | None = None) -> CorruptChunkError:
    """A one-line error naming the damaged array, chunk, rows and the repair, from a verify of the store.

    ``array`` / ``rows``: what the failing read asked for, when known (the damage found there is named
    first; the whole store is checked so that one repair covers everything).
    """
    try:
        report = report or verify_store(path, arrays={array} if array else None, span=rows)
    except Exception:  # noqa: BLE001 - never hide the original problem behind a second one
        report = None
    if report is None or report.ok:
        where = f" in {array}" + (f" rows {rows[0]}:{rows[1]}" if rows else "") if array else ""
        return CorruptChunkError(f"a chunk{where} of {path} failed its crc32c check; run `harvest verify {path}` "
                                 "to name every damaged chunk and its repair")
    damages = report.damages
    if array is not None:
        def near(d: Damage) -> bool:
            return d.array == array and (rows is None or d.span is None or d.span[0] < rows[1] and rows[0] < d.span[1])
        damages = sorted(damages, key=lambda d: not near(d))
    shown = "; ".join(d.line() for d in damages[:3])
    more = f" (and {len(damages) - 3} more)" if len(damages) > 3 else ""
    fixes = "; ".join(report.repair_commands())
    return CorruptChunkError(f"store {path} is damaged: {shown}{more}. Repair: {fixes}; "
                             f"then `harvest verify {path}` checks the whole store")


def names_damage(fn):
    """Decorator for a library call whose first argument is a store path: zarr's bare checksum error
    from any read inside it (a row map, an index array...) becomes a one-line :class:`CorruptChunkError`
    naming the damage found by a verify of that store and its repair."""
    import functools

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except ValueError as exc:
            if isinstance(exc, CorruptChunkError) or not is_checksum_error(exc):
                raise
            raise corrupt_chunk_error(path) from None

    return wrapper


class CheckedArray:
    """A zarr array whose reads, on a bad checksum, raise :class:`CorruptChunkError` naming the array,
    chunk, rows and repair instead of zarr's bare ValueError. Array-like enough for ``dask.array.from_array``.
    """

    def __init__(self, array, path: str | Path, name: str):
        self.array, self.path, self.name = array, str(path), name
        self.shape, self.dtype, self.ndim = tuple(array.shape), array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            return self.array[key]
        except ValueError as exc:
            if not is_checksum_error(exc):
                raise
            first = key[0] if isinstance(key, tuple) and key else key
            rows = None
            if isinstance(first, slice) and self.shape:
                start, stop, _ = first.indices(self.shape[0])
                rows = (start, stop)
            raise corrupt_chunk_error(self.path, self.name, rows) from None

    def __dask_tokenize__(self):
        return ("harvest.CheckedArray", self.path, self.name, self.shape, str(self.dtype))
