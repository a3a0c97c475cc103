"""Addition prompts (``{a}+{b}=``) over a grid of operands, with operand and answer positions.

Analyses of how a model adds (e.g. Fourier features of the operands) need the exact tokens that
hold each operand and the position that predicts the answer. Those come from the tokenizer's
offset mapping on the rendered string, never from assumptions about how digits tokenize: GPT-NeoX
splits digit runs unevenly. The template helpers here serve the translation source too.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelError, SpecError
from .base import MetaField, Prompt, SizeEstimate
from .text import BATCH, ConfiguredSource, chunked

#: a template as (literal text, placeholder name or None) parts, in order.
Template = list[tuple[str, str | None]]
Offsets = list[tuple[int, int]]


def parse_template(key: str, template: Any, *, allowed: Collection[str], once: Collection[str]) -> Template:
    """Split a template into parts, rejecting what cannot be rendered with known character spans."""
    if not isinstance(template, str):
        raise SpecError(f"prompts.{key} = {template!r}: must be a string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SpecError(f"prompts.{key} = {template!r}: {e}; write a literal brace as '{{{{' or '}}}}'") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in allowed or spec or conversion):
            raise SpecError(f"prompts.{key} = {template!r}: placeholder {{{name}}} is not one of "
                            f"{', '.join('{' + a + '}' for a in allowed)} (no format specs or conversions)")
    for name in once:
        if names.count(name) != 1:
            raise SpecError(f"prompts.{key} = {template!r}: must contain {{{name}}} exactly once "
                            f"(found {names.count(name)})")
    return [(literal, name) for literal, name, _, _ in parsed]


def render(template: Template, values: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """The rendered text and the character offset where each placeholder's value starts."""
    text, starts = "", {}
    for literal, name in template:
        text += literal
        if name is not None:
            starts[name] = len(text)
            text += values[name]
    return text, starts


def require_offsets(tokenizer: Any, source: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"the {source} prompt source locates words through the tokenizer's offset mapping, "
                         "which needs a fast tokenizer (a tokenizer.json); this one is a slow tokenizer")


def encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], Offsets]]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [tuple(o) for o in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]


def token_span(text: str, offsets: Offsets, start: int, end: int, what: str) -> tuple[int, int]:
    """Token indices [first, last + 1) of the tokens whose characters overlap ``text[start:end]``.

    Byte-level BPE folds the preceding space into a word's first token, so those tokens may reach
    past the span by whitespace; anything more means the span shares a token with its neighbours
    and has no position of its own.
    """
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    if not hits:
        raise SpecError(f"{what} {text[start:end]!r} maps to no token of {text!r}")
    lo, hi = offsets[hits[0]][0], max(offsets[i][1] for i in hits)
    if text[lo:start].strip() or text[end:hi].strip():
        raise SpecError(f"{what} {text[start:end]!r} shares a token with the text around it in {text!r} "
                        f"(its tokens cover {text[lo:hi]!r}); separate it with a space or punctuation "
                        "in prompts.template")
    return hits[0], hits[-1] + 1


class AdditionSource(ConfiguredSource):
    """Every (a, b) of the operand grid in a-major order, or a seeded sample of it (same order)."""

    NAME = "addition"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "a": [0, 99],
        "b": [0, 99],
        "template": "Output ONLY a number.\n{a}+{b}=",
        "sample": None,
        "seed": 0,
        "bos": False,
    }

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        a, b = cfg["a"], cfg["b"]
        n = cfg["sample"] or (a[1] - a[0] + 1) * (b[1] - b[0] + 1)
        text = str(cfg["template"]).replace("{a}", str(a[1])).replace("{b}", str(b[1]))
        seq_len = math.ceil(len(text) / 2.5) + 1 + bool(cfg["bos"])
        return SizeEstimate(int(n), seq_len, f"{n} problems x ~{seq_len} tokens (template characters / 2.5)",
                            source_positions=3)

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        super().__init__(cfg, base_dir=base_dir, tokenizer=tokenizer)
        require_offsets(tokenizer, self.NAME)
        self.a_range = self._operand_range("a")
        self.b_range = self._operand_range("b")
        self.template = parse_template("template", self.cfg["template"], allowed=("a", "b"), once=("a", "b"))
        literal, name = self.template[-1]
        if name is not None or not literal:
            raise self.reject("template", "must end with text after the last operand (e.g. '='): its last "
                                          "token is the position that predicts the answer")
        total = self._width(self.b_range) * self._width(self.a_range)
        self.sample = self.integer("sample", lo=1, hi=total, optional=True, why=f"(the a x b grid has {total} pairs)")
        self.seed = self.integer("seed")
        # The grid's corners have the shortest and longest operands: a template whose operands
        # merge with their neighbours fails here, before any model is loaded.
        corners = [(a, b) for a in self.a_range for b in self.b_range]  # (lo, hi) x (lo, hi)
        self._build(corners)

    def _operand_range(self, key: str) -> tuple[int, int]:
        value = self.cfg[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and 0 <= value[0] <= value[1]):
            raise self.reject(key, "must be [lo, hi], integers with 0 <= lo <= hi (both inclusive)")
        return value[0], value[1]

    @staticmethod
    def _width(bounds: tuple[int, int]) -> int:
        return bounds[1] - bounds[0] + 1

    def pairs(self) -> Iterator[tuple[int, int]]:
        """The (a, b) operands in prompt order."""
        (a_lo, _), (b_lo, _) = self.a_range, self.b_range
        n_b = self._width(self.b_range)
        total = self._width(self.a_range) * n_b
        # random.sample on a range never materialises it, so huge grids sample cheaply.
        if self.sample is None:
            picks: Iterable[int] = range(total)
        else:
            picks = sorted(random.Random(self.seed).sample(range(total), self.sample))
        for i in picks:
            yield a_lo + i // n_b, b_lo + i % n_b

    def prompts(self) -> Iterator[Prompt]:
        for batch in chunked(self.pairs(), BATCH):
            yield from self._build(batch)

    def _build(self, pairs: list[tuple[int, int]]) -> list[Prompt]:
        rendered = [render(self.template, {"a": str(a), "b": str(b)}) for a, b in pairs]
        encoded = encode_with_offsets(self.tokenizer, [text for text, _ in rendered])
        return [self._prompt(a, b, text, starts, ids, offsets)
                for (a, b), (text, starts), (ids, offsets) in zip(pairs, rendered, encoded)]

    def _prompt(self, a: int, b: int, text: str, starts: dict[str, int], ids: list[int], offsets: Offsets) -> Prompt:
        shift = len(self.prefix)
        spans = {}
        for name, value in (("a", a), ("b", b)):
            first, end = token_span(text, offsets, starts[name], starts[name] + len(str(value)), f"operand {name}")
            spans[name] = [first + shift, end + shift]
        input_ids = self.prefix + ids
        eq_pos = len(input_ids) - 1
        return Prompt(
            input_ids=input_ids,
            positions=sorted({spans["a"][1] - 1, spans["b"][1] - 1, eq_pos}),
            meta={"a": a, "b": b, "answer": a + b, "a_span": spans["a"], "b_span": spans["b"], "eq_pos": eq_pos},
        )

    def meta_fields(self) -> dict[str, MetaField]:
        span = "token positions [start, end) of operand {} (counting bos, if any)"
        return {
            "a": MetaField("int64", description="first operand"),
            "b": MetaField("int64", description="second operand"),
            "answer": MetaField("int64", description="a + b"),
            "a_span": MetaField("int32", (2,), ("bound",), description=span.format("a")),
            "b_span": MetaField("int32", (2,), ("bound",), description=span.format("b")),
            "eq_pos": MetaField("int32", description="position of the prompt's last token, the one that "
                                                     "predicts the answer"),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {}  # the spec alone determines the prompts
