"""Query one dimension: where it fires, how large, on which tokens (``harvest query dim STORE D``).

Reads only the per-dimension index (one narrow chunk per index array), the stored outlier verdict,
the LayerNorm weights at that dimension, and the ``input_ids`` rows of the top-k sequences, so it
answers in well under a second however large the store is.

A store harvested with ``capture.statistics`` answers from those statistics instead (they cover
every token the model saw, stored or not; see :mod:`harvest.statistics`) and says so; the index
of the stored rows is the fallback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import AnalysisError, DimensionOutOfRangeError, HookNotInStoreError
from harvest.hookpoints import compact_layers, parse_pattern, resolve, split_name
from harvest.statistics import HarvestStatistics, load_statistics
from harvest.store import open_group
from harvest.verify import names_damage

from .index import index_meta, read_dim
from .reading import store_hooks

PREFERRED = ("ln1.hook_normalized", "hook_resid_post", "hook_resid_pre", "ln2.hook_normalized")


def resolve_hook(hook: str | None, layer: int | None, templates: dict[str, Any], store_hooks: list[str],
                 path: str | Path) -> tuple[str, int | None]:
    """(template, layer) from ``--hook`` (any name ``capture.hooks`` takes) and ``--layer``."""
    if hook is None:
        template = next((t for t in PREFERRED if t in templates), next(iter(templates)))
        return template, layer
    names = resolve(hook, store_hooks, where=str(path))
    template = split_name(names[0])[0]
    if parse_pattern(hook)[0] not in (None, "*"):
        named = sorted({split_name(name)[1] for name in names})
        if len(named) > 1:
            raise AnalysisError(f"--hook {hook} names layers {compact_layers(named)}; the query shows one layer "
                                "(blocks.N.… or --layer) or all of them")
        if layer is not None and layer != named[0]:
            raise AnalysisError(f"--hook {hook} names layer {named[0]} but --layer is {layer}; give one of them")
        layer = named[0]
    if template not in templates:
        raise HookNotInStoreError(f"{hook} is in the store but not in its index (indexed: {', '.join(templates)}); "
                                  f"rebuild it with `harvest index {path}`")
    return template, layer


@names_damage  # a bad checksum anywhere inside is named in one line
def query_dim(path: str | Path, dim: int, *, hook: str | None = None, layer: int | None = None, top: int = 10,
              context: int = 8) -> dict[str, Any]:
    """Per-layer statistics of dimension ``dim``, its outlier verdict, LN weights, and its top-k
    tokens in context (decoded with the store's tokenizer)."""
    t0 = time.perf_counter()
    group = open_group(path)
    stats = load_statistics(group, dim=dim) if dim >= 0 else None  # that dimension's column of each hook only
    if stats is None:  # no statistics, or a dimension out of range: the whole snapshot says which
        stats = load_statistics(group)
    meta = statistics_meta(group, stats) if stats is not None else None
    if meta is not None and hook is not None:
        try:
            resolve_hook(hook, layer, meta["templates"], store_hooks(group), path)
        except HookNotInStoreError:  # a stored hook without statistics: the index of its rows answers
            stats = meta = None
    if meta is None:
        meta = index_meta(group, path)
    templates = meta["templates"]
    template, layer = resolve_hook(hook, layer, templates, store_hooks(group), path)
    t = templates[template]
    width = int(t["width"])
    if not 0 <= dim < width:
        shape = "x".join(str(s) for s in t["trail"])
        raise DimensionOutOfRangeError(
            f"dimension {dim} is out of range for {template}: it has {width} dims (0..{width - 1}; shape {shape})")
    if top < 1:
        raise AnalysisError(f"--top must be >= 1, not {top}")
    if context < 0:
        raise AnalysisError(f"--context must be >= 0, not {context}")
    k = min(top, int(meta["top_k"]))
    layers = list(t["layers"])
    if layer is not None and layer not in layers:
        raise HookNotInStoreError(f"layer {layer} of {template} is not in the store's index; "
                                  f"indexed layers: {compact_layers([x for x in layers if x >= 0]) or 'none'}")
    data = statistics_dim(group, stats, t, dim, k) if stats is not None else read_dim(group, template, dim, k)
    ln = _ln_weights(group, dim) if t["trail_dims"] == ["d_model"] else {}
    rows = []
    for i, lay in enumerate(layers):
        row = {"layer": lay, "hook": t["hooks"][i], "count": int(data["count"][i]), "mean": float(data["mean"][i]),
               "std": float(data["std"][i]), "max_abs": float(data["max_abs"][i]), "count_ge": int(data["count_ge"][i]),
               "nonfinite": int(data["nonfinite"][i]) if "nonfinite" in data else 0}
        for name, w in ln.items():
            if 0 <= lay < len(w):
                row[f"{name}_w"] = float(w[lay])
        rows.append(row)
    pick = layers.index(layer) if layer is not None else int(np.argmax(np.nan_to_num(data["max_abs"], nan=-1.0)))
    examples = _examples(group, data, pick, context)
    result = {
        "store": str(path), "template": template, "dim": dim, "width": width,
        "coords": dict(zip(t["trail_dims"], (int(c) for c in np.unravel_index(dim, t["trail"])))),
        "threshold": meta["threshold"], "top_k_indexed": meta["top_k"], "source": meta["source"],
        "layers": rows if layer is None else [rows[pick]],
        "outlier": _verdict(group, dim) if t["trail_dims"] == ["d_model"] else None,
        "examples": {"layer": layers[pick], "hook": t["hooks"][pick],
                     "chosen": "--layer" if layer is not None else "the layer where max |x| peaks; --layer to choose",
                     "items": examples},
    }
    result["seconds"] = round(time.perf_counter() - t0, 4)
    return result


def statistics_meta(group, stats: HarvestStatistics) -> dict[str, Any]:
    """The index's attributes, for the harvest-time statistics (one template per hook kind)."""
    templates: dict[str, Any] = {}
    for hook in stats.hooks:
        template, layer = split_name(hook)
        t = templates.setdefault(template, {"hooks": [], "layers": [], "width": int(stats.widths[hook])})
        t["hooks"].append(hook)
        t["layers"].append(-1 if layer is None else int(layer))
    for template, t in templates.items():
        dims = tuple(group[t["hooks"][0]].metadata.dimension_names or ("token", "dim"))
        t.update(trail=[t["width"]], trail_dims=list(dims[1:]))
    hook = next(iter(stats.hooks))
    tokens, rows = stats.tokens(hook), int(group["tokens"].shape[0])
    source = (f"harvest-time statistics over {tokens:,} tokens (every position); the store keeps {rows:,} rows"
              if tokens != rows else f"harvest-time statistics over all {tokens:,} tokens")
    return {"top_k": stats.top_k, "threshold": stats.threshold, "templates": templates, "source": source,
            "tokens": tokens, "rows": rows}


def statistics_dim(group, stats: HarvestStatistics, t: dict[str, Any], dim: int, top: int) -> dict[str, np.ndarray]:
    """:func:`analysis.index.read_dim` from the harvest-time statistics; their rows number every
    position of every sequence, so sequence and position come from ``seq_length``."""
    per = [stats.hooks[h] for h in t["hooks"]]
    col = stats.column(dim)
    out = {key: np.array([r[key][col] for r in per]) for key in ("count", "mean", "std", "max_abs", "count_ge",
                                                                  "nonfinite")}
    k = min(top, min(r["top_rows"].shape[0] for r in per))
    out["top_rows"] = np.stack([r["top_rows"][:k, col] for r in per])
    out["top_values"] = np.stack([r["top_values"][:k, col] for r in per])
    starts = np.concatenate([[0], np.cumsum(np.asarray(group["seq_length"][...], np.int64))])
    out["top_seq"] = np.searchsorted(starts, out["top_rows"], side="right") - 1
    out["top_pos"] = (out["top_rows"] - starts[out["top_seq"]]).astype(np.int32)
    return out


def _ln_weights(group, dim: int) -> dict[str, np.ndarray]:
    out = {}
    if "model" not in group:
        return out
    for name in ("ln1", "ln2"):
        key = f"{name}.w"
        if key in group["model"] and dim < group["model"][key].shape[1]:
            out[name] = np.asarray(group["model"][key][:, dim])
    return out


def _verdict(group, dim: int) -> dict[str, Any] | None:
    if "analysis" not in group or "outliers" not in group["analysis"]:
        return {"analysed": False, "why": "no outlier analysis in this store yet: run `harvest analyze outliers STORE`"}
    g = group["analysis/outliers"]
    attrs = dict(g.attrs.get("outliers", {}))
    p = attrs.get("params", {})
    if dim >= g["is_outlier"].shape[0]:
        return None
    lf, pf, sf = float(g["layer_frac"][dim]), float(g["pos_frac"][dim]), float(g["seq_frac"][dim])
    mx = float(np.max(g["max_abs"][:, dim]))
    is_out = bool(g["is_outlier"][dim])
    alpha, tl, tp = p.get("magnitude", 6.0), p.get("layer_frac", 0.25), p.get("pos_frac", 0.06)
    per = "per sequence, mean over sequences" if p.get("aggregate", "sequence") == "sequence" else "over the corpus"
    if is_out:
        why = (f"outlier: |x| >= {alpha:g} in {lf:.0%} of layers (>= {tl:.0%}) at {pf:.1%} of positions "
               f"(>= {tp:.0%}), {per}")
    elif mx < alpha:
        why = f"not an outlier: max |x| is {mx:.3g} < {alpha:g} in every analysed layer"
    elif lf < tl:
        why = f"not an outlier: |x| >= {alpha:g} in only {lf:.1%} of layers (< {tl:.0%}); at {pf:.1%} of positions"
    else:
        why = f"not an outlier: |x| >= {alpha:g} in {lf:.0%} of layers but at only {pf:.2%} of positions (< {tp:.0%})"
    layers = np.asarray(g["layers"][...])
    lsf = np.asarray(g["layer_seq_frac"][:, dim])
    return {"analysed": True, "is_outlier": is_out, "why": why, "layer_frac": lf, "pos_frac": pf, "seq_frac": sf,
            "max_abs": mx, "layers_affected": [int(x) for x in layers[lsf >= 0.5]],
            "hidden_states": attrs.get("hidden_states", {}).get("summary", [])}


def _examples(group, data: dict, i: int, context: int) -> list[dict[str, Any]]:
    from .outliers import token_decoder

    values, rows, seqs, poss = data["top_values"][i], data["top_rows"][i], data["top_seq"][i], data["top_pos"][i]
    keep = rows >= 0
    values, rows, seqs, poss = values[keep], rows[keep], seqs[keep], poss[keep]
    if not rows.size:
        return []
    useq = np.unique(seqs)
    ids = np.asarray(group["input_ids"].get_orthogonal_selection((useq, slice(None))))
    decode = token_decoder(group)
    items = []
    for rank, (v, r, s, p) in enumerate(zip(values, rows, seqs, poss)):
        line = ids[np.searchsorted(useq, s)]
        n = int((line >= 0).sum())
        lo, hi = max(0, p - context), min(n, p + context + 1)
        items.append({"rank": rank + 1, "value": float(v), "row": int(r), "seq": int(s), "pos": int(p),
                      "token_id": int(line[p]), "token": decode([line[p]]), "left": decode(line[lo:p]),
                      "right": decode(line[p + 1:hi])})
    return items


def format_query(q: dict[str, Any]) -> str:
    coords = ", ".join(f"{k} {v}" for k, v in q["coords"].items()) + "; " if len(q["coords"]) > 1 else ""
    lines = [f"dim {q['dim']} of {q['template']} ({coords}width {q['width']}) in {q['store']}",
             f"from {q['source']}"]
    o = q.get("outlier")
    if o:
        lines.append(o["why"])
        if o.get("analysed") and o.get("layers_affected"):
            lines.append(f"layers affected: {compact_layers(o['layers_affected'])}")
    lnk = [k for k in ("ln1_w", "ln2_w") if any(k in r for r in q["layers"])]
    head = f"{'layer':>5} {'count':>9} {'mean':>10} {'std':>10} {'max|x|':>10} {'>=' + format(q['threshold'], 'g'):>8}"
    lines.append(head + "".join(f" {k.replace('_w', '.w'):>8}" for k in lnk))
    for r in q["layers"]:
        lines.append(f"{r['layer'] if r['layer'] >= 0 else '-':>5} {r['count']:>9,} {r['mean']:>10.4g} {r['std']:>10.4g} {r['max_abs']:>10.4g} "
                     f"{r['count_ge']:>8,}" + "".join(f" {r.get(k, float('nan')):>8.3g}" for k in lnk)
                     + (f"  {r['nonfinite']:,} NaN/inf left out" if r.get("nonfinite") else "")
                     + ("  (no finite value)" if r.get("nonfinite") and not r["count"] else ""))
    ex = q["examples"]
    where = f"layer {ex['layer']}" if ex["layer"] >= 0 else ex["hook"]
    lines.append(f"top {len(ex['items'])} tokens by |x| at {where} ({ex['chosen']}):")
    for it in ex["items"]:
        ctx = f"{it['left']}[[{it['token']}]]{it['right']}".replace("\n", "⏎")
        lines.append(f"  {it['value']:>+10.4g}  seq {it['seq']:>6} pos {it['pos']:>5}  {ctx}")
    lines.append(f"({q['seconds'] * 1000:.0f} ms)")
    return "\n".join(lines)


def to_json(q: dict[str, Any]) -> str:
    return json.dumps(q, indent=2, ensure_ascii=False)
