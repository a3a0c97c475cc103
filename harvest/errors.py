"""One error hierarchy for everything a user can get wrong.

Each error says the rule, the offending value and what to do about it. They subclass the
builtin that fits (``ValueError``, ``FileNotFoundError``, ...) so callers who catch builtins keep
working, and the CLI prints them as one line without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarvestError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class SpecError(HarvestError, ValueError):
    """The job spec is malformed or asks for something impossible."""


class ModelError(HarvestError, ValueError):
    """The model or checkpoint cannot be used as asked."""


class CheckpointNotFoundError(ModelError, FileNotFoundError):
    """No checkpoint at the given path (and no hub name that could be fetched)."""


class HookNameError(SpecError, KeyError):
    """A hook pattern matched no hook point of this model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StoreError(HarvestError, RuntimeError):
    """The store cannot be created, opened or resumed as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """A store is already at the path and neither --resume nor --overwrite was given."""


class ObjectStoreAccessError(StoreError, PermissionError):
    """A store root on object storage that cannot be written (no bucket, access denied): found before compute."""


class FingerprintMismatchError(StoreError):
    """--resume against a store written by a different spec, model or layout."""


class PlanDoesNotFitError(SpecError):
    """The stages of a job do not fit the memory they are given (``harvest plan`` shows the figures)."""


class NonFiniteActivationError(HarvestError, FloatingPointError):
    """NaN or inf in captured activations with ``on_nonfinite: fail``."""


class StageError(HarvestError, RuntimeError):
    """A pipeline stage failed for a reason that retrying will not fix."""


class ReplicaLost(StageError):
    """A replica cannot go on (an actor dead for good, or a crash that repeats); the driver drops it and
    hands its units to the other replicas, so the user sees this only through the warning."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(section: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Reject unknown keys in a spec section, naming the closest valid key."""
    allowed = sorted(allowed)
    for key in given:
        if key not in allowed:
            raise SpecError(
                f"unknown key {key!r} in {section}{did_you_mean(key, allowed)}; "
                f"valid keys: {', '.join(allowed)}"
            )


# --- analyses and queries (analysis/) ---------------------------------------------------------------

class AnalysisError(HarvestError, ValueError):
    """An analysis or a query cannot run as asked: a parameter, a store without what it needs."""


class DimensionOutOfRangeError(AnalysisError, IndexError):
    """A queried dimension is outside the hook point's width."""


class HookNotInStoreError(AnalysisError, KeyError):
    """A queried hook point was not harvested into this store (or not indexed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IndexNotBuiltError(StoreError, FileNotFoundError):
    """The store has no per-dimension index yet; the message says how to build it."""


# --- jobs on a Ray cluster (jobs/) --------------------------------------------------------------------

class ClusterError(HarvestError, RuntimeError):
    """A Ray cluster cannot take, run or report a harvest job as asked."""


class ClusterUnreachableError(ClusterError, ConnectionError):
    """No Ray Jobs API answers at the address given (or in $RAY_ADDRESS)."""


class ClusterResourcesError(ClusterError):
    """The cluster has fewer CPUs or GPUs than the job's stages need."""


class JobNotFoundError(ClusterError, LookupError):
    """No job with that id on the cluster."""


class StoreNotWritableError(StoreError, PermissionError):
    """The store location cannot be written from where the job runs (or is not a usable location)."""


class ShardIndexError(StoreError, ValueError):
    """A shard's index is unreadable: wrong size, bad checksum, or offsets outside the file."""


class CorruptChunkError(StoreError, ValueError):
    """A stored chunk failed its checksum (zarr's ValueError, with the array, chunk, rows and repair named)."""
# --- signals ---------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop computing, make what was computed durable, exit 128 + signal.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way
    swallows it, but not a ``KeyboardInterrupt``, which typer turns into a returned exit code.
    The runner fills in ``store`` and ``batches_done`` once the store is flushed; the CLI adds the
    command that resumes.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.store: str | None = None
        self.batches_done: int | None = None
        self.n_batches: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def message(self, resume_command: str | None = None) -> str:
        """The one line the CLI prints: what stopped, what is kept, how to continue."""
        kept = ""
        if self.store is not None and self.batches_done is not None:
            kept = f"; {self.batches_done}/{self.n_batches} batches are saved in {self.store}"
        elif resume_command:  # a run stopped before its store existed
            kept = "; nothing was written yet"
        hint = f"; continue with: {resume_command}" if resume_command and self.store is not None else ""
        return f"interrupted by {self.signal_name}{kept}{hint}"
