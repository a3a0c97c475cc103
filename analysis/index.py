"""The per-dimension index: for every hook point and dimension, count, mean, std, max |x|,
count >= threshold and the top-k rows by |x|, stored under ``analysis/index/`` so that a query
reads a few small chunks instead of the data.

Layout (one group per hook template, layers stacked; ``dim`` is the flattened trailing index)::

    analysis/index/{template}/count, mean, std, max_abs, count_ge, nonfinite   (layer, dim)
    analysis/index/{template}/top_values, top_rows, top_seq, top_pos  (layer, rank, dim), by |x| descending

Chunks are narrow along ``dim`` so that reading one dimension touches one chunk per array.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from harvest.errors import IndexNotBuiltError
from harvest.store import consolidate, open_group

from .scan import ScanParams, ScanResult, run_scan

GROUP = "analysis/index"
STATS = ("count", "mean", "std", "max_abs", "count_ge", "nonfinite")  #: count: finite values; nonfinite: NaN/inf left out
TOPS = ("top_values", "top_rows", "top_seq", "top_pos")


def build_index(path: str | Path, *, top_k: int = 32, threshold: float = 6.0, block_mib: float = 8.0,
                scheduler=None, num_workers: int | None = None) -> dict[str, Any]:
    """Scan every token-axis array once and write the index (the library call behind ``harvest index``)."""
    from harvest.errors import AnalysisError

    if top_k < 1:
        raise AnalysisError(f"top_k must be >= 1, not {top_k}")
    params = ScanParams(top_k=top_k, index_threshold=threshold, block_mib=block_mib)
    scan = run_scan(path, params, index=True, outliers=False, scheduler=scheduler, num_workers=num_workers)
    summary = write_index(scan)
    summary.update(seconds=round(scan.seconds, 3), bytes_read=scan.bytes_read,
                   mib_per_s=round(scan.bytes_read / 2**20 / scan.seconds, 1) if scan.seconds else None)
    return summary


def _array(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...], chunks: tuple[int, ...]) -> None:
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0, dimension_names=dims)
    if data.size:
        arr[...] = data


def write_index(scan: ScanResult) -> dict[str, Any]:
    """Write ``analysis/index/`` from a scan's index statistics (replacing an older index)."""
    facts, params = scan.facts, scan.params
    root = open_group(facts.path, mode="r+")
    analysis = root.require_group("analysis")
    if "index" in analysis:
        del analysis["index"]
    out = analysis.require_group("index")
    by_template = {t: [a for a in arrays if a.name in scan.index] for t, arrays in facts.by_template().items()}
    by_template = {t: a for t, a in by_template.items() if a}
    # sequence and position of every top row, read once for all arrays
    all_rows = np.unique(np.concatenate([scan.index[a.name]["top_rows"].ravel()
                                         for arrays in by_template.values() for a in arrays]))
    pos_of = (np.asarray(root["pos"].get_coordinate_selection(all_rows)).astype(np.int32) if all_rows.size
              else np.zeros(0, np.int32))
    templates: dict[str, Any] = {}
    for template, arrays in by_template.items():
        g = out.require_group(template)
        width = arrays[0].width
        k = max(scan.index[a.name]["top_rows"].shape[0] for a in arrays)
        n = len(arrays)
        cols = min(width, 1024)
        tcols = min(width, 64)
        for key in STATS:
            data = np.stack([scan.nonfinite[a.name]["nonfinite"] if key == "nonfinite" else scan.index[a.name][key]
                             for a in arrays])
            _array(g, key, data, ("layer", "dim"), (n, cols))
        top_rows = np.full((n, k, width), -1, np.int64)
        top_values = np.zeros((n, k, width), np.float32)
        for i, a in enumerate(arrays):
            s = scan.index[a.name]
            top_rows[i, :s["top_rows"].shape[0]] = s["top_rows"]
            top_values[i, :s["top_values"].shape[0]] = s["top_values"]
        valid = top_rows >= 0
        safe = np.where(valid, top_rows, 0)
        top_seq = np.where(valid, np.searchsorted(scan.starts, safe, side="right") - 1, -1)
        top_pos = np.where(valid, pos_of[np.searchsorted(all_rows, safe)] if all_rows.size else 0, -1).astype(np.int32)
        for key, data in zip(TOPS, (top_values, top_rows, top_seq, top_pos)):
            _array(g, key, data, ("layer", "rank", "dim"), (n, k, tcols))
        templates[template] = {"hooks": [a.name for a in arrays],
                               "layers": [-1 if a.layer is None else int(a.layer) for a in arrays],
                               "trail": list(arrays[0].trail), "trail_dims": list(arrays[0].dims[1:]),
                               "width": width,
                               "nonfinite": {a.name: scan.nonfinite[a.name]["nonfinite_total"] for a in arrays
                                             if scan.nonfinite[a.name]["nonfinite_total"]}}
    meta = {"top_k": params.top_k, "threshold": params.count_threshold, "rows": facts.n_rows,
            "sequences": len(scan.starts) - 1, "templates": templates,
            "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out.attrs["index"] = meta
    consolidate(facts.path)  # the store is finished again: xarray opens it in one read
    return {"path": str(facts.path), "group": GROUP, **meta}


def index_meta(group: zarr.Group, path: str | Path) -> dict[str, Any]:
    """The index's attributes, or IndexNotBuiltError saying how to build it."""
    if "analysis" not in group or "index" not in group["analysis"] or "index" not in group["analysis/index"].attrs:
        raise IndexNotBuiltError(
            f"{path} has no per-dimension index yet; build it with `harvest index {path}` "
            f"(or `harvest analyze outliers {path}`, which builds it in the same pass)")
    meta = dict(group["analysis/index"].attrs["index"])
    meta.setdefault("source", f"the index of the {meta['rows']:,} stored rows")
    return meta


def read_dim(group: zarr.Group, template: str, dim: int, top: int) -> dict[str, np.ndarray]:
    """One dimension's per-layer statistics and top rows: reads one chunk of each index array."""
    g = group[f"{GROUP}/{template}"]
    out = {key: np.asarray(g[key][:, dim]) for key in STATS if key in g}  # an older index has no nonfinite
    for key in TOPS:
        out[key] = np.asarray(g[key][:, :top, dim])
    return out
