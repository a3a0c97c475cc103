"""Bare numbers, one prompt each (``" 0"``, ``" 1"``, … ``" 299"``): the inputs of a number spectrum.

Analyses of how a model represents numbers (the Fourier spectrum over n of Kantamneni & Tegmark,
arXiv 2502.00873, and the helix fit) need the activation of the number token itself for every
n of a contiguous range. Each prompt renders ``template`` with one n; ``n_span`` locates n's
tokens through the tokenizer's offset mapping and ``positions`` is n's last token (a multi-token
number is read where its last token has seen all of it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from .addition import Offsets, encode_with_offsets, parse_template, render, require_offsets, token_span
from .base import MetaField, Prompt, SizeEstimate
from .text import BATCH, ConfiguredSource, chunked


class NumbersSource(ConfiguredSource):
    """n = lo, lo + 1, …, hi (inclusive), in that order."""

    NAME = "numbers"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "range": [0, 299],
        "template": " {n}",
        # a lone token at position 0 sees nothing but itself and often acts as an attention sink;
        # after BOS it is read as it is inside text
        "bos": True,
    }

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        lo, hi = cfg["range"]
        n = hi - lo + 1
        seq_len = math.ceil(len(str(cfg["template"]).replace("{n}", str(hi))) / 2.5) + 1 + bool(cfg["bos"])
        return SizeEstimate(n, seq_len, f"{n} numbers x ~{seq_len} tokens (template characters / 2.5)",
                            source_positions=1)

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        super().__init__(cfg, base_dir=base_dir, tokenizer=tokenizer)
        require_offsets(tokenizer, self.NAME)
        value = self.cfg["range"]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 0 <= value[0] <= value[1]):
            raise self.reject("range", "must be [lo, hi], integers with 0 <= lo <= hi (both inclusive)")
        self.lo, self.hi = value
        self.template = parse_template("template", self.cfg["template"], allowed=("n",), once=("n",))
        self._build([self.lo, self.hi])  # a template that merges n with its neighbours fails now

    def numbers(self) -> range:
        return range(self.lo, self.hi + 1)

    def prompts(self) -> Iterator[Prompt]:
        for batch in chunked(self.numbers(), BATCH):
            yield from self._build(batch)

    def _build(self, numbers: list[int]) -> list[Prompt]:
        rendered = [render(self.template, {"n": str(n)}) for n in numbers]
        encoded = encode_with_offsets(self.tokenizer, [text for text, _ in rendered])
        return [self._prompt(n, text, starts["n"], ids, offsets)
                for n, (text, starts), (ids, offsets) in zip(numbers, rendered, encoded)]

    def _prompt(self, n: int, text: str, start: int, ids: list[int], offsets: Offsets) -> Prompt:
        first, end = token_span(text, offsets, start, start + len(str(n)), "number")
        shift = len(self.prefix)
        span = [first + shift, end + shift]
        return Prompt(input_ids=self.prefix + ids, positions=[span[1] - 1], meta={"n": n, "n_span": span})

    def meta_fields(self) -> dict[str, MetaField]:
        return {
            "n": MetaField("int64", description="the number"),
            "n_span": MetaField("int32", (2,), ("bound",),
                                description="token positions [start, end) of the number (counting bos, if any)"),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {}  # the spec alone determines the prompts
