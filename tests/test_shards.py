"""Shard files written by hand (harvest.shards): every reader sees the values that were captured.

The writer is checked against zarr-python's own reading pipeline (checksums verified), tensorstore
and xarray, for every stored dtype, token and per-sequence arrays, several chunk/shard shapes with a
partial last shard; a packed shard is byte-compared with zarr's; a resume inside a shard is
byte-identical; a failed or killed write leaves no file behind that the store does not account for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from harvest.errors import SpecError
from harvest.runner import run
from harvest.shards import (EMPTY, SECTOR, ShardFileWriter, ShardGeometry, direct_io_supported, encode_shard_index,
                            shard_geometry)
from harvest.hookpoints import HookPoint
from harvest.shape import array_plan
from harvest.store import create_activation_array
from harvest.writer import ArrayWriter, EventLoops, remove_unfinished_writes
from sharding.verify import store_differences

#: (rows, row shape, chunk rows, chunks per shard): whole shards, a partial last shard with a partial last
#: chunk, one chunk per shard, a shard longer than the array, a per-sequence 4-d array
SHAPES = [(64, (16,), 8, 2), (45, (4, 6), 4, 3), (23, (32,), 5, 1), (10, (8,), 3, 8), (13, (2, 5, 5), 2, 2)]


def make_array(root: Path, name: str, rows: int, row_shape: tuple, chunk: int, cps: int, dtype: str = "float32",
               compressor: str = "none") -> zarr.Array:
    group = zarr.open_group(str(root), mode="a")
    dims = ("token", *(f"d{i}" for i in range(len(row_shape))))
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    plan = array_plan(HookPoint(name, name, None, dims), (rows, *row_shape), dtype, chunk * row_bytes / 2**20, cps)
    array = create_activation_array(group, plan, compressor=compressor, level=1)
    assert array.chunks[0] == chunk, "the test's shapes must give the chunking they name"
    return array


def values(rows: int, row_shape: tuple, dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal((rows, *row_shape)).astype(dtype)
    return rng.integers(-(2**31), 2**31 - 1, (rows, *row_shape)).astype(dtype)


def write(array: zarr.Array, data: np.ndarray, batches: list[int], start: int = 0, **options) -> ArrayWriter:
    """Append ``data`` from row ``start`` in batches of the given sizes (cycled), then flush."""
    loops = EventLoops(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    writer = ArrayWriter(array, start, loops, **options)
    row, i = start, 0
    while row < len(data):
        n = min(batches[i % len(batches)], len(data) - row)
        writer.append(row, data[row: row + n])
        row, i = row + n, i + 1
    writer.flush()
    loops.close()
    return writer


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
@pytest.mark.parametrize("rows,row_shape,chunk,cps", SHAPES)
def test_every_reader_sees_the_written_values(tmp_path, dtype, rows, row_shape, chunk, cps):
    ts = pytest.importorskip("tensorstore")  # the test extra
    import xarray as xr

    array = make_array(tmp_path / "s.zarr", "x", rows, row_shape, chunk, cps, dtype)
    data = values(rows, row_shape, dtype)
    writer = write(array, data, [7, 1, 12])
    assert writer.shards is not None and writer.durable == rows
    again = zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")
    assert np.array_equal(again[...], data)  # zarr's default pipeline: index and chunk checksums verified
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s.zarr" / "x")}},
                    open=True).result()
    assert np.array_equal(store.read().result(), data)
    ds = xr.open_zarr(str(tmp_path / "s.zarr"), consolidated=False)
    assert np.array_equal(ds["x"].values, data)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


@pytest.mark.parametrize("rows,row_shape,chunk,cps", SHAPES)
def test_a_packed_shard_is_byte_identical_to_zarrs(tmp_path, rows, row_shape, chunk, cps, monkeypatch):
    """With records packed (align 0) the files are exactly zarr's, down to the index of absent chunks."""
    import harvest.shards

    data = values(rows, row_shape, "float16")
    ours = make_array(tmp_path / "a.zarr", "x", rows, row_shape, chunk, cps, "float16")
    theirs = make_array(tmp_path / "b.zarr", "x", rows, row_shape, chunk, cps, "float16")
    monkeypatch.setattr(harvest.shards, "RECORD_ALIGN", 0)
    write(ours, data, [5, 9])
    write(theirs, data, [5, 9], engine="zarr")
    # and a shard flushed part-way (a partial last chunk, absent chunks after it)
    stop = chunk * cps + chunk // 2 + 1 if rows > chunk * cps + chunk else rows // 2 + 1
    write(make_array(tmp_path / "a.zarr", "y", rows, row_shape, chunk, cps, "float16"), data[:stop], [5])
    write(make_array(tmp_path / "b.zarr", "y", rows, row_shape, chunk, cps, "float16"), data[:stop], [5], engine="zarr")
    assert files(tmp_path / "a.zarr") == files(tmp_path / "b.zarr")


@pytest.mark.parametrize("crc", ["crc32c", "crc32c_rs"])
@pytest.mark.parametrize("fuse", [40, 4096])
@pytest.mark.parametrize("rows,row_shape,chunk,cps", SHAPES)
def test_chunks_checksummed_and_written_in_pieces_are_zarrs_bytes(tmp_path, monkeypatch, crc, fuse, rows, row_shape,
                                                                  chunk, cps):
    """Buffered writes go piece by piece (``FUSE_BYTES``), the checksum carried across pieces: with pieces
    smaller than a row (40 bytes) or cutting rows and chunks anywhere, the packed files are still zarr's bytes,
    and the object-store writer, which shares the path, uploads the same shards; with either CRC-32C package
    (``crc32c_rs`` is the optional faster one)."""
    import harvest.shards
    from harvest.shards import ShardObjectWriter

    data = values(rows, row_shape, "float16")
    monkeypatch.setattr(harvest.shards, "crc32c", pytest.importorskip(crc))
    monkeypatch.setattr(harvest.shards, "FUSE_BYTES", fuse)
    monkeypatch.setattr(harvest.shards, "RECORD_ALIGN", 0)
    ours = make_array(tmp_path / "a.zarr", "x", rows, row_shape, chunk, cps, "float16")
    write(ours, data, [5, 9])
    write(make_array(tmp_path / "b.zarr", "x", rows, row_shape, chunk, cps, "float16"), data, [5, 9], engine="zarr")
    assert files(tmp_path / "a.zarr") == files(tmp_path / "b.zarr")
    uploaded = {}
    objects = ShardObjectWriter(lambda key, buf: uploaded.update({key: bytes(buf)}), lambda shard: ours.metadata.encode_chunk_key((shard,) + (0,) * len(row_shape)),
                                shard_geometry(ours, align=0), 0)
    for start in range(0, rows, 7):
        objects.append(data[start: start + 7])
    objects.flush()
    assert {f"x/{k}": v for k, v in uploaded.items()} == {k: v for k, v in files(tmp_path / "a.zarr").items()
                                                          if k.startswith("x/c/")}


def test_an_aligned_shard_puts_every_record_on_a_page(tmp_path):
    array = make_array(tmp_path / "s.zarr", "x", 3000, (1024,), 1000, 2, "float16")
    write(array, values(3000, (1024,), "float16"), [700])
    raw = (tmp_path / "s.zarr" / "x" / "c" / "0" / "0").read_bytes()
    index = np.frombuffer(raw[-2 * 16 - 4: -4], "<u8").reshape(2, 2)
    assert (index[:, 0] % SECTOR == 0).all() and (index[:, 1] == 2_048_000 + 4).all()
    last = np.frombuffer((tmp_path / "s.zarr" / "x" / "c" / "1" / "0").read_bytes()[-36:-4], "<u8").reshape(2, 2)
    assert last[0, 1] == 2_048_004 and (last[1] == EMPTY).all()  # past the array's end: absent, as zarr does


def test_per_sequence_arrays_are_zero_padded_to_the_stores_extent(tmp_path):
    array = make_array(tmp_path / "s.zarr", "p", 9, (2, 6, 6), 2, 2, "float32")
    writer = ArrayWriter(array, 0, EventLoops(__import__("concurrent.futures").futures.ThreadPoolExecutor(1)))
    expected = np.zeros((9, 2, 6, 6), np.float32)
    for start, width in [(0, 4), (3, 6), (5, 2)]:
        n = {0: 3, 3: 2, 5: 4}[start]
        part = values(n, (2, width, width), "float32", seed=start)
        expected[start: start + n, :, :width, :width] = part
        writer.append(start, part)
    writer.flush()
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "p"), mode="r")[...], expected)


@pytest.mark.parametrize("stop", [3, 8, 13, 16])
def test_resume_inside_a_shard_is_byte_identical(tmp_path, stop):
    """A writer flushed part-way (or killed after a whole shard) and resumed at any row ends byte-identical."""
    data = values(30, (12,), "float16")
    clean = make_array(tmp_path / "clean.zarr", "x", 30, (12,), 4, 3, "float16")
    write(clean, data, [5])
    resumed = make_array(tmp_path / "resumed.zarr", "x", 30, (12,), 4, 3, "float16")
    first = write(resumed, data[:stop], [5])  # flushes a partial shard at ``stop``
    assert first.durable == stop
    second = write(resumed, data, [6], start=stop)
    assert second.durable == 30
    assert files(tmp_path / "clean.zarr") == files(tmp_path / "resumed.zarr")


def test_resume_from_a_row_below_a_complete_shard(tmp_path):
    """The batch after the last marked one may start inside a shard already on disk: it is rewritten whole."""
    data = values(24, (8,), "float32")
    clean = make_array(tmp_path / "clean.zarr", "x", 24, (8,), 2, 3, "float32")
    write(clean, data, [5])
    resumed = make_array(tmp_path / "resumed.zarr", "x", 24, (8,), 2, 3, "float32")
    write(resumed, data[:12], [12])
    write(resumed, data, [5], start=7)
    assert files(tmp_path / "clean.zarr") == files(tmp_path / "resumed.zarr")


def test_a_failed_write_leaves_the_old_shard_and_no_temporary_file(tmp_path, monkeypatch):
    data = values(12, (8,), "float32")
    array = make_array(tmp_path / "s.zarr", "x", 12, (8,), 2, 3, "float32")
    write(array, data, [12])
    before = files(tmp_path / "s.zarr")
    calls = {"n": 0}
    real = os.pwritev

    def failing(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    writer = ArrayWriter(array, 0, EventLoops(__import__("concurrent.futures").futures.ThreadPoolExecutor(1)))
    with pytest.raises(OSError, match="No space"):
        writer.append(0, values(12, (8,), "float32", seed=1))
    assert writer.durable == 0
    assert files(tmp_path / "s.zarr") == before  # the shard on disk is the old, whole one


def test_a_killed_write_leaves_only_a_partial_file_that_the_next_writer_removes(tmp_path):
    data = values(12, (8,), "float32")
    array = make_array(tmp_path / "s.zarr", "x", 12, (8,), 2, 3, "float32")
    write(array, data, [12])
    before = files(tmp_path / "s.zarr")
    writer = ArrayWriter(array, 0, EventLoops(__import__("concurrent.futures").futures.ThreadPoolExecutor(1)))
    writer.append(0, values(4, (8,), "float32", seed=1))  # then the process dies: no flush, no discard
    stray = list((tmp_path / "s.zarr").rglob("*.partial"))
    assert len(stray) == 1 and writer.durable == 0
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")[...], data)
    assert remove_unfinished_writes(tmp_path / "s.zarr" / "x") == 1
    assert files(tmp_path / "s.zarr") == before


@pytest.mark.parametrize("policy,expected", [("shard", 4), ("none", 0)])
def test_fsync_policy_flushes_each_shard_before_it_counts(tmp_path, monkeypatch, policy, expected):
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd):
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    array = make_array(tmp_path / "s.zarr", "x", 22, (8,), 2, 3, "float32")
    writer = ArrayWriter(array, 0, EventLoops(__import__("concurrent.futures").futures.ThreadPoolExecutor(1)),
                         fsync=policy)
    writer.append(0, values(6, (8,), "float32"))
    assert writer.durable == 6 and len(synced) == min(expected, 1)  # durable only once synced
    writer.append(6, values(16, (8,), "float32"))
    assert writer.durable == 22 and len(synced) == expected


def test_o_direct_writes_the_same_values_and_falls_back_where_refused(tmp_path, monkeypatch):
    data = values(3000, (2048,), "float16")  # chunks of 1000 rows: 4 MB, a multiple of 4096
    array = make_array(tmp_path / "s.zarr", "x", 3000, (2048,), 1000, 2, "float16")
    writer = write(array, data, [700, 1300], direct_io=True)
    assert writer.shards.direct == direct_io_supported(tmp_path)
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")[...], data)
    real = os.open

    def refusing(path, flags, *args):  # what older tmpfs and some network file systems answer
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    array = make_array(tmp_path / "t.zarr", "x", 3000, (2048,), 1000, 2, "float16")
    writer = write(array, data, [700], direct_io=True)
    assert not writer.shards.direct
    assert np.array_equal(zarr.open_array(str(tmp_path / "t.zarr" / "x"), mode="r")[...], data)


@pytest.mark.parametrize("compressor", ["zstd", "blosc-zstd"])
def test_compressed_arrays_fall_back_to_zarr(tmp_path, compressor):
    array = make_array(tmp_path / "s.zarr", "x", 30, (16,), 4, 2, "float32", compressor=compressor)
    assert shard_geometry(array) is None
    data = values(30, (16,), "float32")
    writer = write(array, data, [7])
    assert writer.shards is None and writer.durable == 30
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")[...], data)


def test_index_encoding_marks_absent_chunks():
    g = ShardGeometry(n_rows=100, chunk_rows=10, shard_rows=40, row_bytes=8, align=0)
    out = np.zeros(g.index_bytes, np.uint8)
    index = encode_shard_index(3, g, out)
    pairs = np.frombuffer(index[:-4].tobytes(), "<u8").reshape(4, 2)
    assert pairs[:3].tolist() == [[0, 84], [84, 84], [168, 84]] and (pairs[3] == EMPTY).all()
    import crc32c

    assert int.from_bytes(index[-4:].tobytes(), "little") == crc32c.crc32c(index[:-4].tobytes())


def test_store_settings_are_checked(neox_ckpt, make_spec):
    with pytest.raises(SpecError, match="store.fsync is 'always'; choose one of shard, none"):
        make_spec(neox_ckpt, store={"path": "x.zarr", "fsync": "always"})
    with pytest.raises(SpecError, match="store.writer"):
        make_spec(neox_ckpt, store={"path": "x.zarr", "writer": "fast"})
    with pytest.raises(SpecError, match="store.direct_io must be true or false"):
        make_spec(neox_ckpt, store={"path": "x.zarr", "direct_io": "yes"})


HOOKS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post", "blocks.{1..2}.attn.hook_z", "blocks.3.attn.hook_pattern"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_harvest_reads_back_the_same_through_every_reader(neox_ckpt, make_spec, dtype):
    """Every array of a store written by the shard writer holds, element by element, what zarr's path stores."""
    ts = pytest.importorskip("tensorstore")  # the test extra
    import xarray as xr

    store = {"chunk_mib": 0.004, "chunks_per_shard": 3}
    capture = {"dtype": dtype, "top_k": 3}
    ours = run(make_spec(neox_ckpt, hooks=HOOKS, capture=capture, run={"write_threads": 2},
                         store={"path": "ours.zarr", **store}), progress=False)
    reference = run(make_spec(neox_ckpt, hooks=HOOKS, capture=capture,
                              store={"path": "ref.zarr", "writer": "zarr", **store}), progress=False)
    problems = store_differences(ours.path, reference.path)
    assert problems and all(p.startswith("bytes differ") for p in problems)  # aligned records; values equal
    group = zarr.open_group(str(ours.path), mode="r")
    ref = zarr.open_group(str(reference.path), mode="r")
    ds = xr.open_zarr(str(ours.path), consolidated=False)
    written = [name for name in group.array_keys() if group[name].metadata.codecs[0].__class__.__name__ == "ShardingCodec"]
    assert {"blocks.3.attn.hook_pattern", "blocks.0.hook_resid_post", "unembed.topk_ids"} <= set(written)
    resid = group["blocks.0.hook_resid_post"]
    assert resid.shape[0] > resid.shards[0] and resid.shape[0] % resid.shards[0]  # several shards, the last partial
    for name in written:
        expected = ref[name][...]
        assert np.array_equal(group[name][...], expected), name
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(ours.path / name)}}, open=True).result()
        assert np.array_equal(t.read().result(), expected), name
        assert np.array_equal(ds[name].values, expected), name
    assert group["_progress/stage_0"][...].all()


def test_buffered_writes_copy_no_row_in_python(tmp_path, monkeypatch):
    """Chunks spanning batches, a short last chunk and a partial flush: nothing goes through a staging copy."""
    def no_copy(self):
        raise AssertionError("a buffered write used the staging buffer")

    monkeypatch.setattr(ShardFileWriter, "_staging", no_copy)
    data = values(50, (16,), "float32")
    array = make_array(tmp_path / "s.zarr", "x", 50, (16,), 4, 3, "float32")
    write(array, data[:17], [3, 5])  # flushed inside a chunk
    write(array, data, [7], start=17)
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")[...], data)


@pytest.mark.parametrize("row_shape,chunk,aligned", [((2048,), 1000, True), ((2048,), 1000, False), ((768,), 8, True)])
def test_o_direct_from_aligned_and_unaligned_batches(tmp_path, row_shape, chunk, aligned):
    """Page-sized rows go piece by piece (from the batch when it is page-aligned, else through the stage);
    other rows chunk by chunk through the stage. The values are the same either way."""
    from harvest.shards import aligned_empty

    rows = 2 * chunk - 1  # the last chunk one row short
    data = values(rows, row_shape, "float16")
    if aligned:  # like pinned host memory
        buf = aligned_empty(data.nbytes).view(np.float16).reshape(data.shape)
        buf[...] = data
        data = buf
    array = make_array(tmp_path / "s.zarr", "x", rows, row_shape, chunk, 1, "float16")
    writer = write(array, data, [chunk // 2 + 1, chunk // 3], direct_io=True)
    assert writer.shards.direct == direct_io_supported(tmp_path)
    assert np.array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "x"), mode="r")[...], data)
