"""Fourier analysis on planted stores: a helix of known periods, a+b directions, a known accuracy.

Numbers store: h(n) = C·B(n) + noise for n = 0..299, where B(n) = [cos, sin(2πn/T) for T in
(2, 5, 10, 100)] + [n / 299] at layer 0, and the same with period 7 in place of 100 at layer 1.
Addition store: at '=', x = W_cos·cos(2π(a+b)/10) + W_sin·sin(2π(a+b)/10) + noise, and a
planted top-1 prediction that is right for a known share of the prompts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from analysis import fourier, helix
from harvest.errors import AnalysisError
from harvest.store import read_provenance, write_files, write_provenance
from organisms.common import word_tokenizer

D = 48
N = 300


def basis(n: np.ndarray, periods) -> np.ndarray:
    cols = []
    for t in periods:
        cols += [np.cos(2 * np.pi * n / t), np.sin(2 * np.pi * n / t)]
    return np.stack(cols + [n / n.max()], axis=1)


def base_store(path, source: str, seq: np.ndarray, pos: np.ndarray):
    group = zarr.open_group(str(path), mode="w")
    write_provenance(group, {"prompts": {"source": source}, "selection": {}, "fingerprint": "test", "hooks": []})
    group.create_array("seq", data=seq.astype(np.int64), dimension_names=("token",))
    group.create_array("pos", data=pos.astype(np.int32), dimension_names=("token",))
    return group


def activation(group, name: str, data: np.ndarray) -> None:
    group.create_array(name, data=data.astype(np.float32), chunks=(64, data.shape[1]),
                       dimension_names=("token", "d_model"))
    provenance = read_provenance(group)
    write_provenance(group, {**provenance, "hooks": provenance["hooks"] + [name]})


@pytest.fixture(scope="module")
def numbers_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = np.arange(N)
    path = tmp_path_factory.mktemp("num") / "numbers.zarr"
    group = base_store(path, "numbers", n, np.ones(N))
    meta = group.require_group("meta")
    meta.create_array("n", data=n.astype(np.int64), dimension_names=("sequence",))
    meta.create_array("n_span", data=np.stack([np.ones(N), 2 * np.ones(N)], 1).astype(np.int32),
                      dimension_names=("sequence", "bound"))
    for layer, periods in [(0, (2, 5, 10, 100)), (1, (2, 5, 10, 7))]:
        b = basis(n.astype(float), periods)
        h = b @ rng.normal(size=(b.shape[1], D)) + 0.02 * rng.normal(size=(N, D))
        activation(group, f"blocks.{layer}.hook_resid_post", h)
    activation(group, "hook_embed", rng.normal(size=(N, D)))  # no structure at all
    return str(path)


@pytest.fixture(scope="module")
def numbers_result(numbers_path):
    return fourier.analyze(numbers_path, n_shuffles=5)


def at(result, layer: int) -> int:
    return list(result.layers).index(layer)


def test_spectrum_peaks_at_the_planted_frequencies(numbers_result):
    power = numbers_result.power[at(numbers_result, 0)]
    top4 = set((np.argsort(power[1:])[::-1][:4] + 1).tolist())
    assert top4 == {150, 60, 30, 3}
    periods = [p for p, _ in numbers_result.peaks[at(numbers_result, 0)][:4]]
    assert sorted(periods) == [2, 5, 10, 100]
    # the unstructured embedding has no dominant frequency
    embed = numbers_result.power[at(numbers_result, -1)]
    assert embed[1:].max() / embed[1:].sum() < 0.05


def test_helix_fits_and_beats_circle_and_cubic(numbers_result):
    fit = numbers_result.helix[at(numbers_result, 0)]
    assert fit.r2["helix"] > 0.99
    assert fit.r2["helix"] > fit.r2["circle"] + 0.01
    assert fit.r2["helix"] > fit.r2["poly3"] + 0.5
    assert fit.r2["shuffled"] < 0.3
    assert fit.r2["pca"] >= fit.r2["helix"] - 1e-9  # the rank-matched ceiling
    assert fit.n_params["helix"] == 9  # 4 periods x (cos, sin) + linear + constant, less sin(pi n) = 0
    assert fit.n_params["circle"] == 8 and fit.n_params["poly3"] == 4 and fit.n_params["pca"] == 8
    assert fit.plane_period in (2.0, 5.0, 10.0, 100.0)


def test_period_7_in_place_of_100_fits_worse(numbers_result):
    good = numbers_result.helix[at(numbers_result, 0)].r2["helix"]
    bad = numbers_result.helix[at(numbers_result, 1)].r2["helix"]
    assert bad < 0.95 and bad < good - 0.04
    assert numbers_result.helix[at(numbers_result, -1)].r2["helix"] < 0.2  # noise: near the shuffled level


def test_auto_periods_find_the_period_7(numbers_path):
    res = fourier.analyze(numbers_path, periods="auto", n_auto=5, n_shuffles=3, write=False, plot=False)
    fit = res.helix[at(res, 1)]
    assert any(abs(p - 7) < 0.2 for p in fit.periods)
    assert fit.r2["helix"] > 0.97
    assert fit.r2["shuffled"] < 0.4  # periods re-picked on shuffled data: still chance


def test_regression_statistics_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 7))
    g = helix.period_features(rng.integers(0, 50, 200), [10, 3])
    stats = helix.Regression(200, x.sum(0), float((x ** 2).sum()), g.sum(0), g.T @ g, g.T @ x)
    fve, w = stats.fit([0, 1])
    design = np.column_stack([g[:, :2], np.ones(200)])
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    resid = x - design @ coef
    xc = x - x.mean(0)
    assert fve == pytest.approx(1 - (resid ** 2).sum() / (xc ** 2).sum(), abs=1e-10)
    np.testing.assert_allclose(w, coef[:2], atol=1e-10)


@pytest.fixture(scope="module")
def addition_path(tmp_path_factory):
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("add")
    a, b = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    a, b = a.ravel(), b.ravel()
    n = len(a)
    # rows: a's token (position 1) and '=' (position 4) of every prompt
    seq = np.repeat(np.arange(n), 2)
    pos = np.tile([1, 4], n)
    group = base_store(root / "addition.zarr", "addition", seq, pos)
    meta = group.require_group("meta")
    for name, value in [("a", a), ("b", b), ("answer", a + b), ("eq_pos", np.full(n, 4))]:
        meta.create_array(name, data=value.astype(np.int64), dimension_names=("sequence",))
    meta.create_array("a_span", data=np.tile([1, 2], (n, 1)).astype(np.int32), dimension_names=("sequence", "bound"))
    w = rng.normal(size=(2, D))
    total = (a + b).astype(float)
    eq = np.cos(2 * np.pi * total / 10)[:, None] * w[0] + np.sin(2 * np.pi * total / 10)[:, None] * w[1]
    eq += 0.3 * rng.normal(size=(n, D))
    helix_a = basis(a.astype(float), (2, 5, 10, 100)) @ rng.normal(size=(9, D))
    x = np.empty((2 * n, D))
    x[0::2], x[1::2] = helix_a, eq
    activation(group, "blocks.0.hook_resid_post", x)
    tok_dir = root / "tok"
    tok = word_tokenizer(["+", "=", *(str(v) for v in range(100))], tok_dir)
    write_files(group.require_group("tokenizer"), sorted(p for p in tok_dir.iterdir() if p.is_file()))
    answer_ids = np.array([tok.convert_tokens_to_ids(str(v)) for v in a + b])
    right = rng.random(n) < 0.7
    top1 = np.where(right, answer_ids, answer_ids + 1)
    topk = np.zeros((2 * n, 3), np.int32)
    topk[1::2, 0] = top1
    group.create_array("unembed.topk_ids", data=topk, dimension_names=("token", "k"))
    return str(root / "addition.zarr"), w, float(right.mean())


def test_directions_of_a_plus_b_and_accuracy(addition_path):
    path, w, share = addition_path
    res = fourier.analyze(path, n_shuffles=3)
    i = at(res, 0)
    periods = res.direction_periods
    assert periods == [2.0, 5.0, 10.0, 100.0]
    fve = dict(zip(periods, res.fve[i]))
    assert fve[10.0] > 0.5
    assert max(fve[2.0], fve[5.0], fve[100.0]) < 0.05
    assert res.fve_shuffled[i].max() < 0.02
    got = res.directions[i, periods.index(10.0)]
    for k in range(2):
        assert np.corrcoef(got[k], w[k])[0, 1] > 0.99
    assert res.accuracy == pytest.approx(share)
    # operand a's helix from the addition store itself (no numbers store given)
    assert res.helix[i].r2["helix"] > 0.99
    assert "operand a" in res.params["numbers_from"]
    out = zarr.open_group(path + "/analysis/fourier", mode="r")
    assert out["directions/directions"].metadata.dimension_names == ("layer", "period", "basis", "d_model")
    assert out["directions/fve"].shape == (1, 4)
    assert out["accuracy/correct"][...].mean() == pytest.approx(share)
    assert out.attrs["params"]["hook"] == "hook_resid_post"
    assert all(p.is_file() for p in res.figures.values()) and set(res.figures) == {"spectrum", "helix", "directions"}
    json.dumps(res.to_dict())
    report = res.report()
    assert "T=10" in report and "accuracy" in report


def test_numbers_store_results_are_written(numbers_result, numbers_path):
    out = zarr.open_group(numbers_path + "/analysis/fourier", mode="r")
    assert out["spectrum/power"].metadata.dimension_names == ("layer", "frequency")
    assert out["spectrum/power"].shape == (3, N // 2 + 1)
    assert out["layer"][...].tolist() == [-1, 0, 1]
    assert out["helix/r2_helix"][1] > 0.99
    assert out["helix/directions"].shape == (3, 10, D)
    assert "spectrum" in numbers_result.figures
    assert "period #1" in numbers_result.report()


def test_errors_name_the_fix(tmp_path, numbers_path):
    group = base_store(tmp_path / "gap.zarr", "numbers", np.arange(6), np.ones(6))
    meta = group.require_group("meta")
    meta.create_array("n", data=np.array([0, 1, 2, 3, 5, 6]))
    meta.create_array("n_span", data=np.tile([1, 2], (6, 1)).astype(np.int32))
    activation(group, "blocks.0.hook_resid_post", np.ones((6, 4)))
    with pytest.raises(AnalysisError, match="contiguous range"):
        fourier.analyze(tmp_path / "gap.zarr", write=False, plot=False)
    with pytest.raises(AnalysisError, match="hook 'hook_mlp_out' was not harvested into"):
        fourier.analyze(numbers_path, hook="hook_mlp_out", include_embed=False, write=False, plot=False)
    with pytest.raises(AnalysisError, match="'auto'"):
        fourier.analyze(numbers_path, periods="sometimes", write=False, plot=False)
    group = base_store(tmp_path / "noeq.zarr", "addition", np.arange(4), np.ones(4))
    meta = group.require_group("meta")
    for name in ("a", "b", "eq_pos"):
        meta.create_array(name, data=np.array([0, 1, 2, 3]) + (4 if name == "eq_pos" else 0))
    meta.create_array("a_span", data=np.tile([1, 2], (4, 1)).astype(np.int32))
    activation(group, "blocks.0.hook_resid_post", np.ones((4, 4)))
    with pytest.raises(AnalysisError, match="capture.positions: source"):
        fourier.analyze(tmp_path / "noeq.zarr", write=False, plot=False)


def test_cli_report_and_json(numbers_path):
    from typer.testing import CliRunner

    from analysis.cli import analyze_app as app

    runner = CliRunner()
    out = runner.invoke(app, ["fourier", numbers_path, "--shuffles", "2", "--no-write", "--no-plots", "--no-embed"])
    assert out.exit_code == 0, out.output
    assert "helix fit" in out.output and "period #1" in out.output
    out = runner.invoke(app, ["fourier", numbers_path, "--shuffles", "2", "--no-write", "--no-plots", "--json",
                              "--periods", "auto"])
    assert out.exit_code == 0, out.output
    layers = json.loads(out.output)["layers"]
    assert [entry["name"] for entry in layers] == ["embed", "0", "1"]
    assert sorted(p["period"] for p in layers[1]["top_periods"][:4]) == [2, 5, 10, 100]
    out = runner.invoke(app, ["fourier", numbers_path, "--periods", "2,x", "--no-write"])
    assert isinstance(out.exception, AnalysisError)
