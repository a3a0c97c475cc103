"""How fast ``harvest verify`` checks a store, side by side with reading every array through zarr.

Builds a synthetic store (fp16, sharded, crc32c; ``--mib`` of activations) under build/bench/, then
times, in one run: ``verify_store`` (shard files read directly, checked in threads) and a full read
of every activation array with zarr (which also checks every crc32c, but names nothing).
    python bench/verify_speed.py --mib 512
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from analysis.synthetic import write_store
from harvest.verify import verify_store

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    args = ap.parse_args()
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(8)]
    rows = int(args.mib * 2**20 / (len(hooks) * args.d_model * 2))
    path = ROOT / "build" / "bench" / "verify.zarr"
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((4096, args.d_model)).astype(np.float16)
    write_store(path, hooks, [rows], args.d_model, lambda name, lo, hi: np.resize(block, (hi - lo, args.d_model)),
                dtype="float16", chunk_mib=4, chunks_per_shard=4)
    nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    results = {}
    for label in ("verify_store", "zarr read of every array", "verify_store (again)"):
        t0 = time.perf_counter()
        if label.startswith("verify"):
            assert verify_store(path).ok
        else:
            g = zarr.open_group(str(path), mode="r")
            for h in hooks:
                g[h][...]
        results[label] = time.perf_counter() - t0
    for label, s in results.items():
        print(f"{label:<28} {s:6.2f} s  {nbytes / 2**20 / s:8.0f} MiB/s")
    print(f"zarr read / verify = {results['zarr read of every array'] / results['verify_store (again)']:.2f}x "
          f"({nbytes / 2**20:.0f} MiB, page cache warm after the first pass)")


if __name__ == "__main__":
    main()
