"""Prompt sources: determinism, exact token bookkeeping, and errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harvest.errors import SpecError
from harvest.prompts import SOURCES, build_source, pad_meta
from harvest.prompts.translation import DATA_DIR
from harvest.toy import build_tokenizer, stdlib_docstrings


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(stdlib_docstrings(limit=300), tmp_path_factory.mktemp("tok"), vocab_size=1024)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six .txt documents of varied length and a .jsonl of four more, under one base_dir."""
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_docstrings(limit=10)
    (root / "txt").mkdir()
    for i, doc in enumerate(docs[:6]):
        (root / "txt" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(docs[6:])]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return root


def build(tok, base_dir=".", **cfg):
    return build_source(cfg, base_dir=base_dir, tokenizer=tok)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def check_contract(source, prompts) -> None:
    """What the runner relies on: valid positions and meta that fits its declared fields."""
    fields = source.meta_fields()
    for p in prompts:
        assert p.positions == sorted(set(p.positions))
        assert all(0 <= q < len(p.input_ids) for q in p.positions)
        assert set(p.meta) == set(fields)
        for name, spec in fields.items():
            value = np.asarray(p.meta[name])
            assert value.ndim == len(spec.shape) and all(n <= m for n, m in zip(value.shape, spec.shape))
            assert np.array_equal(pad_meta(p.meta[name], spec), value)  # no overflow in the declared dtype
    resolved = source.resolved_config()
    assert set(resolved) == {"source", *type(source).DEFAULTS}
    json.dumps(resolved)
    json.dumps(source.fingerprint_inputs())


# --- text ---------------------------------------------------------------------------------------

TEXT = {"source": "text", "paths": ["txt/*.txt", "more.jsonl"], "text_field": "body"}


def doc_tokens(tok, source) -> list[list[int]]:
    return [encode(tok, d.text) for d in source.documents()]


def test_text_documents_sorted_by_path_then_line(tok, corpus):
    docs = list(build(tok, corpus, **TEXT).documents())
    assert [d.path for d in docs] == ["more.jsonl"] * 4 + [f"txt/doc{i}.txt" for i in range(6)]
    assert [d.line for d in docs[:4]] == [1, 2, 3, 4]
    assert docs[0].text == stdlib_docstrings(limit=10)[6]


@pytest.mark.parametrize("bos", [False, True])
def test_packed_windows_are_full_and_reproduce_the_stream(tok, corpus, bos):
    source = build(tok, corpus, **TEXT, seq_len=32, bos=bos)
    prompts = list(source.prompts())
    check_contract(source, prompts)
    body = 32 - bos
    stream, owner = [], []
    for i, ids in enumerate(doc_tokens(tok, source)):
        if i:
            stream.append(tok.eos_token_id)
            owner.append(i - 1)
        stream += ids
        owner += [i] * len(ids)
    assert prompts and all(len(p.input_ids) == 32 for p in prompts)
    if bos:
        assert all(p.input_ids[0] == tok.bos_token_id for p in prompts)
    joined = [t for p in prompts for t in p.input_ids[bos:]]
    assert joined == stream[: len(joined)] and len(stream) - len(joined) < body  # only a partial tail dropped
    assert [p.meta["doc_offset"] for p in prompts] == [k * body for k in range(len(prompts))]
    assert [p.meta["doc"] for p in prompts] == [owner[k * body] for k in range(len(prompts))]


def test_windowed_respects_documents_and_min_len(tok, corpus):
    source = build(tok, corpus, **TEXT, mode="windowed", seq_len=24, min_len=10)
    prompts = list(source.prompts())
    check_contract(source, prompts)
    docs = doc_tokens(tok, source)
    for p in prompts:
        ids, doc, offset = p.input_ids, p.meta["doc"], p.meta["doc_offset"]
        assert ids == docs[doc][offset : offset + len(ids)]  # never crosses into the next document
        assert len(ids) == 24 or (10 <= len(ids) and offset + len(ids) == len(docs[doc]))
    for doc, ids in enumerate(docs):
        kept = [p for p in prompts if p.meta["doc"] == doc]
        covered = sum(len(p.input_ids) for p in kept)
        assert covered == len(ids) or (len(ids) - covered < 10 and covered % 24 == 0)
    assert any(len(p.input_ids) < 24 for p in prompts)


def test_windowed_bos_counts_inside_seq_len(tok, corpus):
    prompts = list(build(tok, corpus, **TEXT, mode="windowed", seq_len=16, bos=True).prompts())
    assert all(p.input_ids[0] == tok.bos_token_id and len(p.input_ids) <= 16 for p in prompts)
    assert max(len(p.input_ids) for p in prompts) == 16


def test_text_limits_and_determinism(tok, corpus):
    cfg = {**TEXT, "seq_len": 16, "max_sequences": 5, "max_documents": 2}
    first, again = (list(build(tok, corpus, **cfg).prompts()) for _ in range(2))
    assert first == again and len(first) == 5
    assert len(list(build(tok, corpus, **cfg).documents())) == 2


def test_text_fingerprint_hashes_files_by_relative_path(tok, corpus, tmp_path):
    files = build(tok, corpus, **TEXT).fingerprint_inputs()["files"]
    assert sorted(files) == ["more.jsonl"] + [f"txt/doc{i}.txt" for i in range(6)]
    (tmp_path / "a.txt").write_text("one text", encoding="utf-8")
    before = build(tok, tmp_path, source="text", paths=["a.txt"]).fingerprint_inputs()
    (tmp_path / "a.txt").write_text("another text", encoding="utf-8")
    assert build(tok, tmp_path, source="text", paths=["a.txt"]).fingerprint_inputs() != before


def test_text_absolute_paths_work_from_any_base_dir(tok, corpus, tmp_path):
    source = build(tok, tmp_path, source="text", paths=[str(corpus / "txt" / "doc1.txt")])
    assert [d.path for d in source.documents()] == [(corpus / "txt" / "doc1.txt").as_posix()]


def test_jsonl_missing_field_is_named(tok, corpus):
    source = build(tok, corpus, source="text", paths=["more.jsonl"], text_field="bodu")
    with pytest.raises(SpecError, match=r"more\.jsonl:1 .*'bodu'.*did you mean 'body'"):
        list(source.prompts())


def test_glob_with_no_match_names_glob_and_base_dir(tok, corpus):
    with pytest.raises(SpecError, match=rf"'nothing/\*\.txt' matches no file .*{corpus}"):
        build(tok, corpus, source="text", paths=["nothing/*.txt"])


def test_unsupported_file_type_is_rejected(tok, tmp_path):
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    (tmp_path / "notes.md").write_text("# notes", encoding="utf-8")
    with pytest.raises(SpecError, match=r"notes\.md.*neither \.txt nor \.jsonl"):
        build(tok, tmp_path, source="text", paths=["*"])


# --- addition -----------------------------------------------------------------------------------

def test_addition_spans_decode_to_operands(tok):
    source = build(tok, source="addition", a=[0, 120], b=[7, 9999], sample=300)
    prompts = list(source.prompts())
    check_contract(source, prompts)
    for p in prompts:
        m, ids = p.meta, p.input_ids
        assert tok.decode(ids[slice(*m["a_span"])]).strip() == str(m["a"])
        assert tok.decode(ids[slice(*m["b_span"])]).strip() == str(m["b"])
        assert m["answer"] == m["a"] + m["b"]
        assert m["eq_pos"] == len(ids) - 1 and tok.decode(ids[-1:]) == "="
        assert p.positions == sorted({m["a_span"][1] - 1, m["b_span"][1] - 1, m["eq_pos"]})


def test_addition_full_grid_is_a_major(tok):
    prompts = list(build(tok, source="addition", a=[3, 5], b=[10, 11]).prompts())
    assert [(p.meta["a"], p.meta["b"]) for p in prompts] == [(a, b) for a in (3, 4, 5) for b in (10, 11)]
    assert tok.decode(prompts[0].input_ids) == "Output ONLY a number.\n3+10="


def test_addition_sample_is_seeded_and_without_duplicates(tok):
    def pairs(seed):
        source = build(tok, source="addition", a=[0, 999], b=[0, 999], sample=500, seed=seed)
        return [(p.meta["a"], p.meta["b"]) for p in source.prompts()]

    first = pairs(0)
    assert first == pairs(0) and len(set(first)) == 500 and first == sorted(first)
    assert first != pairs(1)


def test_addition_bos_shifts_spans(tok):
    plain = next(build(tok, source="addition").prompts())
    with_bos = next(build(tok, source="addition", bos=True).prompts())
    assert with_bos.input_ids == [tok.bos_token_id] + plain.input_ids
    assert with_bos.meta["a_span"] == [s + 1 for s in plain.meta["a_span"]]
    assert with_bos.positions == [q + 1 for q in plain.positions]


def test_addition_operands_merging_with_template_are_rejected(tok):
    with pytest.raises(SpecError, match="operand a .*shares a token"):
        build(tok, source="addition", template="{a}{b}=")


# --- translation --------------------------------------------------------------------------------

def test_translation_spans_decode_to_words(tok):
    source = build(tok, source="translation", n_prompts=40, bos=True)
    prompts = list(source.prompts())
    check_contract(source, prompts)
    assert len(prompts) == 120 and [p.meta["pair"] for p in prompts] == [0] * 40 + [1] * 40 + [2] * 40
    for p in prompts:
        words = source.lists[p.meta["pair"]].words
        assert len(set(p.meta["word_ids"])) == 4
        for j, word_id in enumerate(p.meta["word_ids"]):
            src, tgt = words[word_id]
            assert tok.decode(p.input_ids[slice(*p.meta["src_span"][j])]).strip() == src
            assert tok.decode(p.input_ids[slice(*p.meta["tgt_span"][j])]).strip() == tgt
            first = p.meta["tgt_span"][j][0]
            assert first in p.positions and first - 1 in p.positions
        assert len(p.positions) <= 8


def test_translation_prompt_text(tok):
    p = next(build(tok, source="translation", pairs=["en-de"], words_per_prompt=2).prompts())
    de = dict((DATA_DIR / "en-de.tsv").read_text(encoding="utf-8").splitlines()[i].split("\t")
              for i in p.meta["word_ids"])
    src, tgt = zip(*de.items())
    assert tok.decode(p.input_ids) == f"English: {' '.join(src)}\nGerman: {' '.join(tgt)}"


def test_translation_pairs_are_independent_of_each_other(tok):
    alone = list(build(tok, source="translation", pairs=["en-es"], n_prompts=5).prompts())
    mixed = list(build(tok, source="translation", pairs=["en-fr", "en-es"], n_prompts=5).prompts())[5:]
    assert [p.input_ids for p in alone] == [p.input_ids for p in mixed]
    again = list(build(tok, source="translation", pairs=["en-es"], n_prompts=5).prompts())
    assert alone == again


@pytest.mark.parametrize("path", sorted(DATA_DIR.glob("*.tsv")), ids=lambda p: p.name)
def test_shipped_word_lists(path):
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(len(r) == 2 for r in rows)
    assert len({tuple(r) for r in rows}) == len(rows) >= 150
    for column in zip(*rows):
        assert len(set(column)) == len(column)  # one translation per word keeps alignments unambiguous
        assert all(w == w.lower() and w.isalpha() for w in column)


def test_shipped_pairs_are_the_three_defaults():
    assert {p.stem for p in DATA_DIR.glob("*.tsv")} >= {"en-fr", "en-de", "en-es"}


def test_extra_word_lists_with_language_names(tok, tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "en-it.tsv").write_text("cat\tgatto\ndog\tcane\nhouse\tcasa\n", encoding="utf-8")
    (tmp_path / "lists" / "en-xx.tsv").write_text("cat\tkat\ndog\tdog\n", encoding="utf-8")
    source = build(tok, tmp_path, source="translation", pairs=["en-it", "en-xx"], word_lists="lists",
                   words_per_prompt=2, n_prompts=3, language_names={"xx": "Testish"})
    prompts = list(source.prompts())
    assert "Testish:" in tok.decode(prompts[-1].input_ids)
    assert source.fingerprint_inputs()["word_lists"]["en-it"]["path"] == "lists/en-it.tsv"
    with pytest.raises(SpecError, match="no display name for language 'xx'"):
        build(tok, tmp_path, source="translation", pairs=["en-xx"], word_lists="lists", words_per_prompt=2)


def test_bad_word_list_line_is_named(tok, tmp_path):
    (tmp_path / "en-fr.tsv").write_text("cat\tchat\npotato\tpomme de terre\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"en-fr\.tsv:2: 'potato\\tpomme de terre'"):
        build(tok, tmp_path, source="translation", word_lists=".")


# --- every source -------------------------------------------------------------------------------

def test_sources_are_deterministic(tok, corpus):
    for cfg in ({**TEXT, "seq_len": 20}, {"source": "addition", "sample": 50, "seed": 3},
                {"source": "translation", "n_prompts": 20}):
        assert list(build(tok, corpus, **cfg).prompts()) == list(build(tok, corpus, **cfg).prompts())


def test_resolved_config_fills_defaults(tok):
    source = build(tok, source="addition", a=[1, 2])
    assert source.resolved_config() == {"source": "addition", **SOURCES["addition"].DEFAULTS, "a": [1, 2]}


@pytest.mark.parametrize("cfg, message", [
    ({"source": "additon"}, r"'additon' is not a prompt source \(did you mean 'addition'\?\); valid sources: "
                            r"text, addition, translation"),
    ({}, r"section 'prompts' needs a 'source', one of: text, addition, translation"),
    ({"source": "addition", "sed": 1}, r"unknown key 'sed' in prompts \(did you mean 'seed'\?\)"),
    ({"source": "addition", "a": [5, 1]}, r"prompts.a = \[5, 1\]: must be \[lo, hi\].*0 <= lo <= hi"),
    ({"source": "addition", "b": [0, "9"]}, r"prompts.b = \[0, '9'\]"),
    ({"source": "addition", "template": "{b}+2="}, r"prompts.template = '\{b\}\+2=': must contain \{a\} exactly once"),
    ({"source": "addition", "template": "{a}+{c}="}, r"placeholder \{c\} is not one of \{a\}, \{b\}"),
    ({"source": "addition", "template": "{a}+{b}"}, r"must end with text after the last operand"),
    ({"source": "addition", "a": [0, 9], "b": [0, 9], "sample": 101}, r"prompts.sample = 101: must be an integer "
                                                                      r"between 1 and 100 or null"),
    ({"source": "addition", "bos": "yes"}, r"prompts.bos = 'yes': must be true or false"),
    ({"source": "translation", "pairs": ["en-fx"]}, r"no word list for 'en-fx' \(did you mean 'en-fr'\?\); "
                                                    r"available: en-de, en-es, en-fr"),
    ({"source": "translation", "words_per_prompt": 0}, r"prompts.words_per_prompt = 0: must be an integer between 1"),
    ({"source": "text", "paths": ["a.txt"], "seq_len": "128"}, r"prompts.seq_len = '128': must be an integer >= 1"),
    ({"source": "text", "paths": ["a.txt"], "mode": "pack"}, r"prompts.mode = 'pack': must be one of packed, "
                                                             r"windowed \(did you mean 'packed'\?\)"),
    ({"source": "text", "paths": ["a.txt"], "min_len": 200}, r"prompts.min_len = 200: must be an integer "
                                                             r"between 1 and 128"),
    ({"source": "text", "paths": "a.txt"}, r"prompts.paths = 'a.txt': must be a non-empty list"),
])
def test_errors_name_the_problem(tok, cfg, message):
    with pytest.raises(SpecError, match=message):
        build(tok, **cfg)
