"""Outlier scan and query benchmark.

    .venv/bin/python bench/outlier_scan.py            # writes build/bench/outlier_scan_{1x,4x}.zarr, runs, appends RESULTS.md
    .venv/bin/python bench/outlier_scan.py --no-record

Measured, each in a fresh process, on synthetic GPT-NeoX-shaped stores (d_model 1024, 8 layers,
float16, sequences of 512 tokens, ``blocks.*.hook_resid_post`` + ``blocks.*.ln1.hook_normalized``:
ln2 is derived from the residual, so the LayerNorm path is exercised):

1. the one pass of ``harvest analyze outliers`` (Dettmers hit statistics, massive activations,
   kurtosis and the per-dimension index) in MiB/s of stored activations, against a hand-written
   NumPy loop that reads the same blocks with zarr and computes the same statistics (its results
   are checked against the pass's: outlier dims, per-layer max |x|, index mean/std/max/top-1,
   kurtosis);
2. peak RSS of the pass at 1x and 4x the store size;
3. ``query dim`` latency at both sizes (in process after one warm-up, and the CLI's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
L, D, SEQ_LEN = 8, 1024, 512
OUTLIER_DIM, MASSIVE_DIM = 333, 77


# --- the stores -------------------------------------------------------------------------------------

def make_store(path: Path, n_seq: int, tokenizer_dir: Path) -> Path:
    from analysis.synthetic import write_store

    rng = np.random.default_rng(0)
    pos_out = rng.random(SEQ_LEN) < 0.5
    w = rng.uniform(0.8, 1.2, (L, D)).astype(np.float32)
    zeros = np.zeros((L, D), np.float32)
    ln = {"ln1.w": w, "ln1.b": zeros, "ln2.w": w[::-1].copy(), "ln2.b": zeros}

    def values(name: str, lo: int, hi: int) -> np.ndarray:
        layer = int(name.split(".")[1])
        x = np.random.default_rng([layer, lo, len(name)]).standard_normal((hi - lo, D), dtype=np.float32)
        pos = np.arange(lo, hi) % SEQ_LEN
        if name.endswith("ln1.hook_normalized"):
            x[pos_out[pos], OUTLIER_DIM] = -12 if layer >= 2 else -3
        else:
            x[:, OUTLIER_DIM] -= 0.5 if layer >= 1 else 0  # a residual offset LayerNorm turns into an outlier
            x[pos_out[pos], OUTLIER_DIM] = -40 if layer >= 1 else 0
            x[pos == 0, MASSIVE_DIM] = 3000 if layer >= 3 else 0
        return x.astype(np.float16)

    hooks = [f"blocks.{layer}.{t}" for layer in range(L) for t in ("ln1.hook_normalized", "hook_resid_post")]
    return write_store(path, hooks, [SEQ_LEN] * n_seq, D, values, model_type="gpt_neox", n_layers=L, ln=ln,
                       dtype="float16", chunk_mib=8, chunks_per_shard=8, tokenizer_dir=tokenizer_dir,
                       vocab_size=2048, write_rows=1 << 14)


# --- the hand-written NumPy loop ---------------------------------------------------------------------

def numpy_scan(path: Path, block_rows: int, k: int = 32, alpha: float = 6.0) -> dict:
    """Reads each array block by block with zarr; plain NumPy; the same statistics as the pass."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    hooks = list(g.attrs["harvest"]["hooks"])
    cfg = g.attrs["harvest"]["model"]["config"]
    eps = cfg.get("layer_norm_eps", 1e-5)
    ln = {key: g["model"][key][...] for key in ("ln1.w", "ln1.b", "ln2.w", "ln2.b")}
    seq = g["seq"][...]
    n, n_seq = seq.size, int(seq[-1]) + 1
    seq_rows = np.bincount(seq)
    d = g[hooks[0]].shape[1]
    # per index array: n, sum, M2 (Chan), max, count >= alpha, top-k rows/values
    idx = {h: {"n": 0, "mean": np.zeros(d), "m2": np.zeros(d), "max": np.zeros(d, np.float32),
               "ge": np.zeros(d, np.int64), "top_v": np.zeros((0, d), np.float32), "top_r": np.zeros((0, d), np.int64)}
           for h in hooks}
    layers = list(range(L))
    any_l = np.zeros((n_seq, L, d), bool)  # per sequence, layer, dim: some |x| >= alpha
    pos_count = np.zeros((n_seq, d), np.int64)  # per sequence, dim: positions with a hit in any layer
    hits = np.zeros((L, d), np.int64)
    max_ln = np.zeros((L, d), np.float32)
    kurt = {layer: {} for layer in layers}  # layer -> seq -> [n, sum, sumsq, ...] float64 raw moments
    massive = 0
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        union = np.zeros((hi - lo, d), bool)
        s = seq[lo:hi]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        ids = s[starts]
        for h in hooks:
            x = g[h][lo:hi].astype(np.float32)
            layer = int(h.split(".")[1])
            a = np.abs(x)
            st = idx[h]
            m = x.mean(0, dtype=np.float64)
            dev = x - m.astype(np.float32)
            m2 = (dev * dev).sum(0, dtype=np.float64)
            nb = hi - lo
            delta = m - st["mean"]
            tot = st["n"] + nb
            st["m2"] += m2 + delta**2 * st["n"] * nb / tot
            st["mean"] += delta * nb / tot
            st["n"] = tot
            st["max"] = np.maximum(st["max"], a.max(0))
            st["ge"] += (a >= alpha).sum(0)
            part = np.argpartition(np.ascontiguousarray(a.T), max(0, nb - k), axis=1)[:, -k:].T  # (k, d) local rows
            cand_v = np.concatenate([st["top_v"], np.take_along_axis(x, part, 0)])
            cand_r = np.concatenate([st["top_r"], part + lo])
            keep = np.argsort(-np.abs(cand_v), axis=0, kind="stable")[:k]
            st["top_v"], st["top_r"] = np.take_along_axis(cand_v, keep, 0), np.take_along_axis(cand_r, keep, 0)
            if h.endswith("hook_resid_post"):
                # kurtosis per sequence: raw power sums in float64
                x64 = x.astype(np.float64)
                sq = x64 * x64
                rs = [np.add.reduceat(v.sum(1), starts) for v in (x64, sq, sq * x64, sq * sq)]
                for j, sid in enumerate(ids):
                    acc = kurt[layer].setdefault(int(sid), np.zeros(5))
                    acc += [x.shape[1] * np.diff(np.r_[starts, nb])[j], rs[0][j], rs[1][j], rs[2][j], rs[3][j]]
                big = np.argwhere(a > 100)
                if big.size:
                    med = np.median(a[np.unique(big[:, 0])], axis=1)
                    rowmed = dict(zip(np.unique(big[:, 0]).tolist(), med.tolist()))
                    massive += sum(a[r, c] >= 1000 * rowmed[r] for r, c in big.tolist())
            states = []
            if h.endswith("ln1.hook_normalized"):
                states.append((layer, x))
            if h.endswith("hook_resid_post") and layer + 1 < L:  # ln2 of the next layer from the raw residual
                z = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps)
                states.append((layer + 1, z * ln["ln2.w"][layer + 1] + ln["ln2.b"][layer + 1]))
            if h == "blocks.0.ln1.hook_normalized":  # ln2 of layer 0: ln1 re-weighted
                z = (x - ln["ln1.b"][0]) / ln["ln1.w"][0]
                states.append((0, z * ln["ln2.w"][0] + ln["ln2.b"][0]))
            for li, y in states:
                mask = np.abs(y) >= alpha
                union |= mask
                hits[li] += mask.sum(0)
                max_ln[li] = np.maximum(max_ln[li], np.abs(y).max(0))
                any_l[ids, li] |= np.logical_or.reduceat(mask, starts, axis=0)
        pos_count[ids] += np.add.reduceat(union, starts, axis=0)
    layer_frac = any_l.sum(1).mean(0) / L
    pos_frac = (pos_count / seq_rows[:, None]).mean(0)
    outliers = np.flatnonzero((layer_frac >= 0.25) & (pos_frac >= 0.06)).tolist()
    kurtosis = {}
    for layer, per in kurt.items():
        vals = []
        for nn, s1, s2, s3, s4 in per.values():
            mu = s1 / nn
            m2 = s2 / nn - mu**2
            m4 = s4 / nn - 4 * mu * s3 / nn + 6 * mu**2 * s2 / nn - 3 * mu**4
            vals.append(m4 / (m2**2 + 1e-6))
        kurtosis[layer] = float(np.mean(vals))
    return {"outliers": outliers, "max_ln": max_ln, "kurtosis": kurtosis, "massive": int(massive),
            "index": {h: {"mean": st["mean"], "std": np.sqrt(st["m2"] / st["n"]), "max": st["max"],
                          "ge": st["ge"], "top1": st["top_v"][0]} for h, st in idx.items()}}


# --- children: one measurement per fresh process -------------------------------------------------------

def peak_rss_mib() -> float:
    """VmHWM: ``ru_maxrss`` of a fresh process also holds its parent's peak (see bench/common.py)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, store: Path, block_mib: float, workers: int | None) -> dict:
    from analysis.scan import ScanParams, rows_per_block, run_scan
    from analysis.source import StoreFacts

    facts = StoreFacts.load(store)
    nbytes = sum(facts.n_rows * a.row_bytes for a in facts.arrays.values())
    rss0 = peak_rss_mib()
    if mode == "dask":
        from analysis.index import write_index
        from analysis.outliers import build_report, write_results

        t0, c0 = time.perf_counter(), cpu_seconds()
        scan = run_scan(store, ScanParams(block_mib=block_mib), num_workers=workers)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        rep = build_report(scan)
        write_results(rep, store)
        write_index(scan)
        out = {"outliers": rep.outlier_dims, "max_ln": rep.arrays["max_abs"][0].tolist(),
               "kurtosis": {str(x["layer"]): x["kurtosis"] for x in rep.report["kurtosis"]["layers"]},
               "massive": sum(f["count"] for f in rep.report["massive"]["found"]),
               "index": {h: {"mean": s["mean"].tolist(), "std": s["std"].tolist(), "max": s["max_abs"].tolist(),
                             "ge": s["count_ge"].tolist(), "top1": s["top_values"][0].tolist()}
                         for h, s in scan.index.items()}}
    elif mode == "numpy":
        rows = rows_per_block(next(iter(facts.arrays.values())), block_mib, facts.n_rows)
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = numpy_scan(store, rows)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        out = {"outliers": res["outliers"], "max_ln": res["max_ln"].tolist(),
               "kurtosis": {str(k): v for k, v in res["kurtosis"].items()}, "massive": res["massive"],
               "index": {h: {k: v.tolist() for k, v in s.items()} for h, s in res["index"].items()}}
    else:  # query
        from analysis.query import query_dim

        query_dim(store, OUTLIER_DIM)  # warm-up: imports, tokenizer
        times = []
        for dim in (OUTLIER_DIM, MASSIVE_DIM, 5, 900, OUTLIER_DIM):
            t0 = time.perf_counter()
            query_dim(store, dim, top=10)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "harvest", "query", "dim", str(store), str(OUTLIER_DIM)],
                             capture_output=True, text=True, cwd=REPO)
        assert cli.returncode == 0, cli.stderr
        return {"median_s": float(np.median(times)), "max_s": float(max(times)),
                "cli_s": time.perf_counter() - t0}
    return {"seconds": seconds, "cpu_s": cpu, "mib_per_cpu_s": nbytes / 2**20 / cpu, "mib": nbytes / 2**20,
            "mib_per_s": nbytes / 2**20 / seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss0, "result": out}


def run_child(mode: str, store: Path, block_mib: float, workers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(store), "--block-mib", str(block_mib)]
    if workers:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_same(a: dict, b: dict) -> list[str]:
    """Differences between the pass's results and the NumPy loop's."""
    bad = []
    if a["outliers"] != b["outliers"]:
        bad.append(f"outliers {a['outliers']} vs {b['outliers']}")
    if not np.allclose(a["max_ln"], b["max_ln"], rtol=1e-4, atol=1e-4):
        bad.append("per-layer max |x|")
    if a["massive"] != b["massive"]:
        bad.append(f"massive {a['massive']} vs {b['massive']}")
    for layer, k in a["kurtosis"].items():
        if abs(k - b["kurtosis"][layer]) > 1e-4 * abs(k):
            bad.append(f"kurtosis layer {layer}: {k} vs {b['kurtosis'][layer]}")
    for h, s in a["index"].items():
        t = b["index"][h]
        for key, tol in (("mean", 1e-6), ("std", 1e-5), ("max", 0), ("ge", 0), ("top1", 0)):
            x, y = (np.abs(s[key]), np.abs(t[key])) if key == "top1" else (s[key], t[key])  # float16 ties: either sign
            if not np.allclose(x, y, rtol=tol, atol=tol):
                bad.append(f"index {h} {key}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "STORE"))
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--seqs", type=int, default=13, help="sequences of the 1x store (13 -> 208 MiB)")
    ap.add_argument("--block-mib", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.block_mib, args.workers)))
        return

    from harvest.toy import build_tokenizer, stdlib_docstrings

    args.out.mkdir(parents=True, exist_ok=True)
    tok = args.out / "outlier_scan_tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_tokenizer(stdlib_docstrings(limit=400), tok, vocab_size=2048)
    stores = {}
    for label, n_seq in (("1x", args.seqs), ("4x", 4 * args.seqs)):
        path = args.out / f"outlier_scan_{label}.zarr"
        if args.rebuild or not (path / "zarr.json").is_file():
            t0 = time.perf_counter()
            make_store(path, n_seq, tok)
            print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
        stores[label] = path
    rows = {}
    load_before = os.getloadavg()[0]
    for label, path in stores.items():
        numpy_res = run_child("numpy", path, args.block_mib)
        dask_res = run_child("dask", path, args.block_mib, args.workers)
        one = run_child("dask", path, args.block_mib, 1)
        query = run_child("query", path, args.block_mib)
        bad = check_same(dask_res["result"], numpy_res["result"])
        rows[label] = {"numpy": numpy_res, "dask": dask_res, "dask1": one, "query": query, "bad": bad}
        verdict = "MATCH" if not bad else "DIFFER: " + "; ".join(bad)
        print(f"{label}: {dask_res['mib']:.0f} MiB; pass {dask_res['mib_per_s']:.0f} MiB/s (1 thread "
              f"{one['mib_per_s']:.0f}), numpy loop {numpy_res['mib_per_s']:.0f} MiB/s -> "
              f"{dask_res['mib_per_s'] / numpy_res['mib_per_s']:.2f}x (per CPU-second: pass "
              f"{dask_res['mib_per_cpu_s']:.0f}, numpy {numpy_res['mib_per_cpu_s']:.0f}); peak RSS pass "
              f"{dask_res['peak_rss_mib']:.0f} MiB, numpy {numpy_res['peak_rss_mib']:.0f} MiB; query "
              f"{query['median_s'] * 1e3:.0f} ms (max {query['max_s'] * 1e3:.0f}, CLI {query['cli_s']:.2f} s); "
              f"outliers {dask_res['result']['outliers']}; results {verdict}", flush=True)
    load = (load_before, os.getloadavg()[0])
    print(f"load average before/after: {load[0]:.1f} / {load[1]:.1f} (other processes on this machine)")
    if not args.no_record:
        record(rows, args, load)


def record(rows: dict, args, load: tuple[float, float]) -> None:
    import dask
    import zarr

    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {gib:.0f} GiB, no GPU; python "
               f"{platform.python_version()}, numpy {np.__version__}, dask {dask.__version__}, "
               f"zarr {zarr.__version__}; "
               f"load average {load[0]:.1f} before / {load[1]:.1f} after (other sessions' jobs on the machine)")
    lines = ["", "## Outlier scan and query (issue 4)", "",
             f"`.venv/bin/python bench/outlier_scan.py` ({time.strftime('%Y-%m-%d')}; {machine}). "
             "Synthetic GPT-NeoX-shaped "
             f"stores: d_model {D}, {L} layers, float16, sequences of {SEQ_LEN}, `blocks.*.hook_resid_post` + "
             f"`blocks.*.ln1.hook_normalized` (ln2 derived from the residual), zarr chunks of 8 MiB, blocks of "
             f"{args.block_mib:g} MiB. One pass = Dettmers hit statistics + massive activations + kurtosis + the "
             "per-dimension index (top-32). The NumPy loop reads the same blocks with zarr and computes the same "
             "statistics in one thread; its results are checked against the pass's. Each figure from a fresh process.",
             "",
             "| store | MiB | pass MiB/s (2 threads) | pass, 1 thread | NumPy loop MiB/s | ratio (goal >= 0.8) "
             "| MiB per CPU-s, pass / NumPy | peak RSS pass | peak RSS NumPy | query median / max | query CLI wall "
             "| results |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        d, n, q = r["dask"], r["numpy"], r["query"]
        lines.append(f"| {label} | {d['mib']:.0f} | {d['mib_per_s']:.0f} | {r['dask1']['mib_per_s']:.0f} | "
                     f"{n['mib_per_s']:.0f} | {d['mib_per_s'] / n['mib_per_s']:.2f}x | "
                     f"{d['mib_per_cpu_s']:.0f} / {n['mib_per_cpu_s']:.0f} | {d['peak_rss_mib']:.0f} MiB | "
                     f"{n['peak_rss_mib']:.0f} MiB | {q['median_s'] * 1e3:.0f} / {q['max_s'] * 1e3:.0f} ms | "
                     f"{q['cli_s']:.2f} s | {'match' if not r['bad'] else 'DIFFER'} |")
    path = REPO / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
