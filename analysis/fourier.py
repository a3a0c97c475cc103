"""Fourier features and the helix of numbers; Fourier directions of a + b (Nanda, open problem 2.35).

Follows Kantamneni & Tegmark, "Language Models Use Trigonometry to Do Addition" (arXiv 2502.00873).
Input: any d_model hook (``hook_resid_post`` by default, plus ``hook_embed`` as layer −1)
harvested on the ``addition`` source (``meta/a``, ``meta/b``, operand spans, ``meta/eq_pos``)
and, for the number spectrum, on the ``numbers`` source (``meta/n``, ``meta/n_span``).

1. **Spectrum** (their Fig. 2): the activations h(n) of number tokens n = lo..hi at one hook,
   centred over n, Fourier-transformed along n; power |ĥ_k|² averaged over dimensions. Period of
   frequency k: N / k. Numbers come from a ``numbers`` store (the last token of n) or, failing
   that, from the operand a of an addition store (the last token of a, averaged over prompts with
   the same a — under the causal mask they are all the same activation).
2. **Helix fit**: per layer, PCA of the centred h(n) to ``n_components`` (≤ 100, ≤ d_model,
   ≤ N − 1); features ``[cos(2πn/T), sin(2πn/T) for T in periods] + [n / max n] + [1]`` fitted by
   rank-tolerant least squares (sin(πn) ≡ 0 for T = 2, so the design is rank deficient and
   ``lstsq`` with ``rcond`` drops it). R² = 1 − SS_res / SS_tot in PCA space. Baselines: **circle**
   (the same without the linear term), **poly3** (1, x, x², x³ with x = n / max n), **shuffled**
   (the helix features of a permuted n, mean over ``n_shuffles`` seeds; with ``periods="auto"``
   the periods are re-picked on the permuted data too, so selection gets no head start), and
   **pca** — the variance in the top r principal components where r is the helix's rank (its
   parameter count less the constant): the best *any* rank-r linear fit can do, a ceiling, not a
   bar to beat. Each baseline's parameter count is reported beside it.
3. **Directions of a + b** at the ``=`` position: per layer and candidate period T, the fraction
   of variance explained by regressing the activations on ``cos/sin(2π(a+b)/T)`` (with an
   intercept), against the same for a permuted a + b; the regression directions ``W`` (so that
   ``x ≈ mean + cos·W_cos + sin·W_sin``) and the mean are stored for users to project onto.
   Computed from sufficient statistics (``GᵀX``, ``Σx``, ``Σ‖x‖²``) accumulated chunk by chunk
   with Dask, so a large store is never held in memory.
4. **Accuracy**: top-1 of ``unembed.topk_ids`` (``capture.top_k``) at ``=`` against the first token
   of ``answer_prefix + str(a + b)`` under the store's own tokenizer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import AnalysisError
from harvest.hookpoints import compact_layers, split_name
from harvest.store import consolidate
from harvest.verify import names_damage

from .helix import HelixFit, Regression, helix_fit, period_features, spectrum, top_periods
from .plots import figure_path, pyplot
from .reading import (lazy_array, hook_layers, open_store, prompt_source, provenance, read, rows_at,
                      store_hooks)
from .results import format_table, jsonable, result_group, write_array
from .runtime import dask_scheduler

RESULT_GROUP = "fourier"
DEFAULT_PERIODS = (2, 5, 10, 100)
BASELINES = ("circle", "poly3", "pca", "shuffled")
EMBED_LAYER = -1


# --- reading the store ---------------------------------------------------------------------------------

def analysed_layers(group, hook: str, include_embed: bool, path: Path) -> dict[int, str]:
    """``{layer: array}`` of ``hook`` in every harvested layer, plus ``hook_embed`` as layer −1."""
    layers = hook_layers(group, hook, path)
    if include_embed and "hook_embed" in store_hooks(group):
        layers = {EMBED_LAYER: "hook_embed", **layers}
    return layers


#: where the numbers of the spectrum come from: (value array, token span array, description)
NUMBER_SOURCES = (("n", "n_span", "numbers: last token of n"),
                  ("a", "a_span", "addition: last token of operand a, mean over prompts with the same a"))


def _number_source(group, path: Path) -> tuple[str, str, str]:
    """The meta arrays holding the numbers of a numbers (or addition) store: metadata only."""
    meta = group["meta"] if "meta" in group else {}
    for values, span, where in NUMBER_SOURCES:
        if values in meta and span in meta:
            return values, span, where
    raise AnalysisError(f"{path} (prompts.source = {prompt_source(group)!r}) holds no numbers; harvest the "
                        "numbers source (or the addition source) for the spectrum and helix")


def _number_rows(group, path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows, number at each row, where they come from) for the number-token activations."""
    values_name, span_name, where = _number_source(group, path)
    values, span = read(group, f"meta/{values_name}"), read(group, f"meta/{span_name}")
    seqs = np.arange(len(values))
    return rows_at(group, seqs, span[:, 1].astype(np.int64) - 1, f"{path}: number tokens"), values, where


def _group_means(group, layers: dict[int, str], rows: np.ndarray, values: np.ndarray):
    """Per layer, the mean activation of the rows of each distinct value: (values, {layer: (V, d)}).

    Sums per value are taken block by block (one Dask task per chunk) and added up, so an addition
    store of any size is read once and never held whole.
    """
    import dask

    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    distinct, inverse = np.unique(values, return_inverse=True)

    def block_sums(x: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Sums and row counts per value over rows with no NaN/inf; the NaN/inf values and rows left out."""
        x = np.asarray(x, dtype=np.float64)
        ok = np.isfinite(x).all(axis=1)
        out = np.zeros((len(distinct), x.shape[1]))
        np.add.at(out, which[ok], x[ok])
        return out, np.bincount(which[ok], minlength=len(distinct)), int((~np.isfinite(x)).sum()), int((~ok).sum())

    def total(parts):
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                sum(p[3] for p in parts))

    lazy = {}
    for layer, name in layers.items():
        x = lazy_array(group, name)[rows].rechunk({1: -1})
        starts = np.concatenate([[0], np.cumsum(x.chunks[0])])
        parts = [dask.delayed(block_sums)(b, inverse[s0:s1])
                 for b, s0, s1 in zip(x.to_delayed().ravel(), starts[:-1], starts[1:])]
        lazy[layer] = dask.delayed(total)(parts)
    computed = dask.compute(lazy)[0]
    nonfinite = {layer: {"values": v[2], "rows_left_out": v[3], "values_without_rows": int((v[1] == 0).sum()),
                         "n_values": len(distinct), "n_rows": len(rows)}
                 for layer, v in computed.items() if v[2]}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {layer: v[0] / v[1][:, None] for layer, v in computed.items()}
    return distinct, means, nonfinite


def _regressions(group, layers: dict[int, str], rows: np.ndarray, features: np.ndarray) -> dict[int, Regression]:
    """Sufficient statistics of the activations at ``rows`` against ``features``, per layer, chunk by chunk."""
    import dask
    import dask.array as da

    order = np.argsort(rows, kind="stable")
    rows, features = rows[order], features[order]
    lazy = {}
    for layer, name in layers.items():
        x = lazy_array(group, name)[rows].astype(np.float64)
        ok = da.isfinite(x).all(axis=1)  # rows with a NaN/inf are left out (and counted)
        x = da.where(ok[:, None], x, 0.0)
        g = da.from_array(features, chunks=(x.chunks[0], features.shape[1])) * ok[:, None]
        lazy[layer] = (x.sum(axis=0), (x ** 2).sum(), g.T @ g, g.T @ x, ok.sum(), g.sum(axis=0),
                       (~da.isfinite(lazy_array(group, name)[rows])).sum())
    computed = dask.compute(lazy)[0]
    return {layer: Regression(int(n), np.asarray(sx), float(sq), np.asarray(sum_g), np.asarray(gtg), np.asarray(gtx),
                              nonfinite=int(bad), rows_left_out=len(rows) - int(n))
            for layer, (sx, sq, gtg, gtx, n, sum_g, bad) in computed.items()}


def answer_tokens(group, answers: np.ndarray, answer_prefix: str) -> np.ndarray:
    """First token id of ``answer_prefix + str(answer)`` under the tokenizer stored in the store."""
    from transformers import AutoTokenizer

    from harvest.store import read_files

    if "tokenizer" not in group:
        raise AnalysisError("the store holds no tokenizer/ group to tokenize answers with")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(read_files(group["tokenizer"], Path(tmp)))
        distinct = np.unique(answers)
        ids = tokenizer([f"{answer_prefix}{v}" for v in distinct], add_special_tokens=False)["input_ids"]
    first = {int(v): (i[0] if i else -1) for v, i in zip(distinct, ids)}
    return np.array([first[int(v)] for v in answers], dtype=np.int64)


# --- the analysis --------------------------------------------------------------------------------------

@dataclass
class Fourier:
    store: Path
    layers: np.ndarray
    params: dict[str, Any]
    numbers: np.ndarray | None = None
    power: np.ndarray | None = None  #: (layer, frequency)
    peaks: list[list[tuple[float, float]]] = field(default_factory=list)  #: per layer [(period, share)]
    helix: list[HelixFit] = field(default_factory=list)
    direction_periods: list[float] = field(default_factory=list)
    fve: np.ndarray | None = None  #: (layer, period)
    fve_shuffled: np.ndarray | None = None
    fve_linear: np.ndarray | None = None  #: (layer,)
    directions: np.ndarray | None = None  #: (layer, period, basis, d_model)
    means: np.ndarray | None = None  #: (layer, d_model)
    accuracy: float | None = None
    correct: np.ndarray | None = None
    figures: dict[str, Path] = field(default_factory=dict)

    def layer_name(self, layer: int) -> str:
        return "embed" if layer == EMBED_LAYER else str(layer)

    def spectrum_table(self, top: int = 5) -> str:
        rows = [[self.layer_name(layer), *(f"{p:.4g} ({s:.0%})" for p, s in peaks[:top])]
                for layer, peaks in zip(self.layers, self.peaks)]
        return format_table(["layer", *(f"period #{i + 1} (power)" for i in range(top))], rows)

    def helix_table(self) -> str:
        heads = ["layer", "periods", "helix", *BASELINES, "params"]
        rows = [[self.layer_name(layer), ",".join(f"{p:.4g}" for p in fit.periods), fit.r2["helix"],
                 *(fit.r2[b] for b in BASELINES),
                 "/".join(str(fit.n_params[k]) for k in ("helix", "circle", "poly3", "pca"))]
                for layer, fit in zip(self.layers, self.helix)]
        return format_table(heads, rows)

    def directions_table(self) -> str:
        heads = ["layer", *(f"T={p:.4g}" for p in self.direction_periods), "shuffled(max)", "linear a+b"]
        rows = [[self.layer_name(layer), *self.fve[i], float(np.max(self.fve_shuffled[i])), self.fve_linear[i]]
                for i, layer in enumerate(self.layers)]
        return format_table(heads, rows)

    def report(self, top: int = 5) -> str:
        parts = []
        if self.power is not None:
            n = len(self.numbers)
            parts.append(f"spectrum of number tokens n = {int(self.numbers[0])}..{int(self.numbers[-1])} "
                         f"(N = {n}; period = N/k):\n" + self.spectrum_table(top))
            parts.append("helix fit, R² (params: helix/circle/poly3/pca rank; pca is the rank-matched ceiling):\n"
                         + self.helix_table())
        if self.fve is not None:
            parts.append("variance at '=' explained by cos/sin(2π(a+b)/T):\n" + self.directions_table())
        if self.accuracy is not None:
            parts.append(f"accuracy (top-1 = first token of a+b): {self.accuracy:.1%} of {len(self.correct)} prompts")
        elif "accuracy_note" in self.params:
            parts.append(f"accuracy: {self.params['accuracy_note']}")
        if self.params.get("nonfinite") or self.params.get("no_finite_value"):
            where = "; ".join(f"{k}: {v['values']:,} NaN/inf, {v['rows_left_out']:,} rows left out"
                              for k, v in self.params.get("nonfinite", {}).items())
            dead = "; ".join(self.params.get("no_finite_value", []))
            parts.append("non-finite values (left out of every sum and fit): " + "; ".join(x for x in (where, dead) if x))
        return "\n\n".join(parts)

    def to_dict(self, top: int = 5) -> dict[str, Any]:
        out: dict[str, Any] = {"store": self.store, "params": self.params, "figures": self.figures, "layers": []}
        for i, layer in enumerate(self.layers):
            entry: dict[str, Any] = {"layer": int(layer), "name": self.layer_name(layer)}
            if self.power is not None:
                entry["top_periods"] = [{"period": p, "power_share": s} for p, s in self.peaks[i][:top]]
                fit = self.helix[i]
                entry["helix"] = {"periods": fit.periods, "r2": fit.r2, "n_params": fit.n_params}
            if self.fve is not None:
                entry["fve"] = dict(zip((f"{p:g}" for p in self.direction_periods), self.fve[i].tolist()))
                entry["fve_shuffled"] = dict(zip((f"{p:g}" for p in self.direction_periods),
                                                 self.fve_shuffled[i].tolist()))
                entry["fve_linear"] = float(self.fve_linear[i])
            out["layers"].append(entry)
        if self.accuracy is not None:
            out["accuracy"] = {"top1": self.accuracy, "n_prompts": int(len(self.correct))}
        return jsonable(out)


@dataclass
class FourierPlan:
    """What an analysis of ``store`` will read, compute and write, checked from metadata alone."""

    store: Path
    hook: str  #: canonical template, e.g. ``hook_resid_post``
    layers: dict[int, str]  #: layer (−1: hook_embed) -> array
    periods: Any
    numbers_store: Path
    numbers_layers: dict[int, str]
    numbers_from: str | None  #: None: no spectrum / helix part
    addition: bool  #: the a+b directions part
    accuracy: bool  #: ``unembed.topk_ids`` was harvested

    def describe(self) -> str:
        """The dry run's answer: what would be read and computed; nothing is."""
        named = [f"{self.hook} at layers {compact_layers(x for x in self.layers if x >= 0)}"]
        if EMBED_LAYER in self.layers:
            named.append("hook_embed as layer -1")
        lines = [f"would analyse {self.store}: {', '.join(named)}"]
        if self.numbers_from:
            periods = self.periods if isinstance(self.periods, str) else ",".join(f"{p:g}" for p in self.periods)
            lines.append(f"  spectrum and helix (periods {periods}) from {self.numbers_store} ({self.numbers_from})")
        if self.addition:
            lines.append("  Fourier directions of a+b at the '=' position")
            lines.append("  accuracy: top-1 of unembed.topk_ids" if self.accuracy else
                         "  accuracy: not available (harvest with capture.top_k: 1 to keep predictions)")
        rows = " and ".join((["the number tokens"] if self.numbers_from else []) + (["'='"] if self.addition else []))
        lines.append(f"would read the rows of {rows} in {len(self.layers)} arrays")
        return "\n".join(lines)

    def outputs(self, write: bool = True, plot: bool = True) -> list[str]:
        """The group and the PNGs the analysis would write."""
        out = [f"{self.store}/analysis/{RESULT_GROUP} (replacing any earlier one)"] if write else []
        if plot:
            suffixes = (["fourier_spectrum", "fourier_helix"] if self.numbers_from else []) + (
                ["fourier_directions"] if self.addition else [])
            out += [str(figure_path(self.store, x)) for x in suffixes]
        return out


def plan(store: str | Path, *, numbers: str | Path | None = None, hook: str = "hook_resid_post",
         periods: Any = DEFAULT_PERIODS, include_embed: bool = True) -> FourierPlan:
    """Check that the stores hold what the analysis needs (metadata only) and say what it will do."""
    store = Path(store)
    group = open_store(store)
    layers = analysed_layers(group, hook, include_embed, store)
    template = split_name(layers[max(layers)])[0]
    periods = _check_periods(periods)
    num_path = Path(numbers) if numbers is not None else store
    num_group = open_store(num_path) if numbers is not None else group
    num_layers = analysed_layers(num_group, hook, include_embed, num_path) if numbers is not None else layers
    missing = [layer for layer in layers if layer not in num_layers]
    if missing:
        raise AnalysisError(f"{num_path} lacks the hook at layer(s) {missing} that {store} has; harvest the same hooks")
    try:
        numbers_from = _number_source(num_group, num_path)[2]
    except AnalysisError:
        if numbers is not None:
            raise
        numbers_from = None
    meta = group["meta"] if "meta" in group else {}
    addition = prompt_source(group) == "addition" or "eq_pos" in meta
    if numbers_from is None and not addition:
        raise AnalysisError(f"{store} is neither an addition nor a numbers store; nothing to analyse")
    return FourierPlan(store, template, layers, periods, num_path, num_layers, numbers_from, addition,
                       addition and "unembed.topk_ids" in group)


@names_damage  # a bad checksum anywhere inside is named in one line
def analyze(store: str | Path, *, numbers: str | Path | None = None, hook: str = "hook_resid_post",
            periods: Any = DEFAULT_PERIODS, direction_periods: Any = None, n_components: int = 100,
            n_shuffles: int = 20, n_auto: int = 4, seed: int = 0, include_embed: bool = True,
            answer_prefix: str = "", write: bool = True, plot: bool = True,
            scheduler: Any = None, num_workers: int | None = None) -> Fourier:
    """Spectrum, helix fit, a+b directions and accuracy of a store; results under ``analysis/fourier/``.

    ``store``: an addition store (all four parts) or a numbers store (spectrum and helix only).
    ``numbers``: a numbers store for the spectrum and helix (default: ``store``'s own numbers —
    n of a numbers store, operand a of an addition store). ``hook``: any per-layer hook name that
    ``capture.hooks`` takes (``resid_post``, ``blocks.{0..3}.ln1`` ...). ``periods``: helix periods,
    or ``"auto"`` for each layer's ``n_auto`` strongest spectrum periods. ``direction_periods``:
    candidate periods for the a+b directions (default: the helix periods, plus every auto-picked one).
    ``scheduler``: see :func:`analysis.runtime.dask_scheduler` (default: threads).
    """
    job = plan(store, numbers=numbers, hook=hook, periods=periods, include_embed=include_embed)
    store, layers, periods = job.store, job.layers, job.periods
    group = open_store(store)
    params: dict[str, Any] = {"store": str(store), "hook": job.hook, "layers": list(layers), "periods": periods,
                              "n_components": n_components, "n_shuffles": n_shuffles, "seed": seed,
                              "layer_-1": "hook_embed", "harvest_fingerprint": provenance(group).get("fingerprint")}
    result = Fourier(store, np.asarray(list(layers)), params)

    with dask_scheduler(scheduler, num_workers):
        if job.numbers_from:
            _numbers_part(result, job, n_components, n_shuffles, seed, n_auto)
        if job.addition:
            _addition_part(result, store, group, layers, periods, direction_periods, seed, answer_prefix)
    if result.power is None and result.fve is None:
        raise AnalysisError(f"{store} is neither an addition nor a numbers store; nothing to analyse")
    if write:
        _write(result)
        consolidate(result.store)  # the store is finished again: xarray opens it in one read
    if plot:
        _plot(result)
    return result


def _check_periods(periods: Any) -> Any:
    if isinstance(periods, str):
        if periods != "auto":
            raise AnalysisError(f"periods = {periods!r}: give numbers (e.g. 2,5,10,100) or 'auto'")
        return periods
    values = [float(p) for p in periods]
    if not values or any(p <= 0 for p in values):
        raise AnalysisError(f"periods = {periods!r}: must be positive numbers")
    return values


def _numbers_part(result: Fourier, job: FourierPlan, n_components: int, n_shuffles: int, seed: int,
                  n_auto: int) -> None:
    num_path = job.numbers_store
    num_group = open_store(num_path)
    try:
        rows, values, where = _number_rows(num_group, num_path)
    except AnalysisError:
        if num_path != job.store:
            raise
        return  # an addition store whose operand tokens were not captured: directions and accuracy only
    layers = job.layers  # shared with the addition part: a layer dropped here is dropped there too
    distinct, means, nonfinite = _group_means(num_group, {layer: job.numbers_layers[layer] for layer in layers}, rows,
                                              values)
    _drop_dead_layers(result, layers, {layer: nf for layer, nf in nonfinite.items() if nf["values_without_rows"]},
                      "numbers")
    result.params.setdefault("nonfinite", {}).update({f"numbers layer {k}": v for k, v in nonfinite.items()})
    if len(distinct) < 4 or not np.array_equal(distinct, np.arange(distinct[0], distinct[0] + len(distinct))):
        raise AnalysisError(f"{num_path}: the numbers must form a contiguous range of at least 4 (found "
                            f"{len(distinct)} values from {int(distinct[0])} to {int(distinct[-1])}); harvest the "
                            "numbers source over a range")
    result.numbers = distinct
    result.power = np.stack([spectrum(means[layer]) for layer in layers])
    result.peaks = [list(zip(*(x.tolist() for x in top_periods(p, len(distinct), 10)))) for p in result.power]
    result.helix = [helix_fit(distinct, means[layer], job.periods, n_components=n_components, n_shuffles=n_shuffles,
                              seed=seed, n_auto=n_auto) for layer in layers]
    result.params.update(numbers_store=str(num_path), numbers_from=where)


def _drop_dead_layers(result: Fourier, layers: dict[int, str], dead: dict[int, dict], where: str) -> None:
    """Leave out layers with no finite value to fit (from ``layers``, in place, and what is already computed),
    and say so: reported as 'no finite value', never fitted on zeros."""
    if not dead:
        return
    keep = [i for i, layer in enumerate(result.layers) if int(layer) not in dead]
    for layer in dead:
        layers.pop(layer, None)
    result.params.setdefault("no_finite_value", []).extend(
        f"layer {result.layer_name(layer)} left out ({where}): " + (
            "no finite value" if nf.get("values_without_rows", 0) in (0, nf.get("n_values"))
            and nf.get("rows_left_out") == nf.get("n_rows", nf.get("rows_left_out"))
            else f"{nf.get('values_without_rows')} number(s) have no row without NaN/inf")
        for layer, nf in dead.items())
    if not layers:
        raise AnalysisError(f"{result.store}: every analysed layer has NaN/inf where the analysis reads it "
                            f"({where}); nothing to fit. Harvest with model.dtype float32 or bfloat16")
    result.layers = result.layers[keep]
    if result.power is not None:
        result.power = result.power[keep]
        result.peaks = [result.peaks[i] for i in keep]
        result.helix = [result.helix[i] for i in keep]


def _addition_part(result: Fourier, store: Path, group, layers, periods, direction_periods, seed,
                   answer_prefix) -> None:
    a, b = read(group, "meta/a").astype(np.int64), read(group, "meta/b").astype(np.int64)
    eq = read(group, "meta/eq_pos").astype(np.int64)
    total = a + b
    rows = rows_at(group, np.arange(len(a)), eq, f"{store}: the '=' position")
    if direction_periods is None:
        candidates = set(DEFAULT_PERIODS) | (set(periods) if not isinstance(periods, str) else set())
        for fit in result.helix:
            candidates |= {round(p, 2) for p in fit.periods}
        direction_periods = sorted(candidates)
    result.direction_periods = [float(p) for p in direction_periods]
    shuffled_total = np.random.default_rng(seed).permutation(total)
    n_p = len(result.direction_periods)
    features = np.concatenate([period_features(total, result.direction_periods),
                               period_features(shuffled_total, result.direction_periods)], axis=1)
    stats = _regressions(group, layers, rows, features)
    bad = {layer: {"values": r.nonfinite, "rows_left_out": r.rows_left_out, "n_rows": len(rows)}
           for layer, r in stats.items() if r.nonfinite}
    result.params.setdefault("nonfinite", {}).update({f"'=' rows layer {k}": v for k, v in bad.items()})
    _drop_dead_layers(result, layers, {layer: bad[layer] for layer, r in stats.items() if r.n == 0}, "'=' rows")
    stats = {layer: stats[layer] for layer in layers}
    fve = np.zeros((len(layers), n_p))
    fve_shuffled = np.zeros_like(fve)
    fve_linear = np.zeros(len(layers))
    d_model = next(iter(stats.values())).sum_x.shape[0]
    directions = np.zeros((len(layers), n_p, 2, d_model))
    means = np.zeros((len(layers), d_model))
    width = 2 * n_p + 1
    for i, layer in enumerate(layers):
        reg = stats[layer]
        means[i] = reg.sum_x / reg.n
        for j in range(n_p):
            fve[i, j], w = reg.fit([2 * j, 2 * j + 1])
            directions[i, j] = w
            fve_shuffled[i, j], _ = reg.fit([width + 2 * j, width + 2 * j + 1])
        fve_linear[i], _ = reg.fit([2 * n_p])
    result.fve, result.fve_shuffled, result.fve_linear = fve, fve_shuffled, fve_linear
    result.directions, result.means = directions, means
    result.params.update(direction_periods=result.direction_periods, n_addition_prompts=int(len(a)),
                         directions_fit="x ≈ mean + cos(2π(a+b)/T)·W[cos] + sin(2π(a+b)/T)·W[sin] (least squares)")
    if "unembed.topk_ids" not in group:
        result.params["accuracy_note"] = "not available: harvest with capture.top_k: 1 (or more) to keep predictions"
        return
    top1 = np.asarray(group["unembed.topk_ids"].get_orthogonal_selection((rows, 0)), dtype=np.int64)
    expected = answer_tokens(group, total, answer_prefix)
    result.correct = top1 == expected
    result.accuracy = float(result.correct.mean())
    result.params.update(answer_prefix=answer_prefix, top1=top1, answer_token=expected)


def _write(result: Fourier) -> None:
    params = {k: v for k, v in result.params.items() if k not in ("top1", "answer_token")}
    out = result_group(result.store, RESULT_GROUP, {"params": params})
    write_array(out, "layer", result.layers.astype(np.int64), ("layer",), note="-1 = hook_embed")
    if result.power is not None:
        n = len(result.numbers)
        k = np.arange(result.power.shape[1])
        write_array(out, "spectrum/number", result.numbers.astype(np.int64), ("number",))
        write_array(out, "spectrum/frequency", k.astype(np.int64), ("frequency",))
        with np.errstate(divide="ignore"):
            write_array(out, "spectrum/period", np.where(k > 0, n / np.maximum(k, 1), np.inf), ("frequency",))
        write_array(out, "spectrum/power", result.power, ("layer", "frequency"),
                    description="mean over dims of |rfft over n of the centred activations|^2")
        peaks = np.array([[p for p, _ in peaks] for peaks in result.peaks])
        write_array(out, "spectrum/top_periods", peaks, ("layer", "rank"))
        for name in ("helix", *BASELINES):
            write_array(out, f"helix/r2_{name}", np.array([f.r2[name] for f in result.helix]), ("layer",),
                        n_params=[f.n_params[name] for f in result.helix])
        width = max(len(f.periods) for f in result.helix)
        write_array(out, "helix/periods", np.array([f.periods + [np.nan] * (width - len(f.periods))
                                                    for f in result.helix]), ("layer", "period"))
        if all(f.directions.shape == result.helix[0].directions.shape for f in result.helix):
            write_array(out, "helix/directions", np.stack([f.directions for f in result.helix]),
                        ("layer", "feature", "d_model"),
                        features="cos,sin per period, then n/max n, then 1; rows in PCA space mapped back to d_model")
    if result.fve is not None:
        write_array(out, "directions/period", np.asarray(result.direction_periods), ("period",))
        write_array(out, "directions/fve", result.fve, ("layer", "period"))
        write_array(out, "directions/fve_shuffled", result.fve_shuffled, ("layer", "period"))
        write_array(out, "directions/fve_linear", result.fve_linear, ("layer",))
        write_array(out, "directions/directions", result.directions.astype(np.float32),
                    ("layer", "period", "basis", "d_model"), basis=["cos", "sin"],
                    fit=result.params["directions_fit"])
        write_array(out, "directions/mean", result.means.astype(np.float32), ("layer", "d_model"))
    if result.accuracy is not None:
        write_array(out, "accuracy/correct", result.correct.astype(np.int8), ("sequence",), accuracy=result.accuracy)
        write_array(out, "accuracy/top1", result.params["top1"].astype(np.int64), ("sequence",))
        write_array(out, "accuracy/answer_token", result.params["answer_token"].astype(np.int64), ("sequence",))


# --- plots -------------------------------------------------------------------------------------------------

def _plot(result: Fourier) -> None:
    if result.power is not None:
        result.figures["spectrum"] = plot_spectrum(result, figure_path(result.store, "fourier_spectrum"))
        result.figures["helix"] = plot_helix(result, figure_path(result.store, "fourier_helix"))
    if result.fve is not None:
        result.figures["directions"] = plot_directions(result, figure_path(result.store, "fourier_directions"))


def plot_spectrum(result: Fourier, path: Path) -> Path:
    plt = pyplot()
    n_l, n = len(result.layers), len(result.numbers)
    cols = min(4, n_l)
    rows = -(-n_l // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[n_l:]:
        ax.axis("off")
    for ax, layer, power, peaks in zip(axes.ravel(), result.layers, result.power, result.peaks):
        share = power[1:] / max(power[1:].sum(), 1e-30)
        ax.bar(np.arange(1, len(power)), share, width=0.9, color="tab:blue")
        top = max(float(share.max()), 1e-12)
        for i, (period, s) in enumerate(peaks[:3]):  # staggered so neighbouring peaks stay readable
            ax.annotate(f"T={period:.3g}", (n / period, s), xytext=(n / period + 2, s + (0.12 - 0.06 * i) * top),
                        fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.5})
        ax.set_ylim(0, 1.3 * top)
        ax.set_title(f"layer {result.layer_name(layer)}", fontsize=9)
        ax.set_xlabel("frequency k (period N/k)", fontsize=8)
        ax.set_ylabel("power share", fontsize=8)
    fig.suptitle(f"Fourier spectrum of number tokens {int(result.numbers[0])}..{int(result.numbers[-1])} "
                 f"({Path(result.params['numbers_store']).name}, {result.params['hook']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_helix(result: Fourier, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [result.layer_name(layer) for layer in result.layers]
    for key, style in [("helix", "o-"), ("circle", "s--"), ("poly3", "^--"), ("shuffled", "x:"), ("pca", "k-")]:
        axes[0].plot(names, [f.r2[key] for f in result.helix], style, label=key + (" (ceiling)" if key == "pca" else ""))
    axes[0].set_ylim(min(0.0, min(f.r2["shuffled"] for f in result.helix)), 1.02)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("R² (PCA space)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("helix fit vs baselines", fontsize=10)
    best = int(np.argmax([f.r2["helix"] - f.r2["shuffled"] for f in result.helix]))
    fit = result.helix[best]
    if fit.plane is not None:
        sc = axes[1].scatter(fit.plane[:, 0], fit.plane[:, 1], c=result.numbers, cmap="viridis", s=14)
        fig.colorbar(sc, ax=axes[1], label="n")
        axes[1].set_title(f"layer {result.layer_name(result.layers[best])}: number tokens in the plane of "
                          f"T={fit.plane_period:g}", fontsize=10)
        axes[1].set_xlabel("cos coordinate")
        axes[1].set_ylabel("sin coordinate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_directions(result: Fourier, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(result.layers) + 2.5), squeeze=False)
    labels = [f"{p:g}" for p in result.direction_periods]
    vmax = max(float(np.nanmax(result.fve)), 1e-3)
    for ax, data, title in [(axes[0, 0], result.fve, "cos/sin(2π(a+b)/T)"),
                            (axes[0, 1], result.fve_shuffled, "same, a+b shuffled")]:
        im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=vmax, origin="lower")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45)
        ax.set_yticks(range(len(result.layers)), [result.layer_name(layer) for layer in result.layers], fontsize=7)
        ax.set_xlabel("period T")
        ax.set_ylabel("layer")
        ax.set_title(f"variance explained at '=': {title}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
