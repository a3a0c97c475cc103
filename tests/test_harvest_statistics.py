"""Harvest-time statistics (issue 15): the harvest's running statistics equal the offline scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from analysis.scan import ScanParams, run_scan
from harvest.runner import run
from harvest.statistics import (THRESHOLD, TOP_K, StatisticsAccumulator, StatisticsPlan, load_statistics, pack,
                                unpack)
from harvest.store import open_group

HOOKS = ("blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post")

#: the statistics' kernels a test runs with: the CPU row pass (the default here), torch.compile's (as on an
#: accelerator), the eager torch ops (neither could be built)
KERNELS = ["row pass", "compiled", "eager"]


def use_kernel(kernel: str, request) -> None:
    """Take ``kernel`` (one of :data:`KERNELS`) for the rest of the test."""
    if kernel != "row pass":
        request.getfixturevalue({"compiled": "torch_kernels", "eager": "eager_kernel"}[kernel])


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


@pytest.mark.parametrize("kernel", KERNELS)
def test_positions_all_equals_the_offline_scan(neox_ckpt, make_spec, kernel, request):
    use_kernel(kernel, request)
    path = harvest(make_spec, neox_ckpt, f"all-{kernel}")
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


def assert_identical(a, b) -> None:
    """Bit for bit: the same floating-point operations in the same order."""
    assert a.hooks.keys() == b.hooks.keys() and a.batches == b.batches
    for hook in a.hooks:
        for key, value in a.hooks[hook].items():
            np.testing.assert_array_equal(value, b.hooks[hook][key], err_msg=f"{hook} {key}")


@pytest.mark.slow
def test_one_two_three_stages_give_identical_statistics(neox_ckpt, make_spec, ray_session):
    stats = {}
    for n in (1, 2, 3):
        spec = make_spec(neox_ckpt, hooks=HOOKS, capture={"statistics": True, "positions": {"sample": 4, "seed": 1}},
                         run={"stages": n, "threads": 1}, store={"path": f"s{n}.zarr", "chunks_per_shard": 4},
                         prompts={"max_sequences": 14})
        stats[n] = load_statistics(open_group(run(spec, progress=False).path))
    assert len(stats[1].hooks) == 12
    assert_identical(stats[1], stats[2])
    assert_identical(stats[1], stats[3])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("killed, resumed", [({}, {}), ({}, {"stages": 2, "replicas": 2}),
                                             ({"replicas": 2}, {"stages": 2})],
                         ids=["same", "r1s1-to-r2s2", "r2s1-to-r1s2"])
def test_sigkill_then_resume_gives_identical_statistics(make_checkpoint, make_spec, tmp_path, killed, resumed):
    """A driver killed with SIGKILL, resumed with the same or another run.replicas and run.stages: the
    statistics are the uninterrupted run's, bit for bit."""
    import os
    import signal
    import time

    import yaml

    import subprocess
    import sys

    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])  # this checkout's harvest, whatever the venv installed

    def start_run(spec_path, cwd, *extra):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen([sys.executable, "-m", "harvest", "run", str(spec_path), "--quiet", *extra], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def batches_done(path) -> int:
        try:
            return int(zarr.open_group(str(path), mode="r")["_progress/stage_0"][...].sum())
        except Exception:  # the manifest is being created or rewritten right now
            return 0

    ckpt = make_checkpoint("gpt_neox", hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=768)
    raw = make_spec(ckpt, hooks=HOOKS, raw=True, run={"batch_size": 2, "threads": 1},
                    capture={"statistics": True, "positions": {"sample": 8, "seed": 2}},
                    prompts={"seq_len": 64, "mode": "packed", "max_sequences": 120},
                    store={"chunk_mib": 0.02, "chunks_per_shard": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**raw, "run": {**raw["run"], **killed}}))
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump({**raw, "run": {**raw["run"], **resumed}}))
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump({**raw, "store": {**raw["store"], "path": "clean.zarr"}}))
    store = tmp_path / "stores" / "job.zarr"
    proc = start_run(tmp_path / "job.yaml", tmp_path)
    while batches_done(store) < 3:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = batches_done(store)
    again = start_run(tmp_path / "resume.yaml", tmp_path, "--resume")
    assert again.wait(timeout=300) == 0, again.communicate()[1]
    clean = start_run(tmp_path / "clean.yaml", tmp_path)
    assert clean.wait(timeout=300) == 0, clean.communicate()[1]
    n_batches = open_group(store).attrs["harvest"]["layout"]["n_batches"]
    assert 3 <= killed_at < n_batches
    clean_stats = load_statistics(open_group(tmp_path / "stores" / "clean.zarr"))
    assert_identical(load_statistics(open_group(store)), clean_stats)
    assert "statistics_dropped" not in open_group(store).attrs["harvest"]
    # one snapshot is left: the prefix of every unit; no unit's own
    assert sorted(open_group(store)["analysis/statistics/prefix"].group_keys()) == [f"batch_{n_batches:08d}"]
    assert not list(open_group(store)["analysis/statistics/stage_0"].keys())


def test_query_answers_from_the_statistics_and_says_so(neox_ckpt, make_spec):
    from analysis.query import format_query, query_dim

    path = harvest(make_spec, neox_ckpt, "query", positions={"sample": 5, "seed": 3})
    stats = load_statistics(open_group(path))
    hook = "blocks.2.hook_resid_post"
    dim = int(np.argmax(stats.hooks[hook]["max_abs"]))
    q = query_dim(path, dim, hook=hook)  # no index was built: the statistics answer alone
    rows = int(open_group(path)["tokens"].shape[0])
    assert q["source"] == f"harvest-time statistics over {stats.tokens(hook):,} tokens (every position); " \
                          f"the store keeps {rows:,} rows"
    assert q["layers"][0]["count"] == stats.tokens(hook) > rows
    top = q["examples"]["items"][0]
    assert top["value"] == pytest.approx(float(stats.hooks[hook]["top_values"][0, dim]))
    # the top token need not be stored: its context decodes from input_ids
    ids = np.asarray(open_group(path)["input_ids"][...])
    assert top["token_id"] == ids[top["seq"], top["pos"]]
    assert "from harvest-time statistics over" in format_query(q)


def test_topk_through_candidates_equals_topk_combine():
    """The harvest's top-k shortcut ranks only the values that can enter; ties (values rounded to a
    coarse grid) go to the lower row exactly as ``topk_combine`` sends them."""
    from harvest.statistics import Block, topk_candidates, topk_chunk, topk_combine, topk_merge

    rng = np.random.default_rng(1)
    k, state, want = 5, None, None
    for b in range(12):
        x = np.round(rng.standard_normal((37, 9)) * 2).astype(np.float32)
        x[3, 2] = np.inf
        block = Block(x, b * 37)
        state = topk_merge(state, topk_candidates(state, block, k), k)
        chunk = topk_chunk(block, k)
        want = chunk if want is None else topk_combine([want, chunk], k)
        np.testing.assert_array_equal(state["rows"], want["rows"])
        np.testing.assert_array_equal(state["values"], want["values"])


@pytest.mark.parametrize("rows", [3, 6, 40])
def test_a_non_finite_value_is_padding_in_a_top_k_never_a_row(rows):
    """A block with NaN/inf (``on_nonfinite: flag``), some columns with fewer finite values than k: its
    top-k is each column's finite values by |x| descending, ties to the lower row, then padding (row -1,
    value 0): the order every merge relies on. Merging later candidates into it (``_merge_sparse``, placing
    each entry by what outranks it) must then agree with ranking everything; a non-finite row ranked among
    the zeros once left a slot unwritten there."""
    from harvest.statistics import Block, _merge_sparse, topk_chunk, topk_combine, topk_fold, topk_merge

    rng = np.random.default_rng(rows)
    k, d = 5, 7
    x = np.round(rng.standard_normal((rows, d))).astype(np.float32)  # many zeros and ties
    x[rng.random((rows, d)) < 0.3] = np.inf
    x[0, 1], x[:, 4] = np.nan, np.inf  # column 4: nothing finite
    x[:, 5] = 0  # column 5: ties at 0 only
    top = topk_chunk(Block(x, 10), k)
    assert top["rows"].shape == (min(k, rows), d)
    for c in range(d):
        finite = np.flatnonzero(np.isfinite(x[:, c]))
        want = finite[np.lexsort((finite, -np.abs(x[finite, c])))][:k]
        got = top["rows"][:, c]
        np.testing.assert_array_equal(got[:want.size], want + 10)
        np.testing.assert_array_equal(top["values"][:want.size, c], x[want, c])
        assert (got[want.size:] == -1).all() and (top["values"][want.size:, c] == 0).all()
    later = np.round(rng.standard_normal((30, d))).astype(np.float32)
    r, c = np.nonzero(np.abs(later) >= 0)  # every entry a candidate: zeros tie with the kept ones
    merged = topk_merge(top, {"rows": r + 100, "cols": c, "values": later[r, c], "dims": d}, k)
    want = topk_combine([top, topk_chunk(Block(later, 100), k)], k)
    np.testing.assert_array_equal(merged["rows"], want["rows"])
    np.testing.assert_array_equal(merged["values"], want["values"])
    before, unit = topk_chunk(Block(later, 0), k), topk_chunk(Block(x, 30), k)  # a unit with non-finite rows
    folded, want = topk_fold(before, unit, k), topk_combine([before, unit], k)
    np.testing.assert_array_equal(folded["rows"], want["rows"])
    np.testing.assert_array_equal(folded["values"], want["values"])
    assert (merged["rows"] < 200).all() and (folded["rows"] < 200).all()
    unranked = {"rows": np.array([[5], [6]]), "values": np.array([[0], [0.5]], np.float32)}
    with pytest.raises(RuntimeError, match="left a slot empty"):  # a merge never writes garbage rows
        _merge_sparse(unranked, {"rows": np.array([9]), "cols": np.array([0]), "values": np.array([0.3], np.float32)}, 2)


@pytest.mark.parametrize("seed", range(4))
def test_merging_sparse_candidates_equals_ranking_everything(seed):
    """The merge places each candidate by counting what outranks it; ranking the state and the candidates
    together (``topk_combine``) must agree: ties on a coarse grid, padded columns (row -1), one column
    taking many candidates and most none, negative values, zeros."""
    from harvest.statistics import _merge_sparse, empty_top, topk_combine, topk_merge

    rng = np.random.default_rng(seed)
    k, dims = 6, 11
    values = np.round(rng.standard_normal((40, dims)) * 2).astype(np.float32)
    state = topk_combine([empty_top(dims, k), {"rows": np.arange(3)[:, None].repeat(dims, 1),
                                               "values": values[:3]}], k)  # three real rows, then padding
    state = topk_merge(state, {"rows": np.repeat(np.arange(3, 40), dims), "cols": np.tile(np.arange(dims), 37),
                               "values": values[3:].ravel()}, k)
    state["rows"][:, 4], state["values"][:, 4] = -1, 0  # a column with nothing yet
    new = np.round(rng.standard_normal((30, dims)) * 2).astype(np.float32)
    r, c = np.nonzero((np.abs(new) >= 1) & ((np.arange(dims) % 3 == 0) | (rng.random((30, dims)) < 0.2)))
    candidates = {"rows": r + 100, "cols": c, "values": new[r, c]}
    dense = {"rows": np.full((30, dims), -1, np.int64), "values": np.zeros((30, dims), np.float32)}
    dense["rows"][r, c], dense["values"][r, c] = r + 100, new[r, c]
    dense = topk_combine([dense], 30)  # the same candidates, each column sorted, padded
    want = topk_combine([state, dense], k)
    got = _merge_sparse(state, candidates, k)
    np.testing.assert_array_equal(got["rows"], want["rows"])
    np.testing.assert_array_equal(got["values"], want["values"])


def test_analyze_outliers_says_both_counts(neox_ckpt, make_spec):
    from analysis.outliers import analyze_outliers, format_report

    path = harvest(make_spec, neox_ckpt, "both", positions={"sample": 5, "seed": 3})
    rep = analyze_outliers(path, scheduler="sync", plots=False, write=False)
    h = rep.report["harvest_statistics"]
    assert h["tokens"] > h["rows"] == open_group(path)["tokens"].shape[0]
    assert f"cover {h['tokens']:,} tokens (the store keeps {h['rows']:,} rows)" in format_report(rep.report)


def test_statistics_spec_errors_are_one_line(neox_ckpt, make_spec):
    from harvest.errors import HarvestError, SpecError
    from harvest.runner import prepare
    from harvest.spec import parse_spec

    raw = make_spec(neox_ckpt, raw=True, capture={"statistics": "yes"})
    with pytest.raises(SpecError, match=r"capture\.statistics must be true or false or a list of strings or null, "
                                        r"got 'yes'"):
        parse_spec(raw)
    spec = make_spec(neox_ckpt, hooks=["resid_post", "z"], capture={"statistics": ["z"]})
    with pytest.raises(SpecError, match="capture.statistics names blocks.0.attn.hook_z, which has no single row per"):
        prepare(spec)
    spec = make_spec(neox_ckpt, hooks=["blocks.1.resid_post"], capture={"statistics": ["blocks.3.ln1"]})
    with pytest.raises(HarvestError, match="names blocks.3.ln1.hook_normalized, but this harvest runs blocks 0..1"):
        prepare(spec)


def test_statistics_are_on_by_default_and_off_when_asked(neox_ckpt, make_spec):
    on = run(make_spec(neox_ckpt, hooks=["resid_post", "mlp_out"], store={"path": "default.zarr"}), progress=False)
    stats = load_statistics(open_group(on.path))
    assert sorted(stats.hooks) == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert open_group(on.path).attrs["harvest"]["spec"]["capture"]["statistics"] is True
    off = run(make_spec(neox_ckpt, hooks=["resid_post"], capture={"statistics": False}, store={"path": "off.zarr"}),
              progress=False)
    assert load_statistics(open_group(off.path)) is None and "analysis" not in open_group(off.path)


def test_statistics_of_hooks_that_are_not_stored_equal_the_scan_of_a_store_that_keeps_them(gptj_ckpt, make_spec):
    """Named hooks (ln1, mlp_out) that are not stored, at sampled positions: the statistics equal the
    scan of every position of a store that stores them."""
    sampled = harvest(make_spec, gptj_ckpt, "unstored", ("resid_post",), positions={"sample": 3, "seed": 1},
                      statistics=["ln1", "mlp_out"])
    full = harvest(make_spec, gptj_ckpt, "stored", ("ln1", "resid_post", "mlp_out"))
    group = open_group(sampled)
    assert "blocks.0.ln1.hook_normalized" not in group and "blocks.0.hook_mlp_out" not in group
    assert_same(load_statistics(group), scan_index(full))


# --- Dettmers' criterion from the statistics alone ---------------------------------------------------

REPORT_ARRAYS_EXACT = ("layers", "is_outlier", "outlier_dims", "hits", "max_abs", "nonfinite", "layer_seq_frac",
                       "hits_per_sequence", "hist_dims", "hist_counts")
REPORT_ARRAYS_CLOSE = ("layer_frac", "pos_frac", "seq_frac", "share_sq_norm", "hist_sums")


def assert_same_criterion(from_stats, from_scan) -> None:
    """Counts exactly; fractions and sums to float64 rounding (summed in another order), the share of
    ‖x‖² to float32 (the report stores it as float32)."""
    a, b = from_stats.arrays, from_scan.arrays
    for key in REPORT_ARRAYS_EXACT:
        np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=key)
    for key in REPORT_ARRAYS_CLOSE:
        np.testing.assert_allclose(a[key][0], b[key][0], rtol=1e-6 if key == "share_sq_norm" else 1e-12,
                                   err_msg=key)
    ra, rb = from_stats.report, from_scan.report
    assert ra["groups"] == rb["groups"] and ra["rows"] == rb["rows"]
    assert ra["values"] == rb["values"]
    assert [o["dim"] for o in ra["outlier_dims"]] == [o["dim"] for o in rb["outlier_dims"]]
    assert [m["dim"] for m in ra["near_misses"]] == [m["dim"] for m in rb["near_misses"]]


def criterion_both_ways(path, **fractions):
    from analysis.outliers import analyze_outliers

    params = ScanParams(**fractions)
    kw = dict(write=False, plots=False, index=False, scheduler="sync")
    return analyze_outliers(path, params, source="statistics", **kw), analyze_outliers(path, params, source="scan", **kw)


@pytest.fixture(scope="module")
def planted_neox(make_checkpoint, tmp_path_factory):
    from analysis.synthetic import plant_residual_dim

    return plant_residual_dim(make_checkpoint("gpt_neox"), tmp_path_factory.mktemp("planted") / "neox", "gpt_neox", 13)


@pytest.mark.parametrize("fractions", [{}, {"layer_frac": 0.5, "pos_frac": 0.01}, {"layer_frac": 0.0, "pos_frac": 0.0}])
def test_dettmers_criterion_from_the_statistics_equals_the_scan(planted_neox, make_spec, fractions):
    path = harvest(make_spec, planted_neox, f"dettmers{len(fractions)}", ("ln1", "ln2", "resid_post"))
    from_stats, from_scan = criterion_both_ways(path, **fractions)
    assert from_stats.report["harvest_statistics"]["source"] == "statistics"
    assert from_scan.outlier_dims and from_stats.report["values"]["ge_magnitude"] > 0
    assert_same_criterion(from_stats, from_scan)


def test_the_criterion_falls_back_to_the_scan_and_says_why(planted_neox, make_spec):
    from analysis.outliers import analyze_outliers

    path = harvest(make_spec, planted_neox, "fallback", ("ln1", "ln2"))
    rep = analyze_outliers(path, ScanParams(magnitude=5.0), write=False, plots=False, index=False, scheduler="sync")
    assert "counted |x| >= 6 at harvest time" in rep.report["harvest_statistics"]["note"]
    with pytest.raises(Exception, match="--aggregate corpus"):
        analyze_outliers(path, ScanParams(aggregate="corpus"), write=False, plots=False, source="statistics")


def test_hits_are_counted_for_layernorms_that_are_not_stored(planted_neox, make_spec):
    """Only resid_post stored: the statistics still saw ln1 and ln2 of every layer (the scan derives them)."""
    path = harvest(make_spec, planted_neox, "resid_only", ("resid_post",))
    from_stats, from_scan = criterion_both_ways(path)
    assert from_stats.outlier_dims == from_scan.outlier_dims == [13]
    assert [s["ln"] for s in from_stats.report["hidden_states"]["sources"]][:2] == ["ln1", "ln2"]


@pytest.mark.slow
def test_dettmers_statistics_of_two_stages_equal_the_scan_and_one_stage(planted_neox, make_spec, ray_session):
    from harvest.statistics import load_dettmers

    paths = {}
    for n in (1, 2):
        spec = make_spec(planted_neox, hooks=("ln1", "ln2", "resid_post"), capture={"statistics": True},
                         run={"stages": n, "threads": 1}, store={"path": f"d{n}.zarr"})
        paths[n] = run(spec, progress=False).path
    a, b = (load_dettmers(open_group(paths[n])) for n in (1, 2))
    assert len(b.states) == 1 and a.sources == b.sources  # the two stages' states merged, per unit
    for key, value in a.reduce(0.25, 0.06).items():
        np.testing.assert_array_equal(value if not isinstance(value, dict) else value["count"],
                                      b.reduce(0.25, 0.06)[key] if not isinstance(value, dict)
                                      else b.reduce(0.25, 0.06)[key]["count"], err_msg=key)
    assert_same_criterion(*criterion_both_ways(paths[2]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lengths", [(3, 9), (10, 40)])  # batches shorter than a group; several groups and a tail
def test_device_kernels_equal_the_host_kernels(lengths, kernel, request):
    """harvest.running (torch, per batch) + the accumulator give the host kernels' counts, max, NaN/inf
    and top-k exactly and their moments to float64 rounding, through the dense and the candidate phases."""
    import torch

    use_kernel(kernel, request)

    from harvest.running import DeviceStatistics

    rng = np.random.default_rng(1)
    starts = np.cumsum([0] + [int(n) for n in rng.integers(*lengths, 12)]).astype(np.int64)
    values = (rng.standard_normal((int(starts[-1]), 24)) * 3).astype(np.float32)
    values[4, 5] = np.nan
    values[30, 7] = np.inf
    values[::7, 11] = 9.0  # ties across rows
    plan = StatisticsPlan(("h",), 4, 6.0, starts)
    host, device = StatisticsAccumulator(plan), StatisticsAccumulator(plan)
    kernels = DeviceStatistics(("h",), 4, 6.0)
    stale = {}
    kernels.floors = lambda: stale  # the device sees the host's floor one batch late (as behind a queue)
    phases = []
    for b, (s0, s1) in enumerate([(0, 1), (1, 3), (3, 4), (4, 8), (8, 12)]):
        rows = values[starts[s0]:starts[s1]]
        host.add(b, s0, {"h": rows})
        out = kernels.batch({"h": torch.from_numpy(rows.copy())})
        phases.append("dense" if "stats:h:dense" in out else "candidates")
        device.add(b, s0, {k: v.numpy() for k, v in out.items()})
        stale = device.floors()
    host.fold(5)
    device.fold(5)
    got, want = device.results()["h"], host.results()["h"]
    assert int(want["nonfinite_total"]) == 2 and want["top_rows"].shape == (4, 24)
    assert phases[0] == "dense" and phases[-1] == "candidates"
    for key in ("count", "count_ge", "max_abs", "top_rows", "top_values", "nonfinite", "nonfinite_rows",
                "nonfinite_first_row"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
    np.testing.assert_allclose(got["std"], want["std"], rtol=1e-6)  # the host squares deviations in float32
    exact = np.where(np.isfinite(values), values, np.nan).astype(np.float64)
    np.testing.assert_allclose(got["std"], np.nanstd(exact, axis=0), rtol=1e-12)  # the device: float64 throughout


def test_a_units_first_batch_leaves_the_device_sparse_and_ranks_exactly():
    """No host floor (a unit's first batch): the device takes its own, the k-th largest group max, and sends
    only the values at or above it: far fewer than the batch, and the same top-k as the host's from the rows
    (ties to the lower row, an all-zero column, a short last group of padded rows)."""
    import torch

    from harvest.running import GROUP, DeviceStatistics

    rng = np.random.default_rng(7)
    tokens, d, k = 8 * GROUP * 4 + 5, 16, 4
    values = (rng.standard_normal((tokens, d)) * 2).astype(np.float16).astype(np.float32)  # fp16: many ties
    values[:, 3] = 0.0
    values[::9, 5] = 7.0
    plan = StatisticsPlan(("h",), k, 6.0, np.arange(tokens + 1, dtype=np.int64))
    host, device = StatisticsAccumulator(plan), StatisticsAccumulator(plan)
    kernels = DeviceStatistics(("h",), k, 6.0)
    assert "stats:h:dense" in kernels.batch({"h": torch.from_numpy(values.copy())})  # on a CPU: the rows
    kernels.sparse_first_batch = True  # as on an accelerator
    out = kernels.batch({"h": torch.from_numpy(values.copy())})
    assert "stats:h:dense" not in out
    assert 0 < out["stats:h:values"].numel() < values.size // 4 and int(out["stats:h:rows"].min()) >= 0
    host.add(0, 0, {"h": values})
    device.add(0, 0, {key: v.numpy() for key, v in out.items()})
    host.fold(1)
    device.fold(1)
    got, want = device.results()["h"], host.results()["h"]
    for key in ("top_rows", "top_values", "count", "count_ge", "max_abs"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("kernel", KERNELS)
def test_device_sums_are_float64_sums_of_the_float32_rows(kernel, request):
    """The device's exact scheme (float32 rows in float64, summed in one pass by the compiled kernel, or
    copied and summed by a product with ones): the sum within float64 rounding of the exact sum
    (``math.fsum``), the sum of squares too (a float32 square is exact in float64)."""
    import math

    use_kernel(kernel, request)
    import torch

    from harvest.running import DeviceStatistics

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1000, 5)) * 10 + 1e3 * rng.standard_normal(5)).astype(np.float32)
    x[:, 4] = np.float32(0.1)  # a constant column: no cancellation lost to the scheme
    out = DeviceStatistics(("h",), 4, 6.0).batch({"h": torch.from_numpy(x)})
    xd = x.astype(np.float64)
    for name, terms in (("sum", xd), ("sumsq", xd * xd)):
        exact = np.array([math.fsum(terms[:, j]) for j in range(5)])
        bound = 1e-14 * np.abs(terms).sum(0)
        assert np.all(np.abs(out[f"stats:h:{name}"].numpy() - exact) <= bound), name


SYNCS = {"item", "tolist", "nonzero", "__bool__", "unique", "numpy", "masked_select", "__int__", "__float__",
         "__index__", "any", "all"}


def test_device_kernels_sync_twice_per_batch_whatever_the_number_of_hooks(torch_kernels):
    """On a GPU a ``nonzero``, ``.item()``, ``.tolist()`` or ``bool(tensor)`` waits for the stream: a batch's
    statistics read sizes from the device twice, not once per hook (counted here through torch's
    function mode, which sees every such call on any device; ``any``/``all`` count when their result is read)."""
    import torch

    from harvest.running import DeviceStatistics

    counted = {}
    for n_hooks in (2, 9):
        hooks = tuple(f"h{i}" for i in range(n_hooks))
        rng = np.random.default_rng(3)
        starts = np.arange(0, 8 * 50 + 1, 50, dtype=np.int64)
        plan = StatisticsPlan(hooks, 4, 6.0, starts)
        acc = StatisticsAccumulator(plan)
        kernels = DeviceStatistics(hooks, 4, 6.0)
        kernels.floors = acc.floors
        per_batch = []
        for b in range(4):  # dense, then candidates
            rows = {h: torch.from_numpy((rng.standard_normal((100, 32)) * 3).astype(np.float32)) for h in hooks}
            with _Syncs() as syncs:
                out = kernels.batch(rows)
            per_batch.append(syncs.calls)
            acc.add(b, 2 * b, {k: v.numpy() for k, v in out.items()})
        assert any(k.endswith(":values") and v.numel() for k, v in out.items())  # the candidate phase ran
        counted[n_hooks] = per_batch
    assert counted[2] == counted[9]
    assert all(calls == ["tolist", "tolist"] for calls in counted[9]), counted[9]


class _Syncs:
    """Records the torch calls that read a device value on the host (a sync on a GPU)."""

    def __new__(cls):
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __init__(self):
                super().__init__()
                self.calls: list[str] = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in SYNCS - {"any", "all"}:
                    self.calls.append(name)
                return func(*args, **(kwargs or {}))

        return Mode()


@pytest.mark.parametrize("kernel", ["compiled", "eager"])  # the hits never take the CPU row pass
@pytest.mark.parametrize("padded,nan", [(False, False), (True, False), (True, True)])
def test_device_hits_equal_the_value_by_value_path_with_two_syncs_per_batch(padded, nan, kernel, request):
    """``harvest.hits`` through the group maxima (two syncs per batch; compiled, or the eager ops) gives
    what the value-by-value path (``Hits._source``, which a hidden state with a NaN/inf takes) gives,
    and the same bitmask."""
    import torch

    use_kernel(kernel, request)
    from torch import nn

    from harvest.hits import Hits
    from harvest.running import DeviceStatistics, lockstep
    from harvest.statistics import HitPlan

    rng = np.random.default_rng(5)
    batch, width, d = 3, 48, 24  # 144 tokens: whole groups of 16, the compiled kernel's
    sources = tuple(f"blocks.{i}.ln1.hook_normalized" for i in range(4))
    ys = [torch.from_numpy((rng.standard_normal((batch, width, d)) * 2.5).astype(np.float32)) for _ in sources]
    ys[1][:, :, 3] = 7.0  # a dimension over the magnitude everywhere, padding included
    ys[2][1, 5, 9] = -6.0  # exactly the magnitude
    if nan:
        ys[3][0, 2, 4], ys[3][2, 1, 0] = float("nan"), float("inf")  # source 3 takes the slow path
    lengths = torch.tensor([width, 17, 33] if padded else [width] * batch)
    real = torch.arange(width)[None, :] < lengths[:, None]

    class Feed(nn.Module):
        def __init__(self, y):
            super().__init__()
            self.y = y

        def forward(self):
            return self.y

    modules = {name: Feed(y) for name, y in zip(sources, ys)}
    hits = Hits(HitPlan(sources, 6.0, False, d), modules, torch.float32)
    kernels = DeviceStatistics(sources, 4, 6.0)
    kernels.floors = lambda: {name: np.full(d, 5.0, np.float32) for name in sources}
    out, stats = {}, {}
    with _Syncs() as syncs:
        with hits.attached(lengths, width, None, out, padded=padded) as batch_hits:
            for name in sources:
                modules[name]()
        # the hits and the statistics of a batch read the device together: twice in all
        lockstep([batch_hits.steps(), kernels.steps({n: y.reshape(-1, d) for n, y in zip(sources, ys)}, stats)])
    if not nan:
        assert syncs.calls == ["tolist", "tolist"], syncs.calls
    assert stats[f"stats:{sources[1]}:values"].numel()
    handed = batch_hits.handed
    want: dict = {}
    mask = torch.zeros((batch, width, d), dtype=torch.bool)
    for name, y in zip(sources, ys):
        hits._source(name, y, real if padded else None, mask, want)
    assert sorted(out) == sorted(want)
    for key in want:
        torch.testing.assert_close(out[key], want[key], rtol=0, atol=0, msg=key)
    assert int((out[f"dettmers:{sources[1]}:where"][:, 2] == 3).sum()) == int(lengths.sum())  # padding is no hit
    assert int(out[f"dettmers:{sources[3]}:nonfinite"].sum()) == (2 if nan else 0)
    from harvest.hits import pack_bits

    assert torch.equal(handed[0], pack_bits(mask))
    if kernel == "compiled":
        from harvest.running import MASKED_GROUP_MAX

        assert MASKED_GROUP_MAX.warm or MASKED_GROUP_MAX.failed, "the compiled pass was not taken"


def test_one_dimension_reads_a_few_small_ranges_of_the_snapshot(neox_ckpt, make_spec, monkeypatch):
    """``harvest query dim`` loads one column per hook: the snapshot's per-dimension arrays are one shard
    each, chunked along the columns, and loading dim 5 reads their shard indexes and one small chunk per
    hook (512 columns a chunk; 16 here, so that the toy's 64-wide hooks span several)."""
    from zarr.storage import LocalStore, WrapperStore

    from harvest import store as store_module
    from harvest.store import PER_DIMENSION

    monkeypatch.setattr(store_module, "STATISTICS_COLUMNS", 16)
    STATISTICS_COLUMNS = 16

    class Recording(WrapperStore):
        reads: list = []

        async def get(self, key, prototype, byte_range=None):
            out = await self._store.get(key, prototype, byte_range)
            if out is not None and "/analysis/statistics/" in f"/{key}" and key.split("/")[-1] != "zarr.json":
                Recording.reads.append((key, len(out)))
            return out

    path = harvest(make_spec, neox_ckpt, "dimread", hooks=("ln1", "ln2", "resid_post"))
    whole = load_statistics(open_group(path))
    group = zarr.open_group(Recording(LocalStore(str(path), read_only=True)), mode="r")
    one = load_statistics(group, dim=5)
    assert one.widths == whole.widths and one.dim == 5 and one.column(5) == 0
    for hook in whole.hooks:
        for key, value in whole.hooks[hook].items():
            if isinstance(value, np.ndarray) and value.ndim:
                np.testing.assert_array_equal(one.hooks[hook][key][..., 0], value[..., 5], err_msg=f"{hook} {key}")
    width = sum(whole.widths.values())
    snap = open_group(path)["analysis/statistics/prefix"]  # a finished job: every unit in the prefix
    arr = next(snap.groups())[1]["top_values"]
    assert width > STATISTICS_COLUMNS and arr.chunks[-1] == STATISTICS_COLUMNS and arr.shards[-1] >= arr.shape[-1]
    reads = [(k, n) for k, n in Recording.reads if k.split("/")[4] in PER_DIMENSION]
    assert {"mean", "m2", "top_rows", "top_values"} <= {k.split("/")[4] for k, _ in reads}  # zero chunks: unwritten
    stored = sum(a.nbytes_stored() for key, a in next(snap.groups())[1].arrays() if key in PER_DIMENSION)
    assert sum(n for _, n in reads) < stored / 2, (sum(n for _, n in reads), stored)  # not whole snapshots


def test_cli_source_option(planted_neox, make_spec):
    import json

    from typer.testing import CliRunner

    from harvest.cli import app

    path = harvest(make_spec, planted_neox, "cli", ("ln1", "ln2", "resid_post"))
    args = ["analyze", "outliers", str(path), "--json", "--no-plots", "--no-write", "--no-index"]
    stats = CliRunner().invoke(app, args + ["--source", "statistics", "--pos-frac", "0.5"])
    assert stats.exit_code == 0, stats.output
    out = json.loads(stats.output)
    assert out["harvest_statistics"]["source"] == "statistics" and out["params"]["pos_frac"] == 0.5
    auto = json.loads(CliRunner().invoke(app, args).output)  # every token stored: the scan, and why
    assert "every token is stored" in auto["harvest_statistics"]["note"]
    assert [o["dim"] for o in auto["outlier_dims"]] == [o["dim"] for o in out["outlier_dims"]] == [13]
    bad = CliRunner().invoke(app, args + ["--source", "statistics", "--magnitude", "4"])
    assert bad.exit_code != 0 and "counted |x| >= 6 at harvest time" in str(bad.exception)


def test_orphaned_snapshot_files_are_removed_on_resume(neox_ckpt, make_spec):
    """A kill while a snapshot was deleted or written can leave its files without its group metadata
    (zarr no longer lists it): the resumed writer removes them, and the snapshots its manifest does not count."""
    from harvest.runner import prepare
    from harvest.writer import resume_statistics

    spec = make_spec(neox_ckpt, hooks=("ln1",), store={"path": "orphans.zarr"})
    path = run(spec, progress=False).path
    stage_dir = path / "analysis/statistics/stage_0"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["zarr.json"]  # every unit folded into the prefix
    orphan = stage_dir / "unit_00000000_00000001" / "count_ge" / "c"
    orphan.mkdir(parents=True)
    (orphan / "0").write_bytes(b"torn")
    (stage_dir / "batch_00000001").mkdir()  # not a unit snapshot's name at all
    job = prepare(spec)
    assert resume_statistics(open_group(path), job.stage_info(job.stages[0])) is not None
    assert sorted(p.name for p in stage_dir.iterdir()) == ["zarr.json"]


def _interrupt_after(path, batches: int) -> None:
    """Make a finished store look like a run stopped after ``batches`` durable batches."""
    from harvest.store import read_provenance, write_provenance

    group = open_group(path, mode="r+")
    for name in group["_progress"].array_keys():
        group["_progress"][name][batches:] = 0
    info = read_provenance(group)
    info["status"] = "interrupted"
    write_provenance(group, info)


def _resumed_without_statistics(path, reference, reason: str | None) -> None:
    from harvest.store import STATISTICS_GROUP, read_provenance
    from sharding.verify import store_differences

    group = open_group(path)
    info = read_provenance(group)
    assert info["status"] == "complete" and info["spec"]["capture"]["statistics"] is False
    assert STATISTICS_GROUP not in group and load_statistics(group) is None  # nothing covers part of the job
    assert info.get("statistics_dropped", {}).get("reason") == reason
    assert store_differences(path, reference) == []  # the rows are the uninterrupted run's


def test_a_resume_that_cannot_continue_the_statistics_drops_them_and_says_so(neox_ckpt, make_spec, caplog):
    """Statistics count from batch 0 in one partition: a resume with other statistics keeps harvesting but
    deletes the partial snapshots and records why, rather than leaving statistics of part of the job."""
    reference = run(make_spec(neox_ckpt, store={"path": "ref.zarr"}), progress=False).path
    path = run(make_spec(neox_ckpt, store={"path": "changed.zarr"}), progress=False).path
    _interrupt_after(path, 2)
    other = make_spec(neox_ckpt, capture={"statistics": ["blocks.0.hook_resid_post"]}, store={"path": "changed.zarr"})
    with caplog.at_level("WARNING", logger="harvest.runner"):
        assert run(other, resume=True, progress=False).batches == 2
    assert "statistics dropped at batch 2" in caplog.text and "capture.statistics changed" in caplog.text
    _resumed_without_statistics(path, reference, "capture.statistics changed")

    began_without = run(make_spec(neox_ckpt, capture={"statistics": False}, store={"path": "none.zarr"}),
                        progress=False).path
    _interrupt_after(began_without, 1)
    run(make_spec(neox_ckpt, store={"path": "none.zarr"}), resume=True, progress=False)  # default: on
    _resumed_without_statistics(began_without, reference, None)  # they cannot start mid-job


#: a job of 12 batches in 6 units of 2 (packed sequences, one shard per 2 batches)
UNITS = {"store": {"chunks_per_shard": 1, "chunk_mib": 0.012}, "run": {"batch_size": 2},
         "prompts": {"max_sequences": 24, "mode": "packed", "seq_len": 16}}


def units_spec(make_spec, ckpt, path, run_=None, **capture):
    return make_spec(ckpt, hooks=("ln1", "ln2", "resid_post"), capture={"statistics": True, **capture},
                     store={**UNITS["store"], "path": path}, run={**UNITS["run"], **(run_ or {})},
                     prompts=UNITS["prompts"])


def assert_same_dettmers(a, b) -> None:
    """Dettmers' criterion the same: every count exactly (the histogram's sums add per stage first)."""
    assert a.sources == b.sources and a.tokens == b.tokens
    ra, rb = a.reduce(0.25, 0.06), b.reduce(0.25, 0.06)
    for key, value in ra.items():
        if isinstance(value, dict):
            value, other = value["count"], rb[key]["count"]
        else:
            other = rb[key]
        np.testing.assert_array_equal(value, other, err_msg=key)


def interrupt_at(monkeypatch, batch: int) -> None:
    """Stop an in-process run with Ctrl-C as batch ``batch`` is about to be computed."""
    from harvest.worker import StageWorker

    process = StageWorker.process

    def stopping(self, b, hidden):
        if b.index == batch:
            raise KeyboardInterrupt
        return process(self, b, hidden)

    monkeypatch.setattr(StageWorker, "process", stopping)


def test_compaction_folds_every_unit_once_in_unit_order(neox_ckpt, make_spec, monkeypatch):
    """The prefix snapshot is the left fold of the units in unit order, each counted once, whether it is
    compacted in one step or in several: bit for bit what a reader folds from the unit snapshots."""
    import harvest.statistics as statistics_module
    from harvest.statistics import JobState, compact_statistics, index_aggregate, load_dettmers, unit_state
    from harvest.store import read_snapshot, statistics_cover

    # keep every unit's own snapshot (the writer's ``Compactor`` and the runner call it from there)
    monkeypatch.setattr(statistics_module, "compact_statistics", lambda group, at_least=1, kept=None: 0)
    path = run(units_spec(make_spec, neox_ckpt, "units.zarr"), progress=False).path
    monkeypatch.undo()
    group = open_group(path, mode="r+")
    cover = statistics_cover(group)
    assert cover.prefix_name is None and [(a, b) for a, b, _ in cover.units] == [(a, a + 2) for a in range(0, 12, 2)]
    read_whole = load_statistics(group)  # the reader folds the six unit snapshots
    read_dettmers = load_dettmers(group)
    states = [unit_state([read_snapshot(group, n) for n in names]) for _, _, names in cover.units]
    in_order, backwards = JobState({}), JobState({})
    for state in states:
        in_order.fold(state)
    for state in reversed(states):
        backwards.fold(state)

    marks = group["_progress/stage_0"][...]
    group["_progress/stage_0"][6:] = 0  # as if units 3.. were not done yet: the prefix takes units 0..2
    assert compact_statistics(group) == 6
    seq_len = group["analysis/statistics/sequences/seq_len"]
    assert seq_len.shape == (12,)  # the per-sequence records of units 0..2, apart from the prefix
    group["_progress/stage_0"][...] = marks
    assert_identical(load_statistics(group), read_whole)  # prefix + the three units beyond
    assert compact_statistics(group) == 12
    assert statistics_cover(group).units == [] and list(group["analysis/statistics/prefix"].group_keys()) == [
        "batch_00000012"]
    assert not list(group["analysis/statistics/stage_0"].keys())
    # appended, not rewritten: the first units' records are where they were; the prefix holds none
    assert group["analysis/statistics/sequences/seq_len"].shape == (24,)
    assert "dettmers_seq_len" not in group["analysis/statistics/prefix/batch_00000012"]
    assert_same_dettmers(load_dettmers(group), read_dettmers)
    compacted = load_statistics(group)
    assert_identical(compacted, read_whole)
    assert_same(compacted, scan_index(path))  # every token once: the counts are the scan's
    differs = False
    for hook, stats in compacted.hooks.items():
        want = index_aggregate(in_order.hooks[hook])
        for key in ("count", "mean", "std", "max_abs", "top_rows", "top_values"):
            np.testing.assert_array_equal(stats[key], want[key], err_msg=f"{hook} {key}")
        differs |= not np.array_equal(index_aggregate(backwards.hooks[hook])["std"], stats["std"])
    assert differs  # the fold order shows in the bits: the comparison above would catch another order


def test_hits_take_the_group_maxima_the_statistics_took_of_the_same_rows(neox_ckpt, make_spec, monkeypatch):
    """With no padding, Dettmers' hits on a LayerNorm output the statistics also read take the per-group
    maxima of the statistics' pass (one pass over those rows, not two): the same criterion, bit for bit."""
    import harvest.hits as hits_module
    from harvest.running import DeviceStatistics
    from harvest.statistics import load_dettmers

    calls = []
    masked = hits_module.MASKED_GROUP_MAX
    monkeypatch.setattr(hits_module, "MASKED_GROUP_MAX", lambda *a: calls.append(1) or masked(*a))
    shared = run(units_spec(make_spec, neox_ckpt, "shared.zarr"), progress=False).path  # packed: no padding
    assert not calls
    monkeypatch.setattr(DeviceStatistics, "group_max", lambda self, hook, tokens: None)
    own = run(units_spec(make_spec, neox_ckpt, "own.zarr"), progress=False).path
    assert calls  # each LayerNorm's hits took their own pass
    a, b = load_dettmers(open_group(shared)), load_dettmers(open_group(own))
    assert_same_dettmers(a, b)
    for sa, sb in zip(a.states, b.states):
        for key in ("hits", "max", "share_hits", "seq_hits", "lkeys", "lcount", "pkeys", "pcount"):
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_a_unit_snapshot_keeps_its_top_k_entries_only_and_reads_them_by_column(neox_ckpt, make_spec, monkeypatch):
    """A unit snapshot's top-k is its entries in use (``entry_*``, by column then rank), not a (k, columns)
    array mostly padding; it unpacks to the dense top-k, and reading some columns (``harvest query dim``)
    gives those columns' entries."""
    import harvest.statistics as statistics_module
    from harvest.statistics import unpack
    from harvest.store import ENTRIES, PER_DIMENSION, read_blob, read_snapshot, statistics_cover

    monkeypatch.setattr(statistics_module, "compact_statistics", lambda group, at_least=1, kept=None: 0)
    path = run(units_spec(make_spec, neox_ckpt, "sparse.zarr"), progress=False).path
    group = open_group(path)
    names = [n for _, _, ns in statistics_cover(group).units for n in ns]
    sizes = []
    for name in names:
        blob = read_blob(group[name])
        assert {"entry_cols", "entry_rows", "entry_values"} <= set(blob) and "top_rows" not in blob
        cols = blob["entry_cols"]
        assert (np.diff(cols) >= 0).all() and (blob["entry_rows"] >= 0).all()
        sizes.append(cols.size)
        arrays, attrs = read_snapshot(group, name)
        whole = unpack(arrays, attrs)
        width = int(sum(attrs["widths"]))
        assert cols.size == sum(int((s["topk"]["rows"] >= 0).sum()) for s in whole.values())
        picked = np.array([0, 5, width // 2, width - 1])
        some, some_attrs = read_snapshot(group, name, columns=picked, keys=PER_DIMENSION + ENTRIES)
        dense = unpack(some, {**some_attrs, "hooks": ["all"], "widths": [picked.size],
                              "nonfinite_rows": {"all": [0, -1, 0]}})["all"]["topk"]
        full_rows = np.concatenate([s["topk"]["rows"] for s in whole.values()], axis=1)
        full_values = np.concatenate([s["topk"]["values"] for s in whole.values()], axis=1)
        for j, col in enumerate(picked):
            used = full_rows[:, col] >= 0
            np.testing.assert_array_equal(dense["rows"][:, j][dense["rows"][:, j] >= 0], full_rows[used, col])
            np.testing.assert_array_equal(dense["values"][:, j][dense["rows"][:, j] >= 0], full_values[used, col])
    assert sizes[-1] < sizes[0]  # later units keep fewer entries: only those above the earlier units' floor


def test_the_compactor_folds_new_units_onto_the_prefix_it_kept_bit_for_bit(neox_ckpt, make_spec, monkeypatch):
    """A running job's compactor keeps the prefix it wrote in memory and folds the next units onto it, not
    reading it back: the prefix it writes is the one a compaction from the store writes, array for array."""
    import shutil

    import harvest.statistics as statistics_module
    import harvest.store as store_module
    from harvest.statistics import Compactor, compact_statistics, load_dettmers
    from harvest.store import read_snapshot

    monkeypatch.setattr(statistics_module, "compact_statistics", lambda group, at_least=1, kept=None: 0)
    path = run(units_spec(make_spec, neox_ckpt, "kept.zarr"), progress=False).path
    monkeypatch.undo()
    reference = Path(str(path) + ".reference")
    shutil.copytree(path, reference)
    read_whole, read_dettmers = load_statistics(open_group(path)), load_dettmers(open_group(path))
    assert compact_statistics(open_group(reference, mode="r+")) == 12  # all six units at once, from the store

    group = open_group(path, mode="r+")
    monkeypatch.setattr(statistics_module, "COMPACT_UNITS", 2)
    compactor = Compactor(group)
    marks = group["_progress/stage_0"][...]
    group["_progress/stage_0"][4:] = 0  # units 0 and 1 done
    compactor.unit_done()
    assert compactor.waiting == 1 and "analysis/statistics/prefix" not in group  # counted, not listed
    compactor.unit_done()
    assert compactor.waiting == 0 and compactor.kept.name.endswith("batch_00000004")
    group["_progress/stage_0"][...] = marks
    reads = []
    monkeypatch.setattr(store_module, "read_snapshot", lambda g, name, *a, **k: reads.append(name) or
                        read_snapshot(g, name, *a, **k))
    compactor.unit_done()
    compactor.unit_done()
    assert compactor.kept.name.endswith("batch_00000012") and not any("prefix" in name for name in reads)  # the kept prefix
    assert len(reads) == 4  # units 2..5 only
    monkeypatch.undo()
    mine = read_snapshot(group, "analysis/statistics/prefix/batch_00000012")
    theirs = read_snapshot(open_group(reference), "analysis/statistics/prefix/batch_00000012")
    assert sorted(mine[0]) == sorted(theirs[0])
    for key, value in mine[0].items():
        np.testing.assert_array_equal(value, theirs[0][key], err_msg=key)
        assert value.dtype == theirs[0][key].dtype
    assert mine[1] == theirs[1]
    assert_identical(load_statistics(group), read_whole)
    assert_same_dettmers(load_dettmers(group), read_dettmers)
    assert group["analysis/statistics/sequences/seq_len"].shape == (24,)  # each unit's records appended once


@pytest.mark.parametrize("compact_units", [1, 8])
def test_a_resume_inside_a_unit_continues_its_statistics_exactly(neox_ckpt, make_spec, monkeypatch, compact_units):
    """Stopped in the middle of a unit (its snapshot so far is kept), resumed: the same bits as a run
    that never stopped, Dettmers' state included; whether the units done were already folded into the
    prefix (``COMPACT_UNITS`` 1) or still wait beside it (16: the default, more than this job's six)."""
    import harvest.statistics as statistics_module
    from harvest.errors import Interrupted
    from harvest.statistics import load_dettmers
    from harvest.store import unit_snapshots

    clean = run(units_spec(make_spec, neox_ckpt, "clean.zarr"), progress=False).path
    spec = units_spec(make_spec, neox_ckpt, "stopped.zarr")
    interrupt_at(monkeypatch, 7)
    monkeypatch.setattr(statistics_module, "COMPACT_UNITS", compact_units)
    with pytest.raises(Interrupted):
        run(spec, progress=False)
    monkeypatch.undo()
    group = open_group(spec.store_path())
    if compact_units == 1:
        assert unit_snapshots(group, 0) == [(6, 7)]  # the unit [6, 8) so far; units 0..2 are in the prefix
        assert list(group["analysis/statistics/prefix"].group_keys()) == ["batch_00000006"]
    else:
        assert unit_snapshots(group, 0) == [(0, 2), (2, 4), (4, 6), (6, 7)]
        assert "analysis/statistics/prefix" not in group
    assert run(spec, resume=True, progress=False).batches == 5
    assert_identical(load_statistics(open_group(spec.store_path())), load_statistics(open_group(clean)))
    assert_same_dettmers(load_dettmers(open_group(spec.store_path())), load_dettmers(open_group(clean)))


@pytest.mark.slow
def test_replicas_and_stages_give_identical_statistics(neox_ckpt, make_spec, ray_session):
    """R = 1, 2, 3 and one or two stages: the same statistics bit for bit (units folded in unit order,
    each from nothing), and the scan's of the stored rows."""
    from harvest.statistics import load_dettmers

    stats, dett, paths = {}, {}, {}
    for r, n in ((1, 1), (2, 1), (3, 1), (1, 2), (2, 2)):
        spec = units_spec(make_spec, neox_ckpt, f"r{r}s{n}.zarr", {"replicas": r, "stages": n, "threads": 1})
        path = paths[r, n] = run(spec, progress=False).path
        stats[r, n], dett[r, n] = load_statistics(open_group(path)), load_dettmers(open_group(path))
        assert list(open_group(path)["analysis/statistics/prefix"].group_keys()) == ["batch_00000012"]
    assert_same(stats[1, 1], scan_index(paths[1, 1]))
    for key in stats:
        assert_identical(stats[key], stats[1, 1])
        assert_same_dettmers(dett[key], dett[1, 1])


@pytest.mark.slow
def test_a_resume_at_other_stages_and_replicas_continues_the_statistics(neox_ckpt, make_spec, ray_session,
                                                                        monkeypatch, caplog):
    """Stopped inside a unit with one stage, resumed with two stages on two replicas: the statistics of
    the units done are kept (the prefix), the run restarts at the prefix's end, and the result is bit for
    bit the uninterrupted run's."""
    from harvest.errors import Interrupted
    from harvest.statistics import load_dettmers
    from harvest.store import read_provenance
    from sharding.verify import store_differences

    clean = run(units_spec(make_spec, neox_ckpt, "clean.zarr"), progress=False).path
    spec = units_spec(make_spec, neox_ckpt, "moved.zarr")
    interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted):
        run(spec, progress=False)
    monkeypatch.undo()
    other = units_spec(make_spec, neox_ckpt, "moved.zarr", {"replicas": 2, "stages": 2, "threads": 1})
    with caplog.at_level("INFO", logger="harvest.runner"):
        run(other, resume=True, progress=False)
    assert "restarts at batch 6" in caplog.text
    group = open_group(other.store_path())
    assert "statistics_dropped" not in read_provenance(group)
    assert_identical(load_statistics(group), load_statistics(open_group(clean)))
    assert_same_dettmers(load_dettmers(group), load_dettmers(open_group(clean)))
    assert store_differences(other.store_path(), clean) == []




def test_verify_checks_the_statistics_cover_the_manifest(neox_ckpt, make_spec):
    """``harvest verify``: statistics that lack batches the manifest marks, or count batches it does not,
    are one line each, with what to do."""
    import shutil

    from harvest.verify import verify_store

    path = run(units_spec(make_spec, neox_ckpt, "verified.zarr"), progress=False).path
    assert verify_store(path).ok
    _interrupt_after(path, 4)
    (line,) = [d.line() for d in verify_store(path).damages]
    assert line == ("analysis/statistics: the statistics prefix counts batches 0..11, but the manifest marks only "
                    "0..3 as written; batches 4-11")
    group = open_group(path, mode="r+")
    group["_progress/stage_0"][...] = 1
    shutil.rmtree(path / "analysis/statistics/prefix/batch_00000012")
    report = verify_store(path)
    assert [d.line() for d in report.damages] == [
        "analysis/statistics: stage 0 marks batches its statistics snapshots do not cover; batches 0-11"]
    assert "--overwrite" in report.repair_commands()[0]


@pytest.mark.parametrize("rows", [5, 200])
def test_a_units_first_batch_can_come_sparse(rows):
    """A unit's top-k starts from nothing: its first batch need not come whole. The entries at or above each
    column's own k-th largest |x| (ties included; every row when there are fewer than k) give
    ``topk_chunk``'s rows and values exactly, with no state before them."""
    from harvest.statistics import Block, topk_chunk, topk_merge

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((rows, 24)) * 3).astype(np.float32)
    x[::7, 11] = 9.0  # ties
    k = 8
    block = Block(x, start=1000)
    a = np.abs(x)
    kth = -np.sort(-a, axis=0)[min(k, rows) - 1]
    r, c = np.nonzero(a >= kth[None, :])
    got = topk_merge(None, {"rows": r + 1000, "cols": c, "values": x[r, c], "dims": 24}, k)
    want = topk_chunk(block, k)
    kk = want["rows"].shape[0]
    np.testing.assert_array_equal(got["rows"][:kk], want["rows"])
    np.testing.assert_array_equal(got["values"][:kk], want["values"])
    assert (got["rows"][kk:] == -1).all() and (got["values"][kk:] == 0).all()  # fewer than k rows: padding


@pytest.mark.parametrize("path", ["cpu", "accelerator", "host"])
def test_units_keep_only_values_above_the_floor_of_the_units_before_them_and_fold_exactly(path):
    """A unit's top-k keeps only the values above the floor the units its accumulator saw before it give,
    padding the columns left short; folded in unit order, the units give the top-k of all the rows exactly
    (ties to the lower row across units, an all-zero column, NaN/inf, a column whose later units never
    enter). Two "replicas" take units out of order: a unit handed after a later one gets no floor."""
    import torch

    from harvest.running import DeviceStatistics
    from harvest.statistics import Block, JobState, topk_chunk, unit_state
    from harvest.writer import unit_attrs

    rng = np.random.default_rng(11)
    k, d, sizes = 4, 12, rng.integers(90, 140, 16)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # batch b: rows [bounds[b], bounds[b + 1])
    values = (rng.standard_normal((int(bounds[-1]), d)) * 2).astype(np.float16).astype(np.float32)  # many ties
    values[:, 3] = 0.0
    values[::11, 5] = 7.0  # ties across units
    values[:, 6] = np.linspace(50, 1, values.shape[0])  # only the first unit enters
    values[bounds[9] + 3:, 8] *= 40  # the last units take over
    values[bounds[10]:bounds[10] + 2 * k:2, 9] = 30.0  # unit 5 holds k of the largest; unit 4 one more, which
    values[bounds[8] + 1, 9] = 30.0  # ranks first (a lower row): a floor from unit 5 would drop it from unit 4
    values[bounds[5] + 2, 2] = np.nan
    values[bounds[12] + 7, 1] = np.inf
    plan = StatisticsPlan(("h",), k, 6.0, np.arange(values.shape[0] + 1, dtype=np.int64),
                          unit_bounds=tuple(range(0, 17, 2)))
    handed = {"a": [0, 2, 3, 6], "b": [5, 1, 4, 7]}
    units, dense = {}, []
    for replica, order in handed.items():
        acc = StatisticsAccumulator(plan)
        kernels = DeviceStatistics(("h",), k, 6.0)
        kernels.floors = acc.floors
        kernels.sparse_first_batch = path == "accelerator"
        for u in order:
            first = 2 * u
            acc.restart(first)  # as a replica's writer begins a unit
            acc.next_batch = first
            for b in (first, first + 1):
                rows = values[bounds[b]:bounds[b + 1]]
                if path == "host":
                    acc.add(b, int(bounds[b]), {"h": rows})
                else:
                    out = {key: t.numpy() for key, t in kernels.batch({"h": torch.from_numpy(rows.copy())}).items()}
                    if "stats:h:dense" in out or (path == "accelerator" and not acc.floors()):
                        dense.append(b)
                    acc.add(b, int(bounds[b]), out)
                acc.next_batch = b + 1
                acc.fold(b + 1)
            units[u] = unit_state([unit_attrs(pack(acc), first, first + 2, first + 2)])
            acc.next_unit()
    if path != "host":
        # no floor: the job's first unit, b's first (unit 5), then units 1 and 4, handed to b after unit 5
        # (b's floor holds unit 5's rows from then on)
        assert dense == [0, 10, 2, 8]
    padded = [u for u, s in units.items() if (s.hooks["h"]["topk"]["rows"] < 0).any()]
    assert padded and 0 not in padded  # the units after the first kept fewer than k values in some columns
    job = JobState({})
    for u in sorted(units):
        job.fold(units[u])
    want = topk_chunk(Block(values, 0), k)
    np.testing.assert_array_equal(job.hooks["h"]["topk"]["rows"], want["rows"])
    np.testing.assert_array_equal(job.hooks["h"]["topk"]["values"], want["values"])


def test_the_floor_of_a_units_first_batch_comes_from_earlier_rows_only():
    """``floors`` for the next batch: inside a unit, its running k-th largest; at the next unit's first batch,
    the units before it; for a unit that comes back (redone) or one earlier than what was seen, nothing
    from its own or later rows."""
    rng = np.random.default_rng(3)
    k, d = 2, 5
    plan = StatisticsPlan(("h",), k, 6.0, np.arange(41, dtype=np.int64), unit_bounds=(0, 2, 4))
    values = rng.standard_normal((40, d)).astype(np.float32)
    acc = StatisticsAccumulator(plan)
    acc.add(0, 0, {"h": values[:10]})
    acc.next_batch = 1
    inside = acc.floors()["h"]
    np.testing.assert_array_equal(inside, -np.sort(-np.abs(values[:10]), axis=0)[k - 1])
    acc.add(1, 10, {"h": values[10:20]})
    acc.next_batch = 2  # the next unit: the rows of unit 0 bound it
    np.testing.assert_array_equal(acc.floors()["h"], -np.sort(-np.abs(values[:20]), axis=0)[k - 1])
    acc.add(2, 20, {"h": values[20:30]})
    acc.next_batch = 2  # unit 1 redone from its start: only unit 0's rows may bound it
    np.testing.assert_array_equal(acc.floors()["h"], -np.sort(-np.abs(values[:20]), axis=0)[k - 1])
    acc.next_batch = 0  # unit 0 again: nothing before it
    assert acc.floors() == {}


def test_folding_a_later_top_k_ranks_only_what_enters_and_equals_topk_combine():
    """``topk_fold`` (the compaction's fold of a unit onto the prefix) gives ``topk_combine``'s rows and
    values exactly: ties keep the earlier row, padding (row -1) never enters, an old top-k short of k rows
    takes everything."""
    from harvest.statistics import Block, empty_top, topk_chunk, topk_combine, topk_fold

    rng = np.random.default_rng(5)
    k, d = 6, 40
    x = np.round(rng.standard_normal((300, d)) * 2).astype(np.float32)  # a coarse grid: many ties
    old = topk_chunk(Block(x[:150], 0), k)
    new = topk_chunk(Block(x[150:], 150), k)
    new["rows"][3:, :7], new["values"][3:, :7] = -1, 0  # a unit padded where it kept fewer than k
    for a, b in ((old, new), (topk_chunk(Block(x[:4], 0), k), new), (old, empty_top(d, k))):
        got, want = topk_fold(a, b, k), topk_combine([a, b], k)
        np.testing.assert_array_equal(got["rows"], want["rows"])
        np.testing.assert_array_equal(got["values"], want["values"])
    assert (topk_fold(old, new, k)["rows"] >= 0).all()
    # several later top-k's at once (the next units of a compaction): one merge, the same as one by one
    units = [topk_chunk(Block(x[a:a + 30], a), k) for a in range(150, 300, 30)]
    units[1]["rows"][2:, :9], units[1]["values"][2:, :9] = -1, 0
    one_by_one = old
    for unit in units:
        one_by_one = topk_fold(one_by_one, unit, k)
    at_once = topk_fold(old, units, k)
    np.testing.assert_array_equal(at_once["rows"], one_by_one["rows"])
    np.testing.assert_array_equal(at_once["values"], one_by_one["values"])
    np.testing.assert_array_equal(at_once["rows"], topk_combine([old, *units], k)["rows"])


def test_a_top_k_of_fewer_rows_takes_sparse_candidates():
    """A resumed unit's top-k can hold fewer than k rows (a snapshot keeps only the rows in use, or the
    unit had fewer): sparse candidates merge into it as into a padded one, equal to ranking everything."""
    from harvest.statistics import Block, topk_chunk, topk_combine, topk_merge

    rng = np.random.default_rng(9)
    k, d = 5, 16
    x = np.round(rng.standard_normal((60, d)) * 2).astype(np.float32)
    for kept in (0, 3):
        old = {key: v[:kept] for key, v in topk_chunk(Block(x[:30], 0), k).items()}
        a = np.abs(x[30:])
        r, c = np.nonzero(a >= np.sort(a, axis=0)[-k][None, :])  # the batch's own floor, ties included
        got = topk_merge(old, {"rows": r + 30, "cols": c, "values": x[30:][r, c], "dims": d}, k)
        want = topk_combine([old, topk_chunk(Block(x[30:], 30), k)], k) if kept else topk_chunk(Block(x[30:], 30), k)
        np.testing.assert_array_equal(got["rows"], want["rows"])
        np.testing.assert_array_equal(got["values"], want["values"])


def test_a_unit_snapshot_is_one_safetensors_blob_read_whole_or_not_at_all(tmp_path):
    """A unit's snapshot is one uint8 array: a safetensors file any reader opens without our code, with
    a checksum; without its ``statistics`` attribute (written last) it is torn and never read."""
    import zarr
    from safetensors.numpy import load

    from harvest.store import read_snapshot, snapshot_attrs, unit_snapshot_name, unit_snapshots, write_snapshot

    rng = np.random.default_rng(0)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    arrays = {"n": np.arange(6, dtype=np.int64), "top_values": rng.standard_normal((3, 6)).astype(np.float32),
              "top_rows": rng.integers(-1, 9, (3, 6)), "dettmers_lkeys": np.zeros(0, np.int64), "scalar": np.array(2.5)}
    name = unit_snapshot_name(0, 4, 6)
    write_snapshot(group, name, arrays, {"start": 4, "through": 6, "end": 6})
    arr = group[name]
    assert isinstance(arr, zarr.Array) and arr.dtype == np.uint8 and arr.attrs["format"] == "safetensors"
    plain = load(np.asarray(arr[...]).tobytes())  # zarr decodes the chunk (and checks its CRC-32C)
    assert sorted(plain) == sorted(arrays)
    for key, want in arrays.items():
        assert plain[key].dtype == want.dtype
        np.testing.assert_array_equal(plain[key], want)
    assert unit_snapshots(group, 0) == [(4, 6)] and snapshot_attrs(group, name)["through"] == 6
    got, attrs = read_snapshot(group, name, columns=np.array([1, 4]), keys=("n", "top_values"))
    assert sorted(got) == ["n", "top_values"] and attrs["start"] == 4
    np.testing.assert_array_equal(got["n"], [1, 4])
    np.testing.assert_array_equal(got["top_values"], arrays["top_values"][:, [1, 4]])

    torn = unit_snapshot_name(0, 6, 8)  # the bytes landed, the attribute did not
    group.require_group("analysis/statistics/stage_0").create_array(
        "unit_00000006_00000008", shape=(4,), dtype="uint8", attributes={"format": "safetensors"})
    assert snapshot_attrs(group, torn) is None

    chunk = tmp_path / "s.zarr" / name / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="CRC-32C"):
        read_snapshot(group, name)
    with pytest.raises(Exception, match="(?i)checksum|crc"):  # zarr's codec finds it too
        arr[...]


@pytest.fixture
def torch_kernels(monkeypatch):
    """Run the statistics as on an accelerator: the torch kernels, not the CPU row pass (``harvest.rowpass``)."""
    from harvest.rowpass import LIBRARY

    monkeypatch.setattr(LIBRARY, "_fn", None)
    monkeypatch.setattr(LIBRARY, "failed", "the torch kernels for this test")


@pytest.fixture
def eager_kernel(monkeypatch, torch_kernels):
    """Run the statistics' kernels as eager torch ops (as where neither a C compiler nor torch.compile is)."""
    from harvest.running import FUSED_MOMENTS, MASKED_GROUP_MAX

    for kernel in (FUSED_MOMENTS, MASKED_GROUP_MAX):
        monkeypatch.setattr(kernel, "kernel", None)
        monkeypatch.setattr(kernel, "failed", "eager for this test")



@pytest.mark.parametrize("tokens", [2048, 37, 16, 9])
def test_the_compiled_kernel_equals_the_eager_ops(tokens):
    """The one-pass compiled kernel (the default) and the eager ops give the same maxima and counts, and
    sums equal to float64 rounding; rows past the last whole group of 16 are added apart."""
    import torch

    from harvest.running import FUSED_MOMENTS, moments

    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(tokens)) * 4
    x[3, 5] = 6.0  # exactly at the threshold: counted
    s, sq, gmax, count = moments(x, 6.0, lambda t: t.double())
    if FUSED_MOMENTS.failed is not None:  # no C++ compiler here, say: the eager ops ran (their own tests)
        pytest.skip(f"torch.compile unavailable here ({FUSED_MOMENTS.failed})")
    want = x.double()
    torch.testing.assert_close(s, want.sum(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(sq, (want * want).sum(0), rtol=1e-12, atol=1e-9)
    groups = [x[i:i + 16].abs().amax(0) for i in range(0, tokens, 16)]
    assert torch.equal(gmax, torch.stack(groups))
    if tokens >= 16:
        assert torch.equal(count, (x.abs() >= 6.0).sum(0))
    else:  # no whole group: the eager ops, and the count from the groups (``DeviceStatistics._compare``)
        assert count is None


@pytest.mark.parametrize("tokens", [2048, 37, 16, 9, 0])
def test_the_cpu_row_pass_equals_the_torch_ops(tokens):
    """``harvest.rowpass`` (the default on a CPU): sums to float64 rounding, every max and count exactly,
    and exactly the entries above the floor, with their rows, columns and values, however little room
    it is given for them at first; a NaN or inf in the rows is reported, not summed."""
    import torch

    from harvest.rowpass import LIBRARY, row_pass

    if LIBRARY.get() is None:
        pytest.skip(f"the row pass is unavailable here ({LIBRARY.failed})")
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(tokens)) * 4
    if tokens:
        x[tokens // 2, 5] = 6.0  # exactly at the threshold: counted
    floor = np.full(40, 7.0, np.float32)
    floor[3] = 0.0  # every nonzero value of column 3 enters
    for room in (4096, 1):
        got = row_pass(x, 16, 6.0, floor, room)
        want = x.double()
        torch.testing.assert_close(got.sum, want.sum(0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got.sumsq, (want * want).sum(0), rtol=1e-12, atol=1e-9)
        groups = [x[i:i + 16].abs().amax(0) for i in range(0, tokens, 16)]
        assert torch.equal(got.group_max, torch.stack(groups) if groups else torch.zeros(0, 40))
        assert torch.equal(got.max, x.abs().amax(0) if tokens else torch.zeros(40))
        assert torch.equal(got.count_ge.long(), (x.abs() >= 6.0).sum(0))
        r, c = (x.abs() > torch.from_numpy(floor)).nonzero().unbind(1)
        order = np.lexsort((got.cols.numpy(), got.rows.numpy()))
        assert torch.equal(got.rows[order], r) and torch.equal(got.cols[order], c)
        assert torch.equal(got.values[order], x[r, c])
    assert row_pass(x, 16, 6.0, None).rows.numel() == 0  # no floor: no entries
    if tokens:
        x[tokens - 1, 2] = float("nan")
        assert not row_pass(x, 16, 6.0, floor).finite


def test_the_cpu_row_pass_builds_once_and_falls_back_to_torch_with_a_warning(monkeypatch, caplog, tmp_path):
    """The library is built into the cache once (a second process loads it without a compiler); where it
    cannot be built the torch kernels give the same statistics, after one warning; HARVEST_COMPILE=0
    skips the attempt."""
    import torch

    from harvest import rowpass
    from harvest.running import DeviceStatistics

    monkeypatch.setenv(rowpass.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(rowpass.COMPILE_ENV, raising=False)
    built = rowpass._Library()
    if built.get() is None:
        pytest.skip(f"no C compiler here ({built.failed})")
    assert len(list((tmp_path / "cache").glob("rowpass-*.so"))) == 1
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nor cc, gcc or clang: the cached library still loads
    assert rowpass._Library().get() is not None

    x = torch.from_numpy((np.random.default_rng(5).standard_normal((70, 12)) * 3).astype(np.float32))
    floor = np.full(12, 4.0, np.float32)
    kernels = DeviceStatistics(("h",), 4, 6.0)
    kernels.floors = lambda: {"h": floor}
    monkeypatch.setattr(rowpass, "LIBRARY", built)
    with_pass = kernels.batch({"h": x})

    monkeypatch.setenv(rowpass.CACHE_ENV, str(tmp_path / "empty"))
    broken = rowpass._Library()
    monkeypatch.setattr(rowpass, "LIBRARY", broken)
    with caplog.at_level("WARNING", logger="harvest.rowpass"):
        without = kernels.batch({"h": x})
    assert "the CPU row pass (rowpass.c) is unavailable (RuntimeError: no C compiler found (set CC))" in caplog.text
    assert broken.get() is None  # not tried again in this process
    order = lambda out: np.lexsort((out["stats:h:cols"].numpy(), out["stats:h:rows"].numpy()))  # noqa: E731
    for key in ("max", "count_ge", "tokens"):
        assert torch.equal(with_pass[f"stats:h:{key}"].long() if key == "count_ge" else with_pass[f"stats:h:{key}"],
                           without[f"stats:h:{key}"].long() if key == "count_ge" else without[f"stats:h:{key}"]), key
    for key in ("rows", "cols", "values"):
        assert torch.equal(with_pass[f"stats:h:{key}"][order(with_pass)], without[f"stats:h:{key}"][order(without)]), key
    torch.testing.assert_close(with_pass["stats:h:sum"], without["stats:h:sum"], rtol=1e-12, atol=1e-12)

    monkeypatch.setenv(rowpass.COMPILE_ENV, "0")
    off = rowpass._Library()
    assert off.get() is None and off.failed == "RuntimeError: HARVEST_COMPILE=0"


def test_a_failed_compile_falls_back_to_the_eager_ops_with_a_warning(monkeypatch, caplog):
    import torch

    from harvest import running

    def broken(fn, **_):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return compiled

    monkeypatch.delenv(running.COMPILE_ENV, raising=False)
    monkeypatch.setattr(running, "FUSED_MOMENTS", running.CompiledKernel(running._fused_moments))
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(64, 8)
    with caplog.at_level("WARNING", logger="harvest.running"):
        s, sq, gmax, count = running.moments(x, 6.0, lambda t: t.double())
    assert count is None and torch.equal(gmax, running.group_max(x.abs()))
    torch.testing.assert_close(s, x.double().sum(0))
    assert "torch.compile of _fused_moments failed (RuntimeError: no C++ compiler found)" in caplog.text
    assert running.FUSED_MOMENTS.get() is None  # not tried again in this process
    monkeypatch.setenv(running.COMPILE_ENV, "0")
    off = running.CompiledKernel(running._fused_moments)
    assert off(x, 6.0) is None and off.failed == "HARVEST_COMPILE=0"
