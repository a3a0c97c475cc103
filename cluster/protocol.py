"""The log protocol between a submitted job and ``harvest submit`` / ``harvest status``.

The job prints tagged lines to its log (the Jobs API keeps it); the client reads them back:

- ``[harvest-ready] {json}``: the job checked its store location and starts harvesting;
- ``[harvest-progress] {json}``: batches and tokens done of total, tokens/s (on every change);
- ``[harvest-error] ClassName: message``: the job stopped on a ``HarvestError``, which the client
  raises again as the same class with the same message (``rebuild_error``).
"""

from __future__ import annotations

import json
from typing import Any

from harvest import errors
from harvest.errors import ClusterError, HarvestError

READY_TAG = "[harvest-ready]"
PROGRESS_TAG = "[harvest-progress]"
ERROR_TAG = "[harvest-error]"


def error_line(exc: HarvestError) -> str:
    """The log line that carries ``exc`` back to the client (one line: the message's newlines go)."""
    message = " ".join(str(exc).split("\n"))
    return f"{ERROR_TAG} {type(exc).__name__}: {message}"


def rebuild_error(name: str, message: str, suffix: str = "") -> HarvestError:
    """The error the job reported, as its own class (a ``ClusterError`` for a class harvest does not know)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HarvestError):
        return cls(message + suffix)
    return ClusterError(f"{name}: {message}{suffix}")


def parse_progress(log_text: str | None) -> dict[str, Any] | None:
    """The last progress record the job printed (None: none yet)."""
    if not log_text:
        return None
    for line in reversed(log_text.splitlines()):
        start = line.find(PROGRESS_TAG)
        if start < 0:
            continue
        try:
            record = json.loads(line[start + len(PROGRESS_TAG):])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"batches", "n_batches", "tokens", "total_tokens"} <= record.keys():
            return record
    return None


def parse_error(log_text: str | None) -> tuple[str, str] | None:
    """(error class, message) of the last error the job reported, if any."""
    if not log_text:
        return None
    for line in reversed(log_text.splitlines()):
        start = line.find(ERROR_TAG)
        if start >= 0:
            name, _, message = line[start + len(ERROR_TAG):].strip().partition(": ")
            return name, message
    return None


