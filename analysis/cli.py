"""``harvest analyze …``, ``harvest index`` and ``harvest query dim``: argument parsing over the
library calls in :mod:`analysis`; nothing is computed here.

Registered in ``harvest/cli.py``::

    from analysis.cli import analyze_app, index_command, query_app
    app.add_typer(analyze_app, name="analyze"); app.add_typer(query_app, name="query")
    app.command("index")(index_command)

The options they share (store, ``--json``, ``--scheduler``, ``--dry-run`` ...) and what the
write-related flags mean are declared once, in :mod:`analysis.cli_options`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from harvest.errors import AnalysisError

from . import runtime
from .cli_options import AsJson, BlockMiB, DryRun, Hook, NoPlots, NoWrite, Scheduler, Store, TopK, Workers

analyze_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Offline analyses over a harvest store: Dask arrays, read chunk by chunk, out of core.",
)
query_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Look closely at one feature, from the store's per-dimension index (fast on any store size).",
)


def _dry_run(what: str, scheduler, workers, outputs: list[str]) -> str:
    """The common tail of every dry run: where it would run and what it would write."""
    return "\n".join([what, f"would run on: {runtime.describe(scheduler, workers)}",
                      "would write: " + (", ".join(outputs) if outputs else "nothing")])


@analyze_app.command("outliers")
def outliers_command(
    store: Store,
    magnitude: float = typer.Option(6.0, "--magnitude", help="Dettmers' α: an outlier value has |x| >= this."),
    layer_frac: float = typer.Option(0.25, "--layer-frac", help="... in at least this fraction of layers."),
    pos_frac: float = typer.Option(0.06, "--pos-frac", help="... at at least this fraction of sequence positions."),
    aggregate: str = typer.Option("sequence", "--aggregate",
                                  help="'sequence': fractions per sequence, then the mean over sequences; "
                                       "'corpus': over all rows at once."),
    massive_abs: float = typer.Option(100.0, "--massive-abs", help="Massive activations: |x| > this ..."),
    massive_ratio: float = typer.Option(1000.0, "--massive-ratio", help="... and >= this x the token's median |x|."),
    top_k: TopK = 32,
    no_index: bool = typer.Option(False, "--no-index", help="Skip building the per-dimension index in this pass."),
    stored_only: bool = typer.Option(False, "--stored-only", help="Only stored ln*.hook_normalized arrays; "
                                     "never apply LayerNorm to a residual."),
    source: str = typer.Option("auto", "--source", help="Where Dettmers' criterion comes from: 'statistics' "
                               "(harvest-time, over every token, reads no row), 'scan' (the stored rows, plus "
                               "massive activations, kurtosis and the index) or 'auto' (the statistics when they "
                               "cover tokens the store does not keep)."),
    scheduler: Scheduler = None,
    workers: Workers = None,
    block_mib: BlockMiB = 8.0,
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for the PNG plots (default: STORE.plots "
                                         "beside the store, e.g. demo.plots/ for demo.zarr)."),
    no_plots: NoPlots = False,
    no_write: NoWrite = False,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Emergent outlier dimensions (Dettmers), massive activations (Sun) and kurtosis per layer,
    in one pass; results go into STORE under analysis/outliers/, plus a table and PNG plots.

    \b
    Examples:
      harvest analyze outliers stores/demo.zarr
      harvest analyze outliers big.zarr --dry-run
      harvest analyze outliers big.zarr --scheduler tcp://10.0.0.5:8786
      harvest analyze outliers big.zarr --aggregate corpus --magnitude 4 --json
    """
    from .outliers import analyze_outliers, check_params, default_plot_dir
    from .scan import ScanParams, describe_plan

    params = ScanParams(magnitude=magnitude, layer_frac=layer_frac, pos_frac=pos_frac, aggregate=aggregate,
                        massive_abs=massive_abs, massive_ratio=massive_ratio, top_k=top_k, block_mib=block_mib)
    plot_to = False if no_plots else (plots if plots is not None else True)
    if dry_run:
        check_params(params)
        outputs = []
        if not no_write:
            outputs.append(f"{store}/analysis/outliers")
            if not no_index:
                outputs.append(f"{store}/analysis/index")
        if plot_to:
            outputs.append(f"{plots if plots is not None else default_plot_dir(store)}/*.png")
        typer.echo(_dry_run(describe_plan(store, params, index=not no_index, derive=not stored_only),
                            scheduler, workers, outputs))
        return
    rep = analyze_outliers(store, params, index=not no_index, derive=not stored_only, scheduler=scheduler,
                           num_workers=workers, write=not no_write, plots=plot_to, source=source)
    typer.echo(rep.to_json() if as_json else rep.format())


def index_command(
    store: Store,
    top_k: TopK = 32,
    threshold: float = typer.Option(6.0, "--threshold", help="The index counts values with |x| >= this."),
    scheduler: Scheduler = None,
    workers: Workers = None,
    block_mib: BlockMiB = 8.0,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Build the per-dimension index of every hook point (count, mean, std, max |x|, count >= threshold,
    top-k rows by |x|) under STORE/analysis/index, for `harvest query dim`.

    \b
    Examples:
      harvest index stores/demo.zarr
      harvest index big.zarr --top-k 64 --scheduler tcp://10.0.0.5:8786
    """
    from .index import build_index
    from .scan import ScanParams, describe_plan

    if dry_run:
        if top_k < 1:
            raise AnalysisError(f"top_k must be >= 1, not {top_k}")
        params = ScanParams(top_k=top_k, index_threshold=threshold, block_mib=block_mib)
        typer.echo(_dry_run(describe_plan(store, params, index=True, outliers=False), scheduler, workers,
                            [f"{store}/analysis/index"]))
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


@analyze_app.command("translation-heads")
def translation_heads_command(
    store: Store,
    text: Optional[Path] = typer.Option(None, "--text", help="Store of patterns on natural text, for the "
                                        "previous-token control (default: the translation prompts)."),
    repeated: Optional[Path] = typer.Option(None, "--repeated", help="Store harvested with the "
                                            "repeated_tokens source, for the prefix-matching control."),
    top: int = typer.Option(10, "--top", help="Rows of the ranked table."),
    sort: str = typer.Option("ts_next_delta", "--sort", help="Rank heads by: ts_next_delta, ts_cur_delta, "
                             "ts_next_last_delta, ts_cur_last_delta, prev_token, prefix_matching."),
    scheduler: Scheduler = None,
    workers: Workers = None,
    no_plots: NoPlots = False,
    no_write: NoWrite = False,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Rank attention heads by how much they attend to the aligned source word.

    \b
    STORE is harvested with the translation source and attention patterns
    (capture.hooks: [blocks.*.attn.hook_pattern]). Scores TS_next (from the position predicting
    target word j), TS_cur (from its first token) and last-token variants, each minus the
    permuted-alignment baseline, with z-scores over prompts; previous-token and prefix-matching
    controls tell translation heads from plain previous-token and induction heads. Results go
    under analysis/translation_heads/ in STORE, the heatmap beside it (STORE's name +
    .translation_heads.png).

    \b
    Examples:
      harvest analyze translation-heads stores/translation.zarr
      harvest analyze translation-heads stores/tr.zarr --text stores/text.zarr --repeated stores/rep.zarr
      harvest analyze translation-heads stores/tr.zarr --sort ts_cur_delta --top 20 --json --no-write
    """
    from .translation_heads import SORT_KEYS, analyze, plan

    if sort not in SORT_KEYS:
        raise AnalysisError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    if dry_run:
        job = plan(store, text=text, repeated=repeated)
        typer.echo(_dry_run(job.describe(), scheduler, workers, job.outputs(write=not no_write, plot=not no_plots)))
        return
    result = analyze(store, text=text, repeated=repeated, write=not no_write, plot=not no_plots,
                     scheduler=scheduler, num_workers=workers)
    if as_json:
        typer.echo(json.dumps(result.to_dict(top=top, sort=sort), indent=2))
        return
    typer.echo(f"translation heads of {store} ({result.params['n_prompts']} prompts, "
               f"{result.params['words_per_prompt']} words each); Δ = score − permuted-alignment baseline")
    typer.echo(result.table(top=top, sort=sort))
    if result.figure:
        typer.echo(f"heatmap: {result.figure}")


def _periods(value: str, flag: str = "--periods"):
    if value.strip() == "auto":
        return "auto"
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise AnalysisError(f"{flag} {value!r}: give comma-separated numbers (e.g. 2,5,10,100) or 'auto'") from None


@analyze_app.command("fourier")
def fourier_command(
    store: Store,
    numbers: Optional[Path] = typer.Option(None, "--numbers", help="Store harvested with the numbers source, "
                                           "for the spectrum and helix (default: operand a of STORE)."),
    hook: Hook = "resid_post",
    periods: str = typer.Option("2,5,10,100", "--periods", help="Helix periods, comma-separated, or 'auto' "
                                "for each layer's strongest spectrum periods."),
    direction_periods: Optional[str] = typer.Option(None, "--direction-periods", help="Candidate periods for "
                                                    "the a+b directions (default: the helix periods)."),
    components: int = typer.Option(100, "--components", help="PCA components before the helix fit."),
    shuffles: int = typer.Option(20, "--shuffles", help="Shuffled-feature baselines to average."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffles."),
    embed: bool = typer.Option(True, "--embed/--no-embed", help="Include hook_embed as layer -1."),
    answer_prefix: str = typer.Option("", "--answer-prefix", help="Text between the prompt and the answer "
                                      "when tokenizing a+b for the accuracy (e.g. ' ')."),
    top: int = typer.Option(5, "--top", help="Top periods shown per layer."),
    scheduler: Scheduler = None,
    workers: Workers = None,
    no_plots: NoPlots = False,
    no_write: NoWrite = False,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Fourier spectrum and helix of number tokens; Fourier directions of a+b; accuracy.

    \b
    STORE is harvested with the addition source (or the numbers source); --hook is any per-layer
    d_model hook point it holds. Results go under analysis/fourier/ in STORE, plots beside it
    (.fourier_spectrum.png, .fourier_helix.png, .fourier_directions.png).

    \b
    Examples:
      harvest analyze fourier stores/addition.zarr --numbers stores/numbers.zarr
      harvest analyze fourier stores/numbers.zarr --periods auto
      harvest analyze fourier stores/addition.zarr --hook ln1 --json --no-write
    """
    from .fourier import analyze, plan

    chosen = _periods(periods)
    candidates = _periods(direction_periods, "--direction-periods") if direction_periods else None
    if candidates == "auto":
        raise AnalysisError("--direction-periods takes numbers; 'auto' applies to --periods")
    if dry_run:
        job = plan(store, numbers=numbers, hook=hook, periods=chosen, include_embed=embed)
        typer.echo(_dry_run(job.describe(), scheduler, workers, job.outputs(write=not no_write, plot=not no_plots)))
        return
    result = analyze(store, numbers=numbers, hook=hook, periods=chosen, direction_periods=candidates,
                     n_components=components, n_shuffles=shuffles, seed=seed, include_embed=embed,
                     answer_prefix=answer_prefix, write=not no_write, plot=not no_plots,
                     scheduler=scheduler, num_workers=workers)
    if as_json:
        typer.echo(json.dumps(result.to_dict(top=top), indent=2))
        return
    typer.echo(result.report(top=top))
    for name, path in result.figures.items():
        typer.echo(f"{name} plot: {path}")


@query_app.command("dim")
def dim_command(
    store: Store,
    dim: int = typer.Argument(..., help="The dimension (flat index into the hook's trailing dims)."),
    hook: Hook = None,
    layer: Optional[int] = typer.Option(None, "--layer", help="Only this layer (default: all layers; examples "
                                        "from the layer where |x| peaks)."),
    top: int = typer.Option(10, "--top", help="How many max-activating tokens to show (up to the index's top-k)."),
    context: int = typer.Option(8, "--context", help="Tokens of context on each side."),
    as_json: AsJson = False,
) -> None:
    """Per-layer statistics of one dimension, whether and why it is an outlier, the LayerNorm weight
    there, and its top tokens in context. Reads the index only: well under a second on any store.
    Without --hook: ln1.hook_normalized if indexed, else hook_resid_post.

    \b
    Examples:
      harvest query dim stores/demo.zarr 17
      harvest query dim stores/demo.zarr 17 --hook resid_post --layer 5 --top 20 --context 12
      harvest query dim stores/demo.zarr 17 --hook blocks.5.hook_resid_post
    """
    from .query import format_query, query_dim, to_json

    result = query_dim(store, dim, hook=hook, layer=layer, top=top, context=context)
    typer.echo(to_json(result) if as_json else format_query(result))
