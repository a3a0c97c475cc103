"""Small helpers shared by the translation-head and Fourier analyses (private to them).

Reading: a store is opened through ``harvest.store.open_group`` (metadata only); activation
arrays come back as Dask arrays over the Zarr chunks. Writing: each analysis owns one group under
``analysis/`` and replaces it whole on every run, so results never mix two runs' parameters.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import HarvestError
from harvest.store import ATTRS_KEY, open_group


class AnalysisError(HarvestError, ValueError):
    """The store cannot be analysed as asked; the message says what is missing and how to get it."""


def open_store_group(path: str | Path, mode: str = "r"):
    return open_group(Path(path), mode=mode)


def info(group) -> dict[str, Any]:
    return dict(group.attrs[ATTRS_KEY])


def source_name(group) -> str | None:
    return (info(group).get("prompts") or {}).get("source")


def layer_arrays(group, template: str) -> dict[int, str]:
    """``{layer: array name}`` for every ``blocks.{layer}.{template}`` array in the store, by layer."""
    pattern = re.compile(r"blocks\.(\d+)\." + re.escape(template) + "$")
    found = {}
    for name in group.array_keys():
        m = pattern.match(name)
        if m:
            found[int(m[1])] = name
    return dict(sorted(found.items()))


def dask_array(group, name: str):
    """A Dask array over one store array, one Dask chunk per Zarr chunk (or shard if chunks are tiny)."""
    from .source import lazy_array  # names a chunk that fails its checksum (issue 16)

    return lazy_array(group, name)


def read(group, name: str) -> np.ndarray:
    return np.asarray(group[name][...])


def heads_of(group, n_heads_stored: int) -> np.ndarray:
    """The model head index of each stored head (a subset when ``capture.heads`` was given)."""
    heads = (info(group).get("selection") or {}).get("heads")
    return np.asarray(heads if heads is not None else range(n_heads_stored), dtype=np.int64)


def rows_at(group, sequences: np.ndarray, positions: np.ndarray, what: str) -> np.ndarray:
    """Rows holding (sequence, position) pairs; an error naming the fix when one was not captured."""
    seq, pos = read(group, "seq").astype(np.int64), read(group, "pos").astype(np.int64)
    n_pos = int(max(pos.max(initial=0), positions.max(initial=0))) + 1
    key = seq * n_pos + pos
    order = np.argsort(key, kind="stable")
    want = sequences.astype(np.int64) * n_pos + positions.astype(np.int64)
    found = np.searchsorted(key[order], want)
    found = np.minimum(found, len(order) - 1)
    ok = key[order][found] == want if len(order) else np.zeros(len(want), bool)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise AnalysisError(
            f"{what}: position {int(positions[i])} of sequence {int(sequences[i])} was not captured; "
            "harvest with capture.positions: source (or all)"
        )
    return order[found]


@contextlib.contextmanager
def scheduler(address: str | None) -> Iterator[None]:
    """Dask's threaded scheduler by default; a ``dask.distributed`` scheduler at ``address`` if given."""
    if address is None:
        import dask

        with dask.config.set(scheduler="threads"):
            yield
        return
    from distributed import Client

    with Client(address) as client, client.as_current():
        yield


# --- writing results ------------------------------------------------------------------------------

def result_group(store: str | Path, name: str, attrs: dict[str, Any]):
    """A fresh ``analysis/{name}`` group (an earlier one is replaced), its attributes set."""
    import zarr

    group = open_store_group(store, mode="r+")
    parent = group.require_group("analysis")
    if name in parent:
        del parent[name]
    out = parent.create_group(name)
    out.attrs.update(jsonable(attrs))
    # reopen so later writes see a consistent hierarchy
    return zarr.open_group(str(Path(store) / "analysis" / name), mode="r+")


def write_array(group, name: str, data: np.ndarray, dims: tuple[str, ...], **attrs: Any) -> None:
    from zarr.codecs import Crc32cCodec, ZstdCodec

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
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def figure_path(store: str | Path, suffix: str) -> Path:
    """PNGs go beside the store: ``job.zarr`` -> ``job.{suffix}.png`` in the same directory."""
    store = Path(store)
    return store.with_name(f"{store.stem}.{suffix}.png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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


def require(condition: bool, message: str) -> None:
    if not condition:
        raise AnalysisError(message)


__all__ = ["AnalysisError", "dask_array", "figure_path", "format_table", "heads_of", "info", "jsonable",
           "layer_arrays", "open_store_group", "pyplot", "read", "require", "result_group", "rows_at", "scheduler",
           "source_name", "write_array"]
