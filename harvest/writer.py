"""A bounded background writer: compute and I/O overlap, memory stays bounded.

Each stage owns one ``StageWriter``; it owns the Zarr arrays of that stage's hook points and
nobody else writes them. Rows are gathered into one buffer per array and written a whole shard
at a time, so zarr never rewrites a shard to add a chunk (and never has two writers in one shard,
which zarr 3 would turn into silent data loss). The progress manifest is advanced only after the
rows of a batch are on disk for every array of the stage.

On a GPU a single thread cannot keep up: a GPT-J-6B forward produces gigabytes of activations a
second. The writer then hands each batch's arrays to a small pool, one task per array (so one array
is still written by one thread, in order), and waits for the whole batch before it advances the
manifest. Each write thread encodes its shards on its own event loop (see ``EventLoops``).

Data-parallel replicas (``run.replicas``) give each replica's stage its own writer over the same
arrays, fed *units*: runs of batches that own whole shards (``harvest.shape.job_units``). Such a
writer is ``shared``: ``begin_unit`` points it at a unit's first rows, ``end_unit`` waits until the
unit is on disk, and the driver, one process, marks the manifest (two processes writing the one
manifest chunk would lose marks, as zarr loses rows when two processes write one shard).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import NonFiniteActivationError, StoreError
from .objstore import configure, is_object_store, is_url, put_object
from .shards import PARTIAL_SUFFIX, ShardFileWriter, ShardObjectWriter, fsync_file, shard_geometry
from .statistics import (ALL_ROWS, DEVICE_PREFIX, HITS_PREFIX, Compactor, StatisticsAccumulator, StatisticsPlan,
                         pack, unpack, unpack_dettmers)
from .store import (delete_snapshot, manifest, mark_written, open_for_writing, read_snapshot, snapshot_attrs,
                    unit_snapshot_name, write_rows, write_snapshot)
from .transfer import HostBatch

#: most write threads a GPU stage gets by default; beyond this the disk, not the threads, limits
MAX_AUTO_WRITE_THREADS = 8


def write_threads_for(requested: int | None, device_type: str, n_arrays: int) -> int:
    """Threads a stage writes with: as asked, else 1 on CPU (its cores compute) and up to 8 on a GPU."""
    if requested is None:
        requested = 1 if device_type == "cpu" else min(MAX_AUTO_WRITE_THREADS, os.cpu_count() or 1)
    return max(1, min(requested, n_arrays))


class EventLoops:
    """One asyncio loop per write thread, so that each thread encodes its own shards.

    zarr's synchronous API runs every coroutine on one global I/O thread, and the sharding codec
    does its CPU work there (merging inner chunks, checksums, concatenating the shard): however many
    threads call it, a process then writes about 1 GB/s (seen on an H200 host: zarr's thread 88%
    busy at 0.8 GB/s, while plain Python wrote 20 GB/s). Awaiting the array's async API on a loop of
    the calling thread spreads that work over the write threads; the file writes themselves go to
    ``executor``.
    """

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self._local = threading.local()
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._lock = threading.Lock()

    def run(self, coroutine):
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
            loop.set_default_executor(self.executor)
            with self._lock:
                self._loops.append(loop)
        return loop.run_until_complete(coroutine)

    def close(self) -> None:
        with self._lock:
            loops, self._loops = self._loops, []
        for loop in loops:
            loop.close()
        self.executor.shutdown(wait=True)


class ArrayWriter:
    """Appends rows to one array in order and writes whole shards.

    Where ``harvest.shards`` covers the array's codec chain (no compression: the default), each
    inner chunk goes from its slice of the batch straight into the shard's file
    (``ShardFileWriter``: no shard buffer, no copy in Python when buffered). Otherwise (``zstd``,
    ``blosc-zstd``, or ``store.writer: zarr``) rows are gathered into one shard buffer and zarr's
    pipeline encodes it on the calling thread's loop. Either way a shard is written whole by this
    one writer, and a writer that starts inside a shard (a resume) rewrites that shard from its
    first row, reading back the rows already there.
    """

    def __init__(self, array: zarr.Array, start: int, loops: EventLoops, *, fsync: str = "shard",
                 direct_io: bool = False, engine: str = "shards"):
        # zarr's default drops a chunk that equals the fill value, which costs two extra passes over
        # every chunk (a fill-value array, then a bytewise comparison) at shard and at chunk level:
        # about a third of the writer's CPU, taken from compute on a busy stage. Activations are never
        # exactly zero over a whole chunk, so we write every chunk: the values read back are the same.
        self.array = array.with_config({"write_empty_chunks": True})
        self.loops = loops
        self.shard_rows = array.shards[0] if array.shards else array.chunks[0]
        self.row_shape = array.shape[1:]
        self.fsync = fsync
        self.shards: ShardFileWriter | None = None
        geometry = None
        if engine == "shards" and is_object_store(array.store_path.store):  # one PUT per shard
            geometry = shard_geometry(array, align=0, any_store=True)
            if geometry is not None:
                self.shards = ShardObjectWriter(_putter(array, loops), _chunk_key(array), geometry, start)
                geometry = None
        elif engine == "shards":
            geometry = shard_geometry(array)
        if geometry is not None:
            lead_zeros = (0,) * (array.ndim - 1)
            self.shards = ShardFileWriter(
                _array_dir(array), lambda shard: array.metadata.encode_chunk_key((shard, *lead_zeros)), geometry,
                start, direct=direct_io, fsync=fsync)
        self._durable = start  #: zarr path: rows [.., durable) are on disk
        self._buffer: np.ndarray | None = None
        self._filled = 0  #: zarr path: rows buffered after ``durable``
        self._padded: np.ndarray | None = None  #: per-sequence rows widened to the store's extent (reused)

    @property
    def durable(self) -> int:
        """Rows [.., durable) are on disk (and, with ``store.fsync: shard``, on the device)."""
        return self.shards.durable if self.shards is not None else self._durable

    def _shard_end(self) -> int:
        return min((self._durable // self.shard_rows + 1) * self.shard_rows, self.array.shape[0])

    def append(self, start: int, data: np.ndarray) -> None:
        expected = self.shards.cursor if self.shards is not None else self._durable + self._filled
        if start != expected:
            raise StoreError(f"{self.array.path}: rows must arrive in order; got row {start}, expected {expected}")
        if self.shards is not None:
            if data.shape[1:] != self.row_shape:
                data = self._widen(data)
            elif data.dtype != self.array.dtype:
                data = data.astype(self.array.dtype)
            if self.shards.needs_prefix:  # resuming inside a shard: it is rewritten whole
                a, b = self.shards.shard_start, self.shards.cursor
                self.shards.restart_shard(np.ascontiguousarray(self.array[a:b]))
            self.shards.append(data)
            return
        offset = 0
        while offset < len(data):
            if self._buffer is None:
                self._buffer = np.zeros((self.shard_rows, *self.row_shape), dtype=self.array.dtype)
            room = self._shard_end() - self._durable - self._filled
            take = min(room, len(data) - offset)
            part = data[offset: offset + take]
            target = self._buffer[self._filled: self._filled + take]
            if part.shape[1:] == self.row_shape:
                target[...] = part
            else:  # per-sequence arrays: a batch's query/key extent is at most the store's
                target[...] = 0
                target[(slice(None), *(slice(0, n) for n in part.shape[1:]))] = part
            self._filled += take
            offset += take
            if self._durable + self._filled == self._shard_end():
                self.flush()

    def _widen(self, data: np.ndarray) -> np.ndarray:
        """Per-sequence rows zero-padded to the store's extent, in a buffer reused across batches."""
        if self._padded is None or len(self._padded) < len(data):
            self._padded = np.zeros((len(data), *self.row_shape), dtype=self.array.dtype)
        out = self._padded[: len(data)]
        out[...] = 0
        out[(slice(None), *(slice(0, n) for n in data.shape[1:]))] = data
        return out

    def restart(self, start: int) -> None:
        """Continue at row ``start`` (a unit's first row, on a shard boundary), dropping rows not yet written."""
        if self.shards is not None:
            self.shards.discard()
            self.shards.durable = self.shards.cursor = start
        self._durable, self._filled = start, 0

    def flush(self) -> None:
        """Write the rows so far (a partial shard is completed with what it holds)."""
        if self.shards is not None:
            self.shards.flush()
            return
        if self._filled:
            end = self._durable + self._filled
            self.loops.run(write_rows(self.array, self._durable, end, self._buffer[: self._filled]))
            if self.fsync == "shard":
                self._fsync_shards(self._durable, end)
            self._durable, self._filled = end, 0

    def discard(self) -> None:
        """Drop a shard left open by a failed or aborted job (its rows were never counted)."""
        if self.shards is not None:
            self.shards.discard()

    def _fsync_shards(self, start: int, end: int) -> None:
        """zarr path: flush the shard files holding rows [start, end) to the device."""
        array_dir = _array_dir(self.array)
        if array_dir is None:
            return
        lead_zeros = (0,) * (self.array.ndim - 1)
        for shard in range(start // self.shard_rows, -(-end // self.shard_rows)):
            path = array_dir / self.array.metadata.encode_chunk_key((shard, *lead_zeros))
            if path.exists():
                fsync_file(path)


def _chunk_key(array: zarr.Array):
    """Shard number -> its key relative to the array (``c/3/0``)."""
    lead_zeros = (0,) * (array.ndim - 1)
    return lambda shard: array.metadata.encode_chunk_key((shard, *lead_zeros))


def _putter(array: zarr.Array, loops: EventLoops):
    """``put(key, data)``: one shard uploaded (one PUT, or multipart when large: ``objstore.put_object``)
    to the obstore store under zarr's ``ObjectStore``, on this thread's loop."""
    store, prefix = array.store_path.store.store, array.path

    def put(key: str, data) -> None:
        loops.run(put_object(store, f"{prefix}/{key}", data))

    return put


def _array_dir(array: zarr.Array) -> Path | None:
    """The directory of an array in a local store (None elsewhere)."""
    root = getattr(array.store_path.store, "root", None)
    return Path(root) / array.path if root is not None else None


@dataclass(frozen=True)
class StageStoreInfo:
    """What a stage's writer needs to know about the job layout (picklable, for Ray actors)."""

    path: str
    stage: int
    arrays: tuple[tuple[str, str], ...]  #: (array name, axis: token | sequence)
    batch_ends: dict[str, Any]  #: axis -> ends of every batch along it (numpy arrays)
    batch_starts: dict[str, Any]
    on_nonfinite: str
    compute_dtype: str = "float32"  #: for the advice of the non-finite error
    store_dtype: str = "float32"
    fsync: str = "shard"  #: store.fsync
    direct_io: bool = False  #: store.direct_io
    engine: str = "shards"  #: store.writer
    statistics: StatisticsPlan | None = None  #: harvest-time statistics of this stage's hooks
    #: this writer folds the units every stage has finished into the statistics' prefix snapshot
    #: (``compact_statistics``): the last stage's, with one replica (the replica driver does it otherwise)
    compacts: bool = False
    #: several writers (replicas) share these arrays, each over whole units: the driver cleans up
    #: unfinished writes and marks the manifest, never the writers
    shared: bool = False
    #: store.storage_options (endpoint, region) of a store on object storage: a stage actor is another
    #: process, which must be told where the bucket's service is (credentials: its own environment)
    storage_options: dict[str, Any] | None = None

    def configure_store(self) -> None:
        """Tell this process where the store's service is (``objstore.configure``): first thing in a stage actor."""
        if self.storage_options is not None and is_url(self.path):
            configure(self.path, self.storage_options)


@dataclass(frozen=True)
class _Unit:
    """Queue item: the next batches belong to a unit starting at ``batch``."""

    batch: int


@dataclass(frozen=True)
class _Sync:
    """Queue item: write what is buffered, then set ``done``."""

    done: threading.Event


class StageWriter:
    """One stage's writer thread (and its pool of ``threads`` when more than one).

    ``submit`` blocks when ``max_pending`` batches wait (backpressure).
    """

    def __init__(self, info: StageStoreInfo, start_batch: int, max_pending: int = 4, threads: int = 1):
        self.info = info
        info.configure_store()
        group = self.group = open_for_writing(info.path)
        for name, _ in info.arrays if not info.shared else ():  # shared: other writers' files may be in flight
            remove_unfinished_writes(Path(info.path) / name)
        self._loops = EventLoops(ThreadPoolExecutor(threads, thread_name_prefix=f"stage{info.stage}-io"))
        self.writers = {
            name: (ArrayWriter(group[name], int(info.batch_starts[axis][start_batch])
                               if start_batch < len(info.batch_starts[axis]) else 0, self._loops,
                               fsync=info.fsync, direct_io=info.direct_io, engine=info.engine), axis)
            for name, axis in info.arrays
        }
        self.next_batch = start_batch  #: the batch expected next (batches arrive in order)
        self.marked = start_batch  #: manifest is written up to here
        self.statistics = resume_statistics(group, info)
        #: (first batch, through) of this stage's snapshot of a unit it is inside (superseded as it advances)
        self._partial: tuple[int, int] | None = None
        self._superseded: tuple[int, int] | None = None  #: a partial snapshot to delete once the manifest moves on
        self._compactor = Compactor(group)  #: the statistics' compactions (``info.compacts``)
        if self.statistics is not None:
            self.statistics.next_batch = start_batch
            if self.statistics.through > self.statistics.start:
                self._partial = (self.statistics.start, self.statistics.through)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.nonfinite: dict[str, int] = {}
        self.unit_nonfinite: dict[str, int] = {}  #: shared: the current unit's counts (the driver sums units)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"stage{info.stage}-write") if threads > 1 else None
        self._thread = threading.Thread(target=self._loop, name=f"stage{info.stage}-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: int, rows: dict[str, int], captures: HostBatch) -> None:
        """Queue one batch's captures. ``rows``: axis -> first row."""
        self.raise_if_failed()
        if batch != self.next_batch:
            raise StoreError(f"stage {self.info.stage}: batch {batch} submitted, expected {self.next_batch}")
        while True:
            try:
                self._queue.put((batch, rows, captures), timeout=0.5)
                break
            except queue.Full:
                self.raise_if_failed()
        # counted only once queued: an interrupt while waiting must not let close() mark this batch
        self.next_batch += 1
        if self.statistics is not None:
            self.statistics.next_batch = self.next_batch

    def begin_unit(self, batch: int) -> None:
        """Start a unit at ``batch``: its rows start at the batch's first rows; rows of an unfinished
        unit still buffered are dropped (a unit is redone from its start)."""
        self.raise_if_failed()
        self._queue.put(_Unit(batch))
        self.next_batch = batch
        if self.statistics is not None:
            self.statistics.next_batch = batch

    def end_unit(self) -> dict[str, int]:
        """Block until every batch submitted is on disk (a unit ends on shard ends: nothing is left buffered);
        returns the unit's NaN/inf counts per array (``on_nonfinite: flag``)."""
        done = threading.Event()
        self._queue.put(_Sync(done))
        while not done.wait(0.5):
            self.raise_if_failed()
            if not self._thread.is_alive():
                raise StoreError(f"stage {self.info.stage}: the writer stopped before the unit was written")
        self.raise_if_failed()
        return dict(self.unit_nonfinite)

    def close(self) -> None:
        """Write everything still buffered and the final manifest; re-raise a writer failure."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()

    def abort(self) -> None:
        """Stop without flushing partial shards (a failed job): what is durable stays marked."""
        self._error = self._error or StoreError("aborted")
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def durable_batches(self) -> int:
        return self.marked

    def _loop(self) -> None:
        try:
            while (item := self._queue.get()) is not None and self._error is None:
                if isinstance(item, (_Unit, _Sync)):
                    self._control(item)
                    continue
                batch, rows, captures = item
                counts = captures.wait()  # device-to-host copies of this batch have landed

                def write(name: str) -> None:
                    writer, axis = self.writers[name]
                    data = captures.tensors[name].numpy()
                    self._check_finite(name, batch, data, None if counts is None else counts.get(name, 0))
                    writer.append(rows[axis], data)

                self._each_array(write)
                if self.statistics is not None:
                    tensors = captures.tensors
                    values = {k: t.numpy() for k, t in tensors.items() if k.startswith((HITS_PREFIX, DEVICE_PREFIX))}
                    values.update({h: tensors.get(ALL_ROWS + h, tensors.get(h)).numpy() for h in self.statistics.plan.hooks
                                   if f"{DEVICE_PREFIX}{h}:sum" not in values})
                    ends = self.info.batch_ends["sequence"]
                    self.statistics.add(batch, rows["sequence"], values, int(ends[batch]) - rows["sequence"])
                self._mark(batch + 1)
            if self._error is None:
                self._each_array(lambda name: self.writers[name][0].flush())
                self._mark(self.next_batch, final=True)
        except BaseException as exc:  # surfaced to the caller by raise_if_failed
            self._error = _explain(exc, self.info.path)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            for writer, _ in self.writers.values():
                writer.discard()  # after a failure or abort: no temporary file outlives the writer
            self._loops.close()

    def _control(self, item: _Unit | _Sync) -> None:
        if isinstance(item, _Unit):
            for name, (writer, axis) in self.writers.items():
                starts = self.info.batch_starts[axis]
                writer.restart(int(starts[item.batch]) if item.batch < len(starts) else writer.array.shape[0])
            self.marked = item.batch
            self.unit_nonfinite = {}
            if self.statistics is not None:  # a unit's statistics start from nothing (see ``_mark``)
                self.statistics.restart(item.batch)
        else:
            self._each_array(lambda name: self.writers[name][0].flush())
            self._mark(self.next_batch)  # the unit's statistics snapshot, before the driver marks the unit
            item.done.set()

    def _each_array(self, fn) -> None:
        """``fn(name)`` for every array, on the pool when there is one; waits for all, then raises the first error."""
        if self._pool is None:
            for name in self.writers:
                fn(name)
            return
        futures = [self._pool.submit(fn, name) for name in self.writers]
        wait(futures)
        for future in futures:
            future.result()

    def _check_finite(self, name: str, batch: int, data: np.ndarray, count: int | None = None) -> None:
        """``count``: NaN/inf values already counted on the device (None: count them here)."""
        if count is None:
            if data.dtype.kind != "f" or np.isfinite(data).all():
                return
            count = int(data.size - np.isfinite(data).sum())
        if not count:
            return
        if self.info.on_nonfinite == "fail":
            raise NonFiniteActivationError(
                f"{count} NaN/inf value(s) in {name}, batch {batch}. Nothing of this batch is marked "
                f"written. {nonfinite_advice(self.info.compute_dtype, self.info.store_dtype)}, "
                "or set capture.on_nonfinite: flag to store them and record where"
            )
        self.nonfinite[name] = self.nonfinite.get(name, 0) + count
        self.unit_nonfinite[name] = self.unit_nonfinite.get(name, 0) + count
        if not self.info.shared:  # shared writers' counts are per unit: the replica driver writes the total
            writer, _ = self.writers[name]
            writer.array.attrs["nonfinite_values"] = self.nonfinite[name]

    def _mark(self, processed: int, final: bool = False) -> None:
        """Advance the manifest to the last batch whose rows are durable in every array."""
        frontier = processed
        for writer, axis in self.writers.values():
            ends = self.info.batch_ends[axis]
            frontier = min(frontier, int(np.searchsorted(ends, writer.durable, side="right")))
        if frontier <= self.marked:
            return
        whole = self._snapshot(frontier) if self.statistics is not None else False
        if not self.info.shared:
            mark_written(self.group, self.info.stage, frontier, start=self.marked)
        self.marked = frontier
        if self._superseded is not None:  # only once the manifest counts the newer snapshot
            delete_snapshot(self.group, unit_snapshot_name(self.info.stage, *self._superseded))
            self._superseded = None
        if whole and self.info.compacts and not self.info.shared:
            self._compactor.unit_done()  # every COMPACT_UNITS units

    def _snapshot(self, frontier: int) -> bool:
        """Fold the statistics up to ``frontier`` unit by unit and write each unit's snapshot (a replica's
        writer: whole units only, the driver redoes the others), *before* the manifest counts the batches;
        returns whether a unit was finished."""
        acc, stage, whole = self.statistics, self.info.stage, False
        while acc.through < frontier:
            end = min(frontier, acc.end)
            acc.fold(end)
            if end == acc.end or not self.info.shared:
                write_snapshot(self.group, unit_snapshot_name(stage, acc.start, end),
                               *unit_attrs(pack(acc), acc.start, end, acc.end))
                if self._partial is not None and self._partial[0] == acc.start:
                    self._superseded = self._partial
                self._partial = (acc.start, end) if end < acc.end else None
            if end == acc.end:
                whole = True
                acc.next_unit()
        return whole


def unit_attrs(packed: tuple[dict[str, np.ndarray], dict[str, Any]], start: int, through: int, end: int):
    """A unit snapshot's arrays and attributes: batches [start, through) of the unit [start, end)."""
    arrays, attrs = packed
    return arrays, {**attrs, "start": start, "through": through, "end": end}


def resume_statistics(group: zarr.Group, info: StageStoreInfo) -> StatisticsAccumulator | None:
    """The stage's statistics as of its own manifest frontier: nothing at a unit's first batch, else its
    snapshot of the unit so far (a resume may redo batches past the job's frontier that this stage had
    already marked: :meth:`StatisticsAccumulator.add` skips them). A replica's writer starts each unit
    from nothing (``begin_unit``)."""
    if info.statistics is None:
        return None
    plan = info.statistics
    if info.shared:
        return StatisticsAccumulator(plan)
    marks = np.asarray(manifest(group, info.stage)[...]).astype(bool)
    unmarked = np.flatnonzero(~marks)
    through = int(unmarked[0]) if unmarked.size else len(marks)
    start = plan.unit_of(through)[0]
    remove_stale_snapshots(info.path, info.stage, marks, (start, through))
    if through == start:
        return StatisticsAccumulator(plan, through, start=start)
    name = unit_snapshot_name(info.stage, start, through)
    attrs = snapshot_attrs(group, name)
    if attrs is None:
        raise StoreError(f"{info.path}: stage {info.stage} has marked {through} batches but holds no statistics "
                         "snapshot for them (capture.statistics); run again with --overwrite")
    hits = plan.hits
    if (list(attrs["hooks"]) != [h for h in plan.hooks if h in attrs["hooks"]] or set(attrs["hooks"]) != set(plan.hooks)
            or list(attrs.get("dettmers_sources", [])) != list(hits.sources if hits else [])
            or bool(attrs.get("dettmers_last", False)) != bool(hits and hits.last)):
        # the runner restarts a resume with another partition at a unit's start (``continue_statistics``)
        raise StoreError(f"{info.path}: stage {info.stage}'s statistics snapshot covers other hook points than this "
                         "run's stage does (run.stages changed since the harvest started); resume with the "
                         "run.stages it started with, or run again with --overwrite")
    arrays, attrs = read_snapshot(group, name)
    return StatisticsAccumulator(plan, through, unpack(arrays, attrs), unpack_dettmers(arrays, attrs), start=start)


def remove_stale_snapshots(path: str, stage: int, marks: np.ndarray, keep: tuple[int, int]) -> int:
    """Delete ``stage``'s unit snapshots no resume may read, files and all; returns how many.

    Those are: a snapshot of batches the stage's manifest (``marks``) does not count (a killed run's
    unfinished work), an older snapshot of the unit being resumed (``keep`` is its newest), and files of
    a snapshot without its ``zarr.json``, which a process killed while deleting or writing a snapshot
    can leave and zarr no longer lists. Local stores only (on object storage deletes are single requests).
    """
    import shutil

    from .store import STATISTICS_GROUP

    root = Path(path) / STATISTICS_GROUP / f"stage_{stage}"
    if not root.is_dir():
        return 0
    stale = []
    for d in root.iterdir():
        if d.name == "zarr.json":
            continue
        try:
            a, b = (int(x) for x in d.name.removeprefix("unit_").split("_"))
        except ValueError:
            stale.append(d)
            continue
        if (not d.name.startswith("unit_") or not (d / "zarr.json").is_file() or not marks[a:b].all()
                or (a == keep[0] and b != keep[1])):
            stale.append(d)
    for d in stale:
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    return len(stale)


def nonfinite_advice(compute_dtype: str, store_dtype: str) -> str:
    """What to try against NaN/inf, given the dtypes in use: a float16 that overflows, else the weights."""
    if compute_dtype == "float16":
        return "Try model.dtype: float32 or bfloat16 (float16 overflows on large activations)"
    if store_dtype == "float16":
        return ("Try capture.dtype: float32 (values beyond float16's range, 65504, become inf when stored "
                "as float16)")
    return (f"The model already computes in {compute_dtype} and stores {store_dtype}, so the values come from "
            "the checkpoint or the inputs: check the weights for NaN/inf")


def remove_unfinished_writes(array_dir: str | Path) -> int:
    """Delete the temporary files of shard writes that never finished; returns how many.

    zarr and ``harvest.shards.ShardFileWriter`` both write a shard to ``<key>.<token>.partial`` and
    rename it into place, so a process killed mid-write leaves that file behind. It holds nothing the
    manifest counts (the shard is rewritten on resume), but a store must hold only what it says it does.
    Called when a stage's writer starts, before any write of its own: only this stage writes these arrays.
    """
    if "://" in str(array_dir):  # an object store: a shard is one PUT, nothing is left half-written
        return 0
    array_dir = Path(array_dir)
    if not array_dir.is_dir():
        return 0
    stale = list(array_dir.rglob(f"*{PARTIAL_SUFFIX}"))
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def _explain(exc: BaseException, path: str) -> BaseException:
    """Turn a full disk into an error that says so and how to continue."""
    if isinstance(exc, OSError) and exc.errno == 28:
        return StoreError(
            f"the disk holding {path} is full ({exc}). Batches written so far are kept and marked; "
            "free space (or move the store) and run again with --resume"
        )
    return exc

