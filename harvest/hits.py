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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import torch
from torch import nn

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


class Hits:
    """The hooks that find one stage's hits, and the bitmask it carries from stage to stage."""

    def __init__(self, plan: HitPlan, modules: dict[str, nn.Module], store_dtype: torch.dtype):
        self.plan = plan
        self.modules = modules
        self.store_dtype = store_dtype

    @contextmanager
    def attached(self, lengths: torch.Tensor, width: int, carried: torch.Tensor | None,
                 out: dict[str, torch.Tensor]) -> Iterator[list]:
        """Hooks for one batch; ``out`` gets each source's sparse hits; the yielded list gets the
        packed bitmask to hand on (or is left empty on the last stage, which counts positions)."""
        batch = lengths.shape[0]
        real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (batch, pos)
        if bool(real.all()):
            real = None  # no padding (packed sequences): nothing to mask
        state: dict[str, torch.Tensor] = {}
        handles = []

        def hook_for(name: str):
            def hook(_module, _args, y):
                d = y.shape[-1]
                if "mask" not in state:
                    state["mask"] = (unpack_bits(carried, (batch, width, d)) if carried is not None
                                     else torch.zeros((batch, width, d), dtype=torch.bool, device=y.device))
                self._source(name, y, real, state["mask"], out)
            return hook

        try:
            for name in self.plan.sources:
                handles.append(self.modules[name].register_forward_hook(hook_for(name)))
            handed: list = []
            yield handed
        finally:
            for h in handles:
                h.remove()
        mask = state.get("mask")
        if mask is None and not self.plan.last:  # no analysed layer here: the mask goes on as it came
            if carried is not None:
                handed.append(carried)
            return
        if mask is None:
            d = self.plan.d_model
            mask = (unpack_bits(carried, (batch, width, d)) if carried is not None
                    else torch.zeros((batch, width, d), dtype=torch.bool, device=lengths.device))
        if self.plan.last:
            out[POSITIONS] = mask.sum(dim=1, dtype=torch.int32)  # (batch, d): positions hit in any layer
        else:
            handed.append(pack_bits(mask))

    def _source(self, name: str, y: torch.Tensor, real: torch.Tensor | None, mask: torch.Tensor,
                out: dict[str, torch.Tensor]) -> None:
        """One hidden state: OR its hits into ``mask``; its sparse hits, max |x| and NaN/inf into ``out``.

        ``real`` (batch, pos) marks real positions, None when there is no padding. Only the columns
        whose max |x| reaches the magnitude are compared value by value (outliers are few)."""
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
