"""Pipeline scaling: two Ray stages of one thread each against one process, and Ray's cost per micro-batch.

    .venv/bin/python bench/pipeline_scaling.py             # ~8 min: 2 repetitions, writes bench/RESULTS.md
    .venv/bin/python bench/pipeline_scaling.py --quick     # 1 repetition, RESULTS.md untouched

Protocol (BENCH.md): a GPT-NeoX of Pythia-160m's shape (random init, fp32, sdpa; bench/common.py builds and
caches it), batches of 8 x 256 tokens, 2 warm-up batches then 12 timed ones, harvesting every layer's
``resid_post`` (12 arrays, 36 KiB per token) into an uncompressed store; each variant in a fresh process:

- ``1x1``: one stage in-process, 1 torch thread (``harvest run`` with ``run.stages: 1, threads: 1``);
- ``1x2``: one stage in-process, 2 torch threads;
- ``2x1``: two Ray stage actors of 1 thread each (``run.stages: 2, threads: 1``), embedded local Ray;
- ``pair``: two independent ``1x1`` processes at once, their tok/s added: what two single-thread
  workers can get out of this machine's two cores (memory bandwidth and clock shared), the ceiling
  for ``2x1``.

Timed window: from the moment batch 2 leaves the (last) stage to the return of the run, which includes
the writers draining and flushing every shard, so all 14 batches' writes land inside it. Ray start-up,
actor start and weight loading come before and are not timed (they are reported).

Ray's cost per micro-batch is measured apart, with two no-op actors wired exactly like the pipeline
(status + hidden state per call, the hidden reference passed straight to the next actor, a bounded
window): the time per micro-batch when there is no compute at all, by hidden-state size. With the
per-sequence compute time of one stage from the ``1x1`` run, that gives the micro-batch size at which
Ray's overhead falls under 5% of a stage's work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH, SEQ, WARMUP, TIMED = 8, 256, 2, 12
N_BATCHES = WARMUP + TIMED
#: what the profiles of these runs showed (2026-11-25 and -26, py-spy and /proc per-thread CPU)
WHY = """
Why 2×1 stays under 1.8× here. Neither the hardware nor Ray is the limit: two bare forwards in two processes scale
2.0× on these two cores, and Ray costs 0.4–2% of a stage's compute (table below). The pipeline does the same work
per token as one stage (1.26–1.30 vs 1.19 CPU s per 1k tokens), but in the 1×1 run the writer (shard copies, zarr's
encoding, the kernel's copy into the page cache) runs on the second core, which is otherwise idle, while in 2×1 both
cores compute and each stage's writer takes its CPU from a stage: the two stages together ask for about 2.2 cores
of work on 2. The pair ceiling pays the same price, which is why it is the fair reference: 2×1 reaches 95–96% of it.
Writing every chunk (zarr's empty-chunk check off: it cost a third of the writer's CPU) raised 2×1 from 1.61× to
1.73× of 1×1 on a quieter hour of this machine (2026-11-25, 22:00; pair 1.83×). Figures move ±5% with the host's
other tenants: today's run found the machine about 11% slower than yesterday's (bare forward 504 vs 564 tok/s).
"""

SECTION = "Pipeline scaling (issue 3)"
OUT = common.BUILD / "pipeline"
QUIET = 0.15
VARIANTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name -> (stages, threads per stage)
OVERHEAD_SIZES = (1, 2, 4, 8, 16)  # sequences of 256 tokens per micro-batch


def spec_for(variant: str, ckpt: Path, corpus: Path):
    from harvest.spec import parse_spec

    stages, threads = VARIANTS[variant]
    raw = {
        "name": f"pipeline-{variant}",
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "prompts": {"source": "text", "paths": [str(corpus)], "seq_len": SEQ, "mode": "packed",
                    "max_sequences": BATCH * N_BATCHES},
        "capture": {"hooks": ["blocks.*.hook_resid_post"]},
        "run": {"batch_size": BATCH, "threads": threads, "stages": stages},
        "store": {"root": str(OUT), "path": f"{variant}{os.environ.get('PIPELINE_BENCH_TAG', '')}.zarr"},
    }
    return parse_spec(raw, base_dir=common.ROOT)


# --- children (fresh processes) -------------------------------------------------------------------

class Window:
    """Times the batches and measures the CPU that processes outside this run used meanwhile (in cores):
    the machine's busy time minus this process and its children (Ray's processes, the stage actors)."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.marks: list[float] = []
        self.start: tuple[float, float] | None = None

    def _cpu(self) -> tuple[float, float]:
        machine, _ = common.cpu_seconds()
        ours = sum(self.me.cpu_times()[:2])
        for child in self.me.children(recursive=True):
            try:
                ours += sum(child.cpu_times()[:2])
            except Exception:  # noqa: BLE001 - exited
                pass
        return machine, ours

    def tick(self) -> None:
        self.marks.append(time.perf_counter())
        if len(self.marks) == WARMUP:
            self.start = self._cpu()

    def foreign_cores(self) -> float:
        machine, ours = self._cpu()
        wall = time.perf_counter() - self.marks[WARMUP - 1]
        return max(0.0, (machine - self.start[0]) - (ours - self.start[1])) / wall

def child_variant(variant: str, ckpt: Path, corpus: Path) -> dict:
    import torch

    from harvest.runner import claim_store, prepare
    from harvest.worker import StageWorker

    stages, threads = VARIANTS[variant]
    torch.set_num_threads(threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = spec_for(variant, ckpt, corpus)
    shutil.rmtree(spec.store_path(), ignore_errors=True)
    t_start = time.perf_counter()
    job = prepare(spec)
    start = claim_store(job, resume=False, overwrite=True)
    window = Window()
    marks = window.marks
    if stages == 1:
        worker = StageWorker(job.ckpt, job.stages[0], job.stage_options(), job.stage_info(job.stages[0]), start)
        t_ready = time.perf_counter()
        for k in range(job.layout.n_batches):
            worker.process(job.layout.batch(k), None)
            window.tick()
        worker.close()
        partition = [job.stages[0].describe()]
    else:
        import ray

        from sharding.pipeline import run_pipeline

        def on_batch(k, pipeline):
            window.tick()
            if k == N_BATCHES - 1:  # the actors exist until the run ends: measure their CPU now
                window.final = window.foreign_cores()

        ray.init(num_cpus=max(2, stages * threads), include_dashboard=False, log_to_driver=False)
        try:
            run_pipeline(job, start, False, on_batch=on_batch)  # ends when every writer has closed
            end = time.perf_counter()
        finally:
            ray.shutdown()  # not timed: the driver would exit here
        t_ready = None  # actors start inside run_pipeline: start-up is counted up to batch 0's end
        partition = [s.describe() for s in job.stages]
    if stages == 1:
        end = time.perf_counter()
    foreign = getattr(window, "final", None)
    foreign = window.foreign_cores() if foreign is None else foreign
    assert len(marks) == N_BATCHES, marks
    t0 = marks[WARMUP - 1]
    tokens = TIMED * BATCH * SEQ
    shutil.rmtree(spec.store_path(), ignore_errors=True)
    return {"variant": variant, "seconds": end - t0, "tokens": tokens, "tokens_per_s": tokens / (end - t0),
            "compute_tokens_per_s": tokens / (marks[-1] - t0), "drain_s": end - marks[-1],
            "batch_s": [b - a for a, b in zip(marks[WARMUP - 1:], marks[WARMUP:])],
            "startup_s": (t_ready or marks[0]) - t_start, "partition": partition, "foreign_cores": foreign,
            "peak_rss_driver": common.peak_rss_bytes()}


class Noop:
    """A stage that does nothing: moves (status, hidden) exactly as ``PipelineStage.run`` does."""

    def __init__(self, last: bool):
        self.last = last

    def run(self, batch, hidden):
        import torch

        from sharding.pipeline import from_wire, to_wire

        # the first stage makes a hidden state of ``hidden`` sequences; the next receives it
        hidden = torch.empty(hidden, SEQ, 768) if isinstance(hidden, int) else from_wire(hidden)
        return {"batch": batch}, None if self.last else to_wire(hidden)

    def ready(self):
        return True


def child_overhead() -> dict:
    """Seconds per micro-batch through two no-op actors, by hidden-state size (in 256-token sequences)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(Noop)
    out = {}
    try:
        actors = [remote.options(num_cpus=1).remote(last=i == 1) for i in range(2)]
        ray.get([a.ready.remote() for a in actors])
        run = [a.run.options(num_returns=2) for a in actors]
        for size in OVERHEAD_SIZES:
            payload = size
            n, window, pending = 60, 4, []
            t0 = None
            for k in range(n + 5):
                if k == 5:
                    ray.get(pending)
                    pending, t0 = [], time.perf_counter()
                s0, h0 = run[0].remote(k, payload)
                s1, _ = run[1].remote(k, h0)
                pending.append(s1)
                if len(pending) >= window:
                    ready, rest = ray.wait(pending, num_returns=1)
                    ray.get(ready)
                    pending = rest
            ray.get(pending)
            throughput = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for k in range(20):  # one micro-batch at a time: the latency through both stages
                s0, h0 = run[0].remote(k, payload)
                ray.get(run[1].remote(k, h0)[0])
            out[size] = {"per_batch_s": throughput, "latency_s": (time.perf_counter() - t0) / 20,
                         "hidden_mb": size * SEQ * 768 * 4 / 1e6}
    finally:
        ray.shutdown()
    return out


# --- driver ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, print only (RESULTS.md untouched)")
    ap.add_argument("--reps", type=int, default=None, help="fresh processes per variant (default 2; --quick: 1)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--report-only", action="store_true", help="re-render the tables from --json; run nothing")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"re-runs of a measurement during which other processes used > {QUIET} cores")
    ap.add_argument("--json", type=Path, default=common.BUILD / "pipeline_scaling.json", help="raw results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    corpus, ckpt = common.stdlib_corpus(), common.pythia160m_checkpoint()
    if args.child == "overhead":
        print(json.dumps(child_overhead()))
        return
    if args.child:
        print(json.dumps(child_variant(args.child, ckpt, corpus)))
        return

    if args.report_only:
        data = json.loads(args.json.read_text())
        report(data, args)
        return
    reps = args.reps or (1 if args.quick else 2)
    started = dt.datetime.now()
    runs: list[dict] = []  # every run, contended ones included (flagged)
    me = str(Path(__file__).resolve())
    env = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    for rep in range(reps):
        for v in [*VARIANTS, "pair"]:
            if v == "pair":
                runs.append(run_pair(me, env, rep))
                continue
            for attempt in range(args.retries + 1):
                waited = common.wait_until_quiet(QUIET, max_wait=600)
                t = time.perf_counter()
                r = common.run_child([me, "--child", v], env=env)
                r.update(rep=rep, wall=time.perf_counter() - t, waited=waited, attempt=attempt,
                         clean=r["foreign_cores"] <= QUIET)
                runs.append(r)
                print(f"rep {rep} {v}: {r['tokens_per_s']:6.1f} tok/s (compute {r['compute_tokens_per_s']:.1f}, drain "
                      f"{r['drain_s']:.2f} s)  stages {r['partition']}  other load {r['foreign_cores']:.2f} cores"
                      f"{'' if r['clean'] else ' (CONTENDED)'}  [{r['wall']:.0f} s, waited {waited:.0f} s]", flush=True)
                if r["clean"]:
                    break
    common.wait_until_quiet(QUIET, max_wait=300)
    overhead = common.run_child([me, "--child", "overhead"], env=env)
    data = {"runs": runs, "overhead": overhead, "started": f"{started:%Y-%m-%d %H:%M}", "reps": reps,
            "minutes": (dt.datetime.now() - started).total_seconds() / 60,
            "command": "bench/pipeline_scaling.py" + "".join(f" {a}" for a in sys.argv[1:])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))
    report(data, args)


def run_pair(me: str, env: dict, rep: int) -> dict:
    """Two ``1x1`` children at once; other load = machine busy CPU minus what the two used."""
    import subprocess

    common.wait_until_quiet(QUIET, max_wait=600)
    busy0, _ = common.cpu_seconds()
    kids0 = os.times()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, me, "--child", "1x1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=common.ROOT, env={**os.environ, **env, "PIPELINE_BENCH_TAG": f"-{i}"})
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.perf_counter() - t0
    busy1, _ = common.cpu_seconds()
    kids1 = os.times()
    children = (kids1.children_user + kids1.children_system) - (kids0.children_user + kids0.children_system)
    foreign = max(0.0, (busy1 - busy0) - children) / wall
    res = [json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]) for out, _ in outs]
    r = {"variant": "pair", "rep": rep, "attempt": 0, "tokens_per_s": sum(x["tokens_per_s"] for x in res),
         "compute_tokens_per_s": sum(x["compute_tokens_per_s"] for x in res), "foreign_cores": foreign,
         "clean": foreign <= QUIET, "wall": wall, "each": [x["tokens_per_s"] for x in res]}
    print(f"rep {rep} pair: {r['tokens_per_s']:6.1f} tok/s together ({', '.join(f'{x:.0f}' for x in r['each'])})  "
          f"other load {foreign:.2f} cores{'' if r['clean'] else ' (CONTENDED)'}", flush=True)
    return r


def report(data: dict, args) -> None:
    """Tables from the runs: medians over the runs no other process disturbed (all runs if none was clean)."""
    runs = data["runs"]
    overhead = {int(k): v for k, v in data["overhead"].items()}

    def chosen(v: str) -> list[dict]:
        mine = [r for r in runs if r["variant"] == v]
        return [r for r in mine if r["clean"]] or mine

    names = [*VARIANTS, *(["pair"] if any(r["variant"] == "pair" for r in runs) else [])]
    tps = {v: common.median([r["tokens_per_s"] for r in chosen(v)]) for v in names}
    ctps = {v: common.median([r["compute_tokens_per_s"] for r in chosen(v)]) for v in names}
    listed = {v: ", ".join(f"{r['tokens_per_s']:.0f}" + ("" if r["clean"] else f"* ({r['foreign_cores']:.1f})")
                           for r in runs if r["variant"] == v) for v in names}
    base, two = tps["1x1"], tps["1x2"]
    rows = ["| variant | tok/s | vs 1×1 | vs 1×2 | compute only: tok/s, vs 1×1 | every run (* = disturbed, other cores) |",
            "| --- | --- | --- | --- | --- | --- |"]
    labels = {"1x1": "1 stage × 1 thread (in-process)", "1x2": "1 stage × 2 threads (in-process)",
              "2x1": "2 Ray stages × 1 thread", "pair": "ceiling: two independent 1×1 processes at once, added"}
    for v in names:
        rows.append(f"| {labels[v]} | {tps[v]:.0f} | {tps[v] / base:.2f}× | {tps[v] / two:.2f}× | "
                    f"{ctps[v]:.0f}, {ctps[v] / ctps['1x1']:.2f}× | {listed[v]} |")
    table = "\n".join(rows)
    # per-sequence compute of one of two stages, from the 1x1 run (each stage runs half the blocks)
    seq_s = SEQ / ctps["1x1"] / 2
    orow = ["| sequences per micro-batch | hidden state | Ray time per micro-batch (pipelined) | latency through 2 stages "
            "| one stage's compute | overhead / compute |", "| --- | --- | --- | --- | --- | --- |"]
    enough = None
    for size, o in sorted(overhead.items()):
        frac = o["per_batch_s"] / (size * seq_s)
        if enough is None and frac < 0.05:
            enough = size
        orow.append(f"| {size} | {o['hidden_mb']:.1f} MB | {o['per_batch_s'] * 1e3:.1f} ms | {o['latency_s'] * 1e3:.1f} ms "
                    f"| {size * seq_s * 1e3:.0f} ms | {frac:.1%} |")
    otable = "\n".join(orow)
    summary = (f"2×1 = {tps['2x1'] / base:.2f}× of 1×1 (goal ≥ 1.8×) and {tps['2x1'] / two:.2f}× of 1×2 (goal ≥ 0.95×); "
               f"this machine's own two-thread scaling (1×2 / 1×1) is {two / base:.2f}×")
    if "pair" in tps:
        summary += (f", and two independent single-thread runs at once reach {tps['pair'] / base:.2f}× together, so "
                    f"2×1 gets {tps['2x1'] / tps['pair']:.0%} of what two single-thread workers can get here")
    summary += "."
    print("\n" + table + "\n\n" + otable + "\n\n" + summary)
    if args.quick or args.no_write:
        return
    pipe = chosen("2x1")
    mach = common.machine()
    body = f"""
Command: `.venv/bin/python {data['command']}` ({data['started']}, {data['minutes']:.0f} min in all, waits for a
quiet machine included).
Machine: {mach['cpu']}, nproc {mach['nproc']}, {mach['memory']} RAM, no GPU; Ray {common.versions(('ray',))['ray']}.

Model: GPT-NeoX of Pythia-160m's shape, random init, fp32, sdpa; harvest of every layer's `resid_post`
(12 arrays, 36 KiB per token, no compression) from batches of {BATCH} × {SEQ} tokens, {WARMUP} warm-up + {TIMED} timed,
each variant in a fresh process. Timed from batch {WARMUP} leaving the (last) stage to the end of the run (writers
drained, last shards flushed); "compute only" stops when the last batch leaves the last stage. The pipeline splits
the blocks as {pipe[0]['partition'] if pipe else '?'} (the embedding goes with the first stage; the LM head is
never computed for this capture). Ray start-up and actor start (weights loading) are not timed: about
{common.median([r['startup_s'] for r in pipe]):.0f} s to the first batch for 2×1. Figures are medians of the runs
during which other processes used at most {QUIET} cores (machine busy CPU minus the run's own driver, Ray and
actor processes); disturbed runs are listed with a * and the cores others used, and left out of the medians.

{table}

{summary}

{WHY.strip()}

Ray's cost per micro-batch, measured apart with two no-op actors wired like the pipeline (status + hidden state
per call, hidden states as numpy arrays in the object store, the reference passed straight to the next actor,
4 micro-batches in flight), against the compute of one stage (half the blocks, from the 1×1 run:
{seq_s * 1e3:.0f} ms per 256-token sequence):

{otable}

Ray's overhead falls below 5% of a stage's work at {enough if enough else f'more than {OVERHEAD_SIZES[-1]}'}
sequence(s) of 256 tokens per micro-batch for this model; a model k times smaller needs micro-batches about k
times bigger for the same share.
"""
    common.write_section(SECTION, body)
    print(f"\nwrote section '{SECTION}' of {common.RESULTS}")


if __name__ == "__main__":
    main()
