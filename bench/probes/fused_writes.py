"""CPU per GB of writing chunks into the page cache: raw pwrite, crc then write (today), crc+write fused per piece.

28 arrays x 8 MiB batches (GPT-J resid_post shape, 224 MiB: DRAM-resident), one file per 16 MiB shard,
chunk = one batch (8 MiB) + 4-byte crc at 4 KiB-aligned stride. Threads take one array per task.
"""
import os, sys, time, mmap, shutil, resource, argparse
from concurrent.futures import ThreadPoolExecutor, wait
import numpy as np
sys.path.insert(0, "build/probe_pkgs")
import crc32c
try:
    import crc32c_rs
except ImportError:
    crc32c_rs = None

ap = argparse.ArgumentParser()
ap.add_argument("--gb", type=float, default=2.0)
ap.add_argument("--threads", default="1,2")
ap.add_argument("--variants", default="raw,crc_then_write,fused_64k,fused_256k,fused_1m,fused_2m")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--arrays", type=int, default=28)
ap.add_argument("--chunk-mib", type=int, default=8)
args = ap.parse_args()
N_ARR, CHUNK = args.arrays, args.chunk_mib << 20
STRIDE = CHUNK + 4096
SHARD_CHUNKS = 2
batch = []
rng = np.random.default_rng(0)
for _ in range(N_ARR):
    a = np.frombuffer(mmap.mmap(-1, CHUNK), dtype=np.uint8)
    a[:] = rng.integers(0, 255, CHUNK, dtype=np.uint8)
    batch.append(memoryview(a))
tail = np.frombuffer(mmap.mmap(-1, 4096), dtype=np.uint8)
OUT = "build/probe/out"

def crc_fn(name):
    if name.endswith("_rs"):
        return crc32c_rs.crc32c
    return crc32c.crc32c

def writer(variant):
    crc = crc_fn(variant)
    base = variant.removesuffix("_rs")
    wfirst = base.startswith("w")
    base = base.lstrip("w") if wfirst else base
    piece = {"rawp_256k": 256 << 10, "rawp_1m": 1 << 20, "rawp_2m": 2 << 20, "rawp_4m": 4 << 20, "fused_4m": 4 << 20, "fused_64k": 64 << 10, "fused_128k": 128 << 10, "fused_256k": 256 << 10, "fused_512k": 512 << 10,
             "fused_1m": 1 << 20, "fused_2m": 2 << 20, "fused_512k": 512 << 10}.get(base)
    def write(fd, chunk_no, data):
        if base == "raw":
            os.pwrite(fd, data, chunk_no * CHUNK)
        elif base == "crc_then_write":
            c = crc(data)
            t = bytearray(c.to_bytes(4, "little"))
            os.pwritev(fd, [data, t], chunk_no * STRIDE)
        elif base == "raw_stride":
            os.pwrite(fd, data, chunk_no * STRIDE)
        elif base.startswith("rawp"):
            at = chunk_no * STRIDE
            for off in range(0, len(data), piece):
                os.pwrite(fd, data[off: off + piece], at + off)
        else:
            at, c = chunk_no * STRIDE, 0
            for off in range(0, len(data), piece):
                p = data[off: off + piece]
                if wfirst:
                    os.pwrite(fd, p, at + off)
                    c = crc(p, c)
                else:
                    c = crc(p, c)
                    os.pwrite(fd, p, at + off)
            os.pwrite(fd, c.to_bytes(4, "little"), at + len(data))
    return write

def run(variant, threads, total):
    shutil.rmtree(OUT, ignore_errors=True); os.makedirs(OUT)
    for i in range(N_ARR): os.makedirs(f"{OUT}/a{i}")
    write = writer(variant)
    n_batches = int(total // (N_ARR * CHUNK))
    fds = {}
    def task(i, b):
        shard, c = divmod(b, SHARD_CHUNKS)
        if c == 0:
            if i in fds: os.close(fds[i])
            fds[i] = os.open(f"{OUT}/a{i}/{shard}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write(fds[i], c, batch[i])
    pool = ThreadPoolExecutor(threads)
    os.sync()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in range(n_batches):
        wait([pool.submit(task, i, b) for i in range(N_ARR)])
    for fd in fds.values(): os.close(fd)
    secs, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    pool.shutdown()
    gb = n_batches * N_ARR * CHUNK / 1e9
    shutil.rmtree(OUT, ignore_errors=True)
    return gb / secs, (r1.ru_utime - r0.ru_utime) / gb, (r1.ru_stime - r0.ru_stime) / gb

variants = args.variants.split(",")
print(f"load {os.getloadavg()[0]:.2f}")
res = {}
run("raw", 1, 0.5e9)  # warm-up
for threads in [int(t) for t in args.threads.split(",")]:
    for rep in range(args.reps):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            res.setdefault((threads, v), []).append(run(v, threads, args.gb * 1e9))
    raw = {rep: res[(threads, variants[0])][rep][0] for rep in range(args.reps)}
    for v in variants:
        rs = res[(threads, v)]
        ratio = np.median([r[0] / raw[k] for k, r in enumerate(rs)])
        med = lambda j: np.median([r[j] for r in rs])
        print(" ".join(f"{r[0]:.2f}" for r in rs), end="  ")
        print(f"{threads}t {v:18s} {med(0):5.2f} GB/s  ÷raw {ratio:.2f}  CPU-s/GB user {med(1):.3f} sys {med(2):.3f} total {med(1)+med(2):.3f}", flush=True)
print(f"load {os.getloadavg()[0]:.2f}")
