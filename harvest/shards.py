"""Shard files in Zarr v3's ``sharding_indexed`` layout, written by hand at the speed of the disk.

zarr-python creates every array and its ``zarr.json``; this module only writes the shard files of
the arrays whose codec chain it covers (``shard_geometry`` says which), and zarr's own pipeline
writes the rest (compression). What a shard file holds (zarr-specs, codecs/sharding-indexed):

* inner chunks along the token (or sequence) axis only, so chunk ``j`` of a shard is rows
  ``[j * chunk_rows, (j + 1) * chunk_rows)`` of it: a contiguous slice of the captured batch;
* each chunk encoded by ``[bytes(little endian), crc32c]``: its raw bytes, then the 4-byte
  little-endian crc32c of those bytes (a *record*); a chunk that runs past the array's end is
  stored full-size, padded with the fill value (0); chunks wholly past the end, or not yet written
  in a shard flushed part-way, are absent;
* at the end of the file the index, ``[bytes, crc32c]``-encoded: one little-endian uint64 pair
  (offset, nbytes) per inner chunk in C order (``2**64 - 1`` twice for an absent chunk), then the
  crc32c of those bytes.

The specification allows unused space between records and any order, so record ``j`` sits at
``j * stride``. With ``align=0`` the stride is the record size and a shard is byte-identical to
the one zarr writes; with ``align=4096`` (the default, ``RECORD_ALIGN``) each record starts on a
page, the 4092 bytes after each checksum are a hole, and the kernel copies whole pages instead of
straddling them (bench/RESULTS.md, "Writer"). ``O_DIRECT`` needs that alignment too (buffers,
offsets and lengths on 4 KiB), and needs chunks whose bytes are a multiple of 4096.

Copies per byte, from the captured batch (pinned host memory on a GPU) to the file:

* buffered (the default): **none** in Python, for every row. A chunk's rows go to their place in
  its record straight from their slice of the batch, the crc32c computed over the slice in place
  and carried from one batch to the next when a chunk spans two; ``os.pwritev`` hands slice and
  checksum to the kernel, which copies them once into the page cache. The slice goes in 1 MiB pieces,
  each checksummed just before it is written, so the kernel's copy reads it from the CPU's cache and
  memory is read once for checksum and copy (``FUSE_BYTES``). The rows missing from a
  short chunk (past the array's end, or in a shard flushed part-way) are a hole in the file, which
  reads as the fill value 0, and are checksummed from a small zero buffer;
* ``O_DIRECT``: with rows of a multiple of 4 KiB (d_model 2048+ in fp16), written piece by piece as
  above: **none** from a page-aligned batch (pinned memory: the device DMAs from it), **one** into
  the same place of the writer's chunk-sized staging buffer (allocated once per array, on first
  use) from an unaligned one. Other rows: one, chunk by chunk through the staging buffer, except a
  whole chunk inside one batch at an aligned address;
* per-sequence arrays (attention patterns) narrower than the store's extent: one more, done by the
  caller (``ArrayWriter``) into its zero-padded buffer, reused across batches, as before.

The hot loop makes a memoryview slice and a few ints per chunk piece (chunks are megabytes), no
shard buffer, no ``np.append``, no per-shard allocation (index and checksum buffers are reused).

Crash safety: a shard is written to ``<key>.<token>.partial`` beside its final name and renamed
over it when complete, so the final name always holds a whole shard (old or new); a process killed
mid-shard leaves only a ``.partial`` file, which ``remove_unfinished_writes`` deletes when the
array's next writer starts. A write that fails deletes its own temporary file.

Durability (``store.fsync``): ``"shard"`` (the default) flushes each shard file and its directory to
the device before its rows count as durable, so the manifest never claims a batch a power loss could
take; ``"none"`` leaves that to the kernel's writeback (a crashed process loses nothing, a crashed
machine may).


Reading and checking (``harvest verify``, and the analyses' one-line checksum errors): zarr's own
reader raises on the first bad checksum without saying which array or chunk; the functions under
``# --- reading and checking`` read shard files directly (no zarr import), check the index and every
inner chunk, and name each damaged chunk, so a whole store is checked at disk speed. They read any
shard in this layout, whether written here or by zarr (packed, compressed, index at either end).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # optional (``harvest[fast-crc]``): the same CRC-32C, about twice the speed per core where the CPU has
    # VPCLMULQDQ (AVX-512), the same call ``crc32c(data, value=0)``, the GIL released from 32 KiB up
    import crc32c_rs as crc32c
except ImportError:
    import crc32c
import numpy as np

from .errors import ShardIndexError

log = logging.getLogger(__name__)

# --- writing ------------------------------------------------------------------------------------

#: alignment of chunk records and of O_DIRECT buffers, offsets and lengths (the page size)
SECTOR = 4096
#: record alignment of buffered writes: 0 packs records as zarr does; 4096 starts each on a page
RECORD_ALIGN = SECTOR
#: the index entry of an absent chunk
EMPTY = 2**64 - 1
FSYNC_POLICIES = ("shard", "none")
#: suffix of a shard being written (zarr's LocalStore uses the same one for its own)
PARTIAL_SUFFIX = ".partial"
_ZEROS = np.zeros(1 << 16, dtype=np.uint8)  #: checksummed in place of a short chunk's missing rows
#: buffered writes: bytes checksummed then written per call, small enough to stay in a core's L2 cache
#: between the two (``_write_checksummed``); 512 KiB to 2 MiB measured alike on a 1 MiB-L2 core
FUSE_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardGeometry:
    """Where the records of one array's shards lie in their files."""

    n_rows: int  #: length of the array along its first axis
    chunk_rows: int
    shard_rows: int
    row_bytes: int
    align: int = RECORD_ALIGN  #: 0: packed exactly as zarr packs them

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    @property
    def record_bytes(self) -> int:
        """One encoded chunk: its bytes and its checksum."""
        return self.chunk_bytes + 4

    @property
    def stride(self) -> int:
        return self.record_bytes if not self.align else -(-self.record_bytes // self.align) * self.align

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def shard_end(self, shard: int) -> int:
        return min((shard + 1) * self.shard_rows, self.n_rows)


def shard_geometry(array, align: int | None = None, *, any_store: bool = False) -> ShardGeometry | None:
    """The geometry of ``array``'s shards, or None when this module does not encode its codec chain.

    Covered: a local file-system store (any zarr store with ``any_store``: ``ShardObjectWriter``); one ``sharding_indexed`` codec with the index at the end,
    inner codecs ``[bytes(little), crc32c]`` and index codecs ``[bytes(little), crc32c]``; inner
    chunks and shards that span every axis but the first; fill value 0; a little-endian machine.
    Anything else (compression above all) is written by zarr-python.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.storage import LocalStore

    def bytes_crc(codecs) -> bool:
        return (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
                and (codecs[0].endian is None or codecs[0].endian.value == "little"))

    meta = array.metadata
    codecs = getattr(meta, "codecs", ())
    if (sys.byteorder != "little" or not (any_store or isinstance(array.store_path.store, LocalStore)) or len(codecs) != 1
            or not isinstance(codecs[0], ShardingCodec)):
        return None
    sharding = codecs[0]
    try:
        dtype = np.dtype(array.dtype)
        if (sharding.index_location.value != "end" or not bytes_crc(sharding.codecs)
                or not bytes_crc(sharding.index_codecs) or dtype.hasobject or not dtype.isnative):
            return None
        shape, chunk, shard = tuple(array.shape), tuple(sharding.chunk_shape), tuple(meta.chunk_grid.chunk_shape)
    except (AttributeError, TypeError):  # a zarr whose internals moved: its own pipeline writes
        return None
    if not shape or chunk[1:] != shape[1:] or shard[1:] != shape[1:] or shard[0] % chunk[0]:
        return None
    if np.asarray(array.fill_value, dtype=dtype).tobytes() != bytes(dtype.itemsize):
        return None
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    return ShardGeometry(shape[0], chunk[0], shard[0], row_bytes, RECORD_ALIGN if align is None else align)


def aligned_empty(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned uint8 buffer (anonymous memory: O_DIRECT accepts it)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]


def encode_shard_index(n_chunks: int, geometry: ShardGeometry, out: np.ndarray) -> np.ndarray:
    """The encoded index of a shard whose first ``n_chunks`` records are written, into ``out``.

    ``out``: a uint8 buffer of at least ``geometry.index_bytes``; returns the view holding the index
    (one ``<u8`` (offset, nbytes) pair per chunk, ``EMPTY`` for absent ones, then its crc32c).
    """
    n = geometry.chunks_per_shard
    body = out[: 16 * n].view("<u8").reshape(n, 2)
    body[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * np.uint64(geometry.stride)
    body[:n_chunks, 1] = geometry.record_bytes
    body[n_chunks:] = EMPTY
    struct.pack_into("<I", out, 16 * n, crc32c.crc32c(out[: 16 * n]))
    return out[: geometry.index_bytes]


def shard_file_bytes(n_chunks: int, geometry: ShardGeometry) -> int:
    """Size of a shard file holding ``n_chunks`` records."""
    return n_chunks * geometry.stride + geometry.index_bytes


def direct_io_supported(directory: Path) -> bool:
    """Whether the file system under ``directory`` accepts ``O_DIRECT`` (tmpfs does not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / f".direct-probe.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        buf = aligned_empty(SECTOR)
        os.pwrite(fd, buf, 0)  # some file systems accept the flag and refuse the write
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class ShardFileWriter:
    """Appends rows to one array's shard files, in order, one shard at a time.

    Rows arrive as arrays of the array's dtype and full row shape, starting at ``start``. A shard's
    file is complete, renamed into place and (``fsync``) on the device when its last row arrives,
    or on ``flush`` for the rows so far; ``durable`` is the row up to which that holds. A shard is
    always written whole from its first row: when the next row is not on a shard boundary (a
    resume, or rows after a ``flush``), ``needs_prefix`` is true and the caller hands the shard's
    rows already on disk to ``restart_shard`` first. One writer per array, one thread at a time.
    """

    def __init__(self, array_dir: Path, chunk_key, geometry: ShardGeometry, start: int, *,
                 direct: bool = False, fsync: str = "shard"):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy {fsync!r}: choose one of {', '.join(FSYNC_POLICIES)}")
        if direct and (geometry.chunk_bytes % SECTOR or (geometry.align and geometry.align % SECTOR)):
            log.info("%s: chunks of %d bytes are not a multiple of %d: buffered writes, not O_DIRECT",
                     array_dir, geometry.chunk_bytes, SECTOR)
            direct = False
        if direct:  # O_DIRECT records start on pages whatever the buffered alignment
            geometry = ShardGeometry(geometry.n_rows, geometry.chunk_rows, geometry.shard_rows, geometry.row_bytes, SECTOR)
        self.dir = Path(array_dir)
        self.chunk_key = chunk_key  #: shard number -> key relative to the array, e.g. "c/3/0"
        self.geometry = geometry
        self.direct = direct
        self.fsync = fsync == "shard"
        self.durable = start  #: rows [.., durable) are in renamed shard files
        self.cursor = start  #: the next row expected
        g = geometry
        self._stage: np.ndarray | None = None  #: O_DIRECT only (``_staging``)
        self._staged = 0  #: O_DIRECT: rows in the staging buffer
        self._in_chunk = 0  #: written piece by piece: rows of the open chunk already in the file
        self._crc = 0  #: crc32c of those rows
        self._tail = aligned_empty(SECTOR)  #: a record's checksum, then zeros up to the next page
        self._index = aligned_empty(-(-g.index_bytes // SECTOR) * SECTOR)
        #: the encoded index of a full shard, the same for every one: encoded once
        self._full_index = bytes(encode_shard_index(g.chunks_per_shard, g, self._index))
        self._token = uuid.uuid4().hex
        self._dir = os.fspath(self.dir)  #: paths of the hot path are strings (``pathlib`` costs µs per call)
        self._fd: int | None = None
        self._tmp: str | None = None
        self._final: str | None = None
        self._new_dirs: list[str] = []
        self._chunks = 0  #: records written to the open shard

    # --- the hot path ----------------------------------------------------------------------------

    @property
    def shard_start(self) -> int:
        return self.cursor // self.geometry.shard_rows * self.geometry.shard_rows

    @property
    def needs_prefix(self) -> bool:
        """The next row is inside a shard this writer has not opened: ``restart_shard`` first."""
        return self._fd is None and self.cursor % self.geometry.shard_rows != 0 and self.cursor < self.geometry.n_rows

    def restart_shard(self, prefix: np.ndarray) -> None:
        """Open the shard holding ``cursor`` again with ``prefix``, its rows ``[shard_start, cursor)`` read back."""
        if len(prefix) != self.cursor - self.shard_start:
            raise ValueError(f"{self.dir.name}: restarting shard at row {self.shard_start} needs "
                             f"{self.cursor - self.shard_start} rows, got {len(prefix)}")
        self.cursor = self.shard_start
        self._append(prefix)

    def append(self, data: np.ndarray) -> None:
        """Write rows ``[cursor, cursor + len(data))``; complete shards go durable on the way."""
        if self.needs_prefix:
            raise ValueError(f"{self.dir.name}: row {self.cursor} is inside a shard; restart_shard first")
        self._append(data)

    def _append(self, data: np.ndarray) -> None:
        g = self.geometry
        if self.cursor + len(data) > g.n_rows:
            raise ValueError(f"{self.dir.name}: rows up to {self.cursor + len(data)} do not fit {g.n_rows}")
        if data.nbytes != len(data) * g.row_bytes:
            raise ValueError(f"{self.dir.name}: rows of {data.nbytes // max(len(data), 1)} bytes, expected {g.row_bytes}")
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)  # one copy; captures are contiguous
        flat = memoryview(data.reshape(-1).view(np.uint8))
        try:
            pos, left = 0, len(data)
            while left:
                if self._fd is None:
                    self._open_shard()
                shard_end = g.shard_end(self.cursor // g.shard_rows)
                take = min(left, g.chunk_rows - self._in_chunk - self._staged, shard_end - self.cursor)
                piece = flat[pos: pos + take * g.row_bytes]
                if not self.direct:  # straight to its place in the record, the checksum carried over
                    self._write_piece(piece, take)
                elif g.row_bytes % SECTOR == 0:  # O_DIRECT with page-sized rows: every piece is aligned but its address
                    if _address(piece) % SECTOR:  # an unaligned batch: one copy, to the same place in the stage
                        at = self._in_chunk * g.row_bytes
                        piece = self._staging()[at: at + len(piece)]
                        piece[...] = flat[pos: pos + take * g.row_bytes]
                    self._write_piece(piece, take)
                elif not self._staged and take == g.chunk_rows:
                    self._write_slice(piece)
                else:  # O_DIRECT, part of a chunk: gather it in the staging buffer
                    at = self._staged * g.row_bytes
                    self._staging()[at: at + len(piece)] = piece
                    self._staged += take
                    if self._staged == g.chunk_rows:
                        self._write_staged()
                self.cursor += take
                pos += take * g.row_bytes
                left -= take
                if self.cursor == shard_end:
                    self._finish_shard()
        except BaseException:
            self.discard()
            raise

    def flush(self) -> None:
        """Make the rows so far durable: the open shard is completed with what it holds."""
        if self._fd is None:
            return
        try:
            self._finish_shard()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the open shard's temporary file (rows since ``durable`` must be appended again)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
        self._staged, self._in_chunk, self._crc, self._chunks, self.cursor = 0, 0, 0, 0, self.durable

    # --- records ---------------------------------------------------------------------------------

    def _write_piece(self, piece, rows: int) -> None:
        """Rows of the open chunk at their offset in its record, whatever batch they came in (buffered, or
        O_DIRECT with page-sized rows); the checksum is carried from piece to piece."""
        g = self.geometry
        at = self._chunks * g.stride + self._in_chunk * g.row_bytes
        self._in_chunk += rows
        if self._in_chunk < g.chunk_rows:
            self._crc = self._write_checksummed(piece, at, self._crc, last=False)
            return
        self._write_checksummed(piece, at, self._crc, last=True)
        self._chunks, self._in_chunk, self._crc = self._chunks + 1, 0, 0

    def _write_checksummed(self, data: memoryview, at: int, crc: int, *, last: bool) -> int:
        """Write ``data`` at ``at``, folding it into the running checksum ``crc``; ``last``: the record's
        checksum follows it. Returns the checksum so far.

        Buffered, ``data`` goes in ``FUSE_BYTES`` pieces, each checksummed just before the kernel copies
        it into the page cache: the copy then reads the piece from the CPU's cache, not from memory, so
        memory is read about once for both. This saves more CPU than the checksum costs beyond raw
        writes of the same bytes (bench/RESULTS.md, "Writer"). O_DIRECT's device reads memory itself,
        so it gets one write as large as possible.
        """
        step = max(len(data), 1) if self.direct else FUSE_BYTES
        for lo in range(0, len(data), step):
            piece = data[lo: lo + step]
            crc = crc32c.crc32c(piece, crc)
            if last and lo + step >= len(data):
                struct.pack_into("<I", self._tail, 0, crc)
                self._pwritev([piece, self._tail if self.direct else self._tail[:4]], at + lo)
            else:
                self._pwritev([piece], at + lo)
        return crc

    def _end_piecewise_record(self) -> None:
        """Close a chunk cut short (array end, flush). Its missing rows are the fill value, 0:
        left as a hole in the file, which reads as zeros, and fed to the checksum as zeros."""
        g = self.geometry
        missing = (g.chunk_rows - self._in_chunk) * g.row_bytes
        crc = self._crc
        while missing:
            n = min(missing, len(_ZEROS))
            crc = crc32c.crc32c(_ZEROS[:n], crc)
            missing -= n
        struct.pack_into("<I", self._tail, 0, crc)
        self._pwritev([self._tail if self.direct else self._tail[:4]], self._chunks * g.stride + g.chunk_bytes)
        self._chunks, self._in_chunk, self._crc = self._chunks + 1, 0, 0

    def _staging(self) -> np.ndarray:
        """O_DIRECT: one chunk plus its checksum page, allocated once, for records that cannot go from their slice."""
        if self._stage is None:
            self._stage = aligned_empty(self.geometry.chunk_bytes + SECTOR)
        return self._stage

    def _write_slice(self, chunk: memoryview) -> None:
        """One whole chunk from its slice of the batch: checksum in place, no copy."""
        if self.direct and (_address(chunk) % SECTOR):
            self._staging()[: len(chunk)] = chunk  # O_DIRECT needs an aligned source
            self._staged = self.geometry.chunk_rows
            self._write_staged()
            return
        self._write_checksummed(chunk, self._chunks * self.geometry.stride, 0, last=True)
        self._chunks += 1

    def _write_staged(self) -> None:
        """The staging buffer as one record; rows past ``_staged`` are the fill value."""
        g = self.geometry
        self._staging()
        used = self._staged * g.row_bytes
        if used < g.chunk_bytes:
            self._stage[used: g.chunk_bytes] = 0
        struct.pack_into("<I", self._stage, g.chunk_bytes, crc32c.crc32c(self._stage[: g.chunk_bytes]))
        self._stage[g.chunk_bytes + 4:] = 0
        record = self._stage[: g.stride] if self.direct else self._stage[: g.record_bytes]
        self._pwritev([record], self._chunks * g.stride)
        self._chunks += 1
        self._staged = 0

    def _pwritev(self, buffers: list, offset: int) -> None:
        done = os.pwritev(self._fd, buffers, offset)
        total = sum(map(len, buffers))
        while done < total:  # short writes are rare (signals, quotas): finish them plainly
            rest = b"".join(bytes(b) for b in buffers)[done:]
            done += os.pwrite(self._fd, rest, offset + done)

    # --- shard files -----------------------------------------------------------------------------

    def _open_shard(self) -> None:
        shard = self.cursor // self.geometry.shard_rows
        final = os.path.join(self._dir, self.chunk_key(shard))
        parent, name = os.path.split(final)
        self._new_dirs = _make_dirs(parent, self._dir)
        self._final = final
        self._tmp = os.path.join(parent, f"{name}.{self._token}{PARTIAL_SUFFIX}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        if self.direct:
            try:
                self._fd = os.open(self._tmp, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                log.info("%s: the file system refuses O_DIRECT (%s): buffered writes", self.dir, exc)
                self.direct = False
        if self._fd is None:
            self._fd = os.open(self._tmp, flags, 0o644)
        self._chunks = 0

    def _finish_shard(self) -> None:
        """Last record, index, (fsync), rename: the shard's rows are durable."""
        g = self.geometry
        if self._staged:
            self._write_staged()
        if self._in_chunk:
            self._end_piecewise_record()
        at = self._chunks * g.stride
        if self.direct:  # whole pages from an aligned buffer, then cut the file to its size
            encode_shard_index(self._chunks, g, self._index)
            self._pwritev([self._index[: -(-g.index_bytes // SECTOR) * SECTOR]], at)
            os.ftruncate(self._fd, at + g.index_bytes)
        else:
            self._pwritev([self._full_index if self._chunks == g.chunks_per_shard
                           else encode_shard_index(self._chunks, g, self._index)], at)
        if self.fsync:
            os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self._final)
        self._tmp = None
        if self.fsync:
            _fsync_dir(os.path.dirname(self._final))
            for new in self._new_dirs:
                _fsync_dir(os.path.dirname(new))
        self._new_dirs = []
        self.durable = self.cursor


class ShardObjectWriter(ShardFileWriter):
    """The same shards for an object store (``s3://``, ``gs://``): encoded into one buffer, then uploaded whole.

    Object stores have no rename and no partial files, but an upload replaces an object atomically:
    a reader sees the old shard or the new one. So the records and the index go into a buffer at the
    offsets ``ShardFileWriter`` would write them at (``_pwritev`` copies into the buffer: the one copy
    per byte, where the file writer's is the kernel's), and ``put(key, buffer)`` uploads the whole
    shard (``harvest.objstore.put_object``: one PUT, or parts in parallel for a large shard; a failed
    multipart upload is aborted and leaves no object); its rows are durable when it returns (the
    client retries transient errors, bounded). Records are packed (``align=0``): the bytes zarr would
    write, and no padding to upload.
    """

    def __init__(self, put, chunk_key, geometry: ShardGeometry, start: int):
        super().__init__(Path("."), chunk_key, geometry, start, direct=False, fsync="none")
        self.put = put  #: (key relative to the array, bytes-like) -> None, once per shard
        self._buf: np.ndarray | None = None
        self._key: str | None = None

    def _open_shard(self) -> None:
        g = self.geometry
        self._key = self.chunk_key(self.cursor // g.shard_rows)
        if self._buf is None:
            self._buf = np.zeros(shard_file_bytes(g.chunks_per_shard, g), dtype=np.uint8)
        else:
            self._buf[...] = 0  # rows missing from a short chunk read as the fill value
        self._fd = -1  # a shard is open (the base class tests ``_fd``); no file behind it
        self._chunks = 0

    def _pwritev(self, buffers: list, offset: int) -> None:
        for b in buffers:
            part = np.frombuffer(b, dtype=np.uint8)
            self._buf[offset: offset + len(part)] = part
            offset += len(part)

    def _finish_shard(self) -> None:
        """Last record, index, the upload: the shard's rows are durable."""
        g = self.geometry
        if self._in_chunk:
            self._end_piecewise_record()
        at = self._chunks * g.stride
        self._buf[at: at + g.index_bytes] = encode_shard_index(self._chunks, g, self._index)
        self.put(self._key, memoryview(self._buf)[: at + g.index_bytes])
        self._fd = None
        self.durable = self.cursor

    def discard(self) -> None:
        """Forget the open shard (nothing of it was uploaded: rows since ``durable`` come again)."""
        self._fd = None
        self._staged, self._in_chunk, self._crc, self._chunks, self.cursor = 0, 0, 0, 0, self.durable


def _address(buffer: memoryview) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def _make_dirs(directory: str, root: str) -> list[str]:
    """Create ``directory`` and its missing parents below ``root``; the ones created, deepest first.

    One ``mkdir`` when only the directory itself is new (zarr's key ``c/<shard>/0`` makes one per
    shard), nothing more when it exists; its parents are looked at only when they are missing."""
    try:
        os.mkdir(directory)
        return [directory]
    except FileExistsError:
        return []
    except FileNotFoundError:
        if directory == root or len(directory) <= len(root):
            raise
    created = _make_dirs(os.path.dirname(directory), root)
    try:
        os.mkdir(directory)
    except FileExistsError:
        return created
    return [directory, *created]


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (zarr) and its directory to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


# --- reading and checking --------------------------------------------------------------------------

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


def shard_index_span(size: int, grid: ChunkGrid) -> tuple[int, int]:
    """[start, stop) of the index inside a stored shard of ``size`` bytes (what a ranged read fetches first)."""
    n = min(grid.index_bytes, size)
    return (size - n, size) if grid.index_at_end else (0, n)


def read_shard_index(data: bytes | memoryview, grid: ChunkGrid, size: int | None = None) -> np.ndarray:
    """The ``(n_inner, 2)`` uint64 (offset, length) table of a shard, checked.

    ``data``: the whole shard; or, with ``size`` (the stored object's length), only its index bytes
    (``shard_index_span``), as a ranged read of an object store fetches them.
    Raises :class:`ShardIndexError` when the file is too short for an index, the index's crc32c does
    not match, or an entry points outside the chunk area or overlaps another.
    """
    whole = size is None
    size = len(data) if size is None else size
    n = grid.index_bytes
    if size < n:
        raise ShardIndexError(f"file of {size} bytes is shorter than its {n}-byte shard index (truncated)")
    raw = memoryview(data)
    if whole:
        raw = raw[size - n:] if grid.index_at_end else raw[:n]
    table_bytes = raw[: 16 * grid.n_inner]
    if grid.index_crc:
        stored = int.from_bytes(bytes(raw[-4:]), "little")
        if crc32c.crc32c(table_bytes) != stored:
            # a full shard: records packed (zarr) or each on its own page (``ShardFileWriter``'s default)
            record = grid.inner_raw_bytes
            full = grid.n_inner * record + n
            full_aligned = grid.n_inner * -(-record // RECORD_ALIGN) * RECORD_ALIGN + n
            if not grid.compressed and (size < full or full < size < full_aligned):
                raise ShardIndexError(f"file of {size} bytes, a full shard has {full} (or {full_aligned} with "
                                      "page-aligned chunks): truncated (its index is lost)")
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
        if crc32c.crc32c(memoryview(data)[:-4]) != int.from_bytes(bytes(data[-4:]), "little"):
            return "crc32c does not match (the chunk's bytes are corrupted)"
    return None


def check_shard(data: bytes | None, grid: ChunkGrid, unit: tuple[int, ...]) -> list[ChunkProblem]:
    """Every problem of one stored object (shard or plain chunk) read whole: [] when intact.

    ``data`` None means the file is missing (:data:`MISSING_SHARD`), and an in-bounds inner chunk the
    index marks empty is :data:`MISSING_CHUNK`: both legitimately read as the fill value, so the caller
    counts them as damage only where rows are claimed written.
    """
    if data is None:
        return [ChunkProblem(None, MISSING_SHARD)]
    view = memoryview(data)
    return check_stored(len(view), lambda spans: [view[a:b] for a, b in spans], grid, unit)[0]


def check_stored(size: int, read, grid: ChunkGrid, unit: tuple[int, ...],
                 budget: int | None = None) -> tuple[list[ChunkProblem], int]:
    """Every problem of one stored object of ``size`` bytes, and the bytes read to find them.

    ``read(spans)`` returns the bytes of each ``[start, stop)`` of the object: slices of a file read
    whole, or ranged GETs of an object store. A shard is read in two steps: its index
    (``shard_index_span``), then the records that index points to, in calls of at most ``budget``
    bytes (at least one record each; None: one call), so a store client fetches adjacent records
    together while the bytes held at once stay bounded. A shard whose index is damaged is not read further.
    """
    if not grid.sharded:
        (data,) = read([(0, size)])
        what = check_chunk(data, grid)
        return ([ChunkProblem(grid.inner_coords(unit, 0), what)] if what else []), size
    start, stop = shard_index_span(size, grid)
    (raw,) = read([(start, stop)])
    try:
        table = read_shard_index(raw, grid, size=size)
    except ShardIndexError as exc:
        return [ChunkProblem(None, str(exc))], stop - start
    problems = []
    present = []
    for i in range(grid.n_inner):
        if int(table[i, 0]) == EMPTY:  # never written: reads as the fill value; the caller decides if rows were due
            coords = grid.inner_coords(unit, i)
            if grid.inner_in_bounds(coords):
                problems.append(ChunkProblem(coords, MISSING_CHUNK))
        else:
            present.append(i)
    spans = [(int(table[i, 0]), int(table[i, 0] + table[i, 1])) for i in present]
    first = 0
    while first < len(spans):
        last, held = first + 1, spans[first][1] - spans[first][0]
        while last < len(spans) and (budget is None or held + spans[last][1] - spans[last][0] <= budget):
            held += spans[last][1] - spans[last][0]
            last += 1
        for i, record in zip(present[first:last], read(spans[first:last])):
            what = check_chunk(record, grid)
            if what:
                problems.append(ChunkProblem(grid.inner_coords(unit, i), what))
        first = last
    problems.sort(key=lambda p: p.coords or ())
    return problems, stop - start + sum(b - a for a, b in spans)
