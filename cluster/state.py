"""A job's state on the cluster through the Jobs API: status, wait, logs, stop, the list; their text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from harvest.errors import ClusterError, HarvestError, JobNotFoundError, did_you_mean
from harvest.objstore import configure, is_url

from .connection import connect, first_line
from .progress import Progress, duration, format_progress, job_progress
from .protocol import parse_error, rebuild_error

#: job metadata keys (``ray job list`` shows them too)
META_SPEC, META_STORE, META_STAGES = "harvest.spec", "harvest.store", "harvest.stages"
#: the store's store.storage_options (endpoint, region; never credentials), JSON: status reads a bucket from here
META_STORAGE = "harvest.storage_options"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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



    def exception(self) -> HarvestError | None:
        """The job's own error, as its class with its message (None: it did not report one)."""
        if self.error is None:
            return None
        name, _, message = self.error.partition(": ")
        return rebuild_error(name, message)


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise _not_found(client, job_id) from None
        raise ClusterError(f"the cluster could not report job {job_id}: {first_line(text)}") from None


def _not_found(client, job_id: str) -> JobNotFoundError:
    try:
        known = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    except Exception:  # noqa: BLE001 - the listing is only a hint
        known = []
    ids = [j.submission_id or j.job_id for j in known if (j.submission_id or j.job_id)]
    recent = ", ".join(ids[-5:]) if ids else "none"
    return JobNotFoundError(f"no job {job_id!r} on this cluster{did_you_mean(job_id, ids)}; recent jobs: {recent} "
                            "(`harvest jobs` lists them)")


def logs_text(client, job_id: str) -> str:
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
    if store and is_url(store) and META_STORAGE in meta:
        configure(store, json.loads(meta[META_STORAGE]))
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
    info = job_info(client, job_id)
    return status_from(info, logs_text(client, job_id))


def wait(job_id: str, address: str | None = None, *, timeout: float | None = None, poll: float = 2.0,
         on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
    """Poll until the job ends (or ``timeout`` seconds pass); returns the last status."""
    client, _ = connect(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status_from(job_info(client, job_id), logs_text(client, job_id))
        if on_status is not None:
            on_status(st)
        if st.terminal or (deadline is not None and time.monotonic() >= deadline):
            return st
        time.sleep(poll)


def logs(job_id: str, follow: bool = False, address: str | None = None) -> Iterator[str]:
    """The job's log: all of it at once, or (``follow``) pieces as they come until the job ends."""
    client, _ = connect(address)
    job_info(client, job_id)
    if not follow:
        return iter([logs_text(client, job_id)])
    return _tail(client, job_id)


def _tail(client, job_id: str) -> Iterator[str]:
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
    info = job_info(client, job_id)
    if str(info.status) not in TERMINAL:
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            info = job_info(client, job_id)
            if str(info.status) in TERMINAL:
                break
            time.sleep(0.25)
    return status_from(info, logs_text(client, job_id))


def list_jobs(address: str | None = None, *, all_jobs: bool = False) -> list[JobStatus]:
    """Jobs on the cluster, oldest first: harvest's own (``all_jobs``: every job)."""
    client, _ = connect(address)
    infos = [j for j in client.list_jobs() if all_jobs or META_SPEC in (j.metadata or {})]
    infos.sort(key=lambda j: j.start_time or 0)
    return [status_from(j, None) for j in infos]



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
        lines.append(f"started   {started}, {'ran' if st.end_time else 'running'} for {duration(took)}")
    if st.error:
        lines.append(f"error     {st.error}")
    elif st.message and st.state != "RUNNING":
        lines.append(f"message   {first_line(st.message)}")
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


