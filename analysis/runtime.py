"""Where an analysis's Dask graphs run: one helper for every analysis and every ``--scheduler``.

``with dask_scheduler(spec, num_workers) as client:`` makes every ``dask.compute`` inside it run on

- ``None`` / ``"threads"``: Dask's threaded scheduler in this process (``num_workers`` threads,
  default one per core);
- ``"sync"``: one thread, in order (for debugging and exact reproduction);
- an address (``tcp://host:8786``): a ``dask.distributed`` scheduler, checked first so that an
  unreachable one is a one-line :class:`~harvest.errors.AnalysisError` at once instead of a client
  retrying for its whole timeout;
- a ``distributed.Client`` the caller already holds (left open on exit), or a Dask scheduler
  function such as ``dask.get``.

``client`` is the distributed client in use, else ``None``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from harvest.errors import AnalysisError

THREADS = (None, "threads", "threaded")
SYNC = ("sync", "synchronous", "single-threaded")
SCHEMES = ("tcp", "tls", "inproc", "ws", "wss", "ucx")
CONNECT_TIMEOUT_S = 5
DEFAULT_PORT = 8786  #: dask.distributed's scheduler port


@contextlib.contextmanager
def dask_scheduler(spec: Any = None, num_workers: int | None = None) -> Iterator[Any]:
    """Run the ``dask.compute`` calls inside on the scheduler ``spec`` names (see the module doc)."""
    import dask

    if spec in THREADS:
        with dask.config.set(scheduler="threads", num_workers=num_workers):
            yield None
        return
    if spec in SYNC:
        with dask.config.set(scheduler="sync"):
            yield None
        return
    if isinstance(spec, str):
        with connect(spec) as client, dask.config.set(scheduler=client):
            yield client
        return
    if _is_client(spec) or callable(spec):
        with dask.config.set(scheduler=spec):
            yield spec if _is_client(spec) else None
        return
    raise _unknown(spec)


def connect(address: str):
    """A ``distributed.Client`` on ``address``, or a one-line error when nothing answers there."""
    from distributed import Client

    check_reachable(address)
    try:
        return Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise unreachable(address, exc) from None


def check_reachable(address: str) -> None:
    """Fail fast on a malformed address or a closed TCP port."""
    url = address if "://" in address else f"tcp://{address}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise unreachable(address, exc) from None
    if parts.scheme not in SCHEMES:
        raise unreachable(address, f"unknown scheme {parts.scheme!r}")
    if parts.scheme in ("tcp", "tls"):
        if not host:
            raise unreachable(address, "no host in the address")
        try:
            socket.create_connection((host, port or DEFAULT_PORT), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise unreachable(address, exc) from None


def unreachable(address: str, why: Any) -> AnalysisError:
    return AnalysisError(f"cannot reach the dask scheduler at {address!r} ({why}); start one with `dask scheduler` "
                         "and `dask worker ADDRESS`, or leave --scheduler out to use threads in this process")


def _is_client(obj: Any) -> bool:
    return hasattr(obj, "scheduler_info") and hasattr(obj, "get")


def describe(spec: Any = None, num_workers: int | None = None) -> str:
    """Where ``dask_scheduler(spec)`` would run, after the same checks but without connecting (dry runs)."""
    if spec in THREADS:
        return f"threads in this process ({num_workers or 'one per core'})"
    if spec in SYNC:
        return "one thread in this process (sync)"
    if isinstance(spec, str):
        check_reachable(spec)
        return f"the dask.distributed scheduler at {spec}"
    if _is_client(spec) or callable(spec):
        return repr(spec)
    raise _unknown(spec)


def _unknown(spec: Any) -> AnalysisError:
    return AnalysisError(f"--scheduler {spec!r}: give 'threads', 'sync' or a dask.distributed address "
                         "such as tcp://10.0.0.5:8786")
