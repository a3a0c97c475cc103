"""Prompt sources: the ``prompts:`` section of a job spec turned into tokenized prompts.

``build_source`` is the one entry point: it picks the source named by ``source`` and that
source validates every other key before anything is tokenized, so a bad spec fails fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import SpecError, did_you_mean
from .addition import AdditionSource
from .base import MetaField, Prompt, PromptSource, SizeEstimate, pad_meta
from .numbers import NumbersSource
from .repeated import RepeatedTokensSource
from .text import ConfiguredSource, TextSource
from .translation import TranslationSource

SOURCES: dict[str, type[ConfiguredSource]] = {
    TextSource.NAME: TextSource,
    AdditionSource.NAME: AdditionSource,
    TranslationSource.NAME: TranslationSource,
    NumbersSource.NAME: NumbersSource,
    RepeatedTokensSource.NAME: RepeatedTokensSource,
}


def build_source(cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> ConfiguredSource:
    """The prompt source for a spec's ``prompts`` section; relative paths are read from ``base_dir``."""
    if not isinstance(cfg, Mapping):
        raise SpecError(f"section 'prompts' must be a mapping with a 'source', got {type(cfg).__name__}")
    if "source" not in cfg:
        raise SpecError(f"section 'prompts' needs a 'source', one of: {', '.join(SOURCES)}")
    name = cfg["source"]
    if name not in SOURCES:
        hint = did_you_mean(name, SOURCES) if isinstance(name, str) else ""
        raise SpecError(f"prompts.source = {name!r} is not a prompt source{hint}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[name](cfg, base_dir=Path(base_dir), tokenizer=tokenizer)


__all__ = [
    "SOURCES", "AdditionSource", "MetaField", "NumbersSource", "Prompt", "PromptSource", "RepeatedTokensSource", "SizeEstimate",
    "TextSource", "TranslationSource",
    "build_source", "pad_meta",
]
