"""Stores on object storage: harvest into a local S3 server vs local disk, and the upload path alone
vs a plain ``put`` loop of the same bytes with the same client (obstore).

    .venv/bin/python bench/objstore_throughput.py [--repeats 3]

The S3 server is moto's (``moto[server]``, the test extra) on 127.0.0.1: Python, single process, so
its figures are a floor, not what a cloud bucket gives. Both halves of each pair run side by side in
one process, alternating, and the ratio is the figure that carries over.

* harvest: the same job (a small GPT-NeoX, every layer's ``resid_post``, fp32) into ``/tmp`` and
  into ``s3://bench/…``; tokens/s of each, ratio S3 / disk.
* upload path: ``ArrayWriter`` (the harvest's writer: whole shards, one upload each through
  ``objstore.put_object``, one array per write thread as the stage's pool does) vs ``obstore.put`` of
  shard-sized buffers of the same total bytes from the same number of threads; ratio (goal >= 0.8).
* verify: ``harvest verify`` of the harvest pair's store in the bucket vs on disk vs plain
  ``obstore.get`` of every object of the store from as many threads (the bound for the bucket).
* multipart (``--shard-mib 64 128 256``): one large shard uploaded by ``objstore.put_object`` as a
  multipart upload (parts of ``PART_BYTES``, ``PART_CONCURRENCY`` in flight) vs as one PUT
  (``HARVEST_MULTIPART_MIB`` above the shard), alternating; MiB/s of each, ratio multipart / single.
  ``--conn-mib-s R`` puts a loopback proxy in front of the server that holds each request's body to
  R MiB/s, as a cloud bucket limits one connection (tens of MiB/s) while it scales across many: a model
  of the network the multipart path is for, labelled as such in the output.

    .venv/bin/python bench/objstore_throughput.py --only multipart --shard-mib 64 128 256 [--conn-mib-s 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def harvest_pair(endpoint: str, work: Path, repeat: int) -> tuple[float, float]:
    from harvest.runner import run
    from harvest.spec import parse_spec
    from harvest.toy import build_checkpoint, build_tokenizer, stdlib_docstrings

    ckpt = work / "ckpt"
    if not ckpt.exists():
        build_tokenizer(stdlib_docstrings(limit=300), work / "tok", vocab_size=512)
        build_checkpoint(ckpt, "gpt_neox", tokenizer_dir=work / "tok", hidden_size=256, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=1024)
        corpus = work / "corpus"
        corpus.mkdir()
        for i, doc in enumerate(stdlib_docstrings(limit=400)):
            (corpus / f"d{i:03d}.txt").write_text(doc, encoding="utf-8")
    ckpt_dir = next(ckpt.rglob("config.json")).parent

    def spec(root: str):
        return parse_spec({
            "name": "bench", "model": {"path": str(ckpt_dir), "device": "cpu"},
            "prompts": {"source": "text", "paths": [str(work / "corpus" / "*.txt")], "seq_len": 128,
                        "mode": "packed", "max_sequences": 256},
            "capture": {"hooks": ["blocks.*.hook_resid_post"]}, "run": {"batch_size": 8},
            "store": {"root": root, "path": f"r{repeat}.zarr", "chunk_mib": 1, "chunks_per_shard": 4,
                      "storage_options": {"endpoint": endpoint, "region": "us-east-1"}}}, base_dir=work)

    disk = run(spec(str(work / "stores")), progress=False, overwrite=True).tokens_per_second
    s3 = run(spec("s3://bench/stores"), progress=False, overwrite=True).tokens_per_second
    return disk, s3


def upload_pair(endpoint: str, threads: int, mib: int, repeat: int) -> tuple[float, float]:
    import obstore
    import zarr

    from harvest.objstore import configure, obstore_of
    from harvest.store import codecs_for, zarr_location
    from harvest.writer import ArrayWriter, EventLoops

    url = f"s3://bench/upload{repeat}"
    configure(url, {"endpoint": endpoint, "region": "us-east-1"})
    d, shard_rows = 2048, 1024  # fp16 rows of 4 KiB, 4 MiB shards
    rows = mib * 2**20 // (d * 2) // threads
    rows -= rows % shard_rows
    data = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float16)
    group = zarr.open_group(zarr_location(url), mode="w")
    arrays = [group.create_array(f"a{i}", shape=(rows, d), dtype="float16", chunks=(256, d),
                                 shards=(shard_rows, d), compressors=codecs_for("none", 0), fill_value=0)
              for i in range(threads)]
    pool = ThreadPoolExecutor(threads)
    loops = EventLoops(ThreadPoolExecutor(threads))

    def write(array) -> None:
        writer = ArrayWriter(array, 0, loops, fsync="none")
        for start in range(0, rows, 256):  # batches arrive a few rows at a time, as from a stage
            writer.append(start, data[start:start + 256])
        writer.flush()

    t = time.perf_counter()
    list(pool.map(write, arrays))
    t_writer = time.perf_counter() - t
    nbytes = sum(obj["size"] for chunk in obstore.list(obstore_of(url)) for obj in chunk
                 if "/c/" in obj["path"])
    shards = [bytes(obstore.get(obstore_of(url), f"a0/c/{s}/0").bytes()) for s in range(rows // shard_rows)]
    store = obstore_of(f"s3://bench/plain{repeat}")

    def put(i: int) -> None:
        for s, blob in enumerate(shards):
            obstore.put(store, f"a{i}/c/{s}/0", blob)

    t = time.perf_counter()
    list(pool.map(put, range(threads)))
    t_plain = time.perf_counter() - t
    pool.shutdown()
    loops.close()
    return nbytes / t_writer, nbytes / t_plain


def verify_pair(endpoint: str, work: Path, repeat: int) -> tuple[float, float, float, float]:
    """MiB/s of ``verify_store`` on the harvest pair's store on disk, on the same store in the bucket
    (the whole command, and its checking alone: less the fixed cost of opening the store, reading
    its row map and listing it), and of plain ``obstore.get`` of every object of that store from as
    many threads (the read bound)."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    from harvest.objstore import obstore_of
    from harvest.verify import OBJECT_WORKERS, verify_store

    url = f"s3://bench/stores/r{repeat}.zarr"
    disk = verify_store(work / "stores" / f"r{repeat}.zarr")
    bucket = verify_store(url)
    fixed = verify_store(url, arrays=set()).seconds
    assert disk.ok and bucket.ok
    store = obstore_of(url)
    keys = [m["path"] for chunk in obstore.list(store) for m in chunk if "/c/" in m["path"]]
    t = time.perf_counter()
    with ThreadPoolExecutor(OBJECT_WORKERS) as pool:
        nbytes = sum(pool.map(lambda k: len(obstore.get(store, k).bytes()), keys))
    plain = nbytes / 2**20 / (time.perf_counter() - t)
    mib = bucket.bytes_read / 2**20
    return disk.bytes_read / 2**20 / disk.seconds, mib / bucket.seconds, mib / (bucket.seconds - fixed), plain


def multipart_pair(endpoint: str, shard_mib: int, repeat: int) -> tuple[float, float]:
    """MiB/s of one ``shard_mib`` shard uploaded (multipart, single PUT) by ``objstore.put_object``."""
    import asyncio

    from harvest.objstore import obstore_of, put_object

    store = obstore_of(f"s3://bench/multipart{repeat}", {"endpoint": endpoint, "region": "us-east-1"})
    data = np.random.default_rng(repeat).integers(0, 256, shard_mib * 2**20, dtype=np.uint8)
    rates = {}
    for mode in ("multipart", "single") if repeat % 2 == 0 else ("single", "multipart"):
        if mode == "single":
            os.environ["HARVEST_MULTIPART_MIB"] = str(shard_mib + 1)
        t = time.perf_counter()
        asyncio.run(put_object(store, f"{mode}-{shard_mib}", memoryview(data)))
        rates[mode] = shard_mib / (time.perf_counter() - t)
        os.environ.pop("HARVEST_MULTIPART_MIB", None)
    return rates["multipart"], rates["single"]


class ThrottlingProxy:
    """A loopback HTTP proxy that takes each request's body at ``mib_s`` MiB/s, then forwards it:
    one connection's bandwidth capped, as on a cloud bucket, many connections in parallel."""

    def __init__(self, upstream: str, mib_s: float):
        import http.server

        import s3server

        host, port = upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                t = time.perf_counter()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(max(0.0, len(body) / (mib_s * 2**20) - (time.perf_counter() - t)))
                s3server.forward(self, host, port, body, timeout=300)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server, self.endpoint = s3server.serve(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256, help="bytes uploaded per repeat of the upload pair")
    parser.add_argument("--only", choices=("harvest", "upload", "multipart", "verify"), action="append",
                        help="run only these pairs (repeatable; default: all)")
    parser.add_argument("--shard-mib", type=int, nargs="+", default=[64, 128, 256],
                        help="shard sizes of the multipart pair")
    parser.add_argument("--conn-mib-s", type=float, default=None,
                        help="multipart pair through a proxy capping each connection at this many MiB/s")
    args = parser.parse_args()
    only = set(args.only or ("harvest", "upload", "multipart", "verify"))
    import s3server

    from harvest.objstore import PART_BYTES, PART_CONCURRENCY

    server, endpoint = s3server.start_server()
    s3server.create_bucket(endpoint, "bench")
    work = Path(tempfile.mkdtemp(prefix="objstore-bench-"))
    harvests, uploads, verifies, multipart = [], [], [], {mib: [] for mib in args.shard_mib}
    proxy = ThrottlingProxy(endpoint, args.conn_mib_s) if args.conn_mib_s else None
    for r in range(args.repeats):
        if only & {"harvest", "verify"}:
            harvests.append(harvest_pair(endpoint, work, r))
            print(f"repeat {r}: harvest disk {harvests[-1][0]:,.0f} tok/s, s3 {harvests[-1][1]:,.0f} tok/s", flush=True)
        if "verify" in only:
            verifies.append(verify_pair(endpoint, work, r))
            print(f"repeat {r}: verify disk {verifies[-1][0]:.0f} MiB/s, bucket {verifies[-1][1]:.0f} MiB/s "
                  f"(checking alone {verifies[-1][2]:.0f}), plain get {verifies[-1][3]:.0f} MiB/s", flush=True)
        if "upload" in only:
            uploads.append(upload_pair(endpoint, args.threads, args.mib, r))
            print(f"repeat {r}: upload writer {uploads[-1][0] / 2**20:.0f} MiB/s, "
                  f"plain put {uploads[-1][1] / 2**20:.0f} MiB/s", flush=True)
        if "multipart" in only:
            for mib in args.shard_mib:
                multipart[mib].append(multipart_pair(proxy.endpoint if proxy else endpoint, mib, r))
                print(f"repeat {r}: {mib} MiB shard: multipart {multipart[mib][-1][0]:.0f} MiB/s, "
                      f"single PUT {multipart[mib][-1][1]:.0f} MiB/s", flush=True)
    if proxy is not None:
        proxy.close()
    server.stop()
    med = statistics.median
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if harvests:
        print(f"harvest into S3 / into disk: {med(s / d for d, s in harvests):.2f}x "
              f"(median of {args.repeats}; disk {med(d for d, _ in harvests):,.0f} tok/s, "
              f"s3 {med(s for _, s in harvests):,.0f} tok/s)")
    if uploads:
        print(f"upload path / plain put loop: {med(w / p for w, p in uploads):.2f}x "
              f"(writer {med(w for w, _ in uploads) / 2**20:.0f} MiB/s, put {med(p for _, p in uploads) / 2**20:.0f} "
              f"MiB/s, {args.threads} threads)")
    if verifies:
        print(f"verify on the bucket / plain get loop: {med(b / p for _, b, _, p in verifies):.2f}x whole command, "
              f"{med(c / p for _, _, c, p in verifies):.2f}x checking alone; / verify on disk: "
              f"{med(b / d for d, b, _, _ in verifies):.2f}x (disk {med(v[0] for v in verifies):.0f} MiB/s, bucket "
              f"{med(v[1] for v in verifies):.0f} MiB/s, checking alone {med(v[2] for v in verifies):.0f} MiB/s, "
              f"get {med(v[3] for v in verifies):.0f} MiB/s)")
    if "multipart" in only:
        where = (f"through a proxy capping each connection at {args.conn_mib_s:g} MiB/s (a model of a cloud "
                 "bucket)" if proxy else "straight to the server")
        print(f"multipart ({PART_BYTES // 2**20} MiB parts, {PART_CONCURRENCY} in flight) / single PUT, {where}:")
        for mib, pairs in multipart.items():
            print(f"  {mib:4d} MiB shard: {med(m / s for m, s in pairs):.2f}x (median of {args.repeats}; "
                  f"multipart {med(m for m, _ in pairs):.0f} MiB/s, single {med(s for _, s in pairs):.0f} MiB/s)")


if __name__ == "__main__":
    main()
