"""Every statistic's chunk / combine / aggregate against NumPy, in any merge order."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from analysis import stats
from analysis.scan import affine, normalize
from analysis.source import layer_norm, reweight_ln


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1500, 37)) * 3 + np.linspace(-50, 50, 37)).astype(np.float32)
    x[5, 3], x[7, 4], x[9, 4] = np.nan, np.inf, -np.inf
    return x


def _masked(x):
    return np.ma.masked_invalid(x.astype(np.float64))


def test_moments_against_numpy(data):
    out = stats.reduction(da.from_array(data, chunks=(97, 37)), "moments").compute()
    ref = _masked(data)
    np.testing.assert_array_equal(out["count"], ref.count(axis=0))
    np.testing.assert_allclose(out["mean"], ref.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out["std"], ref.std(axis=0), rtol=1e-6)


def test_max_abs_and_count_ge_against_numpy(data):
    x = da.from_array(data, chunks=(200, 37))
    finite = np.where(np.isfinite(data), np.abs(data), 0)
    np.testing.assert_array_equal(stats.reduction(x, "max_abs").compute()["max_abs"], finite.max(axis=0))
    for t in (6.0, 40.0):
        got = stats.reduction(x, "count_ge", threshold=t).compute()["count_ge"]
        np.testing.assert_array_equal(got, (finite >= t).sum(axis=0))


@pytest.mark.parametrize("chunk", [7, 64, 500, 1500])
def test_topk_against_numpy(data, chunk):
    k = 9
    got = stats.reduction(da.from_array(data, chunks=(chunk, 37)), "topk", k=k).compute()
    a = np.where(np.isfinite(data), np.abs(data), -1)
    ref_rows = np.argsort(-a, axis=0, kind="stable")[:k]  # ties: the lower row first
    np.testing.assert_array_equal(got["top_rows"], ref_rows)
    np.testing.assert_array_equal(got["top_values"], np.take_along_axis(data, ref_rows, axis=0))


def test_topk_ties_go_to_the_lower_row():
    x = np.zeros((300, 3), np.float32)
    x[[250, 10, 100, 40], 0] = [5, 5, -5, 5]
    x[:, 1] = 1.0  # every row ties
    got = stats.reduction(da.from_array(x, chunks=(64, 3)), "topk", k=3).compute()
    assert got["top_rows"][:, 0].tolist() == [10, 40, 100]
    assert got["top_values"][:, 0].tolist() == [5, 5, -5]
    assert got["top_rows"][:, 1].tolist() == [0, 1, 2]


def test_merge_order_does_not_matter(data):
    blocks = [stats.Block(data[i:i + 100], i) for i in range(0, len(data), 100)]
    states = [stats.moments_chunk(b) for b in blocks]
    a = stats.moments_aggregate(stats.moments_combine(states))
    b = stats.moments_aggregate(stats.moments_combine([stats.moments_combine(states[7:]),
                                                       stats.moments_combine(states[:7][::-1])]))
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-10)
    tops = [stats.topk_chunk(b, 5) for b in blocks]
    t1 = stats.topk_combine(tops, 5)
    t2 = stats.topk_combine([stats.topk_combine(tops[::-1][:4], 5), stats.topk_combine(tops[::-1][4:], 5)], 5)
    np.testing.assert_array_equal(t1["rows"], t2["rows"])


def test_sequence_moments_and_kurtosis_against_numpy():
    rng = np.random.default_rng(1)
    lengths = [5, 40, 1, 33, 21]
    x = (rng.standard_normal((sum(lengths), 16)) ** 3).astype(np.float32)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    # blocks that split sequences, merged in a scrambled order
    cuts = [0, 3, 30, 46, 47, 80, 100]
    states = [stats.seq_moments_chunk(stats.Block(x[a:b], a), seq[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    out = stats.seq_moments_aggregate(stats.seq_moments_combine([stats.seq_moments_combine(states[3:]),
                                                                 stats.seq_moments_combine(states[:3][::-1])]))
    assert out["seq"].tolist() == list(range(len(lengths)))
    for s in range(len(lengths)):
        v = x[seq == s].astype(np.float64).ravel()
        kurt = np.mean((v - v.mean()) ** 4) / (v.var() ** 2 + 1e-6)
        assert out["kurtosis"][s] == pytest.approx(kurt, rel=1e-6)
        assert out["max_norm"][s] == pytest.approx(np.abs(v).max())


def test_kurtosis_reference_values():
    """Bondarenko et al.: Gaussian ≈ 3; one value m = 60 per d = 4096 ≈ 897."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 4096)).astype(np.float32)
    seq = np.zeros(64, np.int64)
    gauss = stats.seq_moments_aggregate(stats.seq_moments_chunk(stats.Block(x), seq))["kurtosis"][0]
    assert gauss == pytest.approx(3.0, abs=0.05)
    x[:, 11] = 60
    spiky = stats.seq_moments_aggregate(stats.seq_moments_chunk(stats.Block(x), seq))["kurtosis"][0]
    assert spiky == pytest.approx(897, rel=0.01)


def test_histogram_quantiles_are_exact_for_equal_values_and_within_a_bin_otherwise():
    rng = np.random.default_rng(3)
    vals = np.concatenate([np.full(300, -20.0), rng.uniform(6, 50, 1000)])
    cols = np.concatenate([np.zeros(300, np.int64), np.ones(1000, np.int64)])
    state = stats.hist_combine([stats.hist_from_values(cols[i::3], vals[i::3], 6.0) for i in range(3)])
    c0, s0 = stats.hist_column(state, 0, 6.0)
    assert stats.hist_quantiles(c0, s0, (0.25, 0.5, 0.75)) == [-20.0, -20.0, -20.0]
    c1, s1 = stats.hist_column(state, 1, 6.0)
    got = stats.hist_quantiles(c1, s1, (0.25, 0.5, 0.75))
    np.testing.assert_allclose(got, np.quantile(vals[300:], [0.25, 0.5, 0.75]), rtol=0.011)
    assert c1[: stats.hist_bins(6.0)].sum() == 0  # nothing negative in column 1


def test_layer_norm_matches_the_formula_and_reweighting_recovers_ln2():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 32)).astype(np.float32) * 3 + 1
    w1, b1 = rng.uniform(0.5, 2, 32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    w2, b2 = rng.uniform(0.5, 2, 32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer_norm(x, w1, b1, 1e-5), ref * w1 + b1, rtol=1e-4, atol=1e-5)
    z = normalize(x, 1e-5, np.empty_like(x))
    np.testing.assert_allclose(affine(z, w2, b2, np.empty_like(x)), ref * w2 + b2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reweight_ln(layer_norm(x, w1, b1, 1e-5), w1, b1, w2, b2), ref * w2 + b2,
                               rtol=1e-4, atol=1e-4)


def test_scratch_buffers_do_not_leak_into_results():
    """States computed with reused buffers equal states computed with fresh arrays."""
    rng = np.random.default_rng(5)
    scratch = stats.Scratch()
    xs = [rng.standard_normal((300, 20)).astype(np.float16) for _ in range(3)]
    with_scratch = []
    for x in xs:
        b = stats.Block(x, 0, scratch, "t.")
        with_scratch.append((stats.topk_chunk(b, 4), stats.moments_chunk(b), stats.max_abs_chunk(b)))
    for x, (top, mom, mx) in zip(xs, with_scratch):
        b = stats.Block(x, 0)
        np.testing.assert_array_equal(top["values"], stats.topk_chunk(b, 4)["values"])
        np.testing.assert_array_equal(mom["m2"], stats.moments_chunk(b)["m2"])
        np.testing.assert_array_equal(mx["max"], stats.max_abs_chunk(b)["max"])
