"""Prompts cut from a text corpus, and the spec handling that every prompt source shares.

``packed`` mode is the pre-training layout (documents joined by EOS, cut into full windows): every
sequence has exactly ``seq_len`` tokens, so no padding reaches the model and rows are uniform.
``windowed`` mode keeps each sequence inside one document, for analyses that must not mix
documents in one context.

Document order is fixed (files sorted by path, then lines within a ``.jsonl``) so that ``doc`` in
the store names the same document on every run; ``TextSource.documents()`` maps it back to a file
and line.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

from ..errors import SpecError, check_keys, did_you_mean
from .base import MetaField, Prompt, SizeEstimate

T = TypeVar("T")

#: documents or prompts tokenized per tokenizer call: batching is what makes a fast tokenizer fast.
BATCH = 256


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter); itertools.batched is 3.12+."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ConfiguredSource:
    """Spec handling shared by all sources: defaults, key and type checks, the optional BOS.

    It lives beside the text source (the plainest one) so the package needs no helper module.
    Checks run in ``__init__`` so a bad spec fails before any model is loaded.
    """

    NAME: ClassVar[str]
    #: every key with its default; ``resolved_config()`` is these merged with the user's keys.
    DEFAULTS: ClassVar[dict[str, Any]]

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        if not isinstance(cfg, Mapping):
            raise SpecError(f"section 'prompts' must be a mapping of keys to values, got {type(cfg).__name__}")
        given = dict(cfg)
        source = given.pop("source", self.NAME)
        if source != self.NAME:
            raise SpecError(f"prompts.source = {source!r}, but {type(self).__name__} reads source {self.NAME!r}")
        check_keys("prompts", given, ["source", *self.DEFAULTS])
        self.cfg: dict[str, Any] = {**copy.deepcopy(self.DEFAULTS), **given}
        self.base_dir = Path(base_dir).absolute()
        self.tokenizer = tokenizer
        self.prefix: list[int] = [self._bos_id()] if self.flag("bos") else []

    @classmethod
    def estimate(cls, cfg: Mapping[str, Any], *, base_dir: Path | str) -> SizeEstimate:
        """This source's size from its spec section alone, without a tokenizer (``harvest plan``)."""
        given = {k: v for k, v in dict(cfg).items() if k != "source"}
        check_keys("prompts", given, ["source", *cls.DEFAULTS])
        return cls._estimate({**copy.deepcopy(cls.DEFAULTS), **given}, Path(base_dir))

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        raise NotImplementedError(f"prompt source {cls.NAME!r} cannot estimate its size")

    def resolved_config(self) -> dict[str, Any]:
        """The spec as run: every key, defaults filled in (recorded in the store's provenance)."""
        return {"source": self.NAME, **copy.deepcopy(self.cfg)}

    # --- checks used by the subclasses' __init__ ----------------------------------------------

    def reject(self, key: str, rule: str) -> SpecError:
        return SpecError(f"prompts.{key} = {self.cfg[key]!r}: {rule}")

    def integer(self, key: str, *, lo: int | None = None, hi: int | None = None,
                optional: bool = False, why: str = "") -> int | None:
        value = self.cfg[key]
        if value is None and optional:
            return None
        in_range = (lo is None or value >= lo) and (hi is None or value <= hi) if _is_int(value) else False
        if not in_range:
            bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                      else f">= {lo}" if lo is not None else f"<= {hi}" if hi is not None else "")
            rule = f"must be an integer {bounds}".rstrip() + (" or null" if optional else "")
            raise self.reject(key, rule + (f" {why}" if why else ""))
        return value

    def flag(self, key: str) -> bool:
        if not isinstance(self.cfg[key], bool):
            raise self.reject(key, "must be true or false")
        return self.cfg[key]

    def string(self, key: str, choices: Iterable[str] | None = None) -> str:
        value = self.cfg[key]
        if not isinstance(value, str) or not value:
            raise self.reject(key, "must be a non-empty string")
        if choices is not None and value not in choices:
            raise self.reject(key, f"must be one of {', '.join(choices)}{did_you_mean(value, choices)}")
        return value

    def _bos_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            raise self.reject("bos", "the tokenizer has no bos token; set prompts.bos: false")
        return bos


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Document(NamedTuple):
    """One document: its file (as written in fingerprints), 1-based line for ``.jsonl``, text."""

    path: str
    line: int | None
    text: str


class TextSource(ConfiguredSource):
    """Fixed-length windows over ``.txt`` (one document each) and ``.jsonl`` (one per line) files."""

    NAME = "text"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "paths": [],
        "seq_len": 128,
        "mode": "packed",
        "min_len": 8,
        "bos": False,
        "text_field": "text",
        "max_sequences": None,
        "max_documents": None,
    }
    MODES = ("packed", "windowed")
    SUFFIXES = (".txt", ".jsonl")

    @classmethod
    def _estimate(cls, cfg: dict[str, Any], base_dir: Path) -> SizeEstimate:
        seq_len = int(cfg["seq_len"])
        if cfg["max_sequences"]:
            n, how = int(cfg["max_sequences"]), "prompts.max_sequences"
        else:
            paths = cfg["paths"] or []
            files = {f for p in paths for f in glob.glob(str(base_dir / p), recursive=True)}
            size = sum(Path(f).stat().st_size for f in files)
            n, how = max(1, size // 4 // seq_len), "corpus bytes / 4 bytes per token"
        return SizeEstimate(n, seq_len, f"{how} x seq_len {seq_len}", source_positions=0)

    def __init__(self, cfg: Mapping[str, Any], *, base_dir: Path | str, tokenizer: Any) -> None:
        super().__init__(cfg, base_dir=base_dir, tokenizer=tokenizer)
        bos = len(self.prefix)
        self.seq_len = self.integer("seq_len", lo=1 + bos, why="(bos: true takes one of the positions)" if bos else "")
        self.body = self.seq_len - bos
        self.mode = self.string("mode", self.MODES)
        self.min_len = self.integer("min_len", lo=1, hi=self.body,
                                    why="(document tokens in the last window; at most seq_len, minus 1 with bos)")
        self.text_field = self.string("text_field")
        self.max_sequences = self.integer("max_sequences", lo=1, optional=True)
        self.max_documents = self.integer("max_documents", lo=1, optional=True)
        if self.mode == "packed" and getattr(tokenizer, "eos_token_id", None) is None:
            raise self.reject("mode", "packed mode separates documents with EOS, but the tokenizer has none; "
                                      "use mode: windowed")
        self.files = self._resolve_paths()

    def _resolve_paths(self) -> dict[str, Path]:
        """Label (path relative to base_dir where possible) -> file, sorted by label."""
        patterns = self.cfg["paths"]
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise self.reject("paths", "must be a non-empty list of files or globs "
                                       "(relative to the spec's directory, or absolute)")
        files: dict[str, Path] = {}
        for pattern in patterns:
            # root_dir applies to relative patterns only; absolute ones match as written.
            matches = [self.base_dir / m for m in glob.glob(pattern, root_dir=self.base_dir, recursive=True)]
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise SpecError(f"prompts.paths: {pattern!r} matches no file (relative paths are read from "
                                f"{self.base_dir})")
            for path in matches:
                if path.suffix not in self.SUFFIXES:
                    raise SpecError(f"prompts.paths: {pattern!r} matches {path}, which is neither .txt nor .jsonl; "
                                    "narrow the glob (e.g. 'corpus/*.txt')")
                files[self._label(path)] = path
        return dict(sorted(files.items()))

    def _label(self, path: Path) -> str:
        try:
            return path.relative_to(self.base_dir).as_posix()
        except ValueError:
            return path.as_posix()

    def documents(self) -> Iterator[Document]:
        """Documents in index order (the ``doc`` meta value), up to ``max_documents``."""
        return itertools.islice(self._all_documents(), self.max_documents)

    def _all_documents(self) -> Iterator[Document]:
        for label, path in self.files.items():
            try:
                if path.suffix == ".txt":
                    yield Document(label, None, path.read_text(encoding="utf-8"))
                    continue
                with path.open(encoding="utf-8") as f:
                    for line_no, line in enumerate(f, start=1):
                        if line.strip():
                            yield Document(label, line_no, self._jsonl_text(label, line_no, line))
            except UnicodeDecodeError as e:
                raise SpecError(f"prompts.paths: {label} is not UTF-8 text ({e})") from None

    def _jsonl_text(self, label: str, line_no: int, line: str) -> str:
        where = f"{label}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            keys = list(record) if isinstance(record, dict) else []
            raise SpecError(f"{where} has no string field {self.text_field!r} (prompts.text_field)"
                            f"{did_you_mean(self.text_field, keys)}; its keys: {', '.join(keys) or 'none'}")
        return record[self.text_field]

    def _encoded(self) -> Iterator[list[int]]:
        for batch in chunked(self.documents(), BATCH):
            # verbose=False: long documents are expected here; they are cut into windows below.
            yield from self.tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]

    def prompts(self) -> Iterator[Prompt]:
        windows = self._packed() if self.mode == "packed" else self._windowed()
        return itertools.islice(self._named_if_empty(windows), self.max_sequences)

    def _named_if_empty(self, windows: Iterator[Prompt]) -> Iterator[Prompt]:
        """``windows``, or an error naming the corpus files that hold no text when there are none."""
        any_window = False
        for window in windows:
            any_window = True
            yield window
        if not any_window:
            empty = [label for label, path in self.files.items() if not path.read_bytes().strip()]
            if empty:
                raise SpecError(f"prompts.paths: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty and "
                                "no other file gave a window; put text in the corpus or point prompts.paths elsewhere")

    def _packed(self) -> Iterator[Prompt]:
        eos = self.tokenizer.eos_token_id
        pending: list[int] = []  # stream tokens not yet emitted
        owner: list[int] = []  # document of each pending token; an EOS belongs to the document it ends
        start = 0  # offset of pending[0] in the packed stream
        for doc, ids in enumerate(self._encoded()):
            if doc:
                pending.append(eos)
                owner.append(doc - 1)
            pending += ids
            owner += [doc] * len(ids)
            while len(pending) >= self.body:
                yield self._window(pending[: self.body], owner[0], start)
                del pending[: self.body]
                del owner[: self.body]
                start += self.body

    def _windowed(self) -> Iterator[Prompt]:
        for doc, ids in enumerate(self._encoded()):
            for offset in range(0, len(ids), self.body):
                piece = ids[offset : offset + self.body]
                if len(piece) >= self.min_len:  # only the last window can be short; min_len <= body
                    yield self._window(piece, doc, offset)

    def _window(self, piece: list[int], doc: int, offset: int) -> Prompt:
        return Prompt(input_ids=self.prefix + piece, positions=[], meta={"doc": doc, "doc_offset": offset})

    def meta_fields(self) -> dict[str, MetaField]:
        offset = ("token offset of the window's first token (after bos) in the packed stream, where documents "
                  "are joined by one EOS each" if self.mode == "packed"
                  else "token offset of the window's first token (after bos) in its document")
        return {
            "doc": MetaField("int64", description="index of the document holding the window's first token "
                                                  "(after bos), in path-then-line order; a separating EOS "
                                                  "belongs to the document it ends"),
            "doc_offset": MetaField("int64", description=offset),
        }

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {"files": {label: sha256_file(path) for label, path in self.files.items()}}
