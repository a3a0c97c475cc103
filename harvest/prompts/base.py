"""What every prompt source yields, and the metadata it declares.

A prompt source turns its spec section into tokenized prompts. Sources know nothing of models or
stores: the runner lays out rows from ``Prompt.input_ids``, captures at ``Prompt.positions`` when
the spec says ``positions: source``, and writes each declared ``MetaField`` under ``meta/`` with a
leading ``sequence`` dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class MetaField:
    """A per-sequence metadata array written to ``meta/{name}``.

    ``shape`` is the shape of one sequence's value (``()`` for a scalar); ``dims`` names those
    trailing axes for xarray (the leading axis is always ``sequence``). ``fill`` pads values that
    are shorter than ``shape`` (e.g. a prompt with fewer aligned words than the maximum).
    """

    dtype: str
    shape: tuple[int, ...] = ()
    dims: tuple[str, ...] = ()
    fill: int | float = -1
    description: str = ""


@dataclass(frozen=True)
class SizeEstimate:
    """A source's size from its spec section alone (no tokenizer): what ``harvest plan`` shows."""

    n_sequences: int
    seq_len: int  #: tokens per sequence (the longest, roughly)
    note: str  #: how the numbers were reached, shown as the estimate's reason
    source_positions: int = 4  #: positions a prompt marks for ``capture.positions: source``


@dataclass
class Prompt:
    """One tokenized sequence and what the source knows about it."""

    input_ids: list[int]
    #: positions the source considers interesting (operands, '=', target words); used by
    #: ``capture.positions: source``. Must be sorted, unique and < len(input_ids).
    positions: list[int] = field(default_factory=list)
    #: per-sequence values keyed like ``PromptSource.meta_fields()``.
    meta: dict[str, Any] = field(default_factory=dict)


class PromptSource(Protocol):
    """A deterministic stream of prompts: same spec + same tokenizer -> same prompts."""

    def prompts(self) -> Iterator[Prompt]: ...

    def meta_fields(self) -> dict[str, MetaField]: ...

    def fingerprint_inputs(self) -> dict[str, Any]:
        """Everything besides the spec that determines the prompts (e.g. corpus file hashes)."""
        ...


def pad_meta(value: Any, spec: MetaField) -> np.ndarray:
    """Pad/convert one sequence's meta value to ``spec.shape`` with ``spec.fill``."""
    arr = np.asarray(value, dtype=spec.dtype)
    if arr.shape == spec.shape:
        return arr
    out = np.full(spec.shape, spec.fill, dtype=spec.dtype)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out
