"""The ``harvest`` command: argument parsing over library calls, one-line errors.

Every command maps to a library function (``harvest.run``, ``harvest.inspect.summarize`` ...);
nothing here computes anything itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import HarvestError, Interrupted

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
) -> None:
    """Harvest the activations a job spec asks for into its Zarr store.

    \b
    Examples:
      harvest run jobs/demo.yaml
      harvest run jobs/demo.yaml --resume      # after a crash: ends byte-identical
      harvest run my.yaml --dry-run            # check the spec, hooks and rows first
    """
    from . import load_spec
    from .inspect import format_summary, human, summarize
    from .runner import prepare
    from .runner import run as run_job

    job_spec = load_spec(spec, store_root=store_root)
    if dry_run:
        job = prepare(job_spec)
        typer.echo(f"{len(job.hooks)} hook points, {job.layout.n_rows} rows from {job.layout.n_sequences} "
                   f"sequences in {job.layout.n_batches} batches -> {job.path}")
        per_row = sum(_row_bytes(job, p) for p in job.hooks if p.axis == "token")
        typer.echo(f"about {human(per_row)} per captured token, {human(per_row * job.layout.n_rows)} in all")
        return
    if resume and overwrite:
        raise HarvestError("--resume and --overwrite exclude each other; pick one")
    try:
        result = run_job(job_spec, resume=resume, overwrite=overwrite, progress=not quiet)
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


def _row_bytes(job, point) -> int:
    import numpy as np

    return int(np.prod(job.array_shape(point)[1:])) * np.dtype(job.store_dtype).itemsize


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="YAML job spec, e.g. jobs/neox-20b-resid.yaml."),
    store_root: Optional[str] = StoreRoot,
) -> None:
    """Stages, memory per stage, store size and file layout of a job, without loading any weights.

    \b
    Needs only the model's config.json (no weights, no tokenizer: then rows are estimated).
    Exits with status 2 and the shortfall when a stage does not fit its memory.
    Examples:
      harvest plan jobs/neox-20b-resid.yaml
      harvest plan jobs/gptj-6b-resid.yaml
    """
    from sharding.plan import format_plan, plan_job

    from . import load_spec

    job_plan = plan_job(load_spec(spec, store_root=store_root))
    typer.echo(format_plan(job_plan))
    job_plan.check()


@app.command()
def inspect(
    store: Path = typer.Argument(..., help="Path of a harvest store (a .zarr directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Arrays, shapes, chunking, bytes on disk, progress and provenance of a store."""
    from .inspect import format_summary, summarize

    summary = summarize(store)
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("build/demo"), help="Where the demo model, corpus and store go."),
) -> None:
    """Build a small GPT-NeoX model and corpus locally, harvest it, and show every step."""
    from .demo import main as run_demo

    run_demo(workdir)


# issue 4: analyses over a store (analysis/cli.py)
from analysis.cli import analyze_app, index_command, query_app  # noqa: E402

app.add_typer(analyze_app, name="analyze")
app.add_typer(query_app, name="query")
app.command("index")(index_command)
from analysis.cli_circuits import register as register_circuits  # noqa: E402  (issue 6)
register_circuits(analyze_app)

# issue 5: jobs on a Ray cluster (jobs/cli.py)
from jobs.cli import register as register_jobs  # noqa: E402

register_jobs(app)


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(signum)


def catch_signals() -> None:
    """SIGINT and SIGTERM raise ``Interrupted``: the run flushes what it computed, then ``main`` exits 128 + N.

    Not ``KeyboardInterrupt``: typer turns that into an exit code it *returns* (0 to a shell that
    ignores it), and libraries catch it in places; an exception of our own reaches ``main``.
    """
    import signal

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
