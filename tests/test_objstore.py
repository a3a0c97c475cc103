"""Stores on object storage, against a real S3-compatible server (moto's, on loopback; tests/s3server.py).

Harvest into a bucket, SIGKILL and resume object-identical, analyse and query from the bucket, open it
with plain xarray, fail before compute on a missing bucket or refused credentials, survive injected
503s with an identical store, and never show the credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("moto.server")
pytest.importorskip("obstore")

import s3server  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

from harvest.errors import SpecError  # noqa: E402
from harvest.objstore import configure  # noqa: E402
from harvest.spec import parse_spec  # noqa: E402

BUCKET = "acts"


@pytest.fixture(scope="session")
def s3():
    saved = {k: os.environ.get(k) for k in s3server.ACCESS}
    server, endpoint = s3server.start_server()
    s3server.create_bucket(endpoint, BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_spec(make_spec, ckpt, endpoint: str, prefix: str, raw=False, **sections):
    store = {"root": f"s3://{BUCKET}/{prefix}", "storage_options": {"endpoint": endpoint, "region": "us-east-1"},
             **sections.pop("store", {})}
    return make_spec(ckpt, raw=raw, store=store, **sections)


def bucket_objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    """Every object of a store but the root metadata (timestamps, run figures)."""
    return {k: v for k, v in s3server.objects(endpoint, BUCKET, prefix).items() if k != "zarr.json"}


def cli(*args: str, endpoint: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"} if endpoint else {})}
    return subprocess.run([sys.executable, "-m", "harvest", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def no_secret(text: str) -> None:
    for value in (s3server.ACCESS["AWS_ACCESS_KEY_ID"], s3server.ACCESS["AWS_SECRET_ACCESS_KEY"]):
        assert value not in text


# --- fast: the spec ------------------------------------------------------------------------------

def test_url_root_is_confined_and_credentials_stay_out_of_the_spec(neox_ckpt, make_spec):
    spec = s3_spec(make_spec, neox_ckpt, "http://127.0.0.1:9", "runs", store={"path": "a/job.zarr"})
    assert spec.store_path() == f"s3://{BUCKET}/runs/a/job.zarr"
    for bad in ("../other.zarr", "a/../../x.zarr", "/abs.zarr", "s3://elsewhere/x.zarr", "."):
        with pytest.raises(SpecError, match="store.path"):
            s3_spec(make_spec, neox_ckpt, "http://127.0.0.1:9", "runs", store={"path": bad})
    with pytest.raises(SpecError, match="never from the spec"):
        make_spec(neox_ckpt, store={"root": "s3://b/p", "storage_options": {"secret_access_key": "x"}})
    with pytest.raises(SpecError, match="unknown URL scheme"):
        make_spec(neox_ckpt, store={"root": "ftp://host/x"})
    assert make_spec(neox_ckpt, store={"root": "file:///tmp/x"}).store_path() == __import__("pathlib").Path("/tmp/x/job.zarr")


# --- a harvest into the bucket, then analyses from it --------------------------------------------

def test_harvest_analyse_query_and_plain_xarray(s3, neox_ckpt, make_spec, tmp_path):
    from harvest.runner import run
    from harvest.store import open_store

    spec = s3_spec(make_spec, neox_ckpt, s3, "e2e")
    result = run(spec, progress=False)
    url = f"s3://{BUCKET}/e2e/job.zarr"
    assert result.path == url
    # the same job on local disk: the same array bytes
    local = run(make_spec(neox_ckpt), progress=False)
    ds, ref = open_store(url), open_store(local.path)
    for name in ref.data_vars:
        assert (ds[name].values == ref[name].values).all(), name
    info = ds.attrs["harvest"]
    assert info["status"] == "complete"
    no_secret(yaml.safe_dump(info))

    # analyses and query from the bucket, in fresh processes that know only the environment
    out = cli("analyze", "outliers", url, "--no-plots", "--magnitude", "0.5", endpoint=s3, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    q = cli("query", "dim", url, "3", endpoint=s3, cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    assert "dim 3" in q.stdout or "3" in q.stdout
    shown = cli("inspect", url, endpoint=s3, cwd=tmp_path)
    assert shown.returncode == 0 and "complete" in shown.stdout, shown.stderr
    no_secret(out.stdout + out.stderr + q.stdout + q.stderr + shown.stdout + shown.stderr)

    # the query reads its index and a few short ranges, never an activation array's shards
    from analysis.query import query_dim

    proxy = s3server.FlakyProxy(s3, every=10**9)
    try:
        configure(url, {"endpoint": proxy.endpoint, "region": "us-east-1"})
        query_dim(url, 3)
    finally:
        proxy.close()
        configure(url, {"endpoint": s3, "region": "us-east-1"})
    # the harvest-time statistics (on by default), or the index: never the rows
    assert proxy.requests and any("/analysis/statistics/" in r or "/analysis/index/" in r for r in proxy.requests)
    assert not [r for r in proxy.requests if "hook_resid_post/c/" in r], proxy.requests

    # plain xarray, no harvest code: fsspec/s3fs with the endpoint in storage_options
    import xarray as xr

    plain = xr.open_zarr(url, storage_options={"endpoint_url": s3})
    assert (plain["blocks.1.hook_resid_post"].values == ref["blocks.1.hook_resid_post"].values).all()


def test_missing_bucket_and_bad_credentials_fail_before_compute(s3, neox_ckpt, make_spec, tmp_path):
    raw = s3_spec(make_spec, neox_ckpt, s3, "x", raw=True)
    raw["store"]["root"] = "s3://no-such-bucket-here/x"
    (tmp_path / "nobucket.yaml").write_text(yaml.safe_dump(raw))
    out = cli("run", str(tmp_path / "nobucket.yaml"), "--quiet", cwd=tmp_path)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://no-such-bucket-here" in lines[0] and "create it" in lines[0], out.stderr

    # credentials the server does not know: a moto that checks them (the shared one accepts any)
    proc, endpoint = s3server.start_authenticating_server()
    try:
        raw["store"]["root"] = f"s3://{BUCKET}/denied"
        raw["store"]["storage_options"]["endpoint"] = endpoint
        (tmp_path / "denied.yaml").write_text(yaml.safe_dump(raw))
        out = cli("run", str(tmp_path / "denied.yaml"), "--quiet", cwd=tmp_path)
    finally:
        proc.terminate()
        proc.wait()
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"s3://{BUCKET}" in lines[0] and "credentials" in lines[0], out.stderr
    no_secret(out.stdout + out.stderr)


@pytest.mark.slow
def test_transient_503s_are_retried_into_an_identical_store(s3, neox_ckpt, make_spec):
    from harvest.runner import run

    run(s3_spec(make_spec, neox_ckpt, s3, "steady"), progress=False)
    proxy = s3server.FlakyProxy(s3, every=4)
    try:
        run(s3_spec(make_spec, neox_ckpt, proxy.endpoint, "flaky"), progress=False)
    finally:
        proxy.close()
        configure(f"s3://{BUCKET}", {"endpoint": s3, "region": "us-east-1"})  # not the closed proxy
    assert proxy.failed > 5
    a, b = bucket_objects(s3, "steady/job.zarr/"), bucket_objects(s3, "flaky/job.zarr/")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigkill_then_resume_is_identical_object_by_object(s3, make_checkpoint, make_spec, tmp_path):
    from harvest.store import open_group
    from harvest.toy import stdlib_docstrings

    ckpt = make_checkpoint("gpt_neox", hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=768)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_docstrings(limit=60)):
        (corpus / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    raw = s3_spec(make_spec, ckpt, s3, "kill", raw=True, run={"batch_size": 2, "threads": 1},
                  hooks=["hook_embed", "blocks.*.hook_resid_post", "blocks.3.attn.hook_pattern"],
                  prompts={"paths": [str(corpus / "*.txt")], "seq_len": 64, "mode": "packed", "max_sequences": 120},
                  store={"chunk_mib": 0.05, "chunks_per_shard": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump({**raw, "store": {**raw["store"], "path": "clean.zarr"}}))
    url = f"s3://{BUCKET}/kill/job.zarr"
    configure(url, {"endpoint": s3, "region": "us-east-1"})  # this process reads the bucket too

    def done() -> int:
        try:
            return int(open_group(url)["_progress/stage_0"][...].sum())
        except Exception:  # being created right now
            return 0

    proc = subprocess.Popen([sys.executable, "-m", "harvest", "run", "job.yaml", "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while done() < 3:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = done()
    n_batches = open_group(url).attrs["harvest"]["layout"]["n_batches"]
    assert 3 <= killed_at < n_batches

    resumed = cli("run", "job.yaml", "--quiet", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    clean = cli("run", "clean.yaml", "--quiet", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    no_secret(resumed.stdout + resumed.stderr)
    info = open_group(url).attrs["harvest"]
    assert info["status"] == "complete" and info["last_run"]["batches"] == n_batches - killed_at
    a, b = bucket_objects(s3, "kill/job.zarr/"), bucket_objects(s3, "kill/clean.zarr/")
    assert a.keys() == b.keys()
    assert not [k for k in a if a[k] != b[k]]


def test_shard_sink_puts_the_bytes_zarr_writes(s3):
    """The hand-encoded sink (one PUT per shard) and zarr's own pipeline leave identical objects,
    a short last shard and a flush part-way included."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    from harvest.shards import ShardObjectWriter
    from harvest.store import codecs_for, zarr_location
    from harvest.writer import ArrayWriter, EventLoops

    data = np.random.default_rng(1).standard_normal((1000, 48)).astype(np.float16)
    loops = EventLoops(ThreadPoolExecutor(1))
    try:
        for engine in ("shards", "zarr"):
            url = f"s3://{BUCKET}/sink-{engine}"
            configure(url, {"endpoint": s3, "region": "us-east-1"})
            group = zarr.open_group(zarr_location(url), mode="w")
            array = group.create_array("x", shape=data.shape, dtype="float16", chunks=(64, 48), shards=(256, 48),
                                       compressors=codecs_for("none", 0), fill_value=0)
            writer = ArrayWriter(array, 0, loops, fsync="none", engine=engine)
            assert isinstance(writer.shards, ShardObjectWriter) == (engine == "shards")
            writer.append(0, data[:300])
            writer.flush()  # a shard flushed part-way, then rewritten whole from its first row
            writer = ArrayWriter(array, 300, loops, fsync="none", engine=engine)
            for start in range(300, 1000, 70):
                writer.append(start, data[start:start + 70])
            writer.flush()
            assert (array[...] == data).all()
    finally:
        loops.close()
    a, b = bucket_objects(s3, "sink-shards/x/"), bucket_objects(s3, "sink-zarr/x/")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(a[k] == b[k] for k in a)
