"""Issue 16 item 7: NaN/inf (a store harvested with ``on_nonfinite: flag``) are counted, left out of every
statistic, and reported with where they are; a layer with no finite value is reported as such, never as 0."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from analysis import stats
from analysis.index import build_index
from analysis.outliers import analyze_outliers
from analysis.query import format_query, query_dim
from analysis.scan import ScanParams
from analysis.synthetic import write_store

LENGTHS = [40, 50, 30, 60]
D = 32
HOOKS = [f"blocks.{l}.hook_resid_post" for l in range(4)] + [f"blocks.{l}.ln1.hook_normalized" for l in range(4)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(3)
    n = sum(LENGTHS)
    data = {h: rng.standard_normal((n, D)).astype(np.float32) for h in HOOKS}
    data["blocks.1.ln1.hook_normalized"][:, 7] *= 20  # an outlier dim, so the report has something to show
    data["blocks.2.hook_resid_post"][:] = np.nan  # float16 overflow in a layer: every value NaN
    data["blocks.1.hook_resid_post"][[3, 77, 150], [0, 5, 5]] = [np.nan, np.inf, -np.inf]
    data["blocks.3.ln1.hook_normalized"][100:104, :] = np.inf  # whole rows
    path = tmp_path_factory.mktemp("nonfinite") / "flagged.zarr"
    write_store(path, HOOKS, LENGTHS, D, lambda name, lo, hi: data[name][lo:hi], chunk_rows=32, chunks_per_shard=2)
    return path, data


def test_statistics_count_and_exclude_nonfinite_against_numpy(planted):
    _, data = planted
    for name, x in data.items():
        got = stats.reduction(da.from_array(x, chunks=(29, D)), "nonfinite").compute()
        bad = ~np.isfinite(x)
        np.testing.assert_array_equal(got["nonfinite"], bad.sum(axis=0))
        assert got["nonfinite_total"] == bad.sum() and got["nonfinite_rows"] == bad.any(axis=1).sum()
        assert got["nonfinite_first_row"] == (int(np.flatnonzero(bad.any(axis=1))[0]) if bad.any() else -1)
        assert got["no_finite"] == (not np.isfinite(x).any())
        mx = stats.reduction(da.from_array(x, chunks=(29, D)), "max_abs").compute()["max_abs"]
        ref = np.ma.masked_invalid(np.abs(x)).max(axis=0).filled(np.nan)
        np.testing.assert_array_equal(mx, ref.astype(np.float32))  # NaN where a column has no finite value


def test_kurtosis_of_a_sequence_with_no_finite_value_is_nan():
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    x[10:] = np.nan
    block = stats.Block(x)
    out = stats.seq_moments_aggregate(stats.seq_moments_chunk(block, np.repeat([0, 1], 10)))
    assert np.isfinite(out["kurtosis"][0]) and np.isnan(out["kurtosis"][1]) and np.isnan(out["max_norm"][1])


def test_outliers_report_nonfinite_and_a_dead_layer_as_such(planted):
    path, data = planted
    rep = analyze_outliers(path, ScanParams(block_mib=0.01), plots=False)
    r = json.loads(rep.to_json())
    kurt = {k["layer"]: k for k in r["kurtosis"]["layers"]}
    # the fault as filed: kurtosis 0 and max |x| 0 for the all-NaN layer
    assert kurt[2]["no_finite_value"] and kurt[2]["kurtosis"] is None and kurt[2]["max_norm"] is None
    assert kurt[2]["nonfinite"] == sum(LENGTHS) * D
    assert kurt[1]["nonfinite"] == 3 and not kurt[1]["no_finite_value"]
    finite1 = np.ma.masked_invalid(data["blocks.1.hook_resid_post"])
    assert kurt[1]["max_norm"] == pytest.approx(float(np.abs(finite1).max()))
    nf = {a["array"]: a for a in r["nonfinite"]["arrays"]}
    for name, x in data.items():
        bad = int((~np.isfinite(x)).sum())
        assert nf.get(name, {}).get("values", 0) == bad
    assert nf["blocks.2.hook_resid_post"]["no_finite_value"]
    assert nf["blocks.1.hook_resid_post"]["first_row"] == 3 and nf["blocks.1.hook_resid_post"]["rows"] == 3
    assert nf["blocks.3.ln1.hook_normalized"] == {"array": "blocks.3.ln1.hook_normalized", "values": 4 * D,
                                                 "rows": 4, "first_row": 100, "dims": D, "no_finite_value": False}
    assert r["nonfinite"]["total"] == sum(int((~np.isfinite(x)).sum()) for x in data.values())
    # the Dettmers statistics on ln1 left the inf rows of layer 3 out
    states = {s["layer"]: s for s in r["nonfinite"]["hidden_states"]}
    assert states[3]["values"] == 4 * D and not states[3]["no_finite_value"]
    assert 7 in rep.outlier_dims
    table = rep.format()
    assert "2:no finite value" in table and "NaN/inf values left out" in table
    assert "blocks.2.hook_resid_post" in table


def test_index_and_query_count_nonfinite(planted):
    path, data = planted
    build_index(path, block_mib=0.01)
    import zarr

    g = zarr.open_group(str(path), mode="r")["analysis/index/hook_resid_post"]
    resid = np.stack([data[f"blocks.{l}.hook_resid_post"] for l in range(4)])
    np.testing.assert_array_equal(g["nonfinite"][...], (~np.isfinite(resid)).sum(axis=1))
    np.testing.assert_array_equal(g["count"][...], np.isfinite(resid).sum(axis=1))
    assert np.isnan(g["max_abs"][2]).all() and np.isnan(g["mean"][2]).all()
    q = query_dim(path, 5, hook="resid_post")
    rows = {r["layer"]: r for r in q["layers"]}
    assert rows[1]["nonfinite"] == 2 and rows[2]["nonfinite"] == sum(LENGTHS) and rows[2]["count"] == 0
    assert q["examples"]["layer"] != 2
    text = format_query(q)
    assert "no finite value" in text and "NaN/inf left out" in text


def test_real_harvest_with_a_nan_layer_flagged_is_reported_not_zeroed(neox_ckpt, make_spec, tmp_path):
    """A checkpoint whose layer-2 MLP bias is NaN: layers 2 and 3 hold no finite value; harvested with
    ``on_nonfinite: flag``; the analysis must say so, not report kurtosis 0 and max |x| 0."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import zarr
    from safetensors.torch import load_file, save_file

    from harvest.runner import run

    ckpt = tmp_path / "nan-ckpt"
    shutil.copytree(neox_ckpt, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.2.mlp.dense_4h_to_h.bias"))
    tensors[key][:] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    spec = make_spec(ckpt, hooks=("blocks.*.hook_resid_post", "blocks.*.ln1.hook_normalized"),
                     capture={"on_nonfinite": "flag"})
    path = run(spec, progress=False).path
    g = zarr.open_group(str(path), mode="r")
    stored = {name: g[name][...] for name in g.attrs["harvest"]["hooks"]}
    assert np.isnan(stored["blocks.2.hook_resid_post"]).all() and np.isfinite(stored["blocks.1.hook_resid_post"]).all()

    rep = analyze_outliers(path, plots=False)
    kurt = {k["layer"]: k for k in rep.report["kurtosis"]["layers"]}
    assert [kurt[x]["no_finite_value"] for x in range(4)] == [False, False, True, True]
    assert kurt[2]["kurtosis"] is None and kurt[2]["max_norm"] is None and kurt[1]["kurtosis"] > 0
    nf = {a["array"]: a["values"] for a in rep.report["nonfinite"]["arrays"]}
    assert nf == {name: int((~np.isfinite(x)).sum()) for name, x in stored.items() if not np.isfinite(x).all()}
    # Dettmers' max |x|: ln1 of layer 3 reads the dead residual of layer 2 (also ln2, derived from it): NaN, not 0
    max_abs = rep.arrays["max_abs"][0]
    assert np.isnan(max_abs[3]).all() and np.isfinite(max_abs[:3]).all()
    states = {s["layer"]: s for s in rep.report["nonfinite"]["hidden_states"]}
    assert list(states) == [3] and states[3]["no_finite_value"]

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    import os

    done = subprocess.run([sys.executable, "-m", "harvest", "analyze", "outliers", str(path), "--no-plots"],
                          capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    assert "2:no finite value" in done.stdout and "3:no finite value" in done.stdout
    assert "NaN/inf values left out" in done.stdout


def test_fourier_leaves_out_nonfinite_rows_and_reports_a_dead_layer(tmp_path):
    import zarr

    from analysis import fourier
    from harvest.store import write_provenance

    rng = np.random.default_rng(0)
    n = np.arange(120)
    group = zarr.open_group(str(tmp_path / "numbers.zarr"), mode="w")
    write_provenance(group, {"prompts": {"source": "numbers"}, "selection": {}, "fingerprint": "test",
                             "hooks": [f"blocks.{layer}.hook_resid_post" for layer in range(3)]})
    group.create_array("seq", data=np.repeat(n, 2).astype(np.int64), dimension_names=("token",))
    group.create_array("pos", data=np.tile([1, 2], len(n)).astype(np.int32), dimension_names=("token",))
    meta = group.require_group("meta")
    meta.create_array("n", data=n.astype(np.int64), dimension_names=("sequence",))
    meta.create_array("n_span", data=np.stack([np.ones(len(n)), 2 * np.ones(len(n))], 1).astype(np.int32),
                      dimension_names=("sequence", "bound"))
    clean = np.cos(2 * np.pi * np.repeat(n, 2)[:, None] / 10) * rng.normal(size=(1, 16))
    for layer in range(3):
        h = clean + 0.01 * rng.normal(size=clean.shape)
        if layer == 1:
            h[::2][[5, 40]] = np.nan  # the rows of numbers 5 and 40 (one row per number is read)
            h[1::2] = np.inf  # rows the analysis never reads (position 2)
        if layer == 2:
            h[:] = np.nan
        group.create_array(f"blocks.{layer}.hook_resid_post", data=h.astype(np.float32), chunks=(64, 16),
                           dimension_names=("token", "d_model"))
    res = fourier.analyze(str(tmp_path / "numbers.zarr"), periods=[10], n_shuffles=2, include_embed=False,
                          write=False, plot=False)
    assert list(res.layers) == [0]  # layers 1 and 2 left out, not fitted on zeros
    dead = " ".join(res.params["no_finite_value"])
    assert "layer 2 left out (numbers): no finite value" in dead
    assert "layer 1 left out (numbers): 2 number(s) have no row without NaN/inf" in dead
    assert res.params["nonfinite"]["numbers layer 1"]["values"] == 2 * 16
    assert res.params["nonfinite"]["numbers layer 2"]["values"] == 120 * 16
    assert res.helix[0].r2["helix"] > 0.99
    assert "NaN/inf" in res.report() and "no finite value" in res.report()


def test_translation_heads_count_nonfinite_and_name_a_dead_layer(tmp_path):
    import zarr

    from analysis import translation_heads as th
    from test_translation_heads import translation_prompts
    from test_translation_heads import write_store as write_patterns

    path = write_patterns(tmp_path / "t.zarr", translation_prompts(20, 4, np.random.default_rng(0)), "translation",
                         layers=(0, 1, 2))
    g = zarr.open_group(path, mode="r+")
    dead = g["blocks.0.attn.hook_pattern"]
    dead[...] = np.full(dead.shape, np.nan, np.float32)
    some = g["blocks.1.attn.hook_pattern"]
    part = some[...]
    part[[3, 7], 0, 2, 1] = np.inf  # two prompts, one head
    some[...] = part
    res = th.analyze(path, write=False, plot=False)
    nf = res.params["nonfinite"]
    assert nf["0"]["values"] == dead.size and nf["0"]["no_finite_value"]
    assert nf["1"] == {"values": 2, "no_finite_value": False, "prompts_left_out": 2}
    assert "2" not in nf
    rows = res.ranked()
    assert all(r["role"] == "no finite value" for r in rows if r["layer"] == 0)
    assert not any(r["role"] == "no finite value" for r in rows if r["layer"] != 0)
    assert np.isfinite(res.scores["ts_next"][1]).all()  # the two prompts are left out, not zeros
    table = res.table(top=None)
    assert "layer 0: " in table and "(no finite value)" in table and "2 prompt(s) left out" in table
    assert json.loads(json.dumps(res.to_dict()))["params"]["nonfinite"]["1"]["values"] == 2
