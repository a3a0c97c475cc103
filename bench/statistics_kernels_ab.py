"""The per-batch statistic kernels (``harvest.running``) of another revision against this tree's, side by side.

    PYTHONPATH=. .venv/bin/python bench/statistics_kernels_ab.py --before aabba91 [--batches 14]

Set-up of ``bench/statistics_overhead.py`` (Pythia-160m's shape, random init, fp32, 8 x 256 tokens,
ln1 + ln2 + resid_post of every layer: 36 hooks, 1 torch thread). Each batch is captured once; both
revisions' ``DeviceStatistics.batch`` then reduce the same rows, in alternating order, each with its
own accumulator and top-k floor, and their results must agree exactly. CPU seconds
(``time.process_time``), medians over batches 1.. (batch 0 has no floor yet). Prints; RESULTS.md untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HOOKS = ["blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized", "blocks.*.hook_resid_post"]


def load_revision(rev: str):
    """``harvest/running.py`` of ``rev`` as a module (its relative imports made absolute)."""
    text = subprocess.run(["git", "show", f"{rev}:harvest/running.py"], cwd=common.ROOT, check=True,
                          capture_output=True, text=True).stdout.replace("from .", "from harvest.")
    path = Path(tempfile.mkdtemp()) / "running_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("running_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="git revision whose harvest/running.py is compared")
    ap.add_argument("--batches", type=int, default=14)
    args = ap.parse_args()

    import numpy as np
    import torch

    from harvest.running import DeviceStatistics
    from harvest.runner import prepare
    from harvest.spec import parse_spec
    from harvest.stage import Stage
    from harvest.statistics import StatisticsAccumulator

    torch.set_num_threads(1)
    n = args.batches
    raw = {"name": "ab", "model": {"path": str(common.pythia160m_checkpoint()), "dtype": "float32", "device": "cpu"},
           "prompts": {"source": "text", "paths": [str(common.stdlib_corpus())], "seq_len": 256, "mode": "packed",
                       "max_sequences": 8 * n},
           "capture": {"hooks": HOOKS, "positions": "all", "statistics": True},
           "run": {"batch_size": 8}, "store": {"root": str(Path(tempfile.mkdtemp(dir=common.BUILD))), "path": "s.zarr"}}
    job = prepare(parse_spec(raw, base_dir=common.ROOT))
    plan = dataclasses.replace(job.stage_info(job.stages[0]).statistics, hits=None)
    stage = Stage(job.ckpt, job.stages[0], compute_dtype="float32", store_dtype=torch.float32,
                  device=torch.device("cpu"), heads=None, neurons=None)
    kernels = {"before": load_revision(args.before).DeviceStatistics(plan.hooks, plan.top_k, plan.threshold),
               "after": DeviceStatistics(plan.hooks, plan.top_k, plan.threshold)}
    accs = {name: StatisticsAccumulator(plan) for name in kernels}
    for name in kernels:
        kernels[name].floors = accs[name].floors
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {name: [] for name in kernels}
    bare: list[float] = []
    for k in range(n):
        batch = job.layout.batch(k)
        t = time.process_time()
        with torch.inference_mode():
            stage.model(torch.from_numpy(batch.input_ids), None, None)
        bare.append(time.process_time() - t)
        _, captured = stage.run(batch, None)
        rows = {h: captured[h] for h in plan.hooks}
        for name in (("before", "after") if k % 2 else ("after", "before")):
            t = time.process_time()
            out = kernels[name].batch(rows)
            times[name].append(time.process_time() - t)
            accs[name].add(k, batch.sequences[0], {key: v.numpy() for key, v in out.items()})
            accs[name].fold(k + 1)
    want, got = accs["before"].results(), accs["after"].results()
    for hook in plan.hooks:
        for key in ("count", "count_ge", "max_abs", "top_rows", "top_values"):
            np.testing.assert_array_equal(got[hook][key], want[hook][key], err_msg=f"{hook} {key}")
    fwd = float(np.median(bare[1:]))
    print(f"load average {load} at the start; bare forward median {fwd:.3f} CPU s; {n} batches")
    for name, v in times.items():
        med = float(np.median(v[1:]))
        print(f"{name} ({args.before if name == 'before' else 'this tree'}): kernels {med * 1e3:.1f} ms per batch, "
              f"{med / fwd:.4f} of the bare forward")


if __name__ == "__main__":
    main()
