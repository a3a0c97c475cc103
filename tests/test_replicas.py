"""Data-parallel replicas x pipeline stages: units own whole shards, stores byte-identical to R = 1."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from harvest.errors import SpecError
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
