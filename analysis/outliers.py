"""Emergent outlier dimensions (Dettmers et al., LLM.int8(), arXiv 2208.07339), massive activations
(Sun et al., arXiv 2402.17762) and kurtosis per layer (Bondarenko et al., arXiv 2306.12929), in one
pass over a store; results written back under ``analysis/outliers/``.

Dettmers' criterion, as applied here: on the hidden states that feed the linear layers (the
outputs of ``ln1``, and of ``ln2`` for GPT-NeoX), a feature dimension is an outlier if |x| >= 6.0
occurs in it in >= 25% of the layers and at >= 6% of the sequence positions. Per sequence: the
fraction of layers with at least one such value in the dimension, and the fraction of positions
with such a value in any layer; then the mean of each over sequences (``aggregate="sequence"``,
the default), or the same fractions over all rows at once (``aggregate="corpus"``). A layer counts
once whichever of its hidden states (ln1, ln2) has the value.

Library use::

    from analysis.outliers import analyze_outliers
    rep = analyze_outliers("stores/demo.zarr")        # threads; scheduler="tcp://host:8786" to go wide
    rep.outlier_dims, print(rep.format())
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import AnalysisError, StoreError
from harvest.hookpoints import split_name
from harvest.objstore import is_url
from harvest.store import consolidate, open_group
from harvest.verify import names_damage

from . import stats
from .scan import ScanParams, ScanResult, run_scan
from .source import compact_layers, layers_label

GROUP = "analysis/outliers"


@dataclass
class OutlierReport:
    report: dict[str, Any]
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]] = field(default_factory=dict)
    scan: ScanResult | None = None

    @property
    def outlier_dims(self) -> list[int]:
        return [o["dim"] for o in self.report["outlier_dims"]]

    def to_json(self) -> str:
        return json.dumps(self.report, indent=2, default=_json_default)

    def format(self) -> str:
        return format_report(self.report)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


@names_damage  # a bad checksum anywhere inside is named in one line
def analyze_outliers(path: str | Path, params: ScanParams | None = None, *, index: bool = True, derive: bool = True,
                     scheduler=None, num_workers: int | None = None, write: bool = True,
                     plots: bool | str | Path = True, source: str = "auto") -> OutlierReport:
    """One pass over the store: outlier dimensions, massive activations, kurtosis and (``index``)
    the per-dimension index; results written into the store (``write``) and plots saved
    (``plots``: True for ``<store>.plots/`` beside the store, or a folder).

    ``source``: "statistics" takes Dettmers' criterion from the harvest-time statistics (over every
    token the harvest saw; no activation is read; no massive activations, kurtosis or index then) and
    fails when they cannot give it (absent, or another magnitude); "scan" reads the stored rows;
    "auto" (the default) takes the statistics when they cover tokens the store does not keep (sampled
    positions, deleted arrays) and scans otherwise, saying which and why."""
    params = params or ScanParams()
    check_params(params)
    if source not in ("auto", "statistics", "scan"):
        raise AnalysisError(f"source must be 'auto', 'statistics' or 'scan', not {source!r}")
    scan, why_not = (None, "--source scan asked for the scan") if source == "scan" else statistics_scan(path, params)
    if scan is not None and source == "auto" and not _statistics_preferred(scan):
        scan, why_not = None, ("every token is stored, and the scan of the rows also finds massive activations, "
                               "kurtosis and the index; --source statistics answers without reading them")
    if scan is None and source == "statistics":
        raise AnalysisError(f"{path}: Dettmers' criterion cannot come from the harvest-time statistics: {why_not}")
    if scan is not None:
        return _finish(rep_from_statistics(scan), scan, path, write, plots)
    scan = run_scan(path, params, index=index, outliers=True, derive=derive, scheduler=scheduler,
                    num_workers=num_workers)
    if scan.outliers is None:
        hooks = ", ".join(sorted(scan.facts.arrays)[:6]) or "none"
        raise AnalysisError(
            f"{path} has no hidden states that feed linear layers to analyse: it needs "
            "blocks.*.ln1.hook_normalized (or a raw residual, hook_resid_pre / hook_resid_post, together with the "
            f"LayerNorm weights in model/). Arrays here: {hooks}. "
            "Harvest with `capture.hooks: [blocks.*.ln1.hook_normalized]`")
    rep = build_report(scan)
    group = open_group(path)
    _lookup_rows(rep, scan, group)
    _note_statistics(rep, scan, group, why_not)
    if write and index and scan.index:
        from .index import write_index

        write_index(scan)
        rep.report["index"] = "analysis/index"
    return _finish(rep, scan, path, write, plots)


def _finish(rep: OutlierReport, scan: ScanResult, path, write, plots) -> OutlierReport:
    if write:
        write_results(rep, path)
    if plots:
        from .plots import save_plots

        folder = Path(plots) if not isinstance(plots, bool) else default_plot_dir(path)
        rep.report["plots"] = [str(p) for p in save_plots(rep, folder)]
    return rep


def _note_statistics(rep: OutlierReport, scan: ScanResult, group, why_not: str | None) -> None:
    """Say what the harvest-time statistics cover beside the stored rows this scan read, and why
    the criterion came from the scan instead."""
    from harvest.statistics import load_statistics

    stats = load_statistics(group)
    if stats is None:
        return
    tokens = stats.tokens(next(iter(stats.hooks)))
    rep.report["harvest_statistics"] = {
        "tokens": tokens, "rows": int(scan.facts.n_rows), "hooks": len(stats.hooks),
        "note": (f"harvest-time statistics cover {tokens:,} tokens (the store keeps {scan.facts.n_rows:,} rows): "
                 f"`harvest query dim` answers from them; the criterion here is from the stored rows ({why_not})")}


def statistics_scan(path: str | Path, params: ScanParams) -> tuple[ScanResult | None, str | None]:
    """Dettmers' state from the harvest-time statistics (no activation read), as a ``ScanResult``;
    or (None, why not)."""
    from harvest.statistics import load_dettmers, source_layers

    from .source import Source, StoreFacts

    facts = StoreFacts.load(path)
    try:
        dett = load_dettmers(facts.group())
    except ValueError as exc:
        return None, str(exc)
    if dett is None:
        return None, "the store has no harvest-time hit statistics (capture.statistics was off)"
    if not dett.sources:
        return None, "the harvest-time statistics cover no layer"
    if params.magnitude != dett.magnitude:
        return None, (f"the statistics counted |x| >= {dett.magnitude:g} at harvest time; --magnitude "
                      f"{params.magnitude:g} needs the stored rows")
    if params.aggregate != "sequence":
        return None, "the statistics keep per-sequence fractions; --aggregate corpus needs the stored rows"
    layers = sorted(set(source_layers(dett.sources)))
    sources = [Source(layer, name.split(".")[2], name, "statistics")
               for layer, name in zip(source_layers(dett.sources), dett.sources)]
    starts = np.concatenate([[0], np.cumsum(dett.states[0]["seq_len"])]).astype(np.int64)
    scan = ScanResult(facts, params, starts, sources, layers, [], None,
                      outliers=dett.reduce(params.layer_frac, params.pos_frac))
    return scan, None


def _statistics_preferred(scan: ScanResult) -> bool:
    """The statistics know more than the rows: positions were sampled, or the hidden states' arrays are gone."""
    from .source import plan_sources

    if int(scan.outliers["rows"]) > scan.facts.n_rows:
        return True
    return not plan_sources(scan.facts)[0]


def rep_from_statistics(scan: ScanResult) -> OutlierReport:
    rep = build_report(scan)
    tokens = int(scan.outliers["rows"])
    rep.report["massive"]["note"] = rep.report["kurtosis"]["note"] = (
        "not computed: the criterion came from the harvest-time statistics; --source scan reads the stored rows "
        "for them")
    rep.report["harvest_statistics"] = {
        "tokens": tokens, "rows": int(scan.facts.n_rows), "source": "statistics",
        "note": (f"harvest-time statistics cover {tokens:,} tokens (the store keeps {scan.facts.n_rows:,} rows): "
                 "the criterion is from them, and no row was read")}
    for key in ("kurtosis_seq", "max_norm_seq"):
        rep.arrays.pop(key, None)
    return rep


def default_plot_dir(path: str | Path) -> Path:
    """``demo.plots/`` beside ``demo.zarr``; for a store on object storage, in the working directory."""
    local = not is_url(path)
    path = Path(path)
    return (path.parent if local else Path(".")) / f"{path.name.removesuffix('.zarr')}.plots"


def check_params(p: ScanParams) -> None:
    """The parameters a user can get wrong, checked before anything is read (dry runs too)."""
    if not p.magnitude > 0:
        raise AnalysisError(f"magnitude must be > 0 (Dettmers: 6.0), not {p.magnitude}")
    for name in ("layer_frac", "pos_frac"):
        v = getattr(p, name)
        if not 0 <= v <= 1:
            paper = 0.25 if name == "layer_frac" else 0.06
            raise AnalysisError(f"{name} is a fraction in [0, 1] (Dettmers: {paper}), not {v}")
    if p.top_k < 1:
        raise AnalysisError(f"top_k must be >= 1, not {p.top_k}")
    if p.aggregate not in ("sequence", "corpus"):
        raise AnalysisError(f"aggregate must be 'sequence' or 'corpus', not {p.aggregate!r}")


# --- from statistics to the report ------------------------------------------------------------------

def build_report(scan: ScanResult) -> OutlierReport:
    p, facts, o = scan.params, scan.facts, scan.outliers
    layers, sources = scan.layers, scan.sources
    L, d = len(layers), o["hits"].shape[1]
    n = max(o["n_groups"], 1)
    layer_frac = o["layer_frac_sum"] / n
    pos_frac = o["pos_frac_sum"] / n
    group_frac = o["group_outlier"] / n
    layer_seq_frac = o["layer_any"] / n
    is_outlier = (layer_frac >= p.layer_frac - 1e-12) & (pos_frac >= p.pos_frac - 1e-12)
    src_layer = np.array([layers.index(s.layer) for s in sources])
    per_layer_max = np.zeros((L, d), np.float32)
    per_layer_hits = np.zeros((L, d), np.int64)
    per_layer_share = np.zeros((L, d))
    per_layer_bad = np.zeros((L, d), np.int64)  # NaN/inf left out of every statistic
    for li in range(L):
        sel = src_layer == li
        per_layer_bad[li] = o["nonfinite"][sel].sum(axis=0)
        # a (layer, dim) with no finite value has no maximum: NaN, never 0
        per_layer_max[li] = np.where(per_layer_bad[li] >= o["rows"] * sel.sum(), np.nan, o["max"][sel].max(axis=0))
        per_layer_hits[li] = o["hits"][sel].sum(axis=0)
        per_layer_share[li] = o["share_hits"][sel].sum(axis=0) / np.maximum(per_layer_hits[li], 1)
    hits_dim = o["hits"].sum(axis=0)
    total_values = o["rows"] * d * len(sources)
    outlier_dims = [int(x) for x in np.flatnonzero(is_outlier)]
    half = stats.hist_bins(p.magnitude)

    def describe(dim: int) -> dict[str, Any]:
        counts, sums = stats.hist_column(o["hist"], dim, p.magnitude)
        neg, pos = int(counts[:half].sum()), int(counts[half:].sum())
        affected = [layers[i] for i in np.flatnonzero(layer_seq_frac[:, dim] >= 0.5)]
        q1, q2, q3 = stats.hist_quantiles(counts, sums, (0.25, 0.5, 0.75))
        lnw = {key.split(".")[0]: [float(facts.ln[key][layer, dim]) for layer in layers]
               for key in ("ln1.w", "ln2.w") if key in facts.ln and dim < facts.ln[key].shape[1]}
        return {
            "dim": dim, "layer_frac": float(layer_frac[dim]), "pos_frac": float(pos_frac[dim]),
            "seq_frac": float(group_frac[dim]),
            "layers_affected": affected, "layers_affected_frac": len(affected) / max(L, 1),
            "layer_seq_frac": [float(v) for v in layer_seq_frac[:, dim]],
            "sign": "+" if neg == 0 and pos else "-" if pos == 0 and neg else "±",
            "one_sided": (neg == 0) != (pos == 0), "negative": neg, "positive": pos,
            "quartiles": [q1, q2, q3], "max_abs": _nanmax(per_layer_max[:, dim]),
            "max_abs_per_layer": [None if np.isnan(v) else float(v) for v in per_layer_max[:, dim]],
            "outlier_values": int(hits_dim[dim]),
            "share_sq_norm": float(o["share_hits"][:, dim].sum() / max(hits_dim[dim], 1)),
            "share_sq_norm_per_layer": [float(v) for v in per_layer_share[:, dim]],
            "ln_weight": lnw,
        }

    near = []
    dim_max = np.nan_to_num(np.fmax.reduce(per_layer_max, axis=0), nan=-1.0)  # -1: no finite value in the dim
    for dim in np.flatnonzero(~is_outlier & ((hits_dim > 0) | (dim_max >= 0.9 * p.magnitude))):
        mx = _nanmax(per_layer_max[:, dim]) or 0.0  # listed only with a hit or a value: never all NaN
        score = (min(1, layer_frac[dim] / max(p.layer_frac, 1e-12)) + min(1, pos_frac[dim] / max(p.pos_frac, 1e-12))
                 + min(1, mx / p.magnitude))
        if mx < p.magnitude:
            why = f"magnitude: max |x| {mx:.3g} < {p.magnitude:g}"
        elif layer_frac[dim] < p.layer_frac:
            why = f"layers: {layer_frac[dim]:.1%} < {p.layer_frac:.0%}"
        else:
            why = f"positions: {pos_frac[dim]:.2%} < {p.pos_frac:.0%}"
        near.append((score, int(dim), {"dim": int(dim), "layer_frac": float(layer_frac[dim]),
                                        "pos_frac": float(pos_frac[dim]), "max_abs": mx, "rejected_by": why}))
    near.sort(key=lambda t: (-t[0], t[1]))
    per_group = o["done_hits"][np.argsort(o["done_ids"])]
    outlier_hits = int(hits_dim[outlier_dims].sum()) if outlier_dims else 0
    warnings = []
    status = facts.info.get("status")
    if status not in (None, "complete"):
        warnings.append(f"the store's status is {status!r}: rows of batches not yet written are zeros and are "
                        "counted as such; analyse it again when the harvest completes")
    report: dict[str, Any] = {
        "store": str(facts.path), "rows": facts.n_rows, "sequences": len(scan.starts) - 1, "warnings": warnings,
        "seconds": round(scan.seconds, 3), "bytes_read": scan.bytes_read,
        "mib_per_s": round(scan.bytes_read / 2**20 / scan.seconds, 1) if scan.seconds else None,
        "params": p.to_dict(),
        "criterion": (f"|x| >= {p.magnitude:g} in >= {p.layer_frac:.0%} of layers and at >= {p.pos_frac:.0%} of "
                      f"positions, " + ("per sequence, then the mean over sequences" if p.aggregate == "sequence"
                                        else "over all rows at once (corpus)")),
        "hidden_states": {
            "layers": layers, "n_layers": L, "model_type": facts.model_type,
            "sources": [{"layer": s.layer, "ln": s.ln, "array": s.array, "how": s.how} for s in sources],
            "ln_applied": any(s.how != "stored" for s in sources), "notes": scan.notes,
            "summary": _describe_sources(sources),
        },
        "groups": int(o["n_groups"]),
        "outlier_dims": [describe(dim) for dim in outlier_dims],
        "near_misses": [t[2] for t in near[:5]],
        "values": {
            "total": int(total_values), "ge_magnitude": int(hits_dim.sum()),
            "ge_magnitude_frac": float(hits_dim.sum() / max(total_values, 1)),
            "in_outlier_dims": outlier_hits, "outlier_frac": float(outlier_hits / max(total_values, 1)),
            "outlier_per_sequence": float(outlier_hits / n),
            "ge_magnitude_per_sequence": {"mean": float(per_group.mean()) if per_group.size else 0.0,
                                          "min": int(per_group.min()) if per_group.size else 0,
                                          "max": int(per_group.max()) if per_group.size else 0},
        },
        "massive": _massive_report(scan),
        "kurtosis": _kurtosis_report(scan),
        "nonfinite": _nonfinite_report(scan, per_layer_bad, layers, int(o["rows"]) * d),
    }
    if report["nonfinite"]["total"]:
        warnings.append(report["nonfinite"]["summary"])
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {
        "layers": (np.asarray(layers, np.int64), ("layer",)),
        "max_abs": (per_layer_max, ("layer", "d_model")),
        "hits": (per_layer_hits, ("layer", "d_model")),
        "nonfinite": (per_layer_bad, ("layer", "d_model")),
        "layer_seq_frac": (layer_seq_frac, ("layer", "d_model")),
        "share_sq_norm": (per_layer_share.astype(np.float32), ("layer", "d_model")),
        "layer_frac": (layer_frac, ("d_model",)), "pos_frac": (pos_frac, ("d_model",)),
        "seq_frac": (group_frac, ("d_model",)), "is_outlier": (is_outlier, ("d_model",)),
        "outlier_dims": (np.asarray(outlier_dims, np.int64), ("outlier",)),
        "hits_per_sequence": (per_group.astype(np.int64), ("sequence",) if p.aggregate == "sequence" else ("corpus",)),
    }
    hist_dims = outlier_dims or [int(x) for x in np.argsort(-dim_max, kind="stable")[:4]]
    hc = np.stack([stats.hist_column(o["hist"], dim, p.magnitude)[0] for dim in hist_dims])
    hs = np.stack([stats.hist_column(o["hist"], dim, p.magnitude)[1] for dim in hist_dims])
    arrays["hist_dims"] = (np.asarray(hist_dims, np.int64), ("hist_dim",))
    arrays["hist_counts"] = (hc, ("hist_dim", "bin"))
    arrays["hist_sums"] = (hs, ("hist_dim", "bin"))
    arrays["hist_edges"] = (stats.hist_edges(p.magnitude), ("bin",))
    if scan.kurtosis:
        rl = sorted(scan.kurtosis)
        arrays["residual_layers"] = (np.asarray(rl, np.int64), ("residual_layer",))
        arrays["kurtosis_seq"] = (np.stack([_by_seq(scan.kurtosis[x], "kurtosis", scan) for x in rl], axis=1),
                                  ("sequence", "residual_layer"))
        arrays["max_norm_seq"] = (np.stack([_by_seq(scan.kurtosis[x], "max_norm", scan) for x in rl], axis=1),
                                  ("sequence", "residual_layer"))
    return OutlierReport(report, arrays, scan)


def _by_seq(k: dict, key: str, scan: ScanResult) -> np.ndarray:
    out = np.full(len(scan.starts) - 1, np.nan)
    out[k["seq"]] = k[key]
    return out


def _describe_sources(sources) -> list[str]:
    out = []
    keyed: dict[tuple[str, str], list[int]] = {}
    for s in sources:
        template = split_name(s.array)[0]
        keyed.setdefault((s.ln, f"{s.how}:{template}"), []).append(s.layer)
    for (ln, how), layers in keyed.items():
        kind, template = how.split(":", 1)
        what = {"stored": f"stored blocks.{{l}}.{template}",
                "statistics": f"harvest-time statistics of blocks.{{l}}.{template} (every token)",
                "resid": f"LayerNorm {ln} (stored weights) applied to the raw residual ({template})",
                "ln1": f"stored ln1.hook_normalized re-weighted to {ln}"}[kind]
        out.append(f"{ln} of {layers_label(layers)}: {what}")
    return out


def _massive_report(scan: ScanResult) -> dict[str, Any]:
    p = scan.params
    rep: dict[str, Any] = {"source": scan.residual_kind,
                           "criterion": f"|x| > {p.massive_abs:g} and >= {p.massive_ratio:g}x the median |x| of the "
                                        "token's hidden state", "found": []}
    if not scan.massive:
        rep["note"] = "no residual stream (hook_resid_post / hook_resid_pre) in the store"
        return rep
    for layer in sorted(scan.massive):
        m = scan.massive[layer]
        for dim in np.flatnonzero(m["count"]):
            sel = m["dim"] == dim
            rep["found"].append({"layer": int(layer), "dim": int(dim), "count": int(m["count"][dim]),
                                 "max_abs": float(np.abs(m["value"][sel]).max()) if sel.any() else None,
                                 "_rows": m["row"][sel], "_values": m["value"][sel], "_median": m["median"][sel]})
    return rep


def _nanmax(a: np.ndarray) -> float | None:
    """The largest non-NaN value, or None when there is none (a layer with no finite value)."""
    a = np.asarray(a, np.float64)
    return float(np.max(a[~np.isnan(a)])) if (~np.isnan(a)).any() else None


def _nonfinite_report(scan: ScanResult, per_layer_bad: np.ndarray, layers: list[int], per_layer_values: int
                      ) -> dict[str, Any]:
    """How many NaN/inf values every statistic left out, and where (arrays, rows, analysed layers)."""
    arrays = []
    for name, nf in sorted(scan.nonfinite.items()):
        if nf["nonfinite_total"]:
            arrays.append({"array": name, "values": nf["nonfinite_total"], "rows": nf["nonfinite_rows"],
                           "first_row": nf["nonfinite_first_row"], "dims": int((nf["nonfinite"] > 0).sum()),
                           "no_finite_value": nf["no_finite"]})
    states = [{"layer": int(layers[li]), "values": int(per_layer_bad[li].sum()),
               "no_finite_value": bool(per_layer_values and per_layer_bad[li].sum() >= per_layer_values
                                       * max(1, sum(1 for s in scan.sources if s.layer == layers[li])))}
              for li in range(len(layers)) if per_layer_bad[li].any()]
    total = sum(a["values"] for a in arrays)
    summary = ""
    if total:
        dead = [a["array"] for a in arrays if a["no_finite_value"]]
        summary = (f"{total:,} NaN/inf values left out of every statistic, in {len(arrays)} array(s): "
                   + ", ".join(f"{a['array']} {a['values']:,} (rows from {a['first_row']})" for a in arrays[:4])
                   + (f", ... ({len(arrays) - 4} more, --json)" if len(arrays) > 4 else "")
                   + (f"; no finite value at all in {', '.join(dead[:4])}: their statistics are NaN, not 0"
                      if dead else ""))
    return {"total": total, "arrays": arrays, "hidden_states": states, "summary": summary,
            "rule": "NaN and inf are counted and excluded from every statistic (moments, max |x|, hits, top rows, "
                    "kurtosis); a layer or dimension with no finite value has NaN statistics"}


def _kurtosis_report(scan: ScanResult) -> dict[str, Any]:
    if not scan.kurtosis:
        return {"source": None, "layers": []}
    out = []
    for layer in sorted(scan.kurtosis):
        k = scan.kurtosis[layer]
        some = ~np.isnan(k["kurtosis"])
        name = (residual_name(scan, layer) or "")
        bad = scan.nonfinite.get(name, {}).get("nonfinite_total", 0)
        if not some.any():  # every value NaN/inf: no kurtosis, no max (never 0)
            out.append({"layer": int(layer), "kurtosis": None, "kurtosis_max": None, "max_norm": None,
                        "max_norm_mean": None, "no_finite_value": True, "nonfinite": bad})
            continue
        out.append({"layer": int(layer), "kurtosis": float(np.mean(k["kurtosis"][some])),
                    "kurtosis_max": float(np.max(k["kurtosis"][some])), "max_norm": float(np.max(k["max_norm"][some])),
                    "max_norm_mean": float(np.mean(k["max_norm"][some])), "no_finite_value": False, "nonfinite": bad,
                    "sequences_without_finite_values": int((~some).sum())})
    return {"source": scan.residual_kind,
            "definition": "non-excess kurtosis mean((x-mu)^4)/(sigma^4+1e-6) of each sequence's flattened tensor, "
                          "averaged over sequences; max-norm = max |x|", "layers": out}


def residual_name(scan: ScanResult, layer: int) -> str | None:
    """The residual array kurtosis and massive activations of ``layer`` were computed on."""
    from .source import residual_arrays

    return residual_arrays(scan.facts)[0].get(layer)


def _lookup_rows(rep: OutlierReport, scan: ScanResult, group) -> None:
    """Sequence, position and token of the massive activations' rows (reads only those rows)."""
    found = rep.report["massive"]["found"]
    rows = np.unique(np.concatenate([f["_rows"] for f in found])) if found else np.zeros(0, np.int64)
    pos = np.asarray(group["pos"].get_coordinate_selection(rows)) if rows.size else np.zeros(0, np.int64)
    tok = np.asarray(group["tokens"].get_coordinate_selection(rows)) if rows.size else np.zeros(0, np.int64)
    decode = token_decoder(group)
    records = {k: [] for k in ("layer", "dim", "row", "seq", "pos", "token", "value", "median")}
    for f in found:
        r, v, med = f.pop("_rows"), f.pop("_values"), f.pop("_median")
        at = np.searchsorted(rows, r)
        seq = np.searchsorted(scan.starts, r, side="right") - 1
        positions, counts = np.unique(pos[at], return_counts=True)
        top = np.argsort(-counts, kind="stable")[:3]
        f["positions"] = {int(positions[i]): int(counts[i]) for i in top}
        if r.size:
            i = int(np.argmax(np.abs(v)))
            f["example"] = {"seq": int(seq[i]), "pos": int(pos[at][i]), "token_id": int(tok[at][i]),
                            "token": decode([int(tok[at][i])]), "value": float(v[i]), "median_abs": float(med[i]),
                            "ratio": float(abs(v[i]) / med[i]) if med[i] else None}
        for key, val in (("layer", np.full(r.size, f["layer"])), ("dim", np.full(r.size, f["dim"])), ("row", r),
                         ("seq", seq), ("pos", pos[at]), ("token", tok[at]), ("value", v), ("median", med)):
            records[key].append(np.asarray(val))
    for key, parts in records.items():
        arr = np.concatenate(parts) if parts else np.zeros(0, np.float32 if key in ("value", "median") else np.int64)
        rep.arrays[f"massive/{key}"] = (arr, ("record",))


def token_decoder(group):
    """``decode(ids) -> str`` from the tokenizer stored in the store (fast ``tokenizers`` path);
    falls back to ids as text when the store has no tokenizer."""
    import tempfile

    from harvest.store import read_files

    if "tokenizer" not in group:
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    with tempfile.TemporaryDirectory(prefix="harvest-tok-") as tmp:
        folder = read_files(group["tokenizer"], Path(tmp))
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
        return lambda ids: hf.decode([int(i) for i in ids])


# --- writing back into the store ---------------------------------------------------------------------

def write_results(rep: OutlierReport, path: str | Path) -> None:
    """Replace ``analysis/outliers/`` with this run's arrays; the report and parameters in its attrs."""
    from harvest.store import write_small

    try:
        root = open_group(path, mode="r+")
    except (PermissionError, OSError) as exc:
        raise StoreError(f"cannot write the results into {path} ({exc}); rerun with --no-write") from None
    analysis = root.require_group("analysis")
    if "outliers" in analysis:
        del analysis["outliers"]
    out = analysis.require_group("outliers")
    for name, (data, dims) in rep.arrays.items():
        parent = out
        if "/" in name:
            sub, name = name.split("/", 1)
            parent = out.require_group(sub)
        write_small(parent, name, np.asarray(data), dims)
    out.attrs["outliers"] = json.loads(json.dumps({
        "params": rep.report["params"], "criterion": rep.report["criterion"],
        "hidden_states": rep.report["hidden_states"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "report": {k: v for k, v in rep.report.items() if k not in ("params", "hidden_states")},
    }, default=_json_default))
    consolidate(path)  # the store is finished again: xarray opens it in one read


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The stored report of the last ``analyze outliers`` run, or None."""
    group = open_group(path)
    if "analysis" not in group or "outliers" not in group["analysis"]:
        return None
    return dict(group["analysis/outliers"].attrs.get("outliers", {}))


# --- the terminal table ------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 or x == 0 else f"{x:.3%}"


def format_report(r: dict[str, Any]) -> str:
    hs = r["hidden_states"]
    lines = [f"store      {r['store']}  ({r['rows']:,} rows, {r['sequences']:,} sequences; "
             f"{r['bytes_read'] / 2**20:,.1f} MiB read in {r['seconds']:.2f} s"
             + (f", {r['mib_per_s']:,.0f} MiB/s)" if r.get("mib_per_s") else ")")]
    lines.append(f"states     {hs['n_layers']} layers of hidden states feeding linear layers ({hs['model_type']}):")
    lines += [f"             {s}" for s in hs["summary"]]
    if hs["ln_applied"]:
        lines += [f"  note     {n}" for n in hs["notes"]]
    lines += [f"warning    {w}" for w in r.get("warnings", [])]
    if r.get("harvest_statistics"):
        lines.append(f"statistics {r['harvest_statistics']['note']}")
    lines.append(f"criterion  {r['criterion']}")
    v = r["values"]
    lines.append(f"values     {_pct(v['ge_magnitude_frac'])} of all values have |x| >= {r['params']['magnitude']:g}; "
                 f"{_pct(v['outlier_frac'])} are in outlier dims ({v['outlier_per_sequence']:,.1f} per "
                 f"{'sequence' if r['params']['aggregate'] == 'sequence' else 'corpus'}; Dettmers: ~0.1%)")
    dims = r["outlier_dims"]
    lines.append("")
    lines.append(f"outlier dimensions: {len(dims)}")
    if dims:
        lines.append(f"{'dim':>6} {'layers':>7} {'positions':>9} {'seqs':>6} {'sign':>4} {'q1':>9} {'median':>9} "
                     f"{'q3':>9} {'max|x|':>9} {'x²/‖x‖²':>8}  layers affected / LN weight there")
        for o in dims:
            q1, q2, q3 = o["quartiles"]
            lnw = "; ".join(f"{k}.w {min(w):.3g}..{max(w):.3g}" for k, w in o["ln_weight"].items() if w)
            lines.append(f"{o['dim']:>6} {o['layer_frac']:>7.1%} {o['pos_frac']:>9.1%} {o['seq_frac']:>6.0%} "
                         f"{o['sign'] + (' 1s' if o['one_sided'] else ''):>4} {q1:>9.4g} {q2:>9.4g} {q3:>9.4g} "
                         f"{o['max_abs']:>9.4g} {o['share_sq_norm']:>8.2f}  "
                         f"{compact_layers(o['layers_affected'])}" + (f"  ({lnw})" if lnw else ""))
    if r["near_misses"]:
        lines.append("near misses (rejected):")
        for m in r["near_misses"]:
            lines.append(f"{m['dim']:>6} {m['layer_frac']:>7.1%} {m['pos_frac']:>9.1%} max|x| {m['max_abs']:.4g}"
                         f"  -- {m['rejected_by']}")
    ma = r["massive"]
    lines.append("")
    if ma.get("note"):
        lines.append(f"massive activations: {ma['note']}")
    else:
        lines.append(f"massive activations ({ma['criterion']}; on {ma['source']}): {len(ma['found'])} (layer, dim)")
        for f in ma["found"][:12]:
            ex = f.get("example", {})
            lines.append(f"  layer {f['layer']:>3} dim {f['dim']:>5}: {f['count']:,} values, "
                         f"max |x| {f['max_abs']:.4g}; "
                         f"e.g. seq {ex.get('seq')} pos {ex.get('pos')} token {ex.get('token')!r} "
                         f"({ex.get('ratio', 0) or 0:,.0f}x median); positions {f['positions']}")
        if len(ma["found"]) > 12:
            lines.append(f"  ... {len(ma['found']) - 12} more (--json)")
    k = r["kurtosis"]
    if k["layers"]:
        lines.append(f"kurtosis per layer ({k['source']}; Gaussian = 3) and max |x|:")
        row = "  ".join(f"{x['layer']}:no finite value" if x.get("no_finite_value") else
                        f"{x['layer']}:{x['kurtosis']:.3g}/{x['max_norm']:.3g}" for x in k["layers"])
        lines.append(f"  {row}")
    if r.get("index"):
        lines.append(f"index      per-dimension index written to {r['index']} (query: harvest query dim STORE D)")
    if r.get("plots"):
        lines.append(f"plots      {', '.join(r['plots'])}")
    return "\n".join(lines)
