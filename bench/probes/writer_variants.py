"""bench/writer_throughput.py's machinery, more repetitions: CPU-s/GB and GB/s of raw, the writer, and the writer with
other checksum functions patched in (crc32c_rs; a no-op to see the rest)."""
import sys, os, argparse, statistics as st
sys.path.insert(0, "bench"); sys.path.insert(0, "."); sys.path.insert(0, "build/probe_pkgs")
import writer_throughput as wt
import harvest.shards as hs
from harvest.shape import chunk_layout
import crc32c, crc32c_rs
ap = argparse.ArgumentParser(); ap.add_argument("--shape", default="gptj"); ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=9); ap.add_argument("--variants", default="raw,raw_pieces,shards,unfused,rs,nocrc")
ap.add_argument("--shards", type=int, default=2)
a = ap.parse_args()
_, n_arrays, cols = wt.SHAPES[a.shape]
chunk, shard_rows = chunk_layout(10**9, cols * 2, 8.0, 2)
batch = wt.make_batch(n_arrays, 1024, cols)
n_rows = a.shards * shard_rows
wt.OUT.mkdir(parents=True, exist_ok=True)
class NoCrc:
    @staticmethod
    def crc32c(b, c=0): return 0
class Rs:
    @staticmethod
    def crc32c(b, c=0): return crc32c_rs.crc32c(b, c)
mods = {"nocrc": NoCrc, "rs": Rs}
vs = a.variants.split(",")
res = {}
print(f"load {os.getloadavg()[0]:.2f}", flush=True)
wt.measure_one("raw", a.shape, 1, batch, n_rows, shard_rows)
for rep in range(a.reps):
    for v in (vs if rep % 2 == 0 else vs[::-1]):
        hs.crc32c = mods.get(v, crc32c)
        r = wt.measure_one("shards" if v in mods else v, a.shape, a.threads, batch, n_rows, shard_rows)
        gb = r["bytes"] / 1e9
        res.setdefault(v, []).append((gb / r["seconds"], r["user"] / gb, r["system"] / gb))
hs.crc32c = crc32c
best = [max(res["raw"][i][0], res["raw_pieces"][i][0]) for i in range(a.reps)]
bestcpu = [min(res["raw"][i][1] + res["raw"][i][2], res["raw_pieces"][i][1] + res["raw_pieces"][i][2]) for i in range(a.reps)]
for v, xs in res.items():
    ratio = st.median(x[0] / b for x, b in zip(xs, best))
    cpu_ratio = st.median(b / (x[1] + x[2]) for x, b in zip(xs, bestcpu))
    print(f"{a.shape} {a.threads}t {v:11s} {st.median(x[0] for x in xs):5.2f} GB/s ÷best raw {ratio:.2f} | CPU-s/GB user {st.median(x[1] for x in xs):.3f} "
          f"sys {st.median(x[2] for x in xs):.3f} total {st.median(x[1] + x[2] for x in xs):.3f}  best-raw CPU ÷ this {cpu_ratio:.2f}"
          f"  [{' '.join(f'{x[0]:.1f}' for x in xs)}]")
print(f"load {os.getloadavg()[0]:.2f}")
