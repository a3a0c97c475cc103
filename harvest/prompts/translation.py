"""Word-translation prompts: a few source-language words, then the same words translated.

With the default template a prompt reads ``English: cat dog tree house\\nFrench: chat chien arbre
maison``. Target word j is aligned with source word j: both come from line ``word_ids[j]`` of the
pair's word list, so ``src_span[j]`` and ``tgt_span[j]`` locate one translation. ``positions``
holds, for each target word, its first token p_j and p_j - 1, the position whose next-token
prediction is that word: where translation heads are looked for.

Word lists are ``{src}-{tgt}.tsv`` files, one ``source<TAB>target`` pair per line, shipped in
``harvest/data/translation`` (en-fr, en-de, en-es; lower-case, single words) and optionally in a
``word_lists`` directory of the user's, whose files take precedence over shipped ones of the same
name.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import SpecError, did_you_mean
from .addition import Offsets, encode_with_offsets, parse_template, render, require_offsets, token_span
from .base import MetaField, Prompt, SizeEstimate
from .text import BATCH, ConfiguredSource, chunked, sha256_file

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "translation"
#: display names for the template's {src_name} / {tgt_name}; prompts.language_names extends it.
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish",
                  "it": "Italian", "pt": "Portuguese", "nl": "Dutch"}


@dataclass(frozen=True)
class WordList:
    """One language pair's word list; ``label`` is how fingerprints and errors name the file."""

    name: str
    label: str
    path: Path
    words: list[tuple[str, str]]

    @property
    def languages(self) -> tuple[str, str]:
        src, tgt = self.name.split("-")
        return src, tgt


def read_word_list(name: str, path: Path, label: str) -> WordList:
    """Parse a tsv, rejecting anything that would make a word's tokens impossible to locate."""
    words: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SpecError(f"{label} is not UTF-8 text ({e})") from None
    if not lines:
        raise SpecError(f"{label} is empty; a word list needs one 'source<TAB>target' pair per line")
    for line_no, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 2 or not all(f and f.split() == [f] for f in fields):
            raise SpecError(f"{label}:{line_no}: {line!r} is not 'source<TAB>target' with one word on each side")
        pair = (fields[0], fields[1])
        if pair in seen:
            raise SpecError(f"{label}:{line_no}: {line!r} repeats an earlier line; remove the duplicate")
        seen.add(pair)
        words.append(pair)
    return WordList(name, label, path, words)


class TranslationSource(ConfiguredSource):
    """``n_prompts`` prompts per language pair, pair by pair, each with distinct word pairs."""

    NAME = "translation"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "pairs": ["en-fr", "en-de", "en-es"],
        "words_per_prompt": 4,
        "n_prompts": 200,
        "seed": 0,
        "template": "{src_name}: {src_words}\n{tgt_name}: {tgt_words}",
        "bos": False,
        "word_lists": None,
        "language_names": {},
    }
    FIELDS = ("src_name", "src_words", "tgt_name", "tgt_words")

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        words = int(cfg["words_per_prompt"])
        n = int(cfg["n_prompts"]) * len(cfg["pairs"])
        seq_len = 8 + 6 * words + bool(cfg["bos"])
        return SizeEstimate(n, seq_len, f"{n} prompts x ~{seq_len} tokens (~3 tokens per word)",
                            source_positions=2 * words)

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        super().__init__(cfg, base_dir=base_dir, tokenizer=tokenizer)
        require_offsets(tokenizer, self.NAME)
        self.lists = self._word_lists()
        self.names = self._language_names()
        smallest = min(len(wl.words) for wl in self.lists)
        self.words_per_prompt = self.integer("words_per_prompt", lo=1, hi=smallest,
                                             why="(the smallest chosen word list has that many pairs)")
        self.n_prompts = self.integer("n_prompts", lo=1, why="(per language pair)")
        self.seed = self.integer("seed")
        self.template = parse_template("template", self.cfg["template"], allowed=self.FIELDS,
                                       once=("src_words", "tgt_words"))
        # One prompt per pair now: a template whose words merge with their surroundings fails
        # before any model is loaded.
        for index in range(len(self.lists)):
            next(self._pair_prompts(index))

    def _available(self) -> dict[str, tuple[Path, str]]:
        """Pair name -> (file, label); user files override shipped ones of the same name."""
        found = {p.stem: (p, f"harvest/data/translation/{p.name}") for p in sorted(DATA_DIR.glob("*-*.tsv"))}
        if self.cfg["word_lists"] is not None:
            value = self.cfg["word_lists"]
            folder = self.base_dir / value if isinstance(value, str) else None
            if folder is None or not folder.is_dir():
                raise self.reject("word_lists", f"must be a directory of '{{src}}-{{tgt}}.tsv' files "
                                                f"(relative paths are read from {self.base_dir})")
            for path in sorted(folder.glob("*-*.tsv")):
                try:
                    label = path.relative_to(self.base_dir).as_posix()
                except ValueError:
                    label = path.as_posix()
                found[path.stem] = (path, label)
        return found

    def _word_lists(self) -> list[WordList]:
        available = self._available()
        pairs = self.cfg["pairs"]
        if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
            raise self.reject("pairs", f"must be a non-empty list of language pairs from: {', '.join(available)}")
        if len(set(pairs)) != len(pairs):
            raise self.reject("pairs", "lists a language pair twice")
        for pair in pairs:
            if pair not in available:
                raise SpecError(f"prompts.pairs: no word list for {pair!r}{did_you_mean(pair, available)}; "
                                f"available: {', '.join(available)} (add your own as '{pair}.tsv' in a "
                                "directory named by prompts.word_lists)")
        return [read_word_list(pair, *available[pair]) for pair in pairs]

    def _language_names(self) -> dict[str, str]:
        extra = self.cfg["language_names"]
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise self.reject("language_names", "must map language codes to display names, e.g. {it: Italian}")
        names = {**LANGUAGE_NAMES, **extra}
        for wl in self.lists:
            for code in wl.languages:
                if code not in names:
                    raise SpecError(f"prompts.pairs: no display name for language {code!r} of {wl.name!r}; "
                                    f"add it, e.g. language_names: {{{code}: ...}}")
        return names

    def prompts(self) -> Iterator[Prompt]:
        for index in range(len(self.lists)):
            yield from self._pair_prompts(index)

    def _pair_prompts(self, index: int) -> Iterator[Prompt]:
        wl = self.lists[index]
        # A generator per pair, seeded by (seed, pair name): adding or reordering pairs leaves
        # each pair's prompts unchanged. String seeds are hashed with SHA-512, not hash().
        rng = random.Random(f"{self.seed}:{wl.name}")
        picks = (rng.sample(range(len(wl.words)), self.words_per_prompt) for _ in range(self.n_prompts))
        for batch in chunked(picks, BATCH):
            yield from self._build(index, batch)

    def _build(self, index: int, batch: list[list[int]]) -> list[Prompt]:
        wl = self.lists[index]
        src_code, tgt_code = wl.languages
        rendered = []
        for word_ids in batch:
            src = [wl.words[i][0] for i in word_ids]
            tgt = [wl.words[i][1] for i in word_ids]
            text, starts = render(self.template, {"src_name": self.names[src_code], "tgt_name": self.names[tgt_code],
                                                  "src_words": " ".join(src), "tgt_words": " ".join(tgt)})
            rendered.append((text, _word_spans(starts["src_words"], src), _word_spans(starts["tgt_words"], tgt)))
        encoded = encode_with_offsets(self.tokenizer, [text for text, _, _ in rendered])
        return [self._prompt(index, word_ids, *r, *e) for word_ids, r, e in zip(batch, rendered, encoded)]

    def _prompt(self, index: int, word_ids: list[int], text: str, src_chars: list[tuple[int, int]],
                tgt_chars: list[tuple[int, int]], ids: list[int], offsets: Offsets) -> Prompt:
        src_code, tgt_code = self.lists[index].languages
        shift = len(self.prefix)

        def spans(chars: list[tuple[int, int]], code: str) -> list[list[int]]:
            located = (token_span(text, offsets, s, e, f"{self.names[code]} word") for s, e in chars)
            return [[first + shift, end + shift] for first, end in located]

        tgt_span = spans(tgt_chars, tgt_code)
        positions = sorted({p for first, _ in tgt_span for p in (first - 1, first) if p >= 0})
        return Prompt(
            input_ids=self.prefix + ids,
            positions=positions,
            meta={"pair": index, "word_ids": word_ids, "src_span": spans(src_chars, src_code), "tgt_span": tgt_span},
        )

    def meta_fields(self) -> dict[str, MetaField]:
        w = self.words_per_prompt
        span = "token positions [start, end) of each {} word (counting bos, if any); word j of both lists is one pair"
        return {
            "pair": MetaField("int32", description="index into prompts.pairs: "
                                                   + ", ".join(wl.name for wl in self.lists)),
            "word_ids": MetaField("int32", (w,), ("word",), description="line index (0-based) of each word pair "
                                                                       "in the language pair's tsv"),
            "src_span": MetaField("int32", (w, 2), ("word", "bound"), description=span.format("source")),
            "tgt_span": MetaField("int32", (w, 2), ("word", "bound"), description=span.format("target")),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {"word_lists": {wl.name: {"path": wl.label, "sha256": sha256_file(wl.path)} for wl in self.lists}}


def _word_spans(start: int, words: list[str]) -> list[tuple[int, int]]:
    """Character spans of space-joined ``words`` placed at ``start``."""
    spans = []
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans
