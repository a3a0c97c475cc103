"""The ``numbers`` and ``repeated_tokens`` prompt sources: exact token bookkeeping, errors, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harvest.errors import SpecError
from harvest.prompts import SOURCES, build_source, pad_meta
from harvest.toy import build_tokenizer, stdlib_docstrings
from organisms.common import word_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(stdlib_docstrings(limit=300), tmp_path_factory.mktemp("tok"), vocab_size=1024)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    return word_tokenizer(["+", "=", *(str(n) for n in range(200))], tmp_path_factory.mktemp("wtok"))


def build(tok, **cfg):
    return build_source(cfg, base_dir=".", tokenizer=tok)


def check_contract(source, prompts) -> None:
    fields = source.meta_fields()
    for p in prompts:
        assert p.positions == sorted(set(p.positions))
        assert all(0 <= q < len(p.input_ids) for q in p.positions)
        assert set(p.meta) == set(fields)
        for name, spec in fields.items():
            assert np.array_equal(pad_meta(p.meta[name], spec), np.asarray(p.meta[name]))
    assert set(source.resolved_config()) == {"source", *type(source).DEFAULTS}
    json.dumps(source.resolved_config())
    json.dumps(source.fingerprint_inputs())


# --- numbers ----------------------------------------------------------------------------------------

def test_numbers_default_range_and_spans(tok):
    source = build(tok, source="numbers")
    prompts = list(source.prompts())
    check_contract(source, prompts)
    assert [p.meta["n"] for p in prompts] == list(range(300))
    for p in prompts:
        start, end = p.meta["n_span"]
        assert p.input_ids[0] == tok.bos_token_id  # bos: true by default
        assert tok.decode(p.input_ids[start:end]).strip() == str(p.meta["n"])
        assert p.positions == [end - 1]
        assert p.input_ids[1:] == tok(f" {p.meta['n']}", add_special_tokens=False)["input_ids"]


def test_numbers_multi_token_numbers_are_located_whole(tok):
    source = build(tok, source="numbers", range=[95, 1234], template="x = {n};", bos=False)
    lengths = {p.meta["n_span"][1] - p.meta["n_span"][0] for p in source.prompts()}
    assert max(lengths) > 1  # the toy BPE splits some numbers
    for p in source.prompts():
        start, end = p.meta["n_span"]
        assert tok.decode(p.input_ids[start:end]).strip() == str(p.meta["n"])


def test_numbers_single_tokens_with_a_word_level_tokenizer(word_tok):
    source = build(word_tok, source="numbers", range=[0, 199])
    prompts = list(source.prompts())
    assert all(p.meta["n_span"] == [1, 2] for p in prompts)
    assert [p.input_ids[1] for p in prompts] == [word_tok.convert_tokens_to_ids(str(n)) for n in range(200)]


def test_numbers_registered():
    assert SOURCES["numbers"].NAME == "numbers"
    assert SOURCES["repeated_tokens"].NAME == "repeated_tokens"


@pytest.mark.parametrize("cfg, message", [
    ({"range": [5, 1]}, r"prompts.range = \[5, 1\]: must be \[lo, hi\]"),
    ({"range": 7}, r"prompts.range = 7: must be \[lo, hi\]"),
    ({"template": "no number"}, r"must contain \{n\} exactly once \(found 0\)"),
    ({"template": "{n}{a}"}, r"placeholder \{a\} is not one of \{n\}"),
    ({"template": " {n}0"}, r"shares a token with the text around it"),
    ({"rnage": [0, 1]}, r"unknown key 'rnage' in prompts \(did you mean 'range'\?\)"),
])
def test_numbers_errors_name_the_problem(tok, cfg, message):
    with pytest.raises(SpecError, match=message):
        build(tok, source="numbers", **cfg)


# --- repeated tokens ------------------------------------------------------------------------------

def test_repeated_tokens_repeat_exactly(tok):
    source = build(tok, source="repeated_tokens", n_prompts=5, length=7, repeats=3, vocab=[10, 40], seed=3)
    prompts = list(source.prompts())
    check_contract(source, prompts)
    assert len(prompts) == 5
    for p in prompts:
        ids = p.input_ids
        assert ids[0] == tok.bos_token_id and len(ids) == 1 + 21
        assert ids[1:8] == ids[8:15] == ids[15:22]
        assert all(10 <= t < 40 for t in ids[1:])
        assert p.positions == list(range(8, 22))
        assert p.meta == {"period": 7, "start": 1}
    again = [p.input_ids for p in build(tok, source="repeated_tokens", n_prompts=5, length=7, repeats=3,
                                        vocab=[10, 40], seed=3).prompts()]
    assert again == [p.input_ids for p in prompts]


def test_repeated_tokens_default_vocab_skips_special_tokens(tok):
    source = build(tok, source="repeated_tokens", n_prompts=50, bos=False)
    ids = np.concatenate([p.input_ids for p in source.prompts()])
    assert tok.bos_token_id not in set(ids.tolist())


@pytest.mark.parametrize("cfg, message", [
    ({"vocab": [5, 5]}, r"must be \[lo, hi\) token ids"),
    ({"vocab": [0, 10**6]}, r"must be \[lo, hi\) token ids with 0 <= lo < hi <= 1024"),
    ({"vocab": [3, 4]}, r"fewer than two token ids"),
    ({"repeats": 1}, r"must be an integer >= 2"),
])
def test_repeated_tokens_errors(tok, cfg, message):
    with pytest.raises(SpecError, match=message):
        build(tok, source="repeated_tokens", **cfg)


# --- end to end through the runner ------------------------------------------------------------------

def test_numbers_and_repeated_tokens_harvest_end_to_end(neox_ckpt, make_spec, tmp_path):
    import zarr

    from harvest.runner import run
    from harvest.spec import parse_spec

    def spec(prompts, **sections):
        raw = make_spec(neox_ckpt, raw=True, **sections)
        raw["prompts"] = prompts
        return parse_spec(raw, base_dir=tmp_path)

    result = run(spec({"source": "numbers", "range": [0, 40]}, capture={"positions": "source",
                                                                        "hooks": ["blocks.1.hook_resid_post"]}),
                 progress=False)
    group = zarr.open_group(str(result.path), mode="r")
    assert group["meta/n"][...].tolist() == list(range(41))
    assert group["blocks.1.hook_resid_post"].shape[0] == 41
    assert np.array_equal(group["pos"][...], group["meta/n_span"][:, 1] - 1)

    result = run(spec({"source": "repeated_tokens", "n_prompts": 4, "length": 6},
                      capture={"hooks": ["blocks.0.attn.hook_pattern"], "positions": "last"},
                      store={"path": "rep.zarr"}), progress=False)
    group = zarr.open_group(str(result.path), mode="r")
    ids = group["input_ids"][...]
    assert np.array_equal(ids[:, 1:7], ids[:, 7:13])
    assert group["blocks.0.attn.hook_pattern"].shape == (4, 4, 13, 13)
