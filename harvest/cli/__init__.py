"""The ``harvest`` command: argument parsing over library calls, one-line errors.

Every command maps to a library function (``harvest.run``, ``harvest.summary.summarize`` ...);
nothing here computes anything itself. This package is the top layer: the only code that imports
every other layer (the core, ``sharding``, the runner, ``analysis``, ``cluster``, ``organisms``).
The commands of the analyses and of the cluster live beside their libraries (``analysis.cli``,
``cluster.cli``) and are put together here. Library modules that import torch, transformers or Ray
are imported inside the command that needs them, so that ``harvest --help`` starts fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from analysis.cli import analyze_app, index_command, query_app
from cluster.cli import register as register_jobs

from ..errors import HarvestError, Interrupted
from ..spec import load_spec
from ..summary import format_summary, human, summarize
from ..verify import is_checksum_error, verify_store

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Harvest GPT-J / GPT-NeoX activations into Zarr stores, then analyse them.\n\n"
         "Quick start: `harvest demo` builds a small model locally and runs every step end to end.",
)

StoreRoot = typer.Option(None, "--store-root", help="Directory the spec's store.path is confined to "
                         "(default: the spec's store.root, else ./stores).")


@app.command()
def run(
    spec: Path = typer.Argument(..., help="YAML job spec, e.g. jobs/demo.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted job in its existing store."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at the same path."),
    store_root: Optional[str] = StoreRoot,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and plan; write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    redo_rows: Optional[str] = typer.Option(None, "--redo-rows", help="With --resume: re-harvest the batches "
                                            "covering these token rows (A:B[,C:D]), rewriting their shards; "
                                            "the repair `harvest verify` prints."),
) -> None:
    """Harvest the activations a job spec asks for into its Zarr store.

    \b
    Examples:
      harvest run jobs/demo.yaml
      harvest run jobs/demo.yaml --resume      # after a crash: ends byte-identical
      harvest run my.yaml --dry-run            # check the spec, hooks and rows first
      harvest run jobs/demo.yaml --resume --redo-rows 0:512   # repair what `harvest verify` names
    """
    from ..runner import prepare
    from ..runner import run as run_job

    job_spec = load_spec(spec, store_root=store_root)
    if dry_run:
        job = prepare(job_spec)
        typer.echo(f"{len(job.hooks)} hook points, {job.layout.n_rows} rows from {job.layout.n_sequences} "
                   f"sequences in {job.layout.n_batches} batches -> {job.path}")
        per_row = sum(a.row_bytes for a in job.arrays if a.point.axis == "token")
        typer.echo(f"about {human(per_row)} per captured token, {human(per_row * job.layout.n_rows)} in all")
        return
    if resume and overwrite:
        raise HarvestError("--resume and --overwrite exclude each other; pick one")
    try:
        result = run_job(job_spec, resume=resume, overwrite=overwrite, progress=not quiet, redo_rows=redo_rows)
    except Interrupted as exc:
        root = f" --store-root {store_root}" if store_root else ""
        exc.resume_command = f"harvest run {spec}{root} --resume"
        raise
    typer.echo(f"harvested {result.tokens} tokens in {result.seconds:.1f} s "
               f"({result.tokens_per_second:,.0f} tokens/s) into {result.path}")
    for name, count in result.nonfinite.items():
        typer.echo(f"warning: {count} non-finite values stored in {name} (on_nonfinite: flag)", err=True)
    if not quiet:
        typer.echo(format_summary(summarize(result.path), max_arrays=12))


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="YAML job spec, e.g. jobs/neox-20b-resid.yaml."),
    store_root: Optional[str] = StoreRoot,
    tokens_per_second: Optional[float] = typer.Option(
        None, "--tokens-per-second", min=0.001, help="One replica's forward tokens/s, if known (replaces the matmul probe)."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Measure nothing: no matmul probe, no write probe."),
) -> None:
    """Stages, memory per stage, store size and file layout of a job, without loading any weights.

    \b
    Needs only the model's config.json (no weights, no tokenizer: then rows are estimated).
    Expected tokens/s come from a short matmul probe of the plan's device (or --tokens-per-second);
    the store target's write speed from writing 128 MiB under its root (a temporary file, deleted).
    Exits with status 2 and the shortfall when a stage does not fit its memory, or what this machine
    lacks when the job would run here and it cannot place its actors.
    Examples:
      harvest plan jobs/neox-20b-resid.yaml
      harvest plan jobs/gptj-6b-resid.yaml --tokens-per-second 40000
      harvest plan jobs/demo.yaml --no-probe
    """
    from sharding.plan import format_plan, plan_job

    job_plan = plan_job(load_spec(spec, store_root=store_root), probe=not no_probe, tokens_per_second=tokens_per_second)
    typer.echo(format_plan(job_plan))
    job_plan.check()


@app.command()
def inspect(
    store: Path = typer.Argument(..., help="Path of a harvest store (a .zarr directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every chunk's checksum (as `harvest verify`); "
                                "exit 1 when damaged."),
) -> None:
    """Arrays, shapes, chunking, bytes on disk, progress and provenance of a store."""
    summary = summarize(store)
    if not verify:
        typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))
        return
    report = verify_store(store, progress=not as_json)
    summary["verify"] = report.to_dict()
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json
               else format_summary(summary) + "\n\n" + report.format())
    if not report.ok:
        raise SystemExit(1)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("build/demo"), help="Where the demo model, corpus and store go."),
) -> None:
    """Build a small GPT-NeoX model and corpus locally, harvest it, and show every step."""
    from .demo import main as run_demo

    run_demo(workdir)


def verify_command(
    store: Path = typer.Argument(..., help="Path of a harvest store (a .zarr directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Files read in parallel (default: 2 per core, "
                                          "up to 8)."),
) -> None:
    """Read every chunk of every array and check its crc32c and each shard index; name each damaged
    chunk with its token rows and batches, and the repair. Exit 0 when intact, 1 when damaged.

    \b
    Examples:
      harvest verify stores/demo.zarr
      harvest run jobs/demo.yaml --resume --redo-rows 0:512   # the repair it prints
    """
    report = verify_store(store, workers=workers, progress=not as_json)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if not report.ok:
        raise SystemExit(1)


app.command("verify")(verify_command)

# analyses over a store (analysis.cli) and jobs on a Ray cluster (cluster.cli)
app.add_typer(analyze_app, name="analyze")
app.add_typer(query_app, name="query")
app.command("index")(index_command)
register_jobs(app)


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(signum)


def catch_signals() -> None:
    """SIGINT and SIGTERM raise ``Interrupted``: the run flushes what it computed, then ``main`` exits 128 + N.

    Not ``KeyboardInterrupt``: typer turns that into an exit code it *returns* (0 to a shell that
    ignores it), and libraries catch it in places; an exception of our own reaches ``main``.
    """
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


def main() -> None:
    """The console script: every error a user can cause ends as one line on stderr and a non-zero exit."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    catch_signals()
    try:
        code = app(standalone_mode=False, prog_name="harvest")
    except Interrupted as exc:
        typer.echo(f"error: {exc.message(getattr(exc, 'resume_command', None))}", err=True)
        sys.exit(exc.exit_code)
    except HarvestError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the store keeps every batch written so far (continue with --resume)", err=True)
        sys.exit(130)
    except ValueError as exc:  # zarr's bare crc32c error from a read outside the analyses' arrays
        if not is_checksum_error(exc):
            raise
        typer.echo("error: a stored chunk failed its crc32c check: the store is damaged; `harvest verify STORE` "
                   "names each damaged chunk and its repair", err=True)
        sys.exit(2)
    except Exception as exc:  # usage errors: typer's vendored click or click itself
        usage = _usage_error(exc)
        if usage is None:
            raise
        typer.echo(usage[0], err=True)
        sys.exit(usage[1])
    if isinstance(code, int) and code:  # typer returns, not raises, some exits under standalone_mode=False
        sys.exit(code)


def _usage_error(exc: Exception) -> tuple[str, int] | None:
    """(one line, exit code) for a command-line usage error, else None; never typer's traceback panel."""
    import click
    from typer.exceptions import TyperException

    if not isinstance(exc, (click.ClickException, TyperException)) or not hasattr(exc, "format_message"):
        return None
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "harvest"
    return f"error: {message} (see `{where} --help`)", getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    main()
