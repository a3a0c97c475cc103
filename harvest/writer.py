"""A bounded background writer: compute and I/O overlap, memory stays bounded.

Each stage owns one ``StageWriter``; it owns the Zarr arrays of that stage's hook points and
nobody else writes them. Rows are gathered into one buffer per array and written a whole shard
at a time, so zarr never rewrites a shard to add a chunk (and never has two writers in one shard,
which zarr 3 would turn into silent data loss). The progress manifest is advanced only after the
rows of a batch are on disk for every array of the stage.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from .errors import NonFiniteActivationError, StoreError
from .store import manifest_name


class ArrayWriter:
    """Appends rows to one array in order and writes whole shards."""

    def __init__(self, array: zarr.Array, start: int):
        self.array = array
        self.shard_rows = array.shards[0] if array.shards else array.chunks[0]
        self.row_shape = array.shape[1:]
        self.durable = start  #: rows [.., durable) are on disk
        self._buffer: np.ndarray | None = None
        self._filled = 0  #: rows buffered after ``durable``

    def _shard_end(self) -> int:
        return min((self.durable // self.shard_rows + 1) * self.shard_rows, self.array.shape[0])

    def append(self, start: int, data: np.ndarray) -> None:
        expected = self.durable + self._filled
        if start != expected:
            raise StoreError(f"{self.array.path}: rows must arrive in order; got row {start}, expected {expected}")
        offset = 0
        while offset < len(data):
            if self._buffer is None:
                self._buffer = np.zeros((self.shard_rows, *self.row_shape), dtype=self.array.dtype)
            room = self._shard_end() - self.durable - self._filled
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
            if self.durable + self._filled == self._shard_end():
                self.flush()

    def flush(self) -> None:
        if self._filled:
            end = self.durable + self._filled
            self.array[self.durable:end] = self._buffer[: self._filled]
            self.durable, self._filled = end, 0


@dataclass(frozen=True)
class StageStoreInfo:
    """What a stage's writer needs to know about the job layout (picklable, for Ray actors)."""

    path: str
    stage: int
    arrays: tuple[tuple[str, str], ...]  #: (array name, axis: token | sequence)
    batch_ends: dict[str, Any]  #: axis -> ends of every batch along it (numpy arrays)
    batch_starts: dict[str, Any]
    on_nonfinite: str


class StageWriter:
    """One stage's writer thread. ``submit`` blocks when ``max_pending`` batches wait (backpressure)."""

    def __init__(self, info: StageStoreInfo, start_batch: int, max_pending: int = 4):
        self.info = info
        group = zarr.open_group(info.path, mode="r+")
        self.manifest = group[manifest_name(info.stage)]
        self.writers = {
            name: (ArrayWriter(group[name], int(info.batch_starts[axis][start_batch])
                               if start_batch < len(info.batch_starts[axis]) else 0), axis)
            for name, axis in info.arrays
        }
        self.next_batch = start_batch  #: the batch expected next (batches arrive in order)
        self.marked = start_batch  #: manifest is written up to here
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.nonfinite: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, name=f"stage{info.stage}-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: int, rows: dict[str, int], captures: dict[str, Any], ready=None) -> None:
        """Queue one batch's captures (host tensors or arrays). ``rows``: axis -> first row."""
        self.raise_if_failed()
        if batch != self.next_batch:
            raise StoreError(f"stage {self.info.stage}: batch {batch} submitted, expected {self.next_batch}")
        self.next_batch += 1
        while True:
            try:
                self._queue.put((batch, rows, captures, ready), timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()

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
                batch, rows, captures, ready = item
                if ready is not None:
                    ready.synchronize()  # device-to-host copies of this batch have landed
                for name, (writer, axis) in self.writers.items():
                    data = captures[name]
                    data = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
                    self._check_finite(name, batch, data)
                    writer.append(rows[axis], data)
                self._mark(batch + 1)
            if self._error is None:
                for writer, _ in self.writers.values():
                    writer.flush()
                self._mark(self.next_batch, final=True)
        except BaseException as exc:  # surfaced to the caller by raise_if_failed
            self._error = _explain(exc, self.info.path)

    def _check_finite(self, name: str, batch: int, data: np.ndarray) -> None:
        if data.dtype.kind != "f" or np.isfinite(data).all():
            return
        count = int(data.size - np.isfinite(data).sum())
        if self.info.on_nonfinite == "fail":
            raise NonFiniteActivationError(
                f"{count} NaN/inf value(s) in {name}, batch {batch}. Nothing of this batch is marked "
                "written. Try model.dtype: float32 or bfloat16 (float16 overflows on large activations), "
                "or set capture.on_nonfinite: flag to store them and record where"
            )
        self.nonfinite[name] = self.nonfinite.get(name, 0) + count
        writer, _ = self.writers[name]
        writer.array.attrs["nonfinite_values"] = self.nonfinite[name]

    def _mark(self, processed: int, final: bool = False) -> None:
        """Advance the manifest to the last batch whose rows are durable in every array."""
        frontier = processed
        for writer, axis in self.writers.values():
            ends = self.info.batch_ends[axis]
            frontier = min(frontier, int(np.searchsorted(ends, writer.durable, side="right")))
        if frontier > self.marked:
            self.manifest[self.marked:frontier] = 1
            self.marked = frontier


def _explain(exc: BaseException, path: str) -> BaseException:
    """Turn a full disk into an error that says so and how to continue."""
    if isinstance(exc, OSError) and exc.errno == 28:
        return StoreError(
            f"the disk holding {path} is full ({exc}). Batches written so far are kept and marked; "
            "free space (or move the store) and run again with --resume"
        )
    return exc

