"""The per-batch part of the harvest-time statistics, computed on the stage's device.

For each hook with statistics, one batch's rows at every position reduce here, in torch on the
stage's device, to a few (d_model,) vectors: the finite count, the sum and sum of squares
(accumulated in float64), max |x|, the count of |x| >= threshold and the NaN/inf count, plus the
few entries that can still enter the running top-k. Only those cross to the host, where
:class:`harvest.statistics.StatisticsAccumulator` merges them in batch order.

The exact scheme: a float32 value squared is exact in float64 (24-bit mantissas), so the batch's
sum and sum of squares carry only float64 rounding of 2048-odd terms; M2 = Σx² - (Σx)²/n then
loses about log2(mean²/var) bits to cancellation, which for activations (|mean| < 10³ σ) leaves
better than 1e-9 relative. The sums, the per-group maxima below and the count of |x| >= threshold
are one pass over the rows, compiled by ``torch.compile`` (:class:`CompiledKernel`); where it cannot
compile, the eager ops copy the rows into a float64 buffer the stage keeps and sum them by a
matrix-vector product with ones (the same statistics, summed in another order). Batches merge by
Chan's update on the host, as before.

On a CPU both phases below are one call instead (``harvest.rowpass``: a small C loop that reads the
rows once, in memory order, and picks the candidates out of each group while it is in the L1 cache):
~3x faster than the compiled pass on rows that have left the cache, and none of the phases' small ops.
Its sums run row by row, another float64 order again; everything else is the same, exactly.

Where it runs: the compiled pass in each hook's capture hook (:meth:`DeviceStatistics.early`), while
the forward has just written the rows (on a CPU it cost ~3x more once the forward had moved on; phase 2
below runs there too, its sizes costing no sync there). The CPU row pass after the forward
(:meth:`DeviceStatistics.steps`): it streams cold rows as fast, and in the hook it slowed the forward.

The top-k needs a *floor* per column: only values strictly above it can still enter. The host's
accumulator publishes one as it merges (``floors``): the running k-th largest |x|, or at a unit's
first batch the bound the units before it give (``harvest.statistics.StatisticsAccumulator``). Any
floor it has published is a lower bound of the current one, so the entries above it are a superset
of the ones that can enter, and the host's ranking of them (``topk_merge``) is exact however stale
the floor is. A batch with no floor from the host (the job's first unit, a unit redone or handed out
of order) takes its own on an accelerator: the k-th largest of its per-group column maxima (at
least k of its values reach it), sending the values at or above it. On a CPU, and for a batch of
fewer than k groups of rows, such a batch goes to the host whole instead (``dense``), ranked there.

Where the time goes is comparing values to a threshold (the floor, or |x| >= threshold for the
count): the rows are cut into groups of ``GROUP`` and each column's max |x| per group taken
(``GROUP`` times fewer values; their max is the column max). Only the (group, column) pairs whose
max reaches the threshold are compared value by value: for the floor, about k / (batches so far)
values per column enter each batch, so after some hundred batches a few pairs in a thousand.

No host sync per hook: on a GPU, a ``nonzero``, ``.item()`` or ``bool(tensor)`` waits for the stream
to drain. A batch runs in three phases over all its hooks: the reductions and the per-group maxima
(no sync); one read of every hook's sizes (how many pairs reach a threshold, whether any value is
NaN/inf); the pairs' values compared and counted (no sync); one more read of the candidate counts;
then ``nonzero_static`` with the known sizes. Two syncs per batch, whatever the number of hooks,
shared with Dettmers' hits (``harvest.hits``) by :func:`lockstep`; a hook with a NaN/inf takes the
slow path of its own (exceptional: it syncs). On a CPU a sync costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from .rowpass import COMPILE_ENV, row_pass, row_pass_built
from .statistics import DEVICE_PREFIX

log = logging.getLogger(__name__)

#: rows per group of the per-group column maxima
GROUP = 16

#: a batch's statistics as steps: each yields a (n,) or (n, m) integer tensor of sizes it needs on the
#: host and is sent them back as (nested) lists (see :func:`lockstep`)
Steps = Generator[torch.Tensor, list, None]


def lockstep(steps: list[Steps]) -> None:
    """Run several :data:`Steps` together: each round reads every step's sizes in one ``tolist`` (one
    host sync for all of them), so a batch costs as many syncs as its longest step has rounds."""
    waiting = []
    for step in steps:
        try:
            waiting.append((step, next(step)))
        except StopIteration:
            pass
    while waiting:
        flat = torch.cat([t.reshape(-1).long() for _, t in waiting]).tolist()  # the round's one sync
        going, at = [], 0
        for step, t in waiting:
            values = flat[at:at + t.numel()]
            at += t.numel()
            if t.dim() == 2:
                values = [values[i * t.shape[1]:(i + 1) * t.shape[1]] for i in range(t.shape[0])]
            try:
                going.append((step, step.send(values)))
            except StopIteration:
                pass
        waiting = going


@dataclass
class _Pending:
    """One hook between the phases of :meth:`DeviceStatistics.batch`."""

    key: str
    raw: torch.Tensor  #: (tokens, d) as captured (no float32 copy is kept between the phases)
    floor: torch.Tensor | None  #: (d,) the host's top-k floor on the device, None: dense
    gmax: torch.Tensor  #: (groups, d) max |x| per group of GROUP rows (the last group may be shorter)
    #: the floor is the batch's own (a unit's first batch): values equal to it are candidates too
    inclusive: bool = False
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: torch.Tensor | None = None  #: phase 1: (finite, pairs >= threshold, pairs > floor)
    ge_pairs: torch.Tensor | None = None
    cand: tuple | None = None  #: phase 2: (rows, cols, values, mask of the candidates among them)
    compared: bool = False  #: phase 2 ran (early, on a CPU: ``DeviceStatistics.early``)
    done: bool = False  #: ``out`` is whole: both phases ran in one call (on a CPU: ``harvest.rowpass``)


def group_max(a: torch.Tensor) -> torch.Tensor:
    """(groups, d): the max of each column of ``a`` (|x|, >= 0) over each group of ``GROUP`` consecutive rows."""
    tokens, d = a.shape
    full = tokens - tokens % GROUP
    parts = []
    if full:
        parts.append(a[:full].reshape(-1, GROUP, d).amax(1))
    if full < tokens:
        parts.append(a[full:].amax(0, keepdim=True))
    return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else a.new_zeros((0, d))


def _fused_moments(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """(tokens, d) float32, tokens a multiple of ``GROUP``: Σx and Σx² in float64, max |x| per group of
    ``GROUP`` rows, and the count of |x| >= ``threshold`` per column. Written for ``torch.compile``, which
    makes it one pass over the rows (eager torch would take five, and a float64 copy). Every reduction
    is over each group's ``GROUP`` rows first, so that pass goes row by row through memory; the groups'
    partial sums (a few hundred rows of float64) are then summed."""
    d = x.shape[1]
    xd = x.double().view(-1, GROUP, d)
    a = x.abs().view(-1, GROUP, d)
    # the count per group in int32 (at most GROUP), summed in int64: the vector pass's dearest op was the
    # int64 count (~10% of its time on 2048 x 768 rows, measured apart)
    return xd.sum(1).sum(0), (xd * xd).sum(1).sum(0), a.amax(1), (a >= threshold).sum(1, dtype=torch.int32).sum(0)


def _masked_group_max(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(tokens, d), tokens a multiple of ``GROUP``; ``real`` (tokens, 1) bool: max |x| over the real rows of
    each group of ``GROUP`` (0 where none), as float32. Dettmers' hits' one pass (``harvest.hits``)."""
    a = torch.where(real, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    return a.view(-1, GROUP, x.shape[1]).amax(1).float()


class CompiledKernel:
    """A function compiled by ``torch.compile`` (shapes dynamic) at its first use, once per process.

    The statistics read every activation they see once more; in eager torch that read is several passes
    (and a float64 copy), ~2.5% of a CPU forward (``bench/statistics_overhead.py``); compiled, it is one
    pass. Where compiling fails (no C++ compiler for inductor's CPU code, no Triton on a GPU) or
    ``HARVEST_COMPILE=0``, calling it returns None and the caller takes the eager ops: the same
    statistics, float64 sums in another order (rounding apart). The failure is logged once."""

    _lock = threading.Lock()  # dynamo's first compile is not safe to race from several threads

    def __init__(self, fn: Callable):
        self.fn = fn
        self.kernel: Callable | None = None
        self.failed: str | None = None  #: why the eager ops are used
        self.warm = False  #: the first call (the compile) is done

    def get(self) -> Callable | None:
        if self.kernel is None and self.failed is None:
            with self._lock:
                if self.kernel is None and self.failed is None:
                    if os.environ.get(COMPILE_ENV, "1") == "0":
                        self.failed = f"{COMPILE_ENV}=0"
                    else:
                        self.kernel = torch.compile(self.fn, dynamic=True)
        return self.kernel

    def __call__(self, *args) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
        """The compiled function's result, or None (compiling failed now or before: take the eager ops)."""
        kernel = self.get()
        if kernel is None:
            return None
        try:
            if self.warm:
                return kernel(*args)
            with self._lock:  # the first call compiles
                out = kernel(*args)
                self.warm = True
                return out
        except Exception as exc:  # noqa: BLE001 - inductor's failures are many; the eager ops always work
            self.kernel, self.failed = None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            log.warning("harvest-time statistics: torch.compile of %s failed (%s); using eager torch ops, "
                        "same statistics, slower (set %s=0 to skip the attempt)", self.fn.__name__, self.failed,
                        COMPILE_ENV)
            return None


#: the statistics' pass over each hook's rows, and Dettmers' hits' over each LayerNorm output
FUSED_MOMENTS = CompiledKernel(_fused_moments)
MASKED_GROUP_MAX = CompiledKernel(_masked_group_max)


def moments(x: torch.Tensor, threshold: float, buffer: Callable[[torch.Tensor], torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, d) float32 rows: Σx, Σx² (float64), max |x| per group of ``GROUP`` rows and, from the
    compiled kernel only, the count of |x| >= ``threshold`` per column (None: count it from the groups).
    ``buffer(x)``: ``x`` copied into a reusable float64 tensor (the eager ops)."""
    tokens, d = x.shape
    full = tokens - tokens % GROUP
    fused = FUSED_MOMENTS(x[:full], threshold) if full else None
    if fused is None:
        xd = buffer(x)
        ones = torch.ones(tokens, dtype=torch.float64, device=x.device)
        s = torch.mv(xd.t(), ones)
        sq = torch.mv(xd.mul_(xd).t(), ones)  # a float32 value squared is exact in float64
        return s, sq, group_max(x.abs()), None
    s, sq, gmax, count = fused
    if full < tokens:  # the last rows, fewer than a group
        rest = x[full:].double()
        s, sq = s + rest.sum(0), sq + (rest * rest).sum(0)
        a = x[full:].abs()
        gmax, count = torch.cat([gmax, a.amax(0, keepdim=True)]), count + (a >= threshold).sum(0)
    return s, sq, gmax, count


def pair_values(x: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values of (group, column) ``pairs`` (n, 2): rows (n, GROUP), columns (n,), values (n, GROUP).

    A short last group is padded with row -1 and value 0, which is above no threshold or floor
    (both >= 0, compared strictly or against a positive threshold)."""
    tokens, d = x.shape
    g, c = pairs[:, 0], pairs[:, 1]
    rows = g[:, None] * GROUP + torch.arange(GROUP, device=x.device)[None, :]
    if tokens % GROUP == 0:  # every group whole: one indexing of the (groups, GROUP, d) view
        return rows, c, x.reshape(-1, GROUP, d)[g, :, c]
    valid = rows < tokens
    flat = torch.where(valid, rows * d + c[:, None], torch.zeros((), dtype=rows.dtype, device=x.device))
    values = x.reshape(-1)[flat.reshape(-1)].reshape(rows.shape)
    return torch.where(valid, rows, -1), c, torch.where(valid, values, torch.zeros((), dtype=values.dtype,
                                                                                     device=x.device))


class DeviceStatistics:
    """One stage's per-batch statistic kernels, with the running top-k floor of each hook."""

    def __init__(self, hooks: tuple[str, ...], top_k: int, threshold: float):
        self.hooks = hooks
        self.k = top_k
        self.threshold = threshold
        #: () -> hook -> the host's running k-th largest |x| per column (``StatisticsAccumulator.floors``)
        self.floors = None
        self._buffer: torch.Tensor | None = None  #: float64 rows, reused by every hook
        #: a unit's first batch leaves the device sparse (its own floor); None: on accelerators only. On a
        #: CPU the "device" is the host: handing it the rows costs no copy, and ranking them there is
        #: cheaper than the floor's topk and compares (``bench/statistics_overhead.py``)
        self.sparse_first_batch: bool | None = None
        self._floors: dict | None = None  #: this batch's floors, from :meth:`begin` to :meth:`steps`
        self._early: dict[str, _Pending] = {}  #: hooks reduced in their capture hook (:meth:`early`)
        self._taken: dict[str, _Pending] = {}  #: every hook reduced this batch, for :meth:`group_max`
        self._room: dict[str, int] = {}  #: hook's key -> room for candidates in the CPU row pass (twice its last)

    def batch(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows[hook]``: (tokens, d) at every real position. Returns the results (``DEVICE_PREFIX`` keys)."""
        out: dict[str, torch.Tensor] = {}
        lockstep([self.steps(rows, out)])
        return out

    def group_max(self, hook: str, tokens: int) -> torch.Tensor | None:
        """(groups, d) max |x| per group of ``GROUP`` rows the statistics took of ``hook`` this batch (in its
        capture hook, :meth:`early`, or after the forward, :meth:`steps`), when they read ``tokens`` rows
        (else None): Dettmers' hits on the same rows need not read them again."""
        p = self._taken.get(hook)
        return p.gmax if p is not None and p.raw.shape[0] == tokens else None

    def begin(self) -> None:
        """Before a batch's forward: the host's floors are read once, and capture hooks may hand their rows
        to :meth:`early`."""
        self._floors = self.floors() if self.floors is not None else {}
        self._early, self._taken = {}, {}

    def early(self, hook: str, raw: torch.Tensor) -> None:
        """Phase 1 of one hook (no sync), from its capture hook: its one pass over the rows reads them
        while the forward has just written them, from the cache (the torch kernels' pass cost ~4x more on
        a CPU after the forward). Not the CPU row pass (``harvest.rowpass``): it streams rows from memory
        as fast, and run here it slowed the forward's own next ops (paired forwards, 36 hooks: +44 ms a
        batch in the hooks, 20 of them in the pass itself; +9 ms after the forward: one measurement on a
        shared 2-core machine), so it runs after the forward, in :meth:`steps`."""
        if self._floors is not None and hook in self.hooks and not (raw.device.type == "cpu" and row_pass_built()):
            p = self._early[hook] = self._taken[hook] = self._reduce(hook, raw, self._floors.get(hook))
            if raw.device.type == "cpu" and not p.done:  # reading sizes costs no sync here: compare too
                finite, n_ge, n_cand = p.sizes.tolist()
                if finite:
                    self._compare(p, n_ge, n_cand)

    def steps(self, rows: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> Steps:
        """:meth:`batch` as steps for :func:`lockstep`: yields the sizes it needs read (twice), fills ``out``."""
        floors, early = self._floors, self._early
        self._floors, self._early, self._taken = None, {}, dict(early)
        if floors is None:  # no :meth:`begin`
            floors = self.floors() if self.floors is not None else {}
        pending = []
        for hook in self.hooks:
            if hook not in early:
                self._taken[hook] = self._reduce(hook, rows[hook], floors.get(hook))
            pending.append(self._taken[hook])
        for p in pending:
            if p.done:
                out.update(p.out)
        pending = [p for p in pending if not p.done]
        if not pending:
            return
        sizes = yield torch.stack([p.sizes for p in pending])  # read 1 of 2
        live = []
        for p, (finite, n_ge, n_cand) in zip(pending, sizes):
            if not finite:
                out.update(_slow(p.key, p.raw, self.threshold, None if p.inclusive else p.floor))
                continue
            if not p.compared:
                self._compare(p, n_ge, n_cand)
            live.append(p)
        if not live:
            return
        counts = yield torch.stack([p.cand[3].sum() if p.cand is not None else p.gmax.new_zeros((), dtype=torch.long)
                                    for p in live])  # read 2 of 2
        for p, n in zip(live, counts):
            if p.cand is not None:
                r, c, v, mask = p.cand
                at = torch.nonzero_static(mask, size=int(n))
                p.out[p.key + "rows"], p.out[p.key + "cols"] = r[at[:, 0], at[:, 1]], c[at[:, 0]]
                p.out[p.key + "values"] = v[at[:, 0], at[:, 1]].float()  # from the pairs' values, not the rows
            out.update(p.out)

    def _rows64(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into the kept float64 buffer (grown when a batch is larger)."""
        n = x.numel()
        if self._buffer is None or self._buffer.numel() < n or self._buffer.device != x.device:
            self._buffer = torch.empty(n, dtype=torch.float64, device=x.device)
        return self._buffer[:n].view(x.shape).copy_(x)

    def _reduce(self, hook: str, raw: torch.Tensor, floor) -> _Pending:
        """Phase 1 (no sync): moments, group maxima and the sizes phase 2 needs."""
        key = f"{DEVICE_PREFIX}{hook}:"
        raw = raw.reshape(raw.shape[0], -1)
        x = raw.float().contiguous()
        tokens, d = x.shape
        inclusive = (floor is None and 0 < self.k <= -(-tokens // GROUP)
                     and (self.sparse_first_batch if self.sparse_first_batch is not None else x.device.type != "cpu"))
        if x.device.type == "cpu" and not inclusive and (done := self._row_pass(key, raw, x, floor)) is not None:
            return done
        s, sq, gmax, count_ge = moments(x, self.threshold, self._rows64)
        if inclusive:  # a unit's first batch: the k-th largest group max, below at least k of its values
            floor = torch.topk(gmax, self.k, dim=0).values[-1]
        elif floor is not None:
            floor = torch.from_numpy(floor).to(x.device, non_blocking=True)
        p = _Pending(key, raw, floor, gmax, inclusive)
        p.out = {key + "sum": s, key + "sumsq": sq, key + "tokens": torch.full((), tokens, device=x.device),
                 key + "max": gmax.amax(0) if tokens else x.new_zeros(d)}
        if floor is None:  # fewer than k groups of rows: the batch is small, sent whole
            p.out[key + "dense"] = raw
        zero = gmax.new_zeros((), dtype=torch.long)
        if count_ge is not None:  # counted by the compiled kernel: no pairs to compare for it
            p.out[key + "count_ge"] = count_ge
        else:
            p.ge_pairs = gmax >= self.threshold
        n_cand = ((gmax >= floor) if inclusive else (gmax > floor)).sum() if floor is not None else zero
        p.sizes = torch.stack([torch.isfinite(s).all().long(),
                               p.ge_pairs.sum() if p.ge_pairs is not None else zero, n_cand])
        return p

    def _row_pass(self, key: str, raw: torch.Tensor, x: torch.Tensor, floor: np.ndarray | None) -> _Pending | None:
        """Both phases in one call on a CPU (``harvest.rowpass``); None where it is unavailable."""
        tokens = x.shape[0]
        res = row_pass(x, GROUP, self.threshold, floor, self._room.get(key, 4096))
        if res is None:
            return None
        if not res.finite:  # a NaN/inf: counted apart; Dettmers' hits see it in the maxima (NaN propagates)
            floor_t = None if floor is None else torch.from_numpy(floor)
            return _Pending(key, raw, None, group_max(x.abs()), out=_slow(key, raw, self.threshold, floor_t), done=True)
        self._room[key] = max(4096, 2 * res.rows.numel())
        out = {key + "sum": res.sum, key + "sumsq": res.sumsq, key + "tokens": torch.full((), tokens),
               key + "max": res.max, key + "count_ge": res.count_ge}
        if floor is None:  # no floor from the host yet: the batch goes whole, ranked there
            out[key + "dense"] = raw
        else:
            out.update({key + "rows": res.rows, key + "cols": res.cols, key + "values": res.values})
        return _Pending(key, raw, None, res.group_max, out=out, done=True)

    def _compare(self, p: _Pending, n_ge: int, n_cand: int) -> None:
        """Phase 2 (no sync): count |x| >= threshold and find the candidates in the pairs that reach them."""
        p.compared = True
        x, d = p.raw, p.raw.shape[1]
        if p.ge_pairs is not None:  # not counted by the compiled kernel: count from the groups that reach it
            count = torch.zeros(d, dtype=torch.long, device=x.device)
            if n_ge:
                _, c, v = pair_values(x, torch.nonzero_static(p.ge_pairs, size=n_ge))
                count.index_add_(0, c, (v.float().abs() >= self.threshold).sum(1))
            p.out[p.key + "count_ge"] = count
        if p.floor is not None and p.inclusive:  # padding rows (-1, value 0) must not pass a floor of 0
            r, c, v = pair_values(x, torch.nonzero_static(p.gmax >= p.floor, size=n_cand))
            p.cand = (r, c, v, (v.float().abs() >= p.floor[c][:, None]) & (r >= 0))
        elif p.floor is not None:
            r, c, v = pair_values(x, torch.nonzero_static(p.gmax > p.floor, size=n_cand))
            p.cand = (r, c, v, v.float().abs() > p.floor[c][:, None])


def _slow(key: str, raw: torch.Tensor, threshold: float, floor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A hook with a NaN/inf in the batch: counted, then left out (set to 0). Syncs (exceptional)."""
    x = raw.reshape(raw.shape[0], -1).float()
    tokens, d = x.shape
    bad = ~torch.isfinite(x)
    bad_rows = bad.any(1).nonzero().flatten()
    x = torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
    xd = x.double()
    res = {key + "nonfinite": bad.sum(0),
           key + "nonfinite_rows": torch.stack([torch.full((), bad_rows.numel(), dtype=torch.long, device=x.device),
                                                bad_rows[0] if bad_rows.numel() else bad_rows.new_tensor(-1)]),
           key + "sum": xd.sum(0), key + "tokens": torch.full((), tokens, device=x.device),
           key + "sumsq": xd.mul_(xd).sum(0)}
    a = x.abs()
    res[key + "max"] = a.amax(0) if tokens else torch.zeros(d, device=x.device)
    res[key + "count_ge"] = (a >= threshold).sum(0)
    if floor is None:
        res[key + "dense"] = raw
    else:
        r, c = (a > floor).nonzero().unbind(1)
        res.update({key + "rows": r, key + "cols": c, key + "values": raw.reshape(tokens, -1)[r, c].float()})
    return res
