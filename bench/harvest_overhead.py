"""Harvest overhead: what capturing activations costs next to a bare forward pass.

    .venv/bin/python bench/harvest_overhead.py            # full: 3 fresh processes per cell, 1 and 2 threads
    .venv/bin/python bench/harvest_overhead.py --quick    # smoke run: 1 repetition, RESULTS.md untouched

Protocol (BENCH.md): a GPT-NeoX of Pythia-160m's shape (random init, fp32, sdpa), batches of
8 x 256 tokens, 2 warm-up batches then 12 timed batches, every variant in a fresh process, the
median of the repetitions, at 1 and 2 torch threads. Every variant sees the same tokens: the text
prompt source over the standard library's docstrings, packed into 256-token windows.

Timing of the harvest variants: ``harvest.runner.run`` is called as ``harvest run`` calls it (the
library path: ``parse_spec`` + ``run``) with ``StageWorker.process`` wrapped to record when each
batch's forward and hand-off to the writer end. The timed window runs from the end of warm-up batch 2 to the return of ``run()``,
so it holds 12 batches of compute plus the writer draining its queue, flushing every buffered
shard and marking the store complete. All writing of the 14 batches' rows lands inside the window
(the writer buffers a whole shard before writing), so the figure is slightly pessimistic. The
compute-only part (batch 2 -> batch 14) and the drain after the last batch are reported too.
Model load, weight hashing and store creation happen before batch 1 and are not timed.

The other variants time the same window (end of batch 2 -> end of batch 14) around their own loop;
their writes (np.save / torch.save) are synchronous inside the loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH, SEQ, WARMUP, TIMED = 8, 256, 2, 12
N_BATCHES = WARMUP + TIMED
SECTION = "Harvest overhead (issue 2)"
TOKENS_FILE = common.BUILD / "tokens-8x256.npy"
OUT = common.BUILD / "out"
#: a run during which the rest of the machine used more CPU than this (in cores) is re-run
QUIET = 0.15
RESID = "blocks.*.hook_resid_post"
MLP = "blocks.*.mlp.hook_post"

#: variant -> (label, description used in the table)
VARIANTS = {
    "bare": "bare forward incl. LM head (HF, sdpa)",
    "bare_base": "bare forward, no LM head (base model)",
    "harvest_resid": "harvest resid_post ×12, no compression",
    "harvest_resid_zstd1": "harvest resid_post ×12, zstd-1",
    "harvest_resid_cps1": "harvest resid_post ×12, no compression, store.chunks_per_shard: 1",
    "harvest_resid_mlp": "harvest resid_post + mlp.hook_post ×12, no compression",
    "harvest_resid_mlp_zstd1": "harvest resid_post + mlp.hook_post ×12, zstd-1",
    "harvest_resid_mlp_zarr": "harvest resid_post + mlp.hook_post ×12, store.writer: zarr (the writer before issue 12)",
    "harvest_resid_mlp_nofsync": "harvest resid_post + mlp.hook_post ×12, store.fsync: none",
    "hf_hidden_npsave": "HF output_hidden_states + np.save (13×resid, fp32)",
    "tl_cache_save": "TransformerLens 4 run_with_cache(resid_post) + torch.save",
}
DEFAULT_VARIANTS = ["bare", "bare_base", "harvest_resid", "harvest_resid_zstd1", "harvest_resid_cps1", "harvest_resid_mlp",
                    "hf_hidden_npsave", "tl_cache_save"]


# --- setup (parent process) -----------------------------------------------------------------------

def prompts_cfg(corpus: Path) -> dict:
    return {"source": "text", "paths": [str(corpus)], "seq_len": SEQ, "mode": "packed",
            "max_sequences": BATCH * N_BATCHES}


def setup() -> tuple[Path, Path]:
    """Checkpoint, corpus and the token batches every variant uses (cached under build/bench/)."""
    import numpy as np

    corpus = common.stdlib_corpus()
    ckpt = common.pythia160m_checkpoint()
    if not TOKENS_FILE.is_file():
        from transformers import AutoTokenizer

        from harvest.prompts import build_source

        tok = AutoTokenizer.from_pretrained(ckpt)
        source = build_source(prompts_cfg(corpus), base_dir=common.ROOT, tokenizer=tok)
        ids = np.array([p.input_ids for p in source.prompts()], dtype=np.int64)
        assert ids.shape == (BATCH * N_BATCHES, SEQ), ids.shape
        np.save(TOKENS_FILE, ids)
    return ckpt, corpus


def tl_available() -> bool:
    from importlib.util import find_spec

    return find_spec("transformer_lens") is not None


# --- children (one fresh process per measurement) -------------------------------------------------

class Clock:
    """Batch end times; the timed window runs from the end of the last warm-up batch.

    It also measures the CPU that everything else on the machine used during the window (other
    jobs, VM steal): a measurement taken while another process competed for the cores is flagged.
    """

    def __init__(self):
        self.marks: list[float] = []
        self.contention: common.Contention | None = None
        self.threads = common.ThreadCPU()

    def tick(self) -> None:
        self.marks.append(time.perf_counter())
        if len(self.marks) == WARMUP:
            self.contention = common.Contention()
            self.threads.mark()

    def result(self, end: float | None = None) -> dict:
        assert len(self.marks) == N_BATCHES, f"{len(self.marks)} batches timed, expected {N_BATCHES}"
        foreign = self.contention.foreign_cores()
        thread_cpu = self.threads.totals()
        t0, t_last = self.marks[WARMUP - 1], self.marks[-1]
        end = t_last if end is None else end
        return {"seconds": end - t0, "compute_seconds": t_last - t0, "drain_seconds": end - t_last,
                "batch_seconds": [b - a for a, b in zip(self.marks, self.marks[1:])], "foreign_cores": foreign,
                "thread_cpu": thread_cpu}


def child(variant: str, threads: int, ckpt: Path, corpus: Path) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    out_dir = OUT / f"{variant}-t{threads}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if variant.startswith("harvest"):
        res = child_harvest(variant, threads, ckpt, corpus, out_dir)
    else:
        tokens = np.load(TOKENS_FILE)
        batches = [torch.from_numpy(tokens[k * BATCH:(k + 1) * BATCH]) for k in range(N_BATCHES)]
        res = {"bare": child_bare, "bare_base": child_bare, "hf_hidden_npsave": child_hidden,
               "tl_cache_save": child_tl}[variant](variant, ckpt, batches, out_dir)
    res.update(variant=variant, threads=threads, torch_threads=torch.get_num_threads(),
               peak_rss=common.peak_rss_bytes(), timed_tokens=TIMED * BATCH * SEQ)
    res["tokens_per_s"] = res["timed_tokens"] / res["seconds"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def load_hf(ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def child_bare(variant: str, ckpt: Path, batches, out_dir: Path) -> dict:
    import torch

    model = load_hf(ckpt)
    fwd = model if variant == "bare" else model.gpt_neox
    clock = Clock()
    with torch.inference_mode():
        for ids in batches:
            out = fwd(input_ids=ids, use_cache=False)
            del out
            clock.tick()
    return {**clock.result(), "stored_bytes": 0, "logical_bytes": 0}


def child_hidden(variant: str, ckpt: Path, batches, out_dir: Path) -> dict:
    import numpy as np
    import torch

    model = load_hf(ckpt)
    clock = Clock()
    with torch.inference_mode():
        for k, ids in enumerate(batches):
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
            np.save(out_dir / f"batch{k:03d}.npy", torch.stack(out.hidden_states, dim=2).numpy())  # (b, pos, 13, d)
            del out
            clock.tick()
    stored = common.dir_bytes(out_dir)
    return {**clock.result(), "stored_bytes": stored, "logical_bytes": stored}


def child_tl(variant: str, ckpt: Path, batches, out_dir: Path) -> dict:
    import logging
    import warnings

    import torch
    from transformers import AutoTokenizer

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformer_lens.model_bridge import TransformerBridge

    model = load_hf(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    bridge = TransformerBridge.boot_transformers(str(ckpt), hf_model=model, tokenizer=tok, device="cpu",
                                                 dtype=torch.float32)
    clock = Clock()
    with torch.inference_mode():
        for k, ids in enumerate(batches):
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"),
                                             return_cache_object=False)
            torch.save(cache, out_dir / f"batch{k:03d}.pt")
            del cache
            clock.tick()
    stored = common.dir_bytes(out_dir)
    return {**clock.result(), "stored_bytes": stored, "logical_bytes": stored,
            "attn_implementation": model.config._attn_implementation}


def child_harvest(variant: str, threads: int, ckpt: Path, corpus: Path, out_dir: Path) -> dict:
    import numpy as np

    from harvest.runner import run
    from harvest.spec import parse_spec
    from harvest.store import open_group
    from harvest.worker import StageWorker

    clock = Clock()
    process = StageWorker.process

    def timed_process(self, batch, hidden):  # the runner's loop: one call per batch, then the bar update
        out = process(self, batch, hidden)
        clock.tick()
        return out

    StageWorker.process = timed_process
    hooks = [RESID] + ([MLP] if "_mlp" in variant else [])
    raw = {
        "name": variant,
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "prompts": prompts_cfg(corpus),
        "capture": {"hooks": hooks, "positions": "all"},
        "run": {"batch_size": BATCH, "threads": threads},
        "store": {"root": str(out_dir), "path": "store.zarr",
                  "compressor": "zstd" if variant.endswith("zstd1") else "none", "level": 1,
                  **({"chunks_per_shard": 1} if variant.endswith("cps1") else {}),
                  **({"writer": "zarr"} if variant.endswith("_zarr") else {}),
                  **({"fsync": "none"} if variant.endswith("_nofsync") else {})},
    }
    spec = parse_spec(raw, base_dir=common.ROOT)
    result = run(spec, overwrite=True, progress=False)
    end = time.perf_counter()
    group = open_group(result.path)
    assert np.array_equal(np.asarray(group["input_ids"][...]), np.load(TOKENS_FILE)), "harvest saw other tokens"
    arrays = [name for name in group.array_keys() if name.startswith("blocks.")]
    stored = sum(common.dir_bytes(result.path / name) for name in arrays)
    logical = sum(group[name].nbytes for name in arrays)
    return {**clock.result(end), "stored_bytes": stored, "logical_bytes": logical, "arrays": len(arrays),
            "shard_rows": group[arrays[0]].shards[0], "chunk_rows": group[arrays[0]].chunks[0]}


# --- driver ---------------------------------------------------------------------------------------

def fmt_bytes_per_token(b: float) -> str:
    if not b:
        return "0"
    return f"{b / 1000:.1f} KB"


def table(results: list[dict], variants: list[str], threads: list[int]) -> str:
    def cell(v, t, key):
        return common.median([r[key] for r in results if r["variant"] == v and r["threads"] == t])

    base = {t: cell("bare", t, "tokens_per_s") for t in threads}
    head = ["variant"] + [f"{t} thread{'s' if t > 1 else ''} tok/s (ratio)" for t in threads] + \
           ["peak RSS"] + ["bytes/token stored (logical)"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        cells = [VARIANTS[v]]
        for t in threads:
            tps = cell(v, t, "tokens_per_s")
            n_bad = sum(r["contended"] for r in results if r["variant"] == v and r["threads"] == t)
            mark = "†" * bool(n_bad)
            cells.append(f"{tps:.0f} ({tps / base[t]:.2f}){mark}")
        rss = max(cell(v, t, "peak_rss") for t in threads)
        cells.append(f"{rss / 1e9:.2f} GB")
        n_tok = BATCH * SEQ * N_BATCHES
        stored, logical = cell(v, threads[0], "stored_bytes") / n_tok, cell(v, threads[0], "logical_bytes") / n_tok
        cells.append(fmt_bytes_per_token(stored) + (f" ({fmt_bytes_per_token(logical)}, {logical / stored:.2f}×)"
                                                    if stored and abs(stored - logical) > 0.005 * logical else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


COMPUTE_THREADS = ("main",)  # plus torch's intra-op workers, which Python does not name ("... (native)")


def writer_side_cpu(r: dict) -> float:
    """CPU seconds, in the timed window, of every thread but the forward's (writer, zarr's I/O loop and pool)."""
    return sum(v for k, v in r.get("thread_cpu", {}).items() if k not in COMPUTE_THREADS and not k.endswith("(native)"))


def detail_table(results: list[dict], variants: list[str], threads: list[int]) -> str:
    rows = ["| variant | threads | tok/s per run | compute-only tok/s | drain (s) | CPU s per 1k tok: all / writer side "
            "| other load (cores) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        for t in threads:
            rs = [r for r in results if r["variant"] == v and r["threads"] == t]
            if not rs:
                continue
            runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            comp = common.median([r["timed_tokens"] / r["compute_seconds"] for r in rs])
            drain = common.median([r["drain_seconds"] for r in rs])
            cpu_all = common.median([sum(r["thread_cpu"].values()) * 1000 / r["timed_tokens"] for r in rs])
            cpu_w = common.median([writer_side_cpu(r) * 1000 / r["timed_tokens"] for r in rs])
            load = ", ".join(f"{r['foreign_cores']:.2f}" for r in rs)
            rows.append(f"| {v} | {t} | {runs} | {comp:.0f} | {drain:.2f} | {cpu_all:.2f} / {cpu_w:.2f} | {load} |")
    return "\n".join(rows)


NOTES = """
Harvest timing: `harvest.runner.run` (the library call behind `harvest run`) with `StageWorker.process` wrapped to
record batch end times; timed from the end of warm-up batch 2 to the return of `run()` — 12 batches of compute
plus the writer's drain (rest of the queue, final shard flush, manifest) — so every write of all 14 batches falls
inside the window (slightly pessimistic: the writer buffers a whole shard, so nothing is written during warm-up).
Other variants: end of batch 2 → end of batch 14, their saves synchronous inside the loop. TransformerLens 4
switches the model to eager attention (it must expose patterns); that is part of its cost. The stored size of the
harvest arrays includes the zero-filled tail of the last chunk (2730-row chunks, 28672 rows: +4.7%) and crc32c;
on a long job it tends to the logical size. "Writer side" CPU = every thread but the forward's (the stage writer,
zarr's I/O loop and its codec pool), from /proc per-thread times over the timed window.
"""


def render(meta: dict, results: list[dict], contended: list[dict]) -> str:
    variants, threads = meta["variants"], meta["threads"]
    vers, mach = meta["versions"], meta["machine"]
    skipped = meta.get("skipped") or []
    return f"""
Command: `.venv/bin/python {meta['command']}` (started {meta['started']}, {meta['minutes']:.0f} min in all).
Machine: {mach['cpu']}, nproc {mach['nproc']}, {mach['memory']} RAM, {mach['os']}, no GPU.
Software: {', '.join(f'{k} {v}' for k, v in vers.items())}.

Model: GPT-NeoX of Pythia-160m's shape (hidden 768, 12 layers, 12 heads, MLP 3072, vocab 50304, rotary 0.25,
parallel residual), random init, fp32, sdpa. Batches of {BATCH} × {SEQ} tokens (stdlib docstrings, packed), {WARMUP}
warm-up + {TIMED} timed batches, each variant in a fresh process, median of {meta['reps']} repetitions (run order:
repetition, then thread count, then variant). Ratio = tok/s ÷ bare forward incl. LM head at the same thread count.
Peak RSS = `ru_maxrss` of the child (max over thread counts). Bytes/token = bytes on disk of the activation
arrays (or files) ÷ tokens; in brackets the uncompressed size and the compression ratio where they differ.
This machine is shared with other jobs: before each run the driver waits (up to {meta['max_wait']:.0f} s) until the rest
of the machine uses < {QUIET} cores, measures what other processes used during the timed window, and re-runs a
disturbed measurement up to {meta['retries']} time(s), keeping the least disturbed attempt. † = a median over runs of
which at least one was still disturbed (other load > {QUIET} cores; {len(contended)} disturbed attempts discarded).
{"Skipped: " + "; ".join(skipped) + "." if skipped else ""}

{table(results, variants, threads)}

{NOTES.strip()}

{detail_table(results, variants, threads)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, print only (RESULTS.md untouched)")
    ap.add_argument("--reps", type=int, default=None, help="fresh processes per cell (default 3; --quick: 1)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"re-runs of a measurement during which other processes used > {QUIET} cores (default 1)")
    ap.add_argument("--max-wait", type=float, default=120,
                    help="seconds to wait for the machine to go quiet before each run, then run anyway (default 120)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--json", type=Path, default=common.BUILD / "harvest_overhead.json",
                    help="raw results, saved after every run (default build/bench/harvest_overhead.json)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --json and do the rest")
    ap.add_argument("--redo-contended", action="store_true",
                    help="with --resume: measure again the cells whose kept run was disturbed")
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md from --json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.render:
        saved = json.loads(args.json.read_text())
        common.write_section(SECTION, render(saved["meta"], saved["results"], saved["contended"]))
        print(f"wrote section '{SECTION}' of {common.RESULTS}")
        return
    ckpt, corpus = setup()
    if args.child:
        print(json.dumps(child(args.child, args.child_threads, ckpt, corpus)))
        return

    reps = args.reps or (1 if args.quick else 3)
    threads = [int(t) for t in args.threads.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(unknown)}")
    if "bare" not in variants:
        variants.insert(0, "bare")  # every ratio is against it
    skipped = []
    if "tl_cache_save" in variants and not tl_available():
        variants.remove("tl_cache_save")
        skipped.append("tl_cache_save (transformer-lens not installed)")
    started = dt.datetime.now()
    results: list[dict] = []
    contended: list[dict] = []  # disturbed attempts that were re-run
    spent = 0.0
    if args.resume and args.json.is_file():
        saved = json.loads(args.json.read_text())
        results, contended = saved["results"], saved["contended"]
        if args.redo_contended:
            contended += [r for r in results if r["contended"]]
            results = [r for r in results if not r["contended"]]
        started = dt.datetime.fromisoformat(saved["meta"]["started"])
        spent = saved["meta"]["minutes"]
    done = {(r["rep"], r["threads"], r["variant"]) for r in results}
    t_start = time.perf_counter()
    meta = {"command": "bench/harvest_overhead.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--resume"),
            "started": started.isoformat(timespec="minutes"), "reps": reps, "threads": threads,
            "variants": variants, "skipped": skipped, "retries": args.retries, "max_wait": args.max_wait,
            "machine": common.machine(), "versions": common.versions(("transformer-lens",))}

    def save() -> None:
        meta["minutes"] = spent + (time.perf_counter() - t_start) / 60
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "contended": contended}, indent=1))

    # repetition-major order: slow drift of the machine spreads over every variant alike
    for rep in range(reps):
        for t in threads:
            for v in variants:
                if (rep, t, v) in done:
                    continue
                attempts = []
                for attempt in range(args.retries + 1):
                    waited = common.wait_until_quiet(QUIET, max_wait=args.max_wait)
                    t_child = time.perf_counter()
                    r = common.run_child([str(Path(__file__).resolve()), "--child", v, "--child-threads", str(t)])
                    r.update(rep=rep, wall=time.perf_counter() - t_child, attempt=attempt, waited=waited)
                    r["contended"] = r["foreign_cores"] > QUIET
                    attempts.append(r)
                    print(f"rep {rep} threads {t} {v:24s} {r['tokens_per_s']:7.1f} tok/s  "
                          f"(compute {r['timed_tokens'] / r['compute_seconds']:.1f}, drain {r['drain_seconds']:.2f} s)  "
                          f"rss {r['peak_rss'] / 1e9:.2f} GB  stored {r['stored_bytes'] / 1e6:.0f} MB  "
                          f"other load {r['foreign_cores']:.2f} cores{' (CONTENDED)' if r['contended'] else ''}  "
                          f"[{r['wall']:.0f} s, waited {waited:.0f} s]", flush=True)
                    if not r["contended"]:
                        break
                best = min(attempts, key=lambda a: a["foreign_cores"])  # the least disturbed attempt counts
                results.append(best)
                contended.extend(a for a in attempts if a is not best)
                save()
    save()
    print()
    print(table(results, variants, threads))
    print()
    print(detail_table(results, variants, threads))
    if args.quick or args.no_write:
        return
    common.write_section(SECTION, render(meta, results, contended))
    print(f"\nwrote section '{SECTION}' of {common.RESULTS}")


if __name__ == "__main__":
    main()
