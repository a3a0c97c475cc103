"""``harvest submit / status / logs / stop / jobs``: argument parsing over the ``cluster`` library.

``register(app)`` adds the commands to the ``harvest`` Typer app. The ``cluster`` library (and Ray
with it) is imported inside each command, so ``harvest --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from harvest.errors import SpecError

Address = typer.Option(None, "--address", "-a", metavar="URL",
                       help="The Ray dashboard (Jobs API) of the cluster, e.g. http://127.0.0.1:8265. "
                            "Default: $RAY_ADDRESS.")
JobId = typer.Argument(..., metavar="JOB", help="The job id `harvest submit` printed (or any Ray job id).")


def submit(
    spec: Path = typer.Argument(..., help="YAML job spec, e.g. jobs/gptj-6b-outliers.yaml."),
    address: Optional[str] = Address,
    store_url: Optional[str] = typer.Option(
        None, "--store-url", help="Store root on the cluster: a directory every node mounts at the same path "
                                  "(replaces the spec's store.root; store.path stays inside it)."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue a store that already has progress when its fingerprint matches "
                                     "(default); --no-resume refuses an existing store."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store (implies --no-resume)."),
    python: Optional[str] = typer.Option(
        None, "--python", help="The cluster's Python to run the job with (default: this interpreter for a cluster "
                               "on this machine, else `python`; or $HARVEST_CLUSTER_PYTHON)."),
    installed: bool = typer.Option(False, "--installed",
                                   help="The cluster's image has harvest installed: do not ship this machine's code."),
    runtime_env: Optional[Path] = typer.Option(
        None, "--runtime-env", help="YAML or JSON file with more runtime environment (env_vars, pip, ...)."),
    resource_check: bool = typer.Option(True, "--resource-check/--no-resource-check",
                                        help="Refuse a cluster with fewer CPUs/GPUs than the stages need "
                                             "(turn off for autoscaling clusters)."),
    wait_s: float = typer.Option(60.0, "--wait", metavar="SECONDS",
                                 help="Wait this long for the job to check its store, so early failures show here "
                                      "(0: return at once)."),
    progress_every: float = typer.Option(10.0, "--progress-every", metavar="SECONDS",
                                         help="How often the job writes progress to its log."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the submission; contact nothing."),
) -> None:
    """Submit a harvest job to a Ray cluster; prints the job id and the store.

    \b
    Examples:
      harvest submit jobs/gptj-6b-outliers.yaml --address http://127.0.0.1:8265 --store-url /mnt/shared/stores
      RAY_ADDRESS=http://127.0.0.1:8265 harvest submit jobs/demo.yaml
      harvest submit my.yaml --installed --python /home/ray/anaconda3/bin/python
    Then: harvest status JOB --watch, harvest logs JOB --follow, harvest stop JOB.
    A job stopped or crashed midway resumes when the same spec is submitted again.
    """
    from .submission import submit as submit_job

    _quiet_ray()
    env = _read_runtime_env(runtime_env) if runtime_env else None
    job = submit_job(spec, address, resume=resume and not overwrite, overwrite=overwrite, store_url=store_url,
                     runtime_env=env, python=python, ship_code=not installed, check_cluster=resource_check,
                     wait_s=wait_s, progress_every=progress_every, dry_run=dry_run)
    for warning in job.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if dry_run:
        typer.echo(f"would submit {job.job_id} to {job.address or '$RAY_ADDRESS'}")
        typer.echo(f"entrypoint  {job.entrypoint}")
        typer.echo(f"runtime env {json.dumps(job.runtime_env)}")
        typer.echo(f"store       {job.store}")
        return
    typer.echo(f"job      {job.job_id}  ({job.state} at {job.address})")
    typer.echo(f"store    {job.store}")
    if job.resumes_from is not None:
        p = job.resumes_from
        typer.echo(f"resumes  {p.batches_done}/{p.n_batches} batches are already in the store "
                   "(continued when its fingerprint matches)")
    typer.echo(f"follow   harvest status {job.job_id} --watch   |   harvest logs {job.job_id} --follow")


def _quiet_ray() -> None:
    """Ray's job client logs "Uploading package ..." and "WebSocket closed ..." at INFO: not for users."""
    import ray.dashboard.modules.dashboard_sdk  # noqa: F401 - it sets its logger to INFO when imported
    import ray.dashboard.modules.job.sdk  # noqa: F401

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _read_runtime_env(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"no runtime environment file at {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping (env_vars, pip, py_modules ...), got {type(data).__name__}")
    return data


def status(
    job_id: str = JobId,
    address: Optional[str] = Address,
    watch: bool = typer.Option(False, "--watch", "-w", help="Print the status every few seconds until the job ends; "
                                                           "exit 0 only if it SUCCEEDED."),
    every: float = typer.Option(5.0, "--every", metavar="SECONDS", help="Seconds between updates with --watch."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """State and progress of a job: batches and tokens done of total, tokens/s, ETA.

    \b
    Progress comes from the job's log and, when the store is reachable from here, from the
    store's progress manifest.
    Examples:
      harvest status harvest-gptj-6b-outliers-1a2b3c4d
      harvest status harvest-gptj-6b-outliers-1a2b3c4d --watch
    """
    from .state import format_status, status as job_status, wait

    if not watch:
        st = job_status(job_id, address)
        typer.echo(_as_json(st) if as_json else format_status(st))
        return
    final = wait(job_id, address, poll=every,
                 on_status=lambda st: typer.echo((_as_json(st) if as_json else format_status(st)) + "\n"))
    if final.state != "SUCCEEDED":
        sys.exit(1)


def _as_json(st) -> str:
    out = dataclasses.asdict(st)
    if st.progress is not None:
        out["progress"]["eta_s"] = st.progress.eta_s
    return json.dumps(out, default=str)


def logs(
    job_id: str = JobId,
    address: Optional[str] = Address,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """The log of a job (stdout and stderr of the harvest run and of its stage actors)."""
    from .state import logs as job_logs

    _quiet_ray()
    for chunk in job_logs(job_id, follow=follow, address=address):
        typer.echo(chunk, nl=False)


def stop(
    job_id: str = JobId,
    address: Optional[str] = Address,
) -> None:
    """Stop a job. Its store keeps every batch written; submitting the same spec again resumes it."""
    from .state import format_status, stop as stop_job

    st = stop_job(job_id, address)
    typer.echo(format_status(st))


def jobs(
    address: Optional[str] = Address,
    all_jobs: bool = typer.Option(False, "--all", help="Every job on the cluster, not only harvest's."),
) -> None:
    """The cluster's harvest jobs, oldest first."""
    from .state import format_jobs, list_jobs

    typer.echo(format_jobs(list_jobs(address, all_jobs=all_jobs)))


def register(app: typer.Typer) -> None:
    """Add submit, status, logs, stop and jobs to the ``harvest`` app."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("stop")(stop)
    app.command("jobs")(jobs)
