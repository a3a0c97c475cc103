"""Harvest jobs on a Ray cluster, through the Ray Jobs API (what ``ray job submit`` uses).

The library behind ``harvest submit / status / logs / stop / jobs``::

    from jobs.submit import submit, status, wait, logs, stop, list_jobs
    job = submit("jobs/gptj-6b-outliers.yaml", "http://127.0.0.1:8265", store_url="/mnt/shared/stores")
    print(status(job.job_id).progress)          # batches and tokens done of total, tokens/s, ETA
    wait(job.job_id)                            # until SUCCEEDED / FAILED / STOPPED

What a submitted job is:

- its **working directory** holds only the spec (``spec.yaml``, as written); relative paths in the
  spec are read from the directory ``submit`` was called in (``base_dir``), which must therefore
  exist on the cluster too (a shared filesystem mounted at the same path), or the spec gives
  absolute paths;
- its **code**: by default this machine's ``harvest``, ``sharding``, ``analysis`` and ``jobs``
  packages travel as ``py_modules`` (the cluster's Python needs only the dependencies: torch,
  transformers, zarr, ray ...); ``ship_code=False`` when the cluster's image has harvest installed;
- its **entrypoint** names the interpreter (a bare ``python`` on a node's PATH may not be the one
  with Ray, see GOTCHAS): this interpreter when the cluster runs on this machine (a loopback
  address), else ``python`` unless ``python=`` says otherwise;
- it runs ``python -m jobs.submit spec.yaml ...`` (``main`` below): check that the store location is
  writable from the node, then ``harvest.runner.run(spec, resume=True)``, which resumes a store that
  already has progress when its fingerprint matches (and refuses one that does not), while a thread
  prints one ``[harvest-progress] {json}`` line to the job's log when progress changes.

``status`` reads progress from the job's log and, when the store is reachable from here (a shared
filesystem), from the store's progress manifest (``_progress/stage_*``) and row layout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from harvest.errors import (ClusterError, ClusterResourcesError, ClusterUnreachableError, HarvestError, Interrupted,
                            JobNotFoundError, SpecError, StoreNotWritableError)

#: tags of the lines the job prints for ``submit`` and ``status`` to read from its log
READY_TAG = "[harvest-ready]"
PROGRESS_TAG = "[harvest-progress]"
ERROR_TAG = "[harvest-error]"
#: job metadata keys (``ray job list`` shows them too)
META_SPEC, META_STORE, META_STAGES = "harvest.spec", "harvest.store", "harvest.stages"
#: the packages of this project, shipped to the cluster as py_modules unless ship_code=False
PACKAGES = ("harvest", "sharding", "analysis", "jobs")
EXCLUDES = ["__pycache__", "*.pyc", "*.zarr"]
SPEC_FILE = "spec.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- what a status holds ---------------------------------------------------------------------------

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


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  #: PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""
    spec: str | None = None  #: the job spec's name (None: not a harvest job)
    store: str | None = None
    stages: int | None = None
    start_time: float | None = None  #: seconds since the epoch
    end_time: float | None = None
    entrypoint: str = ""
    progress: Progress | None = None
    #: the job's own error (``ErrorClass: message``) when it failed
    error: str | None = None
    ray_job_id: str | None = None
    driver_node_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    address: str
    store: str
    entrypoint: str
    #: the job's state when ``submit`` returned (RUNNING once the job checked its store)
    state: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    #: progress already in the store (a resumed job), when the store is readable from here
    resumes_from: Progress | None = None


# --- the cluster's address -------------------------------------------------------------------------

def dashboard_url(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else $RAY_ADDRESS; ``HOST:PORT`` means ``http://HOST:PORT``."""
    given = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not given:
        raise ClusterUnreachableError(
            "no cluster address: pass --address http://HOST:8265 (the Ray dashboard, which serves the Jobs "
            "API; http://127.0.0.1:8265 for a cluster on this machine) or set RAY_ADDRESS to it")
    if given.startswith("ray://"):
        raise ClusterUnreachableError(
            f"{given} is a Ray Client address; jobs are submitted through the Jobs API on the head node's "
            "dashboard: use http://HOST:8265")
    url = given if "://" in given else f"http://{given}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterUnreachableError(f"cannot read {given!r} as a Jobs API address; use http://HOST:8265")
    return url.rstrip("/")


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def is_local(url: str) -> bool:
    return _host_port(url)[0] in LOOPBACK


def _unreachable(url: str, why: str) -> ClusterUnreachableError:
    return ClusterUnreachableError(
        f"no Ray cluster answers at {url} ({why}). Check that the head node runs (`ray status` on it), that "
        "its dashboard listens at that host and port (`ray start --head --dashboard-host=127.0.0.1 "
        "--dashboard-port=8265`; the Jobs API is the dashboard's port, 8265 by default, not the GCS port "
        "6379), and that this machine reaches it, e.g. through `ssh -L 8265:127.0.0.1:8265 HEAD` or "
        "`kubectl port-forward svc/CLUSTER-head-svc 8265:8265`")


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for ``address`` (or $RAY_ADDRESS), and the URL it talks to."""
    url = dashboard_url(address)
    host, port = _host_port(url)
    try:  # fail fast: the client itself would wait for a TCP timeout on an unroutable host
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise _unreachable(url, exc.strerror or type(exc).__name__) from None
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, requests' errors
        if type(exc).__name__ == "AuthenticationError":
            raise ClusterError(
                f"the cluster at {url} uses Ray's token authentication and refused this client: set RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH) to the cluster's token, which `ray start` wrote on the head node "
                f"(~/.ray/auth_token). Ray said: {_first_line(str(exc))}") from None
        raise _unreachable(url, _first_line(str(exc)) or type(exc).__name__) from None
    return client, url


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


# --- resources -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Needs:
    """What a job asks the cluster for: one actor per stage (stages > 1), or the entrypoint itself."""

    stages: int
    device: str  #: cuda | cpu | auto
    cpus_per_stage: float
    gpus_per_stage: float

    @property
    def cpus(self) -> float:
        return self.stages * self.cpus_per_stage

    @property
    def gpus(self) -> float:
        return self.stages * self.gpus_per_stage

    def entrypoint(self) -> dict[str, float]:
        """Resources of the entrypoint: a one-stage job computes in it; a pipeline's driver needs none."""
        if self.stages > 1:
            return {}
        out = {"entrypoint_num_cpus": self.cpus_per_stage}
        if self.gpus_per_stage:
            out["entrypoint_num_gpus"] = self.gpus_per_stage
        return out

    def describe(self) -> str:
        per = "stage" if self.stages > 1 else "stage (run in the job's entrypoint)"
        parts = [f"{self.cpus:g} CPU(s) (run.stages {self.stages} x {self.cpus_per_stage:g} per {per}, run.threads)"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU(s) (run.stages {self.stages} x {self.gpus_per_stage:g}, "
                         f"model.device {self.device})")
        return " and ".join(parts)


def job_needs(spec, cluster_gpus: float = 0.0) -> Needs:
    """CPUs and GPUs a job takes: per stage ``run.threads`` CPUs (1 when unset) and one GPU on CUDA.

    ``model.device: auto`` takes a GPU for a one-stage job when the cluster has one (its
    entrypoint then lands on a GPU node); a pipeline's stages decide on the driver's node, so
    submit warns and asks for ``model.device: cuda`` instead.
    """
    device = spec.model.device
    kind = "cuda" if device.startswith("cuda") else device
    gpu = 1.0 if kind == "cuda" or (kind == "auto" and spec.run.stages == 1 and cluster_gpus >= 1) else 0.0
    return Needs(spec.run.stages, kind, float(spec.run.threads or 1), gpu)


def cluster_resources(url: str) -> tuple[dict[str, float], int]:
    """Resources of the cluster's alive nodes, summed (what ``ray.cluster_resources()`` reports)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in (node.resources_total or {}).items():
            total[key] = total.get(key, 0.0) + float(value)
    return total, len(nodes)


def check_resources(needs: Needs, have: dict[str, float], url: str, n_nodes: int) -> None:
    """Raise ``ClusterResourcesError`` naming what the plan needs and what the cluster has."""
    short = [kind for kind, need in (("CPU", needs.cpus), ("GPU", needs.gpus)) if need and have.get(kind, 0) < need]
    if short:
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        raise ClusterResourcesError(
            f"the job needs {needs.describe()}, but the cluster at {url} has {has} (ray.cluster_resources() "
            f"over {n_nodes} alive node(s)); add nodes with {' and '.join(short)}s, lower run.stages or "
            "run.threads (see `harvest plan SPEC`), or pass --no-resource-check if the cluster autoscales")


# --- the store's location --------------------------------------------------------------------------

def store_location(spec) -> Path:
    """Where the job's store will be (inside the store root: ``harvest.spec.confine``)."""
    return spec.store_path()


def check_store_root(root: str | None) -> str | None:
    """Refuse store roots the stage writers cannot write through a path; ``file://`` becomes a path."""
    if root is None:
        return None
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme and "://" in root:
        raise StoreNotWritableError(
            f"store root {root!r} is an object-store URL; the stages write their shards through a filesystem "
            "path that every node of the cluster sees: use a shared filesystem (NFS, EFS, Filestore, Lustre) or "
            "mount the bucket at the same path on every node (gcsfuse; mountpoint-s3 with --allow-overwrite "
            "--allow-delete) and pass that path. Reading a store back from the bucket with zarr/xarray needs "
            f"the fsspec extra for it ({_FSSPEC_EXTRAS.get(parsed.scheme, 'the fsspec implementation')})")
    return root


_FSSPEC_EXTRAS = {"s3": "pip install s3fs", "s3a": "pip install s3fs", "gs": "pip install gcsfs",
                  "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs"}


def check_writable(path: Path) -> None:
    """Create (if needed) and write a probe file where the store goes; raise a clear error if we cannot."""
    target = path if path.is_dir() else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".harvest-write-check-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        user = _user()
        raise StoreNotWritableError(
            f"the job cannot write its store at {path} on node {socket.gethostname()} "
            f"({exc.strerror or type(exc).__name__}: {exc.filename or target}); give --store-url a directory that "
            f"every Ray node can write (a shared filesystem mounted at the same path on every node) and check "
            f"that user {user} may write there") from None


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


# --- progress: from the store and from the job's log -----------------------------------------------

@dataclass(frozen=True)
class StoreProgress:
    status: str | None
    batches_done: int
    n_batches: int
    tokens_done: int
    tokens_total: int


def batch_tokens(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Tokens in each batch: batch k holds sequences [k * batch_size, (k + 1) * batch_size)."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(np.asarray(lengths, dtype=np.int64), np.arange(0, len(lengths), batch_size))


def read_progress(path: str | Path) -> StoreProgress | None:
    """Batches and tokens written, from the store's manifest and row layout (None: not laid out yet)."""
    from harvest.store import ATTRS_KEY, batches_done, open_group

    group = open_group(path)
    info = dict(group.attrs[ATTRS_KEY])
    if info.get("status") == "creating" or "_progress" not in group or "seq_length" not in group:
        return None
    layout = info["layout"]
    per_batch = batch_tokens(group["seq_length"][...], int(layout["batch_size"]))
    done = batches_done(group)
    if len(done) != len(per_batch):
        return None
    return StoreProgress(info.get("status"), int(done.sum()), len(done), int(per_batch[done].sum()),
                         int(per_batch.sum()))


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
            p = read_progress(self.path) if (Path(self.path) / "zarr.json").is_file() else None
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


def job_progress(log_text: str | None, store: str | None) -> Progress | None:
    """Progress of a job: counts from the store when readable from here, else from its log; rate from its log."""
    record = parse_progress(log_text)
    rate = record.get("tokens_per_s") if record else None
    local = None
    if store and (Path(store) / "zarr.json").is_file():
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


# --- the Jobs API ----------------------------------------------------------------------------------

def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise _not_found(client, job_id) from None
        raise ClusterError(f"the cluster could not report job {job_id}: {_first_line(text)}") from None


def _not_found(client, job_id: str) -> JobNotFoundError:
    try:
        known = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    except Exception:  # noqa: BLE001 - the listing is only a hint
        known = []
    from harvest.errors import did_you_mean

    ids = [j.submission_id or j.job_id for j in known if (j.submission_id or j.job_id)]
    recent = ", ".join(ids[-5:]) if ids else "none"
    return JobNotFoundError(f"no job {job_id!r} on this cluster{did_you_mean(job_id, ids)}; recent jobs: {recent} "
                            "(`harvest jobs` lists them)")


def _logs_text(client, job_id: str) -> str:
    try:
        return client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001 - no logs yet (PENDING) or the head lost them
        return ""


def _seconds(ms: int | None) -> float | None:
    return ms / 1000.0 if ms else None


def status_from(info, log_text: str | None, *, with_progress: bool = True) -> JobStatus:
    """A ``JobStatus`` from the Jobs API's ``JobDetails`` and the job's log."""
    meta = info.metadata or {}
    store = meta.get(META_STORE)
    state = str(info.status)
    error = parse_error(log_text) if state == "FAILED" else None
    return JobStatus(
        job_id=info.submission_id or info.job_id or "", state=state, message=info.message or "",
        spec=meta.get(META_SPEC), store=store, stages=int(meta[META_STAGES]) if META_STAGES in meta else None,
        start_time=_seconds(info.start_time), end_time=_seconds(info.end_time), entrypoint=info.entrypoint or "",
        progress=job_progress(log_text, store) if with_progress and META_SPEC in meta else None,
        error=f"{error[0]}: {error[1]}" if error else None, ray_job_id=info.job_id,
        driver_node_id=getattr(info, "driver_node_id", None),
    )


def status(job_id: str, address: str | None = None) -> JobStatus:
    """State and progress of a job (``harvest status JOB``)."""
    client, _ = connect(address)
    info = _job_info(client, job_id)
    return status_from(info, _logs_text(client, job_id))


def wait(job_id: str, address: str | None = None, *, timeout: float | None = None, poll: float = 2.0,
         on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
    """Poll until the job ends (or ``timeout`` seconds pass); returns the last status."""
    client, _ = connect(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status_from(_job_info(client, job_id), _logs_text(client, job_id))
        if on_status is not None:
            on_status(st)
        if st.terminal or (deadline is not None and time.monotonic() >= deadline):
            return st
        time.sleep(poll)


def logs(job_id: str, follow: bool = False, address: str | None = None) -> Iterator[str]:
    """The job's log: all of it at once, or (``follow``) pieces as they come until the job ends."""
    client, _ = connect(address)
    _job_info(client, job_id)
    if not follow:
        return iter([_logs_text(client, job_id)])
    return _tail(client, job_id)


def _tail(client, job_id: str) -> Iterator[str]:
    import asyncio

    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(job_id: str, address: str | None = None, *, wait_s: float = 30.0) -> JobStatus:
    """Stop a job (SIGTERM, then SIGKILL); its store keeps every batch written, and resubmitting resumes it."""
    client, _ = connect(address)
    info = _job_info(client, job_id)
    if str(info.status) not in TERMINAL:
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            info = _job_info(client, job_id)
            if str(info.status) in TERMINAL:
                break
            time.sleep(0.25)
    return status_from(info, _logs_text(client, job_id))


def list_jobs(address: str | None = None, *, all_jobs: bool = False) -> list[JobStatus]:
    """Jobs on the cluster, oldest first: harvest's own (``all_jobs``: every job)."""
    client, _ = connect(address)
    infos = [j for j in client.list_jobs() if all_jobs or META_SPEC in (j.metadata or {})]
    infos.sort(key=lambda j: j.start_time or 0)
    return [status_from(j, None) for j in infos]


# --- submit ----------------------------------------------------------------------------------------

def default_python(url: str) -> str:
    """This interpreter for a cluster on this machine; ``python`` on the nodes' PATH otherwise."""
    return sys.executable if is_local(url) else "python"


def code_modules() -> list[str]:
    """Directories of this project's packages, as ``py_modules`` for the job's runtime environment."""
    import importlib.util

    out = []
    for name in PACKAGES:
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            out.append(str(Path(list(found.submodule_search_locations)[0]).resolve()))
    return out


def build_runtime_env(workdir: str, runtime_env: dict[str, Any] | None, ship_code: bool) -> dict[str, Any]:
    env = dict(runtime_env or {})
    if "working_dir" in env:
        raise SpecError("runtime_env.working_dir is set by harvest submit (it carries the spec); ship your own "
                        "files with py_modules, or put them on a filesystem the cluster mounts")
    env["working_dir"] = workdir
    if ship_code:
        env["py_modules"] = [*code_modules(), *env.get("py_modules", [])]
    env["excludes"] = [*EXCLUDES, *env.get("excludes", [])]
    env["env_vars"] = {"TOKENIZERS_PARALLELISM": "false", **env.get("env_vars", {})}
    return env


def entrypoint(python: str, *, base_dir: Path, store_root: str, resume: bool, overwrite: bool,
               progress_every: float) -> str:
    args = [python, "-m", "jobs.submit", SPEC_FILE, "--base-dir", str(base_dir), "--store-root", store_root,
            "--resume" if resume else "--no-resume", "--progress-every", f"{progress_every:g}"]
    if overwrite:
        args.append("--overwrite")
    return " ".join(shlex.quote(a) for a in args)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "job"


def submit(spec_path: str | Path, address: str | None = None, *, resume: bool = True, overwrite: bool = False,
           store_url: str | None = None, runtime_env: dict[str, Any] | None = None, python: str | None = None,
           ship_code: bool = True, check_cluster: bool = True, wait_s: float = 60.0, base_dir: str | Path | None = None,
           progress_every: float = 10.0, dry_run: bool = False) -> SubmittedJob:
    """Submit a harvest job to the Ray cluster at ``address`` (or $RAY_ADDRESS); see the module doc.

    ``store_url``: the store root on the cluster (a path every node sees; replaces the spec's
    ``store.root``). ``resume`` (default) continues a store that already has progress when its
    fingerprint matches; ``overwrite`` replaces it. ``wait_s``: how long to wait for the job to
    check its store, so that an unwritable store or a broken environment fails here (0: return at
    once). ``dry_run``: validate and build the submission, contact nothing.
    """
    from harvest.spec import load_spec

    if resume and overwrite:
        raise SpecError("resume and overwrite exclude each other; pick one")
    base = Path(base_dir or os.getcwd()).resolve()
    spec = load_spec(spec_path, base_dir=base, store_root=check_store_root(store_url))
    root = check_store_root(spec.store.root)
    if root != spec.store.root:  # a file:// URL in the spec
        spec = load_spec(spec_path, base_dir=base, store_root=root)
    store = store_location(spec)
    warnings = []
    unchecked = check_locally(spec)  # a typo is an error here, not a job that fails on the cluster
    if unchecked:
        warnings.append(unchecked)
    if spec.model.device == "auto" and spec.run.stages > 1:
        warnings.append("model.device is 'auto': a pipeline's stages take GPUs only when the node running its "
                        "driver has one; set model.device: cuda to put every stage on a GPU")
    given = address or os.environ.get("RAY_ADDRESS")
    url = dashboard_url(given) if given else ""
    client = None
    needs = job_needs(spec)
    if not dry_run:
        client, url = connect(address)
        check_no_other_writer(client, str(store))
        if check_cluster:
            try:
                have, n_nodes = cluster_resources(url)
            except Exception as exc:  # noqa: BLE001 - an old dashboard without the state API
                warnings.append(f"could not read the cluster's resources ({_first_line(str(exc))}); not checked")
            else:
                needs = job_needs(spec, have.get("GPU", 0.0))
                check_resources(needs, have, url, n_nodes)
    py = python or os.environ.get("HARVEST_CLUSTER_PYTHON") or default_python(url or "http://127.0.0.1")
    command = entrypoint(py, base_dir=base, store_root=str(spec.resolve(root)), resume=resume, overwrite=overwrite,
                         progress_every=progress_every)
    resumes_from = None
    if resume and (store / "zarr.json").is_file():
        try:
            p = read_progress(store)
        except HarvestError:
            p = None
        if p is not None and p.batches_done:
            resumes_from = Progress(p.batches_done, p.n_batches, p.tokens_done, p.tokens_total)
    workdir = tempfile.mkdtemp(prefix="harvest-submit-")
    try:
        shutil.copyfile(spec_path, Path(workdir) / SPEC_FILE)
        env = build_runtime_env(workdir, runtime_env, ship_code)
        job_id = f"harvest-{_slug(spec.name)}-{uuid.uuid4().hex[:8]}"
        if dry_run:
            return SubmittedJob(job_id, url, str(store), command, "DRY-RUN", env, tuple(warnings), resumes_from)
        client.submit_job(
            entrypoint=command, submission_id=job_id, runtime_env=env,
            metadata={META_SPEC: spec.name, META_STORE: str(store), META_STAGES: str(spec.run.stages)},
            **needs.entrypoint(),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    state = _await_start(client, job_id, wait_s, py, ship_code) if wait_s > 0 else "PENDING"
    return SubmittedJob(job_id, url, str(store), command, state, env, tuple(warnings), resumes_from)


def check_locally(spec) -> str | None:
    """Check hooks, layers, heads, neurons and stages against the model's config.json before submitting.

    Needs only the config (as ``harvest plan``); when the model is not readable from here (a path
    that exists only on the cluster, a hub name), returns a warning and the job checks it itself.
    """
    from harvest.runner import check_selection
    from sharding.plan import _hooks, build_plan, estimate_workload, planning_checkpoint

    if not (spec.resolve(spec.model.path) / "config.json").is_file():
        return (f"model {spec.model.path} has no config.json here; its hooks and stages are checked when the job "
                "starts on the cluster")
    ckpt = planning_checkpoint(spec)
    check_selection(spec, ckpt)
    build_plan(ckpt, _hooks(spec, ckpt), spec, estimate_workload(spec, "checked before submitting"))
    return None


def check_no_other_writer(client, store: str) -> None:
    """Refuse a second job on a store that an unfinished job writes: their writers would share shards."""
    for other in client.list_jobs():
        if (other.metadata or {}).get(META_STORE) == store and str(other.status) not in TERMINAL:
            job = other.submission_id or other.job_id
            raise ClusterError(
                f"job {job} ({other.status}) is writing {store} already; two jobs writing one store would lose "
                f"rows. Wait for it (`harvest status {job} --watch`) or stop it (`harvest stop {job}`), then "
                "submit again: the store resumes where it stopped")


def _await_start(client, job_id: str, wait_s: float, python: str, ship_code: bool) -> str:
    """Wait until the job has checked its store (or ended, or ``wait_s`` passed); raise its early failure."""
    deadline = time.monotonic() + wait_s
    while True:
        info = _job_info(client, job_id)
        state = str(info.status)
        text = _logs_text(client, job_id) if state != "PENDING" else ""
        if state == "FAILED":
            raise _early_failure(job_id, text, info.message or "", python, ship_code)
        if state in TERMINAL or READY_TAG in text or time.monotonic() >= deadline:
            return state
        time.sleep(0.5)


def _early_failure(job_id: str, log_text: str, message: str, python: str, ship_code: bool) -> HarvestError:
    import harvest.errors as errors

    found = parse_error(log_text)
    where = f" (job {job_id} failed; `harvest logs {job_id}` shows its log)"
    if found is not None:
        cls = getattr(errors, found[0], None)
        if isinstance(cls, type) and issubclass(cls, HarvestError):
            return cls(found[1] + where)
        return ClusterError(f"{found[0]}: {found[1]}{where}")
    tail = "; ".join(line for line in (log_text or message).strip().splitlines()[-3:])
    hint = ""
    if "No module named" in tail or "not found" in tail:
        hint = (f" The job's interpreter ({python}) lacks what harvest needs: pass --python with the cluster's "
                "Python that has torch, transformers, zarr and ray"
                + (", or install harvest in the cluster's image" if not ship_code else "") + ".")
    return ClusterError(f"job {job_id} failed before it started harvesting: {tail[-800:]}.{hint}"
                        f" `harvest logs {job_id}` shows its log")


# --- formatting ------------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
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
        out += f", ETA {_duration(eta)}" if eta is not None else ", ETA unknown (no rate yet)"
    return out + (f"  [from the {p.source}]" if p.source != "store" else "")


def format_status(st: JobStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    head = f"job       {st.job_id}  {st.state}"
    if st.spec:
        head += f"  (spec {st.spec}, {st.stages or 1} stage{'s' if (st.stages or 1) > 1 else ''})"
    lines = [head]
    if st.store:
        lines.append(f"store     {st.store}")
    if st.spec:
        lines.append(f"progress  {format_progress(st.progress)}")
    if st.start_time:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.start_time))
        took = (st.end_time or now) - st.start_time
        lines.append(f"started   {started}, {'ran' if st.end_time else 'running'} for {_duration(took)}")
    if st.error:
        lines.append(f"error     {st.error}")
    elif st.message and st.state != "RUNNING":
        lines.append(f"message   {_first_line(st.message)}")
    return "\n".join(lines)


def format_jobs(jobs: list[JobStatus]) -> str:
    if not jobs:
        return "no harvest jobs on this cluster (`harvest jobs --all` lists every job)"
    rows = [("JOB", "STATE", "SPEC", "PROGRESS", "STARTED", "STORE")]
    for j in jobs:
        prog = f"{j.progress.batches_done}/{j.progress.n_batches}" if j.progress else "-"
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(j.start_time)) if j.start_time else "-"
        rows.append((j.job_id, j.state, j.spec or "-", prog, started, j.store or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


# --- inside the job: ``python -m jobs.submit spec.yaml ...`` -----------------------------------------

def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(signum)


def run_job(spec_file: str, *, base_dir: str, store_root: str | None, resume: bool, overwrite: bool,
            progress_every: float) -> int:
    """What a submitted job runs: check the store location, harvest, report progress to the log."""
    import harvest
    from harvest.runner import run
    from harvest.spec import load_spec

    spec = load_spec(spec_file, base_dir=base_dir, store_root=store_root)
    path = store_location(spec)
    check_writable(path)
    print(f"{READY_TAG} " + json.dumps({"store": str(path), "node": socket.gethostname(), "python": sys.executable,
                                        "harvest": str(Path(harvest.__file__).parent), "resume": resume}), flush=True)
    monitor = ProgressMonitor(path, progress_every, replaced=overwrite)
    monitor.start()
    result = None
    try:
        result = run(spec, resume=resume, overwrite=overwrite, progress=False)
    finally:
        monitor.finish(result.tokens_per_second if result is not None else None)
    print(f"[harvest] harvested {result.tokens} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_second:,.0f} tokens/s) into {result.path}", flush=True)
    for name, count in result.nonfinite.items():
        print(f"[harvest] warning: {count} non-finite values stored in {name} (on_nonfinite: flag)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.submit",
                                     description="Run a harvest job inside a Ray job (`harvest submit` starts it).")
    parser.add_argument("spec")
    parser.add_argument("--base-dir", default=".")
    parser.add_argument("--store-root", default=None)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--progress-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `harvest stop` (Ray sends SIGTERM) ends like Ctrl-C: the run writes what it computed, then we exit 143
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return run_job(args.spec, base_dir=args.base_dir, store_root=args.store_root, resume=args.resume,
                       overwrite=args.overwrite, progress_every=args.progress_every)
    except HarvestError as exc:
        print(f"{ERROR_TAG} {type(exc).__name__}: {exc}", flush=True)
        return 2
    except Interrupted as exc:
        print(f"[harvest] stopped: {exc.message('submitting the same spec again')}", flush=True)
        return exc.exit_code
    except SystemExit as exc:
        # a handler that ray.init installed (should ours not be back in place) exits with the signal number
        if exc.code not in (signal.SIGTERM, -signal.SIGTERM):
            raise
        print("[harvest] stopped: the store keeps every batch written so far; submitting the spec again "
              "resumes it", flush=True)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
