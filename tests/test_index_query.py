"""The per-dimension index against NumPy, and `harvest query dim`: answers, errors, speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from analysis.index import build_index
from analysis.outliers import analyze_outliers
from analysis.query import format_query, query_dim
from analysis.scan import ScanParams
from analysis.synthetic import plant_residual_dim, planted_store, write_store
from harvest.errors import (AnalysisError, DimensionOutOfRangeError, HarvestError, HookNotInStoreError,
                            IndexNotBuiltError)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tokenizer_dir):
    """The planted store, analysed (outliers + index in one pass)."""
    path = tmp_path_factory.mktemp("indexed") / "planted.zarr"
    truth = planted_store(path, n_seq=3, tokenizer_dir=tokenizer_dir)
    analyze_outliers(path, ScanParams(block_mib=1, top_k=16), plots=False)
    return path, truth


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_index_matches_numpy(indexed):
    path, _ = indexed
    g = zarr.open_group(str(path), mode="r")
    meta = dict(g["analysis/index"].attrs["index"])
    assert meta["top_k"] == 16 and meta["threshold"] == 6.0
    assert set(meta["templates"]) == {"ln1.hook_normalized", "hook_resid_post"}
    seq, pos = g["seq"][...], g["pos"][...]
    for template, t in meta["templates"].items():
        idx = g[f"analysis/index/{template}"]
        assert tuple(idx["mean"].metadata.dimension_names) == ("layer", "dim")
        for i, name in enumerate(t["hooks"][:: max(1, len(t["hooks"]) // 5)]):
            i = t["hooks"].index(name)
            x = g[name][...].astype(np.float64)
            np.testing.assert_array_equal(idx["count"][i], np.full(x.shape[1], x.shape[0]))
            np.testing.assert_allclose(idx["mean"][i], x.mean(axis=0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(idx["std"][i], x.std(axis=0), rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(idx["max_abs"][i], np.abs(x).max(axis=0).astype(np.float32))
            np.testing.assert_array_equal(idx["count_ge"][i], (np.abs(x) >= 6.0).sum(axis=0))
            ref = np.argsort(-np.abs(x), axis=0, kind="stable")[:16]
            np.testing.assert_array_equal(idx["top_rows"][i], ref)
            np.testing.assert_array_equal(idx["top_values"][i], np.take_along_axis(x, ref, 0).astype(np.float32))
            np.testing.assert_array_equal(idx["top_seq"][i], seq[ref])
            np.testing.assert_array_equal(idx["top_pos"][i], pos[ref])


def test_query_shows_the_outlier_its_statistics_and_contexts(indexed, tokenizer):
    path, truth = indexed
    q = query_dim(path, truth["A"], top=5, context=3)
    assert q["template"] == "ln1.hook_normalized" and len(q["layers"]) == 28
    assert q["outlier"]["is_outlier"] and q["outlier"]["why"].startswith("outlier: |x| >= 6 in 100% of layers")
    assert q["outlier"]["layers_affected"] == list(range(28))
    assert all(r["count_ge"] == 384 * 3 and r["max_abs"] == 20 for r in q["layers"])
    assert [r["ln1_w"] for r in q["layers"]] == pytest.approx([1 + 0.01 * x for x in range(28)])
    g = zarr.open_group(str(path), mode="r")
    ids = g["input_ids"][...]
    items = q["examples"]["items"]
    assert len(items) == 5 and all(it["value"] == -20 for it in items)
    for it in items:
        line = ids[it["seq"]]
        assert it["pos"] in truth["pos_a"] and it["token_id"] == line[it["pos"]]
        assert it["token"] == tokenizer.decode([int(line[it["pos"]])])
        assert it["left"] == tokenizer.decode([int(t) for t in line[max(0, it["pos"] - 3):it["pos"]]])
    text = format_query(q)
    assert "[[" in text and "outlier: |x| >= 6" in text and "ln1.w" in text


def test_query_says_why_a_near_miss_is_not_an_outlier(indexed):
    path, truth = indexed
    assert "only 21.4% of layers" in query_dim(path, truth["B"])["outlier"]["why"]
    assert "at only 2.93% of positions" in query_dim(path, truth["C"])["outlier"]["why"]
    assert "max |x| is 5.9 < 6" in query_dim(path, truth["D"])["outlier"]["why"]


def test_query_hook_and_layer(indexed):
    path, truth = indexed
    dim = truth["massive_dim"]
    q = query_dim(path, dim, hook="resid_post", layer=1, top=3)
    assert [r["layer"] for r in q["layers"]] == [1]
    assert q["examples"]["layer"] == 1 and [it["value"] for it in q["examples"]["items"]] == [2000] * 3
    assert all(it["pos"] == 0 for it in q["examples"]["items"])
    same = query_dim(path, dim, hook="blocks.1.hook_resid_post", top=3)
    assert same["examples"]["items"] == q["examples"]["items"]
    # without --layer, the examples come from the layer where |x| peaks
    assert query_dim(path, dim, hook="hook_resid_post")["examples"]["layer"] == 1
    with pytest.raises(AnalysisError, match="names layer 1 but --layer is 2"):
        query_dim(path, dim, hook="blocks.1.hook_resid_post", layer=2)


def test_query_errors_are_clear(indexed, tmp_path):
    path, _ = indexed
    with pytest.raises(DimensionOutOfRangeError, match=r"dimension 256 is out of range .* 256 dims \(0\.\.255"):
        query_dim(path, 256)
    with pytest.raises(HookNotInStoreError, match=r"hook 'post' \(mlp.hook_post\) was not harvested into .*; it holds: "
                                                  r"ln1.hook_normalized \(layers 0-27\), hook_resid_post \(layers 0-3\)"):
        query_dim(path, 3, hook="post")
    with pytest.raises(HookNotInStoreError, match="did you mean 'hook_resid_post'"):
        query_dim(path, 3, hook="hook_resid_pots")
    with pytest.raises(HookNotInStoreError, match="layer 7 of hook_resid_post is not in the store's index; "
                                                  "indexed layers: 0-3"):
        query_dim(path, 3, hook="resid_post", layer=7)
    write_store(tmp_path / "bare.zarr", ["blocks.0.hook_resid_post"], [10], 8, lambda n, lo, hi: np.ones((hi - lo, 8)))
    with pytest.raises(IndexNotBuiltError, match=r"no per-dimension index yet; build it with `harvest index "
                                                 r".*bare.zarr`"):
        query_dim(tmp_path / "bare.zarr", 0)
    assert issubclass(IndexNotBuiltError, HarvestError) and issubclass(DimensionOutOfRangeError, IndexError)


def test_query_reads_only_the_index(indexed):
    """With every activation array moved away the query still answers: it never reads the data.

    Its latency is measured by bench/outlier_scan.py, not asserted here."""
    path, truth = indexed
    query_dim(path, truth["A"])  # warm the imports
    aside = path.parent / "aside"
    aside.mkdir(exist_ok=True)
    moved = [p for p in path.iterdir() if p.name.startswith("blocks.")]
    for p in moved:
        shutil.move(str(p), aside / p.name)
    try:
        q = query_dim(path, truth["A"], top=10)
        assert len(q["examples"]["items"]) == 10
    finally:
        for p in moved:
            shutil.move(str(aside / p.name), p)


def test_harvest_index_command(tmp_path):
    from typer.testing import CliRunner

    from harvest.cli import app

    rng = np.random.default_rng(3)
    data = rng.standard_normal((150, 2, 8)).astype(np.float32)
    path = write_store(tmp_path / "z.zarr", ["blocks.0.hook_resid_post"], [100, 50], 16,
                       lambda n, lo, hi: data.reshape(150, 16)[lo:hi], chunk_rows=32)
    res = CliRunner().invoke(app, ["index", str(path), "--top-k", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top_k"] == 4
    q = query_dim(path, 5, top=10)
    assert len(q["examples"]["items"]) == 4  # capped at the index's top-k
    assert q["layers"][0]["max_abs"] == pytest.approx(np.abs(data.reshape(150, 16)[:, 5]).max())
    summary = build_index(path, top_k=2, threshold=1.0)
    assert summary["threshold"] == 1.0
    g = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(g["analysis/index/hook_resid_post/count_ge"][0],
                                  (np.abs(data.reshape(150, 16)) >= 1.0).sum(axis=0))


def test_cli_query_end_to_end_on_a_harvested_gptj(make_checkpoint, make_spec, tmp_path):
    """Edited GPT-J -> `harvest run` -> analyse -> `python -m harvest query dim` in a subprocess."""
    from harvest.runner import run

    dim = 21
    ckpt = plant_residual_dim(make_checkpoint("gptj"), tmp_path / "gptj-edited", "gptj", dim)
    path = run(make_spec(ckpt, hooks=["hook_embed", "blocks.*.hook_resid_post"]), progress=False).path
    rep = analyze_outliers(path, plots=False)
    assert rep.outlier_dims == [dim]
    cmd = [sys.executable, "-m", "harvest", "query", "dim", str(path), str(dim), "--top", "3", "--context", "4"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)
    stored = zarr.open_group(str(path), mode="r")
    planted = np.abs(stored["blocks.2.hook_resid_post"][:, dim]).max()
    assert q["template"] == "hook_resid_post" and q["outlier"]["is_outlier"]
    assert q["examples"]["items"][0]["value"] == pytest.approx(max(r["max_abs"] for r in q["layers"]))
    assert 0.9 < q["examples"]["items"][0]["value"] < 1.3 and 0.9 < planted < 1.3  # the planted +1 bias
    assert all(it["token"] and it["left"] is not None for it in q["examples"]["items"])
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "outlier: |x| >= 6" in text.stdout and "[[" in text.stdout
    bad = subprocess.run(cmd[:6] + ["999"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: dimension 999 is out of range")
    assert len(bad.stderr.strip().splitlines()) == 1
