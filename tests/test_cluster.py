"""A real two-node Ray cluster on this machine: submit, watch, compare, stop, resume.

The head (with the dashboard on loopback) and a second node each offer one CPU and each stage
actor asks for one (``run.threads: 1``), so the two stages of a job must run on different nodes.
The test starts its own Ray processes (own ``--temp-dir``, free ports) and stops exactly those:
``ray stop`` would stop every Ray process on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# A node that never joins or a job that never writes would hang the loops below: the timeout fails them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent
RAY = BIN / "ray"
HARVEST = BIN / "harvest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start`` head + one worker node, each with ``--num-cpus=1``, stopped by their own processes."""

    def __init__(self) -> None:
        # short: Ray's unix sockets live under it (107-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="hc", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def _node_ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def _ray_start(self, args: list[str]) -> None:
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
                  *self._node_ports()]
        done = subprocess.run([str(RAY), "start", *args, *common], env=self.env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"ray start failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    def start(self) -> LocalCluster:
        self._ray_start(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                         f"--ray-client-server-port={free_port()}"])
        self._ray_start([f"--address=127.0.0.1:{self.gcs_port}"])
        from ray.util.state import list_nodes

        while len(list_nodes(address=self.url, filters=[("state", "=", "ALIVE")])) < 2:  # the second node joins
            time.sleep(0.5)
        return self

    def processes(self) -> list:
        """Every process of this cluster: those naming its temp dir or GCS port, and their descendants."""
        import psutil

        def ours(cmdline: list[str]) -> bool:
            return any(self.temp_dir in a or a.endswith(f":{self.gcs_port}") for a in cmdline)

        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if ours(p.info["cmdline"] or []):
                    found[p.pid] = p
                    for child in p.children(recursive=True):
                        found[child.pid] = child
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists()
    c = LocalCluster()
    try:
        yield c.start()
    finally:
        c.stop()
        assert not c.processes(), "the cluster's processes are gone"
        assert had_token or not token.exists(), "no Ray token file left behind"


def harvest_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(HARVEST), *args], env=env, capture_output=True, text=True, timeout=timeout)


def write_spec(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def one_stage(spec):
    return dataclasses.replace(spec, run=dataclasses.replace(spec.run, stages=1))


def long_corpus(tmp_path: Path) -> Path:
    from harvest.toy import stdlib_docstrings

    path = tmp_path / "long" / "docs.jsonl"
    path.parent.mkdir()
    with path.open("w", encoding="utf-8") as f:
        for doc in stdlib_docstrings(limit=2000):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def test_two_stage_job_on_two_nodes_matches_a_local_run(cluster, neox_ckpt, make_spec, tmp_path):
    from ray.util.state import list_actors
    from sharding.verify import store_differences

    from harvest import load_spec
    from harvest.runner import run
    from cluster import wait
    from harvest.store import read_progress

    raw = make_spec(neox_ckpt, raw=True, hooks=("hook_embed", "blocks.*.hook_resid_post", "blocks.1.attn.hook_z"),
                    run={"stages": 2, "threads": 1, "batch_size": 3},
                    store={"root": str(tmp_path / "cluster-stores"), "path": "two.zarr"})
    spec_file = write_spec(tmp_path, "two", raw)

    t0 = time.monotonic()
    done = harvest_cli("submit", str(spec_file), "--address", cluster.url, "--progress-every", "0.5")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"^job\s+(\S+)", done.stdout, re.M).group(1)
    store = Path(re.search(r"^store\s+(\S+)", done.stdout, re.M).group(1))
    assert store == tmp_path / "cluster-stores" / "two.zarr"

    final = wait(job_id, cluster.url, timeout=180, poll=0.5)
    assert final.state == "SUCCEEDED", final
    print(f"2-stage job: {time.monotonic() - t0:.1f} s from submit to SUCCEEDED")
    p = final.progress
    assert p is not None and p.batches_done == p.n_batches == 4 and p.tokens_done == p.tokens_total
    shown = harvest_cli("status", job_id, "--address", cluster.url)
    assert shown.returncode == 0 and "SUCCEEDED" in shown.stdout and "4/4 batches" in shown.stdout, shown.stdout
    log = harvest_cli("logs", job_id, "--address", cluster.url)
    assert "[harvest-ready]" in log.stdout and "[harvest-progress]" in log.stdout

    # the two stage actors ran on two different Ray nodes
    actors = [a for a in list_actors(address=cluster.url, filters=[("class_name", "=", "PipelineStage")], detail=True)
              if a.job_id == final.ray_job_id]
    assert len(actors) == 2, actors
    assert len({a.node_id for a in actors}) == 2, "each stage on its own node"

    # byte for byte against a one-stage run in this process
    local = one_stage(load_spec(spec_file, store_root=str(tmp_path / "local-stores")))
    run(local, progress=False)
    reference = tmp_path / "local-stores" / "two.zarr"
    assert store_differences(reference, store) == []
    got = read_progress(store)
    assert (got.batches_done, got.n_batches) == (4, 4)


def test_stopped_job_is_resumable(cluster, neox_ckpt, make_spec, tmp_path):
    from harvest import load_spec
    from harvest.runner import run
    from harvest.store import batches_done, open_group
    from cluster import stop, submit
    from harvest.store import read_progress

    corpus = long_corpus(tmp_path)
    raw = make_spec(neox_ckpt, raw=True, run={"stages": 2, "threads": 1, "batch_size": 1},
                    prompts={"paths": [str(corpus)], "max_sequences": 1500},
                    store={"root": str(tmp_path / "stores"), "path": "long.zarr"})
    spec_file = write_spec(tmp_path, "long", raw)
    job = submit(spec_file, cluster.url, progress_every=0.5)
    store = Path(job.store)
    while True:  # stop once a few batches are durable
        p = read_progress(store) if (store / "zarr.json").is_file() else None
        if p is not None and p.batches_done >= 3:
            break
        time.sleep(0.2)
    st = stop(job.job_id, cluster.url)
    assert st.state == "STOPPED", st
    p = read_progress(store)
    assert 3 <= p.batches_done < p.n_batches == 1500, p

    # resumable: run locally (one stage) to the end. Another stage count continues the harvest-time
    # statistics from their last whole unit, so the resume starts there: at most one unit before the
    # first missing batch (the rows it redoes are rewritten identically)
    from harvest.statistics import load_statistics

    spec = one_stage(load_spec(spec_file))
    result = run(spec, resume=True, progress=False)
    assert p.n_batches - p.batches_done <= result.batches < p.n_batches
    assert batches_done(open_group(store)).all()
    stats = load_statistics(open_group(store))
    assert stats is not None and set(stats.batches.values()) == {p.n_batches}


def test_errors_a_user_meets(cluster, neox_ckpt, make_spec, tmp_path):
    from harvest.errors import ClusterResourcesError, JobNotFoundError, StoreNotWritableError
    from cluster import status, submit

    with pytest.raises(JobNotFoundError, match="no job 'harvest-nope'"):
        status("harvest-nope", cluster.url)

    greedy = write_spec(tmp_path, "greedy", make_spec(neox_ckpt, raw=True, run={"stages": 3, "threads": 1}))
    with pytest.raises(ClusterResourcesError, match=r"needs 3 CPU.*has 2 CPU"):
        submit(greedy, cluster.url)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    unwritable = write_spec(tmp_path, "unwritable", make_spec(
        neox_ckpt, raw=True, store={"root": str(blocker / "stores"), "path": "x.zarr"}))
    with pytest.raises(StoreNotWritableError, match="cannot write its store"):
        submit(unwritable, cluster.url)

    listed = harvest_cli("jobs", "--address", cluster.url)
    assert listed.returncode == 0, listed.stderr
    states = dict(re.findall(r"^(harvest-\S+)\s+(\w+)", listed.stdout, re.M))
    assert "FAILED" in states.values(), listed.stdout  # the unwritable one (and the module's earlier jobs)


def test_two_replicas_land_on_two_nodes_and_match_a_local_run(cluster, neox_ckpt, make_spec, tmp_path):
    """``run.replicas: 2`` of one stage on the two one-CPU nodes: one replica per node (checked from the actors'
    node ids), and the store identical to a local in-process run (R = 1)."""
    from ray.util.state import list_actors
    from sharding.verify import store_differences

    from cluster import wait
    from harvest import load_spec
    from harvest.runner import run

    raw = make_spec(neox_ckpt, raw=True, hooks=("hook_embed", "blocks.*.hook_resid_post"),
                    run={"replicas": 2, "threads": 1, "batch_size": 2},
                    capture={"hooks": ["hook_embed", "blocks.*.hook_resid_post"], "positions": "last"},
                    prompts={"max_sequences": 20},
                    store={"root": str(tmp_path / "cluster-stores"), "path": "replicas.zarr", "chunk_mib": 0.001,
                           "chunks_per_shard": 1})
    spec_file = write_spec(tmp_path, "replicas", raw)
    done = harvest_cli("submit", str(spec_file), "--address", cluster.url, "--progress-every", "0.5")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"^job\s+(\S+)", done.stdout, re.M).group(1)
    store = Path(re.search(r"^store\s+(\S+)", done.stdout, re.M).group(1))
    final = wait(job_id, cluster.url, timeout=180, poll=0.5)
    assert final.state == "SUCCEEDED", final
    actors = [a for a in list_actors(address=cluster.url, filters=[("class_name", "=", "PipelineStage")], detail=True)
              if a.job_id == final.ray_job_id]
    assert len(actors) == 2 and len({a.node_id for a in actors}) == 2, "one replica per node"
    local = dataclasses.replace(load_spec(spec_file, store_root=str(tmp_path / "local-stores")))
    local = dataclasses.replace(local, run=dataclasses.replace(local.run, replicas=1))
    run(local, progress=False)
    assert store_differences(tmp_path / "local-stores" / "replicas.zarr", store) == []


@pytest.fixture
def bucket_cluster():
    """(cluster, endpoint): moto's S3 server on loopback (tests/s3server.py) and a two-node cluster whose
    nodes get the bucket's credentials from their own environment, as a cloud node from its role; the
    job's spec names only the bucket and the endpoint. Its own cluster: the module's has no credentials."""
    sys.path.insert(0, str(Path(__file__).parent))
    import s3server

    with s3server.running_server("nodes") as endpoint:  # the credentials in this process's environment
        c = LocalCluster()
        c.env.update(s3server.ACCESS)
        try:
            yield c.start(), endpoint
        finally:
            c.stop()
    assert not c.processes(), "the cluster's processes are gone"


def test_two_stage_job_on_two_nodes_into_a_bucket_matches_a_local_run(bucket_cluster, neox_ckpt, make_spec,
                                                                      tmp_path):
    """``harvest submit`` with ``store.root: s3://…``: no shared file system, each stage on its own node
    writes its shards to the bucket (moto on loopback, reachable from both nodes); the store is identical
    object by object (but the bookkeeping: the root's provenance, the per-stage manifests) to a local
    one-stage run into the same bucket, and reads back from it."""
    import s3server
    from ray.util.state import list_actors

    from cluster import wait
    from harvest import load_spec
    from harvest.objstore import configure
    from harvest.runner import run
    from harvest.store import BOOKKEEPING, open_store, read_progress

    cluster, endpoint = bucket_cluster
    raw = make_spec(neox_ckpt, raw=True, hooks=("hook_embed", "blocks.*.hook_resid_post", "blocks.1.attn.hook_z"),
                    run={"stages": 2, "threads": 1, "batch_size": 3},
                    store={"root": "s3://nodes/cluster", "path": "two.zarr",
                           "storage_options": {"endpoint": endpoint, "region": "us-east-1"}})
    spec_file = write_spec(tmp_path, "bucket", raw)
    done = harvest_cli("submit", str(spec_file), "--address", cluster.url, "--progress-every", "0.5")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"^job\s+(\S+)", done.stdout, re.M).group(1)
    store = re.search(r"^store\s+(\S+)", done.stdout, re.M).group(1)
    assert store == "s3://nodes/cluster/two.zarr"
    for value in s3server.ACCESS.values():  # credentials stay in the nodes' environment
        assert value not in done.stdout + done.stderr

    configure(store, {"endpoint": endpoint, "region": "us-east-1"})  # this process reads the progress from the bucket
    final = wait(job_id, cluster.url, timeout=180, poll=0.5)
    assert final.state == "SUCCEEDED", harvest_cli("logs", job_id, "--address", cluster.url).stdout[-3000:]
    actors = [a for a in list_actors(address=cluster.url, filters=[("class_name", "=", "PipelineStage")], detail=True)
              if a.job_id == final.ray_job_id]
    assert len(actors) == 2 and len({a.node_id for a in actors}) == 2, "each stage on its own node"
    p = read_progress(store)
    assert p.batches_done == p.n_batches == 4

    local = one_stage(load_spec(spec_file, store_root="s3://nodes/local"))
    run(local, progress=False)

    def objects(prefix: str) -> dict[str, bytes]:
        # analysis/: statistics snapshots are kept per stage (1 here, 2 there); their equality across
        # stage counts is tests/test_harvest_statistics.py's
        return {k: v for k, v in s3server.objects(endpoint, "nodes", prefix).items()
                if k.split("/")[0] not in (*BOOKKEEPING, "analysis")}

    a, b = objects("cluster/two.zarr/"), objects("local/two.zarr/")
    assert a and a.keys() == b.keys() and not [k for k in a if a[k] != b[k]]
    ds, ref = open_store(store), open_store("s3://nodes/local/two.zarr")
    for name in ref.data_vars:
        assert (ds[name].values == ref[name].values).all(), name
