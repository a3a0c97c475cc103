"""Issue 16 item 2: a corrupted chunk is named (array, chunk, rows, batches), analyses say so in one line,
and ``--redo-rows`` repairs exactly those shards, ending byte-identical to a fresh run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from harvest.errors import CorruptChunkError
from harvest.runner import run
from harvest.shards import ChunkGrid, check_shard, read_shard_index
from harvest.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.*.hook_resid_post", "blocks.1.ln1.hook_normalized", "blocks.0.attn.hook_pattern"]
ARRAY = "blocks.1.hook_resid_post"


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of the store except the root metadata (timestamps, run figures): as tests/test_resume.py."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p != root / "zarr.json"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "harvest", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def stores(neox_ckpt, make_spec):
    """(spec of the store to damage, its path, a fresh run's store of the same job elsewhere)."""
    # statistics off: the query then reads the index, whose damage a test below names
    spec = make_spec(neox_ckpt, hooks=HOOKS, run={"batch_size": 2}, capture={"statistics": False})
    fresh = make_spec(neox_ckpt, hooks=HOOKS, run={"batch_size": 2}, capture={"statistics": False},
                      store={"path": "fresh.zarr"})
    return spec, run(spec, progress=False).path, run(fresh, progress=False).path


def flip(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_shard_index_read_by_hand_matches_zarr(stores):
    _, path, _ = stores
    arr = zarr.open_group(str(path), mode="r")[ARRAY]
    grid = ChunkGrid.from_metadata(arr.metadata.to_dict())
    assert grid.sharded and grid.chunks_per_shard[0] >= 2 and grid.index_crc and grid.chunk_crc
    values = arr[...]
    for unit in grid.units():
        data = (path / ARRAY / grid.key(unit)).read_bytes()
        table = read_shard_index(data, grid)
        assert check_shard(data, grid, unit) == []
        for i, (offset, length) in enumerate(table):
            coords = grid.inner_coords(unit, i)
            if not grid.inner_in_bounds(coords):
                continue
            raw = np.frombuffer(data[offset: offset + length - 4], dtype=arr.dtype).reshape(grid.inner)
            lo, hi = grid.lead_span(coords)
            np.testing.assert_array_equal(raw[: hi - lo], values[lo:hi])


def test_intact_store_verifies_clean(stores):
    _, path, _ = stores
    report = verify_store(path)
    assert report.ok and report.objects > 10 and report.bytes_read > 0
    done = cli("verify", str(path))
    assert done.returncode == 0, done.stderr
    assert "intact" in done.stdout


def test_corrupted_chunk_is_named_then_redo_rows_repairs_it_byte_identical(stores):
    spec, path, fresh = stores
    arr = zarr.open_group(str(path), mode="r")[ARRAY]
    grid = ChunkGrid.from_metadata(arr.metadata.to_dict())
    shard = path / ARRAY / grid.key((1, 0))
    table = read_shard_index(shard.read_bytes(), grid)
    flip(shard, int(table[1, 0]) + 8)  # 16 bytes inside the second inner chunk of the second shard

    # the fault as filed: inspect called the store complete and said nothing
    report = verify_store(path)
    assert not report.ok and len(report.damages) == 1
    d = report.damages[0]
    chunk = grid.chunks_per_shard[0] + 1
    rows = (chunk * grid.inner[0], min((chunk + 1) * grid.inner[0], arr.shape[0]))
    assert (d.array, d.chunk, d.rows) == (ARRAY, (chunk, 0), rows)
    seq = zarr.open_group(str(path), mode="r")["seq"][...]
    assert d.batches == (int(seq[rows[0]]) // 2, int(seq[rows[1] - 1]) // 2)
    assert "crc32c" in d.what and report.redo_rows() == [rows]

    shown = cli("verify", str(path))
    assert shown.returncode == 1
    assert f"{ARRAY} chunk {chunk},0" in shown.stdout and f"token rows {rows[0]}:{rows[1]}" in shown.stdout
    assert f"--redo-rows {rows[0]}:{rows[1]}" in shown.stdout
    inspected = cli("inspect", str(path), "--verify")
    assert inspected.returncode == 1 and "DAMAGED" in inspected.stdout

    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    run(spec, resume=True, redo_rows=report.redo_rows(), progress=False)
    assert verify_store(path).ok
    a, b = store_files(path), store_files(fresh)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # only the shards holding those rows were rewritten (one per activation array), nothing else
    touched = {str(p.relative_to(path)) for p, t in before.items() if p.stat().st_mtime_ns != t}
    touched.discard("zarr.json")
    assert f"{ARRAY}/c/1/0" in touched
    assert all(name.split("/c/")[0] in {h for h in zarr.open_group(str(path)).attrs["harvest"]["hooks"]}
               for name in touched), touched
    n_shards = sum(1 for p in before if "/c/" in str(p.relative_to(path)) and str(p.relative_to(path)).split("/c/")[0]
                   in zarr.open_group(str(path)).attrs["harvest"]["hooks"])
    assert len(touched) < n_shards


def test_index_damage_truncation_and_missing_shard_are_each_named(stores):
    _, path, _ = stores
    grid = ChunkGrid.from_metadata(zarr.open_group(str(path), mode="r")[ARRAY].metadata.to_dict())
    flip(path / ARRAY / grid.key((0, 0)), len((path / ARRAY / grid.key((0, 0))).read_bytes()) - 12, 4)
    other = path / "blocks.2.hook_resid_post" / grid.key((0, 0))
    other.write_bytes(other.read_bytes()[:-40])
    (path / "blocks.3.hook_resid_post" / grid.key((0, 0))).unlink()
    flip(path / "seq_length" / "c" / "0", 2, 1)
    report = verify_store(path)
    by_array = {d.array: d for d in report.damages}
    assert set(by_array) == {ARRAY, "blocks.2.hook_resid_post", "blocks.3.hook_resid_post", "seq_length"}
    assert "index" in by_array[ARRAY].what and by_array[ARRAY].chunk is None
    assert "truncated" in by_array["blocks.2.hook_resid_post"].what
    assert "missing" in by_array["blocks.3.hook_resid_post"].what and by_array["blocks.3.hook_resid_post"].rows[0] == 0
    assert "--overwrite" in by_array["seq_length"].fix
    assert any("--redo-rows 0:" in c for c in report.repair_commands())


def test_missing_shard_of_unwritten_batches_is_not_damage(stores):
    _, path, _ = stores
    g = zarr.open_group(str(path), mode="r+")
    g["_progress/stage_0"][1:] = 0  # an interrupted run: only batch 0 is written
    grid = ChunkGrid.from_metadata(g[ARRAY].metadata.to_dict())
    (path / ARRAY / grid.key((grid.grid[0] - 1, 0))).unlink()
    assert verify_store(path).ok
    g["_progress/stage_0"][:] = 1
    assert [d.what for d in verify_store(path).damages] == ["shard file missing"]


def test_chunk_marked_empty_in_a_written_shard_is_named(stores):
    from crc32c import crc32c

    _, path, _ = stores
    grid = ChunkGrid.from_metadata(zarr.open_group(str(path), mode="r")[ARRAY].metadata.to_dict())
    shard = path / ARRAY / grid.key((0, 0))
    data = bytearray(shard.read_bytes())
    table = read_shard_index(bytes(data), grid).copy()
    table[1] = 2**64 - 1  # a valid index that lost inner chunk 1: zarr would read zeros without a word
    index = table.astype("<u8").tobytes()
    data[-grid.index_bytes:] = index + crc32c(index).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")[ARRAY][grid.inner[0]:2 * grid.inner[0]], 0)
    (d,) = verify_store(path).damages
    assert (d.array, d.chunk, d.rows) == (ARRAY, (1, 0), (grid.inner[0], 2 * grid.inner[0]))
    assert "missing" in d.what and f"--redo-rows {grid.inner[0]}:{2 * grid.inner[0]}" in verify_store(path).format()


def test_analyses_stop_with_one_line_naming_the_chunk(stores):
    _, path, _ = stores
    grid = ChunkGrid.from_metadata(zarr.open_group(str(path), mode="r")[ARRAY].metadata.to_dict())
    shard = path / ARRAY / grid.key((0, 0))
    flip(shard, 20)
    for args in (["analyze", "outliers", str(path), "--no-plots", "--no-write"], ["index", str(path)]):
        done = cli(*args)
        assert done.returncode == 2, done.stderr
        err = done.stderr.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert ARRAY in err and "chunk 0,0" in err and "token rows 0:" in err and "--redo-rows 0:" in err

    from analysis.reading import lazy_array

    with pytest.raises(CorruptChunkError, match=r"blocks\.1\.hook_resid_post chunk 0,0.*--redo-rows"):
        lazy_array(zarr.open_group(str(path), mode="r"), ARRAY).compute()
    with pytest.raises(ValueError):  # callers that caught zarr's ValueError still do
        lazy_array(zarr.open_group(str(path), mode="r"), ARRAY).compute()


def test_redo_rows_is_checked(stores):
    spec, path, _ = stores
    from harvest.errors import SpecError
    from harvest.redo import parse_rows

    assert parse_rows("0:5,10:12") == [(0, 5), (10, 12)]
    for bad in ("5", "5:2", "a:b", "0:10**9"):
        with pytest.raises(SpecError, match="redo-rows"):
            parse_rows(bad, 100)
    with pytest.raises(SpecError, match="--resume"):
        run(spec, redo_rows=[(0, 1)], progress=False)


def test_query_and_row_map_damage_are_named_with_their_own_repair(stores):
    _, path, _ = stores
    from analysis.index import build_index
    from analysis.outliers import analyze_outliers
    from analysis.query import query_dim

    build_index(path)
    index_chunk = next(f for f in (path / "analysis/index/hook_resid_post/max_abs/c").rglob("*") if f.is_file())
    flip(index_chunk, 2, 4)
    with pytest.raises(CorruptChunkError, match=r"analysis/index/hook_resid_post/max_abs .*harvest index STORE"):
        query_dim(path, 3, hook="resid_post")
    done = cli("query", "dim", str(path), "3", "--hook", "resid_post")
    assert done.returncode == 2 and "\n" not in done.stderr.strip() and "Traceback" not in done.stderr
    assert "analysis/index/hook_resid_post/max_abs" in done.stderr and "harvest index" in done.stderr

    flip(path / "seq" / "c" / "0", 2, 4)
    with pytest.raises(CorruptChunkError, match=r"seq chunk 0 \(seq/c/0\): crc32c.*Repair: .*harvest run SPEC --overwrite"):
        analyze_outliers(path, plots=False, write=False)
