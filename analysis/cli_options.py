"""The options every ``harvest analyze`` / ``index`` / ``query`` command shares, declared once so that
a flag is spelled, typed and explained the same on each command (as in ``huggingface_hub/cli``).

Meaning of the write-related flags, the same on every command that writes:

- ``--dry-run``: check the store(s) and the scheduler, say what would be read, computed and written;
  compute nothing, write nothing (what ``--dry-run`` means for zarr's and the Hub's CLIs);
- ``--no-write``: compute and print the results; write nothing into the store;
- ``--no-plots``: save no PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from harvest.objstore import normalize


def _store_location(value: str | None) -> str | Path | None:
    """A path as a ``Path``, a URL kept whole (as a ``Path``, ``s3://b/x`` would become ``s3:/b/x``)."""
    return None if value is None else normalize(value)


Store = Annotated[str, typer.Argument(metavar="STORE", help="Path of a harvest store (a .zarr directory), or its URL "
                                      "(s3://bucket/prefix/job.zarr, gs://…).", show_default=False,
                                      callback=_store_location)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Scheduler = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Where the Dask graph runs: 'threads' in this process (default), 'sync' (one thread), "
                        "or a dask.distributed scheduler address (tcp://host:8786).")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", help="Threads for the threaded scheduler (default: one per core).")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Check the store and say what would be read, computed and written; compute and write nothing.")]
NoWrite = Annotated[bool, typer.Option("--no-write", help="Compute and print; write nothing into the store.")]
NoPlots = Annotated[bool, typer.Option("--no-plots", help="Save no PNG plots.")]
Hook = Annotated[Optional[str], typer.Option(
    "--hook", help="Hook point, in any form capture.hooks takes: a short name (resid_post, ln1, post), a "
                   "template (hook_resid_post) or a pattern (blocks.3.hook_resid_post, blocks.{0..3}.resid_post).")]
TopK = Annotated[int, typer.Option("--top-k", help="Top rows by |x| kept per dimension in the index.")]
BlockMiB = Annotated[float, typer.Option("--block-mib", help="Stored MiB read per task (whole zarr chunks).")]
