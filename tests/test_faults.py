"""Fault tolerance with real kills: restarted stage actors, a killed driver, and failures that must stop the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from harvest.errors import NonFiniteActivationError, StageError
from harvest.runner import claim_store, prepare, run
from harvest.spec import parse_spec
from harvest.store import first_incomplete
from harvest.toy import edited_checkpoint
from sharding.pipeline import run_pipeline
from sharding.verify import store_differences

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def fault_spec(make_spec, ckpt, path: str, stages: int = 2, raw: bool = False, **run):
    # 10 batches of 72 rows; a shard holds 320 rows, so each writer keeps ~4 batches un-durable
    return make_spec(ckpt, hooks=["hook_embed", "resid_post", "post", "ln_final"], raw=raw,
                     run={"stages": stages, "threads": 1, **run},
                     store={"path": path, "chunks_per_shard": 8}, prompts={"max_sequences": 30})


@pytest.fixture
def reference(make_spec, neox_ckpt):
    """The uninterrupted, unsharded store every faulty run must reproduce byte for byte."""
    return run(fault_spec(make_spec, neox_ckpt, "reference.zarr", stages=1), progress=False).path


def run_with(spec, on_batch):
    job = prepare(spec)
    start = claim_store(job, resume=False, overwrite=False)
    holder = {}

    def hook(k, pipeline):
        holder["pipeline"] = pipeline
        on_batch(k, pipeline)

    nonfinite = run_pipeline(job, start, False, on_batch=hook)
    return job, holder["pipeline"], nonfinite


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killed_stage_restarts_and_the_store_is_identical(how, stage, make_spec, neox_ckpt, reference, ray_session):
    ray = ray_session
    killed = []

    def kill(k, pipeline):
        if k == 2 and not killed:
            assert pipeline.durable[stage] < 3, "the kill must lose batches that are not yet durable"
            actor = pipeline.actors[stage]
            if how == "ray.kill":
                ray.kill(actor, no_restart=False)
            else:
                os.kill(ray.get(actor.position.remote())["pid"], signal.SIGKILL)
            killed.append(k)

    job, pipeline, _ = run_with(fault_spec(make_spec, neox_ckpt, f"{how}-{stage}.zarr"), kill)
    assert killed and pipeline.restarts[stage] == 1 and pipeline.restarts[1 - stage] == 0
    job_path = job.path
    import zarr

    assert zarr.open_group(str(job_path), mode="r")["_progress/stage_0"][...].all()
    assert store_differences(reference, job_path) == []


@pytest.mark.timeout(300)  # an endless retry would hang: the timeout fails it
def test_a_stage_that_keeps_dying_stops_the_job(make_spec, neox_ckpt, ray_session):
    ray = ray_session
    spec = fault_spec(make_spec, neox_ckpt, "dies.zarr", max_restarts=1)

    def kill_every_time(k, pipeline):
        ray.kill(pipeline.actors[1], no_restart=False)

    # either Ray gives up on it (run.max_restarts) or the driver sees it die again before any new batch
    # got through (a crash that repeats): both stop the job with the stage named
    with pytest.raises(StageError, match=r"stage 1 \(blocks 2\.\.3 \+ ln_final\) died (and could not be restarted "
                                         r"\(run.max_restarts: 1\)|again after its restart before any batch)"):
        run_with(spec, kill_every_time)


@pytest.mark.timeout(300)  # a permanent failure retried forever would hang: the timeout fails it
def test_nonfinite_activations_in_a_stage_stop_the_job_with_their_message(make_spec, neox_ckpt, ray_session, tmp_path):
    def poison(t):
        t["gpt_neox.layers.3.mlp.dense_4h_to_h.bias"][5] = float("nan")

    ckpt = edited_checkpoint(neox_ckpt, tmp_path / "nan", poison)
    spec = fault_spec(make_spec, ckpt, "nan.zarr")
    with pytest.raises(NonFiniteActivationError, match=r"NaN/inf value\(s\) in blocks\.3\.hook_resid_post, batch 0\. "
                                                       r"Nothing of this batch is marked written"):
        run(spec, progress=False)


def test_bad_weights_stop_the_job_with_the_reason(make_spec, neox_ckpt, ray_session, tmp_path):
    import torch

    def wrong_shape(t):
        t["gpt_neox.layers.2.attention.dense.weight"] = torch.zeros(64, 32)

    ckpt = edited_checkpoint(neox_ckpt, tmp_path / "bad", wrong_shape)
    with pytest.raises(StageError, match=r"stage 1 \(blocks 2\.\.3 \+ ln_final\) failed: .*shape"):
        run(fault_spec(make_spec, ckpt, "bad.zarr"), progress=False)


def test_driver_killed_then_resume_is_identical(make_spec, neox_ckpt, reference, tmp_path):
    """SIGKILL the `harvest run` process mid-run; `harvest run --resume` finishes the same bytes."""
    import psutil
    import zarr

    raw = fault_spec(make_spec, neox_ckpt, "driver.zarr", raw=True)
    raw["prompts"]["max_sequences"] = 60
    raw["run"]["batch_size"] = 1  # 60 small batches: a window of seconds to kill in
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    ref_raw = dict(raw, run={"batch_size": 1}, store={**raw["store"], "path": "driver-ref.zarr"})
    reference_path = run(parse_spec(ref_raw, base_dir=tmp_path), progress=False).path
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    harvest = [sys.executable, "-m", "harvest", "run", "-q"]

    driver = subprocess.Popen(harvest + [str(spec_file)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = Path(raw["store"]["root"]) / "driver.zarr"
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                marks = zarr.open_group(str(store), mode="r")["_progress/stage_1"][...]
            except Exception:  # noqa: BLE001 - not created yet
                marks = np.zeros(1)
            if 0 < marks.sum() < len(marks) - 10:  # some batches durable, many to go
                break
            time.sleep(0.05)
        assert driver.poll() is None, f"the run ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
        family = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        # Ray's processes follow their driver within seconds; make sure of it before resuming (two
        # writers on one shard would lose rows) and before the test ends
        _, alive = psutil.wait_procs(family, timeout=15)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["harvest"]["status"] == "running"
    assert 0 < first_incomplete(group) < 50, "killed mid-run, with durable batches to resume from"
    resumed = subprocess.run(harvest + ["--resume", str(spec_file)], env=env, cwd=tmp_path, capture_output=True,
                             timeout=300, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store_differences(reference_path, store) == []
    assert zarr.open_group(str(store), mode="r").attrs["harvest"]["status"] == "complete"
