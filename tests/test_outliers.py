"""`harvest analyze outliers`: planted ground truth, the LayerNorm path, schedulers, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from analysis.outliers import analyze_outliers, read_results
from analysis.scan import ScanParams
from analysis.source import layer_norm
from analysis.synthetic import plant_residual_dim, planted_store, write_store
from harvest.errors import AnalysisError

FAST = ScanParams(block_mib=1)  # 768-row blocks: sequences of 512 rows straddle blocks


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("planted") / "planted.zarr"
    return path, planted_store(path, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def report(planted):
    return analyze_outliers(planted[0], FAST)


def test_only_the_true_outlier_is_found(report, planted):
    truth = planted[1]
    assert report.outlier_dims == [truth["A"]]
    a = report.report["outlier_dims"][0]
    assert a["layer_frac"] == 1.0 and a["layers_affected"] == list(range(28)) and a["layers_affected_frac"] == 1.0
    assert a["pos_frac"] == pytest.approx(0.75)
    assert a["seq_frac"] == 1.0
    assert a["one_sided"] and a["sign"] == "-" and a["positive"] == 0
    assert a["quartiles"] == [-20.0, -20.0, -20.0]
    assert a["max_abs"] == 20.0
    assert a["outlier_values"] == 28 * 384 * truth["n_seq"]
    # x_A² / ‖x‖² with 255 other dims of N(0, 0.5²) noise, D = 5.9 (and B = 8 in some layers)
    assert 0.7 < a["share_sq_norm"] < 0.85
    assert a["ln_weight"]["ln1"] == pytest.approx([1 + 0.01 * layer for layer in range(28)])


def test_near_misses_are_rejected_for_the_right_reason(report, planted):
    truth = planted[1]
    why = {m["dim"]: m["rejected_by"] for m in report.report["near_misses"]}
    assert why[truth["B"]].startswith("layers: 21.4% < 25%")
    assert why[truth["C"]].startswith("positions: 2.93% < 6%")
    assert why[truth["D"]].startswith("magnitude: max |x| 5.9 < 6")
    v = report.report["values"]
    assert v["in_outlier_dims"] == 28 * 384 * truth["n_seq"]
    assert v["outlier_frac"] == pytest.approx(384 / (512 * 256))
    assert v["outlier_per_sequence"] == 28 * 384


def test_massive_activations(report, planted):
    truth = planted[1]
    found = report.report["massive"]["found"]
    assert [(f["layer"], f["dim"]) for f in found] == [(truth["massive_layer"], truth["massive_dim"])]
    f = found[0]
    assert f["count"] == truth["n_seq"] and f["max_abs"] == 2000 and f["positions"] == {0: truth["n_seq"]}
    assert f["example"]["pos"] == 0 and 0.25 < f["example"]["median_abs"] < 0.45
    g = zarr.open_group(str(planted[0]), mode="r")
    seq = f["example"]["seq"]
    assert f["example"]["token_id"] == int(g["input_ids"][seq, 0])
    assert f["example"]["token"]  # decoded with the store's tokenizer
    rec = g["analysis/outliers/massive"]
    assert rec["dim"][...].tolist() == [7] * truth["n_seq"]
    assert sorted(rec["seq"][...].tolist()) == list(range(truth["n_seq"]))


def test_kurtosis_per_layer(report):
    k = {x["layer"]: x for x in report.report["kurtosis"]["layers"]}
    assert k[0]["kurtosis"] == pytest.approx(3.0, abs=0.05) and k[3]["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert k[1]["kurtosis"] > 1e4  # the massive activation
    assert k[1]["max_norm"] == 2000 and k[2]["max_norm"] == 150


def test_kurtosis_of_one_spike_in_4096_dims(tmp_path):
    """Bondarenko et al.'s example: m = 60 in one of d = 4096 N(0, 1) dims -> about 897."""

    def values(name, lo, hi):
        x = np.random.default_rng(lo).standard_normal((hi - lo, 4096)).astype(np.float32)
        x[:, 11] = 60
        return x

    from analysis.scan import run_scan

    write_store(tmp_path / "k.zarr", ["blocks.0.hook_resid_post"], [40, 24], 4096, values, n_layers=1)
    scan = run_scan(tmp_path / "k.zarr", ScanParams(block_mib=0.1), index=False)
    kurt = scan.kurtosis[0]["kurtosis"]
    assert kurt == pytest.approx([897, 897], rel=0.02)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    x = g["blocks.0.hook_resid_post"][...].astype(np.float64)
    for s, (lo, hi) in enumerate([(0, 40), (40, 64)]):
        v = x[lo:hi].ravel()
        assert kurt[s] == pytest.approx(np.mean((v - v.mean()) ** 4) / (v.var() ** 2 + 1e-6), rel=1e-5)


def test_results_and_parameters_are_written_into_the_store(report, planted):
    stored = read_results(planted[0])
    assert stored["params"]["magnitude"] == 6.0 and stored["params"]["aggregate"] == "sequence"
    g = zarr.open_group(str(planted[0]), mode="r")["analysis/outliers"]
    assert np.flatnonzero(g["is_outlier"][...]).tolist() == [planted[1]["A"]]
    assert g["max_abs"].shape == (28, 256) and tuple(g["max_abs"].metadata.dimension_names) == ("layer", "d_model")
    assert g["hits_per_sequence"].shape == (planted[1]["n_seq"],)
    assert g["kurtosis_seq"].shape == (planted[1]["n_seq"], 4)
    for p in report.report["plots"]:
        assert Path(p).stat().st_size > 1000 and p.endswith(".png")
    assert Path(report.report["plots"][0]).parent.name == "planted.plots"


def test_table_on_the_terminal(report):
    text = report.format()
    assert "outlier dimensions: 1" in text and "near misses" in text and "massive activations" in text
    assert "17  100.0%     75.0%" in text


def test_corpus_aggregation_and_thresholds_are_options(planted):
    corpus = analyze_outliers(planted[0], ScanParams(block_mib=1, aggregate="corpus"), write=False, plots=False,
                              index=False)
    assert corpus.outlier_dims == [planted[1]["A"]] and corpus.report["groups"] == 1
    # lower thresholds let the near misses in: B at 21% of layers, C at 2.9% of positions
    loose = analyze_outliers(planted[0], ScanParams(block_mib=1, layer_frac=0.2, pos_frac=0.02), write=False,
                             plots=False, index=False)
    assert loose.outlier_dims == sorted([planted[1][k] for k in "ABC"])
    with pytest.raises(AnalysisError, match="layer_frac is a fraction"):
        analyze_outliers(planted[0], ScanParams(layer_frac=25), write=False, plots=False)


def test_threaded_and_distributed_schedulers_agree_exactly(planted):
    from distributed import Client, LocalCluster

    threads = analyze_outliers(planted[0], FAST, write=False, plots=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            dist = analyze_outliers(planted[0], FAST, write=False, plots=False, scheduler=client)
        by_address = analyze_outliers(planted[0], FAST, write=False, plots=False, index=False,
                                      scheduler=cluster.scheduler_address)
    assert threads.arrays.keys() == dist.arrays.keys()
    for name, (data, _) in threads.arrays.items():
        np.testing.assert_array_equal(data, dist.arrays[name][0], err_msg=name)
        np.testing.assert_array_equal(data, by_address.arrays[name][0], err_msg=name)
    for name, stats in threads.scan.index.items():
        for key, value in stats.items():
            np.testing.assert_array_equal(value, dist.scan.index[name][key], err_msg=f"{name} {key}")


def test_unreachable_scheduler_is_a_clear_error(planted):
    for address in ("tcp://127.0.0.1:9", "127.0.0.1:9", "foo://bar:1"):
        with pytest.raises(AnalysisError, match="cannot reach the dask scheduler"):
            analyze_outliers(planted[0], FAST, write=False, plots=False, scheduler=address)


def _ln_store(path: Path, *, stored: bool) -> Path:
    """A NeoX-shaped store with a residual dim that LayerNorm turns into an outlier in layers 1-3."""
    rng = np.random.default_rng(7)
    L, d, lengths = 4, 64, [70, 50]
    n = sum(lengths)
    resid = {f"blocks.{l}.hook_resid_post": rng.standard_normal((n, d)).astype(np.float32) * 0.05 for l in range(L)}
    resid["hook_embed"] = rng.standard_normal((n, d)).astype(np.float32) * 0.05
    for l in range(L):
        resid[f"blocks.{l}.hook_resid_post"][: n // 2, 5] = 1.0  # enters layers 1..3 (and only half the rows)
    ln = {"ln1.w": rng.uniform(0.8, 1.2, (L, d)), "ln1.b": rng.normal(0, 0.1, (L, d)),
          "ln2.w": rng.uniform(0.8, 1.2, (L, d)), "ln2.b": rng.normal(0, 0.1, (L, d))}
    ln["ln1.w"][:, 5], ln["ln2.w"][:, 5] = 2.0, 1.5
    arrays = dict(resid)
    if stored:
        arrays = {}
        for l in range(L):
            x = resid[f"blocks.{l - 1}.hook_resid_post"] if l else resid["hook_embed"]
            for name in ("ln1", "ln2"):
                arrays[f"blocks.{l}.{name}.hook_normalized"] = layer_norm(
                    x, ln[f"{name}.w"][l].astype(np.float32), ln[f"{name}.b"][l].astype(np.float32), 1e-5)
    write_store(path, list(arrays), lengths, d, lambda name, lo, hi: arrays[name][lo:hi], n_layers=L, ln=ln,
                chunk_rows=16)
    return path


def test_layernorm_applied_to_the_raw_residual_matches_the_stored_states(tmp_path):
    derived = analyze_outliers(_ln_store(tmp_path / "resid.zarr", stored=False), FAST, plots=False, write=False)
    stored = analyze_outliers(_ln_store(tmp_path / "ln.zarr", stored=True), FAST, plots=False, write=False)
    hs = derived.report["hidden_states"]
    assert hs["ln_applied"] and any("stored LayerNorm" in n for n in hs["notes"])
    assert not stored.report["hidden_states"]["ln_applied"]
    assert derived.outlier_dims == stored.outlier_dims == [5]
    assert derived.report["outlier_dims"][0]["layers_affected"] == [1, 2, 3]
    for name in ("layer_frac", "pos_frac", "hits", "layer_seq_frac"):
        np.testing.assert_array_equal(derived.arrays[name][0], stored.arrays[name][0], err_msg=name)
    np.testing.assert_allclose(derived.arrays["max_abs"][0], stored.arrays["max_abs"][0], rtol=1e-5)
    assert "LayerNorm" in derived.format()
    # --stored-only: nothing to analyse in a residual-only store
    with pytest.raises(AnalysisError, match="no hidden states that feed linear layers"):
        analyze_outliers(tmp_path / "resid.zarr", FAST, derive=False, plots=False, write=False)


def test_cli_json(planted):
    from typer.testing import CliRunner

    from harvest.cli import app

    res = CliRunner().invoke(app, ["analyze", "outliers", str(planted[0]), "--json", "--no-plots", "--no-write",
                                   "--no-index", "--block-mib", "1", "--pos-frac", "0.5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [o["dim"] for o in out["outlier_dims"]] == [planted[1]["A"]] and out["params"]["pos_frac"] == 0.5
    dry = CliRunner().invoke(app, ["analyze", "outliers", str(planted[0]), "--dry-run"])
    assert dry.exit_code == 0 and "would read 32 arrays" in dry.output


# --- end to end: edited GPT-NeoX and GPT-J weights, harvested with `harvest run` ------------------------

PLANT_DIM = 13


@pytest.mark.parametrize("arch,hooks", [
    ("gpt_neox", ["blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post"]),
    ("gptj", ["hook_embed", "blocks.*.hook_resid_post"]),  # only the raw residual: LayerNorm applied here
])
def test_end_to_end_planted_dimension_is_found_in_the_right_layers(arch, hooks, make_checkpoint, make_spec, tmp_path):
    from harvest.runner import run

    ckpt = plant_residual_dim(make_checkpoint(arch), tmp_path / f"{arch}-edited", arch, PLANT_DIM)
    path = run(make_spec(ckpt, hooks=hooks), progress=False).path
    rep = analyze_outliers(path, plots=False)
    assert_planted_dimension(rep)
    assert rep.report["hidden_states"]["ln_applied"] == (arch == "gptj")


def assert_planted_dimension(rep) -> None:
    """``plant_residual_dim``'s dimension is the one outlier: in layers 1-3 (LayerNorm weight 2 on it there)
    at every position, one-sided, its median |x| between 10 and 16."""
    assert rep.outlier_dims == [PLANT_DIM], rep.format()
    o = rep.report["outlier_dims"][0]
    assert o["layers_affected"] == [1, 2, 3] and rep.report["hidden_states"]["layers"] == [0, 1, 2, 3]
    assert o["layer_frac"] == pytest.approx(0.75) and o["pos_frac"] == 1.0
    assert o["sign"] == "+" and o["one_sided"] and 10 < o["quartiles"][1] < 16
    assert o["ln_weight"]["ln1"] == [1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("arch,hooks", [
    ("gpt_neox", ["blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post"]),
    ("gptj", ["hook_embed", "blocks.*.hook_resid_post"]),  # the statistics saw ln1, which is not stored
])
def test_planted_dimension_is_found_from_the_statistics_with_the_arrays_deleted(arch, hooks, make_checkpoint,
                                                                                 make_spec, tmp_path):
    from harvest.runner import run
    from harvest.store import open_group

    ckpt = plant_residual_dim(make_checkpoint(arch), tmp_path / f"{arch}-edited", arch, PLANT_DIM)
    path = run(make_spec(ckpt, hooks=hooks, capture={"statistics": True}), progress=False).path
    group = open_group(path, mode="r+")
    stored = [name for name in group.array_keys() if name.startswith(("blocks.", "hook_"))]
    assert stored
    for name in stored:
        del group[name]
    rep = analyze_outliers(path, plots=False, scheduler="sync")
    assert rep.report["harvest_statistics"]["source"] == "statistics"
    assert_planted_dimension(rep)
    assert "harvest-time statistics of blocks.{l}.ln1.hook_normalized" in rep.report["hidden_states"]["summary"][0]
