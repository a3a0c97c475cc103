"""``harvest analyze outliers``, ``harvest index`` and ``harvest query dim``: argument parsing over
:mod:`analysis.outliers`, :mod:`analysis.index` and :mod:`analysis.query`; nothing computed here.

Registered in ``harvest/cli.py``::

    from analysis.cli import analyze_app, index_command, query_app
    app.add_typer(analyze_app, name="analyze"); app.add_typer(query_app, name="query")
    app.command("index")(index_command)

More analyses add their commands to ``analyze_app``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

analyze_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Offline analyses over a harvest store: Dask arrays, read chunk by chunk, out of core.",
)
query_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Look closely at one feature, from the store's per-dimension index (fast on any store size).",
)

StoreArg = typer.Argument(..., help="Path of a harvest store (a .zarr directory).")
Scheduler = typer.Option(None, "--scheduler", help="A dask.distributed scheduler address (tcp://host:8786); "
                         "default: threads in this process. 'sync' runs single-threaded.")
Workers = typer.Option(None, "--workers", help="Threads for the default scheduler (default: one per core).")
BlockMiB = typer.Option(8.0, "--block-mib", help="Stored MiB read per task (whole zarr chunks).")
TopK = typer.Option(32, "--top-k", help="Top rows by |x| kept per dimension in the index.")
AsJson = typer.Option(False, "--json", help="Print the result as JSON.")


@analyze_app.command("outliers")
def outliers_command(
    store: Path = StoreArg,
    magnitude: float = typer.Option(6.0, "--magnitude", help="Dettmers' α: an outlier value has |x| >= this."),
    layer_frac: float = typer.Option(0.25, "--layer-frac", help="... in at least this fraction of layers."),
    pos_frac: float = typer.Option(0.06, "--pos-frac", help="... at at least this fraction of sequence positions."),
    aggregate: str = typer.Option("sequence", "--aggregate",
                                  help="'sequence': fractions per sequence, then the mean over sequences; "
                                       "'corpus': over all rows at once."),
    massive_abs: float = typer.Option(100.0, "--massive-abs", help="Massive activations: |x| > this ..."),
    massive_ratio: float = typer.Option(1000.0, "--massive-ratio", help="... and >= this x the token's median |x|."),
    top_k: int = TopK,
    no_index: bool = typer.Option(False, "--no-index", help="Skip building the per-dimension index in this pass."),
    stored_only: bool = typer.Option(False, "--stored-only", help="Only stored ln*.hook_normalized arrays; "
                                     "never apply LayerNorm to a residual."),
    scheduler: Optional[str] = Scheduler,
    workers: Optional[int] = Workers,
    block_mib: float = BlockMiB,
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for the PNG plots (default: STORE.plots "
                                         "beside the store, e.g. demo.plots/ for demo.zarr)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Save no plots."),
    no_write: bool = typer.Option(False, "--no-write", help="Write nothing into the store (results printed only)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be read and how; compute nothing."),
    as_json: bool = AsJson,
) -> None:
    """Emergent outlier dimensions (Dettmers), massive activations (Sun) and kurtosis per layer,
    in one pass; results go into STORE under analysis/outliers/, plus a table and PNG plots.

    \b
    Examples:
      harvest analyze outliers stores/demo.zarr
      harvest analyze outliers big.zarr --scheduler tcp://10.0.0.5:8786
      harvest analyze outliers big.zarr --aggregate corpus --magnitude 4 --json
    """
    from .outliers import analyze_outliers
    from .scan import ScanParams

    params = ScanParams(magnitude=magnitude, layer_frac=layer_frac, pos_frac=pos_frac, aggregate=aggregate,
                        massive_abs=massive_abs, massive_ratio=massive_ratio, top_k=top_k, block_mib=block_mib)
    if dry_run:
        typer.echo(describe_plan(store, params, index=not no_index, derive=not stored_only))
        return
    rep = analyze_outliers(store, params, index=not no_index, derive=not stored_only, scheduler=scheduler,
                           num_workers=workers, write=not no_write,
                           plots=False if no_plots else (plots if plots is not None else True))
    typer.echo(rep.to_json() if as_json else rep.format())


def index_command(
    store: Path = StoreArg,
    top_k: int = TopK,
    threshold: float = typer.Option(6.0, "--threshold", help="The index counts values with |x| >= this."),
    scheduler: Optional[str] = Scheduler,
    workers: Optional[int] = Workers,
    block_mib: float = BlockMiB,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be read; compute nothing."),
    as_json: bool = AsJson,
) -> None:
    """Build the per-dimension index of every hook point (count, mean, std, max |x|, count >= threshold,
    top-k rows by |x|) under STORE/analysis/index, for `harvest query dim`.

    \b
    Examples:
      harvest index stores/demo.zarr
      harvest index big.zarr --top-k 64 --scheduler tcp://10.0.0.5:8786
    """
    from .index import build_index
    from .scan import ScanParams

    if dry_run:
        typer.echo(describe_plan(store, ScanParams(top_k=top_k, index_threshold=threshold, block_mib=block_mib),
                                 index=True, outliers=False))
        return
    summary = build_index(store, top_k=top_k, threshold=threshold, block_mib=block_mib, scheduler=scheduler,
                          num_workers=workers)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    n_hooks = sum(len(t["hooks"]) for t in summary["templates"].values())
    typer.echo(f"indexed {n_hooks} hook points ({', '.join(summary['templates'])}) over {summary['rows']:,} rows "
               f"in {summary['seconds']:.2f} s ({summary['mib_per_s'] or 0:,.0f} MiB/s) -> {store}/analysis/index")
    typer.echo(f"query it: harvest query dim {store} D [--hook HOOK] [--layer L]")


@query_app.command("dim")
def dim_command(
    store: Path = StoreArg,
    dim: int = typer.Argument(..., help="The dimension (flat index into the hook's trailing dims)."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Hook point: a template (resid_post, "
                                       "ln1.hook_normalized), or a full name (blocks.3.hook_resid_post). "
                                       "Default: ln1.hook_normalized, else hook_resid_post."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Only this layer (default: all layers; examples "
                                        "from the layer where |x| peaks)."),
    top: int = typer.Option(10, "--top", help="How many max-activating tokens to show (up to the index's top-k)."),
    context: int = typer.Option(8, "--context", help="Tokens of context on each side."),
    as_json: bool = AsJson,
) -> None:
    """Per-layer statistics of one dimension, whether and why it is an outlier, the LayerNorm weight
    there, and its top tokens in context. Reads the index only: well under a second on any store.

    \b
    Examples:
      harvest query dim stores/demo.zarr 17
      harvest query dim stores/demo.zarr 17 --hook resid_post --layer 5 --top 20 --context 12
    """
    from .query import format_query, query_dim, to_json

    result = query_dim(store, dim, hook=hook, layer=layer, top=top, context=context)
    typer.echo(to_json(result) if as_json else format_query(result))


def describe_plan(store: Path, params, *, index: bool, outliers: bool = True, derive: bool = True) -> str:
    from .scan import plan, rows_per_block
    from .source import StoreFacts

    facts = StoreFacts.load(store)
    roles, sources, layers, notes, resid_kind = plan(facts, params, index=index, outliers=outliers, derive=derive)
    total = sum(facts.n_rows * facts.arrays[name].row_bytes for name in roles)
    lines = [f"would read {len(roles)} arrays, {total / 2**20:,.1f} MiB, {facts.n_rows:,} rows "
             f"(blocks of ~{params.block_mib:g} MiB)"]
    if outliers:
        lines.append(f"hidden states: {len(sources)} in {len(layers)} layers")
        lines += [f"  {s.layer:>3} {s.ln}: {s.describe()}" for s in sources[:8]]
        if len(sources) > 8:
            lines.append(f"  ... {len(sources) - 8} more")
        lines += [f"note: {n}" for n in notes]
        lines.append(f"massive activations and kurtosis on: {resid_kind or 'nothing (no residual stream stored)'}")
    if index:
        lines.append(f"index: every token-axis array ({len(facts.arrays)}), top-{params.top_k}")
    blocks = {rows_per_block(facts.arrays[n], params.block_mib, facts.n_rows) for n in roles}
    lines.append("rows per block: " + ", ".join(str(b) for b in sorted(blocks)))
    return "\n".join(lines)
