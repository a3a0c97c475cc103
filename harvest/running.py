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
can still enter. The device keeps its own copy of the running top-k *values* (the multiset of the k
largest |x| seen, hence the same floor as the host's), so it sends only the candidates above it:
a column whose max |x| is at most its floor is skipped whole. Until k rows have been seen, a
batch's rows go to the host whole (``dense``), ranked there by ``topk_chunk``.
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
        self.top: dict[str, torch.Tensor] = {}  #: hook -> (k' <= k, d) running top |x| per column, descending
        self.next_batch = 0  #: batches below this were already counted (a pipeline re-sends them downstream)

    def resume(self, top: dict[str, np.ndarray], next_batch: int) -> None:
        """The floor of a resumed accumulator: ``top[hook]`` = its top-k values (signed), ``next_batch`` its next."""
        self.top = {h: torch.from_numpy(np.abs(np.asarray(v, np.float32))) for h, v in top.items()}
        self.next_batch = next_batch

    def batch(self, index: int, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows[hook]``: (tokens, d) at every real position. Returns the results (``DEVICE_PREFIX`` keys)."""
        if index < self.next_batch:
            return {}
        self.next_batch = index + 1
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
        res[key + "sumsq"] = (xd * xd).sum(0)
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
        top = self.top.get(hook)
        k = self.k
        if top is None or top.shape[0] < k:  # still filling: the host ranks the whole batch
            both = a if top is None else torch.cat([top.to(a.device), a])
            self.top[hook] = both.topk(min(k, both.shape[0]), dim=0).values
            return {key + "dense": raw}
        floor = top[-1]
        cols = (colmax > floor).nonzero().flatten()
        if not cols.numel():
            return {key + "rows": cols.new_zeros(0), key + "cols": cols, key + "values": a.new_zeros(0)}
        sub = a[:, cols]
        r, c = (sub > floor[cols]).nonzero().unbind(1)
        values = raw[r, cols[c]].float()
        above = torch.where(sub > floor[cols], sub, torch.full((), -1.0, device=a.device))
        top = top.clone()
        top[:, cols] = torch.cat([top[:, cols], above]).topk(k, dim=0).values
        self.top[hook] = top
        return {key + "rows": r, key + "cols": cols[c], key + "values": values}
