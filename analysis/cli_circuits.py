"""``harvest analyze translation-heads`` and ``harvest analyze fourier``: argument parsing only.

``register(analyze_app)`` adds both commands to the ``analyze`` sub-app; each parses its options
and calls ``analysis.translation_heads.analyze`` / ``analysis.fourier.analyze``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._circuits_common import AnalysisError

JSON = typer.Option(False, "--json", help="Print the results as JSON instead of tables.")
DRY_RUN = typer.Option(False, "--dry-run", help="Compute and print; write nothing (no analysis/ group, no PNG).")
SCHEDULER = typer.Option(None, "--scheduler", help="Address of a dask.distributed scheduler "
                         "(default: Dask's threaded scheduler in this process).")


def _periods(value: str):
    if value.strip() == "auto":
        return "auto"
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise AnalysisError(f"--periods {value!r}: give comma-separated numbers (e.g. 2,5,10,100) or 'auto'") from None


def register(analyze_app: typer.Typer) -> None:
    """Add the translation-heads and fourier commands to ``analyze_app``."""

    @analyze_app.command("translation-heads")
    def translation_heads(
        store: Path = typer.Argument(..., help="Store harvested with the translation source and attention patterns."),
        text: Optional[Path] = typer.Option(None, "--text", help="Store of patterns on natural text, for the "
                                            "previous-token control (default: the translation prompts)."),
        repeated: Optional[Path] = typer.Option(None, "--repeated", help="Store harvested with the "
                                                "repeated_tokens source, for the prefix-matching control."),
        top: int = typer.Option(10, "--top", help="Rows of the ranked table."),
        sort: str = typer.Option("ts_next_delta", "--sort", help="Rank heads by: ts_next_delta, ts_cur_delta, "
                                 "ts_next_last_delta, ts_cur_last_delta, prev_token, prefix_matching."),
        as_json: bool = JSON,
        dry_run: bool = DRY_RUN,
        scheduler: Optional[str] = SCHEDULER,
    ) -> None:
        """Rank attention heads by how much they attend to the aligned source word.

        \b
        Scores TS_next (from the position predicting target word j), TS_cur (from its first token)
        and last-token variants, each minus the permuted-alignment baseline, with z-scores over
        prompts; previous-token and prefix-matching controls tell translation heads from plain
        previous-token and induction heads. Results go under analysis/translation_heads/ in STORE,
        the heatmap beside it (STORE's name + .translation_heads.png).

        \b
        Examples:
          harvest analyze translation-heads stores/translation.zarr
          harvest analyze translation-heads stores/tr.zarr --text stores/text.zarr --repeated stores/rep.zarr
          harvest analyze translation-heads stores/tr.zarr --sort ts_cur_delta --top 20 --json
        """
        from .translation_heads import analyze

        result = analyze(store, text=text, repeated=repeated, write=not dry_run, plot=not dry_run, address=scheduler)
        if as_json:
            typer.echo(json.dumps(result.to_dict(top=top, sort=sort), indent=2))
            return
        typer.echo(f"translation heads of {store} ({result.params['n_prompts']} prompts, "
                   f"{result.params['words_per_prompt']} words each); Δ = score − permuted-alignment baseline")
        typer.echo(result.table(top=top, sort=sort))
        if result.figure:
            typer.echo(f"heatmap: {result.figure}")

    @analyze_app.command("fourier")
    def fourier(
        store: Path = typer.Argument(..., help="Store harvested with the addition source (or the numbers source)."),
        numbers: Optional[Path] = typer.Option(None, "--numbers", help="Store harvested with the numbers source, "
                                               "for the spectrum and helix (default: operand a of STORE)."),
        hook: str = typer.Option("hook_resid_post", "--hook", help="d_model hook to analyse in every layer "
                                 "(hook_resid_post, hook_resid_pre, ln1.hook_normalized, hook_attn_out, ...)."),
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
        as_json: bool = JSON,
        dry_run: bool = DRY_RUN,
        scheduler: Optional[str] = SCHEDULER,
    ) -> None:
        """Fourier spectrum and helix of number tokens; Fourier directions of a+b; accuracy.

        \b
        Results go under analysis/fourier/ in STORE, plots beside it (.fourier_spectrum.png,
        .fourier_helix.png, .fourier_directions.png).

        \b
        Examples:
          harvest analyze fourier stores/addition.zarr --numbers stores/numbers.zarr
          harvest analyze fourier stores/numbers.zarr --periods auto
          harvest analyze fourier stores/addition.zarr --hook ln1.hook_normalized --json
        """
        from .fourier import analyze

        chosen = _periods(periods)
        candidates = _periods(direction_periods) if direction_periods else None
        if candidates == "auto":
            raise AnalysisError("--direction-periods takes numbers; 'auto' applies to --periods")
        result = analyze(store, numbers=numbers, hook=hook, periods=chosen, direction_periods=candidates,
                         n_components=components, n_shuffles=shuffles, seed=seed, include_embed=embed,
                         answer_prefix=answer_prefix, write=not dry_run, plot=not dry_run,
                         address=scheduler)
        if as_json:
            typer.echo(json.dumps(result.to_dict(top=top), indent=2))
            return
        typer.echo(result.report(top=top))
        for name, path in result.figures.items():
            typer.echo(f"{name} plot: {path}")
