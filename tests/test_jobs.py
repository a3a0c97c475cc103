"""Jobs without a cluster: the shipped job specs, progress parsing, errors users meet, the submission.

The real two-node cluster is in test_cluster.py (slow).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from harvest import load_spec
from harvest.errors import (ClusterError, ClusterResourcesError, ClusterUnreachableError, JobNotFoundError, SpecError,
                            StoreNotWritableError)
from cluster import connection, entrypoint, progress, protocol, resources, state, submission
from harvest import store

JOBS = Path(__file__).resolve().parent.parent / "jobs"
SHIPPED = sorted(p for p in JOBS.glob("*.yaml") if p.name != "demo.yaml")
MINE = ["gptj-6b-outliers", "gptj-6b-translation", "gptj-6b-addition", "neox-20b-addition", "neox-20b-outliers"]


# --- the shipped job specs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo_root() -> Path:
    return JOBS.parent


def test_the_issue_s_job_specs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert set(MINE) <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_plans_and_fits(path, repo_root, monkeypatch):
    from sharding.plan import format_plan, plan_job

    monkeypatch.chdir(repo_root)  # relative model paths (jobs/configs/...) as `harvest plan` reads them
    spec = load_spec(path)
    plan = plan_job(spec)
    assert plan.hooks, "its hook patterns expand against the real config"
    assert plan.fits, format_plan(plan)
    plan.check()
    assert len(plan.stages) == spec.run.stages
    if path.stem in MINE:
        assert spec.model.device == "cuda", "cluster specs name the device: 'auto' decides on the driver's node"


@pytest.mark.parametrize("name", MINE)
def test_spec_comments_say_gpus_and_store_size(name, repo_root, monkeypatch):
    from sharding.plan import plan_job

    text = (JOBS / f"{name}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"Expects: .*GPU", header), "which GPUs it expects"
    size = re.search(r"Store: ~?([\d.]+) (GiB|MiB)", header) or re.search(r"Store: under ([\d.]+) (GiB)", header)
    assert size, "how big its store will be"
    stated = float(size.group(1)) * (2**30 if size.group(2) == "GiB" else 2**20)
    monkeypatch.chdir(repo_root)
    plan = plan_job(load_spec(JOBS / f"{name}.yaml"))
    # the plan estimates rows without a tokenizer; the comment gives the real count where they differ
    assert 0.5 < plan.store_bytes / stated < 2.0, (plan.store_bytes / 2**30, stated / 2**30)


def test_shipped_specs_ask_the_cluster_for_what_they_plan(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    needs = {name: resources.job_needs(load_spec(JOBS / f"{name}.yaml")) for name in MINE}
    assert (needs["neox-20b-outliers"].gpus, needs["neox-20b-outliers"].cpus) == (4, 16)
    assert resources.entrypoint_resources(needs["neox-20b-outliers"]) == {}, "a pipeline's driver takes no GPU"
    assert needs["neox-20b-addition"].gpus == 2
    assert resources.entrypoint_resources(needs["gptj-6b-outliers"]) == {"entrypoint_num_cpus": 4.0,
                                                                         "entrypoint_num_gpus": 1.0}


def test_demo_spec_plans(tmp_path):
    """jobs/demo.yaml names build/demo/model: plan it against a config of the demo model's shape."""
    from harvest.cli.demo import DEMO_MODEL
    from harvest.toy import toy_config
    from sharding.plan import plan_job

    toy_config("gpt_neox", vocab_size=4096, **DEMO_MODEL).save_pretrained(tmp_path / "build" / "demo" / "model")
    (tmp_path / "build" / "demo" / "corpus").mkdir()
    (tmp_path / "build" / "demo" / "corpus" / "a.txt").write_text("some text " * 50)
    spec = load_spec(JOBS / "demo.yaml", base_dir=tmp_path)
    plan = plan_job(spec)
    assert plan.fits and plan.device in ("cpu", "cuda") and len(plan.stages) == spec.run.stages


# --- addresses and errors -----------------------------------------------------------------------

def test_address_from_argument_or_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterUnreachableError, match="--address http://HOST:8265.*RAY_ADDRESS"):
        connection.dashboard_url(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert connection.dashboard_url(None) == "http://10.0.0.5:8265"
    assert connection.dashboard_url("head:8265") == "http://head:8265"
    with pytest.raises(ClusterUnreachableError, match="Ray Client address.*8265"):
        connection.dashboard_url("ray://head:10001")
    assert connection.is_local("http://127.0.0.1:8265") and not connection.is_local("http://head:8265")


def test_no_cluster_at_the_address_says_what_to_check():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(ClusterUnreachableError) as err:
        connection.connect(f"http://127.0.0.1:{port}")
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "ray status" in text and "8265" in text and "6379" in text


def test_not_enough_resources_says_what_the_plan_needs_and_what_the_cluster_has(make_spec, neox_ckpt):
    spec = make_spec(neox_ckpt, run={"stages": 2, "threads": 3}, model={"device": "cuda"})
    needs = resources.job_needs(spec)
    assert (needs.cpus, needs.gpus) == (6, 2)
    resources.check_resources(needs, {"CPU": 8, "GPU": 2}, "http://h:8265", 2)  # enough: no error
    with pytest.raises(ClusterResourcesError) as err:
        resources.check_resources(needs, {"CPU": 32.0, "GPU": 1.0}, "http://h:8265", 3)
    text = str(err.value)
    assert "2 GPU(s) (run.stages 2 x 1" in text and "has 32 CPU, 1 GPU" in text and "3 alive node(s)" in text
    assert "--no-resource-check" in text


def test_auto_device_takes_a_gpu_for_one_stage_on_a_gpu_cluster(make_spec, neox_ckpt):
    spec = make_spec(neox_ckpt, model={"device": "auto"})
    assert resources.job_needs(spec, [{"CPU": 8}]).gpus == 0
    gpu_node = {"CPU": 8, "GPU": 4}
    assert resources.entrypoint_resources(resources.job_needs(spec, [gpu_node])) == {"entrypoint_num_cpus": 8.0,
                                                                                      "entrypoint_num_gpus": 1.0}


@pytest.mark.parametrize("run, model", [({"stages": 2}, {"device": "cpu"}), ({"stages": 3, "threads": 2}, {}),
                                        ({"stages": 2}, {"device": "cuda"}), ({"stages": 2}, {"device": "auto"})])
def test_submit_and_the_pipeline_ask_ray_for_the_same_resources(make_spec, neox_ckpt, monkeypatch, run, model):
    """What ``harvest submit`` checks against the cluster is what the pipeline's actors ask Ray for."""
    from sharding import pipeline

    nodes = [{"CPU": 16.0, "GPU": 2.0, "memory": 1e11}, {"CPU": 8.0, "GPU": 2.0}]
    spec = make_spec(neox_ckpt, run=run, model=model)
    monkeypatch.setattr(pipeline.ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes]
                        + [{"Alive": False, "Resources": {"CPU": 64.0}}])
    driver = pipeline.Pipeline(SimpleNamespace(spec=spec, stages=[None] * spec.run.stages,
                                               layout=SimpleNamespace(n_batches=1)), 0)
    asked = driver.stage_resources()
    assert asked == resources.job_needs(spec, nodes)
    assert asked.cpus_per_stage == (run.get("threads") or 16 // spec.run.stages)


def _details(job_id, state, **meta):
    return SimpleNamespace(submission_id=job_id, job_id="02000000", status=state, message="", metadata=meta,
                           start_time=1_700_000_000_000, end_time=None, entrypoint="python -m cluster.entrypoint",
                           driver_node_id=None)


class FakeClient:
    def __init__(self, jobs):
        self.jobs = {j.submission_id: j for j in jobs}

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist..")
        return self.jobs[job_id]

    def list_jobs(self):
        return list(self.jobs.values())


def test_a_job_id_that_does_not_exist():
    client = FakeClient([_details("harvest-demo-1a2b3c4d", "SUCCEEDED", **{state.META_SPEC: "demo"})])
    with pytest.raises(JobNotFoundError) as err:
        state.job_info(client, "harvest-demo-1a2b3c4e")
    text = str(err.value)
    assert "no job 'harvest-demo-1a2b3c4e'" in text and "did you mean 'harvest-demo-1a2b3c4d'" in text
    assert "harvest jobs" in text


def test_one_unfinished_job_per_store():
    store = "/shared/stores/x.zarr"
    client = FakeClient([_details("harvest-x-1", "SUCCEEDED", **{state.META_STORE: store}),
                         _details("harvest-x-2", "RUNNING", **{state.META_STORE: store})])
    submission.check_no_other_writer(client, "/shared/stores/y.zarr")
    with pytest.raises(ClusterError, match="harvest-x-2 .RUNNING. is writing /shared/stores/x.zarr already"):
        submission.check_no_other_writer(client, store)


# --- the store location ---------------------------------------------------------------------------

def test_object_store_roots_need_no_shared_filesystem(make_spec, neox_ckpt, tmp_path):
    spec_file = _spec_file(tmp_path, make_spec(neox_ckpt, raw=True))
    job = submission.submit(spec_file, "http://127.0.0.1:8265", store_url="s3://bucket/stores", dry_run=True)
    assert job.store == "s3://bucket/stores/job.zarr" and "--store-root s3://bucket/stores" in job.entrypoint
    job = submission.submit(spec_file, "http://127.0.0.1:8265", store_url=f"file://{tmp_path}/shared", dry_run=True)
    assert job.store == str(tmp_path / "shared" / "job.zarr")
    in_spec = _spec_file(tmp_path, make_spec(neox_ckpt, raw=True, store={"root": f"file://{tmp_path}/s2"}))
    assert submission.submit(in_spec, "http://127.0.0.1:8265", dry_run=True).store == str(tmp_path / "s2" / "job.zarr")
    in_spec = _spec_file(tmp_path, make_spec(neox_ckpt, raw=True, store={"root": "gs://bucket/stores"}))
    assert submission.submit(in_spec, "http://127.0.0.1:8265", dry_run=True).store == "gs://bucket/stores/job.zarr"
    with pytest.raises(StoreNotWritableError, match="ftp://host/x"):
        submission.submit(spec_file, "http://127.0.0.1:8265", store_url="ftp://host/x", dry_run=True)


def test_spec_store_path_cannot_escape_the_store_url(make_spec, neox_ckpt, tmp_path):
    raw = make_spec(neox_ckpt, raw=True, store={"path": "../../elsewhere.zarr"})
    with pytest.raises(SpecError, match="outside the store root"):
        submission.submit(_spec_file(tmp_path, raw), "http://127.0.0.1:8265", store_url=str(tmp_path / "shared"),
                  dry_run=True)


def test_unwritable_store_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreNotWritableError, match=r"cannot write its store at .*a-file/stores/x.zarr"):
        entrypoint.check_writable(blocker / "stores" / "x.zarr")
    entrypoint.check_writable(tmp_path / "new" / "x.zarr")
    assert list((tmp_path / "new").iterdir()) == [], "the probe file is removed"


# --- the submission, built without a cluster ------------------------------------------------------

def _spec_file(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_submission(make_spec, neox_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("HARVEST_CLUSTER_PYTHON", raising=False)
    spec_file = _spec_file(tmp_path, make_spec(neox_ckpt, raw=True, run={"stages": 2, "threads": 1}))
    job = submission.submit(spec_file, "http://127.0.0.1:8265", dry_run=True, base_dir=tmp_path)
    assert job.state == "DRY-RUN" and job.job_id.startswith("harvest-test-")
    assert job.entrypoint.startswith(f"{sys.executable} -m cluster.entrypoint spec.yaml --base-dir {tmp_path} ")
    assert "--resume" in job.entrypoint and "--overwrite" not in job.entrypoint
    modules = [Path(m).name for m in job.runtime_env["py_modules"]]
    assert modules == ["harvest", "sharding", "analysis", "cluster"]
    assert "__pycache__" in job.runtime_env["excludes"] and job.runtime_env["working_dir"]

    remote = submission.submit(spec_file, "http://head:8265", dry_run=True, overwrite=True, resume=False, ship_code=False,
                       runtime_env={"env_vars": {"HF_HOME": "/shared/hf"}})
    assert remote.entrypoint.startswith("python -m cluster.entrypoint") and "--no-resume" in remote.entrypoint
    assert "--overwrite" in remote.entrypoint and "py_modules" not in remote.runtime_env
    assert remote.runtime_env["env_vars"]["HF_HOME"] == "/shared/hf"
    with pytest.raises(SpecError, match="working_dir is set by harvest submit"):
        submission.submit(spec_file, "http://head:8265", dry_run=True, runtime_env={"working_dir": "."})


# --- progress -------------------------------------------------------------------------------------

def test_measured_rate_leaves_out_start_up():
    assert progress.measured_rate([]) is None and progress.measured_rate([(0.0, 0)]) is None
    assert progress.measured_rate([(0.0, 0), (30.0, 0)]) is None
    assert progress.measured_rate([(0.0, 0), (30.0, 100)]) == pytest.approx(100 / 30)  # one move: start-up included
    assert progress.measured_rate([(0.0, 0), (30.0, 100), (40.0, 1100)]) == pytest.approx(100.0)


def test_progress_and_errors_from_a_job_log():
    log = "\n".join([
        "2026-11-25 17:11:16 INFO job_manager.py:581 -- Runtime env is setting up.",
        '[harvest-ready] {"store": "/s/x.zarr"}',
        '[harvest-progress] {"batches": 1, "n_batches": 10, "tokens": 40, "total_tokens": 400, "tokens_per_s": null}',
        "(PipelineStage pid=123) something [harvest-progress] {not json",
        '[harvest-progress] {"batches": 4, "n_batches": 10, "tokens": 160, "total_tokens": 400, "tokens_per_s": 20.0}',
        "[harvest-error] FingerprintMismatchError: cannot resume /s/x.zarr: prompts differ",
    ])
    assert protocol.parse_progress(log)["batches"] == 4
    assert protocol.parse_error(log) == ("FingerprintMismatchError", "cannot resume /s/x.zarr: prompts differ")
    p = progress.job_progress(log, "/nonexistent/x.zarr")
    assert (p.batches_done, p.tokens_done, p.tokens_total, p.source) == (4, 160, 400, "job log")
    assert p.eta_s == pytest.approx(12.0)
    assert progress.format_progress(p) == "4/10 batches (40.0%), 160/400 tokens, 20 tokens/s, ETA 12s  [from the job log]"
    assert progress.job_progress("nothing here", None) is None


def test_early_failure_is_raised_as_the_job_s_own_error():
    from harvest.errors import FingerprintMismatchError

    err = submission._early_failure("harvest-x-1", "[harvest-error] StoreNotWritableError: cannot write", "", "python", True)
    assert isinstance(err, StoreNotWritableError) and "harvest logs harvest-x-1" in str(err)
    err = submission._early_failure("harvest-x-1", "[harvest-error] FingerprintMismatchError: differ", "", "python", True)
    assert isinstance(err, FingerprintMismatchError)
    err = submission._early_failure("harvest-x-1", "/usr/bin/python: No module named jobs", "", "/usr/bin/python", False)
    assert isinstance(err, ClusterError) and "--python" in str(err) and "install harvest" in str(err)


def test_a_job_s_error_comes_back_as_its_own_class(make_spec, neox_ckpt, tmp_path, capsys):
    """The job's entry point reports a HarvestError in its log; the client raises the same class and message."""
    from harvest.errors import PlanDoesNotFitError

    raw = make_spec(neox_ckpt, raw=True, run={"stages": 2, "memory_gib": 0.01})
    code = entrypoint.main([str(_spec_file(tmp_path, raw)), "--base-dir", str(tmp_path)])
    log = capsys.readouterr().out
    assert code == 2
    name, message = protocol.parse_error(log)
    err = submission._early_failure("harvest-x-1", log, "", "python", True)
    assert type(err) is PlanDoesNotFitError and str(err).startswith(message) and "needs" in message
    info = _details("harvest-x-1", "FAILED", **{state.META_SPEC: "x"})
    again = state.status_from(info, log).exception()
    assert type(again) is PlanDoesNotFitError and str(again) == message
    assert type(protocol.rebuild_error("NotOurs", "boom")) is ClusterError


def test_status_reads_a_bucket_store_through_the_endpoint_the_job_was_submitted_with(monkeypatch):
    """``harvest status`` runs in a process that never parsed the spec: the submission's metadata tells it
    where the bucket's service is (endpoint and region only: credentials never enter the metadata)."""
    import json

    from harvest import objstore

    monkeypatch.setattr(objstore, "_options", {})
    seen = []
    monkeypatch.setattr(state, "job_progress", lambda log, store: seen.append(objstore._options.get("s3://b")))
    options = {"endpoint": "http://127.0.0.1:9", "region": "us-east-1"}
    info = _details("harvest-s3-1", "RUNNING", **{state.META_SPEC: "s3", state.META_STORE: "s3://b/runs/job.zarr",
                                                  state.META_STAGES: "2", state.META_STORAGE: json.dumps(options)})
    state.status_from(info, None)
    assert seen == [options]


def test_status_formatting():
    info = _details("harvest-demo-1", "FAILED", **{state.META_SPEC: "demo", state.META_STORE: "/nope/demo.zarr",
                                                     state.META_STAGES: "2"})
    st = state.status_from(info, '[harvest-error] StageError: stage 1 (blocks 2..3) failed: boom')
    assert st.error == "StageError: stage 1 (blocks 2..3) failed: boom" and st.stages == 2 and st.terminal
    text = state.format_status(st, now=1_700_000_065)
    assert "harvest-demo-1  FAILED  (spec demo, 2 stages)" in text and "error     StageError" in text
    assert "no progress yet" in text and "running for 1m 05s" in text
    table = state.format_jobs([st])
    assert table.splitlines()[1].split()[:3] == ["harvest-demo-1", "FAILED", "demo"]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, neox_ckpt, corpus_dir):
    """A finished one-stage store of 4 batches, made by the job's own entry point (no Ray)."""
    root = tmp_path_factory.mktemp("entry")
    raw = {"name": "entry", "model": {"path": str(neox_ckpt), "dtype": "float32", "device": "cpu"},
           "prompts": {"source": "text", "paths": [str(corpus_dir / "*.txt")], "seq_len": 24, "mode": "windowed",
                       "max_sequences": 10},
           "capture": {"hooks": ["blocks.*.hook_resid_post"]}, "run": {"batch_size": 3},
           "store": {"root": "stores", "path": "entry.zarr", "chunk_mib": 0.01, "chunks_per_shard": 2}}
    (root / "spec.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_the_job_entry_point_runs_a_job_and_reports_progress(small_store, capsys):
    code = entrypoint.main([str(small_store / "spec.yaml"), "--base-dir", str(small_store), "--progress-every", "0.05"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith(protocol.READY_TAG)
    last = protocol.parse_progress(out)
    assert last["batches"] == last["n_batches"] == 4 and last["tokens"] == last["total_tokens"] > 0
    assert last["tokens_per_s"] > 0 and "[harvest] harvested" in out

    code = entrypoint.main([str(small_store / "spec.yaml"), "--base-dir", str(small_store), "--no-resume"])
    out = capsys.readouterr().out
    assert code == 2 and "[harvest-error] StoreExistsError: a store already exists" in out


def test_read_progress_counts_tokens_of_written_batches(small_store):
    import zarr

    path = small_store / "stores" / "entry.zarr"
    full = store.read_progress(path)
    group = zarr.open_group(str(path), mode="r+")
    lengths = group["seq_length"][...]
    assert (full.batches_done, full.n_batches, full.tokens_total) == (4, 4, int(lengths.sum()))
    assert store.read_provenance(group)["layout"]["batch_size"] == 3
    manifest = group["_progress/stage_0"]
    saved = manifest[...]
    try:
        manifest[...] = np.array([1, 1, 0, 0], dtype=np.uint8)
        part = store.read_progress(path)
        assert (part.batches_done, part.tokens_done) == (2, int(lengths[:6].sum()))
        p = progress.job_progress('[harvest-progress] {"batches": 1, "n_batches": 4, "tokens": 9, "total_tokens": 9, '
                            '"tokens_per_s": 3.0}', str(path))
        assert (p.batches_done, p.source, p.tokens_per_s) == (2, "store", 3.0), "the store is fresher than the log"
    finally:
        manifest[...] = saved


def test_progress_monitor_prints_on_change(small_store):
    lines: list[str] = []
    times = iter([0.0, 10.0, 20.0])
    monitor = progress.ProgressMonitor(small_store / "stores" / "entry.zarr", 60, emit=lines.append, clock=lambda: next(times))
    assert monitor.poll() is not None and monitor.poll() is None, "unchanged: no new line"
    monitor.finish(tokens_per_s=12.5)
    assert len(lines) == 2 and json.loads(lines[-1].split(" ", 1)[1])["tokens_per_s"] == 12.5


# --- the CLI --------------------------------------------------------------------------------------

def test_cli_has_the_job_commands(monkeypatch):
    from typer.testing import CliRunner

    from harvest.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["--help"]).output
    for command in ("submit", "status", "logs", "stop", "jobs"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = runner.invoke(app, ["status", "harvest-x-1"])
    assert isinstance(result.exception, ClusterUnreachableError)
