"""Where a circuit analysis's results go: its own group under the store's ``analysis/``, and text tables.

Each analysis owns one group ``analysis/{name}`` and replaces it whole on every run, so results
never mix two runs' parameters. Arrays carry ``dimension_names`` like the harvested ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from harvest.objstore import normalize
from harvest.store import open_group, zarr_location


def result_group(store: str | Path, name: str, attrs: dict[str, Any]) -> zarr.Group:
    """A fresh ``analysis/{name}`` group (an earlier one is replaced), its attributes set."""
    parent = open_group(Path(store), mode="r+").require_group("analysis")
    if name in parent:
        del parent[name]
    out = parent.create_group(name)
    out.attrs.update(jsonable(attrs))
    # reopen so later writes see a consistent hierarchy
    return zarr.open_group(zarr_location(f"{normalize(store)}/analysis/{name}"), mode="r+")


def write_array(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...], **attrs: Any) -> None:
    """One result array, whole-array chunked (results are small), float16 widened to float32."""
    data = np.ascontiguousarray(data)
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    if data.ndim != len(dims):
        raise ValueError(f"{name}: {data.ndim} axes but dims {dims}")
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                             chunks=tuple(max(1, s) for s in data.shape),
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                             dimension_names=dims, attributes=jsonable(attrs))
    if data.size:
        arr[...] = data


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays, paths and non-finite floats made JSON-safe."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def format_table(headers: list[str], rows: list[list[Any]], floats: str = "{:.3f}") -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_cell(v, floats) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _cell(v: Any, floats: str) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else floats.format(v)
    return str(v)
