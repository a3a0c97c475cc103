"""The Zarr v3 store: schema, provenance, the progress manifest, and opening it lazily.

This module is the store's interface: every other module creates, marks, opens and reads stores
through the functions here (``create_store``, ``mark_written``, ``read_provenance``,
``read_progress`` ...), so the schema below is written down in one place.

Layout of one job's group (every array carries ``dimension_names``)::

    blocks.{l}.hook_resid_post   (token, d_model)          one array per hook point
    blocks.{l}.attn.hook_z       (token, head, d_head)
    blocks.{l}.attn.hook_pattern (sequence, head, query, key)   zero past each sequence's end
    tokens, seq, pos             (token,)                  row -> token id, sequence, position
    input_ids                    (sequence, position)      -1 past each sequence's end
    seq_length                   (sequence,)
    meta/{field}                 (sequence, ...)           written by the prompt source
    model/{ln1,ln2}.{w,b}        (layer, d_model)          LayerNorm weights, for the analyses
    model/ln_final.{w,b}         (d_model,)
    tokenizer/{file}             (byte,) uint8             tokenizer files, to decode without the model
    _progress/stage_{i}          (batch,) uint8            1 = batch fully written by stage i
    analysis/statistics/stage_{i}/unit_{a:08d}_{b:08d}/{key}  harvest-time statistics of stage i's hooks
                                 over batches [a, b) of the unit starting at batch a (``capture.statistics``)
    analysis/statistics/prefix/batch_{b:08d}/{key}            every hook's statistics over batches [0, b):
                                 the units folded in order, all stages merged (see below)

Activation arrays use the sharding codec (one file per shard, not per chunk) with a crc32c
checksum on every inner chunk and on the shard index, so a torn or corrupted chunk is detected
instead of read. Exactly one writer owns each array.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import StoreError
from .layout import batch_tokens
from .objstore import any_object, is_url, normalize, remove_prefix, zarr_store
from .shards import crc32c

if TYPE_CHECKING:  # the store schema needs no torch; the shape module does
    from .shape import ArrayPlan

FORMAT_VERSION = 1
ATTRS_KEY = "harvest"


def codecs_for(compressor: str, level: int) -> list:
    """Bytes-to-bytes codecs of every activation chunk: optional compression, then a checksum."""
    if compressor == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if compressor == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle"), Crc32cCodec()]
    return [Crc32cCodec()]


#: a store's location: a local path, or a URL on object storage (``s3://bucket/prefix/job.zarr``)
Location = str | Path


def zarr_location(path: Location, read_only: bool = False):
    """What zarr opens for ``path``: the path itself, or zarr's ``ObjectStore`` for a URL (``harvest.objstore``)."""
    path = normalize(path)
    return zarr_store(path, read_only=read_only) if isinstance(path, str) else str(path)


def create_group(path: Location, info: dict[str, Any]) -> zarr.Group:
    """A new, empty store at ``path`` (replacing whatever Zarr group was there) with its provenance."""
    if not is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # the provenance goes in with the group's first zarr.json: no reader ever sees a store without it
    return zarr.open_group(zarr_location(path), mode="w", attributes={ATTRS_KEY: info})


def create_activation_array(group: zarr.Group, array: ArrayPlan, *, compressor: str, level: int) -> zarr.Array:
    """An empty activation array laid out as ``harvest.shape.array_plans`` planned it."""
    shape, point = array.shape, array.point
    attributes = {"hook": point.template, "layer": point.layer,
                  **({"zero_past": "seq_length"} if point.axis == "sequence" else {})}
    return group.create_array(
        point.name, shape=shape, dtype=array.dtype, chunks=(array.chunk_rows, *shape[1:]),
        shards=(array.shard_rows, *shape[1:]), compressors=codecs_for(compressor, level), fill_value=0,
        dimension_names=point.dims, attributes=attributes,
    )


@dataclass(frozen=True)
class RowMaps:
    """Where every stored row comes from: ``tokens``, ``seq``, ``pos`` along ``token``; ``input_ids``
    (-1 past each end) and ``seq_length`` along ``sequence``."""

    tokens: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    input_ids: np.ndarray
    seq_length: np.ndarray


@dataclass(frozen=True)
class MetaArray:
    """A per-sequence value of the prompt source, stored as ``meta/{name}`` (sequence, *dims)."""

    values: np.ndarray
    dims: tuple[str, ...]
    description: str = ""


def create_store(path: str | Path, info: dict[str, Any], arrays: list[ArrayPlan], rows: RowMaps, *,
                 compressor: str, level: int, n_stages: int, n_batches: int,
                 meta: dict[str, MetaArray] | None = None, layer_norms: dict[str, np.ndarray] | None = None,
                 tokenizer_files: list[Path] = ()) -> zarr.Group:
    """Lay out a whole store (see the module doc); every store is made here, harvested or synthetic.

    The provenance says ``creating`` until everything is laid out, then ``info``'s own status.
    ``layer_norms`` maps ``ln1.w`` ... to (layer, d_model) arrays and ``ln_final.w`` ... to (d_model,).
    """
    group = create_group(path, {**info, "status": "creating"})
    for array in arrays:
        create_activation_array(group, array, compressor=compressor, level=level)
    write_small(group, "tokens", rows.tokens, ("token",))
    write_small(group, "seq", rows.seq, ("token",))
    write_small(group, "pos", rows.pos, ("token",))
    write_small(group, "input_ids", rows.input_ids, ("sequence", "position"))
    write_small(group, "seq_length", rows.seq_length, ("sequence",))
    meta_group = group.require_group("meta")
    for name, field in (meta or {}).items():
        write_small(meta_group, name, field.values, ("sequence", *field.dims), {"description": field.description})
    model = group.require_group("model")
    for name, weights in (layer_norms or {}).items():
        write_small(model, name, weights, ("layer", "d_model") if weights.ndim == 2 else ("d_model",))
    if tokenizer_files:  # a harvest always has them; a synthetic store may not
        write_files(group.require_group("tokenizer"), list(tokenizer_files))
    create_manifest(group, n_stages, n_batches)
    write_provenance(group, info)
    return group


def write_small(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...],
                attributes: dict[str, Any] | None = None) -> None:
    """A small array written whole at creation (row maps, metadata, weights)."""
    data = np.ascontiguousarray(data)
    chunks = tuple(max(1, s) for s in data.shape) if data.nbytes <= 64 * 2**20 else "auto"
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                             dimension_names=dims, attributes=attributes or {})
    if data.size:
        arr[...] = data


def write_files(group: zarr.Group, files: list[Path]) -> None:
    """Copy small files (the tokenizer) into the store as byte arrays."""
    for f in files:
        write_small(group, f.name, np.frombuffer(f.read_bytes(), dtype=np.uint8), ("byte",),
                    {"filename": f.name})


def read_files(group: zarr.Group, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in group.arrays():
        (out_dir / arr.attrs.get("filename", name)).write_bytes(arr[...].tobytes())
    return out_dir


# --- the progress manifest ---------------------------------------------------------------------

#: the group of per-stage progress arrays; with the root's zarr.json (provenance: creation time, stage
#: layout, last run), what may legitimately differ between two runs of one job
MANIFEST_GROUP = "_progress"
BOOKKEEPING = ("zarr.json", MANIFEST_GROUP)


def manifest_name(stage: int) -> str:
    return f"{MANIFEST_GROUP}/stage_{stage}"


def create_manifest(group: zarr.Group, n_stages: int, n_batches: int) -> None:
    progress = group.require_group(MANIFEST_GROUP)
    for name in list(progress.array_keys()):
        del progress[name]
    for i in range(n_stages):
        progress.create_array(f"stage_{i}", shape=(n_batches,), dtype="uint8", chunks=(max(1, n_batches),),
                              compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0,
                              dimension_names=("batch",))


def manifest(group: zarr.Group, stage: int) -> zarr.Array:
    """Stage ``stage``'s progress array: element k is 1 once batch k is durable in all its arrays."""
    return group[manifest_name(stage)]


def mark_written(group: zarr.Group, stage: int, stop: int, start: int = 0) -> None:
    """Mark batches [start, stop) of ``stage`` durable."""
    if stop > start:
        manifest(group, stage)[start:stop] = 1


def stage_frontier(path: str | Path, stage: int, start: int = 0) -> int:
    """First batch at or after ``start`` that stage ``stage`` has not marked durable."""
    marks = manifest(zarr.open_group(zarr_location(path, read_only=True), mode="r"), stage)[...]
    rest = np.flatnonzero(marks[start:] == 0)
    return start + int(rest[0]) if rest.size else len(marks)


def batches_done(group: zarr.Group) -> np.ndarray:
    """Per batch: written by every stage. A batch counts only when all its pieces landed."""
    progress = group[MANIFEST_GROUP]
    stages = [progress[name][...] for name in sorted(progress.array_keys())]
    if not stages:
        return np.zeros(0, dtype=bool)
    return np.logical_and.reduce([s.astype(bool) for s in stages])


def first_incomplete(group: zarr.Group) -> int:
    done = batches_done(group)
    missing = np.flatnonzero(~done)
    return int(missing[0]) if missing.size else len(done)


def undone_units(group: zarr.Group, units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The units (batch ranges) not yet marked durable by every stage; a partly done unit counts whole,
    since a run redoes it from its start."""
    done = batches_done(group)
    return [(a, b) for a, b in units if not done[a:b].all()]


# --- harvest-time statistics: snapshots beside the manifest -----------------------------------------
#
# Each unit of work (``harvest.shape.unit_bounds``) has its statistics accumulated from nothing (its
# top-k only above a floor from the units before it, so it folds exactly onto all of them), by each
# stage over its own hooks: ``stage_{i}/unit_{a}_{b}`` holds stage i's state over batches [a, b) of the
# unit starting at a (b short of the unit's end while a one-replica run is inside it). The units that
# every stage has whole and the manifest marks are folded, in unit order, into one ``prefix`` snapshot of
# every hook (``harvest.statistics.compact_statistics``), and the snapshots it absorbed are deleted. A
# snapshot is written before the manifest counts its batches, and never changed once it does.

STATISTICS_GROUP = "analysis/statistics"
PREFIX_GROUP = f"{STATISTICS_GROUP}/prefix"


def unit_snapshot_name(stage: int, start: int, through: int) -> str:
    return f"{STATISTICS_GROUP}/stage_{stage}/unit_{start:08d}_{through:08d}"


def prefix_snapshot_name(through: int) -> str:
    return f"{PREFIX_GROUP}/batch_{through:08d}"


def write_snapshot(group: zarr.Group, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any],
                   columns: int | None = None) -> None:
    """One statistics snapshot; its attributes go last, so a snapshot without them is torn (never read).

    ``columns`` (the prefix, which queries and xarray read): a group of zarr arrays, the per-dimension
    ones chunked by that many columns and compressed, so one dimension is a small read. None (a unit's
    snapshot, written at every durable batch and read back whole once, by the compaction): one array of
    bytes holding the arrays as a safetensors file, checksummed. Zarr's cost is per array (its metadata,
    its codec pipeline: 2-7 ms each), and a unit's ~16 arrays made that the dearest part of the
    statistics; as one blob a unit costs one array's (``bench/statistics_overhead.py``)."""
    if name in group:
        del group[name]
    if columns is None:
        write_blob_snapshot(group, name, arrays, attrs)
        return
    snap = group.require_group(name)
    for key, data in arrays.items():
        dims = tuple(f"axis_{i}" for i in range(data.ndim))
        # a vector (one value per dimension) takes VECTOR_CHUNK times the columns of a top-k's chunk (as
        # many rows): the same bytes a chunk, and a wide model's vectors in a few chunks, not hundreds
        chunk = columns * (VECTOR_CHUNK if data.ndim == 1 else 1)
        if key in PER_DIMENSION and data.ndim and data.shape[-1] > chunk and data.size:
            data = np.ascontiguousarray(data)
            shard = (*data.shape[:-1], -(-data.shape[-1] // chunk) * chunk)  # whole chunks; the last one partly used
            arr = snap.create_array(key, shape=data.shape, dtype=data.dtype, shards=shard,
                                    chunks=(*data.shape[:-1], chunk),
                                    compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                                    dimension_names=dims)
            arr[...] = data
        else:
            write_small(snap, key, data, dims)
    snap.attrs["statistics"] = attrs


#: how a unit snapshot's bytes are laid out (its array's ``format`` attribute)
BLOB_FORMAT = "safetensors"


def write_blob_snapshot(group: zarr.Group, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """A snapshot as one uint8 array: the safetensors file of ``arrays``, one chunk encoded
    ``[bytes, crc32c]``. The chunk is put in one store request, encoded here (the blob, then its
    CRC-32C, as ``harvest.shards`` encodes records): zarr's own write of a 10 MB chunk costs 25-120 ms on
    this machine, the request 3. Its ``statistics`` attribute is written after the bytes: a process
    killed in between leaves an array without it, which readers take as torn."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    parent, _, leaf = name.rpartition("/")
    arr = _require_group(group, parent).create_array(
        leaf, shape=(len(blob),), dtype="uint8", chunks=(len(blob),), compressors=[Crc32cCodec()], fill_value=0,
        dimension_names=("byte",), attributes={"format": BLOB_FORMAT})
    encoded = blob + crc32c.crc32c(blob).to_bytes(4, "little")
    sync(arr.store.set(_chunk_key(arr), default_buffer_prototype().buffer.from_bytes(encoded)))
    arr.attrs["statistics"] = attrs


def _require_group(group: zarr.Group, path: str) -> zarr.Group:
    """``group.require_group(path)`` where another process may create it at the same moment: the replicas'
    writers of one stage make ``analysis/statistics/stage_{i}`` as their first units end, and zarr's
    check-then-create lets the later one fail with ``ContainsGroupError`` (seen once in ~10 runs of a
    two-replica test)."""
    try:
        return group.require_group(path)
    except zarr.errors.ContainsGroupError:  # made meanwhile: there now
        return group.require_group(path)


def _chunk_key(arr: zarr.Array) -> str:
    """The store key of a one-chunk array's chunk."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((0,))}"


def read_blob(arr: zarr.Array) -> dict[str, np.ndarray]:
    """:func:`write_blob_snapshot`'s arrays, its checksum checked."""
    from safetensors.numpy import load

    if arr.attrs.get("format") != BLOB_FORMAT:
        raise StoreError(f"{arr.path}: a statistics snapshot of unknown format {arr.attrs.get('format')!r}")
    data = sync(arr.store.get(_chunk_key(arr), prototype=default_buffer_prototype()))
    data = data.to_bytes() if data is not None else b""
    if len(data) != arr.shape[0] + 4 or crc32c.crc32c(data[:-4]).to_bytes(4, "little") != data[-4:]:
        raise StoreError(f"{arr.path}: the statistics snapshot fails its CRC-32C checksum (a torn or damaged "
                         "write); `harvest verify` says what to do")
    return load(data[:-4])


#: columns per chunk of the prefix snapshot's per-dimension arrays (inside one shard per array): one dimension
#: reads 512 columns of each (a top-k of 32: 128 KiB before compression), a wide model's prefix a few thousand chunks
STATISTICS_COLUMNS = 512
#: a per-dimension vector's chunk spans this many times STATISTICS_COLUMNS (a top-k has 32 rows)
VECTOR_CHUNK = 32
#: the snapshot arrays with one column per (hook, dimension): chunked along it, so one dimension is a small read
PER_DIMENSION = ("n", "mean", "m2", "max", "count_ge", "nonfinite", "top_rows", "top_values")
#: a unit snapshot's top-k as its entries in use (``harvest.statistics.top_entries``): one element per entry
ENTRIES = ("entry_cols", "entry_rows", "entry_values")


def snapshot_attrs(group: zarr.Group, name: str) -> dict[str, Any] | None:
    """A snapshot's attributes; None when it is torn (its attributes never landed)."""
    try:
        return dict(group[name].attrs["statistics"])
    except KeyError:
        return None


def _group_keys(group: zarr.Group, arrays: bool = False) -> list[str]:
    """A group's subgroups (and its arrays: ``arrays``), quietly: another process writing a snapshot there
    leaves a temporary ``zarr.json.<token>.partial`` for a moment, which zarr warns about while listing."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        return list(group.keys() if arrays else group.group_keys())


def unit_snapshots(group: zarr.Group, stage: int) -> list[tuple[int, int]]:
    """(first batch, through) of stage ``stage``'s unit snapshots, ascending."""
    name = f"{STATISTICS_GROUP}/stage_{stage}"
    if name not in group:
        return []
    out = []
    for key in _group_keys(group[name], arrays=True):  # one array each (older stores: a group each)
        if key.startswith("unit_"):
            a, b = key.removeprefix("unit_").split("_")
            out.append((int(a), int(b)))
    return sorted(out)


def prefix_snapshots(group: zarr.Group) -> list[int]:
    """The batch counts of the prefix snapshots, ascending (one but while a compaction is under way)."""
    if PREFIX_GROUP not in group:
        return []
    return sorted(int(key.removeprefix("batch_")) for key in _group_keys(group[PREFIX_GROUP]))


def statistics_stages(group: zarr.Group) -> list[int]:
    if STATISTICS_GROUP not in group:
        return []
    return sorted(int(key.removeprefix("stage_")) for key in group[STATISTICS_GROUP].group_keys()
                  if key.startswith("stage_"))


def read_snapshot(group: zarr.Group, name: str, columns: np.ndarray | None = None,
                  keys: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One snapshot's arrays (``keys``; all by default) and attributes; ``columns``: only those
    columns (last axis) of each array, read chunk by chunk."""
    snap = group[name]
    if isinstance(snap, zarr.Array):  # a unit's snapshot: one blob, read whole
        arrays = {key: a for key, a in read_blob(snap).items() if keys is None or key in keys}
        if columns is not None:
            arrays = _blob_columns(arrays, np.asarray(columns))
        return arrays, dict(snap.attrs["statistics"])
    arrays = {}
    for key, arr in snap.arrays():
        if keys is not None and key not in keys:
            continue
        if columns is None:
            arrays[key] = np.asarray(arr[...])
        else:
            arrays[key] = np.asarray(arr.oindex[(slice(None),) * (arr.ndim - 1) + (np.asarray(columns),)])
    return arrays, dict(snap.attrs["statistics"])


def _blob_columns(arrays: dict[str, np.ndarray], columns: np.ndarray) -> dict[str, np.ndarray]:
    """A blob snapshot's arrays at ``columns`` only: the last axis of each, and of a sparse top-k
    (``ENTRIES``: one element per entry, ``entry_cols`` its column) the entries in those columns,
    their column renumbered as its place in ``columns``."""
    out = {key: a[..., columns] for key, a in arrays.items() if key not in ENTRIES}
    if "entry_cols" in arrays:
        place = np.full(int(max(arrays["entry_cols"].max(initial=-1), columns.max(initial=-1))) + 1, -1, np.int64)
        place[columns] = np.arange(columns.size)
        at = place[arrays["entry_cols"]]
        keep = at >= 0
        out.update({key: arrays[key][keep] for key in ENTRIES if key in arrays})
        out["entry_cols"] = at[keep]
    return out


@dataclass(frozen=True)
class StatisticsCover:
    """What a store's statistics snapshots cover: the newest whole prefix, and the whole units beyond it."""

    prefix: int  #: batches [0, prefix) are in the prefix snapshot
    prefix_name: str | None
    units: list[tuple[int, int, list[str]]]  #: (first batch, end, every stage's snapshot) in unit order


def statistics_cover(group: zarr.Group) -> StatisticsCover | None:
    """The snapshots a reader folds: the newest prefix, then each unit beyond it that *every* stage of the
    manifest has a whole snapshot of and that every stage has marked (the manifest decides: a snapshot of
    batches it does not count is a run's unfinished work). None: the store has no statistics."""
    if STATISTICS_GROUP not in group:
        return None
    prefixes = [b for b in prefix_snapshots(group) if snapshot_attrs(group, prefix_snapshot_name(b)) is not None]
    prefix = prefixes[-1] if prefixes else 0
    done = batches_done(group)
    n_stages = len(list(group[MANIFEST_GROUP].array_keys()))
    by_start: dict[int, dict[int, tuple[int, str]]] = {}
    for stage in range(n_stages):
        for a, b in unit_snapshots(group, stage):
            if a < prefix or not done[a:b].all():
                continue
            name = unit_snapshot_name(stage, a, b)
            attrs = snapshot_attrs(group, name)
            if attrs is not None and int(attrs["end"]) == b:
                by_start.setdefault(a, {})[stage] = (b, name)
    units = []
    for a in sorted(by_start):
        have = by_start[a]
        ends = {b for b, _ in have.values()}
        if len(have) == n_stages and len(ends) == 1:
            units.append((a, ends.pop(), [have[i][1] for i in range(n_stages)]))
    return StatisticsCover(prefix, prefix_snapshot_name(prefix) if prefixes else None, units)


#: the per-sequence records of the prefix's Dettmers state: appended to as units are folded in, never rewritten
SEQUENCES_GROUP = f"{STATISTICS_GROUP}/sequences"
SEQUENCE_CHUNK = 1 << 16


def append_sequences(group: zarr.Group, records: dict[str, np.ndarray], have: dict[str, int]) -> dict[str, int]:
    """Append ``records`` (key -> 1-D int64) after the first ``have[key]`` elements of each array; returns
    the new lengths, which the prefix snapshot written next records (elements past them are not read).

    Only the chunks from the old end on are written, each whole and atomically (a rename, or one PUT),
    so a process killed here leaves the elements the current prefix counts as they were."""
    lengths = {}
    for key, data in records.items():
        name = f"{SEQUENCES_GROUP}/{key}"
        start = int(have.get(key, 0))
        if name in group:
            arr = group[name]
        else:
            arr = group.require_group(SEQUENCES_GROUP).create_array(
                key, shape=(0,), dtype="int64", chunks=(SEQUENCE_CHUNK,), compressors=[ZstdCodec(level=3), Crc32cCodec()],
                fill_value=0, dimension_names=("record",))
        end = start + len(data)
        if arr.shape[0] != end:
            arr.resize((end,))
        if len(data):
            arr[start:end] = np.asarray(data, np.int64)
        lengths[key] = end
    return lengths


def read_sequences(group: zarr.Group, lengths: dict[str, int]) -> dict[str, np.ndarray]:
    """The first ``lengths[key]`` elements of each per-sequence record array."""
    return {key: np.asarray(group[f"{SEQUENCES_GROUP}/{key}"][:n]) if n else np.zeros(0, np.int64)
            for key, n in lengths.items()}


def delete_snapshot(group: zarr.Group, name: str) -> None:
    """Delete a snapshot; one already gone is fine (the compactor and a stage's writer may both delete a
    partial snapshot of a unit the compactor has just folded in)."""
    try:
        if name in group:
            del group[name]
    except (KeyError, FileNotFoundError):
        pass


# --- opening ------------------------------------------------------------------------------------

def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """The store's root group. Opened to write, it first drops the consolidated metadata (see ``consolidate``)."""
    path = normalize(path)
    if not is_store(path):
        raise StoreError(f"no harvest store at {path}: it has no zarr.json. Run `harvest run SPEC` to create one")
    if mode == "r":
        group = zarr.open_group(zarr_location(path, read_only=True), mode=mode)
    else:
        group = zarr.open_group(zarr_location(path), mode=mode, use_consolidated=False)
    if ATTRS_KEY not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not a harvest store (no '{ATTRS_KEY}' attributes)")
    if mode != "r" and has_consolidated_metadata(path):
        group.update_attributes(dict(group.attrs))  # rewrites zarr.json without the consolidated copy
    return group


def open_for_writing(path: Location) -> zarr.Group:
    """The store's group opened for a stage's writer (which then writes only its own arrays)."""
    return zarr.open_group(zarr_location(path), mode="r+", use_consolidated=False)


def is_store(path: Location) -> bool:
    """Whether ``path`` holds a Zarr group (its ``zarr.json``), on disk or on object storage."""
    path = normalize(path)
    if isinstance(path, str):
        from .objstore import exists

        return exists(path, "zarr.json")
    return (path / "zarr.json").is_file()


def location_exists(path: Location) -> bool:
    """Whether anything is at ``path`` (a file, a folder, or objects under a URL prefix)."""
    path = normalize(path)
    return any_object(path) if isinstance(path, str) else path.exists()


async def write_rows(array: zarr.Array, start: int, stop: int, data: np.ndarray) -> None:
    """Rows [start, stop) through zarr's own codec pipeline, awaited on the caller's event loop.

    The path for codec chains ``harvest.shards`` does not encode (compression). zarr's synchronous
    API would run every write on its one global I/O thread (see ``writer.EventLoops``), so the writer
    awaits the async array on its own thread's loop; this is the one place that touches zarr's
    private ``_async_array``.
    """
    await array._async_array.setitem(slice(start, stop), data)


# --- provenance: the job that wrote the store, and its status -------------------------------------

def read_provenance(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs[ATTRS_KEY])


def write_provenance(group: zarr.Group, info: dict[str, Any]) -> None:
    group.attrs[ATTRS_KEY] = info


def update_provenance(group: zarr.Group, **fields: Any) -> dict[str, Any]:
    """Set some provenance fields (status, last run ...) and keep the rest; returns the new record."""
    info = read_provenance(group)
    info.update(fields)
    write_provenance(group, info)
    return info

def has_consolidated_metadata(path: Location) -> bool:
    path = normalize(path)
    try:
        if isinstance(path, str):
            import obstore

            from .objstore import obstore_of

            text = bytes(obstore.get(obstore_of(path), "zarr.json").bytes())
        else:
            text = (path / "zarr.json").read_bytes()
        return "consolidated_metadata" in json.loads(text)
    except (OSError, ValueError):
        return False


def consolidate(path: str | Path) -> None:
    """Copy every array's and group's metadata into the root zarr.json, so readers open it in one read.

    xarray warns without it (and opens slower). zarr readers trust the copy over the files, so an
    array added later would be invisible: the copy is written only when a store is finished (a run
    completes, an analysis has written its results), and ``open_group`` drops it before any write.
    """
    import warnings

    with warnings.catch_warnings():  # "not part of the Zarr v3 specification yet": known, and read back by zarr
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(zarr_location(path))


def provenance(path: str | Path) -> dict[str, Any]:
    return read_provenance(open_group(path))


@dataclass(frozen=True)
class StoreProgress:
    """How far the job writing a store got: batches and tokens (every token of their sequences)."""

    status: str | None
    batches_done: int
    n_batches: int
    tokens_done: int
    tokens_total: int


def read_progress(path: str | Path) -> StoreProgress | None:
    """Batches and tokens written, from the progress manifest and row layout (None: not laid out yet)."""
    group = open_group(path)
    info = read_provenance(group)
    if info.get("status") == "creating" or MANIFEST_GROUP not in group or "seq_length" not in group:
        return None
    per_batch = batch_tokens(group["seq_length"][...], int(info["layout"]["batch_size"]))
    done = batches_done(group)
    if len(done) != len(per_batch):
        return None
    return StoreProgress(info.get("status"), int(done.sum()), len(done), int(per_batch[done].sum()),
                         int(per_batch.sum()))


def open_store(path: str | Path):
    """The store as a lazy xarray Dataset: named dims, dask arrays, nothing read but metadata.

    Row maps become coordinates of the ``token`` axis (``seq``, ``pos``, ``tokens``); the chosen
    heads and neurons become coordinates too. Provenance is in ``ds.attrs['harvest']``.
    """
    import xarray as xr  # pandas comes with it: only for this call, so `import harvest` stays light

    group = open_group(path)
    ds = xr.open_zarr(zarr_location(path, read_only=True), consolidated=False)
    coords = {name: ds[name] for name in ("seq", "pos", "tokens", "seq_length") if name in ds}
    info = read_provenance(group)
    selection = info.get("selection", {})
    if selection.get("heads") is not None and "head" in ds.dims:
        coords["head"] = ("head", np.asarray(selection["heads"]))
    if selection.get("neurons") is not None and "neuron" in ds.dims:
        coords["neuron"] = ("neuron", np.asarray(selection["neurons"]))
    ds = ds.assign_coords(coords)
    ds.attrs = {ATTRS_KEY: info}
    return ds


def remove_store(path: Location) -> None:
    path = normalize(path)
    if isinstance(path, str):
        remove_prefix(path)
    elif path.exists():
        shutil.rmtree(path)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
