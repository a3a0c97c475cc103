"""The store writer alone: GB/s of the shard writer ÷ GB/s of raw writes of the same bytes.

    .venv/bin/python bench/writer_throughput.py            # full: 3 repetitions, writes section "Writer" of RESULTS.md
    .venv/bin/python bench/writer_throughput.py --quick    # 1 repetition, GPT-J shape only, RESULTS.md untouched

Synthetic fp16 batches shaped like a harvest of every layer's ``resid_post``: GPT-J-6B (28 arrays of
4096 columns) and GPT-NeoX-20B (44 arrays of 6144), ``--batch-rows`` tokens per batch (1024 by
default), ``--shards`` shards per array, the store's default layout (chunks of 8 MiB, 2 per shard).
The batches live in page-aligned memory, as pinned host memory does on a GPU. Each batch is handed
to a pool of N threads with one task per array (so one array is written by one thread, in order),
as ``StageWriter`` does, and the pool waits for the batch before the next. Variants, in one process,
interleaved, each repetition in a fresh directory deleted right after (so dirty pages never pile up):

- raw: ``os.pwrite`` of each shard's bytes from the batch, one file per shard, same threads: the bound;
- raw in pieces: the same bytes in ``os.pwrite`` calls of ``harvest.shards.FUSE_BYTES`` (1 MiB), the call size
  the shard writer uses. On this VM a whole run of either now and then costs the kernel 2-5x its usual time
  (seen in plain loops too, no store involved), so the buffered writers are divided by the faster of the two
  raw variants in each repetition (the stronger bound);
- shards: ``harvest.writer.ArrayWriter`` with ``harvest.shards`` (records 4 KiB-aligned, the default);
- shards, unfused: the writer before this change: each chunk checksummed whole by the ``crc32c`` package,
  then written in one call (``FUSE_BYTES`` set past the chunk size);
- shards, crc32c package: the default writer with the ``crc32c`` package's CRC-32C where the optional, faster
  ``crc32c-rs`` is installed (the label of "shards" names the one it used);
- shards, packed: the same with records packed as zarr packs them (``align=0``);
- zarr: ``ArrayWriter`` with ``store.writer: zarr`` (zarr-python's default pipeline: the writer before);
- O_DIRECT: raw and shards with ``O_DIRECT`` (aligned buffers, offsets and lengths);
- durable: raw with ``fdatasync`` per file, and shards with ``store.fsync: shard`` (the default);
- processes: shards in 2 forked processes × 1 thread, each writing half the arrays (vs 2 threads);
- zstd-1: ``store.compressor: zstd`` (falls back to zarr's codecs).

Unless a variant is durable, no fsync: the page cache absorbs the writes (``store.fsync: none``).
Ratios are of medians over the repetitions; CPU seconds are the process's (user + system, children
included for the processes variant).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

SECTION = "Writer (issue 12)"
SHAPES = {"gptj": ("GPT-J-6B", 28, 4096), "neox": ("GPT-NeoX-20B", 44, 6144)}
OUT = common.BUILD / "writer"

#: variant -> (label, baseline variant for the ratio)
VARIANTS = {
    "raw": ("raw pwrite, one file per shard", "raw"),
    "raw_pieces": ("raw pwrite in 1 MiB calls, one file per shard", "raw"),
    "shards": ("**shards (aligned records, default)**", "raw"),
    "unfused": ("shards, checksum then write per chunk, `crc32c` package (before)", "raw"),
    "crc32c": ("shards, `crc32c` package (without the fast-crc extra)", "raw"),
    "packed": ("shards, packed records (zarr's byte layout)", "raw"),
    "zarr": ("zarr-python default pipeline (the writer before)", "raw"),
    "zstd": ("zstd-1: falls back to zarr's codecs", "raw"),
    "raw_direct": ("raw pwrite, O_DIRECT", "raw_direct"),
    "direct": ("shards, O_DIRECT", "raw_direct"),
    "raw_durable": ("raw pwrite + fdatasync per file", "raw_durable"),
    "durable": ("shards, store.fsync: shard", "raw_durable"),
    "procs": ("shards, 2 processes × 1 thread", "raw"),
}


def cpu_now() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its waited-for children.

    User time is the writer's own work (Python, checksums, copies); system time is the kernel's (copying
    into the page cache, file system, reclaim), which on a shared machine also varies with others' load."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime


def make_batch(n_arrays: int, rows: int, cols: int) -> list:
    """One batch per array in page-aligned memory (like pinned host memory), random fp16."""
    import numpy as np

    from harvest.shards import aligned_empty

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_arrays):
        a = aligned_empty(rows * cols * 2).view(np.float16).reshape(rows, cols)
        a[...] = rng.standard_normal((rows, cols), dtype=np.float32)
        out.append(a)
    return out


def create_store(root: Path, n_arrays: int, n_rows: int, cols: int, compressor: str = "none"):
    import zarr

    from harvest.hookpoints import HookPoint
    from harvest.shape import array_plan
    from harvest.store import create_activation_array

    group = zarr.open_group(str(root), mode="w")
    plans = [array_plan(HookPoint(f"blocks.{i}.hook_resid_post", "hook_resid_post", i, ("token", "d_model")),
                        (n_rows, cols), "float16", 8.0, 2) for i in range(n_arrays)]
    return [create_activation_array(group, plan, compressor=compressor, level=1) for plan in plans]


def run_store(variant: str, root: Path, batch: list, n_rows: int, threads: int):
    """Write ``n_rows`` rows of every array through ``ArrayWriter``, batch by batch, on ``threads`` threads.

    Creating the arrays (zarr metadata) is setup: the returned callable does the timed writing."""
    import harvest.shards
    from harvest.writer import ArrayWriter, EventLoops

    rows, cols = batch[0].shape
    arrays = create_store(root, len(batch), n_rows, cols, "zstd" if variant == "zstd" else "none")
    if variant == "packed":
        harvest.shards.RECORD_ALIGN = 0
    loops = EventLoops(ThreadPoolExecutor(threads))
    opts = {"fsync": "shard" if variant == "durable" else "none", "direct_io": variant == "direct",
            "engine": "zarr" if variant in ("zarr", "zstd") else "shards"}
    writers = [ArrayWriter(a, 0, loops, **opts) for a in arrays]
    harvest.shards.RECORD_ALIGN = harvest.shards.SECTOR

    def go() -> None:
        fuse, crc = harvest.shards.FUSE_BYTES, harvest.shards.crc32c
        if variant == "unfused":
            harvest.shards.FUSE_BYTES = 1 << 62  # one piece per chunk: checksum it whole, then write it
        if variant in ("crc32c", "unfused"):  # the writer before had only the crc32c package
            harvest.shards.crc32c = importlib.import_module("crc32c")
        try:
            _write_store(writers, loops, batch, n_rows, threads)
        finally:
            harvest.shards.FUSE_BYTES, harvest.shards.crc32c = fuse, crc
    return go


def _write_store(writers, loops, batch, n_rows, threads, mine=None) -> None:
    rows = batch[0].shape[0]
    mine = range(len(writers)) if mine is None else mine
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    for start in range(0, n_rows, rows):
        n = min(rows, n_rows - start)
        jobs = [(writers[i], batch[i][:n]) for i in mine]
        if pool is None:
            for w, d in jobs:
                w.append(start, d)
        else:
            wait([pool.submit(w.append, start, d) for w, d in jobs])
    if pool is None:
        for i in mine:
            writers[i].flush()
    else:
        for f in [pool.submit(writers[i].flush) for i in mine]:
            f.result()
        pool.shutdown()
    loops.close()


def run_raw(variant: str, root: Path, batch: list, n_rows: int, threads: int, shard_rows: int):
    """The same bytes as plain files: each shard's rows written from the batch, one file per shard."""
    dirs = [root / f"a{i}" for i in range(len(batch))]
    for d in dirs:
        d.mkdir(parents=True)
    return lambda: _write_raw(variant, dirs, batch, n_rows, threads, shard_rows)


def _write_raw(variant: str, dirs: list, batch: list, n_rows: int, threads: int, shard_rows: int) -> None:
    from harvest.shards import FUSE_BYTES, SECTOR

    rows, cols = batch[0].shape
    direct = variant == "raw_direct"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fds: dict[int, int] = {}

    def write(i: int, start: int, n: int) -> None:
        data = batch[i][:n]
        shard, at = divmod(start, shard_rows)
        if i not in fds or at == 0:
            if i in fds:
                finish(i)
            fds[i] = os.open(dirs[i] / f"{shard}", flags, 0o644)
        mv = memoryview(data.reshape(-1).view("u1"))
        if direct and len(mv) % SECTOR:
            mv = mv[: len(mv) // SECTOR * SECTOR]  # the bound writes whole pages only
        if variant == "raw_pieces":
            for lo in range(0, len(mv), FUSE_BYTES):
                os.pwrite(fds[i], mv[lo: lo + FUSE_BYTES], at * cols * 2 + lo)
        else:
            os.pwrite(fds[i], mv, at * cols * 2)
        if at + n >= shard_rows or start + n >= n_rows:
            finish(i)

    def finish(i: int) -> None:
        if variant == "raw_durable":
            os.fdatasync(fds[i])
        os.close(fds.pop(i))

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    for start in range(0, n_rows, rows):
        n = min(rows, n_rows - start)
        # a batch that straddles a shard boundary is written as two pieces, as the store writer splits it
        pieces = []
        s = start
        while s < start + n:
            e = min(start + n, (s // shard_rows + 1) * shard_rows)
            pieces.append((s, e - s))
            s = e
        for s, m in pieces:
            if pool is None:
                for i in range(len(batch)):
                    write(i, s, m)
            else:
                wait([pool.submit(write, i, s, m) for i in range(len(batch))])
    for i in list(fds):
        finish(i)
    if pool is not None:
        pool.shutdown()


def run_procs(root: Path, batch: list, n_rows: int):
    """Shards in 2 forked processes, one thread each, each writing half the arrays."""
    create_store(root, len(batch), n_rows, batch[0].shape[1])  # the parent creates, as the driver does
    return lambda: _write_procs(root, batch, n_rows)


def _write_procs(root: Path, batch: list, n_rows: int) -> None:
    halves = [range(0, len(batch), 2), range(1, len(batch), 2)]
    pids = []
    for half in halves:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                import zarr

                from harvest.writer import ArrayWriter, EventLoops

                group = zarr.open_group(str(root), mode="r+")
                loops = EventLoops(ThreadPoolExecutor(1))
                rows = batch[0].shape[0]
                writers = {i: ArrayWriter(group[f"blocks.{i}.hook_resid_post"], 0, loops, fsync="none") for i in half}
                for start in range(0, n_rows, rows):
                    n = min(rows, n_rows - start)
                    for i in half:
                        writers[i].append(start, batch[i][:n])
                for i in half:
                    writers[i].flush()
            except BaseException as exc:  # noqa: BLE001
                print(f"child failed: {exc!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError("a writer process failed")


def measure_one(variant: str, shape: str, threads: int, batch: list, n_rows: int, shard_rows: int) -> dict:
    root = OUT / f"{variant}-{shape}-{threads}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if variant.startswith("raw"):
        go = run_raw(variant, root, batch, n_rows, threads, shard_rows)
    elif variant == "procs":
        go = run_procs(root / "s.zarr", batch, n_rows)
    else:
        go = run_store(variant, root / "s.zarr", batch, n_rows, threads)
    os.sync()  # no writeback left over from the variant before
    (u0, s0), t0 = cpu_now(), time.perf_counter()
    go()
    seconds, (u1, s1) = time.perf_counter() - t0, cpu_now()
    on_disk = common.dir_bytes(root)
    shutil.rmtree(root, ignore_errors=True)
    return {"variant": variant, "shape": shape, "threads": threads, "seconds": seconds, "cpu": u1 - u0 + s1 - s0,
            "user": u1 - u0, "system": s1 - s0,
            "bytes": len(batch) * n_rows * batch[0].shape[1] * 2, "on_disk": on_disk}


def measure(shapes: list[str], threads_list: list[int], variants: list[str], reps: int, batch_rows: int,
            shards: int) -> dict:
    import harvest.shards
    from harvest.shards import direct_io_supported
    from harvest.shape import chunk_layout

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "machine": common.machine(),
            "versions": common.versions(), "batch_rows": batch_rows, "shards": shards, "reps": reps,
            "direct_io": direct_io_supported(OUT), "load_before": os.getloadavg()[0], "args": " ".join(sys.argv[1:]),
            "crc32c": harvest.shards.crc32c.__name__}
    runs = []
    for shape in shapes:
        _, n_arrays, cols = SHAPES[shape]
        chunk, shard_rows = chunk_layout(10**9, cols * 2, 8.0, 2)
        n_rows = shards * shard_rows
        batch = make_batch(n_arrays, batch_rows, cols)
        for variant in ("raw", "shards"):  # warm-up: imports, first page faults
            measure_one(variant, shape, 1, batch, n_rows, shard_rows)
        for threads in threads_list:
            for rep in range(reps):
                for variant in (variants if rep % 2 == 0 else variants[::-1]):  # alternate the order
                    if variant == "procs" and threads != 2:
                        continue
                    if variant in ("raw_direct", "direct") and not meta["direct_io"]:
                        continue
                    r = measure_one(variant, shape, threads, batch, n_rows, shard_rows)
                    r["rep"], r["load"] = rep, os.getloadavg()[0]
                    runs.append(r)
                    print(f"{shape} {threads}t rep {rep} {variant:<12} {r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s "
                          f"{r['bytes'] / max(r['cpu'], 1e-9) / 1e9:6.2f} GB/CPU-s", flush=True)
        del batch
    meta["load_after"] = os.getloadavg()[0]
    return {"meta": meta, "runs": runs}


def render(res: dict) -> str:
    meta, runs = res["meta"], res["runs"]
    cells: dict[tuple, list] = {}
    by_rep: dict[tuple, dict] = {}
    for r in runs:
        cells.setdefault((r["shape"], r["threads"], r["variant"]), []).append(r)
        by_rep[(r["shape"], r["threads"], r["variant"], r["rep"])] = r
    rate = lambda r: r["bytes"] / r["seconds"]  # noqa: E731
    per_cpu = lambda r: r["bytes"] / max(r["cpu"], 1e-9)  # noqa: E731

    def bound_run(r: dict, bound: str) -> dict | None:
        """The run ``r`` is divided by: its bound in the same repetition; for buffered writes the faster of
        raw pwrite in one call per batch and in 1 MiB calls."""
        names = ("raw", "raw_pieces") if bound == "raw" else (bound,)
        found = [by_rep[k] for name in names if (k := (r["shape"], r["threads"], name, r["rep"])) in by_rep]
        return max(found, key=rate) if found else None

    def ratio(rs: list, bound: str, fn) -> str:
        """Median over repetitions of (this variant ÷ its bound in the same repetition)."""
        pairs = [fn(r) / fn(b) for r in rs if (b := bound_run(r, bound)) is not None]
        return f"{common.median(pairs):.2f}" if pairs else "-"

    rows = ["| shape | threads | writer | GB/s | ÷ its raw bound (GB/s) | GB per CPU-second | ÷ its raw bound (GB per "
            "CPU-s) | CPU-s per GB: user / system | on disk ÷ logical |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_gb = lambda rs, key: common.median([r[key] / (r["bytes"] / 1e9) for r in rs])  # noqa: E731
    for (shape, threads, variant), rs in cells.items():
        label, bound = VARIANTS[variant]
        if variant == "shards" and meta.get("crc32c"):
            label = label.replace(")**", f", {meta['crc32c']})**")
        rows.append(f"| {SHAPES[shape][0]} ({SHAPES[shape][1]} × {SHAPES[shape][2]}) | {threads} | {label} | "
                    f"{common.median([rate(r) for r in rs]) / 1e9:.2f} | {ratio(rs, bound, rate)} | "
                    f"{common.median([per_cpu(r) for r in rs]) / 1e9:.2f} | {ratio(rs, bound, per_cpu)} | "
                    f"{per_gb(rs, 'user'):.3f} / {per_gb(rs, 'system'):.3f} | {rs[0]['on_disk'] / rs[0]['bytes']:.4f} |")
    mach, vers = meta["machine"], meta["versions"]
    return f"""
Command: `.venv/bin/python bench/writer_throughput.py{(' ' + meta['args']) if meta.get('args') else ''}` (started
{meta['started']} UTC; {meta['reps']} repetitions, interleaved, medians). Machine: {mach['cpu']}, nproc {mach['nproc']},
{mach['memory']} RAM, ext4 on a virtual disk; {', '.join(f'{k} {v}' for k, v in vers.items())}. Load average
{meta['load_before']:.1f} before, {meta['load_after']:.1f} after, on 2 cores (the machine is shared with other
sessions, so absolute GB/s move from run to run); the ratios are side by side: every variant and its bound in the
same repetition, in an order reversed every other repetition, `sync` before each.

Each array gets {meta['shards']} shards of the store's default layout (chunks of 8 MiB, 2 per shard; fp16), written
from batches of {meta['batch_rows']} rows in page-aligned memory; one task per array per batch on the thread pool.
"÷ its raw bound" is the median over repetitions of the variant ÷ raw `pwrite` of the same bytes with the same
threads in the same repetition: for buffered writers the faster of raw in one call per batch and raw in 1 MiB
calls, O_DIRECT for O_DIRECT, `fdatasync` per file for the durable writer. BENCH.md's goal: ≥ 0.8.

{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, GPT-J shape, print only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="gptj,neox")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=2, help="shards per array (2: 32 MiB of 4096-wide fp16 rows)")
    ap.add_argument("--json", type=Path, default=common.BUILD / "writer_throughput.json")
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md from --json")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    if args.render:
        common.write_section(SECTION, render(json.loads(args.json.read_text())))
        return
    shapes = ["gptj"] if args.quick else args.shapes.split(",")
    res = measure(shapes, [int(t) for t in args.threads.split(",")], args.variants.split(","),
                  1 if args.quick else args.reps, args.batch_rows, args.shards)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    table = render(res)
    print(table)
    if not (args.quick or args.no_write):
        common.write_section(SECTION, table)
        print(f"wrote section '{SECTION}' of {common.RESULTS}")


if __name__ == "__main__":
    main()
