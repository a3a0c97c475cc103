"""The statistic kernels, shared by the offline scan and the harvest-time statistics.

One implementation of every statistic, as three small functions in the style of
``dask/array/reductions.py``:

- ``chunk(block) -> state``: sufficient statistics of one row block (a :class:`Block`);
- ``combine(states) -> state``: merges any number of states; associative, so any tree works;
- ``aggregate(state) -> result``: the statistic itself (a dict of NumPy arrays).

States are dicts of NumPy arrays. Sums are float64; values are compared and selected in float32
(the stored activations are float16/float32). They live in the core, not in ``analysis/``, because
a harvest accumulates the same states while the model runs (:class:`StatisticsAccumulator`) and the
core may not import the analyses; ``analysis.stats`` runs them over Dask arrays and
``analysis.scan`` fuses them over one read of each stored block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Sequence

import numpy as np

State = dict[str, Any]


class Scratch:
    """Reusable per-thread work buffers for the large per-block temporaries.

    A fresh 32 MiB temporary costs page faults on every block (glibc maps allocations that large
    anew each time): reusing buffers made the scan ~1.5x faster. Only :func:`analysis.scan.scan_chunk`
    uses one; nothing that outlives a block may keep a view of a buffer.
    """

    _by_thread: dict[int, "Scratch"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_thread(cls) -> "Scratch":
        key = threading.get_ident()
        scratch = cls._by_thread.get(key)
        if scratch is None:
            with cls._lock:
                scratch = cls._by_thread.setdefault(key, cls())
        return scratch

    @classmethod
    def release_all(cls) -> int:
        """Drop every thread's buffers (after a pass); returns the bytes released."""
        with cls._lock:
            freed = sum(b.nbytes for s in cls._by_thread.values() for b in s.buffers.values())
            cls._by_thread.clear()
        return freed

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < n:
            buf = self.buffers[name] = np.empty(max(n, 1), np.uint8)
        return buf[:n].view(dtype).reshape(shape)


class _NoScratch:
    def get(self, name, shape, dtype):
        return np.empty(shape, dtype)


class Block:
    """One row block of an activation array as float32 ``(rows, dims)``, and where its rows are.

    Trailing dims are flattened (``(token, head, d_head)`` -> ``(token, head * d_head)``).
    Non-finite values are counted per column and then treated as absent: they are set to 0 and
    left out of ``n``, the moments and the top-k. ``scratch`` (with a ``tag`` unique among the
    blocks alive at once) lends the large temporaries.
    """

    def __init__(self, values: np.ndarray, start: int = 0, scratch: Scratch | None = None, tag: str = ""):
        x = np.asarray(values)
        x = x.reshape(x.shape[0], -1)
        self._scratch = scratch or _NoScratch()
        self._tag = tag
        if x.dtype != np.float32:
            x32 = self._buf("x", x.shape, np.float32)
            np.copyto(x32, x, casting="unsafe")
            x = x32
        self.x = x
        self.start = int(start)
        self.abs = np.abs(x, out=self._buf("abs", x.shape, np.float32))
        self.colmax = self.abs.max(axis=0) if self.rows else np.zeros(self.dims, np.float32)
        self.nonfinite: np.ndarray | None = None  #: (rows, dims) bool where a value was NaN/inf
        if not np.isfinite(self.colmax).all():
            bad = ~np.isfinite(self.x)
            self.x = np.where(bad, np.float32(0), self.x)
            self.abs = np.where(bad, np.float32(0), self.abs)
            self.colmax = self.abs.max(axis=0)
            self.nonfinite = bad

    def _buf(self, name: str, shape, dtype) -> np.ndarray:
        return self._scratch.get(self._tag + name, shape, dtype)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def dims(self) -> int:
        return self.x.shape[1]

    @cached_property
    def n(self) -> np.ndarray:
        """Finite values per column."""
        if self.nonfinite is None:
            return np.full(self.dims, self.rows, dtype=np.int64)
        return self.rows - self.nonfinite.sum(axis=0, dtype=np.int64)

    @cached_property
    def sq(self) -> np.ndarray:
        return np.multiply(self.x, self.x, out=self._buf("sq", self.x.shape, np.float32))

    @cached_property
    def rownorm2(self) -> np.ndarray:
        """‖x‖² of each row (float64)."""
        return self.sq.sum(axis=1, dtype=np.float64)

    def hits(self, threshold: float) -> np.ndarray:
        """Flat indices (row-major, into ``rows * dims``) where ``|x| >= threshold``; cached."""
        cache = self.__dict__.setdefault("_hits", {})
        if threshold not in cache:
            mask = np.greater_equal(self.abs, np.float32(threshold), out=self._buf("mask", self.x.shape, np.bool_))
            cache[threshold] = np.flatnonzero(mask)
        return cache[threshold]


# --- per-column moments: count, mean, std ----------------------------------------------------------

def moments_chunk(block: Block) -> State:
    """n, mean and M2 = Σ(x - mean)² per column: two passes over the block (the mean first), so a
    constant column has M2 = 0 exactly; float64 sums, Chan's merge across blocks."""
    n = block.n
    safe = np.maximum(n, 1)
    mean = block.x.sum(axis=0, dtype=np.float64) / safe
    dev = np.subtract(block.x, mean.astype(np.float32)[None, :], out=block._buf("dev", block.x.shape, np.float32))
    if block.nonfinite is not None:
        dev[block.nonfinite] = 0
    np.multiply(dev, dev, out=dev)
    m2 = dev.sum(axis=0, dtype=np.float64)
    return {"n": n.astype(np.int64), "mean": np.where(n > 0, mean, 0.0), "m2": m2}


def moments_combine(states: Sequence[State]) -> State:
    """Chan et al.'s parallel update: exact in any order up to rounding."""
    n = np.sum([s["n"] for s in states], axis=0)
    safe = np.maximum(n, 1)
    mean = np.sum([s["n"] * s["mean"] for s in states], axis=0) / safe
    m2 = np.sum([s["m2"] + s["n"] * (s["mean"] - mean) ** 2 for s in states], axis=0)
    return {"n": n, "mean": mean, "m2": m2}


def moments_aggregate(state: State) -> dict[str, np.ndarray]:
    n = state["n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(state["m2"] / n)
    return {"count": n, "mean": np.where(n > 0, state["mean"], np.nan), "std": np.where(n > 0, std, np.nan)}


# --- max |x| ------------------------------------------------------------------------------------

def max_abs_chunk(block: Block) -> State:
    return {"max": block.colmax.copy(), "n": block.n.copy()}


def max_abs_combine(states: Sequence[State]) -> State:
    return {"max": np.maximum.reduce([s["max"] for s in states]), "n": np.sum([s["n"] for s in states], axis=0)}


def max_abs_aggregate(state: State) -> dict[str, np.ndarray]:
    """max |x| over finite values; NaN for a column with no finite value (never a made-up 0)."""
    return {"max_abs": np.where(state["n"] > 0, state["max"], np.float32(np.nan)).astype(np.float32)}


# --- non-finite values: how many, in which columns, from which row ------------------------------

def nonfinite_chunk(block: Block) -> State:
    """NaN/inf per column, rows holding any, and the first such row (-1: none). The other statistics
    leave these values out; this one says how many were left out, and where."""
    if block.nonfinite is None:
        return {"count": np.zeros(block.dims, np.int64), "rows": 0, "first_row": -1, "n_rows": block.rows}
    bad_rows = np.flatnonzero(block.nonfinite.any(axis=1))
    return {"count": block.nonfinite.sum(axis=0, dtype=np.int64), "rows": int(bad_rows.size),
            "first_row": int(bad_rows[0]) + block.start if bad_rows.size else -1, "n_rows": block.rows}


def nonfinite_combine(states: Sequence[State]) -> State:
    firsts = [s["first_row"] for s in states if s["first_row"] >= 0]
    return {"count": np.sum([s["count"] for s in states], axis=0), "rows": sum(s["rows"] for s in states),
            "first_row": min(firsts) if firsts else -1, "n_rows": sum(s["n_rows"] for s in states)}


def nonfinite_aggregate(state: State) -> dict[str, Any]:
    """``nonfinite`` per column, ``nonfinite_total``, rows with any, the first such row, and
    ``no_finite``: True when not one finite value was seen (the statistics of those columns are NaN)."""
    total = int(state["count"].sum())
    return {"nonfinite": state["count"], "nonfinite_total": total, "nonfinite_rows": int(state["rows"]),
            "nonfinite_first_row": int(state["first_row"]),
            "no_finite": bool(state["n_rows"] * state["count"].size > 0
                              and total == state["n_rows"] * state["count"].size)}


# --- count of |x| >= threshold ------------------------------------------------------------------

def count_ge_chunk(block: Block, threshold: float) -> State:
    cols = block.hits(threshold) % max(block.dims, 1)
    return {"n": np.bincount(cols, minlength=block.dims).astype(np.int64)}


def count_ge_combine(states: Sequence[State]) -> State:
    return {"n": np.sum([s["n"] for s in states], axis=0)}


def count_ge_aggregate(state: State) -> dict[str, np.ndarray]:
    return {"count_ge": state["n"]}


# --- top-k rows by |x| per column ----------------------------------------------------------------

def _top_sorted(absv: np.ndarray, rows: np.ndarray | int, values: np.ndarray, k: int, threshold: np.ndarray):
    """Per column, the k entries with the largest |x| among those >= threshold, ties to the lower row.

    Every column has at least k entries >= its threshold (the caller guarantees it), so sorting the
    candidates by (column, -|x|, row) and taking the first k of each column is exact. ``rows`` is
    the (m, d) row ids of the entries, or an int: the row id of the first of m consecutive rows.
    """
    m, d = absv.shape
    idx = np.flatnonzero(absv >= np.ascontiguousarray(threshold)[None, :])
    cols = idx % d
    a = absv.ravel()[idx]
    if isinstance(rows, (int, np.integer)):
        # candidates come in row-major order: a stable sort on (column, -|x|) keeps ties in row order; an
        # |x| of -1 (a non-finite value, ``topk_chunk``) ranks after every |x| >= 0 of its column
        r = idx // d + rows
        rank = np.where(a >= 0, 0x7FFFFFFF - a.astype(np.float32).view(np.int32).astype(np.int64), 1 << 31)
        key = (cols.astype(np.int64) << 32) | rank
        order = np.argsort(key, kind="stable")
    else:
        r = rows.ravel()[idx]
        order = np.lexsort((r, -a, cols))
    counts = np.bincount(cols, minlength=d)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = order[(starts[:, None] + np.arange(k)[None, :]).ravel()]
    return r[pick].reshape(d, k).T.copy(), values.ravel()[idx[pick]].reshape(d, k).T.copy()


def select_top(absv: np.ndarray, rows: np.ndarray | int, values: np.ndarray, k: int) -> State:
    """The top-k of ``(m, d)`` candidates per column: ``rows`` and signed ``values``, (k', d), sorted.

    Large blocks are pre-filtered exactly: the k-th largest of the row-group maxima is a lower
    bound on the k-th largest value (k groups each hold a value at least that large), so only
    entries at or above it can be in the top k.
    """
    m, d = absv.shape
    kk = min(k, m)
    if kk == 0 or d == 0:
        return {"rows": np.zeros((0, d), np.int64), "values": np.zeros((0, d), np.float32)}
    if m <= kk:
        threshold = np.full(d, -np.inf, dtype=absv.dtype)
    else:
        g = max(1, min(16, m // (16 * kk)))
        groups = m // g
        gmax = absv[: groups * g].reshape(groups, g, d).max(axis=1) if g > 1 else absv
        if groups * g < m and g > 1:
            gmax = np.concatenate([gmax, absv[groups * g:].max(axis=0, keepdims=True)])
        n_groups = gmax.shape[0]
        threshold = np.partition(np.ascontiguousarray(gmax.T), n_groups - kk, axis=1)[:, n_groups - kk]
    top_rows, top_values = _top_sorted(absv, rows, values, kk, threshold)
    return {"rows": top_rows.astype(np.int64), "values": top_values.astype(np.float32)}


def topk_chunk(block: Block, k: int) -> State:
    """The block's top-k per column. A non-finite value is never a top row: ranked below every |x| (-1),
    it is taken only where its column has fewer than k finite values, and then left as padding (row -1,
    value 0, after the column's entries), as every merge expects."""
    if block.nonfinite is None:
        return select_top(block.abs, block.start, block.x, k)
    top = select_top(np.where(block.nonfinite, np.float32(-1), block.abs), block.start, block.x, k)
    bad = block.nonfinite[top["rows"] - block.start, np.arange(block.dims)[None, :]]
    top["rows"][bad], top["values"][bad] = -1, 0
    return top


def topk_combine(states: Sequence[State], k: int) -> State:
    states = [s for s in states if s["rows"].shape[0]]
    if not states:
        return {"rows": np.zeros((0, 0), np.int64), "values": np.zeros((0, 0), np.float32)}
    if len(states) == 1:
        return states[0]
    rows = np.concatenate([s["rows"] for s in states])
    values = np.concatenate([s["values"] for s in states])
    absv = np.abs(values)
    absv[rows < 0] = -1  # a unit's padding (row -1, see ``topk_merge``): ranked below every real |x|
    return select_top(absv, rows, values, k)


def topk_fold(old: State, new: State | Sequence[State], k: int) -> State:
    """``topk_combine([old, *new], k)`` where every row of ``new`` (a top-k, or several in row order) comes
    after ``old``'s (the next units of a fold): a value enters only above ``old``'s k-th largest |x| (a tie
    keeps the lower row), so only those few are ranked, in one merge, not the 2k rows of every column
    (the compaction's dearest step)."""
    news = [t for t in ([new] if isinstance(new, dict) else new) if t["rows"].shape[0]]
    if not news:
        return old
    if old["rows"].shape[0] < k or (old["rows"][k - 1] < 0).any():  # fewer than k so far: rank them all
        return topk_combine([old, *news], k)
    kth = np.abs(old["values"][k - 1])[None, :]
    rows, cols, values = [], [], []
    for t in news:  # by column, then rank: each column of ``t`` is sorted, and what enters is its first rows
        c, r = np.nonzero((np.abs(t["values"]) > kth).T & (t["rows"] >= 0).T)
        rows.append(t["rows"][r, c])
        cols.append(c)
        values.append(t["values"][r, c])
    if not sum(c.size for c in cols):
        return old
    return _merge_sparse(old, {"rows": np.concatenate(rows), "cols": np.concatenate(cols),
                               "values": np.concatenate(values)}, k, ranked=len(news) == 1)


def topk_aggregate(state: State) -> dict[str, np.ndarray]:
    return {"top_rows": state["rows"], "top_values": state["values"]}


# --- per-sequence moments of the flattened tensor (kurtosis, max-norm) --------------------------

def segments(seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts of each run of equal values in ``seq_ids`` and the value of each run."""
    if seq_ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], seq_ids[1:] != seq_ids[:-1]]))
    return starts, seq_ids[starts]


def seq_moments_chunk(block: Block, seq_ids: np.ndarray) -> State:
    """(n, mean, M2, M3, M4, max |x|) of each sequence's values in this block, all dims together.

    ``seq_ids`` (rows,) gives each row's sequence; rows of one sequence are contiguous. Power sums
    over a row are float32 (relative error ~1e-6 for d = 4096), summed over rows and merged across
    blocks in float64.
    """
    starts, ids = segments(np.asarray(seq_ids))
    if not ids.size:
        return _empty_seq_moments()
    x, sq = block.x, block.sq
    s1 = np.add.reduceat(x.sum(axis=1, dtype=np.float64), starts)
    s2 = np.add.reduceat(block.rownorm2, starts)
    s3 = np.add.reduceat(np.einsum("ij,ij->i", sq, x).astype(np.float64), starts)
    s4 = np.add.reduceat(np.einsum("ij,ij->i", sq, sq).astype(np.float64), starts)
    per_row = np.full(block.rows, block.dims, np.float64)
    if block.nonfinite is not None:
        per_row -= block.nonfinite.sum(axis=1)
    n = np.add.reduceat(per_row, starts)
    safe = np.maximum(n, 1)
    mu = s1 / safe
    m2 = np.maximum(s2 - n * mu**2, 0.0)
    m3 = s3 - 3 * mu * s2 + 2 * n * mu**3
    m4 = np.maximum(s4 - 4 * mu * s3 + 6 * mu**2 * s2 - 3 * n * mu**4, 0.0)
    maxabs = np.maximum.reduceat(block.abs.max(axis=1), starts) if block.dims else np.zeros(ids.size, np.float32)
    return {"seq": ids.astype(np.int64), "n": n, "mean": mu, "m2": m2, "m3": m3, "m4": m4,
            "max": maxabs.astype(np.float32)}


def _empty_seq_moments() -> State:
    z = np.zeros(0)
    return {"seq": np.zeros(0, np.int64), "n": z, "mean": z, "m2": z, "m3": z, "m4": z, "max": np.zeros(0, np.float32)}


def merge_moments(a: State, b: State) -> State:
    """Pébay's (2008) pairwise update of (n, mean, M2, M3, M4), elementwise over arrays."""
    na, nb = a["n"], b["n"]
    n = na + nb
    safe = np.where(n > 0, n, 1)
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * nb / safe
    m2 = a["m2"] + b["m2"] + delta**2 * na * nb / safe
    m3 = (a["m3"] + b["m3"] + delta**3 * na * nb * (na - nb) / safe**2
          + 3 * delta * (na * b["m2"] - nb * a["m2"]) / safe)
    m4 = (a["m4"] + b["m4"] + delta**4 * na * nb * (na**2 - na * nb + nb**2) / safe**3
          + 6 * delta**2 * (na**2 * b["m2"] + nb**2 * a["m2"]) / safe**2
          + 4 * delta * (na * b["m3"] - nb * a["m3"]) / safe)
    return {"n": n, "mean": mean, "m2": m2, "m3": m3, "m4": m4}


def seq_moments_combine(states: Sequence[State]) -> State:
    """Concatenate per-sequence records; merge records of a sequence split across blocks."""
    states = [s for s in states if s["seq"].size]
    if not states:
        return _empty_seq_moments()
    cat = {key: np.concatenate([s[key] for s in states]) for key in states[0]}
    order = np.argsort(cat["seq"], kind="stable")
    cat = {key: v[order] for key, v in cat.items()}
    starts, ids = segments(cat["seq"])
    if ids.size == cat["seq"].size:
        return cat
    out = {key: v[starts].copy() for key, v in cat.items()}
    ends = np.concatenate([starts[1:], [cat["seq"].size]])
    for i in np.flatnonzero(ends - starts > 1):
        acc = {key: out[key][i] for key in ("n", "mean", "m2", "m3", "m4")}
        for j in range(starts[i] + 1, ends[i]):
            acc = merge_moments(acc, {key: cat[key][j] for key in ("n", "mean", "m2", "m3", "m4")})
        for key, value in acc.items():
            out[key][i] = value
        out["max"][i] = cat["max"][starts[i]:ends[i]].max()
    return out


def seq_moments_aggregate(state: State, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Per sequence: non-excess kurtosis ``mean((x-μ)⁴) / (σ⁴ + eps)`` (Bondarenko et al.) and max |x|."""
    n = np.maximum(state["n"], 1)
    var = state["m2"] / n
    some = state["n"] > 0  # a sequence with no finite value has no kurtosis and no max: NaN, never 0
    nan = np.float64(np.nan)
    return {"seq": state["seq"], "kurtosis": np.where(some, (state["m4"] / n) / (var**2 + eps), nan),
            "max_norm": np.where(some, state["max"], nan), "mean": np.where(some, state["mean"], nan),
            "std": np.where(some, np.sqrt(var), nan), "n": state["n"]}


# --- sparse signed log histogram of values with |x| >= threshold, per column -------------------

HIST_RATIO = 1.01  #: bin width: each bin spans a factor of 1.01 in |x| (1%)
HIST_MAX = 1e6  #: |x| beyond this share the last bin (their sum still gives the exact mean)


def hist_bins(threshold: float) -> int:
    """Bins per sign for values in [threshold, HIST_MAX]."""
    return int(np.ceil(np.log(HIST_MAX / threshold) / np.log(HIST_RATIO))) + 1


def hist_bin(values: np.ndarray, threshold: float) -> np.ndarray:
    """Signed bin of each value (|value| >= threshold), ascending in value: most negative first."""
    half = hist_bins(threshold)
    b = np.floor(np.log(np.abs(values.astype(np.float64)) / threshold) / np.log(HIST_RATIO)).astype(np.int64)
    b = np.clip(b, 0, half - 1)
    return np.where(values < 0, half - 1 - b, half + b)


def hist_edges(threshold: float) -> np.ndarray:
    """Lower |x| edge of each signed bin, matching :func:`hist_bin` (negative half mirrored)."""
    half = hist_bins(threshold)
    lo = threshold * HIST_RATIO ** np.arange(half)
    return np.concatenate([-lo[::-1] * HIST_RATIO, lo])


def hist_from_values(cols: np.ndarray, values: np.ndarray, threshold: float) -> State:
    """Sparse histogram state from values (all with |v| >= threshold) and their columns."""
    keys = cols.astype(np.int64) * (2 * hist_bins(threshold)) + hist_bin(values, threshold)
    return _sparse_sum(keys, np.ones(keys.size, np.int64), values.astype(np.float64))


def _sparse_sum(keys: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> State:
    uniq, inv = np.unique(keys, return_inverse=True)
    return {"key": uniq, "count": np.bincount(inv, counts, minlength=uniq.size).astype(np.int64),
            "sum": np.bincount(inv, sums, minlength=uniq.size)}


def hist_combine(states: Sequence[State]) -> State:
    states = [s for s in states if s["key"].size]
    if not states:
        return {"key": np.zeros(0, np.int64), "count": np.zeros(0, np.int64), "sum": np.zeros(0)}
    return _sparse_sum(*(np.concatenate([s[k] for s in states]) for k in ("key", "count", "sum")))


def hist_column(state: State, column: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense (count, sum) per signed bin for one column."""
    nb = 2 * hist_bins(threshold)
    lo = np.searchsorted(state["key"], column * nb)
    hi = np.searchsorted(state["key"], (column + 1) * nb)
    counts = np.zeros(nb, np.int64)
    sums = np.zeros(nb)
    counts[state["key"][lo:hi] - column * nb] = state["count"][lo:hi]
    sums[state["key"][lo:hi] - column * nb] = state["sum"][lo:hi]
    return counts, sums


def hist_quantiles(counts: np.ndarray, sums: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles as the mean value of the bin holding each (exact when a bin's values are equal;
    within the 1% bin width otherwise)."""
    total = counts.sum()
    if not total:
        return [float("nan")] * len(qs)
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        i = int(np.searchsorted(cum, max(1, int(np.ceil(q * total)))))
        out.append(float(sums[i] / counts[i]))
    return out


# --- the per-dimension index statistics: moments, max |x|, count >= threshold, top-k -----------

def index_chunk(block: Block, k: int, threshold: float) -> State:
    """Everything the per-dimension index keeps about one block (see ``analysis.index``)."""
    return {"moments": moments_chunk(block), "max_abs": max_abs_chunk(block),
            "count_ge": count_ge_chunk(block, threshold), "topk": topk_chunk(block, k)}


def index_combine(states: Sequence[State], k: int) -> State:
    return {"moments": moments_combine([s["moments"] for s in states]),
            "max_abs": max_abs_combine([s["max_abs"] for s in states]),
            "count_ge": count_ge_combine([s["count_ge"] for s in states]),
            "topk": topk_combine([s["topk"] for s in states], k)}


def index_aggregate(state: State) -> dict[str, np.ndarray]:
    return {**moments_aggregate(state["moments"]), **max_abs_aggregate(state["max_abs"]),
            **count_ge_aggregate(state["count_ge"]), **topk_aggregate(state["topk"])}


# --- harvest-time statistics: the same states, accumulated while the model runs ----------------

#: hook templates a harvest keeps statistics of when ``capture.statistics: true``
DEFAULT_TEMPLATES = ("ln1.hook_normalized", "ln2.hook_normalized", "hook_resid_pre", "hook_resid_post")
#: templates whose captured rows are (token, width) values of the whole hook point
ROW_TEMPLATES = DEFAULT_TEMPLATES + ("hook_embed", "hook_attn_out", "hook_mlp_out", "ln_final.hook_normalized")


@dataclass(frozen=True)
class StatisticsPlan:
    """What one stage accumulates: which hooks, top-k and threshold, and the row numbering.

    Rows are numbered over every position of every sequence (``token_starts[s]``: the first such row
    of sequence ``s``), whatever ``capture.positions`` stores: a store harvested with
    ``positions: all`` numbers its rows the same way, so both give the same top-k rows.
    """

    hooks: tuple[str, ...]
    top_k: int
    threshold: float
    token_starts: np.ndarray  #: (sequences + 1,) int64
    hits: "HitPlan | None" = None  #: this stage's share of Dettmers' criterion (``harvest.hits``)
    #: first batch of every unit and the job's batch count (``harvest.shape.unit_bounds``): the statistics
    #: of each unit start from nothing (its top-k from a floor only), so folded in unit order they are the
    #: same whoever harvests them (any R, any stages)
    unit_bounds: tuple[int, ...] = ()

    def unit_of(self, batch: int) -> tuple[int, int]:
        """(first, end) batch of the unit holding ``batch``; the whole job is one unit without bounds."""
        bounds = self.unit_bounds
        if len(bounds) < 2:
            return 0, 1 << 62
        i = int(np.searchsorted(bounds, batch, side="right")) - 1
        return int(bounds[i]), int(bounds[min(i + 1, len(bounds) - 1)])


#: the key prefix of the device's per-batch statistics (``harvest.running``) in a stage's captures
DEVICE_PREFIX = "stats:"
#: the key prefix of the device's per-batch hit results in a stage's captures (never a store array)
HITS_PREFIX = "dettmers:"
#: the key of the per-(sequence, dimension) position counts the last stage hands its writer
HITS_POSITIONS = HITS_PREFIX + "positions"


@dataclass(frozen=True)
class HitPlan:
    """One stage's share of Dettmers' criterion: its hidden states, the magnitude, whether it counts positions."""

    sources: tuple[str, ...]  #: ``blocks.{l}.ln{1,2}.hook_normalized`` of this stage's analysed layers
    magnitude: float
    last: bool  #: the pipeline's last stage: counts the positions hit in any layer
    d_model: int


def topk_candidates(state: State | None, block: Block, k: int, floor: np.ndarray | None = None) -> State:
    """The entries of ``block`` that can still enter ``state``'s top-k, for :func:`topk_merge`.

    Once ``state`` holds k rows, only values with |x| strictly above its k-th largest can (a tie
    keeps the older, lower row), which after a few batches is a handful per block: ranking those is
    ~10x cheaper than ranking the whole block (``topk_chunk``), which is what the first blocks get.
    ``floor``: a lower bound given instead (``StatisticsAccumulator.floors``: a unit's first batches
    take one from the units before it); the candidates are then the values strictly above it.
    """
    if floor is None:
        if state is None or state["rows"].shape[0] < k or (state["rows"][-1] < 0).any():
            return {"dense": topk_chunk(block, k)}
        floor = np.abs(state["values"][-1])  # sorted by |x| descending: the k-th largest per column
    idx = np.flatnonzero(block.abs > floor[None, :])  # NaN/inf are 0 in block.abs: never above
    r, c = np.divmod(idx, max(block.dims, 1))
    return {"rows": r.astype(np.int64) + block.start, "cols": c, "values": block.x.ravel()[idx], "dims": block.dims}


def topk_merge(state: State | None, candidates: State, k: int) -> State:
    """``topk_combine([state, topk_chunk(block)])``, from ``topk_candidates(state, block)``: the same
    rows and values (same order: |x| descending, ties to the lower row), ranking only the candidates."""
    if "dense" in candidates:
        return candidates["dense"] if state is None else topk_combine([state, candidates["dense"]], k)
    if state is None:
        # a unit's first batch, sent sparse: each column's values above a floor (the units' before it) or
        # at or above its own k-th largest |x|; ``dims``: the columns. A column with fewer than k is
        # padded (row -1, value 0; ranked last everywhere): a floor from earlier rows can leave it short
        state = empty_top(int(candidates["dims"]), k)
    if not candidates["cols"].size:
        return state
    if state["rows"].shape[0] < k:  # fewer rows so far (a snapshot keeps only the rows in use): pad to k
        state = {"rows": padded_to(state["rows"], k, -1), "values": padded_to(state["values"], k, 0)}
    return _merge_sparse(state, candidates, k)


def empty_top(dims: int, k: int) -> State:
    """A top-k with every slot padding (row -1, value 0)."""
    return {"rows": np.full((k, dims), -1, np.int64), "values": np.zeros((k, dims), np.float32)}


def _rank_key(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A 64-bit key per entry that sorts as the top-k ranks: |x| descending, then row ascending (a float32
    |x| >= 0 orders as its bits; rows stay below 2**33, checked as candidates enter: ``_merge_sparse``);
    padding (row -1) sorts after every entry."""
    bits = np.abs(values).view(np.uint32).astype(np.uint64)
    key = ((np.uint64(0x7FFFFFFF) - bits) << np.uint64(33)) | rows.astype(np.uint64)
    key[rows < 0] = np.iinfo(np.uint64).max
    return key


def _merge_sparse(state: State, candidates: State, k: int, ranked: bool = False) -> State:
    """``topk_merge`` of sparse candidates into ``state`` (k rows, padding where it has fewer).

    A merge, not a sort of every touched column: each candidate's place is the number of the column's
    entries that outrank it (a (k, candidates) comparison) plus that of the candidates that do (one sort
    of the candidates; none when ``ranked``: they come by column, then rank); each of the state's entries
    moves down by the number of its column's candidates that outrank it (the same comparison, summed per
    column). The cost follows the candidates, not the widest column's count times the columns touched (an
    outlier dimension takes many)."""
    if candidates["rows"].max() >= 1 << 33:
        raise ValueError("harvest-time statistics number at most 2**33 tokens")
    key = _rank_key(candidates["values"], candidates["rows"])
    order = np.arange(key.size) if ranked else np.lexsort((key, candidates["cols"]))  # by column, then rank
    cols, key = candidates["cols"][order], key[order]
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    counts = np.diff(np.r_[starts, cols.size])
    touched = cols[starts]
    at = np.repeat(np.arange(touched.size), counts)  # each candidate's column among the touched
    old_rows, old_values = state["rows"][:, touched], state["values"][:, touched]
    beats = _rank_key(old_values, old_rows)[:, at] < key[None, :]  # (k, candidates): the old entry ranks first
    place = beats.sum(0) + np.arange(cols.size) - np.repeat(starts, counts)
    # one more slot, k, takes whatever falls out of the top-k (old or new)
    slot = np.minimum(np.arange(k)[:, None] + counts[None, :] - np.add.reduceat(beats, starts, axis=1, dtype=np.int64), k)
    unset = np.iinfo(np.int64).min  # every slot is written once when ``state`` ranks as ``_rank_key`` does
    rows, values = np.full((k + 1, touched.size), unset, np.int64), np.empty((k + 1, touched.size), old_values.dtype)
    np.put_along_axis(rows, slot, old_rows, axis=0)
    np.put_along_axis(values, slot, old_values, axis=0)
    place = np.minimum(place, k)
    rows[place, at] = candidates["rows"][order]
    values[place, at] = candidates["values"][order]
    if (rows[:k] == unset).any():
        raise RuntimeError("a top-k merge left a slot empty: its state was not ranked by |x|, then row "
                           "(a bug: please report it with the store)")
    out_rows, out_values = state["rows"].copy(), state["values"].copy()
    out_rows[:, touched], out_values[:, touched] = rows[:k], values[:k]
    return {"rows": out_rows, "values": out_values}


class StatisticsAccumulator:
    """Index statistics of every hook in a plan, over every token, folded in batch order.

    The writer hands each batch's results to :meth:`add`: per hook, the small per-batch reductions
    the stage made on its device (``harvest.running``), or the rows themselves (then reduced here by
    the kernels above); and the device's Dettmers hits (``harvest.hits``). One chunk state per hook
    is kept pending, and the writer calls :meth:`fold` with the frontier each time the manifest advances, so the running state
    always covers exactly the batches the manifest marks durable, merged one batch at a time in
    batch order: the same floating-point operations whatever the stages or the resumes. The top-k
    goes through :func:`topk_candidates` / :func:`topk_merge` in :meth:`add`, in batch order: each
    pending batch keeps the top-k over every batch up to it, which is what folding it gives.

    The floor of a unit's top-k. A unit's top-k starts from nothing, yet most of its values cannot
    enter the job's: those at or below the k-th largest |x| of the rows before the unit (a tie goes
    to the lower, earlier row). The k-th largest over *any* of those rows is at most that, so a unit
    may keep only the values above the floor the units this accumulator saw before it give
    (``_bound``), padding columns left with fewer than k (``topk_merge``). Folded onto every unit
    before it, in order (``load_job_state``), it gives the job's top-k exactly, whichever floor it had:
    a value that enters the job's top-k is above every such floor, and no k values that outrank it
    were dropped. Without that floor a unit's first batch is ranked whole, which with short units
    (replicas hand out a few batches at a time) was most of the statistics' cost.
    """

    def __init__(self, plan: StatisticsPlan, through: int = 0, state: dict[str, State] | None = None,
                 dettmers: State | None = None, start: int | None = None):
        self.plan = plan
        self.start = plan.unit_of(through)[0] if start is None else start  #: the unit's first batch
        self.through = through  #: batches [start, through) are folded into ``state``
        self.state: dict[str, State] = state or {}
        self.dettmers: State | None = dettmers  #: Dettmers' hit state (``dettmers_chunk``), when planned
        self.pending: dict[int, dict[str, State]] = {}
        #: (unit start, last batch added, hook -> top-k incl. pending batches, hook -> the unit's floor from
        #: the units before it): replaced whole at a unit's start, so ``floors`` (another thread) never
        #: hands the device a floor from a later batch
        self._tops: tuple[int, int, dict[str, State], dict[str, np.ndarray]] = (
            self.start, through - 1, {hook: s["topk"] for hook, s in self.state.items()}, {})
        #: (end, hook -> (k, d) the k largest |x| per column, unsorted, -1 for fewer, of the rows of batches
        #: before ``end`` this accumulator kept, hook -> the floor they give): a unit starting at or after
        #: ``end`` may take that floor
        self._bound: tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]] = (0, {}, {})
        self._dettmers_pending: dict[int, State] = {}
        self.next_batch: int | None = None  #: the batch the stage computes next (set by its writer), for ``floors``

    @property
    def end(self) -> int:
        """The end batch of the current unit."""
        return self.plan.unit_of(self.start)[1]

    def next_unit(self) -> None:
        """The current unit is folded whole (``through == end``): start the next from nothing."""
        self.start = self.through
        self.state, self.dettmers = {}, None

    def restart(self, batch: int) -> None:
        """Start over at ``batch``, a unit's first (a replica's writer begins a unit, maybe again)."""
        self.start = self.through = batch
        self.state, self.dettmers = {}, None
        self.pending.clear()
        self._dettmers_pending.clear()

    def add(self, batch: int, first_sequence: int, values: dict[str, np.ndarray], sequences: int = 0) -> None:
        """One batch: ``values[hook]`` holds its rows at every position, in (sequence, position) order;
        ``values`` also holds the device's Dettmers hits (``harvest.hits``) of its ``sequences`` sequences.

        Batches arrive in order. A batch already folded (a resumed stage redoing batches it had
        marked) is not counted twice.
        """
        if batch < self.through:
            return
        unit = self.plan.unit_of(batch)[0]
        was, last, top, floor = self._tops
        if unit != was or batch <= last:  # a unit's top-k starts from nothing (also when redone)
            merged = self._merged(last, top)  # once: the new unit's floor and the bound kept
            below = self._unit_floor(unit, merged if was < unit else self._bound)
            self._bound = merged
            self._tops = (unit, batch, {}, below)
        else:
            self._tops = (unit, batch, top, floor)
        top, floor = self._tops[2], self._tops[3]
        if self.plan.hits is not None:
            self.pending.setdefault(batch, {})
            self._dettmers_pending[batch] = dettmers_chunk(self.plan.hits, self.plan.token_starts, first_sequence,
                                                           sequences, values)
        start = int(self.plan.token_starts[first_sequence])
        scratch = Scratch.for_thread()
        k = self.plan.top_k
        states = {}
        for hook in self.plan.hooks:
            if f"{DEVICE_PREFIX}{hook}:sum" in values:  # reduced on the stage's device (harvest.running)
                states[hook] = self._from_device(hook, start, values, top)
                continue
            block = Block(values[hook], start, scratch, "statistics.")
            old = top.get(hook)
            below = floor.get(hook) if old is None else self._floor_of(old, floor.get(hook))
            top[hook] = topk_merge(old, topk_candidates(old, block, k, below), k)
            states[hook] = {"moments": moments_chunk(block), "max_abs": max_abs_chunk(block),
                            "count_ge": count_ge_chunk(block, self.plan.threshold), "topk": top[hook],
                            "nonfinite": nonfinite_chunk(block)}
        self.pending[batch] = states

    def floors(self) -> dict[str, np.ndarray]:
        """hook -> a floor for the batch the stage computes next (``next_batch``, set by the writer): only
        values above it can still enter the statistics (``harvest.running`` sends only those). Safe to
        read from another thread.

        Inside a unit: the running k-th largest |x| per column (pending batches included), or the unit's
        floor from the units before it where that is higher. At a unit's first batch: the floor the rows
        before it give (see the class). A hook with neither is left out (its batch is ranked whole)."""
        unit, last, top, floor = self._tops
        nxt = last + 1 if self.next_batch is None else self.next_batch  # None: the batch after the last added
        after = self.plan.unit_of(nxt)[0]
        if nxt > last and after == unit:
            return self._floors_of(top, floor)
        return self._unit_floor(after, self._merged(last, top) if unit < after else self._bound)

    @staticmethod
    def _unit_floor(unit: int, bound: tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
        """The floor of the unit starting at ``unit`` from ``bound`` (``_bound``, with the running unit
        merged in when it comes before): none when rows at or after the unit's start went into it."""
        end, _, floors = bound
        return floors if end <= unit else {}

    def _floor_of(self, top: State, floor: np.ndarray | None) -> np.ndarray | None:
        """The floor a unit's running ``top`` (kept above ``floor``, the unit's from the units before it)
        sets for the values after it; None: none (a column of fewer than k values, and no floor)."""
        k = self.plan.top_k
        if top["rows"].shape[0] < k:
            return floor
        kth = np.abs(top["values"][k - 1])  # sorted by |x| descending; padding is 0
        if floor is None:
            return None if (top["rows"][k - 1] < 0).any() else kth
        return np.maximum(kth, floor)

    def _floors_of(self, top: dict[str, State], floor: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {hook: f for hook, s in list(top.items()) if (f := self._floor_of(s, floor.get(hook))) is not None}

    def _merged(self, last: int, top: dict[str, State]) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``_bound`` with a unit's top-k (through batch ``last``, maybe short of the unit's end) merged into
        the k largest |x| of the rows seen: the k-th of those is a floor for the units after them all (a
        floor from rows at or after a unit's start is none: ``_unit_floor``). Ties do not matter to a
        floor, so only values are kept, merged by a partition (~0.1 ms per hook of 768 columns)."""
        k = self.plan.top_k
        end, largest, floors = self._bound
        largest, floors = dict(largest), dict(floors)
        for hook, t in list(top.items()):  # the writer may add a hook meanwhile (``floors``: another thread)
            kept = np.where(t["rows"] >= 0, np.abs(t["values"]), np.float32(-1))  # padding: -1, below every |x|
            both = kept if hook not in largest else np.concatenate([largest[hook], kept])
            if both.shape[0] > k:
                both = np.partition(both, both.shape[0] - k, axis=0)[both.shape[0] - k:]
            largest[hook] = both
            kth = both.min(axis=0) if both.shape[0] == k else None
            if kth is not None and (kth >= 0).all():  # k values in every column: a floor
                floors[hook] = np.ascontiguousarray(kth)
        return (max(end, last + 1), largest, floors) if top else self._bound

    def _from_device(self, hook: str, start: int, values: dict[str, np.ndarray], top: dict[str, State]) -> State:
        """One hook's chunk states from ``harvest.running.DeviceStatistics``' per-batch results."""
        get = lambda name: np.asarray(values[f"{DEVICE_PREFIX}{hook}:{name}"])  # noqa: E731
        s, sq = get("sum").astype(np.float64), get("sumsq").astype(np.float64)
        d = s.size
        tokens = None
        if f"{DEVICE_PREFIX}{hook}:nonfinite" in values:
            bad = get("nonfinite").astype(np.int64)
            n_bad_rows, first = (int(v) for v in get("nonfinite_rows"))
        else:
            bad, n_bad_rows, first = np.zeros(d, np.int64), 0, -1
        k = self.plan.top_k
        old = top.get(hook)
        if f"{DEVICE_PREFIX}{hook}:dense" in values:
            block = Block(get("dense"), start, Scratch.for_thread(), "statistics.")
            tokens = block.rows
            top[hook] = topk_merge(old, {"dense": topk_chunk(block, k)}, k)
        else:
            top[hook] = topk_merge(old, {"rows": get("rows").astype(np.int64) + start,
                                               "cols": get("cols").astype(np.int64),
                                               "values": get("values").astype(np.float32), "dims": s.size}, k)
        if tokens is None:
            tokens = int(values[f"{DEVICE_PREFIX}{hook}:tokens"])
        n = tokens - bad
        safe = np.maximum(n, 1)
        mean = s / safe
        m2 = np.maximum(sq - s * mean, 0.0)
        return {"moments": {"n": n, "mean": np.where(n > 0, mean, 0.0), "m2": m2},
                "max_abs": {"max": get("max").astype(np.float32), "n": n.copy()},
                "count_ge": {"n": get("count_ge").astype(np.int64)}, "topk": top[hook],
                "nonfinite": {"count": bad, "rows": n_bad_rows, "first_row": first + start if first >= 0 else -1,
                              "n_rows": tokens}}

    def fold(self, through: int) -> None:
        """Merge the pending batches [self.through, through) into the running state, in order (within
        the current unit: ``through <= end``)."""
        combine = {"moments": moments_combine, "max_abs": max_abs_combine, "count_ge": count_ge_combine,
                   "nonfinite": nonfinite_combine}
        for batch in range(self.through, through):
            if batch in self._dettmers_pending:
                new = self._dettmers_pending.pop(batch)
                self.dettmers = new if self.dettmers is None else dettmers_combine([self.dettmers, new])
            for hook, new in self.pending.pop(batch).items():
                old = self.state.get(hook)
                state = {key: new[key] if old is None else fn([old[key], new[key]]) for key, fn in combine.items()}
                state["topk"] = new["topk"]  # the top-k over batches [0, batch]: merged once, in add
                self.state[hook] = state
        self.through = max(self.through, through)

    def results(self) -> dict[str, dict[str, Any]]:
        """hook -> the index statistics (``index_aggregate``) and the non-finite counts."""
        return {hook: {**index_aggregate(s), **nonfinite_aggregate(s["nonfinite"])} for hook, s in self.state.items()}


def statistics_hooks(spec_value: bool | tuple[str, ...] | None, captured: list[Any], arch: Any = None,
                     n_layers: int = 0, run_layers: int | None = None) -> tuple[str, ...]:
    """The hooks ``capture.statistics`` gives running statistics, in forward order (``captured``: HookPoints).

    ``true`` takes every captured ``ln*.hook_normalized`` and ``hook_resid_*``; a list adds the hook
    points it names (``capture.hooks`` patterns), stored or not, as long as the harvest runs their
    layer (``run_layers``: blocks run, up to the last captured one). Only hook points with one
    d_model-wide row per token have statistics.
    """
    from .errors import SpecError
    from .hookpoints import expand

    if not spec_value:
        return ()
    default = [p for p in captured if p.axis == "token" and p.template in DEFAULT_TEMPLATES]
    if spec_value is True:
        return tuple(p.name for p in default)
    if arch is None:  # no model to resolve names against: the captured hooks only
        from .hookpoints import resolve

        named_names = resolve(list(spec_value), [p.name for p in captured], where="capture.hooks")
        named = [p for p in captured if p.name in named_names]
    else:
        named = expand(list(spec_value), arch, n_layers)
    stored = {p.name for p in captured}
    for p in named:
        if p.axis != "token" or p.template not in ROW_TEMPLATES:
            raise SpecError(f"capture.statistics names {p.name}, which has no single row per token; statistics "
                            "cover the residual stream, LayerNorm outputs and MLP/attention outputs")
        if p.name in stored:
            continue
        if p.template == "ln_final.hook_normalized":
            raise SpecError(f"capture.statistics names {p.name}, which this harvest does not run unless it is "
                            "captured: add it to capture.hooks")
        if run_layers is not None and p.layer is not None and p.layer >= run_layers:
            raise SpecError(f"capture.statistics names {p.name}, but this harvest runs blocks 0..{run_layers - 1} "
                            "only (up to the last captured hook point): capture a hook of that layer or drop it")
    points = {p.name: p for p in default + list(named)}
    order = {t: i for i, t in enumerate(ROW_TEMPLATES)}
    return tuple(name for name, p in sorted(points.items(), key=lambda kv: (kv[1].order, order[kv[1].template])))


def dettmers_sources(model_type: str, captured: list[Any]) -> tuple[str, ...]:
    """The hidden states feeding linear layers (``ln1``; and ``ln2`` for GPT-NeoX) of every layer some
    captured hook point belongs to: what Dettmers' criterion counts over, stored or not (the layers
    ``analysis.source.plan_sources`` analyses in a store that keeps them)."""
    lns = ("ln1", "ln2") if model_type == "gpt_neox" else ("ln1",)
    layers = sorted({p.layer for p in captured if p.layer is not None and p.layer >= 0})
    return tuple(f"blocks.{layer}.{ln}.hook_normalized" for layer in layers for ln in lns)


#: the top rows per dimension and the |x| threshold the harvest-time statistics keep (the index's defaults)
TOP_K = 32
THRESHOLD = 6.0
#: the key a stage's capture puts a hook's every-position rows under, when it stores only some positions
ALL_ROWS = "statistics:"


def pack(acc: StatisticsAccumulator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The running state of a unit as a few arrays (hooks side by side along the last axis) and
    attributes; its top-k as the entries in use only (:func:`top_entries`)."""
    hits = acc.plan.hits
    return pack_states({h: acc.state[h] for h in acc.plan.hooks if h in acc.state}, acc.plan.top_k, acc.plan.threshold,
                       acc.dettmers, hits.sources if hits else None, hits.magnitude if hits else None,
                       bool(hits and hits.last), sparse=True)


def pack_states(states: dict[str, State], top_k: int, threshold: float, dettmers: State | None = None,
                sources: Sequence[str] | None = None, magnitude: float | None = None, last: bool = False,
                sparse: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Index states (hook -> state, in order) and a Dettmers state as snapshot arrays and attributes.

    ``sparse``: the top-k as its entries in use (``entry_*``, :func:`top_entries`), for a unit's snapshot:
    past a job's first units a unit's top-k holds only the values above the floor the units before it
    give, a few per column, so its dense (k, columns) form is mostly padding. Else ``top_rows`` and
    ``top_values``, (k, columns), as the prefix keeps them for xarray and per-dimension reads."""
    hooks = list(states)
    states = list(states.values())

    def cat(get, axis=0):
        return np.concatenate([get(s) for s in states], axis=axis)

    extra, extra_attrs = pack_dettmers(dettmers, sources, magnitude, last)
    if not states:
        return extra, {"hooks": [], "widths": [], "top_k": top_k, "threshold": threshold,
                       "nonfinite_rows": {}, **extra_attrs}
    arrays = {**extra, "n": cat(lambda s: s["moments"]["n"]), "mean": cat(lambda s: s["moments"]["mean"]),
              "m2": cat(lambda s: s["moments"]["m2"]), "max": cat(lambda s: s["max_abs"]["max"]),
              "count_ge": cat(lambda s: s["count_ge"]["n"]), "nonfinite": cat(lambda s: s["nonfinite"]["count"])}
    if sparse:
        arrays.update(top_entries([s["topk"] for s in states]))
    else:
        top = max(real_rows(s["topk"]) for s in states)  # a unit's top-k past its first is mostly padding
        arrays.update(top_rows=cat(lambda s: padded_to(s["topk"]["rows"], top, -1), 1),
                      top_values=cat(lambda s: padded_to(s["topk"]["values"], top, 0), 1))
    attrs = {"hooks": hooks, "widths": [int(s["moments"]["n"].size) for s in states], "top_k": top_k,
             "threshold": threshold,
             "nonfinite_rows": {h: [int(s["nonfinite"][k]) for k in ("rows", "first_row", "n_rows")]
                                for h, s in zip(hooks, states)}, **extra_attrs}
    return arrays, attrs


def top_entries(tops: Sequence[State]) -> dict[str, np.ndarray]:
    """Side-by-side top-k's (each (k', w), padding: row -1) as their entries in use, by column then rank:
    ``entry_cols`` (column among all), ``entry_rows``, ``entry_values``."""
    cols, rows, values, at = [], [], [], 0
    for top in tops:
        c, slot = np.nonzero(top["rows"].T >= 0)  # column-major: by column, then slot (= rank)
        cols.append(c + at)
        rows.append(top["rows"][slot, c])
        values.append(top["values"][slot, c])
        at += top["rows"].shape[1]
    return {"entry_cols": np.concatenate(cols).astype(np.int64), "entry_rows": np.concatenate(rows).astype(np.int64),
            "entry_values": np.concatenate(values).astype(np.float32)}


def dense_top(cols: np.ndarray, rows: np.ndarray, values: np.ndarray, width: int) -> State:
    """:func:`top_entries`' inverse over ``width`` columns: (k', width), k' the most entries of a column,
    padded with row -1 and value 0."""
    counts = np.bincount(cols, minlength=width)
    depth = int(counts.max()) if counts.size else 0
    slot = np.arange(cols.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out_rows, out_values = np.full((depth, width), -1, np.int64), np.zeros((depth, width), np.float32)
    out_rows[slot, cols], out_values[slot, cols] = rows, values
    return {"rows": out_rows, "values": out_values}


def real_rows(top: State) -> int:
    """How many leading rows of a top-k hold a value in some column (the rest is padding, row -1)."""
    used = np.flatnonzero((top["rows"] >= 0).any(axis=1))
    return int(used[-1]) + 1 if used.size else 0


def padded_to(a: np.ndarray, rows: int, fill) -> np.ndarray:
    """``a`` cut or padded with ``fill`` to ``rows`` leading rows."""
    if a.shape[0] >= rows:
        return a[:rows]
    return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), fill, a.dtype)])


def unpack(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> dict[str, State]:
    """:func:`pack`'s inverse: hook -> the accumulator's state."""
    out: dict[str, State] = {}
    if not attrs["hooks"]:  # a stage with Dettmers' hits only
        return out
    if "entry_cols" in arrays:  # a unit's sparse top-k
        top = dense_top(arrays["entry_cols"], arrays["entry_rows"], arrays["entry_values"], int(sum(attrs["widths"])))
        top_rows, top_values = top["rows"], top["values"]
    else:
        top_rows, top_values = arrays["top_rows"], arrays["top_values"]
    lo = 0
    for hook, width in zip(attrs["hooks"], attrs["widths"]):
        cut = slice(lo, lo + width)
        lo += width
        n = arrays["n"][cut]
        rows, first, n_rows = attrs["nonfinite_rows"][hook]
        out[hook] = {"moments": {"n": n, "mean": arrays["mean"][cut], "m2": arrays["m2"][cut]},
                     "max_abs": {"max": arrays["max"][cut], "n": n.copy()},
                     "count_ge": {"n": arrays["count_ge"][cut]},
                     "topk": {"rows": top_rows[:, cut], "values": top_values[:, cut]},
                     "nonfinite": {"count": arrays["nonfinite"][cut], "rows": rows, "first_row": first,
                                   "n_rows": n_rows}}
    return out


def index_fold(old: State | None, new: State | Sequence[State], k: int) -> State:
    """One hook's state over ``old``'s batches then ``new``'s (a unit's, or the next units' in unit order):
    the left fold of units, every statistic but the top-k merged one unit at a time (the same
    floating-point operations however many are folded at once), the top-k in one merge."""
    news = [new] if isinstance(new, dict) else list(new)
    if old is None:
        old, news = news[0], news[1:]
    if not news:
        return old
    out = dict(old)
    for t in news:
        out = {"moments": moments_combine([out["moments"], t["moments"]]),
               "max_abs": max_abs_combine([out["max_abs"], t["max_abs"]]),
               "count_ge": count_ge_combine([out["count_ge"], t["count_ge"]]),
               "nonfinite": nonfinite_combine([out["nonfinite"], t["nonfinite"]])}
    out["topk"] = topk_fold(old["topk"], [t["topk"] for t in news], k)
    return out


@dataclass
class JobState:
    """The job's statistics over some units: every hook's state (whatever stage computed it) and the
    Dettmers state of every source (stages merged, ``dettmers_merge_stages``). The same for any
    ``run.stages`` and ``run.replicas``: units are folded in unit order, each from nothing (its top-k
    above a floor from the units before it: ``StatisticsAccumulator``)."""

    hooks: dict[str, State]
    top_k: int = TOP_K
    threshold: float = THRESHOLD
    dettmers: State | None = None
    sources: list[str] | None = None
    magnitude: float | None = None
    batches: int = 0  #: batches covered
    through: int = 0  #: batches [0, through) covered without a gap (what a prefix snapshot may hold)
    widths: dict[str, int] = field(default_factory=dict)  #: hook -> its dimensions (also when read for one)

    def fold(self, other: "JobState | Sequence[JobState]") -> None:
        """Append ``other`` (the next units, in order: one, or several folded at once)."""
        others = [other] if isinstance(other, JobState) else list(other)
        for hook in dict.fromkeys(h for o in others for h in o.hooks):
            self.hooks[hook] = index_fold(self.hooks.get(hook), [o.hooks[hook] for o in others if hook in o.hooks],
                                          others[-1].top_k)
        for o in others:
            if o.dettmers is not None:
                self.dettmers = o.dettmers if self.dettmers is None else dettmers_combine([self.dettmers, o.dettmers])
                self.sources, self.magnitude = o.sources, o.magnitude
            self.top_k, self.threshold = o.top_k, o.threshold
            self.batches += o.batches
            self.widths.update(o.widths)

    def pack(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return pack_states(self.hooks, self.top_k, self.threshold, self.dettmers, self.sources, self.magnitude, True)


def unit_state(snapshots: Sequence[tuple[dict[str, np.ndarray], dict[str, Any]]]) -> JobState:
    """One unit's job-wide state from its snapshots (every stage's, in stage order; or a prefix)."""
    hooks: dict[str, State] = {}
    widths: dict[str, int] = {}
    dett, sources, magnitude = [], [], None
    top_k, threshold = TOP_K, THRESHOLD
    for arrays, attrs in snapshots:
        hooks.update(unpack(arrays, attrs))
        widths.update(zip(attrs["hooks"], (int(w) for w in attrs.get("full_widths", attrs["widths"]))))
        top_k, threshold = int(attrs["top_k"]), float(attrs["threshold"])
        state = unpack_dettmers(arrays, attrs)
        if state is not None:
            dett.append(state)
            sources += list(attrs["dettmers_sources"])
            magnitude = float(attrs["dettmers_magnitude"])
    attrs = snapshots[0][1] if snapshots else {}
    n = int(attrs.get("through", 0)) - int(attrs.get("start", 0))
    return JobState(hooks, top_k, threshold, dettmers_merge_stages(dett) if dett else None,
                    sources if dett else None, magnitude, n, int(attrs.get("through", 0)), widths)


@dataclass
class HarvestStatistics:
    """A store's harvest-time statistics: per hook, the index statistics over every token it saw."""

    hooks: dict[str, dict[str, Any]]  #: hook -> ``index_aggregate`` + ``nonfinite_aggregate``
    batches: dict[str, int]  #: hook -> batches covered (every batch once the job is complete)
    top_k: int
    threshold: float
    widths: dict[str, int] = None  #: hook -> its number of dimensions
    dim: int | None = None  #: loaded for this one dimension only: every array holds its column alone

    def column(self, dim: int) -> int:
        """Where dimension ``dim`` is in the loaded arrays."""
        return 0 if self.dim is not None else dim

    def tokens(self, hook: str) -> int:
        """Tokens (rows over every position) the statistics of ``hook`` cover."""
        r = self.hooks[hook]
        return int(r["count"][0] + r["nonfinite"][0]) if r["count"].size else 0


#: the Dettmers arrays with one element per sequence or per (sequence, dimension) hit: the prefix keeps
#: them apart (``store.append_sequences``), so folding a unit in writes only that unit's records
SEQUENCE_KEYS = ("seq_len", "seq_hits", "lkeys", "lcount", "pkeys", "pcount")


@dataclass
class KeptPrefix:
    """The prefix snapshot a compactor wrote last, kept in memory: its next compaction folds the new units
    onto it rather than reading it back (a wide model's prefix is tens of MB, read and unpacked at every
    compaction otherwise). Its per-sequence Dettmers records are left out: a compaction appends only the
    units' own (``compact_statistics``)."""

    name: str | None = None  #: the prefix snapshot it holds
    job: "JobState | None" = None


def load_job_state(group, dim: int | None = None, sequences: bool = True,
                   kept: KeptPrefix | None = None) -> JobState | None:
    """The job's statistics: the newest prefix snapshot, then the units after it that each stage has a
    whole snapshot of and the manifest marks, in unit order, up to the first gap (a unit's top-k holds
    only the values above a floor from the units before it: it folds exactly onto all of them, so the
    units after a missing one wait for it); None when the store has no statistics. ``dim``: that
    dimension's column of each hook only.
    ``sequences=False``: the prefix's per-sequence Dettmers records are left out (empty), for a compaction
    that appends the units' own; ``kept``: the prefix as that compaction wrote it, taken from memory when
    it is still the store's."""
    from .store import ENTRIES, PER_DIMENSION, read_sequences, read_snapshot, snapshot_attrs, statistics_cover

    cover = statistics_cover(group)
    if cover is None:
        return None
    prefix, units = cover.prefix_name, cover.units
    keys = PER_DIMENSION + ENTRIES if dim is not None else None

    def read(name: str):
        if dim is None:
            arrays, attrs = read_snapshot(group, name)
            if "sequences" in attrs:  # a prefix: its per-sequence records are appended apart
                lengths = attrs["sequences"] if sequences else {k: 0 for k in attrs["sequences"]}
                arrays.update({f"dettmers_{k}": v for k, v in read_sequences(group, lengths).items()})
            return arrays, attrs
        attrs = snapshot_attrs(group, name)
        offsets = np.concatenate([[0], np.cumsum(attrs["widths"])[:-1]]).astype(np.int64)
        keep = [i for i, w in enumerate(attrs["widths"]) if dim < w]
        arrays, attrs = read_snapshot(group, name, columns=offsets[keep] + dim, keys=keys)
        attrs = {k: v for k, v in attrs.items() if not k.startswith("dettmers")}  # not read: per dimension only
        return arrays, {**attrs, "hooks": [attrs["hooks"][i] for i in keep], "widths": [1] * len(keep),
                        "full_widths": [attrs["widths"][i] for i in keep]}

    if kept is not None and kept.job is not None and prefix is not None and kept.name == prefix and not sequences:
        job = replace(kept.job, hooks=dict(kept.job.hooks), widths=dict(kept.job.widths))
    else:
        job = unit_state([read(prefix)]) if prefix is not None else JobState({})
        job.batches = job.through
    following = []  # the units after the prefix without a gap, folded at once (one top-k merge per hook)
    for start, end, names in units:
        if start != job.through:
            break
        following.append(unit_state([read(n) for n in names]))
        job.through = end
    if following:
        job.fold(following)
    return job


#: whole units a running job's compactor waits for before it rewrites the prefix: a wide model's prefix is
#: tens of MB (a top-k of 32 rows per dimension), so rewriting it after every unit would cost the writer
#: more than the unit's statistics; the store holds at most this many unit snapshots beyond it, each
#: small past a job's first units (its top-k's entries above the floor only: ``pack``), which a reader
#: folds onto the prefix in one merge per hook (``load_job_state``)
COMPACT_UNITS = 16


def compact_statistics(group, at_least: int | None = 1, kept: KeptPrefix | None = None) -> int:
    """Fold the whole units that follow the prefix without a gap into a new prefix snapshot, then delete
    the old prefix and every unit snapshot before the new one's end; returns batches in the prefix.
    ``at_least``: only when that many units follow without a gap (None: :data:`COMPACT_UNITS`, what a
    running job's writer or replica driver asks; the runner folds every unit at a run's end and start).
    ``kept``: the compactor's prefix in memory (:class:`KeptPrefix`), used and updated.

    The new prefix is the old one with the units left-folded onto it in unit order, which is what a
    reader folds from the snapshots it replaces, so compacting never changes a result. It is written
    whole before anything is deleted: a process killed in between leaves both, and readers take the
    newest prefix and skip the units it covers. One process compacts a store at a time (the writer of
    the last stage, the replica driver, or the runner between runs).
    """
    from .store import (STATISTICS_COLUMNS, append_sequences, delete_snapshot, prefix_snapshot_name, prefix_snapshots,
                        snapshot_attrs, statistics_cover, statistics_stages, unit_snapshot_name, unit_snapshots, write_snapshot)

    cover = statistics_cover(group)
    if cover is None:
        return 0
    through = cover.prefix
    end, following = through, 0  # the units that follow the prefix without a gap
    for a, b, _ in cover.units:
        if a != end:
            break
        end, following = b, following + 1
    if following < (COMPACT_UNITS if at_least is None else at_least):
        return through
    if cover.units and cover.units[0][0] == through:
        # the prefix's per-sequence records stay where they are: only the units' are appended
        job = load_job_state(group, sequences=False, kept=kept)
        if kept is not None:
            kept.name = kept.job = None  # until the new prefix is whole
        if job.through > through:
            arrays, attrs = job.pack()
            extra = {}
            if job.dettmers is not None:
                have = (snapshot_attrs(group, cover.prefix_name) or {}).get("sequences", {}) if cover.prefix_name else {}
                records = {k: arrays.pop(f"dettmers_{k}") for k in SEQUENCE_KEYS}
                extra["sequences"] = append_sequences(group, records, have)
                job.dettmers = {**job.dettmers, **{k: records[k][:0] for k in SEQUENCE_KEYS}}  # appended: not kept
            write_snapshot(group, prefix_snapshot_name(job.through), arrays,
                           {**attrs, "start": 0, "through": job.through, **extra}, columns=STATISTICS_COLUMNS)
            through = job.through
            if kept is not None:
                kept.name, kept.job = prefix_snapshot_name(job.through), job
    for b in prefix_snapshots(group):
        if b != through:
            delete_snapshot(group, prefix_snapshot_name(b))
    for stage in statistics_stages(group):
        for a, b in unit_snapshots(group, stage):
            if a < through:
                delete_snapshot(group, unit_snapshot_name(stage, a, b))
    return through


class Compactor:
    """A running job's compactions of its statistics (one process's: the last stage's writer, or the replica
    driver): after every :data:`COMPACT_UNITS` units it marks, the units done without a gap are folded
    into the prefix, onto the one it wrote last, kept in memory (:class:`KeptPrefix`). The units are
    counted here: listing the store's snapshots after every unit cost ~10 ms a unit."""

    def __init__(self, group):
        self.group = group
        self.kept = KeptPrefix()
        self.waiting = 0  #: units marked since the last compaction that wrote a prefix

    def unit_done(self) -> None:
        """A unit was marked (every stage's snapshot of it written)."""
        self.waiting += 1
        if self.waiting >= COMPACT_UNITS:
            before = self.kept.name
            compact_statistics(self.group, at_least=None, kept=self.kept)
            if self.kept.name != before:  # else a unit before them is not done yet: try again after the next
                self.waiting = 0


def load_statistics(group, dim: int | None = None) -> HarvestStatistics | None:
    """The job's index statistics (``load_job_state``), or None when the store was harvested without them.

    ``dim``: read only that dimension's column of each hook (``harvest query dim``): a few small
    chunks per snapshot, whatever the width and the number of hooks; hooks narrower than ``dim`` are left out.
    """
    job = load_job_state(group, dim)
    if job is None or not job.hooks:
        return None
    hooks = {hook: {**index_aggregate(state), **nonfinite_aggregate(state["nonfinite"])}
             for hook, state in job.hooks.items()}
    return HarvestStatistics(hooks, {hook: job.batches for hook in hooks}, job.top_k, job.threshold,
                             dict(job.widths), dim)


# --- Dettmers' criterion from the device's hits (``harvest.hits``) ------------------------------------

def dettmers_chunk(plan: HitPlan, token_starts: np.ndarray, first: int, sequences: int,
                   values: dict[str, np.ndarray]) -> State:
    """One batch's Dettmers state for one stage, from its sparse hits: what ``analysis.scan`` keeps per
    hidden state (hits, max |x|, NaN/inf, share of ‖x‖², histogram of the hits) plus, per (sequence,
    dimension), how many of this stage's layers have a hit (``lkeys``/``lcount``) and, on the last
    stage, how many positions have one in any layer (``pkeys``/``pcount``)."""
    PREFIX, POSITIONS = HITS_PREFIX, HITS_POSITIONS
    d = plan.d_model
    lengths = np.diff(np.asarray(token_starts[first:first + sequences + 1], np.int64))
    layers = source_layers(plan.sources)
    S = len(plan.sources)
    out: State = {"rows": int(lengths.sum()), "seqs": int(sequences), "seq_len": lengths,
                  "hits": np.zeros((S, d), np.int64), "max": np.zeros((S, d), np.float32),
                  "nonfinite": np.zeros((S, d), np.int64), "share_hits": np.zeros((S, d)),
                  "layer_any": np.zeros((len(set(layers)), d), np.int64), "seq_hits": np.zeros(sequences, np.int64)}
    hists, per_layer = [], {}
    for si, name in enumerate(plan.sources):
        where = np.asarray(values[f"{PREFIX}{name}:where"]).reshape(-1, 3)
        b, c = where[:, 0], where[:, 2]
        v = np.asarray(values[f"{PREFIX}{name}:values"], np.float32)
        norm2 = np.asarray(values[f"{PREFIX}{name}:norm2"], np.float64)
        out["hits"][si] = np.bincount(c, minlength=d)
        out["share_hits"][si] = np.bincount(c, weights=v.astype(np.float64) ** 2
                                            / np.maximum(norm2, np.finfo(np.float64).tiny), minlength=d)
        out["max"][si] = np.asarray(values[f"{PREFIX}{name}:max"], np.float32)
        out["nonfinite"][si] = np.asarray(values[f"{PREFIX}{name}:nonfinite"], np.int64)
        out["seq_hits"] += np.bincount(b, minlength=sequences)
        hists.append(hist_from_values(c, v, plan.magnitude))
        per_layer.setdefault(layers[si], []).append((first + b) * d + c)
    out["hist"] = hist_combine(hists) if hists else hist_combine([])
    keys = []
    for li, layer in enumerate(sorted(per_layer)):
        k = np.unique(np.concatenate(per_layer[layer]))
        out["layer_any"][li] = np.bincount(k % d, minlength=d)
        keys.append(k)
    out["lkeys"], out["lcount"] = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                                            return_counts=True)
    out["lcount"] = out["lcount"].astype(np.int64)
    if plan.last:
        counts = np.asarray(values[POSITIONS], np.int64).reshape(sequences, d)
        i, j = np.nonzero(counts)
        out["pkeys"], out["pcount"] = (first + i) * d + j, counts[i, j]
    else:
        out["pkeys"], out["pcount"] = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return out


def dettmers_combine(states: Sequence[State]) -> State:
    """Merge consecutive batches' states (in batch order: their sequences follow one another)."""
    out: State = {"rows": sum(s["rows"] for s in states), "seqs": sum(s["seqs"] for s in states)}
    for key in ("hits", "nonfinite", "share_hits", "layer_any"):
        out[key] = np.sum([s[key] for s in states], axis=0)
    out["max"] = np.maximum.reduce([s["max"] for s in states])
    out["hist"] = hist_combine([s["hist"] for s in states])
    for key in ("seq_len", "seq_hits", "lkeys", "lcount", "pkeys", "pcount"):
        out[key] = np.concatenate([s[key] for s in states])
    return out


def source_layers(sources: Sequence[str]) -> list[int]:
    from .hookpoints import split_name

    return [int(split_name(name)[1]) for name in sources]


_DETTMERS_ARRAYS = ("seq_len", "hits", "max", "nonfinite", "share_hits", "layer_any", "seq_hits", "lkeys", "lcount",
                    "pkeys", "pcount")


def pack_dettmers(state: State | None, sources: Sequence[str] | None, magnitude: float | None,
                  last: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A Dettmers state (a stage's, or every stage's merged) as snapshot arrays (``dettmers_*``) and attributes."""
    if state is None or sources is None:
        return {}, {}
    arrays = {f"dettmers_{k}": state[k] for k in _DETTMERS_ARRAYS}
    arrays.update({f"dettmers_hist_{k}": state["hist"][k] for k in ("key", "count", "sum")})
    return arrays, {"dettmers": {"rows": int(state["rows"]), "seqs": int(state["seqs"])},
                    "dettmers_sources": list(sources), "dettmers_magnitude": magnitude, "dettmers_last": last}


def dettmers_merge_stages(states: Sequence[State]) -> State:
    """One unit's Dettmers state of every stage (in stage order) as one state over all their sources:
    per-source rows stacked, the (sequence, dimension) layer counts summed by key, the positions from
    the last stage. What ``DettmersStatistics.reduce`` gives is the same from either form."""
    if len(states) == 1:
        return states[0]
    first, last = states[0], states[-1]
    keys = np.concatenate([s["lkeys"] for s in states])
    uniq, inv = np.unique(keys, return_inverse=True)
    out: State = {"rows": first["rows"], "seqs": first["seqs"], "seq_len": first["seq_len"],
                  "lkeys": uniq, "lcount": np.bincount(inv, np.concatenate([s["lcount"] for s in states]),
                                                       minlength=uniq.size).astype(np.int64),
                  "pkeys": last["pkeys"], "pcount": last["pcount"],
                  "seq_hits": np.sum([s["seq_hits"] for s in states], axis=0),
                  "hist": hist_combine([s["hist"] for s in states])}
    for key in ("hits", "max", "nonfinite", "share_hits", "layer_any"):
        out[key] = np.concatenate([s[key] for s in states])
    return out


def unpack_dettmers(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> State | None:
    if "dettmers" not in attrs:
        return None
    state: State = {k: arrays[f"dettmers_{k}"] for k in _DETTMERS_ARRAYS}
    state["hist"] = {k: arrays[f"dettmers_hist_{k}"] for k in ("key", "count", "sum")}
    state.update(attrs["dettmers"])
    return state


@dataclass
class DettmersStatistics:
    """Every stage's Dettmers state as the harvest left it, and what it was computed with."""

    sources: list[str]  #: hidden states, in forward order
    magnitude: float
    states: list[State]  #: one per stage, in stage order (their sources in that order)
    stage_sources: list[list[str]]

    @property
    def tokens(self) -> int:
        return int(self.states[0]["rows"]) if self.states else 0

    @property
    def sequences(self) -> int:
        return int(self.states[0]["seqs"]) if self.states else 0

    def reduce(self, layer_frac: float, pos_frac: float) -> State:
        """The state ``analysis.scan.OutlierReducer`` ends a pass with, for these fractions."""
        layers = sorted(set(source_layers(self.sources)))
        L = len(layers)
        st = self.states
        d = st[0]["hits"].shape[1]
        keys = np.concatenate([s["lkeys"] for s in st])
        uniq, inv = np.unique(keys, return_inverse=True)
        n_layers = np.bincount(inv, np.concatenate([s["lcount"] for s in st]), minlength=uniq.size)
        last = st[-1]
        if not np.array_equal(last["pkeys"], uniq):
            raise ValueError("harvest-time hit sets out of step: the layers' and the positions' (sequence, "
                             "dimension) sets differ")
        seq_len = st[0]["seq_len"].astype(np.float64)
        lf = n_layers / max(L, 1)
        pf = last["pcount"] / np.maximum(seq_len[uniq // d], 1)
        dims = uniq % d
        meets = (lf >= layer_frac - 1e-12) & (pf >= pos_frac - 1e-12)
        n = int(st[0]["seqs"])
        return {"rows": int(st[0]["rows"]), "n_groups": n,
                "hits": np.concatenate([s["hits"] for s in st]), "max": np.concatenate([s["max"] for s in st]),
                "nonfinite": np.concatenate([s["nonfinite"] for s in st]),
                "share_hits": np.concatenate([s["share_hits"] for s in st]),
                "hist": hist_combine([s["hist"] for s in st]),
                "layer_any": np.concatenate([s["layer_any"] for s in st]),
                "layer_frac_sum": np.bincount(dims, lf, minlength=d), "pos_frac_sum": np.bincount(dims, pf, minlength=d),
                "group_outlier": np.bincount(dims[meets], minlength=d).astype(np.int64),
                "done_ids": np.arange(n, dtype=np.int64), "done_hits": np.sum([s["seq_hits"] for s in st], axis=0)}


def load_dettmers(group) -> DettmersStatistics | None:
    """The Dettmers state of every source over the batches from 0 that the statistics cover without a
    gap (every batch once the job is complete), or None when the harvest kept none."""
    job = load_job_state(group)
    if job is None or job.dettmers is None:
        return None
    return DettmersStatistics(list(job.sources), float(job.magnitude), [job.dettmers], [list(job.sources)])
