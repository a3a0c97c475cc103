"""GB/s per core of crc32c implementations: DRAM-resident (cycling 512 MiB) and cache-resident buffers; GIL release."""
import sys, time, threading, mmap
import numpy as np
sys.path.insert(0, "build/probe_pkgs")
import crc32c, google_crc32c, crc32c_rs, fastcrc  # crc32c_rs, fastcrc: see README.md

impls = {
    "crc32c": lambda b, c=0: crc32c.crc32c(b, c),
    "google_crc32c": lambda b, c=0: google_crc32c.extend(c, b),
    "crc32c_rs": lambda b, c=0: crc32c_rs.crc32c(b, c),
    "fastcrc.iscsi": lambda b, c=0: fastcrc.crc32.iscsi(b, c),
}
big = np.frombuffer(mmap.mmap(-1, 512 << 20), dtype=np.uint8)
big[:] = np.random.default_rng(0).integers(0, 255, len(big), dtype=np.uint8)
mv = memoryview(big)
ref = crc32c.crc32c(mv[: 8 << 20])
for name, f in impls.items():
    try:
        ok = f(mv[: 8 << 20]) == ref
        # running crc
        ok2 = f(mv[4 << 20: 8 << 20], f(mv[: 4 << 20])) == ref
    except Exception as e:  # google_crc32c takes bytes only (a copy): not usable in place
        print(name, "fails", repr(e)); continue
    res = []
    for piece, label in ((8 << 20, "DRAM 8MiB"), (1 << 20, "DRAM 1MiB off+4K"), (256 << 10, "L2 256KiB")):
        t0 = time.perf_counter(); n = 0
        if label.startswith("L2"):
            for _ in range(4000):
                f(mv[4096: 4096 + piece]); n += piece
        else:
            for rep in range(3):
                for off in range(0, len(big) - piece - 4096, piece):
                    f(mv[off + (4096 if "off" in label else 0): off + piece]); n += piece
        res.append(f"{label}: {n / (time.perf_counter() - t0) / 1e9:5.1f}")
    # GIL: 2 threads each on their half, DRAM
    def work(lo, hi):
        for rep in range(3):
            for off in range(lo, hi, 8 << 20):
                f(mv[off: off + (8 << 20)])
    t0 = time.perf_counter(); work(0, 256 << 20); t1 = time.perf_counter() - t0
    ths = [threading.Thread(target=work, args=(0, 256 << 20)), threading.Thread(target=work, args=(256 << 20, 512 << 20))]
    t0 = time.perf_counter(); [t.start() for t in ths]; [t.join() for t in ths]; t2 = time.perf_counter() - t0
    print(f"{name:14s} ok={ok and ok2}  " + "  ".join(res) + f"  GB/s; 2 threads on 2x the work: speed-up {2 * t1 / t2:.2f}")
