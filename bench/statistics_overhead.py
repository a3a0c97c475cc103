"""Harvest-time statistics (issue 15): what they cost next to the bare forward, side by side.

    .venv/bin/python bench/statistics_overhead.py            # 14 batches, RESULTS.md updated
    .venv/bin/python bench/statistics_overhead.py --quick    # 4 batches, RESULTS.md untouched

Set-up of ``bench/harvest_overhead.py``: a GPT-NeoX of Pythia-160m's shape (random init, fp32, sdpa),
batches of 8 x 256 tokens, hooks ``ln1`` + ``ln2`` + ``resid_post`` of every layer (36 hook points).
One process, interleaved per batch so that the load of a shared machine hits every variant alike:

- ``bare``: the base model's forward (no hooks);
- ``capture``: the harvest's stage forward with its capture hooks (``harvest.stage.Stage.run``);
- ``statistics``: what ``capture.statistics`` adds per batch: ``StatisticsAccumulator.add`` on that
  batch's 36 captured arrays, the fold into the running state, and (every ``--snapshot-every``
  batches, as often as a shard of these arrays fills) ``pack`` + ``write_statistics`` of the snapshot.

The statistics run on the writer thread, beside the next batch's forward; the ratio reported is
their CPU time over the bare forward's, the cost when they cannot be hidden (2 busy cores).
Medians over the timed batches; the first batch is warm-up.

``--end-to-end`` then times whole harvests (``harvest.runner.run``, 1 torch thread, positions: all)
with and without ``capture.statistics``, alternating A/B/A/B in this process: wall-clock tok/s, where
the writer thread may hide the statistics on the second core.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
    ap.add_argument("--batches", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--snapshot-every", type=int, default=3,
                    help="batches per statistics snapshot (a 16 MiB shard of a 768-wide fp32 array: ~2.7 batches)")
    args = ap.parse_args()
    n = 4 if args.quick else args.batches

    import numpy as np
    import torch

    from harvest.runner import prepare
    from harvest.spec import parse_spec
    from harvest.stage import Stage
    from harvest.statistics import THRESHOLD, TOP_K, StatisticsAccumulator, StatisticsPlan, pack
    from harvest.store import open_for_writing, write_statistics

    torch.set_num_threads(args.threads)
    corpus, ckpt = common.stdlib_corpus(), common.pythia160m_checkpoint()
    tmp = Path(tempfile.mkdtemp(dir=common.BUILD))
    raw = {"name": "stats", "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
           "prompts": {"source": "text", "paths": [str(corpus)], "seq_len": SEQ, "mode": "packed",
                       "max_sequences": BATCH * n},
           "capture": {"hooks": HOOKS, "positions": "all", "statistics": True},
           "run": {"batch_size": BATCH}, "store": {"root": str(tmp), "path": "s.zarr"}}
    job = prepare(parse_spec(raw, base_dir=common.ROOT))
    stage_plan = job.stages[0]
    stage = Stage(job.ckpt, stage_plan, compute_dtype="float32", store_dtype=torch.float32,
                  device=torch.device("cpu"), heads=None, neurons=None)
    model = stage.model
    plan = StatisticsPlan(job.statistics, TOP_K, THRESHOLD, job.layout.token_starts())
    assert len(plan.hooks) == 36, plan.hooks
    acc = StatisticsAccumulator(plan)
    import zarr
    group = zarr.open_group(str(tmp / "snap.zarr"), mode="w")
    del model  # the stage's blocks serve the bare forward too: the same weights, no hooks attached

    times: dict[str, list[float]] = {"bare": [], "capture": [], "statistics": [], "snapshot": []}
    for k in range(n):
        batch = job.layout.batch(k)
        ids = torch.from_numpy(batch.input_ids)
        t0 = time.process_time()
        with torch.inference_mode():
            stage.model(ids, None, None)  # no hooks attached: the bare forward of the same blocks
        t1 = time.process_time()
        _, captured = stage.run(batch, None)
        t2 = time.process_time()
        acc.add(k, batch.sequences[0], {h: captured[h].numpy() for h in plan.hooks})
        acc.fold(k + 1)
        t3 = time.process_time()
        snap = 0.0
        if (k + 1) % args.snapshot_every == 0:
            write_statistics(group, 0, k + 1, *pack(acc))
            snap = time.process_time() - t3
        if k:  # batch 0 warms up
            times["bare"].append(t1 - t0)
            times["capture"].append(t2 - t1)
            times["statistics"].append(t3 - t2)
            times["snapshot"].append(snap)
        del captured
    med = {key: float(np.median(v)) for key, v in times.items()}
    snap_per_batch = float(np.mean(times["snapshot"]))
    ratio = (med["statistics"] + snap_per_batch) / med["bare"]
    lines = [
        f"Command: `.venv/bin/python bench/statistics_overhead.py{' --quick' if args.quick else ''}` "
        f"(run {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, {n} batches, "
        f"{args.threads} torch thread(s)).",
        f"Machine: {common.machine()['cpu']}, nproc {common.machine()['nproc']}, no GPU; **shared with ~6 other "
        "sessions running tests at the time**: CPU seconds (`time.process_time`) rather than wall time, medians of "
        "per-batch figures, variants interleaved per batch.",
        "",
        "| per batch of 8 × 256 tokens, ln1 + ln2 + resid_post × 12 (36 hooks) | CPU s (median) | ÷ bare forward |",
        "| --- | --- | --- |",
        f"| bare forward (stage blocks, no hooks) | {med['bare']:.3f} | 1.000 |",
        f"| stage forward with capture hooks (what a harvest runs) | {med['capture']:.3f} | "
        f"{med['capture'] / med['bare']:.3f} |",
        f"| statistics: `add` + `fold` (36 hooks × 2048 rows × 768) | {med['statistics']:.4f} | "
        f"{med['statistics'] / med['bare']:.4f} |",
        f"| statistics snapshot (`pack` + `write_statistics`), every {args.snapshot_every} batches, per batch | "
        f"{snap_per_batch:.4f} | {snap_per_batch / med['bare']:.4f} |",
        f"| **statistics in all** | {med['statistics'] + snap_per_batch:.4f} | **{ratio:.3f}** |",
    ]
    if args.end_to_end:
        lines += ["", end_to_end(raw, args.reps, n)]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        common.write_section(SECTION, body)


def end_to_end(raw: dict, reps: int, n: int) -> str:
    """Whole harvests with and without the statistics, alternating; wall-clock tok/s."""
    import numpy as np

    from harvest.runner import run
    from harvest.spec import parse_spec

    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for on in (False, True):
            spec = parse_spec({**raw, "capture": {**raw["capture"], "statistics": on},
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
