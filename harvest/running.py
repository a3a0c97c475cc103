"""The per-batch part of the harvest-time statistics, computed on the stage's device.

For each hook with statistics, one batch's rows at every position reduce here, in torch on the
stage's device, to a few (d_model,) vectors: the finite count, the sum and sum of squares
(accumulated in float64), max |x|, the count of |x| >= threshold and the NaN/inf count, plus the
few entries that can still enter the running top-k. Only those cross to the host, where
:class:`harvest.statistics.StatisticsAccumulator` merges them in batch order.

The exact scheme: a float32 value squared is exact in float64 (24-bit mantissas), so the batch's
sum and sum of squares carry only float64 rounding of 2048-odd terms; M2 = Σx² - (Σx)²/n then
loses about log2(mean²/var) bits to cancellation, which for activations (|mean| < 10³ σ) leaves
better than 1e-9 relative. Batches merge by Chan's update on the host, as before.

The top-k needs the running k-th largest |x| per column (the *floor*): only values strictly above it
can still enter. The host's accumulator publishes its floor as it merges (``floors``); any floor
it has published is at most the current one (floors only rise), so the entries above it are a
superset of the ones that can enter, and the host's ranking of them (``topk_merge``) is exact
however stale the floor is. A column whose max |x| is at most its floor is skipped whole. Until
the host's top-k holds k rows, a batch's rows go to the host whole (``dense``), ranked there.
"""

from __future__ import annotations

import numpy as np
import torch

from .statistics import DEVICE_PREFIX


class DeviceStatistics:
    """One stage's per-batch statistic kernels, with the running top-k floor of each hook."""

    def __init__(self, hooks: tuple[str, ...], top_k: int, threshold: float):
        self.hooks = hooks
        self.k = top_k
        self.threshold = threshold
        #: () -> hook -> the host's running k-th largest |x| per column (``StatisticsAccumulator.floors``)
        self.floors = None

    def batch(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows[hook]``: (tokens, d) at every real position. Returns the results (``DEVICE_PREFIX`` keys)."""
        out: dict[str, torch.Tensor] = {}
        for hook in self.hooks:
            out.update(self._hook(hook, rows[hook]))
        return out

    def _hook(self, hook: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = f"{DEVICE_PREFIX}{hook}:"
        x = x.reshape(x.shape[0], -1)
        raw = x
        x = x.float()
        tokens, d = x.shape
        xd = x.double()  # float64: a float32 value squared is exact in it
        s = xd.sum(0)
        res: dict[str, torch.Tensor] = {}
        if not bool(torch.isfinite(s).all()):  # NaN/inf: counted, then left out (set to 0)
            bad = ~torch.isfinite(x)
            bad_count = bad.sum(0)
            bad_rows = bad.any(1).nonzero().flatten()
            x = torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
            xd = x.double()
            s = xd.sum(0)
            res[key + "nonfinite"] = bad_count
            res[key + "nonfinite_rows"] = torch.stack([bad_rows.numel() * torch.ones((), dtype=torch.long,
                                                                                     device=x.device),
                                                       bad_rows[0] if bad_rows.numel() else bad_rows.new_tensor(-1)])
        res[key + "sum"] = s
        res[key + "tokens"] = torch.tensor(tokens, device=x.device)
        res[key + "sumsq"] = xd.mul_(xd).sum(0)  # in place: xd is not needed after
        a = x.abs()
        colmax = a.amax(0) if tokens else torch.zeros(d, device=x.device)
        res[key + "max"] = colmax
        count = torch.zeros(d, dtype=torch.long, device=x.device)
        cols = (colmax >= self.threshold).nonzero().flatten()
        if cols.numel():
            count[cols] = (a[:, cols] >= self.threshold).sum(0)
        res[key + "count_ge"] = count
        res.update(self._topk(hook, key, raw, a, colmax))
        return res

    def _topk(self, hook: str, key: str, raw: torch.Tensor, a: torch.Tensor, colmax: torch.Tensor):
        floor = self.floors().get(hook) if self.floors is not None else None
        if floor is None:  # the host's top-k is not full yet: it ranks the whole batch
            return {key + "dense": raw}
        floor = torch.from_numpy(floor).to(a.device)
        cols = (colmax > floor).nonzero().flatten()
        if not cols.numel():
            return {key + "rows": cols.new_zeros(0), key + "cols": cols, key + "values": a.new_zeros(0)}
        if 4 * cols.numel() > a.shape[1]:  # many columns (early in a job): compare in place, no gather
            r, c = (a > floor).nonzero().unbind(1)
        else:
            r, c = (a[:, cols] > floor[cols]).nonzero().unbind(1)
            c = cols[c]
        return {key + "rows": r, key + "cols": c, key + "values": raw[r, c].float()}
