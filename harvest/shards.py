"""Zarr v3's ``sharding_indexed`` layout, read and checked byte by byte without zarr.

A shard file is its inner chunks, each encoded by the inner codecs (``bytes``, an optional
compressor, then ``crc32c``: the chunk's last 4 bytes are the CRC-32C of the bytes before them),
followed (``index_location: end``) or preceded (``start``) by the index: one little-endian
``(offset, length)`` uint64 pair per inner chunk in C order, ``2**64 - 1`` twice for a chunk that
was never written (read as the fill value), then the index's own CRC-32C when its codecs end
with ``crc32c``. Zarr's own reader raises on the first bad checksum without saying which array or
chunk; the functions here name every damaged chunk, and read files directly so that a whole store
is checked at disk speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ShardIndexError

# --- reading and checking --------------------------------------------------------------------------

EMPTY = 2**64 - 1  #: offset and length of an inner chunk that is not in the shard


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli), as zarr's ``crc32c`` codec computes it."""
    from crc32c import crc32c as _crc  # hardware CRC; releases the GIL on large buffers

    return int(_crc(data))


def _has_crc(codecs: list[dict[str, Any]]) -> bool:
    return bool(codecs) and codecs[-1].get("name") == "crc32c"


@dataclass(frozen=True)
class ChunkGrid:
    """Where an array's bytes are: its shape, its storage unit (a shard or a plain chunk) and inner chunks.

    Built from the array's ``zarr.json`` metadata (a dict), so it needs no zarr import.
    """

    shape: tuple[int, ...]
    unit: tuple[int, ...]  #: shape of one stored object: a shard, or a plain chunk
    inner: tuple[int, ...]  #: shape of one inner chunk (== unit when not sharded)
    sharded: bool
    index_at_end: bool
    index_crc: bool
    chunk_crc: bool
    itemsize: int
    compressed: bool  #: a codec between ``bytes`` and ``crc32c``: chunk lengths vary
    separator: str

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ChunkGrid":
        shape = tuple(int(s) for s in meta["shape"])
        unit = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
        enc = meta.get("chunk_key_encoding", {"name": "default"})
        separator = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
        codecs = meta["codecs"]
        itemsize = np.dtype(_numpy_dtype(meta["data_type"])).itemsize
        if codecs and codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            inner_codecs = conf.get("codecs", [])
            return cls(shape, unit, tuple(int(s) for s in conf["chunk_shape"]), True,
                       conf.get("index_location", "end") == "end", _has_crc(conf.get("index_codecs", [])),
                       _has_crc(inner_codecs), itemsize, len(inner_codecs) > 2 or not _has_crc(inner_codecs),
                       separator)
        return cls(shape, unit, unit, False, True, False, _has_crc(codecs), itemsize,
                   len(codecs) > 2 or not _has_crc(codecs), separator)

    @property
    def grid(self) -> tuple[int, ...]:
        """Stored objects per axis."""
        return tuple(-(-s // u) for s, u in zip(self.shape, self.unit))

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(u // c for u, c in zip(self.unit, self.inner))

    @property
    def n_inner(self) -> int:
        return int(np.prod(self.chunks_per_shard, dtype=np.int64))

    @property
    def index_bytes(self) -> int:
        return 16 * self.n_inner + (4 if self.index_crc else 0)

    @property
    def inner_raw_bytes(self) -> int:
        """Encoded length of an uncompressed inner chunk (its values and its checksum)."""
        return int(np.prod(self.inner, dtype=np.int64)) * self.itemsize + (4 if self.chunk_crc else 0)

    def key(self, coords: tuple[int, ...]) -> str:
        """Path of a stored object relative to the array's folder (``c/3/0`` for the default encoding)."""
        if self.separator == "/" or not coords:
            return "c/" + "/".join(str(c) for c in coords) if coords else "c"
        return "c" + self.separator + self.separator.join(str(c) for c in coords)

    def units(self) -> list[tuple[int, ...]]:
        """Coordinates of every stored object, in C order."""
        return [tuple(int(i) for i in idx) for idx in np.ndindex(*self.grid)] if self.shape else [()]

    def inner_coords(self, unit: tuple[int, ...], i: int) -> tuple[int, ...]:
        """Array-wide inner-chunk coordinates of inner chunk ``i`` (C order) of stored object ``unit``."""
        local = np.unravel_index(i, self.chunks_per_shard) if self.sharded else (0,) * len(unit)
        return tuple(int(u * n + l) for u, n, l in zip(unit, self.chunks_per_shard, local))

    def inner_in_bounds(self, coords: tuple[int, ...]) -> bool:
        """Whether an inner chunk holds any element of the array (edge shards hang over the end)."""
        return all(c * n < s for c, n, s in zip(coords, self.inner, self.shape))

    def lead_span(self, coords: tuple[int, ...]) -> tuple[int, int]:
        """[start, stop) along the leading axis of an inner chunk."""
        if not self.shape:
            return 0, 1
        start = coords[0] * self.inner[0]
        return start, min(start + self.inner[0], self.shape[0])


def _numpy_dtype(data_type: Any) -> str:
    if isinstance(data_type, dict):  # structured / parametrised types: a byte count is all we need
        data_type = data_type.get("name", "uint8")
    return {"bool": "bool", "float16": "float16", "float32": "float32", "float64": "float64"}.get(
        str(data_type), str(data_type))


@dataclass(frozen=True)
class ChunkProblem:
    """One damaged inner chunk (or a whole stored object when ``chunk`` is None)."""

    coords: tuple[int, ...] | None  #: array-wide inner-chunk coordinates; None: the whole shard
    what: str  #: what is wrong, in words


MISSING_SHARD = "shard file missing"
MISSING_CHUNK = "chunk missing from its shard (reads as the fill value)"


def read_shard_index(data: bytes | memoryview, grid: ChunkGrid) -> np.ndarray:
    """The ``(n_inner, 2)`` uint64 (offset, length) table of a shard, checked.

    Raises :class:`ShardIndexError` when the file is too short for an index, the index's crc32c does
    not match, or an entry points outside the chunk area or overlaps another.
    """
    size = len(data)
    n = grid.index_bytes
    if size < n:
        raise ShardIndexError(f"file of {size} bytes is shorter than its {n}-byte shard index (truncated)")
    raw = memoryview(data)[size - n:] if grid.index_at_end else memoryview(data)[:n]
    table_bytes = raw[: 16 * grid.n_inner]
    if grid.index_crc:
        stored = int.from_bytes(bytes(raw[-4:]), "little")
        if crc32c(table_bytes) != stored:
            full = grid.n_inner * grid.inner_raw_bytes + n
            if not grid.compressed and size < full:
                raise ShardIndexError(f"file of {size} bytes, a full shard has {full}: truncated (its index is lost)")
            raise ShardIndexError("the shard index's crc32c does not match (the index is corrupted)")
    table = np.frombuffer(bytes(table_bytes), dtype="<u8").reshape(grid.n_inner, 2)
    lo, hi = (0, size - n) if grid.index_at_end else (n, size)
    present = table[:, 0] != EMPTY
    if (table[:, 1][~present] != EMPTY).any():
        raise ShardIndexError("the shard index marks a chunk empty by offset but not by length")
    off, length = table[present, 0], table[present, 1]
    if present.any():
        if (off < lo).any() or (off + length > hi).any() or (length == 0).any():
            bad = int(np.flatnonzero(present)[np.flatnonzero((off < lo) | (off + length > hi) | (length == 0))[0]])
            raise ShardIndexError(f"the shard index places inner chunk {bad} outside the file's chunk bytes "
                                  f"[{lo}, {hi}) (truncated or corrupted)")
        order = np.argsort(off, kind="stable")
        if (off[order][1:] < (off + length)[order][:-1]).any():
            raise ShardIndexError("the shard index has overlapping inner chunks")
    return table


def check_chunk(data: bytes | memoryview, grid: ChunkGrid) -> str | None:
    """What is wrong with one encoded inner chunk, or None when its crc32c (and size) are right."""
    if not grid.compressed and len(data) != grid.inner_raw_bytes:
        return f"{len(data)} bytes where an uncompressed chunk has {grid.inner_raw_bytes}"
    if grid.chunk_crc:
        if len(data) < 4:
            return "shorter than its checksum"
        if crc32c(memoryview(data)[:-4]) != int.from_bytes(bytes(data[-4:]), "little"):
            return "crc32c does not match (the chunk's bytes are corrupted)"
    return None


def check_shard(data: bytes | None, grid: ChunkGrid, unit: tuple[int, ...]) -> list[ChunkProblem]:
    """Every problem of one stored object (shard or plain chunk): [] when intact.

    ``data`` None means the file is missing (:data:`MISSING_SHARD`), and an in-bounds inner chunk the
    index marks empty is :data:`MISSING_CHUNK`: both legitimately read as the fill value, so the caller
    counts them as damage only where rows are claimed written.
    """
    if data is None:
        return [ChunkProblem(None, MISSING_SHARD)]
    if not grid.sharded:
        what = check_chunk(data, grid)
        return [ChunkProblem(grid.inner_coords(unit, 0), what)] if what else []
    try:
        table = read_shard_index(data, grid)
    except ShardIndexError as exc:
        return [ChunkProblem(None, str(exc))]
    view = memoryview(data)
    problems = []
    for i in range(grid.n_inner):
        offset, length = int(table[i, 0]), int(table[i, 1])
        if offset == EMPTY:  # never written: reads as the fill value; the caller decides if rows were due
            coords = grid.inner_coords(unit, i)
            if grid.inner_in_bounds(coords):
                problems.append(ChunkProblem(coords, MISSING_CHUNK))
            continue
        what = check_chunk(view[offset: offset + length], grid)
        if what:
            problems.append(ChunkProblem(grid.inner_coords(unit, i), what))
    return problems
