"""Data-parallel replicas x pipeline stages: units own whole shards, stores byte-identical to R = 1."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from harvest.errors import SpecError, StageError
from harvest.runner import claim_store, prepare, run
from harvest.shape import job_units, unit_bounds
from sharding.verify import store_differences

HOOKS = ["hook_embed", "resid_post", "z", "pattern", "post", "ln_final"]


#: CPUs of this module's local Ray (``ray_session`` in conftest.py): 3 replicas x 2 stages
RAY_CPUS = 6


def replica_spec(make_spec, ckpt, replicas: int, stages: int, path: str, hooks=HOOKS, **run):
    """A job of 10 batches in 5 units: one row per sequence and small shards, so shards end on batch ends."""
    return make_spec(ckpt, hooks=hooks, run={"stages": stages, "replicas": replicas, "threads": 1, "batch_size": 2,
                                             **run},
                     capture={"hooks": list(hooks), "positions": "last"},
                     store={"path": path, "chunk_mib": 0.001, "chunks_per_shard": 1}, prompts={"max_sequences": 20})


# --- units (no Ray) ------------------------------------------------------------------------------------

def test_units_never_split_a_shard():
    """Random layouts and shard sizes: each shard's rows lie inside one unit, for every array."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_batches = int(rng.integers(1, 40))
        seqs = np.cumsum(rng.integers(1, 5, n_batches))
        tokens = np.cumsum(rng.integers(0, 50, n_batches))
        ends = {"token": tokens, "sequence": seqs}
        shards = [(axis, int(rng.integers(1, 80)), int(ends[axis][-1]))
                  for axis in rng.choice(["token", "sequence"], int(rng.integers(0, 4)))]
        bounds = unit_bounds(ends, shards)
        assert bounds[0] == 0 and bounds[-1] == n_batches and (np.diff(bounds) > 0).all()
        for axis, shard_rows, rows in shards:
            starts = np.concatenate([[0], ends[axis]])
            unit_of_row = np.zeros(rows, dtype=np.int64)
            for u, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                unit_of_row[starts[a]:starts[b]] = u
            for s0 in range(0, rows, shard_rows):
                owners = set(unit_of_row[s0:min(s0 + shard_rows, rows)].tolist())
                assert len(owners) == 1, f"shard at row {s0} of a {axis} array spans units {owners}"
        if not shards:
            assert list(bounds) == list(range(n_batches + 1)), "with no array, every batch is a unit"


def test_job_units_cover_the_batches_in_order(neox_ckpt, make_spec):
    job = prepare(replica_spec(make_spec, neox_ckpt, 2, 1, "u.zarr"))
    units = job_units(job.layout, job.arrays)
    assert units[0][0] == 0 and units[-1][1] == job.layout.n_batches
    assert all(a[1] == b[0] for a, b in zip(units, units[1:]))
    assert len(units) > 1, "the test job must give more than one unit, or replicas would have nothing to share"


def test_shards_are_sized_in_whole_batches():
    """Shards span 2^j batches or divide one batch, nearest the chunk_mib target; chunks tile the shard."""
    from harvest.shape import chunk_layout

    rng = np.random.default_rng(1)
    for _ in range(500):
        batch = int(rng.integers(1, 5000))
        n = int(rng.integers(1, 200)) * batch + int(rng.integers(0, batch))
        row_bytes = int(rng.choice([4, 256, 8192, 24576 * 2]))
        chunk_mib, cps = float(rng.choice([0.001, 0.1, 1, 16])), int(rng.integers(1, 9))
        chunk, shard = chunk_layout(n, row_bytes, chunk_mib, cps, batch)
        assert shard % chunk == 0, (chunk, shard)
        if shard >= n:  # one shard: its one end is the array's end
            continue
        span = shard / batch
        assert span == 1 or (span > 1 and span == 2 ** round(np.log2(span))) or batch % shard == 0, (batch, shard)
        target = chunk_mib * 2**20 / row_bytes * cps
        if target >= 1 and batch <= target:  # the nearest power of two batches: within 2x of the target
            assert target / 2 <= shard <= 2 * target, (batch, shard, target)
    # with no fixed batch rows: today's sizing, wherever batches end
    assert chunk_layout(10_000, 256, 0.001, 2) == chunk_layout(10_000, 256, 0.001, 2, None)


def test_units_are_a_few_batches_for_the_shipped_real_jobs(tmp_path):
    """GPT-J-6B and NeoX-20B resid jobs: units of at most 4 batches (NeoX-20B had 4 units in all before)."""
    from pathlib import Path

    from harvest.spec import load_spec
    from sharding.plan import plan_job, plan_units

    repo = Path(__file__).resolve().parent.parent
    for job in ("jobs/gptj-6b-resid.yaml", "jobs/neox-20b-resid.yaml"):
        plan = plan_job(load_spec(repo / job, base_dir=repo, store_root=str(tmp_path)))
        units = plan_units(plan)
        assert len(units) >= plan.work.n_batches / 4 and max(b - a for a, b in units) <= 4, (job, len(units))
        for a in plan.arrays:  # every shard end is a batch end
            assert a.shard_rows % plan.work.rows_per_batch == 0 or plan.work.rows_per_batch % a.shard_rows == 0


def test_rows_that_vary_by_batch_keep_todays_sizing_and_the_plan_says_why(neox_ckpt, make_spec):
    from harvest.shape import batch_rows, chunk_layout
    from sharding.plan import format_plan, plan_job

    spec = make_spec(neox_ckpt, run={"replicas": 2, "batch_size": 2},
                     prompts={"mode": "windowed", "max_sequences": 20}, store={"chunk_mib": 0.001})
    job = prepare(spec)
    rows = np.diff(job.layout.batch_ends("token"))
    assert len(set(rows[:-1].tolist())) > 1, "the test needs batches of different row counts"
    work = plan_job(spec).work
    assert batch_rows(work, "token") is None and batch_rows(work, "sequence") == 2
    a = job.arrays[0]
    assert (a.chunk_rows, a.shard_rows) == chunk_layout(a.shape[0], a.row_bytes, 0.001, 2)
    assert "cannot be sized in whole batches" in format_plan(plan_job(spec))


def test_resume_keeps_the_layout_of_a_store_made_before_batch_sized_shards(neox_ckpt, make_spec, monkeypatch):
    """A store laid out by the old rule (shards wherever batches end) is resumed in its own layout, and
    the units replicas get never split one of its shards."""
    import harvest.shape
    from harvest.store import open_group

    spec = make_spec(neox_ckpt, hooks=HOOKS, run={"replicas": 2, "threads": 1, "batch_size": 3},
                     capture={"hooks": HOOKS, "positions": "last"}, prompts={"max_sequences": 20},
                     store={"path": "old.zarr", "chunk_mib": 0.001, "chunks_per_shard": 1})
    new = prepare(spec).arrays
    with monkeypatch.context() as m:
        m.setattr(harvest.shape, "batch_rows", lambda work, axis: None)  # the sizing before
        old = prepare(spec)
        claim_store(old, resume=False, overwrite=False)
    assert old.arrays != new, "the test needs a layout that differs between the two rules"
    job = prepare(spec)
    assert job.arrays == new
    claim_store(job, resume=True, overwrite=False)
    assert job.arrays == old.arrays
    group = open_group(job.path)
    for a in job.arrays:
        assert (a.chunk_rows, a.shard_rows) == (group[a.point.name].chunks[0], group[a.point.name].shards[0])
    ends = {"token": job.layout.batch_ends("token"), "sequence": job.layout.batch_ends("sequence")}
    for u0, u1 in job_units(job.layout, job.arrays):
        for a in job.arrays:
            end = int(ends[a.point.axis][u1 - 1])
            assert end % a.shard_rows == 0 or end >= a.shape[0], "a unit must end on a shard end of the store"


@pytest.mark.parametrize("value, message", [(0, "run.replicas must be an integer >= 1"), ("many", "run.replicas must be"),
                                            (1.5, "run.replicas must be"), (True, "run.replicas must be")])
def test_replicas_must_be_a_positive_integer_or_auto(neox_ckpt, make_spec, value, message):
    with pytest.raises(SpecError, match=message):
        make_spec(neox_ckpt, run={"replicas": value})
    assert make_spec(neox_ckpt, run={"replicas": "auto"}).run.replicas == "auto"


def test_resources_count_replicas_times_stages(neox_ckpt, make_spec):
    from cluster import resources
    from harvest.errors import ClusterResourcesError

    spec = make_spec(neox_ckpt, run={"stages": 2, "replicas": 3, "threads": 2}, model={"device": "cuda"})
    needs = resources.job_needs(spec)
    assert (needs.cpus, needs.gpus, needs.actors) == (12, 6, 6)
    assert resources.entrypoint_resources(needs) == {}
    with pytest.raises(ClusterResourcesError, match=r"6 GPU\(s\) \(run.replicas 3 x run.stages 2 x 1"):
        resources.check_resources(needs, {"CPU": 64, "GPU": 4}, "http://h:8265", 1)
    one = make_spec(neox_ckpt, run={"replicas": 2})
    assert resources.entrypoint_resources(resources.job_needs(one, [{"CPU": 8}])) == {}, "replicas run as actors"
    auto = make_spec(neox_ckpt, run={"stages": 2, "replicas": "auto"}, model={"device": "auto"})
    assert resources.job_needs(auto, [{"CPU": 32, "GPU": 8}, {"CPU": 32, "GPU": 8}]).replicas == 8
    assert resources.job_needs(auto, [{"CPU": 32}]).replicas == 1


def test_replicas_ask_for_one_bundle_each_spread_over_nodes(neox_ckpt, make_spec, monkeypatch):
    """One SPREAD placement group, one bundle per replica holding all its stages (a bundle is on one node);
    each replica's stage actors go into its own bundle. Checked on the request, without a cluster."""
    import ray

    from harvest.shape import Resources
    from sharding import replicas

    asked = {}

    class Placed(Exception):
        pass

    def placement_group(bundles, strategy=None, name=""):
        asked.update(bundles=bundles, strategy=strategy)
        raise Placed

    monkeypatch.setattr(replicas, "placement_group", placement_group)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    job = prepare(replica_spec(make_spec, neox_ckpt, 3, 2, "placed.zarr"))
    claim_store(job, resume=False, overwrite=False)
    with pytest.raises(Placed):
        replicas.ReplicaDriver(job).start(Resources(stages=2, device="cuda", cpus_per_stage=4, gpus_per_stage=1,
                                                    replicas=3))
    assert asked == {"bundles": [{"CPU": 8.0, "GPU": 2.0}] * 3, "strategy": "SPREAD"}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 4.0})
    with pytest.raises(StageError, match=r"3 replica\(s\) x 2 stage\(s\) need 6 GPU\(s\) \(1 per stage actor\) but "
                                         r"there are 4 in the Ray cluster; lower run.replicas"):
        replicas.ReplicaDriver(job).start(Resources(2, "cuda", 4, 1, 3))


def test_plan_shows_replicas_and_units(neox_ckpt, make_spec):
    from sharding.plan import format_plan, plan_job, plan_units

    spec = replica_spec(make_spec, neox_ckpt, 2, 2, "p.zarr")
    plan = plan_job(spec)
    text = format_plan(plan)
    assert "2 replica(s) x 2 stage(s) = 4 Ray stage actor(s), asking for 4 CPU(s) (run.replicas 2 x run.stages 2" in text
    assert plan_units(plan) == job_units(prepare(spec).layout, plan.arrays), "exact for one row per sequence"
    assert "units of work (runs of batches owning whole shards of every array" in text and "note:" not in text
    few = format_plan(plan_job(make_spec(neox_ckpt, run={"replicas": 4})))
    assert "note: 1 unit(s) for 4 replicas" in few


# --- on Ray ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch, combos", [("gptj", [(2, 1), (3, 2)]), ("gpt_neox", [(3, 1), (2, 2)])])
def test_replicas_write_the_store_of_one_replica(arch, combos, make_checkpoint, make_spec, ray_session):
    ckpt = make_checkpoint(arch)
    reference = run(replica_spec(make_spec, ckpt, 1, 1, "ref.zarr"), progress=False).path
    for r, s in combos:
        result = run(replica_spec(make_spec, ckpt, r, s, f"r{r}s{s}.zarr"), progress=False)
        assert store_differences(reference, result.path) == [], (r, s)
        info = json.loads((result.path / "zarr.json").read_text())["attributes"]["harvest"]
        assert info["status"] == "complete" and info["spec"]["run"]["replicas"] == r


def _replica_run(job, **kwargs):
    from sharding.replicas import run_replicas

    claim_store(job, resume=False, overwrite=False)
    seen = {}
    nonfinite = run_replicas(job, False, started=lambda d: seen.setdefault("driver", d), **kwargs)
    return nonfinite, seen["driver"]


@pytest.mark.slow
def test_killed_stage_is_restarted_and_failing_replica_dropped(neox_ckpt, make_spec, ray_session, caplog):
    """``ray.kill`` of one replica's stage: restarted, its unit redone, the store identical. A replica
    killed at every batch is dropped with a warning naming it; the others finish the job, identical."""
    from harvest.store import batches_done, open_group

    reference = run(replica_spec(make_spec, neox_ckpt, 1, 1, "ref.zarr"), progress=False).path
    killed = []

    def kill_once(replica, k, driver):
        if replica == 1 and not killed:
            killed.append(k)
            ray_session.kill(driver.replicas[1].actors[-1], no_restart=False)

    job = prepare(replica_spec(make_spec, neox_ckpt, 2, 2, "killed.zarr"))
    _, driver = _replica_run(job, on_batch=kill_once)
    assert killed and driver.replicas[1].restarts == 1 and all(r.alive for r in driver.replicas)
    assert batches_done(open_group(job.path)).all()
    assert store_differences(reference, job.path) == []

    def always(replica, k, driver):
        if replica == 1:
            ray_session.kill(driver.replicas[1].actors[0], no_restart=False)

    job = prepare(replica_spec(make_spec, neox_ckpt, 2, 1, "dropped.zarr"))
    with caplog.at_level(logging.WARNING, logger="harvest.replicas"):
        _, driver = _replica_run(job, on_batch=always)
    assert not driver.replicas[1].alive and driver.replicas[0].alive
    assert any("replica 1 dropped" in r.getMessage() for r in caplog.records)
    # (a kill can land after the unit was on disk: such a unit counts as done by replica 1)
    assert driver.replicas[0].units + driver.replicas[1].units == len(job_units(job.layout, job.arrays))
    assert driver.replicas[0].units >= 3
    assert store_differences(reference, job.path) == []


_SLOW_DRIVER = """
import sys, time
from harvest.spec import load_spec
from harvest.runner import run
from sharding import replicas
init = replicas.ReplicaDriver.__init__
def slow(self, job, on_batch=None):
    init(self, job, lambda r, k, d: time.sleep(0.4))
replicas.ReplicaDriver.__init__ = slow
run(load_spec(sys.argv[1]), progress=False)
"""


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_with_another_replica_count(neox_ckpt, make_spec, ray_session, tmp_path):
    """SIGKILL of a driver running 2 replicas, then --resume with 3: the store is identical to R = 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from harvest.store import batches_done, open_group

    reference = run(replica_spec(make_spec, neox_ckpt, 1, 1, "ref.zarr"), progress=False).path
    raw = replica_spec(make_spec, neox_ckpt, 2, 1, "resumed.zarr")
    spec_file = tmp_path / "job.yaml"
    data = make_spec(neox_ckpt, raw=True, hooks=HOOKS, run={**raw.to_dict()["run"]},
                     capture={"hooks": HOOKS, "positions": "last"},
                     store={"path": "resumed.zarr", "chunk_mib": 0.001, "chunks_per_shard": 1},
                     prompts={"max_sequences": 20})
    data["run"]["address"] = ray_session.get_runtime_context().gcs_address
    spec_file.write_text(yaml.safe_dump(data))
    script = tmp_path / "driver.py"
    script.write_text(_SLOW_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(spec_file)], start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    path = raw.store_path()
    deadline = time.monotonic() + 240
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (path / "_progress").is_dir():
                done = int(batches_done(open_group(path)).sum())
                if done >= 2:
                    break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 2 <= done < 10, f"the driver must be killed mid-run (done {done} of 10 batches)"
    result = run(replica_spec(make_spec, neox_ckpt, 3, 1, "resumed.zarr"), resume=True, progress=False)
    assert 0 < result.batches < 10
    assert store_differences(reference, path) == []


@pytest.mark.slow
@pytest.mark.timeout(300)  # a replica thread that died without giving its unit back hung the others forever
def test_a_failure_marking_a_unit_stops_the_job_with_its_message(neox_ckpt, make_spec, ray_session, monkeypatch):
    """The driver's own work after a unit (the manifest, the statistics prefix) failing stops the job
    with that error; the other replica, waiting for the unit in flight, does not wait forever."""
    from harvest.errors import StoreError
    from harvest.statistics import Compactor

    calls = []

    def full_disk(compactor):  # the driver's compaction, after every unit it marks
        calls.append(compactor)
        raise StoreError("analysis/statistics: no space left on device")

    monkeypatch.setattr(Compactor, "unit_done", full_disk)
    with pytest.raises(StoreError, match="no space left on device"):
        run(replica_spec(make_spec, neox_ckpt, 2, 1, "nospace.zarr"), progress=False)
    assert calls


@pytest.mark.slow
@pytest.mark.timeout(300)  # a permanent failure retried forever would hang: the timeout fails it
def test_a_stage_error_stops_every_replica_with_its_message(neox_ckpt, make_spec, ray_session, tmp_path):
    """A stage's own error would happen on any replica: it stops the job, message intact, not a drop."""
    from harvest.errors import NonFiniteActivationError
    from harvest.toy import edited_checkpoint

    def nan_bias(tensors):
        tensors["gpt_neox.layers.3.mlp.dense_4h_to_h.bias"][5] = float("nan")

    bad = edited_checkpoint(neox_ckpt, tmp_path / "nan", nan_bias)
    spec = replica_spec(make_spec, bad, 2, 1, "nan.zarr")
    with pytest.raises(NonFiniteActivationError, match=r"NaN/inf value\(s\) in blocks\.3\.hook_resid_post, batch \d+\. "
                                                       r"Nothing of this batch is marked written"):
        run(spec, progress=False)
    info = json.loads((spec.store_path() / "zarr.json").read_text())["attributes"]["harvest"]
    assert info["status"] == "failed"


@pytest.mark.slow
def test_nonfinite_values_attribute_is_the_jobs_total_with_replicas(neox_ckpt, make_spec, ray_session, tmp_path):
    """``on_nonfinite: flag`` with R = 2: each array's ``nonfinite_values`` is the whole job's count (what the
    store holds and what R = 1 records), not the count of whichever replica wrote it last."""
    import zarr

    from harvest.toy import edited_checkpoint

    def inf_bias(tensors):
        tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"][5] = float("inf")

    bad = edited_checkpoint(neox_ckpt, tmp_path / "inf", inf_bias)
    hooks = ["blocks.{0..2}.hook_resid_post"]

    def spec(replicas: int, path: str):
        return make_spec(bad, hooks=hooks, capture={"hooks": hooks, "positions": "last", "on_nonfinite": "flag"},
                         run={"batch_size": 2, "threads": 1, "replicas": replicas}, prompts={"max_sequences": 20},
                         store={"path": path, "chunk_mib": 0.001, "chunks_per_shard": 1})

    job = prepare(spec(2, "two.zarr"))
    assert len(job_units(job.layout, job.arrays)) >= 4, "both replicas must write units with inf in them"
    one, two = run(spec(1, "one.zarr"), progress=False), run(spec(2, "two.zarr"), progress=False)
    g1, g2 = zarr.open_group(str(one.path), mode="r"), zarr.open_group(str(two.path), mode="r")
    stored = {name: int((~np.isfinite(g2[name][...])).sum()) for name in (f"blocks.{i}.hook_resid_post" for i in range(3))}
    stored = {name: n for name, n in stored.items() if n}
    assert "blocks.1.hook_resid_post" in stored and "blocks.0.hook_resid_post" not in stored
    for name, n in stored.items():
        assert g2[name].attrs["nonfinite_values"] == n == g1[name].attrs["nonfinite_values"], name
    assert "nonfinite_values" not in g2["blocks.0.hook_resid_post"].attrs
    assert two.nonfinite == one.nonfinite == stored
    assert g2.attrs["harvest"]["nonfinite"] == stored
    assert store_differences(one.path, two.path) == []


@pytest.mark.slow
def test_replicas_resume_a_store_laid_out_before_batch_sized_shards(neox_ckpt, make_spec, ray_session, monkeypatch):
    """A store created by the old sizing (shards wherever batches end), continued with --resume and 2 replicas:
    its own shards are the units' bounds, so no shard gets two writers and the store equals an R = 1 run of it."""
    import harvest.shape

    def spec(replicas: int, path: str):
        return make_spec(neox_ckpt, hooks=HOOKS, capture={"hooks": HOOKS, "positions": "last"},
                         run={"replicas": replicas, "threads": 1, "batch_size": 3}, prompts={"max_sequences": 20},
                         store={"path": path, "chunk_mib": 0.001, "chunks_per_shard": 1})

    with monkeypatch.context() as m:
        m.setattr(harvest.shape, "batch_rows", lambda work, axis: None)  # the sizing before
        reference = run(spec(1, "old-ref.zarr"), progress=False).path
        old = prepare(spec(2, "old.zarr"))
        claim_store(old, resume=False, overwrite=False)  # laid out, nothing harvested yet
    assert prepare(spec(2, "old.zarr")).arrays != old.arrays, "the layouts must differ for the test to mean anything"
    result = run(spec(2, "old.zarr"), resume=True, progress=False)
    assert result.batches == old.layout.n_batches
    assert store_differences(reference, result.path) == []
