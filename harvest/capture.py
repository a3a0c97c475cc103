"""Forward hooks that copy a stage's hook points, already reduced to the selected rows.

Selection happens on the device, inside the hook, so only the rows, heads and neurons that the
spec asks for are ever copied off it. Hooks are attached for one batch and removed on exit
(hooks are global state on shared modules); the stage checks that none are left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import Architecture
from .errors import ModelError
from .hookpoints import HookPoint
from .statistics import ALL_ROWS


@dataclass(frozen=True)
class Selection:
    """Heads and neurons kept (``None``: all)."""

    heads: torch.Tensor | None
    neurons: torch.Tensor | None


@dataclass
class BatchIndex:
    """Per-batch selection tensors, on the stage's device."""

    flat_rows: torch.Tensor  #: (rows,) into the flattened (batch * pos) axis
    lengths: torch.Tensor  #: (batch,)
    batch: int
    width: int
    #: (tokens,) every real position, when the statistics need rows the selection leaves out (else None)
    all_rows: torch.Tensor | None = None


def statistics_rows(captured: dict[str, torch.Tensor], name: str, pop: bool = False) -> torch.Tensor:
    """The rows the statistics of ``name`` read: every real position (``ALL_ROWS``, taken out of
    ``captured`` with ``pop``: they are not stored), or the stored rows when they are every position."""
    if ALL_ROWS + name in captured:
        return captured.pop(ALL_ROWS + name) if pop else captured[ALL_ROWS + name]
    return captured[name]


def _then_rows(hook: Callable, name: str, captured: dict, on_rows: Callable[[str, torch.Tensor], None]) -> Callable:
    """``hook``, then ``on_rows`` with the rows the statistics read (:func:`statistics_rows`)."""
    def then(*args):
        hook(*args)
        on_rows(name, statistics_rows(captured, name))
    return then


class Capture:
    """The hook functions of one stage, bound to its modules."""

    def __init__(self, modules: dict[str, nn.Module], arch: Architecture, hooks: list[HookPoint],
                 selection: Selection, store_dtype: torch.dtype, n_heads: int, top_k: int = 0,
                 statistics: tuple[str, ...] = (), statistics_only: list[HookPoint] | None = None):
        self.arch = arch
        self.statistics = set(statistics)  #: hooks whose every position the harvest-time statistics read
        #: hook points read for the statistics only: every position goes to ``ALL_ROWS + name``, nothing is stored
        self.statistics_only = list(statistics_only or [])
        self.n_heads = n_heads
        self.top_k = top_k
        self.hooks = hooks
        self.selection = selection
        self.store_dtype = store_dtype
        self._modules = modules  # hook name -> module it reads
        self._touched = list({id(m): m for m in modules.values()}.values())

    @contextmanager
    def attached(self, index: BatchIndex, on_rows: Callable[[str, torch.Tensor], None] | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
        """Attach every hook for one batch; yields the dict the hooks fill. ``on_rows(name, rows)``: called
        in the hook of each point with statistics, with every real position's rows, while they are in
        the cache (``harvest.running.DeviceStatistics.early``)."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for point in self.hooks + self.statistics_only:
                module = self._modules[point.name]
                _, what = self.arch.hooks.get(point.template, ("", "output"))
                if point in self.statistics_only:
                    fn = self._statistics_hook(point, what, index, captured)
                else:
                    fn = self._make_hook(point, what, index, captured, module)
                if on_rows is not None and (point in self.statistics_only or point.name in self.statistics):
                    fn = _then_rows(fn, point.name, captured, on_rows)
                if what == "input":
                    handles.append(module.register_forward_pre_hook(fn))
                else:
                    handles.append(module.register_forward_hook(fn))
            yield captured
        finally:
            for handle in handles:
                handle.remove()
        leftover = [m for m in self._touched if m._forward_hooks or m._forward_pre_hooks]
        if leftover:
            raise RuntimeError(f"hooks left attached after batch {index.batch}: {leftover[:3]}")

    def _statistics_hook(self, point: HookPoint, what: str, index: BatchIndex, captured: dict):
        """Every real position of a hook point that is not stored, for the statistics only."""
        dtype = self.store_dtype

        def keep(x: torch.Tensor) -> None:
            rows = index.all_rows if index.all_rows is not None else index.flat_rows
            captured[ALL_ROWS + point.name] = x.reshape(-1, *x.shape[2:]).index_select(0, rows).to(dtype)

        if what == "input":
            return lambda _module, args: keep(args[0])
        element = {"output": None, "output[0]": 0, "output[1]": 1}[what]
        return lambda _module, _args, output: keep(output if element is None else output[element])

    def _make_hook(self, point: HookPoint, what: str, index: BatchIndex, captured: dict, module: nn.Module):
        select = self._selector(point, index, module)
        if point.name in self.statistics and index.all_rows is not None:
            stored, dtype = select, self.store_dtype

            def select(x: torch.Tensor) -> torch.Tensor:  # noqa: F811 - the stored rows, and every row aside
                captured[ALL_ROWS + point.name] = x.reshape(-1, *x.shape[2:]).index_select(0, index.all_rows).to(dtype)
                return stored(x)

        if what == "input":
            def pre_hook(_module, args):
                captured[point.name] = select(args[0])
            return pre_hook

        element = {"output": None, "output[0]": 0, "output[1]": 1}[what]

        def hook(_module, _args, output):
            value = output if element is None else output[element]
            if value is None:
                raise ModelError(
                    f"{point.name}: the attention implementation returned no attention weights "
                    "(sdpa and flash attention never do); patterns need attn_implementation='eager'"
                )
            captured[point.name] = select(value)
        return hook

    def _selector(self, point: HookPoint, index: BatchIndex, module: nn.Module):
        heads, neurons = self.selection.heads, self.selection.neurons
        rows, dtype = index.flat_rows, self.store_dtype

        def token_rows(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, *x.shape[2:]).index_select(0, rows)

        if point.template == "attn.hook_pattern":
            def pattern(x: torch.Tensor) -> torch.Tensor:  # (batch, head, query, key)
                if heads is not None:
                    x = x.index_select(1, heads)
                # queries past a sequence's end are padding: zero them, they are not activations
                query = torch.arange(x.shape[2], device=x.device)
                keep = (query[None, :] < index.lengths[:, None]).to(x.dtype)
                return (x * keep[:, None, :, None]).to(dtype)
            return pattern

        if point.template in ("attn.hook_z", "attn.hook_result"):
            n_heads = self.n_heads

            def z(x: torch.Tensor) -> torch.Tensor:  # (batch, pos, head * d_head)
                x = token_rows(x).reshape(rows.shape[0], n_heads, -1)
                return x if heads is None else x.index_select(1, heads)

            if point.template == "attn.hook_z":
                return lambda x: z(x).to(dtype)

            def result(x: torch.Tensor) -> torch.Tensor:
                # result[r, h] = z[r, h] @ W_O[:, h]^T : head h's write to the residual stream
                w = module.weight.reshape(module.weight.shape[0], n_heads, -1)
                if heads is not None:
                    w = w.index_select(1, heads)
                return torch.einsum("rhd,mhd->rhm", z(x), w).to(dtype)
            return result

        if point.template == "unembed.topk_ids":  # the unembedding ran on the captured rows only
            return lambda logits: logits.topk(self.top_k, dim=-1).indices.to(torch.int32)
        if point.template == "unembed.topk_logits":
            return lambda logits: logits.topk(self.top_k, dim=-1).values.to(dtype)
        if point.template == "mlp.hook_post" and neurons is not None:
            return lambda x: token_rows(x).index_select(1, neurons).to(dtype)
        return lambda x: token_rows(x).to(dtype)
