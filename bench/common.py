"""Helpers shared by the benchmarks in ``bench/``: the benchmark model and corpus, fresh-process
runs, machine/software description, and writing one section of ``bench/RESULTS.md``.

The benchmark model is a GPT-NeoX of Pythia-160m's shape (BENCH.md): random init, fp32, built once
and cached under ``build/bench/``. Its tokenizer is a byte-level BPE trained on the standard
library's docstrings (a real 50k vocabulary cannot be trained on that corpus); the config's
``vocab_size`` is set to 50304 regardless, so the embedding and the LM head have Pythia's size.
Token ids then only use the first ``len(tokenizer)`` rows, which changes nothing in the cost.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
RESULTS = ROOT / "bench" / "RESULTS.md"

#: Pythia-160m's shape (GPT-NeoX, parallel residual, rotary on a quarter of each head).
PYTHIA_160M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True)
VOCAB = 50304
TOKENIZER_VOCAB = 8192


def stdlib_corpus(path: Path = BUILD / "corpus" / "docstrings.jsonl") -> Path:
    """The standard library's docstrings, one JSON document per line (cached)."""
    if not path.is_file():
        from harvest.toy import stdlib_docstrings

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for doc in stdlib_docstrings():
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.rename(path)
    return path


def pythia160m_checkpoint(out_dir: Path = BUILD / "pythia160m-shape") -> Path:
    """Build (once) the random-init fp32 benchmark checkpoint; returns its directory."""
    marker = out_dir / ".complete"
    if marker.is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM

    from harvest.toy import build_tokenizer, stdlib_docstrings, toy_config

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(stdlib_docstrings(), out_dir, vocab_size=TOKENIZER_VOCAB)
    config = toy_config("gpt_neox", vocab_size=VOCAB, **PYTHIA_160M)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(out_dir)
    marker.write_text("ok\n")
    return out_dir


# --- measuring ------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM, since ``ru_maxrss`` also holds the peak of the
    parent image that ``exec`` replaced (a fresh process started from a big one reports the big one's)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> tuple[float, float]:
    """(seconds of CPU busy on the whole machine incl. VM steal, of this process) since boot / start."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / hz, t.user + t.system


class Contention:
    """CPU used by everything but this process over a window, in cores (other jobs, VM steal, kernel)."""

    def __init__(self):
        self.start = cpu_seconds()
        self.t0 = time.perf_counter()

    def foreign_cores(self) -> float:
        busy, own = cpu_seconds()
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.start[0]) - (own - self.start[1])) / wall if wall > 0 else 0.0


class ThreadCPU:
    """CPU seconds per thread of this process, sampled from /proc (threads that exit keep their last sample).

    ``mark()`` takes a baseline; ``totals()`` gives CPU since the baseline grouped by thread name
    (numbered pool threads such as ``asyncio_3`` are grouped as ``asyncio_*``; threads Python does
    not know, e.g. torch's intra-op workers, under their OS name).
    """

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval = interval
        self._hz = os.sysconf("SC_CLK_TCK")
        self._last: dict[int, tuple[str, float]] = {}
        self._base: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-thread-cpu", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import threading

        names = {t.native_id: t.name for t in threading.enumerate()}
        names[os.getpid()] = "main"
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._hz
            tid_i = int(tid)
            name = names.get(tid_i) or self._last.get(tid_i, (None,))[0] or f"{comm} (native)"
            self._last[tid_i] = (name, cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self) -> None:
        self._sample()
        self._base = {tid: cpu for tid, (_, cpu) in self._last.items()}

    def totals(self) -> dict[str, float]:
        self._sample()
        self._stop.set()
        out: dict[str, float] = {}
        for tid, (name, cpu) in self._last.items():
            if name == "bench-thread-cpu":
                continue
            key = re.sub(r"_\d+$", "_*", re.sub(r"-\d+_\d+$", "-*", name))
            out[key] = out.get(key, 0.0) + cpu - self._base.get(tid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def wait_until_quiet(threshold: float = 0.15, sample: float = 2.0, max_wait: float = 600.0) -> float:
    """Block until the machine's other load (in cores) is below ``threshold``; returns seconds waited."""
    t0 = time.perf_counter()
    while True:
        c = Contention()
        time.sleep(sample)
        if c.foreign_cores() < threshold or time.perf_counter() - t0 > max_wait:
            return time.perf_counter() - t0 - sample


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_child(argv: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process; it must print one JSON object as its last stdout line."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {argv} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- describing -----------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "nproc": str(os.cpu_count()), "memory": mem, "os": platform.platform()}


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "accelerate", "zarr", "numcodecs", "numpy", "safetensors", "tokenizers", *extra)
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## {title}`` section of RESULTS.md, leaving every other section as is."""
    header = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    block = f"{header}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == header), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + block + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text, encoding="utf-8")
