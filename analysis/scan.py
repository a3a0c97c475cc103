"""One pass over a store computes every statistic: the outlier analysis and the per-dimension index.

The graph (dask.delayed over ``reading.lazy_array(...).to_delayed()`` blocks)::

    for every activation array a and row block b (whole zarr chunks, ~block_mib each):
        scan_chunk(a, b)          reads the block once; computes everything that array is used for:
                                  index statistics (raw values), kurtosis and massive activations
                                  (residual arrays), Dettmers hit statistics (hidden states feeding
                                  linear layers, LayerNorm applied here when only the residual was
                                  stored)
    per row block b:  block_outliers(all hidden states' parts of b)   union of hit rows across layers
    per statistic:    a fixed tree of combines, split_every states per task, then aggregate

Each block is read by exactly one task, and every state is a few arrays of size (dims,) or
(layers, dims) plus sparse hit records, so peak memory depends on the block size and the model's
width, not on the number of rows (the per-sequence results grow with the number of sequences: a
few numbers each). The tree is fixed, so the threaded and dask.distributed schedulers compute
the same floating-point operations in the same order and return identical results.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from harvest.errors import AnalysisError
from harvest.verify import names_damage

from . import stats
from .runtime import dask_scheduler
from .reading import lazy_array
from .source import ArrayInfo, Source, StoreFacts, plan_sources, residual_arrays, reweight_ln, sequence_starts


@dataclass(frozen=True)
class ScanParams:
    """Parameters of the pass; the defaults are the papers'."""

    magnitude: float = 6.0  #: Dettmers' α: an outlier value has |x| >= 6
    layer_frac: float = 0.25  #: ... in at least 25% of the layers
    pos_frac: float = 0.06  #: ... and at at least 6% of the sequence positions
    aggregate: str = "sequence"  #: "sequence": per sequence, then the mean over sequences; "corpus": all rows at once
    massive_abs: float = 100.0  #: Sun et al.: |x| > 100 ...
    massive_ratio: float = 1000.0  #: ... and >= 1000x the median |x| of the token's hidden state
    top_k: int = 32  #: top rows per dimension kept in the index
    index_threshold: float | None = None  #: the index's "count >= threshold" (default: magnitude)
    block_mib: float = 8.0  #: stored MiB per task (whole zarr chunks)
    max_records: int = 10_000  #: massive-activation records kept per layer (largest |x| first)
    split_every: int = 8

    @property
    def count_threshold(self) -> float:
        return self.magnitude if self.index_threshold is None else self.index_threshold

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Segs(NamedTuple):
    """The groups (sequences, or the whole corpus) that rows [lo, hi) belong to."""

    ids: np.ndarray  #: (n,) group ids
    offsets: np.ndarray  #: (n,) first row of each group inside the block (0 for the first)
    totals: np.ndarray  #: (n,) rows of each group in the whole store

    def row_group(self, local_rows: np.ndarray) -> np.ndarray:
        """Index into ids of each local row."""
        return np.searchsorted(self.offsets, local_rows, side="right") - 1

    def rows_in_block(self, n_rows: int) -> np.ndarray:
        return np.diff(np.concatenate([self.offsets, [n_rows]]))


def segs_for(starts: np.ndarray, lo: int, hi: int) -> Segs:
    first = int(np.searchsorted(starts, lo, side="right")) - 1
    last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
    ids = np.arange(first, last + 1, dtype=np.int64)
    return Segs(ids, np.maximum(starts[ids] - lo, 0), starts[ids + 1] - starts[ids])


@dataclass(frozen=True)
class Roles:
    """What one array's blocks are used for."""

    index: bool
    residual_layer: int | None
    sources: tuple[tuple[int, int, int, str, str], ...]  #: (source idx, layer idx, layer, ln, how)


# --- per block --------------------------------------------------------------------------------------

def index_chunk(block: stats.Block, k: int, threshold: float) -> dict:
    return {"moments": stats.moments_chunk(block), "max_abs": stats.max_abs_chunk(block),
            "count_ge": stats.count_ge_chunk(block, threshold), "topk": stats.topk_chunk(block, k)}


def index_combine(states: list[dict], k: int) -> dict:
    return {"moments": stats.moments_combine([s["moments"] for s in states]),
            "max_abs": stats.max_abs_combine([s["max_abs"] for s in states]),
            "count_ge": stats.count_ge_combine([s["count_ge"] for s in states]),
            "topk": stats.topk_combine([s["topk"] for s in states], k)}


def index_aggregate(state: dict) -> dict[str, np.ndarray]:
    return {**stats.moments_aggregate(state["moments"]), **stats.max_abs_aggregate(state["max_abs"]),
            **stats.count_ge_aggregate(state["count_ge"]), **stats.topk_aggregate(state["topk"])}


def massive_chunk(block: stats.Block, abs_threshold: float, ratio: float, max_records: int) -> dict:
    """Values with |x| > abs_threshold and >= ratio x the median |x| of their row (token)."""
    d = block.dims
    idx = np.flatnonzero(block.abs > np.float32(abs_threshold))
    r, c = np.divmod(idx, d)
    if idx.size:
        urows = np.unique(r)
        med = np.median(block.abs[urows], axis=1)[np.searchsorted(urows, r)]
    else:
        med = np.zeros(0, np.float32)
    values = block.x.ravel()[idx]
    keep = np.abs(values) >= ratio * med
    rec = {"row": (r[keep] + block.start).astype(np.int64), "dim": c[keep].astype(np.int64),
           "value": values[keep].astype(np.float32), "median": med[keep].astype(np.float32),
           "count": np.bincount(c[keep], minlength=d).astype(np.int64)}
    return _cap_records(rec, max_records)


def _cap_records(rec: dict, max_records: int) -> dict:
    """The ``max_records`` largest |x| (ties by row, dim); ``count`` keeps counting all of them."""
    order = np.lexsort((rec["dim"], rec["row"], -np.abs(rec["value"])))[:max_records]
    return {**{k: rec[k][order] for k in ("row", "dim", "value", "median")}, "count": rec["count"]}


def massive_combine(states: list[dict], max_records: int) -> dict:
    rec = {k: np.concatenate([s[k] for s in states]) for k in ("row", "dim", "value", "median")}
    rec["count"] = np.sum([s["count"] for s in states], axis=0)
    return _cap_records(rec, max_records)


def outlier_chunk(block: stats.Block, alpha: float, groups: Segs) -> dict:
    """Dettmers' hit statistics of one hidden state in one block; hits are kept sparse."""
    d = block.dims
    idx = block.hits(alpha)
    r, c = np.divmod(idx, d)
    values = block.x.ravel()[idx]
    urows, at = np.unique(r, return_inverse=True)
    sub = block.x[urows]
    norm2 = np.einsum("ij,ij->i", sub, sub, dtype=np.float64)  # ‖x‖² of the rows with a hit only
    share = values.astype(np.float64) ** 2 / np.maximum(norm2[at], np.finfo(np.float64).tiny)
    g = groups.row_group(r)
    return {
        "idx": idx, "any": np.unique(g * d + c), "rows": block.rows,
        "hits": np.bincount(c, minlength=d).astype(np.int64), "max": block.colmax.astype(np.float32),
        "share_hits": np.bincount(c, weights=share, minlength=d),
        "hist": stats.hist_from_values(c, values, alpha),
        "group_hits": np.bincount(g, minlength=groups.ids.size).astype(np.int64),
        "nonfinite": (block.nonfinite.sum(axis=0, dtype=np.int64) if block.nonfinite is not None
                      else np.zeros(d, np.int64)),
    }


def scan_chunk(values: np.ndarray, start: int, roles: Roles, params: ScanParams, ln: dict | None,
               eps: float, seqs: Segs, groups: Segs) -> dict:
    """Everything computed from one block of one array (it is read once, here)."""
    scratch = stats.Scratch.for_thread()
    raw = stats.Block(values, start, scratch, "raw.")
    out: dict[str, Any] = {"nonfinite": stats.nonfinite_chunk(raw)}  # what every statistic leaves out
    if roles.index:
        out["index"] = index_chunk(raw, params.top_k, params.count_threshold)
    if roles.residual_layer is not None:
        out["kurt"] = stats.seq_moments_chunk(raw, seqs.ids[seqs.row_group(np.arange(raw.rows))])
        out["massive"] = massive_chunk(raw, params.massive_abs, params.massive_ratio, params.max_records)
    parts = []
    z = None
    for si, li, layer, name, how in roles.sources:
        if how == "stored":
            block = raw
        elif how == "resid":
            if z is None:  # ln1 and ln2 of a parallel block normalise the same residual: once
                z = normalize(raw.x, eps, scratch.get("z", raw.x.shape, np.float32))
            y = affine(z, ln[f"{name}.w"][layer], ln[f"{name}.b"][layer], scratch.get(f"{name}.y", z.shape, np.float32))
            if raw.nonfinite is not None:  # LayerNorm of a row with a NaN/inf is NaN (raw.x holds 0 there)
                y[raw.nonfinite.any(axis=1)] = np.nan
            block = stats.Block(y, start, scratch, f"{name}.")
        else:
            y = reweight_ln(raw.x, ln["ln1.w"][layer], ln["ln1.b"][layer], ln[f"{name}.w"][layer],
                            ln[f"{name}.b"][layer])
            if raw.nonfinite is not None:
                y[raw.nonfinite] = np.nan
            block = stats.Block(y, start, scratch, f"{name}.")
        parts.append((si, li, outlier_chunk(block, params.magnitude, groups)))
    if parts:
        out["outlier"] = parts
    return out


def normalize(x: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) per row, float32 (torch's LayerNorm: biased variance)."""
    d = max(x.shape[1], 1)
    mu = x.sum(axis=1) / np.float32(d)  # float32 as the model computes it (pairwise sums)
    np.subtract(x, mu[:, None], out=out)
    var = np.einsum("ij,ij->i", out, out) / np.float32(d)
    out *= (1.0 / np.sqrt(var + np.float32(eps)))[:, None]
    return out


def affine(z: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.multiply(z, w[None, :], out=out)
    out += b[None, :]
    return out


# --- the outlier state: per hidden state sums, per group (sequence) hit sets ---------------------

class OutlierReducer:
    """Block merge (across layers), combine (across blocks) and aggregate of Dettmers' statistics.

    Open groups (sequences not yet seen whole) keep sparse hit sets: ``lkeys`` = (group, layer,
    dim) with any |x| >= α, ``pkeys`` = (group, dim) -> rows with a hit in any layer. A group is
    finalised as soon as all its rows are merged: its layer and position fractions are added to
    per-dimension sums and its sets are dropped.
    """

    def __init__(self, n_sources: int, n_layers: int, d: int, params: ScanParams):
        self.S, self.L, self.d, self.params = n_sources, n_layers, d, params

    def __dask_tokenize__(self):
        return ("OutlierReducer", self.S, self.L, self.d, self.params)

    def empty(self) -> dict:
        S, L, d = self.S, self.L, self.d
        z = np.zeros(0, np.int64)
        return {"rows": 0, "hits": np.zeros((S, d), np.int64), "max": np.zeros((S, d), np.float32),
                "nonfinite": np.zeros((S, d), np.int64),
                "share_hits": np.zeros((S, d)),
                "hist": {"key": z, "count": z, "sum": np.zeros(0)},
                "open_ids": z, "open_rows": z, "open_totals": z, "open_hits": z, "lkeys": z, "pkeys": z, "pcount": z,
                "n_groups": 0, "layer_frac_sum": np.zeros(d), "pos_frac_sum": np.zeros(d),
                "group_outlier": np.zeros(d, np.int64), "layer_any": np.zeros((L, d), np.int64),
                "done_ids": z, "done_hits": z}

    def block(self, outs: list[list], groups: Segs) -> dict:
        """Merge the parts of every hidden state for one row block (all layers, same rows)."""
        d, L = self.d, self.L
        state = self.empty()
        idxs, lkeys, group_hits = [], [], np.zeros(groups.ids.size, np.int64)
        rows = 0
        for parts in outs:
            for si, li, p in parts:
                rows = p["rows"]
                state["hits"][si] = p["hits"]
                state["max"][si] = p["max"]
                state["share_hits"][si] = p["share_hits"]
                state["nonfinite"][si] = p["nonfinite"]
                idxs.append(p["idx"])
                g, c = np.divmod(p["any"], d)
                lkeys.append(groups.ids[g] * (L * d) + li * d + c)
                group_hits += p["group_hits"]
        state["rows"] = rows
        state["hist"] = stats.hist_combine([p["hist"] for parts in outs for _, _, p in parts])
        union = np.unique(np.concatenate(idxs)) if idxs else np.zeros(0, np.int64)
        r, c = np.divmod(union, d)
        gid = groups.ids[groups.row_group(r)]
        state["pkeys"], state["pcount"] = np.unique(gid * d + c, return_counts=True)
        state["pcount"] = state["pcount"].astype(np.int64)
        state["lkeys"] = np.unique(np.concatenate(lkeys)) if lkeys else np.zeros(0, np.int64)
        state["open_ids"] = groups.ids.copy()
        state["open_rows"] = groups.rows_in_block(rows).astype(np.int64)
        state["open_totals"] = groups.totals.astype(np.int64)
        state["open_hits"] = group_hits
        return self._finalise(state)

    def combine(self, states: list[dict]) -> dict:
        if len(states) == 1:
            return states[0]
        out = {"rows": sum(s["rows"] for s in states)}
        for key in ("hits", "share_hits", "nonfinite", "layer_frac_sum", "pos_frac_sum", "group_outlier", "layer_any"):
            out[key] = np.sum([s[key] for s in states], axis=0)
        out["max"] = np.maximum.reduce([s["max"] for s in states])
        out["n_groups"] = sum(s["n_groups"] for s in states)
        out["hist"] = stats.hist_combine([s["hist"] for s in states])
        out["done_ids"] = np.concatenate([s["done_ids"] for s in states])
        out["done_hits"] = np.concatenate([s["done_hits"] for s in states])
        ids = np.concatenate([s["open_ids"] for s in states])
        uniq, inv = np.unique(ids, return_inverse=True)
        out["open_ids"] = uniq
        for key in ("open_rows", "open_hits"):
            out[key] = np.bincount(inv, np.concatenate([s[key] for s in states]), minlength=uniq.size).astype(np.int64)
        totals = np.zeros(uniq.size, np.int64)
        totals[inv] = np.concatenate([s["open_totals"] for s in states])
        out["open_totals"] = totals
        out["lkeys"] = np.unique(np.concatenate([s["lkeys"] for s in states]))
        pk = np.concatenate([s["pkeys"] for s in states])
        pu, pinv = np.unique(pk, return_inverse=True)
        out["pkeys"] = pu
        counts = np.concatenate([s["pcount"] for s in states])
        out["pcount"] = np.bincount(pinv, counts, minlength=pu.size).astype(np.int64)
        return self._finalise(out)

    def _finalise(self, s: dict) -> dict:
        """Fold every group whose rows are all merged into the per-dimension sums."""
        done = s["open_rows"] >= s["open_totals"]
        if not done.any():
            return s
        d, L, p = self.d, self.L, self.params
        done_ids = s["open_ids"][done]
        lgid = s["lkeys"] // (L * d)
        lmask = np.isin(lgid, done_ids)
        lk = s["lkeys"][lmask]
        li = (lk // d) % L
        c = lk % d
        s["layer_any"] = s["layer_any"] + np.bincount(li * d + c, minlength=L * d).reshape(L, d)
        gc, n_layers = np.unique(lgid[lmask] * d + c, return_counts=True)
        pmask = np.isin(s["pkeys"] // d, done_ids)
        pk, pc = s["pkeys"][pmask], s["pcount"][pmask]
        # every (group, dim) with a hit in some layer has a hit at some row, and conversely
        assert np.array_equal(pk, gc), "hit sets out of step"
        totals = dict(zip(s["open_ids"][done].tolist(), s["open_totals"][done].tolist()))
        rows = np.array([totals[g] for g in (pk // d).tolist()], dtype=np.float64)
        lf = n_layers / L
        pf = pc / np.maximum(rows, 1)
        dims = pk % d
        s["layer_frac_sum"] = s["layer_frac_sum"] + np.bincount(dims, lf, minlength=d)
        s["pos_frac_sum"] = s["pos_frac_sum"] + np.bincount(dims, pf, minlength=d)
        meets = (lf >= p.layer_frac - 1e-12) & (pf >= p.pos_frac - 1e-12)
        s["group_outlier"] = s["group_outlier"] + np.bincount(dims[meets], minlength=d)
        s["n_groups"] = s["n_groups"] + int(done.sum())
        s["done_ids"] = np.concatenate([s["done_ids"], done_ids])
        s["done_hits"] = np.concatenate([s["done_hits"], s["open_hits"][done]])
        s["lkeys"] = s["lkeys"][~lmask]
        s["pkeys"], s["pcount"] = s["pkeys"][~pmask], s["pcount"][~pmask]
        for key in ("open_ids", "open_rows", "open_totals", "open_hits"):
            s[key] = s[key][~done]
        return s


def _block_outliers(reducer: OutlierReducer, groups: Segs, *outs):
    return reducer.block(list(outs), groups)


def _combine_with(fn, *args):
    """A picklable partial for the tree (dask tokenizes it by its arguments)."""
    return _Bound(fn, args)


class _Bound:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __call__(self, states):
        return self.fn(states, *self.args)

    def __dask_tokenize__(self):
        return (self.fn.__module__, self.fn.__qualname__, self.args)


# --- building and running the graph ----------------------------------------------------------------

@dataclass
class ScanResult:
    facts: StoreFacts
    params: ScanParams
    starts: np.ndarray  #: sequence start rows (+ n_rows)
    sources: list[Source]
    layers: list[int]  #: analysed layers (Dettmers' denominator)
    notes: list[str]
    residual_kind: str | None
    index: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    outliers: dict | None = None  #: OutlierReducer state
    kurtosis: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    massive: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    nonfinite: dict[str, dict[str, Any]] = field(default_factory=dict)  #: array -> stats.nonfinite_aggregate
    seconds: float = 0.0
    bytes_read: int = 0


def rows_per_block(info: ArrayInfo, block_mib: float, n_rows: int) -> int:
    per_chunk = max(1, info.chunk_rows) * max(1, info.row_bytes)
    chunks = max(1, int(block_mib * 2**20 // per_chunk))
    return int(min(max(n_rows, 1), chunks * max(1, info.chunk_rows)))


def plan(facts: StoreFacts, params: ScanParams, *, index: bool, outliers: bool, derive: bool = True):
    """Roles of each array, the hidden states analysed, their layers, notes, and the residual kind."""
    sources, notes = plan_sources(facts, derive) if outliers else ([], [])
    resid, resid_kind = residual_arrays(facts) if outliers else ({}, None)
    layers = sorted({s.layer for s in sources})
    layer_idx = {layer: i for i, layer in enumerate(layers)}
    by_array: dict[str, list] = {}
    for si, s in enumerate(sources):
        by_array.setdefault(s.array, []).append((si, layer_idx[s.layer], s.layer, s.ln, s.how))
    resid_by_name = {name: layer for layer, name in resid.items()}
    roles = {}
    for name in facts.arrays:
        r = Roles(index=index, residual_layer=resid_by_name.get(name), sources=tuple(by_array.get(name, ())))
        if r.index or r.residual_layer is not None or r.sources:
            roles[name] = r
    return roles, sources, layers, notes, resid_kind


def describe_plan(path: str | Path, params: ScanParams, *, index: bool, outliers: bool = True,
                  derive: bool = True) -> str:
    """What one pass would read and how (a dry run: metadata only, nothing computed)."""
    facts = StoreFacts.load(path)
    roles, sources, layers, notes, resid_kind = plan(facts, params, index=index, outliers=outliers, derive=derive)
    total = sum(facts.n_rows * facts.arrays[name].row_bytes for name in roles)
    lines = [f"would read {len(roles)} arrays, {total / 2**20:,.1f} MiB, {facts.n_rows:,} rows "
             f"(blocks of ~{params.block_mib:g} MiB)"]
    if outliers:
        lines.append(f"hidden states: {len(sources)} in {len(layers)} layers")
        lines += [f"  {s.layer:>3} {s.ln}: {s.describe()}" for s in sources[:8]]
        if len(sources) > 8:
            lines.append(f"  ... {len(sources) - 8} more")
        lines += [f"note: {n}" for n in notes]
        lines.append(f"massive activations and kurtosis on: {resid_kind or 'nothing (no residual stream stored)'}")
    if index:
        lines.append(f"index: every token-axis array ({len(facts.arrays)}), top-{params.top_k}")
    blocks = {rows_per_block(facts.arrays[n], params.block_mib, facts.n_rows) for n in roles}
    lines.append("rows per block: " + ", ".join(str(b) for b in sorted(blocks)))
    return "\n".join(lines)


def build(facts: StoreFacts, params: ScanParams, *, index: bool = True, outliers: bool = True, derive: bool = True):
    """The delayed graph of one pass, and what it will compute."""
    from dask import delayed

    if params.aggregate not in ("sequence", "corpus"):
        raise AnalysisError(f"aggregate must be 'sequence' or 'corpus', not {params.aggregate!r}")
    roles, sources, layers, notes, resid_kind = plan(facts, params, index=index, outliers=outliers, derive=derive)
    group = facts.group()
    starts = sequence_starts(group, facts.n_rows)
    corpus = np.array([0, facts.n_rows], np.int64)
    result = ScanResult(facts, params, starts, sources, layers, notes, resid_kind)
    if not roles or facts.n_rows == 0:
        return result, {}
    ln = delayed(facts.ln, pure=False, traverse=False) if any(s.how != "stored" for s in sources) else None
    src_arrays = sorted({s.array for s in sources})
    src_rows = rows_per_block(facts.arrays[src_arrays[0]], params.block_mib, facts.n_rows) if src_arrays else 0
    d = facts.arrays[src_arrays[0]].width if src_arrays else 0
    reducer = OutlierReducer(len(sources), len(layers), d, params)
    out: dict[str, Any] = {"index": {}, "kurt": {}, "massive": {}, "nonfinite": {}}
    block_parts: dict[int, list] = {}
    getitem = operator.getitem
    for name, role in roles.items():
        info = facts.arrays[name]
        R = src_rows if role.sources else rows_per_block(info, params.block_mib, facts.n_rows)
        x = lazy_array(group, name, chunks=(R, *info.trail))
        result.bytes_read += facts.n_rows * info.row_bytes
        chunk_states, kurt, mass, bad = [], [], [], []
        for b, blk in enumerate(x.to_delayed().ravel()):
            lo, hi = b * R, min(facts.n_rows, (b + 1) * R)
            seqs = segs_for(starts, lo, hi)
            groups = seqs if params.aggregate == "sequence" else segs_for(corpus, lo, hi)
            st = delayed(scan_chunk, pure=False)(blk, lo, role, params, ln, facts.eps, seqs, groups)
            bad.append(delayed(getitem, pure=False)(st, "nonfinite"))
            if role.index:
                chunk_states.append(delayed(getitem, pure=False)(st, "index"))
            if role.residual_layer is not None:
                kurt.append(delayed(getitem, pure=False)(st, "kurt"))
                mass.append(delayed(getitem, pure=False)(st, "massive"))
            if role.sources:
                block_parts.setdefault(b, [groups]).append(delayed(getitem, pure=False)(st, "outlier"))
        out["nonfinite"][name] = delayed(stats.nonfinite_aggregate, pure=False)(
            stats.tree_reduce(bad, stats.nonfinite_combine, params.split_every))
        if chunk_states:
            tree = stats.tree_reduce(chunk_states, _combine_with(index_combine, params.top_k), params.split_every)
            out["index"][name] = delayed(index_aggregate, pure=False)(tree)
        if kurt:
            tree = stats.tree_reduce(kurt, stats.seq_moments_combine, params.split_every)
            out["kurt"][role.residual_layer] = delayed(stats.seq_moments_aggregate, pure=False)(tree)
            out["massive"][role.residual_layer] = stats.tree_reduce(
                mass, _combine_with(massive_combine, params.max_records), params.split_every)
    if block_parts:
        blocks = [delayed(_block_outliers, pure=False)(reducer, parts[0], *parts[1:])
                  for _, parts in sorted(block_parts.items())]
        out["outliers"] = stats.tree_reduce(blocks, reducer.combine, params.split_every)
    return result, out


def compute(graph: dict, scheduler=None, num_workers: int | None = None) -> dict:
    """Run the graph on the scheduler ``scheduler`` names (:func:`analysis.runtime.dask_scheduler`)."""
    import dask

    with dask_scheduler(scheduler, num_workers) as client:
        try:
            return dask.compute(graph)[0]
        finally:
            stats.Scratch.release_all()
            if client is not None:
                try:  # the workers' work buffers
                    client.run(stats.Scratch.release_all)
                except Exception:  # noqa: BLE001 - a worker gone is not our error to report
                    pass


@names_damage  # a bad checksum anywhere inside is named in one line
def run_scan(path: str | Path, params: ScanParams | None = None, *, index: bool = True, outliers: bool = True,
             derive: bool = True, scheduler=None, num_workers: int | None = None) -> ScanResult:
    """One pass over the store; returns the aggregated statistics (nothing written)."""
    import time

    params = params or ScanParams()
    facts = StoreFacts.load(path)
    if not facts.arrays:
        raise AnalysisError(f"{path} holds no token-axis activation arrays to analyse")
    t0 = time.perf_counter()
    result, graph = build(facts, params, index=index, outliers=outliers, derive=derive)
    values = compute(graph, scheduler, num_workers) if graph else {}
    result.index = values.get("index", {})
    result.kurtosis = values.get("kurt", {})
    result.massive = values.get("massive", {})
    result.outliers = values.get("outliers")
    result.nonfinite = values.get("nonfinite", {})
    result.seconds = time.perf_counter() - t0
    return result



