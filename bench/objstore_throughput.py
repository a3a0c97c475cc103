"""Stores on object storage: harvest into a local S3 server vs local disk, and the upload path alone
vs a plain ``put`` loop of the same bytes with the same client (obstore).

    .venv/bin/python bench/objstore_throughput.py [--repeats 3]

The S3 server is moto's (``moto[server]``, the test extra) on 127.0.0.1: Python, single process, so
its figures are a floor, not what a cloud bucket gives. Both halves of each pair run side by side in
one process, alternating, and the ratio is the figure that carries over.

* harvest: the same job (a small GPT-NeoX, every layer's ``resid_post``, fp32) into ``/tmp`` and
  into ``s3://bench/…``; tokens/s of each, ratio S3 / disk.
* upload path: ``ArrayWriter`` (the harvest's writer: whole shards, one PUT each through zarr's
  ``ObjectStore``, one array per write thread as the stage's pool does) vs ``obstore.put`` of
  shard-sized buffers of the same total bytes from the same number of threads; ratio (goal >= 0.8).
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256, help="bytes uploaded per repeat of the upload pair")
    args = parser.parse_args()
    import s3server

    server, endpoint = s3server.start_server()
    s3server.create_bucket(endpoint, "bench")
    work = Path(tempfile.mkdtemp(prefix="objstore-bench-"))
    harvests, uploads = [], []
    for r in range(args.repeats):
        harvests.append(harvest_pair(endpoint, work, r))
        uploads.append(upload_pair(endpoint, args.threads, args.mib, r))
        print(f"repeat {r}: harvest disk {harvests[-1][0]:,.0f} tok/s, s3 {harvests[-1][1]:,.0f} tok/s; "
              f"upload writer {uploads[-1][0] / 2**20:.0f} MiB/s, plain put {uploads[-1][1] / 2**20:.0f} MiB/s",
              flush=True)
    server.stop()
    med = statistics.median
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"harvest into S3 / into disk: {med(s / d for d, s in harvests):.2f}x "
          f"(median of {args.repeats}; disk {med(d for d, _ in harvests):,.0f} tok/s, "
          f"s3 {med(s for _, s in harvests):,.0f} tok/s)")
    print(f"upload path / plain put loop: {med(w / p for w, p in uploads):.2f}x "
          f"(writer {med(w for w, _ in uploads) / 2**20:.0f} MiB/s, put {med(p for _, p in uploads) / 2**20:.0f} MiB/s, "
          f"{args.threads} threads)")


if __name__ == "__main__":
    main()
