"""The store writer of this tree beside the one of an earlier commit, in one process, interleaved with raw writes.

    .venv/bin/python bench/probes/writer_before_after.py --before aabba91 --shape neox --threads 2 --reps 9

``harvest/shards.py`` of ``--before`` (``git show REV:harvest/shards.py``) is loaded as a second module and its
``ShardFileWriter`` patched into ``harvest.writer`` for the "before" runs; everything else (``ArrayWriter``,
the bench's batches, stores and timing: ``bench/writer_throughput.py``) is shared. Each repetition runs raw
``pwrite`` (one call per batch and 1 MiB calls), the writer now and the writer before, in an order reversed
every other repetition; ratios are to the faster (GB/s) or cheaper (CPU) raw variant of the same repetition,
then medians over repetitions.
"""
import argparse
import importlib.util
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import writer_throughput as wt  # noqa: E402

import harvest.writer  # noqa: E402
from harvest.shape import chunk_layout  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--before", required=True, help="a git revision whose harvest/shards.py is 'before'")
ap.add_argument("--shape", default="neox", choices=list(wt.SHAPES))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=9)
args = ap.parse_args()

source = subprocess.run(["git", "show", f"{args.before}:harvest/shards.py"], cwd=ROOT, check=True,
                        capture_output=True, text=True).stdout
path = wt.common.BUILD / "shards_before.py"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(source.replace("from .errors import", "from harvest.errors import"))
spec = importlib.util.spec_from_file_location("shards_before", path)
before = importlib.util.module_from_spec(spec)
sys.modules["shards_before"] = before
spec.loader.exec_module(before)
now = harvest.writer.ShardFileWriter

_, n_arrays, cols = wt.SHAPES[args.shape]
chunk, shard_rows = chunk_layout(10**9, cols * 2, 8.0, 2)
batch = wt.make_batch(n_arrays, 1024, cols)
n_rows = 2 * shard_rows
wt.OUT.mkdir(parents=True, exist_ok=True)


def one(variant: str) -> dict:
    harvest.writer.ShardFileWriter = before.ShardFileWriter if variant == "before" else now
    try:
        return wt.measure_one("shards" if variant in ("now", "before") else variant, args.shape, args.threads,
                              batch, n_rows, shard_rows)
    finally:
        harvest.writer.ShardFileWriter = now


variants = ["raw", "raw_pieces", "now", "before"]
for v in variants:
    one(v)  # warm-up
load0 = os.getloadavg()
res: dict[str, list] = {v: [] for v in variants}
for rep in range(args.reps):
    for v in (variants if rep % 2 == 0 else variants[::-1]):
        res[v].append(one(v))
load1 = os.getloadavg()
rate = lambda r: r["bytes"] / r["seconds"]  # noqa: E731
per_gb = lambda r, k: r[k] / (r["bytes"] / 1e9)  # noqa: E731
print(f"{args.shape} {args.threads} thread(s), {args.reps} reps, before = {args.before}; "
      f"load {load0[0]:.1f} -> {load1[0]:.1f}")
print("| writer | GB/s | ÷ faster raw (GB/s) | ÷ cheaper raw (CPU) | CPU-s per GB: user / system / total |")
print("| --- | --- | --- | --- | --- |")
for v in variants:
    rs = res[v]
    best = [max(a, b, key=rate) for a, b in zip(res["raw"], res["raw_pieces"])]
    cheap = [min(per_gb(a, "cpu"), per_gb(b, "cpu")) for a, b in zip(res["raw"], res["raw_pieces"])]
    by_rate = st.median(rate(r) / rate(b) for r, b in zip(rs, best))
    by_cpu = st.median(c / per_gb(r, "cpu") for r, c in zip(rs, cheap))
    cpu = " / ".join(f"{st.median(per_gb(r, k) for r in rs):.3f}" for k in ("user", "system", "cpu"))
    print(f"| {v} | {st.median(map(rate, rs)) / 1e9:.2f} | {by_rate:.2f} | {by_cpu:.2f} | {cpu} |")
print("per rep GB/s:", {v: " ".join(f"{rate(r) / 1e9:.1f}" for r in rs) for v, rs in res.items()})
