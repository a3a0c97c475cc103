"""Translation-head analysis on planted stores whose ground truth is known by construction.

The planted stores are written with plain zarr in the harvest store schema: attention patterns
(sequence, head, query, key), ``seq_length``, ``input_ids`` and the translation source's spans.
Heads (layer 1): 0 puts 0.8 on the aligned source word from p_j − 1 ("next"), 1 does it from p_j
("cur"), 2 is a previous-token head, 3 an induction head, 4 attends uniformly. Layer 0 is uniform.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import zarr

from analysis import translation_heads as th
from harvest.errors import AnalysisError
from harvest.store import write_provenance

N_HEADS, NEXT, CUR, PREV, INDUCTION, UNIFORM = 5, 0, 1, 2, 3, 4
SRC_NAME, SRC_SEP, TGT_NAME, TGT_SEP = 1, 2, 3, 4  # distinct separators: nothing for induction to copy


def uniform_row(q: int, n_k: int) -> np.ndarray:
    row = np.zeros(n_k)
    row[: q + 1] = 1.0 / (q + 1)
    return row


def focus_row(q: int, n_k: int, keys: list[int], mass: float) -> np.ndarray:
    """``mass`` spread over ``keys``, the rest uniform over every key <= q."""
    row = (1 - mass) * uniform_row(q, n_k)
    row[keys] += mass / len(keys)
    return row


def planted_pattern(ids: list[int], src: list[list[int]] | None, tgt: list[list[int]] | None, n_k: int) -> np.ndarray:
    """(head, query, key) for one sequence, following each head's rule."""
    n = len(ids)
    out = np.zeros((N_HEADS, n_k, n_k))
    for q in range(n):
        for h in range(N_HEADS):
            out[h, q] = uniform_row(q, n_k)
        if q >= 1:
            out[PREV, q] = focus_row(q, n_k, [q - 1], 0.9)
        matches = [k for k in range(1, q) if ids[k - 1] == ids[q]]
        if matches:
            out[INDUCTION, q] = focus_row(q, n_k, matches, 0.9)
    for j, (start, _) in enumerate(tgt or []):
        span = list(range(*src[j]))
        out[NEXT, start - 1] = focus_row(start - 1, n_k, span, 0.8)
        out[CUR, start] = focus_row(start, n_k, span, 0.8)
    return out


def translation_prompts(n: int, words: int, rng) -> list[tuple[list[int], list[list[int]], list[list[int]]]]:
    """Token ids with source words of 1-2 tokens and target words of 1-2 tokens, and their spans."""
    prompts = []
    for _ in range(n):
        ids, src, tgt = [0, SRC_NAME, SRC_SEP], [], []
        for _ in range(words):
            length = int(rng.integers(1, 3))
            src.append([len(ids), len(ids) + length])
            ids += rng.integers(10, 60, length).tolist()
        ids += [TGT_NAME, TGT_SEP]
        for _ in range(words):
            length = int(rng.integers(1, 3))
            tgt.append([len(ids), len(ids) + length])
            ids += rng.integers(60, 110, length).tolist()
        prompts.append((ids, src, tgt))
    return prompts


def write_store(path, prompts, source: str, layers=(0, 1), heads=None) -> str:
    """A harvest-schema store holding planted patterns (layer 0 uniform, the last layer planted)."""
    n_k = max(len(p[0]) for p in prompts)
    group = zarr.open_group(str(path), mode="w")
    write_provenance(group, {"prompts": {"source": source}, "selection": {"heads": heads}, "fingerprint": "test",
                             "hooks": [f"blocks.{layer}.attn.hook_pattern" for layer in layers]})
    ids = np.full((len(prompts), n_k), -1, np.int32)
    lengths = np.array([len(p[0]) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p[0])] = p[0]
    group.create_array("input_ids", data=ids, dimension_names=("sequence", "position"))
    group.create_array("seq_length", data=lengths, dimension_names=("sequence",))
    planted = np.stack([planted_pattern(*p, n_k) for p in prompts]).astype(np.float32)
    chosen = list(range(N_HEADS)) if heads is None else heads
    for layer in layers:
        data = planted if layer == layers[-1] else np.stack(
            [np.stack([[uniform_row(q, n_k) if q < len(p[0]) else np.zeros(n_k) for q in range(n_k)]] * N_HEADS)
             for p in prompts]).astype(np.float32)
        group.create_array(f"blocks.{layer}.attn.hook_pattern", data=np.ascontiguousarray(data[:, chosen]),
                           chunks=(7, len(chosen), n_k, n_k), dimension_names=("sequence", "head", "query", "key"))
    if source == "translation":
        meta = group.require_group("meta")
        meta.create_array("src_span", data=np.array([p[1] for p in prompts], np.int32),
                          dimension_names=("sequence", "word", "bound"))
        meta.create_array("tgt_span", data=np.array([p[2] for p in prompts], np.int32),
                          dimension_names=("sequence", "word", "bound"))
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("planted")
    prompts = translation_prompts(40, 4, rng)
    text = [(rng.integers(10, 110, 30).tolist(), None, None) for _ in range(20)]
    repeated = []
    for _ in range(20):
        block = rng.integers(10, 110, 12).tolist()
        repeated.append(([0, *block, *block], None, None))
    return {
        "translation": write_store(root / "translation.zarr", prompts, "translation"),
        "text": write_store(root / "text.zarr", text, "text"),
        "repeated": write_store(root / "repeated.zarr", repeated, "repeated_tokens"),
        "prompts": prompts, "root": root,
    }


@pytest.fixture(scope="module")
def result(stores):
    return th.analyze(stores["translation"], text=stores["text"], repeated=stores["repeated"])


def score(result, name: str, layer: int, head: int) -> float:
    return float(result.scores[name][list(result.layers).index(layer), list(result.heads).index(head)])


def test_next_head_tops_ts_next(result):
    ranked = result.ranked("ts_next_delta")
    assert (ranked[0]["layer"], ranked[0]["head"]) == (1, NEXT)
    assert ranked[0]["ts_next_delta"] > 0.7
    assert ranked[0]["ts_next_z"] > 10
    assert all(r["ts_next_delta"] < 0.05 for r in ranked[1:])
    assert score(result, "ts_next_last_delta", 1, NEXT) > 0.3  # part of the 0.8 lands on the last token


def test_cur_head_tops_ts_cur_only(result):
    ranked = result.ranked("ts_cur_delta")
    assert (ranked[0]["layer"], ranked[0]["head"]) == (1, CUR)
    assert ranked[0]["ts_cur_delta"] > 0.7
    assert score(result, "ts_next_delta", 1, CUR) < 0.05
    assert score(result, "ts_cur_delta", 1, NEXT) < 0.05


def test_controls_tell_previous_token_and_induction_heads_apart(result):
    assert score(result, "prev_token", 1, PREV) > 0.85
    assert score(result, "prefix_matching", 1, INDUCTION) > 0.85
    for head in (PREV, INDUCTION, UNIFORM):
        for name in ("ts_next_delta", "ts_cur_delta"):
            assert abs(score(result, name, 1, head)) < 0.05, (head, name)
    for head in (NEXT, CUR, UNIFORM):
        assert score(result, "prev_token", 1, head) < 0.3
        assert score(result, "prefix_matching", 1, head) < 0.3
    roles = {(r["layer"], r["head"]): r["role"] for r in result.ranked()}
    assert roles[(1, NEXT)] == "translation(next)"
    assert roles[(1, CUR)] == "translation(cur)"
    assert roles[(1, PREV)] == "previous-token"
    assert roles[(1, INDUCTION)] == "induction"
    assert roles[(0, 0)] == "-"


def test_every_head_falls_to_chance_when_the_alignment_is_permuted(stores, tmp_path):
    """Pair each target word with a random other source word of its prompt (a random derangement)."""
    rng = np.random.default_rng(1)
    permuted = []
    for ids, src, tgt in stores["prompts"]:
        while True:
            perm = rng.permutation(len(src))
            if np.all(perm != np.arange(len(src))):
                break
        permuted.append((ids, [src[i] for i in perm], tgt))
    path = write_store(tmp_path / "permuted.zarr", stores["prompts"], "translation")
    zarr.open_group(path + "/meta", mode="r+")["src_span"][...] = np.array([p[1] for p in permuted], np.int32)
    res = th.analyze(path, write=False, plot=False)
    chance = score(res, "ts_next", 1, UNIFORM)
    for name in ("ts_next", "ts_cur", "ts_next_last", "ts_cur_last"):
        assert np.all(res.scores[name + "_delta"] < 0.1), name
    # the planted heads' 0.8 now lands on "other" words: at or below what uniform attention gets
    assert score(res, "ts_next", 1, NEXT) < chance + 0.02  # was > 0.8
    assert score(res, "ts_cur", 1, CUR) < score(res, "ts_cur", 1, UNIFORM) + 0.02


def test_baseline_is_the_mean_score_over_all_derangements(stores):
    """The reported baseline equals the score averaged over every permutation with no fixed point."""
    group = zarr.open_group(stores["translation"], mode="r")
    pattern, lengths = group["blocks.1.attn.hook_pattern"][:4], group["seq_length"][:4]
    src, tgt = group["meta/src_span"][:4], group["meta/tgt_span"][:4]
    base = th.translation_block(pattern, src, tgt, lengths)[..., 1]
    derangements = [p for p in itertools.permutations(range(4)) if all(p[i] != i for i in range(4))]
    permuted = np.mean([th.translation_block(pattern, src[:, list(p)], tgt, lengths)[..., 0] for p in derangements],
                       axis=0)
    assert len(derangements) == 9
    np.testing.assert_allclose(permuted, base, atol=1e-6)


def test_scores_match_a_loop_over_prompts(stores):
    """The vectorised block function against the definition, prompt by prompt."""
    group = zarr.open_group(stores["translation"], mode="r")
    pattern = group["blocks.1.attn.hook_pattern"][:5]
    src, tgt = group["meta/src_span"][:5], group["meta/tgt_span"][:5]
    lengths = group["seq_length"][:5]
    got = th.translation_block(pattern, src, tgt, lengths)
    for s in range(5):
        for h in range(N_HEADS):
            for m, (offset, kind) in enumerate(th.TRANSLATION_SCORES.values()):
                scores, bases = [], []
                for j in range(4):
                    q = tgt[s, j, 0] + offset
                    mass = [pattern[s, h, q, (src[s, w, 0] if kind == "span" else src[s, w, 1] - 1):src[s, w, 1]].sum()
                            for w in range(4)]
                    scores.append(mass[j])
                    bases.append(np.mean([mass[w] for w in range(4) if w != j]))
                assert got[s, h, m, 0] == pytest.approx(np.mean(scores), abs=1e-6)
                assert got[s, h, m, 1] == pytest.approx(np.mean(bases), abs=1e-6)


def test_control_scores_match_a_loop(stores):
    group = zarr.open_group(stores["repeated"], mode="r")
    pattern, ids, lengths = group["blocks.1.attn.hook_pattern"][:3], group["input_ids"][:3], group["seq_length"][:3]
    got = th.control_block(pattern, ids, lengths)
    for s in range(3):
        n = lengths[s]
        for h in range(N_HEADS):
            prev = np.mean([pattern[s, h, i, i - 1] for i in range(1, n)])
            eligible = [(i, [k for k in range(1, i) if ids[s, k - 1] == ids[s, i]]) for i in range(n)]
            prefix = np.mean([pattern[s, h, i, ks].sum() for i, ks in eligible if ks])
            assert got[s, h, 0] == pytest.approx(prev, abs=1e-6)
            assert got[s, h, 1] == pytest.approx(prefix, abs=1e-6)


def test_results_are_written_back_with_dims_and_parameters(result, stores):
    group = zarr.open_group(stores["translation"] + "/analysis/translation_heads", mode="r")
    assert group["ts_next_delta"].metadata.dimension_names == ("layer", "head")
    assert group["per_prompt/ts_next_delta"].metadata.dimension_names == ("sequence", "layer", "head")
    assert np.allclose(group["ts_next_delta"][...], result.scores["ts_next_delta"], equal_nan=True)
    params = group.attrs["params"]
    assert params["n_prompts"] == 40 and params["prefix_matching_offset"].startswith("+1")
    assert result.figure.is_file() and result.figure.stat().st_size > 1000
    json.dumps(result.to_dict(top=3))
    table = result.table(top=3)
    assert "translation(next)" in table.splitlines()[2]
    # a rerun replaces the group instead of failing or mixing runs
    th.analyze(stores["translation"], plot=False)


def test_head_subset_is_labelled_with_model_head_indices(tmp_path):
    rng = np.random.default_rng(2)
    path = write_store(tmp_path / "sub.zarr", translation_prompts(10, 3, rng), "translation", heads=[0, 3])
    res = th.analyze(path, write=False, plot=False)
    assert res.heads.tolist() == [0, 3]
    assert res.ranked()[0]["head"] == 0
    with pytest.raises(AnalysisError, match="same capture.heads"):
        th.analyze(path, text=write_store(tmp_path / "t.zarr", [(list(range(10, 30)), None, None)], "text"),
                   write=False, plot=False)


def test_errors_name_the_fix(tmp_path, stores):
    with pytest.raises(AnalysisError, match="harvest the translation source"):
        th.analyze(stores["text"], write=False, plot=False)
    group = zarr.open_group(str(tmp_path / "nopat.zarr"), mode="w")
    write_provenance(group, {"prompts": {"source": "translation"}})
    meta = group.require_group("meta")
    meta.create_array("src_span", data=np.zeros((1, 1, 2), np.int32))
    meta.create_array("tgt_span", data=np.zeros((1, 1, 2), np.int32))
    with pytest.raises(AnalysisError, match=r"blocks\.\*\.attn\.hook_pattern"):
        th.analyze(tmp_path / "nopat.zarr", write=False, plot=False)
    with pytest.raises(AnalysisError, match="cannot sort by"):
        th.analyze(stores["translation"], write=False, plot=False).ranked("nope")


def test_cli_prints_the_ranked_table_and_json(stores):
    from typer.testing import CliRunner

    from analysis.cli import analyze_app as app

    runner = CliRunner()
    out = runner.invoke(app, ["translation-heads", stores["translation"], "--text", stores["text"],
                              "--repeated", stores["repeated"], "--top", "3", "--no-write", "--no-plots"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "TS_next" in lines[1] and "translation(next)" in lines[3]
    out = runner.invoke(app, ["translation-heads", stores["translation"], "--json", "--top", "2", "--no-write", "--no-plots",
                              "--sort", "ts_cur_delta"])
    assert out.exit_code == 0, out.output
    heads = json.loads(out.output)["heads"]
    assert [(h["layer"], h["head"]) for h in heads][0] == (1, CUR) and len(heads) == 2
