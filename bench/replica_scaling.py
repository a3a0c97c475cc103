"""Replica scaling: two data-parallel replicas of one single-thread stage against one process, side by side.

    .venv/bin/python bench/replica_scaling.py             # ~5 min: 1 repetition, writes bench/RESULTS.md
    .venv/bin/python bench/replica_scaling.py --reps 3    # medians of 3 (a quiet machine: the lead's rerun)

Protocol (BENCH.md, as ``pipeline_scaling.py``): a GPT-NeoX of Pythia-160m's shape (random init, fp32),
batches of 8 x 256 tokens, harvesting every layer's ``resid_post`` into an uncompressed store, each variant in a
fresh process, in one run:

- ``1x1``: one stage in-process, 1 torch thread;
- ``1x2``: one stage in-process, 2 torch threads;
- ``r2x1``: ``run.replicas: 2`` of one single-thread stage (two Ray actors harvesting different units);
- ``pair``: two independent ``1x1`` processes at once, their tok/s added: the ceiling for ``r2x1``.

Shards are one batch long (``store.chunk_mib: 6``, ``chunks_per_shard: 1``: 2048 rows x 3 KiB), so every
batch is a unit and the two replicas share the work evenly; every variant uses that layout. Timed window: from
the moment ``WARMUP`` batches are through (counted over all replicas) to the return of the run (writers drained),
so Ray start-up and weight loading are not timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH, SEQ, WARMUP, TIMED = 8, 256, 2, 14
N_BATCHES = WARMUP + TIMED
SECTION = "Replica scaling (issue 13)"
OUT = common.BUILD / "replicas"
VARIANTS = {"1x1": (1, 1), "1x2": (1, 2), "r2x1": (2, 1)}  # name -> (replicas, threads)


def spec_for(variant: str, ckpt: Path, corpus: Path, tag: str = ""):
    from harvest.spec import parse_spec

    replicas, threads = VARIANTS[variant]
    return parse_spec({
        "name": f"replicas-{variant}",
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "prompts": {"source": "text", "paths": [str(corpus)], "seq_len": SEQ, "mode": "packed",
                    "max_sequences": BATCH * N_BATCHES},
        "capture": {"hooks": ["blocks.*.hook_resid_post"]},
        "run": {"batch_size": BATCH, "threads": threads, "replicas": replicas},
        "store": {"root": str(OUT), "path": f"{variant}{tag}.zarr", "chunk_mib": 6, "chunks_per_shard": 1},
    }, base_dir=common.ROOT)


def child_variant(variant: str, ckpt: Path, corpus: Path) -> dict:
    import torch

    from harvest.runner import claim_store, prepare
    from harvest.shape import job_units
    from harvest.worker import StageWorker

    replicas, threads = VARIANTS[variant]
    torch.set_num_threads(threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = spec_for(variant, ckpt, corpus, os.environ.get("REPLICA_BENCH_TAG", ""))
    shutil.rmtree(spec.store_path(), ignore_errors=True)
    job = prepare(spec)
    units = len(job_units(job.layout, job.arrays))
    start = claim_store(job, resume=False, overwrite=True)
    marks: list[float] = []
    per_replica: list[float] = []
    if replicas == 1:
        worker = StageWorker(job.ckpt, job.stages[0], job.stage_options(), job.stage_info(job.stages[0]), start)
        for k in range(job.layout.n_batches):
            worker.process(job.layout.batch(k), None)
            marks.append(time.perf_counter())
        worker.close()
    else:
        import ray

        from sharding.replicas import run_replicas

        drivers = []
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            run_replicas(job, False, on_batch=lambda r, k, d: marks.append(time.perf_counter()),
                         started=drivers.append)
        finally:
            ray.shutdown()
        per_replica = [r.units for r in drivers[0].replicas]
    end = time.perf_counter()
    assert len(marks) == N_BATCHES, marks
    t0 = marks[WARMUP - 1]
    tokens = TIMED * BATCH * SEQ
    shutil.rmtree(spec.store_path(), ignore_errors=True)
    return {"variant": variant, "tokens_per_s": tokens / (end - t0), "units": units, "units_per_replica": per_replica}


def run_pair(me: str, env: dict) -> dict:
    procs = [subprocess.Popen([sys.executable, me, "--child", "1x1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=common.ROOT, env={**os.environ, **env, "REPLICA_BENCH_TAG": f"-{i}"})
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    res = [json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]) for out, _ in outs]
    return {"variant": "pair", "tokens_per_s": sum(x["tokens_per_s"] for x in res), "each": [x["tokens_per_s"] for x in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    corpus, ckpt = common.stdlib_corpus(), common.pythia160m_checkpoint()
    if args.child:
        print(json.dumps(child_variant(args.child, ckpt, corpus)))
        return
    me = str(Path(__file__).resolve())
    env = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    started = dt.datetime.now()
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for v in [*VARIANTS, "pair"]:
            r = run_pair(me, env) if v == "pair" else common.run_child([me, "--child", v], env=env)
            runs.setdefault(v, []).append(r)
            print(f"rep {rep} {v}: {r['tokens_per_s']:.0f} tok/s {r.get('units_per_replica') or r.get('each') or ''}",
                  flush=True)
    tps = {v: common.median([r["tokens_per_s"] for r in rs]) for v, rs in runs.items()}
    labels = {"1x1": "1 process × 1 thread", "1x2": "1 process × 2 threads",
              "r2x1": "2 replicas × 1 stage × 1 thread (Ray)", "pair": "ceiling: two independent 1×1 processes, added"}
    rows = ["| variant | tok/s | vs 1×1 | vs 1×2 | vs ceiling | every run |", "| --- | --- | --- | --- | --- | --- |"]
    for v, t in tps.items():
        rows.append(f"| {labels[v]} | {t:.0f} | {t / tps['1x1']:.2f}× | {t / tps['1x2']:.2f}× | {t / tps['pair']:.2f}× | "
                    + ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[v]) + " |")
    table = "\n".join(rows)
    split = runs["r2x1"][0]
    summary = (f"2 replicas = {tps['r2x1'] / tps['pair']:.0%} of the two-process ceiling (goal ≥ 95%), "
               f"{tps['r2x1'] / tps['1x1']:.2f}× of 1×1, {tps['r2x1'] / tps['1x2']:.2f}× of 1×2; "
               f"{split['units']} units, done {split['units_per_replica']} by the two replicas.")
    print("\n" + table + "\n\n" + summary)
    if args.no_write:
        return
    mach = common.machine()
    body = f"""
Command: `.venv/bin/python bench/replica_scaling.py{''.join(f' {a}' for a in sys.argv[1:])}` ({started:%Y-%m-%d %H:%M},
{(dt.datetime.now() - started).total_seconds() / 60:.0f} min). Machine: {mach['cpu']}, nproc {mach['nproc']},
{mach['memory']} RAM, no GPU; Ray {common.versions(('ray',))['ray']}. **Shared with other sessions' work while it ran
(no wait for a quiet machine, {args.reps} repetition(s)): figures are indicative; a rerun on a quiet machine
with `--reps 3` is due.**

Model: GPT-NeoX of Pythia-160m's shape, random init, fp32; every layer's `resid_post` (12 arrays, uncompressed),
batches of {BATCH} × {SEQ} tokens, {WARMUP} warm-up + {TIMED} timed, each variant in a fresh process. Shards of one
batch (2048 rows), so each batch is a unit the replicas pull. Timed from batch {WARMUP} through (over all replicas)
to the run's return (writers drained); Ray and actor start-up not timed.

{table}

{summary}
"""
    common.write_section(SECTION, body)
    print(f"wrote section '{SECTION}' of {common.RESULTS}")


if __name__ == "__main__":
    main()
