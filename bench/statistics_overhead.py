"""Harvest-time statistics (issue 15): what they cost next to the bare forward, side by side.

    .venv/bin/python bench/statistics_overhead.py            # 50 + 14 batches, RESULTS.md updated (~7 min)
    .venv/bin/python bench/statistics_overhead.py --quick    # 4 batches, RESULTS.md untouched

Set-up of ``bench/harvest_overhead.py``: a GPT-NeoX of Pythia-160m's shape (random init, fp32, sdpa),
batches of 8 x 256 tokens, hooks ``ln1`` + ``ln2`` + ``resid_post`` of every layer (36 hook points).

What the statistics cost depends on how far into a job a batch is: the top-k takes the values above
the k-th largest |x| so far, about k x (rows per batch) / (rows so far) per column and batch, so a job's
first batches send many candidates and later ones a few. The run therefore takes ``--warm`` batches
with the statistics first (untimed: the job so far), then ``--batches`` timed ones, interleaved per batch
so that the load of a shared machine hits every variant alike:

- ``bare``: the base model's forward (no hooks);
- ``capture``: the harvest's stage forward with its capture hooks, statistics off (``Stage.run``);
- ``with``: the same stage forward with the statistics' device part: the per-batch kernels
  (``harvest.running``: float64 sums, max, counts, top-k candidates; on a CPU one C pass per hook,
  ``harvest/rowpass.c``) and Dettmers' hits on the 24
  LayerNorm outputs (``harvest.hits``), each timed where it runs (the kernels' pass in each capture
  hook, ``early``, and their steps; the hits' hooks and steps); the excess of ``with`` over ``capture`` is printed as a cross-check only: it is
  the difference of two ~4 s forwards, and the load of a shared machine moves it by 2% of one;
- ``host``: ``StatisticsAccumulator.add`` + ``fold`` of the batch's small results (the writer
  thread);
- ``snapshot``: what the writer does at each unit's end (units follow the job's shards:
  ``StatisticsPlan.unit_bounds``): ``pack`` + ``write_snapshot`` of the unit's snapshot, the manifest
  mark, and the writer's ``Compactor``, which every ``COMPACT_UNITS`` units folds them onto the prefix
  it kept and rewrites it. The unit snapshots are the timed batches' mean; the compaction is the
  steady one (the last, onto a kept prefix) spread over the batches it covers. The whole run's
  figure, the job's first compaction (from the store, its first units dense) and the run's last
  (the runner's, at its end) included, is printed beside it.

The ratio reported is the statistics' CPU time (kernels + hits + host + snapshot) over the bare forward's,
the cost when nothing hides it (2 busy cores). Medians over the timed batches.

``--end-to-end`` then times whole harvests (``harvest.runner.run``, 1 torch thread, positions: all)
with and without ``capture.statistics``, alternating A/B/A/B in this process: wall-clock tok/s, where
the writer thread may hide the statistics on the second core.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH, SEQ = 8, 256
SECTION = "Harvest-time statistics overhead (issue 15)"
HOOKS = ["blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, default=14, help="timed batches")
    ap.add_argument("--warm", type=int, default=50, help="batches with statistics before the timed ones")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    n = 4 if args.quick else args.batches
    warm = 0 if args.quick else args.warm

    import numpy as np
    import torch

    from harvest.runner import prepare
    from harvest.spec import parse_spec
    from harvest.stage import Stage
    from harvest.statistics import COMPACT_UNITS, Compactor, StatisticsAccumulator, compact_statistics, pack
    from harvest.store import create_manifest, mark_written, unit_snapshot_name, write_snapshot
    from harvest.writer import unit_attrs

    torch.set_num_threads(args.threads)
    corpus, ckpt = common.stdlib_corpus(), common.pythia160m_checkpoint()
    tmp = Path(tempfile.mkdtemp(dir=common.BUILD))
    atexit.register(shutil.rmtree, tmp, True)  # the stores it writes: ~3 GB for the end-to-end harvests
    raw = {"name": "stats", "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
           "prompts": {"source": "text", "paths": [str(corpus)], "seq_len": SEQ, "mode": "packed",
                       "max_sequences": BATCH * (warm + n)},
           "capture": {"hooks": HOOKS, "positions": "all", "statistics": True},
           "run": {"batch_size": BATCH}, "store": {"root": str(tmp), "path": "s.zarr"}}
    job = prepare(parse_spec(raw, base_dir=common.ROOT))
    stage_plan = job.stages[0]
    plan = job.stage_info(stage_plan).statistics
    assert len(plan.hooks) == 36 and len(plan.hits.sources) == 24, (plan.hooks, plan.hits)
    stage = Stage(job.ckpt, stage_plan, compute_dtype="float32", store_dtype=torch.float32,
                  device=torch.device("cpu"), heads=None, neurons=None, statistics=plan.hooks, hits=plan.hits)
    acc = StatisticsAccumulator(plan)
    stage.follow_floors(acc.floors)
    import zarr
    group = zarr.open_group(str(tmp / "snap.zarr"), mode="w")
    create_manifest(group, 1, warm + n)
    compactor = Compactor(group)
    kernels, hits = stage.statistics, stage.hits
    kernel_time, hits_time = [0.0], [0.0]
    kernel_steps = getattr(kernels, "steps", None)

    def timed(steps, cell):  # a generator of ``harvest.running.Steps``, each resumption timed into ``cell``
        sent = None
        while True:
            t = time.process_time()
            try:
                sizes = steps.send(sent)
            except StopIteration:
                return
            finally:
                cell[0] += time.process_time() - t
            sent = yield sizes

    def timed_call(fn, cell):  # ``fn``, each call timed into ``cell``
        def call(*args):
            t = time.process_time()
            try:
                return fn(*args)
            finally:
                cell[0] += time.process_time() - t
        return call

    kernels.steps = lambda rows, out: timed(kernel_steps(rows, out), kernel_time)
    if hasattr(kernels, "early"):  # each hook's pass over its rows, run in its capture hook
        kernels.early = timed_call(kernels.early, kernel_time)
    # Dettmers' hits: the part in each LayerNorm's hook, and the steps after the forward
    from harvest.hits import HitBatch

    hit_steps = HitBatch.steps
    hits._reduce = timed_call(hits._reduce, hits_time)
    HitBatch.steps = lambda self: timed(hit_steps(self), hits_time)
    if not hasattr(type(kernels), "steps"):  # an older harvest.running (before/after runs): time ``batch``
        kernels.batch = timed_call(kernels.batch, kernel_time)

    times: dict[str, list[float]] = {k: [] for k in ("bare", "capture", "with", "kernels", "hits", "host", "snapshot")}
    units, compactions, run_snapshot = [], [], 0.0  # unit snapshots of the timed batches; (batch, s) of each compaction
    total = warm + n
    for k in range(total):
        timed_batch = k >= warm + 1 if warm else k >= 1  # the first batch warms up
        batch = job.layout.batch(k)
        ids = torch.from_numpy(batch.input_ids)
        t0 = t1 = t2 = time.process_time()
        if k >= warm:
            with torch.inference_mode():
                stage.model(ids, None, None)  # no hooks attached: the bare forward of the same blocks
            t1 = time.process_time()
            stage.statistics = stage.hits = None
            stage.run(batch, None)  # the harvest's forward and capture, without statistics
            stage.statistics, stage.hits = kernels, hits
            t2 = time.process_time()
        kernel_time[0] = hits_time[0] = 0.0
        _, captured = stage.run(batch, None)  # the same with the statistics' device part (kernels + hits)
        t3 = time.process_time()
        acc.add(k, batch.sequences[0], {key: t.numpy() for key, t in captured.items()}, len(batch.lengths))
        acc.fold(k + 1)  # the host part: merging the batch's small results in batch order
        t4 = time.process_time()
        if k + 1 == acc.end or k + 1 == total:  # the unit's end, as the writer's ``_mark`` / ``_snapshot`` meet it
            write_snapshot(group, unit_snapshot_name(0, acc.start, k + 1), *unit_attrs(pack(acc), acc.start, k + 1, acc.end))
            mark_written(group, 0, k + 1, start=acc.start)
            t5 = time.process_time()
            compactor.unit_done()  # every COMPACT_UNITS units: onto the prefix it kept
            if k + 1 == total:
                compact_statistics(group, kept=compactor.kept)  # the runner folds every unit at the run's end
            t6 = time.process_time()
            acc.next_unit()
            run_snapshot += t6 - t4
            if timed_batch:
                units.append(t5 - t4)
            if t6 - t5 > 0.05:
                compactions.append((k + 1, t6 - t5))
        if timed_batch:
            for key, v in (("bare", t1 - t0), ("capture", t2 - t1), ("with", t3 - t2), ("kernels", kernel_time[0]), ("hits", hits_time[0]),
                           ("host", t4 - t3)):
                times[key].append(v)
        del captured
    unit_batches = plan.unit_bounds[1]
    unit_per_batch = float(np.mean(units)) / unit_batches if units else 0.0
    steady = compactions[-1][1] if len(compactions) > 1 else (compactions[-1][1] if compactions else 0.0)
    steady_per_batch = steady / (COMPACT_UNITS * unit_batches)
    snap_per_batch = unit_per_batch + steady_per_batch
    times["snapshot"] = [snap_per_batch]
    med = {key: float(np.median(v)) for key, v in times.items()}
    device_part = float(np.median(np.subtract(times["with"], times["capture"])))
    # the parts timed where they run: steadier than ``device_part``, a difference of two ~4 s forwards
    total_cost = med["kernels"] + med["hits"] + med["host"] + snap_per_batch
    ratio = total_cost / med["bare"]
    lines = [
        f"Command: `.venv/bin/python bench/statistics_overhead.py{' --quick' if args.quick else ''}"
        f"{f' --warm {args.warm}' if args.warm != 50 and not args.quick else ''}"
        f"{f' --batches {args.batches}' if args.batches != 14 and not args.quick else ''}"
        f"{' --end-to-end' if args.end_to_end else ''}` "
        f"(run {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, {warm} batches with statistics, "
        f"then {n} timed, "
        f"{args.threads} torch thread(s)).",
        f"Machine: {common.machine()['cpu']}, nproc {common.machine()['nproc']}, no GPU; load average "
        f"{_load()} at the start (other sessions share the 2 cores): CPU seconds (`time.process_time`), medians of "
        "per-batch figures, variants interleaved per batch.",
        "",
        "| per batch of 8 × 256 tokens, ln1 + ln2 + resid_post × 12 (36 hooks; Dettmers hits on 24 LayerNorms) "
        "| CPU s (median) | ÷ bare forward |",
        "| --- | --- | --- |",
        f"| bare forward (stage blocks, no hooks) | {med['bare']:.3f} | 1.000 |",
        f"| stage forward with capture hooks, no statistics | {med['capture']:.3f} | "
        f"{med['capture'] / med['bare']:.3f} |",
        f"| the same with the statistics' device part | {med['with']:.3f} | {med['with'] / med['bare']:.3f} |",
        f"| of which the kernels (`harvest.running`; on a CPU one C pass per hook, `harvest/rowpass.c`; 36 hooks) "
        f"| {med['kernels']:.4f} | "
        f"{med['kernels'] / med['bare']:.4f} |",
        f"| Dettmers' hits (`harvest.hits`: its LayerNorm hooks and steps, 24 LayerNorms) | {med['hits']:.4f} | "
        f"{med['hits'] / med['bare']:.4f} |",
        f"| cross-check, not summed: device part as the median of with − without (kernels + hits, and the noise "
        f"of two forwards) | {device_part:.4f} | {device_part / med['bare']:.4f} |",
        f"| host part: `add` + `fold` of the small results (writer thread) | {med['host']:.4f} | "
        f"{med['host'] / med['bare']:.4f} |",
        f"| snapshot: each unit's (`pack`, `write_snapshot`, manifest; units of {unit_batches} batches here), per batch "
        f"| {unit_per_batch:.4f} | {unit_per_batch / med['bare']:.4f} |",
        f"| compaction every {COMPACT_UNITS} units ("
        + ("the last, onto the prefix kept in memory" if len(compactions) > 1 else "this run's only one, from the store")
        + f": {steady:.3f} s at batch {compactions[-1][0] if compactions else 0}), spread over the "
        f"{COMPACT_UNITS * unit_batches} batches a compaction covers "
        f"| {steady_per_batch:.4f} | {steady_per_batch / med['bare']:.4f} |",
        f"| **statistics in all** | {total_cost:.4f} | **{ratio:.3f}** |",
        "",
        f"The whole run's snapshots and compactions ({total} batches, the job's first compaction from the store "
        f"with its first units dense, and the runner's at the end): {run_snapshot:.2f} s, {run_snapshot / total:.4f} s "
        f"a batch ({run_snapshot / total / med['bare']:.4f} of the bare forward); compactions "
        + ", ".join(f"{s_:.2f} s at batch {b}" for b, s_ in compactions) + ".",
    ]
    if args.end_to_end:
        lines += ["", end_to_end(raw, args.reps, n)]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        common.write_section(SECTION, body)


def _load() -> str:
    import os

    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def end_to_end(raw: dict, reps: int, n: int) -> str:
    """Whole harvests with and without the statistics, alternating; wall-clock tok/s."""
    import numpy as np

    from harvest.runner import run
    from harvest.spec import parse_spec

    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for on in (False, True):
            spec = parse_spec({**raw, "capture": {**raw["capture"], "statistics": on},
                               "prompts": {**raw["prompts"], "max_sequences": BATCH * n},
                               "run": {**raw["run"], "threads": 1}}, base_dir=common.ROOT)
            result = run(spec, overwrite=True, progress=False)
            rates[on].append(result.tokens / result.seconds)  # from the first batch to the last write
    off, on = float(np.median(rates[False])), float(np.median(rates[True]))
    runs = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    return "\n".join([
        f"End to end (`--end-to-end`): `harvest.runner.run` of the same {n} batches, 1 torch thread, "
        f"positions: all, A/B alternating, {reps} runs each (`RunResult.seconds`: first batch to the store's last write):",
        "",
        "| harvest ln1 + ln2 + resid_post × 12 | tok/s per run | median tok/s | ratio |",
        "| --- | --- | --- | --- |",
        f"| without statistics | {runs(rates[False])} | {off:.0f} | 1.000 |",
        f"| with `capture.statistics: true` | {runs(rates[True])} | {on:.0f} | {on / off:.3f} |",
    ])


if __name__ == "__main__":
    main()
