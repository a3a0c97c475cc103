"""How far a job got: the store's manifest read inside the job, the job's log read by the client.

Inside the job, ``ProgressMonitor`` reads the store's progress (``harvest.store.read_progress``)
every few seconds and prints a ``[harvest-progress]`` line when it changes. The client's
``job_progress`` takes the counts from the store when it is readable from here (a shared
filesystem), else from the last such line, and the rate from the line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvest.store import is_store, read_progress

from .protocol import PROGRESS_TAG, parse_progress


@dataclass(frozen=True)
class Progress:
    """How far a job got: batches and tokens (every token of the processed sequences) done of total."""

    batches_done: int
    n_batches: int
    tokens_done: int
    tokens_total: int
    #: tokens per second of the current run (None: not measured yet)
    tokens_per_s: float | None = None
    #: where the counts come from: "store" (its manifest, read from here) or "job log"
    source: str = "store"

    @property
    def fraction(self) -> float:
        return self.tokens_done / self.tokens_total if self.tokens_total else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.tokens_total - self.tokens_done
        if left <= 0:
            return 0.0
        return left / self.tokens_per_s if self.tokens_per_s else None




def measured_rate(samples: list[tuple[float, int]]) -> float | None:
    """Tokens per second from (time, tokens done) samples, leaving out start-up (loading weights).

    Measured from the first sample in which tokens moved to the latest; with a single move, from
    the first sample (start-up included) to it.
    """
    if len(samples) < 2:
        return None
    t0, n0 = samples[0]
    moved = next((i for i, (_, n) in enumerate(samples) if n > n0), None)
    if moved is None:
        return None
    (t1, n1), (t2, n2) = samples[moved], samples[-1]
    if n2 > n1 and t2 > t1:
        return (n2 - n1) / (t2 - t1)
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class ProgressMonitor:
    """In the job: reads the store's manifest every ``every`` seconds and prints a progress line on change."""

    def __init__(self, path: Path, every: float, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, replaced: bool = False):
        self.path, self.every, self.clock = path, every, clock
        #: with ``replaced`` (--overwrite), the store there now is the old one until its zarr.json changes
        self._old = _stamp(path) if replaced else None
        self.emit = emit or (lambda line: print(line, flush=True))
        self.samples: list[tuple[float, int]] = []  #: first, first move, latest
        self.last: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harvest-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poll(self, rate: float | None = None) -> dict[str, Any] | None:
        """Read the store; return (and emit) a progress record when something changed."""
        if self._old is not None:
            if _stamp(self.path) == self._old:
                return None
            self._old = None
        try:
            p = read_progress(self.path) if is_store(self.path) else None
        except Exception:  # noqa: BLE001 - a manifest caught mid-write: try again next time
            return None
        if p is None:
            return None
        now = self.clock()
        self._sample(now, p.tokens_done)
        if (p.batches_done, p.n_batches) == self.last and rate is None:  # a final rate always prints
            return None
        self.last = (p.batches_done, p.n_batches)
        record = {"batches": p.batches_done, "n_batches": p.n_batches, "tokens": p.tokens_done,
                  "total_tokens": p.tokens_total, "tokens_per_s": rate if rate is not None else measured_rate(self.samples),
                  "time": round(time.time(), 3)}
        self.emit(f"{PROGRESS_TAG} {json.dumps(record)}")
        return record

    def _sample(self, now: float, tokens: int) -> None:
        """Keep three samples: the first, the first in which tokens moved, the latest."""
        if not self.samples:
            self.samples = [(now, tokens)]
        elif len(self.samples) == 1:
            if tokens > self.samples[0][1]:
                self.samples.append((now, tokens))
        else:
            self.samples = [self.samples[0], self.samples[1], (now, tokens)]

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def finish(self, tokens_per_s: float | None = None) -> None:
        """Stop polling and print the final line (with the run's own tokens/s when given)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll(rate=tokens_per_s)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = (Path(path) / "zarr.json").stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino



def job_progress(log_text: str | None, store: str | None) -> Progress | None:
    """Progress of a job: counts from the store when readable from here, else from its log; rate from its log."""
    record = parse_progress(log_text)
    rate = record.get("tokens_per_s") if record else None
    local = None
    if store and is_store(store):
        try:
            local = read_progress(store)
        except Exception:  # noqa: BLE001 - mid-write or not a store: fall back on the log
            local = None
    if local is not None:
        return Progress(local.batches_done, local.n_batches, local.tokens_done, local.tokens_total, rate, "store")
    if record is not None:
        return Progress(int(record["batches"]), int(record["n_batches"]), int(record["tokens"]),
                        int(record["total_tokens"]), rate, "job log")
    return None



def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def format_progress(p: Progress | None) -> str:
    if p is None:
        return "no progress yet"
    pct = 100.0 * p.batches_done / p.n_batches if p.n_batches else 0.0
    out = f"{p.batches_done}/{p.n_batches} batches ({pct:.1f}%), {p.tokens_done:,}/{p.tokens_total:,} tokens"
    if p.tokens_per_s:
        out += f", {p.tokens_per_s:,.0f} tokens/s"
    eta = p.eta_s
    if p.tokens_done < p.tokens_total:
        out += f", ETA {duration(eta)}" if eta is not None else ", ETA unknown (no rate yet)"
    return out + (f"  [from the {p.source}]" if p.source != "store" else "")


