"""GIL held during a call? Longest gap in a main-thread Python loop while another thread checksums 256 MiB per call (~10-20 ms)."""
import sys, time, threading, mmap
import numpy as np
sys.path.insert(0, "build/probe_pkgs")
import crc32c, crc32c_rs
big = np.frombuffer(mmap.mmap(-1, 256 << 20), dtype=np.uint8); big[:] = 7
mv = memoryview(big)
for name, f in {"crc32c": crc32c.crc32c, "crc32c_rs": crc32c_rs.crc32c}.items():
    t0 = time.perf_counter(); f(mv); one = time.perf_counter() - t0
    stop = False
    def work():
        while not stop: f(mv)
    t = threading.Thread(target=work); t.start()
    gap, last, end = 0.0, time.perf_counter(), time.perf_counter() + 1.0
    while (now := time.perf_counter()) < end:
        gap = max(gap, now - last); last = now
    stop = True; t.join()
    print(f"{name}: one call {one * 1e3:.1f} ms; longest main-thread gap {gap * 1e3:.2f} ms")
