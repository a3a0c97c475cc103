"""Harvest-time statistics (issue 15): the harvest's running statistics equal the offline scan."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.scan import ScanParams, run_scan
from harvest.runner import run
from harvest.statistics import (THRESHOLD, TOP_K, StatisticsAccumulator, StatisticsPlan, load_statistics, pack,
                                unpack)
from harvest.store import open_group

HOOKS = ("blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post")


def scan_index(path) -> dict:
    params = ScanParams(top_k=TOP_K, index_threshold=THRESHOLD)
    return run_scan(path, params, index=True, outliers=False, scheduler="sync").index


def assert_same(stats, index: dict, hooks=None) -> None:
    """Counts, max and top-k exactly; the mean to float64 rounding; the std to float32 rounding (the
    shared ``moments_chunk`` squares each deviation in float32, so how rows are split into blocks, a
    batch here and ~8 MiB in the scan, moves it by ~1e-8 relative)."""
    hooks = hooks or list(index)
    assert sorted(stats.hooks) == sorted(hooks)
    for hook in hooks:
        got, want = stats.hooks[hook], index[hook]
        for key in ("count", "count_ge", "max_abs", "top_rows", "top_values"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{hook} {key}")
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12, atol=1e-15, err_msg=f"{hook} mean")
        np.testing.assert_allclose(got["std"], want["std"], rtol=1e-6, err_msg=f"{hook} std")


def harvest(make_spec, ckpt, name, hooks=HOOKS, **capture):
    spec = make_spec(ckpt, hooks=hooks, capture={"statistics": True, **capture},
                     store={"path": f"{name}.zarr"})
    return run(spec, progress=False).path


def test_positions_all_equals_the_offline_scan(neox_ckpt, make_spec):
    path = harvest(make_spec, neox_ckpt, "all")
    stats = load_statistics(open_group(path))
    assert stats is not None
    assert_same(stats, scan_index(path))


def test_sampled_positions_equal_the_scan_of_every_position(gptj_ckpt, make_spec):
    hooks = ("ln1", "resid_post", "mlp_out")  # GPT-J has no ln2; mlp_out is stored but has no statistics
    sampled = harvest(make_spec, gptj_ckpt, "sampled", hooks, positions={"sample": 5, "seed": 3})
    full = harvest(make_spec, gptj_ckpt, "full", hooks)
    stats = load_statistics(open_group(sampled))
    index = scan_index(full)
    assert_same(stats, index, [h for h in index if "mlp_out" not in h])
    n_sampled = open_group(sampled)["tokens"].shape[0]
    hook = next(iter(stats.hooks))
    assert stats.tokens(hook) == open_group(full)["tokens"].shape[0] > n_sampled


def test_accumulator_folds_in_batch_order_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    starts = np.array([0, 5, 12, 20, 31], np.int64)
    values = rng.standard_normal((31, 16)).astype(np.float32) * 4
    values[7, 3] = np.nan
    plan = StatisticsPlan(("h",), 4, 6.0, starts)
    acc = StatisticsAccumulator(plan)
    for b, (s0, s1) in enumerate([(0, 2), (2, 3), (3, 4)]):
        acc.add(b, s0, {"h": values[starts[s0]:starts[s1]]})
    acc.fold(2)
    assert acc.through == 2 and list(acc.pending) == [2]
    resumed = StatisticsAccumulator(plan, 2, unpack(*pack(acc)))
    resumed.add(1, 2, {"h": values[12:20]})  # a batch already folded is not counted again
    resumed.add(2, 3, {"h": values[20:31]})
    resumed.fold(3)
    acc.fold(3)
    for key, want in acc.results()["h"].items():
        np.testing.assert_array_equal(resumed.results()["h"][key], want)
    got = acc.results()["h"]
    finite = np.where(np.isfinite(values), values, 0)
    assert got["nonfinite"][3] == 1 and got["count"][3] == 30
    np.testing.assert_allclose(got["mean"][0], values[:, 0].astype(np.float64).mean(), rtol=1e-12)
    np.testing.assert_array_equal(got["max_abs"], np.abs(finite).max(axis=0))
    np.testing.assert_array_equal(got["count_ge"], (np.abs(finite) >= 6).sum(axis=0))
