"""The Ray pipeline driver: one actor per stage, hidden states stage to stage as object references.

The actors are ``StageWorker`` (the same class a one-stage job runs in-process) made remote here,
with one thin addition: ``run`` returns a small status next to the hidden state, so the driver
learns what is durable without ever fetching activations. The driver owns everything else:

- **flow**: batch k goes to stage 0; the reference to stage i's output is passed straight into
  stage i+1's call, so hidden states move between actors, never through the driver;
- **backpressure**: at most ``run.max_in_flight`` micro-batches are between entering stage 0 and
  leaving the last stage; the driver blocks in ``ray.wait`` until the oldest one finishes;
- **retention**: stage i's output for batch k is kept (by reference) until stage i+1 reports
  batch k durable, because a stage's writer buffers whole shards and a restarted stage resumes at
  its durable frontier, which can be several batches back;
- **recovery**: an actor that dies (killed, segfault) is restarted by Ray (``max_restarts``); the
  driver lets the calls in flight settle, asks every stage where its writer stands, and re-sends
  from there. A stage asked for a batch its writer already has just runs the forward (its output
  feeds the next stage) and writes nothing, so no row is written twice by two writers and the
  finished store is byte-identical to an uninterrupted run;
- **permanent failures**: an exception raised by a stage (non-finite activations, a model or store
  error, out of memory) or an actor that cannot start or keeps dying stops the job with that error,
  its message intact; nothing is retried forever.

With no address (``run.address`` or ``RAY_ADDRESS``), an embedded local Ray starts with enough CPUs
for the stages and no dashboard; with one, the same code connects to that cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from harvest.errors import HarvestError, Interrupted, StageError
from harvest.shape import Resources, cluster_capacity, local_ray_cpus, stage_resources
from harvest.store import stage_frontier
from harvest.worker import StageWorker
from harvest.writer import StageStoreInfo

#: seconds an actor may take to start (import, load its weights) before the job fails
START_TIMEOUT_S = float(os.environ.get("HARVEST_START_TIMEOUT_S", 900))
#: seconds the stages get, after an interrupt, to write the batches they hold
FLUSH_TIMEOUT_S = float(os.environ.get("HARVEST_FLUSH_TIMEOUT_S", 120))
#: how Ray words a worker killed for memory (its memory monitor, the kernel's OOM killer)
_OOM = re.compile(r"out of memory|\boom\b|memory monitor|memory pressure|low on memory", re.IGNORECASE)
#: Ray errors that mean "the object was lost", not "the stage failed"
_LOST = tuple(getattr(ray.exceptions, n) for n in ("ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError")
              if hasattr(ray.exceptions, n))


def to_wire(t):
    """A hidden state as Ray moves it fastest: a numpy array (zero-copy in the object store), with its dtype.

    numpy has no bfloat16, so 16-bit floats travel as their int16 bit patterns.
    """
    if t is None:
        return None
    if isinstance(t, tuple):  # (hidden state, packed Dettmers hit bitmask): harvest.hits
        return tuple(to_wire(x) for x in t), "tuple"
    t = t.detach().to("cpu")
    name = str(t.dtype).removeprefix("torch.")
    return (t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy(), name


def from_wire(wire):
    """The tensor ``to_wire`` sent (a writable copy: Ray's arrays are read-only views of shared memory)."""
    if wire is None:
        return None
    array, name = wire
    if name == "tuple":
        return tuple(from_wire(x) for x in array)
    t = torch.from_numpy(np.array(array))
    return t.view(getattr(torch, name)) if name in ("bfloat16", "float16") else t


def peak_rss() -> int:
    """Peak resident memory of this process in bytes.

    From ``VmHWM`` in /proc/self/status, not ``ru_maxrss``: Linux carries the high-water mark of the
    process image that ``exec`` replaced into ``ru_maxrss``, so a process started by a big one (a
    Ray worker forked from the raylet, a subprocess of pytest) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PipelineStage(StageWorker):
    """A ``StageWorker`` as a pipeline actor.

    Its writer starts at the stage's durable frontier, so a restarted actor (Ray re-runs
    ``__init__`` with the same arguments) resumes where its rows stop being on disk. A failure to
    start is kept and raised by ``ready``/``run``, so it reaches the driver as the original
    exception rather than as a dead actor.
    """

    def __init__(self, ckpt, plan, options, store: StageStoreInfo, start_batch: int):
        self.rss_before_load = peak_rss()
        self.last = plan.index == plan.n_stages - 1
        self.init_error: BaseException | None = None
        try:
            store.configure_store()  # a bucket's endpoint, before the first read of the store
            super().__init__(ckpt, plan, options, store, stage_frontier(store.path, store.stage, start_batch))
        except BaseException as exc:  # noqa: BLE001 - re-raised by ready()/run()
            self.init_error = exc
        self.rss_loaded = peak_rss()

    def ready(self) -> dict[str, Any]:
        if self.init_error is not None:
            raise self.init_error
        return self.position()

    def position(self) -> dict[str, Any]:
        """Where this stage's writer stands: next batch it expects, durable frontier, process id."""
        if self.init_error is not None:
            raise self.init_error
        return {"next": self.writer.next_batch, "durable": self.durable_batches(), "pid": os.getpid()}

    @ray.method(num_returns=2)
    def run(self, batch, hidden):
        """Forward one batch; returns (status, hidden state for the next stage or None on the last)."""
        if self.init_error is not None:
            raise self.init_error
        # Ray hands numpy arrays over read-only; torch wants writable ones
        batch = dataclasses.replace(batch, input_ids=np.array(batch.input_ids), lengths=np.array(batch.lengths),
                                    flat_rows=np.array(batch.flat_rows))
        hidden = from_wire(hidden)
        if batch.index < self.writer.next_batch:  # already with the writer: forward only, for downstream
            out, _ = self.stage.run(batch, hidden)
        else:
            out = self.process(batch, hidden)
        status = {"batch": batch.index, "durable": self.durable_batches()}
        return status, None if self.last else to_wire(out)

    def begin(self, batch: int) -> dict[str, Any]:
        """Start a unit of work at ``batch`` (replicas): its writer's next rows are the unit's first."""
        if self.init_error is not None:
            raise self.init_error
        self.writer.begin_unit(batch)
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def end_unit(self) -> dict[str, Any]:
        """Block until the unit's rows are on disk; returns this process's id (restarts show as new ids)
        and the unit's NaN/inf counts per array."""
        return {"pid": os.getpid(), "nonfinite": self.writer.end_unit()}

    def memory(self) -> dict[str, int]:
        """Peak RSS before loading weights, after loading, and now (bytes)."""
        return {"before_load": self.rss_before_load, "loaded": self.rss_loaded, "peak": peak_rss()}


# --- Ray session ---------------------------------------------------------------------------------

@dataclass
class RaySession:
    """Connects to ``address`` (or $RAY_ADDRESS), reuses a running session, or starts a local one."""

    address: str | None
    num_cpus: int
    dashboard: bool = False
    started: bool = False

    def __enter__(self) -> RaySession:
        if ray.is_initialized():
            return self
        address = self.address or os.environ.get("RAY_ADDRESS")
        on_term = signal.getsignal(signal.SIGTERM)
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            kwargs: dict[str, Any] = {"include_dashboard": self.dashboard}
            if self.dashboard:
                kwargs["dashboard_host"] = "127.0.0.1"
            ray.init(num_cpus=self.num_cpus, **kwargs)
        if callable(on_term) and threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler that exits at once; ours flushes the stages first
            signal.signal(signal.SIGTERM, on_term)
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()


# --- the driver ----------------------------------------------------------------------------------

@dataclass
class _Call:
    stage: int
    batch: int


@dataclass
class Pipeline:
    """Drives one job's batches through its stage actors (see the module doc)."""

    job: Any
    start_batch: int
    on_batch: Callable[[int, Pipeline], None] | None = None
    actors: list = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.job.stages)
        spec = self.job.spec
        self.n = n
        self.n_batches = self.job.layout.n_batches
        self.max_in_flight = spec.run.max_in_flight or 2 * n
        self.next_send = [self.start_batch] * n  #: next batch to send to each stage
        self.durable = [self.start_batch] * n  #: each stage's durable frontier, as last reported
        self.completed = self.start_batch  #: batches through the last stage (in order)
        self.finished: set[int] = set()  #: last-stage batches done out of order
        self.reported = self.start_batch  #: high-water mark of ``completed`` (progress bar)
        self.hidden: list[dict[int, Any]] = [{} for _ in range(n)]  #: stage -> batch -> output ref
        self.pending: dict[Any, _Call] = {}  #: status ref -> call
        self.failed: set[tuple[int, int]] = set()
        self.progress_at_restart: dict[int, int] = {}  #: stage -> ``reported`` when it last restarted

    # -- actors --
    def stage_resources(self) -> Resources:
        """CPUs and GPUs per stage actor, from the Ray session's nodes (what ``harvest submit`` checks)."""
        nodes = alive_nodes()
        node_cpus, gpus = cluster_capacity(nodes)
        return stage_resources(self.job.spec, node_cpus=node_cpus, gpus=gpus, nodes=max(1, len(nodes)))

    def start(self) -> None:
        job = self.job
        resources = self.stage_resources()
        cpus, gpus = resources.cpus_per_stage, resources.gpus_per_stage
        self._check_resources(cpus, gpus)
        # on a GPU node Ray shows each actor only its own GPU, as cuda:0
        options = dataclasses.replace(job.stage_options(), threads=cpus, **({"device": "cuda"} if gpus else {}))
        remote = ray.remote(PipelineStage)
        name = f"harvest-{job.spec.name}-{os.getpid()}-{time.time_ns() % 10**9}"
        for stage in job.stages:
            actor = remote.options(
                name=f"{name}-stage{stage.index}", num_cpus=cpus, num_gpus=gpus,
                max_restarts=job.spec.run.max_restarts, max_task_retries=0, max_concurrency=1,
            ).remote(job.ckpt, stage, options, job.stage_info(stage), self.start_batch)
            self.actors.append(actor)
        positions = self._get("ready", START_TIMEOUT_S)
        self.pids = [p["pid"] for p in positions]
        self.restarts = [0] * self.n
        self._adopt(positions)

    def _check_resources(self, cpus: int, gpus: int) -> None:
        total = ray.cluster_resources()
        need = {"CPU": cpus * self.n, "GPU": gpus * self.n}
        for kind, amount in need.items():
            if amount and total.get(kind, 0) < amount:
                raise StageError(
                    f"{self.n} stages need {amount:g} {kind}s ({amount // self.n:g} each) but the Ray cluster has "
                    f"{total.get(kind, 0):g}; lower run.threads or run.stages, or use a bigger cluster (run.address)"
                )

    def stop(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []

    # -- the loop --
    def run(self, bar=None) -> dict[str, int]:
        while self.completed < self.n_batches:
            self._pump()
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            if not self._collect(ready):
                self._recover()
            if self.completed > self.reported:
                if bar is not None:
                    bar.update(self._tokens(self.reported, self.completed))
                self.reported = self.completed
        return self._close()

    def _pump(self) -> None:
        """Send every call the window allows, stage by stage, each fed by its upstream reference."""
        limit = min(self.n_batches, self.completed + self.max_in_flight)
        layout = self.job.layout
        for i, actor in enumerate(self.actors):
            while self.next_send[i] < limit:
                k = self.next_send[i]
                upstream = None
                if i > 0:
                    upstream = self.hidden[i - 1].get(k)
                    if upstream is None:
                        break
                status, out = actor.run.remote(layout.batch(k), upstream)
                self.pending[status] = _Call(i, k)
                if i < self.n - 1:
                    self.hidden[i][k] = out
                self.next_send[i] = k + 1

    def _collect(self, ready: list) -> bool:
        """Take finished calls; False when one was lost to a dead actor (recovery needed)."""
        ok = True
        for ref in ready:
            call = self.pending.pop(ref)
            try:
                status = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - classified here
                self._classify(exc, call)
                self.failed.add((call.stage, call.batch))
                ok = False
                continue
            self._done(call, status)
        return ok

    def _done(self, call: _Call, status: dict[str, Any]) -> None:
        i = call.stage
        self.durable[i] = max(self.durable[i], status["durable"])
        if i == self.n - 1:
            self.finished.add(call.batch)
            while self.completed in self.finished:
                self.finished.discard(self.completed)
                self.completed += 1
                if self.on_batch is not None:
                    self.on_batch(self.completed - 1, self)
        if i > 0:  # upstream outputs that stage i has made durable are no longer needed
            kept = self.hidden[i - 1]
            for k in [k for k in kept if k < self.durable[i]]:
                del kept[k]

    def _classify(self, exc: BaseException, call: _Call) -> None:
        """Raise at once for a permanent failure; return for a lost actor or object (recoverable)."""
        cause = exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, _LOST):
            if call.stage > 0:
                self.hidden[call.stage - 1].pop(call.batch, None)
            return
        if isinstance(cause, ray.exceptions.OutOfMemoryError) or (
                isinstance(cause, RayActorError) and _OOM.search(str(cause))):
            raise StageError(f"stage {call.stage} ({self.job.stages[call.stage].describe()}) was killed for running "
                             f"out of memory at batch {call.batch}; lower run.batch_size or run.max_in_flight, use "
                             f"more stages or model.quantization (see `harvest plan`). Ray said: {_first_line(str(cause))}"
                             ) from None
        if isinstance(cause, RayActorError):
            return
        raise _permanent(cause, call.stage, self.job.stages[call.stage])

    def _recover(self) -> None:
        """After a lost actor: settle what is in flight, ask each stage where it stands, re-send."""
        if self.pending:
            refs = list(self.pending)
            ray.wait(refs, num_returns=len(refs))
            self._collect(refs)
        # Failed outputs must be recomputed: drop them. Successful ones stay (retention).
        for i, k in self.failed:
            if i < self.n - 1:
                self.hidden[i].pop(k, None)
        self.failed.clear()
        positions = self._get("position", START_TIMEOUT_S)
        for i, p in enumerate(positions):
            if p["pid"] != self.pids[i]:
                if self.progress_at_restart.get(i) == self.reported:
                    # died again before a single batch got through: a crash that will repeat (the kernel's
                    # OOM killer, a segfault), not bad luck
                    raise StageError(
                        f"stage {i} ({self.job.stages[i].describe()}) died again after its restart before any batch "
                        f"got through (batch {p['next']}); a crash that repeats, often the kernel's out-of-memory "
                        "killer: check the memory with `harvest plan`, lower run.batch_size or use more stages")
                self.progress_at_restart[i] = self.reported
                self.restarts[i] += 1
                self.pids[i] = p["pid"]
        self._adopt(positions)

    def _adopt(self, positions: list[dict[str, Any]]) -> None:
        """Resume each stage at its writer's next batch; an upstream stage re-runs what it must feed."""
        self.next_send = [p["next"] for p in positions]
        self.durable = [p["durable"] for p in positions]
        for i in range(self.n - 2, -1, -1):
            # stage i+1 needs stage i's outputs from next_send[i+1]: kept ones, or recomputed ones
            missing = [k for k in range(self.next_send[i + 1], self.next_send[i]) if k not in self.hidden[i]]
            if missing:
                self.next_send[i] = missing[0]
                for k in [k for k in self.hidden[i] if k >= missing[0]]:
                    del self.hidden[i][k]
        # the last stage's writer position is what counts as done (it rolls back after a restart)
        self.completed = self.next_send[-1]
        self.finished.clear()

    def _get(self, method: str, timeout: float) -> list:
        """Call ``method`` on every actor at once and return the results; a failure stops the job.

        A call that meets an actor while Ray restarts it is repeated until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        refs = [getattr(a, method).remote() for a in self.actors]
        out = []
        for i, actor in enumerate(self.actors):
            while True:
                ready, _ = ray.wait([refs[i]], timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise StageError(
                        f"stage {i} did not {method} within {timeout:.0f} s: the cluster may lack the CPUs/GPUs "
                        "or memory it asks for, or loading its weights takes longer (HARVEST_START_TIMEOUT_S)")
                try:
                    out.append(ray.get(refs[i]))
                    break
                except ActorUnavailableError:
                    time.sleep(0.2)  # being restarted: ask again
                    refs[i] = getattr(actor, method).remote()
                except RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    raise _permanent(cause, i, self.job.stages[i]) from None
                except RayActorError as exc:
                    raise StageError(f"stage {i} ({self.job.stages[i].describe()}) died and could not be "
                                     f"restarted (run.max_restarts: {self.job.spec.run.max_restarts}): "
                                     f"{_first_line(str(exc))}") from None
        return out

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """After an interrupt: every stage finishes the batches it was sent and writes them, partial shards
        included, and advances its manifest; nothing new is sent. Best effort within ``timeout``."""
        refs = []
        for actor in self.actors:
            try:
                refs.append(actor.close.remote())
            except Exception:  # noqa: BLE001 - a dead actor has nothing to flush
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def _close(self) -> dict[str, int]:
        counts = self._get("close", START_TIMEOUT_S)
        merged: dict[str, int] = {}
        for c in counts:
            for name, v in c.items():
                merged[name] = merged.get(name, 0) + v
        return merged

    def _tokens(self, k0: int, k1: int) -> int:
        """Tokens in batches [k0, k1)."""
        return self.job.layout.tokens_before(k1) - self.job.layout.tokens_before(k0)

    def memory(self) -> list[dict[str, int]]:
        """Each stage actor's peak RSS before loading, after loading, and now."""
        return ray.get([a.memory.remote() for a in self.actors])


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:400] if lines else ""


def _permanent(cause: BaseException, index: int, stage) -> BaseException:
    """The user-facing error of a stage that failed for good: the stage's own error when it is ours."""
    if isinstance(cause, HarvestError):
        return cause
    name = type(cause).__name__
    if isinstance(cause, MemoryError) or "out of memory" in str(cause).lower():
        return StageError(f"stage {index} ({stage.describe()}) ran out of memory: {cause}. Lower run.batch_size, "
                          "use more stages or model.quantization (see `harvest plan`)")
    # first line only: errors of Rust clients (obstore) append a many-line debug dump of their cause
    return StageError(f"stage {index} ({stage.describe()}) failed: {name}: {_first_line(str(cause))}")


def alive_nodes() -> list[dict[str, float]]:
    """Resource totals of the Ray session's alive nodes."""
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def run_pipeline(job, start_batch: int, progress: bool, *, on_batch=None) -> dict[str, int]:
    """Run ``job``'s batches from ``start_batch`` through one Ray actor per stage; returns non-finite counts.

    ``on_batch(k, pipeline)`` is called after each batch leaves the last stage (tests use it to kill
    actors mid-run).
    """
    pipeline = Pipeline(job, start_batch, on_batch)
    layout = job.layout
    # an embedded Ray gets this machine's CPUs, or what run.threads asks for all stages if more
    local_cpus = local_ray_cpus(job.spec, len(job.stages), 1)
    with RaySession(job.spec.run.address, local_cpus, job.spec.run.dashboard):
        bar = tqdm(total=layout.tokens_before(layout.n_batches), initial=layout.tokens_before(start_batch),
                   unit="tok", unit_scale=True,
                   desc=f"harvest {job.spec.name} ({len(job.stages)} stages)", disable=not progress)
        try:
            pipeline.start()
            return pipeline.run(bar)
        except (Interrupted, KeyboardInterrupt):
            pipeline.flush()
            raise
        finally:
            bar.close()
            pipeline.stop()
