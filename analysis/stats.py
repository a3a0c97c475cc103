"""Statistics over Dask arrays: the kernels of :mod:`harvest.statistics`, run as a fixed tree.

The kernels (``chunk / combine / aggregate`` over float64 sufficient statistics, :class:`Block`)
live in the core so that a harvest accumulates exactly the states the offline scan computes; they
are re-exported here, where the analyses have always found them. :func:`reduction` runs one
statistic over a Dask array; the outlier scan (:mod:`analysis.scan`) fuses several over one read of
each block through a shared :class:`Block`.

Why not ``dask.array.reduction``: its ``chunk`` never learns where its block sits, and the top-k
rows and the per-sequence statistics need the block's row offset. The tree here is the same idea
(``split_every`` states merged per task), built from ``Array.to_delayed()`` blocks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from harvest.statistics import (  # noqa: F401 - re-exported: the analyses' statistics
    State,
    Scratch,
    Block,
    moments_chunk,
    moments_combine,
    moments_aggregate,
    max_abs_chunk,
    max_abs_combine,
    max_abs_aggregate,
    nonfinite_chunk,
    nonfinite_combine,
    nonfinite_aggregate,
    count_ge_chunk,
    count_ge_combine,
    count_ge_aggregate,
    select_top,
    topk_chunk,
    topk_combine,
    topk_aggregate,
    segments,
    seq_moments_chunk,
    merge_moments,
    seq_moments_combine,
    seq_moments_aggregate,
    HIST_RATIO,
    HIST_MAX,
    hist_bins,
    hist_bin,
    hist_edges,
    hist_from_values,
    hist_combine,
    hist_column,
    hist_quantiles,
)


# --- running one statistic over a Dask array -------------------------------------------------------

def tree_reduce(states: list, combine: Callable, split_every: int = 8):
    """Merge delayed states ``split_every`` at a time until one is left (a fixed tree: the same
    result on every scheduler)."""
    from dask import delayed

    if not states:
        raise ValueError("nothing to reduce")
    while len(states) > 1:
        states = [delayed(combine, pure=False)(states[i:i + split_every]) for i in range(0, len(states), split_every)]
    return states[0]


def _chunk_from_array(chunk: Callable, block: np.ndarray, start: int, kwargs: dict) -> State:
    return chunk(Block(block, start), **kwargs)


STATISTICS: dict[str, tuple[Callable, Callable, Callable]] = {
    "moments": (moments_chunk, moments_combine, moments_aggregate),
    "max_abs": (max_abs_chunk, max_abs_combine, max_abs_aggregate),
    "nonfinite": (nonfinite_chunk, nonfinite_combine, nonfinite_aggregate),
    "count_ge": (count_ge_chunk, count_ge_combine, count_ge_aggregate),
    "topk": (topk_chunk, topk_combine, topk_aggregate),
}


def reduction(x, statistic: str, *, split_every: int = 8, **params):
    """One statistic over the leading axis of a Dask (or NumPy) array, as a delayed result.

    ``reduction(x, "moments").compute()`` -> ``{"count", "mean", "std"}``; ``"max_abs"``;
    ``"count_ge", threshold=6.0``; ``"topk", k=32`` -> ``{"top_rows", "top_values"}``.
    """
    import dask.array as da
    from dask import delayed

    chunk, combine, aggregate = STATISTICS[statistic]
    x = da.asarray(x)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim == 1:
        x = x[:, None]
    x = x.rechunk({1: -1})
    offsets = np.concatenate([[0], np.cumsum(x.chunks[0])[:-1]])
    chunk_kwargs = {k: v for k, v in params.items() if k in ("threshold", "k")}
    states = [delayed(_chunk_from_array, pure=False)(chunk, blk, int(start), chunk_kwargs)
              for blk, start in zip(x.to_delayed().ravel(), offsets)]
    comb = combine if statistic != "topk" else _TopkCombine(params["k"])
    return delayed(aggregate, pure=False)(tree_reduce(states, comb, split_every))


class _TopkCombine:
    """``topk_combine`` with k bound (picklable, unlike a lambda, for dask.distributed)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, states):
        return topk_combine(states, self.k)

    def __dask_tokenize__(self):
        return ("topk_combine", self.k)
