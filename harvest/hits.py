"""Dettmers' hits on the device: what the outlier criterion needs from every token, stored or not.

Dettmers' criterion asks, per (sequence, dimension), in how many layers some hidden state feeding a
linear layer (``ln1``, and ``ln2`` for GPT-NeoX) has |x| >= magnitude, and at how many positions
one does in *any* layer. Layers are split over pipeline stages, so the second count needs the union
of every stage's hits: each stage ORs its own hits into a per-token bitmask (tokens x d_model bits,
packed 8 to a byte) that travels with the hidden state, and the last stage counts the positions set
per (sequence, dimension). Each stage also hands its writer, per hidden state, the few values at or
above the magnitude (sparse: where, the value, ‖x‖² of its token) and the per-dimension max |x| and
NaN/inf count, from which ``harvest.statistics.dettmers_chunk`` builds the same state as the offline
scan (``analysis.scan.outlier_chunk``).

The hook reads the LayerNorm output cast to the stored dtype, so a hit here is a hit in the store.
Where the harvest-time statistics read the same rows (the LayerNorm output is one of their hooks and
the batch has no padding), their pass has just taken the per-group maxima this needs
(``DeviceStatistics.group_max``), and the hook takes those instead of reading the rows again.

No host sync per hidden state (on a GPU each ``nonzero`` or ``bool(tensor)`` waits for the stream):
a hook takes only what needs no answer from the device (per-group column maxima, as in
``harvest.running``) and keeps a reference to its hidden state until the forward ends; then every
hidden state's sizes are read at once, the (group, column) pairs that reach the magnitude compared,
the hits counted and read at once, and gathered with ``nonzero_static``: two reads per batch, shared
with the statistics' (``harvest.running.lockstep``), so a batch's statistics sync twice in all;
the price is that the analysed LayerNorm outputs stay alive until the batch's forward ends (on a
GPU, one hidden state per analysed LayerNorm). A hidden state with a NaN/inf takes the slow path of
its own (exceptional: it syncs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
import torch
from torch import nn

from .running import GROUP, MASKED_GROUP_MAX, Steps, group_max, pair_values
from .statistics import HITS_POSITIONS as POSITIONS
from .statistics import HITS_PREFIX as PREFIX
from .statistics import HitPlan


_SHIFTS = 1 << torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 values each (little-endian bit order), flattened."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`pack_bits`' inverse."""
    n = 1
    for s in shape:
        n *= s
    bits = (packed[:, None] & _SHIFTS.to(packed.device)[None, :]) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def _all_real(flat: torch.Tensor) -> torch.Tensor:
    """(tokens, 1) True: no padding (a broadcast view, no memory)."""
    return torch.ones((), dtype=torch.bool, device=flat.device).expand(flat.shape[0], 1)


class Hits:
    """The hooks that find one stage's hits, and the bitmask it carries from stage to stage."""

    def __init__(self, plan: HitPlan, modules: dict[str, nn.Module], store_dtype: torch.dtype):
        self.plan = plan
        self.modules = modules
        self.store_dtype = store_dtype

    @contextmanager
    def attached(self, lengths: torch.Tensor, width: int, carried: torch.Tensor | None,
                 out: dict[str, torch.Tensor], padded: bool = True,
                 known: Callable[[str, int], torch.Tensor | None] | None = None) -> Iterator["HitBatch"]:
        """Hooks for one batch. After the forward, run the yielded batch's :meth:`HitBatch.steps`
        (``harvest.running.lockstep``): ``out`` then has each source's sparse hits and ``handed`` the
        packed bitmask to hand on (or nothing on the last stage, which counts positions).
        ``padded``: some sequence is shorter than ``width`` (known on the host: no device read).
        ``known(name, tokens)``: the per-group max |x| of a source's ``tokens`` rows in order, when the
        statistics' kernel took them this batch (``DeviceStatistics.group_max``): with no padding those
        are the hidden state's every row, so its one pass over them serves both."""
        real = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]) if padded else None
        batch = HitBatch(self, lengths, width, carried, real, out, known)
        handles = []

        def hook_for(name: str):
            def hook(_module, _args, y):
                if known is not None and real is None:  # the statistics may take its maxima, in their time
                    batch.stash[name], batch.deferred[name] = None, y
                else:
                    batch.stash[name] = self._reduce(y, real)
            return hook

        try:
            for name in self.plan.sources:
                handles.append(self.modules[name].register_forward_hook(hook_for(name)))
            yield batch
        finally:
            for h in handles:
                h.remove()

    def _reduce(self, y: torch.Tensor, real: torch.Tensor | None, gmax: torch.Tensor | None = None) -> tuple:
        """In the hook (no sync): the hidden state in the stored dtype, its per-group max |x| at real
        positions (``gmax``: already taken, by the statistics), and the sizes :meth:`_finish` reads
        (finite?, pairs reaching the magnitude)."""
        x = y.to(self.store_dtype)
        d = x.shape[-1]
        flat = x.reshape(-1, d)
        if gmax is None and flat.shape[0] % GROUP == 0 and flat.shape[0]:  # one compiled pass (None: not compiled)
            gmax = MASKED_GROUP_MAX(flat, real.reshape(-1, 1) if real is not None else _all_real(flat))
        if gmax is None:
            a = flat.abs()
            if real is not None:  # padding is never a hit, nor a max
                a = torch.where(real.reshape(-1, 1), a, torch.zeros((), dtype=a.dtype, device=a.device))
            gmax = group_max(a).float()
        ge = gmax >= self.plan.magnitude
        # a NaN/inf gives a NaN/inf max, and their max (amax propagates NaN): ~15x cheaper than isfinite().all()
        sizes = torch.stack([torch.isfinite(gmax.amax()).long() if gmax.numel() else ge.new_ones((), dtype=torch.long),
                             ge.sum()])
        return x, gmax, ge, sizes

    def _finish(self, stash: dict[str, tuple], real: torch.Tensor | None, mask: torch.Tensor,
                out: dict[str, torch.Tensor]) -> Steps:
        """After the forward: every hidden state's hits, reading sizes twice in all (``lockstep``)."""
        names = list(stash)
        sizes = yield torch.stack([stash[n][3] for n in names])  # read 1 of 2
        found = {}
        for name, (finite, n_pairs) in zip(names, sizes):
            x, gmax, ge, _ = stash[name]
            if not finite:
                self._source(name, x, real, mask, out)
                continue
            flat = x.reshape(-1, x.shape[-1])
            r, c, v = pair_values(flat, torch.nonzero_static(ge, size=n_pairs))
            hit = (v.float().abs() >= self.plan.magnitude) & (r >= 0)
            if real is not None:
                hit &= real.reshape(-1)[r.clamp(min=0)]
            found[name] = (r, c, hit, gmax)
        if not found:
            return
        counts = yield torch.stack([found[n][2].sum() for n in found])  # read 2 of 2
        for (name, (r, c, hit, gmax)), n in zip(found.items(), counts):
            x = stash[name][0]
            width, d = x.shape[1], x.shape[-1]
            at = torch.nonzero_static(hit, size=int(n))
            flat_at, _ = torch.sort(r[at[:, 0], at[:, 1]] * d + c[at[:, 0]])  # in (sequence, position, column) order
            token, col = flat_at // d, flat_at % d
            flat = x.reshape(-1, d)
            mask.view(-1, d)[token, col] = True
            sub = flat.index_select(0, token).double()  # ‖x‖² in float64, of the rows with a hit only
            out[f"{PREFIX}{name}:where"] = torch.stack([token // width, token % width, col], 1)
            out[f"{PREFIX}{name}:values"] = flat[token, col].float()
            out[f"{PREFIX}{name}:norm2"] = (sub * sub).sum(dim=1)
            out[f"{PREFIX}{name}:max"] = gmax.amax(0) if gmax.shape[0] else torch.zeros(d, device=x.device)
            out[f"{PREFIX}{name}:nonfinite"] = torch.zeros(d, dtype=torch.int64, device=x.device)

    def _source(self, name: str, y: torch.Tensor, real: torch.Tensor | None, mask: torch.Tensor,
                out: dict[str, torch.Tensor]) -> None:
        """One hidden state with a NaN/inf (the slow path: it syncs): OR its hits into ``mask``; its
        sparse hits, max |x| and NaN/inf into ``out``. ``real`` (batch, pos) marks real positions, None
        when there is no padding. Only the columns whose max |x| reaches the magnitude are compared
        value by value (outliers are few)."""
        x = y.to(self.store_dtype).float()
        d = x.shape[-1]
        bad_count = None
        if not bool(torch.isfinite(x.sum())):  # NaN/inf: counted, then left out (set to 0), as in the scan
            bad = ~torch.isfinite(x)
            if real is not None:
                bad &= real[:, :, None]
            bad_count = bad.sum(dim=(0, 1))
            x = torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
        a = x.abs()
        if real is not None:  # padding is never a hit
            a = torch.where(real[:, :, None], a, torch.zeros((), dtype=a.dtype, device=a.device))
        colmax = a.reshape(-1, d).amax(0)
        cols = (colmax >= self.plan.magnitude).nonzero().flatten()
        hit = a[..., cols] >= self.plan.magnitude  # (batch, pos, hit columns)
        mask[..., cols] |= hit
        b, p, ci = hit.nonzero().unbind(1)
        c = cols[ci]
        values = x[b, p, c]
        token = b * x.shape[1] + p
        rows, at = torch.unique(token, return_inverse=True)
        sub = x.reshape(-1, d).index_select(0, rows).double()  # ‖x‖² in float64, of the rows with a hit only
        out[f"{PREFIX}{name}:where"] = torch.stack([b, p, c], 1)
        out[f"{PREFIX}{name}:values"] = values
        out[f"{PREFIX}{name}:norm2"] = (sub * sub).sum(dim=1)[at]
        out[f"{PREFIX}{name}:max"] = colmax
        out[f"{PREFIX}{name}:nonfinite"] = (bad_count if bad_count is not None
                                            else torch.zeros(d, dtype=torch.int64, device=x.device))


class HitBatch:
    """One batch's hits between the forward and its end (:meth:`steps`)."""

    def __init__(self, hits: Hits, lengths: torch.Tensor, width: int, carried: torch.Tensor | None,
                 real: torch.Tensor | None, out: dict[str, torch.Tensor],
                 known: Callable[[str, int], torch.Tensor | None] | None = None):
        self.hits, self.lengths, self.width, self.carried, self.real, self.out = hits, lengths, width, carried, real, out
        self.known = known
        self.stash: dict[str, tuple] = {}  #: source -> what its hook took (``Hits._reduce``)
        #: source -> its hidden state, reduced in :meth:`steps` with the group maxima the statistics took of it
        #: (in its capture hook on an accelerator, after the forward on a CPU: ``DeviceStatistics.group_max``)
        self.deferred: dict[str, torch.Tensor] = {}
        self.handed: list[torch.Tensor] = []  #: the packed bitmask for the next stage, once the steps ran

    def steps(self) -> Steps:
        plan = self.hits.plan
        if not self.stash and not plan.last:  # no analysed layer here: the mask goes on as it came
            if self.carried is not None:
                self.handed.append(self.carried)
            return
        batch, device = self.lengths.shape[0], self.lengths.device
        shape = (batch, self.width, plan.d_model)
        mask = (unpack_bits(self.carried.to(device), shape) if self.carried is not None
                else torch.zeros(shape, dtype=torch.bool, device=device))
        for name, y in self.deferred.items():
            self.stash[name] = self.hits._reduce(y, self.real, self.known(name, y.shape[0] * y.shape[1]))
        self.deferred.clear()
        if self.stash:
            yield from self.hits._finish(self.stash, self.real, mask, self.out)
        if plan.last:
            self.out[POSITIONS] = mask.sum(dim=1, dtype=torch.int32)  # (batch, d): positions hit in any layer
        else:
            self.handed.append(pack_bits(mask))
