"""The statistics' one pass over a hook's rows on a CPU: ``rowpass.c``, compiled at first use.

On a CPU the statistics' pass reads rows the forward wrote a moment before, but no longer in the cache:
torch.compile's loop over them (``harvest.running.CompiledKernel``) ran at ~1.1 ms a hook of 2048 x 768
float32 rows there, this one at ~0.35 (``bench/statistics_overhead.py``), and it also finds the top-k's
candidates, where torch took some twenty small ops a hook. On an accelerator the compiled kernels stay.

The library is built once per machine with the C compiler inductor needs anyway (``$CC``, else ``cc``,
``gcc`` or ``clang``), for the vector instructions torch found on this CPU, into a cache directory
(``$HARVEST_KERNEL_CACHE``, else ``~/.cache/harvest/kernels``) under a name that hashes the source and
the flags, so machines sharing a home directory do not share a library built for another CPU. Where it
cannot be built or loaded, or ``HARVEST_COMPILE=0``, :func:`row_pass` returns None (logged once) and the
torch kernels run instead: the same statistics, the float64 sums in another order.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rowpass.c")
#: set to a directory to keep the compiled library there
CACHE_ENV = "HARVEST_KERNEL_CACHE"
#: set to 0 to keep the statistics' kernels eager: neither this pass nor ``torch.compile`` (``harvest.running``)
COMPILE_ENV = "HARVEST_COMPILE"

#: x86 vector extensions by torch's name for this CPU's (``torch.backends.cpu.get_cpu_capability``)
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
              "AVX2": ["-mavx2", "-mfma"]}


@dataclass
class RowPass:
    """One hook's batch through the pass: every tensor on the CPU, the candidates' trimmed to their count."""

    sum: torch.Tensor  #: (d,) float64
    sumsq: torch.Tensor  #: (d,) float64
    group_max: torch.Tensor  #: (groups, d) float32: max |x| per group of rows
    max: torch.Tensor  #: (d,) float32: max |x|
    count_ge: torch.Tensor  #: (d,) int32: count of |x| >= threshold
    rows: torch.Tensor  #: (n,) int64: the entries above the floor (by group, column, then row)
    cols: torch.Tensor  #: (n,) int64
    values: torch.Tensor  #: (n,) float32
    #: False: a NaN or inf is in the rows; nothing else here holds (``harvest.running._slow`` counts them apart)
    finite: bool = True


class _Library:
    """The compiled ``rowpass.c``, loaded once per process (under a lock: Ray actors run threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fn = None
        self.failed: str | None = None  #: why the torch kernels run instead

    def get(self):
        if self._fn is None and self.failed is None:
            with self._lock:
                if self._fn is None and self.failed is None:
                    try:
                        self._fn = self._load()
                    except Exception as exc:  # noqa: BLE001 - no compiler, a read-only disk...: torch's kernels work
                        self.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                        log.warning("harvest-time statistics: the CPU row pass (%s) is unavailable (%s); using "
                                    "the torch kernels, same statistics, slower (set %s=0 to skip the attempt)",
                                    SOURCE.name, self.failed, COMPILE_ENV)
        return self._fn

    def _load(self):
        if os.environ.get(COMPILE_ENV, "1") == "0":
            raise RuntimeError(f"{COMPILE_ENV}=0")
        fn = ctypes.CDLL(str(_built())).harvest_row_pass
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, i64, i64, ctypes.c_float, p, p, p, p, p, p, p, p, p, i64]
        fn.restype = i64
        return fn


def _flags() -> list[str]:
    isa = torch.backends.cpu.get_cpu_capability() if platform.machine().lower() in ("x86_64", "amd64") else ""
    return ["-O3", "-shared", "-fPIC", *_ISA_FLAGS.get(isa, [])]


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    raise RuntimeError("no C compiler found (set CC)")


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "harvest" / "kernels"


def _built() -> Path:
    """The library for this source and these flags, compiled now when no process has yet."""
    flags = _flags()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([platform.machine(), *flags]).encode()).hexdigest()[:16]
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: this user's own folder in the temporary directory
        folder = Path(tempfile.gettempdir()) / f"harvest-kernels-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
    library = folder / f"rowpass-{key}.so"
    if not library.exists():
        partial = folder / f".rowpass-{key}-{os.getpid()}-{threading.get_ident()}.so"
        done = subprocess.run([_compiler(), *flags, "-o", str(partial), str(SOURCE)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[:500]}")
        os.replace(partial, library)  # whole or not at all: other processes may be loading it
    return library


LIBRARY = _Library()


def row_pass_built() -> bool:
    """:func:`row_pass` runs here (the library is built and loaded, now if not before)."""
    return LIBRARY.get() is not None


def row_pass(x: torch.Tensor, group: int, threshold: float, floor: np.ndarray | None,
             capacity: int = 4096) -> RowPass | None:
    """``x`` (tokens, d) float32, contiguous, on the CPU: its statistics (see ``rowpass.c``) and, where a
    ``floor`` (d,) is given, every entry with |x| above it. None: the pass is unavailable here (the torch
    kernels' turn)."""
    fn = LIBRARY.get()
    if fn is None:
        return None
    tokens, d = x.shape
    groups = -(-tokens // group)
    out = RowPass(torch.empty(d, dtype=torch.float64), torch.empty(d, dtype=torch.float64),
                  torch.empty((groups, d), dtype=torch.float32), torch.empty(d, dtype=torch.float32),
                  torch.empty(d, dtype=torch.int32), *_candidates(capacity))
    if floor is not None:
        floor = np.ascontiguousarray(floor, dtype=np.float32)
        if floor.shape != (d,):
            raise ValueError(f"a floor of shape {floor.shape} for rows of {d} columns")

    def call(room: int) -> int:
        return fn(x.data_ptr(), tokens, d, group, threshold, None if floor is None else floor.ctypes.data,
                  out.sum.data_ptr(), out.sumsq.data_ptr(), out.group_max.data_ptr(), out.max.data_ptr(),
                  out.count_ge.data_ptr(), out.rows.data_ptr(), out.cols.data_ptr(), out.values.data_ptr(), room)

    found = call(capacity)
    if found > capacity:  # more entries above the floor than room: once more, with room for them all
        out.rows, out.cols, out.values = _candidates(found)
        found = call(found)
    if found < 0:
        out.finite = False
        return out
    out.rows, out.cols, out.values = out.rows[:found], out.cols[:found], out.values[:found]
    return out


def _candidates(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
