"""``harvest verify``: prove a store intact, or name every damaged chunk and how to repair it.

Every stored object of every array is read straight from disk, or from the bucket of a store on
object storage (``s3://…``, ``gs://…``: one listing, then ranged GETs of each shard's index and of
the chunk records it points to), in parallel threads, no zarr decode, and checked with
:mod:`harvest.shards`: each shard index (its crc32c, its offsets and lengths inside
the file), each inner chunk's crc32c, and that every shard holding rows the progress manifest counts
as written is there. Each damage is reported with the token rows (or sequences) and the batches it
covers, and the repair: ``harvest run SPEC --resume --redo-rows A:B`` for activations, which
re-harvests only those batches.

Library use::

    from harvest.verify import verify_store
    report = verify_store("stores/demo.zarr")        # or "s3://bucket/prefix/demo.zarr"
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
from .objstore import normalize, obstore_of
from .store import MANIFEST_GROUP, batches_done, open_group, read_provenance
from .shards import MISSING_CHUNK, MISSING_SHARD, ChunkGrid, ChunkProblem, check_shard, check_stored

#: stores larger than this get a progress bar (when asked for one)
PROGRESS_BYTES = 256 * 2**20
#: objects read at once from an object store by default (each read waits on the network, not the CPU)
OBJECT_WORKERS = 16
#: an object up to this size is read with one GET (all of it is checked: one round trip is fastest);
#: a larger one with ranged GETs, its index first, then its records this many bytes at a time
WHOLE_GET_BYTES = 64 * 2**20


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
        head = f"{self.array}: " if self.file == self.array else f"{self.array} {where} ({self.file}): "
        return head + self.what + (f"; {', '.join(cover)}" if cover else "")


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


# --- where the stored objects are: files, or objects in a bucket ------------------------------------

class _Files:
    """A store on the local file system: each stored object is a file, read whole (one read)."""

    default_workers = min(8, (os.cpu_count() or 1) * 2)

    def __init__(self, root: Path):
        if not root.is_dir():
            raise StoreError(f"harvest verify reads a store folder or an s3:// / gs:// URL; {root} is not a folder")
        self.root = root

    def arrays(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """(name, metadata or None, error) of every array under the store, in path order."""
        out = []
        for meta_file in sorted(self.root.rglob("zarr.json")):
            name = meta_file.parent.relative_to(self.root).as_posix()
            try:
                meta = json.loads(meta_file.read_bytes())
            except (OSError, ValueError) as exc:
                out.append((name, None, f"zarr.json unreadable ({exc})"))
                continue
            if meta.get("node_type") == "array":
                out.append((name, meta, None))
        return out

    def size(self, key: str) -> int:
        path = self.root / key
        return path.stat().st_size if path.is_file() else 0

    def check(self, key: str, grid: ChunkGrid, unit: tuple[int, ...]) -> tuple[list[ChunkProblem], int]:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return check_shard(None, grid, unit), 0
        return check_shard(data, grid, unit), len(data)


class _Objects:
    """A store in a bucket: one listing gives every object and its size (a missing shard costs no
    request). An object up to ``WHOLE_GET_BYTES`` is read with one GET and checked in memory as a file
    is; a larger one with ranged GETs: its index first (a damaged index stops there), then the chunk
    records it points to, ``WHOLE_GET_BYTES`` at a time (obstore fetches adjacent ranges together), so a
    worker never holds more than that."""

    default_workers = OBJECT_WORKERS

    def __init__(self, url: str):
        import obstore

        self.obstore = obstore
        self.store = obstore_of(url)
        self.sizes = {meta["path"]: int(meta["size"]) for chunk in obstore.list(self.store) for meta in chunk}

    def arrays(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        def one(key: str) -> tuple[str, dict[str, Any] | None, str | None]:
            name = key.removesuffix("zarr.json").rstrip("/")
            try:
                return name, json.loads(bytes(self.obstore.get(self.store, key).bytes())), None
            except (OSError, ValueError) as exc:
                return name, None, f"zarr.json unreadable ({exc})"

        keys = sorted(k for k in self.sizes if k == "zarr.json" or k.endswith("/zarr.json"))
        with ThreadPoolExecutor(self.default_workers) as pool:
            found = list(pool.map(one, keys))
        return [(name, meta, error) for name, meta, error in found if meta is None or meta.get("node_type") == "array"]

    def size(self, key: str) -> int:
        return self.sizes.get(key, 0)

    def check(self, key: str, grid: ChunkGrid, unit: tuple[int, ...]) -> tuple[list[ChunkProblem], int]:
        if key not in self.sizes:
            return check_shard(None, grid, unit), 0
        if self.sizes[key] <= WHOLE_GET_BYTES:
            data = memoryview(self.obstore.get(self.store, key).bytes())
            return check_shard(data, grid, unit), len(data)

        def read(spans: list[tuple[int, int]]) -> list[memoryview]:
            got = self.obstore.get_ranges(self.store, key, starts=[a for a, _ in spans], ends=[b for _, b in spans])
            return [memoryview(b) for b in got]

        return check_stored(self.sizes[key], read, grid, unit, budget=WHOLE_GET_BYTES)


# --- checking --------------------------------------------------------------------------------------

def verify_store(path: str | Path, *, workers: int | None = None, progress: bool = False,
                 arrays: set[str] | None = None, span: tuple[int, int] | None = None) -> VerifyReport:
    """Check every chunk of every array of a store (a folder or an object-store URL); see the module docstring.

    ``arrays`` / ``span``: check only these arrays, and only their shards overlapping [start, stop)
    of the leading axis (to name the damage an analysis hit without reading the whole store).
    """
    t0 = time.perf_counter()
    whole = arrays is None and span is None
    root = normalize(path)
    group = open_group(root)
    source = _Objects(root) if isinstance(root, str) else _Files(root)
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
    for name, meta, error in source.arrays():
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
            tasks.append((name, grid, axis, unit, f"{name}/{grid.key(unit)}" if name else grid.key(unit)))
    total = sum(source.size(key) for *_, key in tasks)
    bar = None
    if progress and total >= PROGRESS_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify")

    def run(task):
        name, grid, axis, unit, key = task
        problems, n = source.check(key, grid, unit)
        if bar is not None:
            bar.update(n)
        return task, problems, n

    try:
        with ThreadPoolExecutor(workers or source.default_workers, thread_name_prefix="verify") as pool:
            results = list(pool.map(run, tasks))
    finally:
        if bar is not None:
            bar.close()
    for (name, grid, axis, unit, key), problems, n in results:
        report.objects += 1
        report.bytes_read += n
        for problem in problems:
            if problem.what in (MISSING_SHARD, MISSING_CHUNK):
                span = _unit_span(grid, unit) if problem.coords is None else grid.lead_span(problem.coords)
                if name not in hooks or not _claimed(claimed, axis, span, rowmap):
                    continue  # never written: reads as the fill value, as the manifest says
            report.damages.append(_damage(name, key, grid, axis, unit, problem, rowmap, hooks))
    if whole and done is not None:
        report.damages += statistics_damage(group, done)
    report.damages.sort(key=lambda d: (d.array, d.span or (0, 0), d.chunk or ()))
    report.seconds = time.perf_counter() - t0
    return report


#: what to do about statistics that do not match the manifest: they are not recomputed in place
STATISTICS_FIX = ("harvest run SPEC --overwrite (the statistics are not repaired in place), or delete "
                  "analysis/statistics to have the analyses scan the stored rows")


def statistics_damage(group, done: np.ndarray) -> list[Damage]:
    """The harvest-time statistics must be readable and cover every batch the manifest marks, no more:
    per stage, the prefix and the stage's unit snapshots (whole, or a one-replica run's partway
    through its unit); a prefix beyond the marked batches counts batches the store does not hold."""
    from .statistics import load_statistics
    from .store import (MANIFEST_GROUP, STATISTICS_GROUP, manifest, snapshot_attrs, statistics_cover,
                        unit_snapshot_name, unit_snapshots)

    if STATISTICS_GROUP not in group:
        return []
    name = STATISTICS_GROUP
    try:
        cover = statistics_cover(group)
        load_statistics(group)
    except Exception as exc:  # noqa: BLE001 - any failure to read them is the finding
        return [Damage(name, name, f"harvest-time statistics unreadable ({_short(exc)})", fix=STATISTICS_FIX)]
    out = []
    first_gap = int(np.flatnonzero(~done)[0]) if (~done).any() else len(done)
    if cover.prefix > first_gap:
        out.append(Damage(name, name, f"the statistics prefix counts batches 0..{cover.prefix - 1}, but the manifest "
                          f"marks only 0..{first_gap - 1} as written", batches=(first_gap, cover.prefix - 1),
                          fix=STATISTICS_FIX))
    for stage in range(len(list(group[MANIFEST_GROUP].array_keys()))):
        marked = np.asarray(manifest(group, stage)[...]).astype(bool)
        covered = np.zeros(len(marked), bool)
        covered[:cover.prefix] = True
        for a, b in unit_snapshots(group, stage):
            if snapshot_attrs(group, unit_snapshot_name(stage, a, b)) is not None:
                covered[a:b] = True
        lacking = np.flatnonzero(marked & ~covered)
        if lacking.size:
            runs = np.split(lacking, np.flatnonzero(np.diff(lacking) > 1) + 1)
            out += [Damage(name, name, f"stage {stage} marks batches its statistics snapshots do not cover",
                           batches=(int(r[0]), int(r[-1])), fix=STATISTICS_FIX) for r in runs]
    return out


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


def _damage(name: str, key: str, grid: ChunkGrid, axis: str | None, unit: tuple[int, ...],
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
    return Damage(name, key, problem.what, problem.coords, axis, span, rows, batches, fix)


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
