"""The Zarr v3 store: schema, provenance, the progress manifest, and opening it lazily.

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

Activation arrays use the sharding codec (one file per shard, not per chunk) with a crc32c
checksum on every inner chunk and on the shard index, so a torn or corrupted chunk is detected
instead of read. Exactly one writer owns each array.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import StoreError

FORMAT_VERSION = 1
ATTRS_KEY = "harvest"


def codecs_for(compressor: str, level: int) -> list:
    """Bytes-to-bytes codecs of every activation chunk: optional compression, then a checksum."""
    if compressor == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if compressor == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle"), Crc32cCodec()]
    return [Crc32cCodec()]


def chunk_layout(n: int, row_bytes: int, chunk_mib: float, chunks_per_shard: int) -> tuple[int, int]:
    """(rows per chunk, rows per shard) along the leading axis for a target chunk size."""
    target = max(1, int(chunk_mib * 2**20) // max(row_bytes, 1))
    # balance the chunks: edge chunks are stored full-size, so 1.5 target chunks would waste 25%
    chunk = -(-max(n, 1) // -(-max(n, 1) // target))
    shard = chunk * chunks_per_shard
    shard = min(shard, -(-max(n, 1) // chunk) * chunk)
    return chunk, shard


def create_activation_array(group: zarr.Group, name: str, shape: tuple[int, ...], dims: tuple[str, ...],
                            dtype: str, *, chunk_mib: float, chunks_per_shard: int, compressor: str,
                            level: int, attributes: dict[str, Any]) -> zarr.Array:
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    chunk, shard = chunk_layout(shape[0], row_bytes, chunk_mib, chunks_per_shard)
    return group.create_array(
        name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]), shards=(shard, *shape[1:]),
        compressors=codecs_for(compressor, level), fill_value=0, dimension_names=dims,
        attributes=attributes,
    )


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

def manifest_name(stage: int) -> str:
    return f"_progress/stage_{stage}"


def create_manifest(group: zarr.Group, n_stages: int, n_batches: int) -> None:
    progress = group.require_group("_progress")
    for name in list(progress.array_keys()):
        del progress[name]
    for i in range(n_stages):
        progress.create_array(f"stage_{i}", shape=(n_batches,), dtype="uint8", chunks=(max(1, n_batches),),
                              compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0,
                              dimension_names=("batch",))


def batches_done(group: zarr.Group) -> np.ndarray:
    """Per batch: written by every stage. A batch counts only when all its pieces landed."""
    progress = group["_progress"]
    stages = [progress[name][...] for name in sorted(progress.array_keys())]
    if not stages:
        return np.zeros(0, dtype=bool)
    return np.logical_and.reduce([s.astype(bool) for s in stages])


def first_incomplete(group: zarr.Group) -> int:
    done = batches_done(group)
    missing = np.flatnonzero(~done)
    return int(missing[0]) if missing.size else len(done)


# --- opening ------------------------------------------------------------------------------------

def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """The store's root group. Opened to write, it first drops the consolidated metadata (see ``consolidate``)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"no harvest store at {path}: it has no zarr.json. Run `harvest run SPEC` to create one")
    if mode == "r":
        group = zarr.open_group(str(path), mode=mode)
    else:
        group = zarr.open_group(str(path), mode=mode, use_consolidated=False)
    if ATTRS_KEY not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not a harvest store (no '{ATTRS_KEY}' attributes)")
    if mode != "r" and has_consolidated_metadata(path):
        group.update_attributes(dict(group.attrs))  # rewrites zarr.json without the consolidated copy
    return group


def has_consolidated_metadata(path: str | Path) -> bool:
    try:
        return "consolidated_metadata" in json.loads((Path(path) / "zarr.json").read_text())
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
        zarr.consolidate_metadata(str(path))


def provenance(path: str | Path) -> dict[str, Any]:
    return dict(open_group(path).attrs[ATTRS_KEY])


def open_store(path: str | Path):
    """The store as a lazy xarray Dataset: named dims, dask arrays, nothing read but metadata.

    Row maps become coordinates of the ``token`` axis (``seq``, ``pos``, ``tokens``); the chosen
    heads and neurons become coordinates too. Provenance is in ``ds.attrs['harvest']``.
    """
    import xarray as xr

    group = open_group(path)
    ds = xr.open_zarr(str(path), consolidated=False)
    coords = {name: ds[name] for name in ("seq", "pos", "tokens", "seq_length") if name in ds}
    info = group.attrs[ATTRS_KEY]
    selection = info.get("selection", {})
    if selection.get("heads") is not None and "head" in ds.dims:
        coords["head"] = ("head", np.asarray(selection["heads"]))
    if selection.get("neurons") is not None and "neuron" in ds.dims:
        coords["neuron"] = ("neuron", np.asarray(selection["neurons"]))
    ds = ds.assign_coords(coords)
    ds.attrs = {ATTRS_KEY: info}
    return ds


def remove_store(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
