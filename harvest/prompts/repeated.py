"""Random token sequences repeated: the standard probe for induction heads.

Each prompt is ``length`` token ids drawn uniformly (seeded) from ``vocab`` = [lo, hi), written
``repeats`` times in a row (after BOS when ``bos``). In the second and later copies an induction
head attends to the token after the previous occurrence of the current token and predicts it; the
translation-head analysis uses this store for its prefix-matching control. Tokens are ids, not
text: nothing is tokenized, so every prompt has exactly the stated length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import MetaField, Prompt, SizeEstimate
from .text import ConfiguredSource


class RepeatedTokensSource(ConfiguredSource):
    """``n_prompts`` prompts of ``repeats`` copies of ``length`` random tokens."""

    NAME = "repeated_tokens"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "n_prompts": 64,
        "length": 32,
        "repeats": 2,
        "vocab": None,
        "seed": 0,
        "bos": True,
    }

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        n, length, repeats = int(cfg["n_prompts"]), int(cfg["length"]), int(cfg["repeats"])
        seq_len = length * repeats + bool(cfg["bos"])  # exact: ids are drawn, not tokenized
        return SizeEstimate(n, seq_len, f"{n} prompts x {seq_len} tokens ({repeats} x {length} + bos)",
                            source_positions=length * (repeats - 1))

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        super().__init__(cfg, base_dir=base_dir, tokenizer=tokenizer)
        self.n_prompts = self.integer("n_prompts", lo=1)
        self.length = self.integer("length", lo=1)
        self.repeats = self.integer("repeats", lo=2)
        self.seed = self.integer("seed")
        self.vocab = self._vocab(len(tokenizer))

    def _vocab(self, size: int) -> np.ndarray:
        """Candidate ids: [lo, hi) if given, else every id that is not a special token."""
        value = self.cfg["vocab"]
        if value is None:
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            ids = np.array([i for i in range(size) if i not in special], dtype=np.int64)
        else:
            if not (isinstance(value, (list, tuple)) and len(value) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                    and 0 <= value[0] < value[1] <= size):
                raise self.reject("vocab", f"must be [lo, hi) token ids with 0 <= lo < hi <= {size} "
                                           "(the tokenizer's size), or null for every non-special token")
            ids = np.arange(value[0], value[1], dtype=np.int64)
        if len(ids) < 2:
            raise self.reject("vocab", "leaves fewer than two token ids to draw from")
        return ids

    def prompts(self) -> Iterator[Prompt]:
        rng = np.random.default_rng(self.seed)
        period = self.length
        first = len(self.prefix) + period  # first position of the second copy
        positions = list(range(first, len(self.prefix) + period * self.repeats))
        for _ in range(self.n_prompts):
            block = rng.choice(self.vocab, size=period).tolist()
            yield Prompt(input_ids=self.prefix + block * self.repeats, positions=positions,
                         meta={"period": period, "start": len(self.prefix)})

    def meta_fields(self) -> dict[str, MetaField]:
        return {
            "period": MetaField("int32", description="tokens per copy: position i repeats position i - period"),
            "start": MetaField("int32", description="position of the first copy's first token (1 after bos)"),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {"vocab_size": int(len(self.tokenizer))}
