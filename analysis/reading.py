"""Reading a store for the circuit analyses (translation heads, Fourier).

Opening reads metadata only (``harvest.store.open_group``); hook points are found through the one
hook-name resolver (:func:`harvest.hookpoints.resolve`) against the hooks the store's provenance
lists; activations come back as Dask arrays over the Zarr chunks, so nothing is read until computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import AnalysisError
from harvest.hookpoints import resolve, split_name
from harvest.store import open_group, read_provenance
from harvest.verify import CheckedArray


def open_store(path: str | Path, mode: str = "r"):
    return open_group(Path(path), mode=mode)


def provenance(group) -> dict[str, Any]:
    """The store's ``attrs["harvest"]``: spec, model, prompts, selection, hooks, fingerprint."""
    return read_provenance(group)


def prompt_source(group) -> str | None:
    """The prompt source the store was harvested with (``translation``, ``addition`` ...)."""
    return (provenance(group).get("prompts") or {}).get("source")


def store_hooks(group) -> list[str]:
    """The hook points harvested into the store, in forward order (from its provenance)."""
    return [name for name in provenance(group).get("hooks", []) if name in group]


def hook_layers(group, hook: str, path: str | Path) -> dict[int, str]:
    """``{layer: array name}`` of the per-layer hook point ``hook`` (any name ``capture.hooks`` takes:
    ``resid_post``, ``blocks.*.hook_resid_post``, ``blocks.{0..3}.ln1`` ...), by layer."""
    names = resolve(hook, store_hooks(group), where=str(path))
    layers = {split_name(name)[1]: name for name in names}
    templates = {split_name(name)[0] for name in names}
    if None in layers or len(templates) > 1:
        raise AnalysisError(f"hook {hook!r} selects {', '.join(names)}; give one per-layer hook point "
                            "(resid_post, ln1, attn_out, ...)")
    return dict(sorted(layers.items()))


def lazy_array(group, name: str, chunks=None):
    """A Dask array over one store array: where every analysis reads activation chunks.

    A chunk that fails its crc32c raises :class:`harvest.errors.CorruptChunkError` naming the array,
    chunk, rows and the repair (``harvest run SPEC --resume --redo-rows A:B``), not zarr's bare
    "checksum do not match" deep in a Dask traceback.
    """
    import dask.array as da

    arr = group[name]
    root = getattr(group.store, "root", None) or str(group.store)
    return da.from_array(CheckedArray(arr, root, arr.path), chunks=chunks or arr.chunks, asarray=True,
                         fancy=False, lock=False)


def read(group, name: str) -> np.ndarray:
    """A small array (row maps, prompt metadata) read whole."""
    return np.asarray(group[name][...])


def stored_heads(group, n_heads_stored: int) -> np.ndarray:
    """The model head index of each stored head (a subset when ``capture.heads`` was given)."""
    heads = (provenance(group).get("selection") or {}).get("heads")
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
