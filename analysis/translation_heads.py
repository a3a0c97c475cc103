"""Translation heads: which attention heads look up the aligned source word (Nanda, open problem 2.32).

Input: ``blocks.{l}.attn.hook_pattern`` harvested on the ``translation`` prompt source, whose
``meta/src_span`` and ``meta/tgt_span`` give, for each aligned word j, the source and target
token spans ``[start, end)``; ``p_j`` = ``tgt_span[j, 0]`` is the first token of target word j.

Scores per (layer, head), first per prompt then averaged over prompts:

- ``ts_next``: mean over target words j of the attention from ``p_j − 1`` (the position whose
  next-token prediction is word j) to all tokens of source word j;
- ``ts_cur``: the same from ``p_j`` itself;
- ``ts_next_last`` / ``ts_cur_last``: the same onto the source word's last token only.

Baseline: the same score with the alignment permuted within each prompt. We use its exact
expectation under a uniformly random derangement (each target word matched to another source word
of the same prompt): the mean attention onto the *other* source words. ``*_delta`` = score −
baseline; ``*_z`` = mean(delta) / (sd(delta) / √n) over prompts.

Controls, on the same heads, to tell a translation head from a plain previous-token or induction
head:

- ``prev_token``: mean over queries i ≥ 1 of the attention from i to i − 1 (natural text: the
  ``text`` store, else the translation prompts themselves);
- ``prefix_matching``: induction's prefix-matching score (Olsson et al. 2022) on repeated random
  tokens (the ``repeated_tokens`` store). **Offset convention**: the query at position i scores
  the attention it puts on keys k with ``1 ≤ k < i`` and ``ids[k − 1] == ids[i]`` — the token
  *after* an earlier occurrence of the current token (offset +1, so on a sequence repeated with
  period L the target is ``k = i − L + 1``); queries with no such key are left out. Attending to
  the earlier occurrence itself (offset 0) is a duplicate-token head, not counted here.

Caveat worth knowing when reading real models: with the default template (``English: …\\nFrench:
…``) the query for the first target word is the second ``:``, and the token after the first ``:``
is the first source word — so a plain induction head earns TS_next credit on j = 1 (a quarter of
its score with four words). The controls show such a head for what it is.

Everything is computed per block of sequences (one Dask task per stored chunk) and reduced on the
small per-prompt scores, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import AnalysisError, HookNotInStoreError
from harvest.hookpoints import compact_layers
from harvest.store import consolidate
from harvest.verify import names_damage

from .plots import figure_path, pyplot
from .reading import lazy_array, hook_layers, open_store, prompt_source, provenance, read, stored_heads
from .results import format_table, jsonable, result_group, write_array
from .runtime import dask_scheduler

RESULT_GROUP = "translation_heads"
PATTERN = "attn.hook_pattern"
#: per-prompt translation scores: (query offset from p_j, whole span or last token)
TRANSLATION_SCORES = {"ts_next": (-1, "span"), "ts_cur": (0, "span"),
                      "ts_next_last": (-1, "last"), "ts_cur_last": (0, "last")}
#: a head's role in the table: thresholds on (delta, z) and on the controls
ROLE_THRESHOLDS = {"delta": 0.2, "z": 3.0, "prev_token": 0.5, "prefix_matching": 0.3}
SORT_KEYS = ("ts_next_delta", "ts_cur_delta", "ts_next_last_delta", "ts_cur_last_delta", "prev_token",
             "prefix_matching")


# --- per-block scores (pure NumPy; tested against loops) --------------------------------------------

def translation_block(pattern: np.ndarray, src: np.ndarray, tgt: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-prompt scores and baselines for one block of sequences.

    ``pattern`` (seq, head, query, key); ``src``/``tgt`` (seq, word, 2) token spans, −1 where a
    prompt has fewer words. Returns (seq, head, len(TRANSLATION_SCORES), 2): [..., 0] the score,
    [..., 1] the permutation baseline; NaN where a prompt has no scorable word (or, for the
    baseline, fewer than two).
    """
    pattern = np.asarray(pattern, dtype=np.float64)
    n_seq, n_head, n_q, n_k = pattern.shape
    keys = np.arange(n_k)
    valid_w = (src[..., 0] >= 0) & (src[..., 1] > src[..., 0]) & (tgt[..., 0] >= 0)  # (seq, word)
    out = np.full((n_seq, n_head, len(TRANSLATION_SCORES), 2), np.nan)
    for m, (offset, kind) in enumerate(TRANSLATION_SCORES.values()):
        lo = src[..., 0] if kind == "span" else src[..., 1] - 1
        key_mask = (keys >= lo[..., None]) & (keys < src[..., 1][..., None]) & valid_w[..., None]  # (s, w', k)
        query = tgt[..., 0] + offset  # (s, j)
        ok = valid_w & (query >= 0) & (query < lengths[:, None])
        q = np.clip(query, 0, n_q - 1)
        rows = np.take_along_axis(pattern, q[:, None, :, None].repeat(n_head, 1), axis=2)  # (s, h, j, k)
        to_word = np.einsum("shjk,swk->shjw", rows, key_mask.astype(np.float64))  # attention j -> word w'
        diag = np.einsum("shjj->shj", to_word)
        others = to_word.sum(-1) - diag
        n_words = valid_w.sum(-1)  # (s,)
        base = others / np.maximum(n_words - 1, 1)[:, None, None]
        okf = ok[:, None, :]
        count = ok.sum(-1)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(okf, diag, 0).sum(-1) / count
            baseline = np.where(okf, base, 0).sum(-1) / count
        baseline = np.where((n_words >= 2)[:, None], baseline, np.nan)
        out[..., m, 0] = score
        out[..., m, 1] = baseline
    return out


def control_block(pattern: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-sequence (prev_token, prefix_matching) for one block: (seq, head, 2), NaN where undefined."""
    pattern = np.asarray(pattern, dtype=np.float64)
    n_seq, n_head, n_q, n_k = pattern.shape
    ids = np.asarray(ids)[:, :n_q]
    i = np.arange(n_q)
    live = i[None, :] < lengths[:, None]  # (s, q)
    # previous token: A[i, i-1] for 1 <= i < len
    prev = pattern[:, :, np.arange(1, n_q), np.arange(n_q - 1)] if n_q > 1 else np.zeros((n_seq, n_head, 0))
    prev_ok = live[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        prev_score = np.where(prev_ok[:, None], prev, 0).sum(-1) / prev_ok.sum(-1)[:, None]
    # prefix matching: keys k (1 <= k < i) whose previous token equals the query's token
    before = np.full_like(ids, -2)
    before[:, 1:] = ids[:, :-1]  # before[s, k] = ids[s, k-1]
    k = np.arange(n_k)
    match = (before[:, None, :n_k] == ids[:, :, None]) & (k[None, None, :] >= 1) & (k[None, None, :] < i[None, :, None])
    match &= live[:, :, None] & (ids[:, :, None] >= 0)
    eligible = match.any(-1)  # (s, q)
    mass = np.einsum("shqk,sqk->shq", pattern, match.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        prefix = np.where(eligible[:, None], mass, 0).sum(-1) / eligible.sum(-1)[:, None]
    return np.stack([prev_score, prefix], axis=-1)


# --- reading a store ----------------------------------------------------------------------------------

def _pattern_layers(group, path: Path) -> dict[int, str]:
    try:
        return hook_layers(group, PATTERN, path)
    except HookNotInStoreError:
        raise AnalysisError(f"{path} has no attention patterns; harvest with capture.hooks: "
                            "['blocks.*.attn.hook_pattern']") from None


def _pattern_heads(group, layers: dict[int, str]) -> np.ndarray:
    return stored_heads(group, group[next(iter(layers.values()))].shape[1])


def _count_nonfinite(block: np.ndarray) -> tuple[int, int, int]:
    """NaN/inf values in a block of patterns, its size, and the prompts holding any."""
    bad = ~np.isfinite(block)
    return int(bad.sum()), int(block.size), int(bad.reshape(block.shape[0], -1).any(axis=1).sum())


def _excluding_nonfinite(fn, block: np.ndarray, *args) -> np.ndarray:
    """``fn``'s per-(prompt, head) scores, NaN where that prompt's pattern for that head holds a NaN/inf:
    such a prompt is left out of every mean (``_nanmean0``), not scored on broken probabilities."""
    out = np.array(fn(block, *args), dtype=np.float64)
    bad = ~np.isfinite(block).reshape(block.shape[0], block.shape[1], -1).all(axis=-1)
    out[bad] = np.nan
    return out


def _per_sequence(group, layers: dict[int, str], fn, meta: list[np.ndarray],
                  nonfinite: dict[int, dict[str, int]] | None = None) -> dict[int, np.ndarray]:
    """``fn(pattern_block, *meta_block, lengths_block)`` over every block of every layer, concatenated.

    ``nonfinite``: filled with each layer's NaN/inf count (same read of each block)."""
    import dask

    lengths = read(group, "seq_length").astype(np.int64)
    tasks, counts = {}, {}
    for layer, name in layers.items():
        arr = lazy_array(group, name)
        arr = arr.rechunk({1: -1, 2: -1, 3: -1})
        starts = np.concatenate([[0], np.cumsum(arr.chunks[0])])
        blocks = arr.to_delayed().ravel()
        tasks[layer] = [dask.delayed(_excluding_nonfinite)(fn, b, *(m[s0:s1] for m in meta), lengths[s0:s1])
                        for b, s0, s1 in zip(blocks, starts[:-1], starts[1:])]
        if nonfinite is not None:
            counts[layer] = [dask.delayed(_count_nonfinite)(b) for b in blocks]
    computed, counted = dask.compute(tasks, counts)
    for layer, parts in counted.items():
        bad, size, prompts = (sum(p[i] for p in parts) for i in range(3))
        if bad:
            nonfinite[layer] = {"values": bad, "no_finite_value": bad == size, "prompts_left_out": prompts}
    return {layer: np.concatenate(parts) for layer, parts in computed.items()}


def _summary(per_prompt: np.ndarray) -> dict[str, np.ndarray]:
    """score, baseline, delta, z over prompts from per-prompt (seq, ..., 2) values (NaN-aware)."""
    score, base = per_prompt[..., 0], per_prompt[..., 1]
    delta = score - base
    n = np.sum(np.isfinite(delta), axis=0)
    mean = _nanmean0(delta)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.nansum((delta - mean) ** 2, axis=0) / np.maximum(n - 1, 1)
        z = mean / np.maximum(np.sqrt(var), 1e-9) * np.sqrt(n)
    return {"": _nanmean0(score), "_baseline": _nanmean0(base), "_delta": mean, "_z": np.where(n > 1, z, np.nan)}


@dataclass
class TranslationHeads:
    """Scores per (layer, head), the per-prompt deltas behind them, and where things were written."""

    store: Path
    layers: np.ndarray
    heads: np.ndarray
    scores: dict[str, np.ndarray]  #: name -> (layer, head)
    per_prompt: dict[str, np.ndarray] = field(default_factory=dict)  #: name -> (sequence, layer, head)
    params: dict[str, Any] = field(default_factory=dict)
    figure: Path | None = None

    def ranked(self, sort: str = "ts_next_delta") -> list[dict[str, Any]]:
        """Every head as a dict of its scores, best first by ``sort`` (NaN last)."""
        if sort not in self.scores:
            raise AnalysisError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
        rows = []
        for li, layer in enumerate(self.layers):
            for hi, head in enumerate(self.heads):
                row = {"layer": int(layer), "head": int(head)}
                row.update({k: float(v[li, hi]) for k, v in self.scores.items()})
                row["role"] = role(row, self.params.get("role_thresholds", ROLE_THRESHOLDS))
                if (self.params.get("nonfinite") or {}).get(str(int(layer)), {}).get("no_finite_value"):
                    row["role"] = "no finite value"
                rows.append(row)
        key = np.array([r[sort] for r in rows])
        order = np.argsort(np.where(np.isfinite(key), -key, np.inf), kind="stable")
        return [rows[i] for i in order]

    def table(self, top: int | None = 10, sort: str = "ts_next_delta") -> str:
        cols = [("layer", "layer"), ("head", "head"), ("ts_next", "TS_next"), ("ts_next_baseline", "base"),
                ("ts_next_delta", "Δnext"), ("ts_next_z", "z"), ("ts_cur_delta", "Δcur"), ("ts_cur_z", "z_cur"),
                ("ts_next_last_delta", "Δnext_last"), ("prev_token", "prev_tok"),
                ("prefix_matching", "prefix"), ("role", "role")]
        rows = self.ranked(sort)[:top]
        table = format_table([c[1] for c in cols], [[r[c[0]] for c in cols] for r in rows], floats="{:.3f}")
        bad = self.params.get("nonfinite") or {}
        if bad:  # say what was left out, and where
            table += "\nnon-finite: " + "; ".join(
                f"layer {layer}: {nf['values']:,} NaN/inf" + (" (no finite value)" if nf["no_finite_value"] else
                                                             f", {nf['prompts_left_out']} prompt(s) left out")
                for layer, nf in bad.items())
        return table

    def to_dict(self, top: int | None = None, sort: str = "ts_next_delta") -> dict[str, Any]:
        return jsonable({"store": self.store, "params": self.params, "figure": self.figure,
                         "heads": self.ranked(sort)[:top]})


def role(row: dict[str, Any], th: dict[str, float]) -> str:
    """A short label for the table: which score(s) clear their threshold."""
    tags = []
    if row["ts_next_delta"] >= th["delta"] and row["ts_next_z"] >= th["z"]:
        tags.append("translation(next)")
    if row["ts_cur_delta"] >= th["delta"] and row["ts_cur_z"] >= th["z"]:
        tags.append("translation(cur)")
    if np.isfinite(row["prev_token"]) and row["prev_token"] >= th["prev_token"]:
        tags.append("previous-token")
    if np.isfinite(row["prefix_matching"]) and row["prefix_matching"] >= th["prefix_matching"]:
        tags.append("induction")
    return ",".join(tags) or "-"


def _controls(path: Path, layers: dict[int, str], have: dict[int, str]) -> dict[int, np.ndarray]:
    """Per-sequence control scores (seq, head, 2) per layer of ``path``; NaN for layers it lacks."""
    group = open_store(path)
    ids = read(group, "input_ids")
    found = _per_sequence(group, {layer: have[layer] for layer in layers if layer in have}, control_block, [ids])
    n_heads = group[next(iter(have.values()))].shape[1]
    return {layer: found.get(layer, np.full((ids.shape[0], n_heads, 2), np.nan)) for layer in layers}


@dataclass
class TranslationPlan:
    """What an analysis will read, compute and write, checked from the stores' metadata alone."""

    store: Path
    layers: dict[int, str]  #: layer -> attention-pattern array
    heads: np.ndarray  #: model head index of each stored head
    n_prompts: int
    words_per_prompt: int
    text: Path  #: store of the previous-token control
    repeated: Path  #: store of the prefix-matching control
    controls: dict[Path, dict[int, str]]  #: control store -> its pattern arrays

    def describe(self) -> str:
        """The dry run's answer: what would be read and computed; nothing is."""
        stores = {self.store: self.layers, **self.controls}
        n_bytes = sum(_nbytes(open_store(path), names.values()) for path, names in stores.items())
        lines = [f"would score {len(self.heads)} heads in layers {compact_layers(self.layers)} of {self.store} "
                 f"({self.n_prompts} prompts, {self.words_per_prompt} words each)",
                 f"  previous-token control on {self.text}, prefix matching on {self.repeated}",
                 f"would read {n_bytes / 2**20:,.1f} MiB of attention patterns from {len(stores)} store(s)"]
        return "\n".join(lines)

    def outputs(self, write: bool = True, plot: bool = True) -> list[str]:
        """The group and the heatmap the analysis would write."""
        out = [f"{self.store}/analysis/{RESULT_GROUP} (replacing any earlier one)"] if write else []
        return out + ([str(figure_path(self.store, RESULT_GROUP))] if plot else [])


def _nbytes(group, names) -> int:
    return sum(int(np.prod(group[name].shape)) * group[name].dtype.itemsize for name in names)


def plan(store: str | Path, *, text: str | Path | None = None, repeated: str | Path | None = None) -> TranslationPlan:
    """Check that the stores hold what the analysis needs (metadata only) and say what it will do."""
    store = Path(store)
    group = open_store(store)
    meta = group["meta"] if "meta" in group else {}
    if "src_span" not in meta or "tgt_span" not in meta:
        raise AnalysisError(f"{store} was harvested with prompts.source = {prompt_source(group)!r}, which stores no "
                            "word alignment (meta/src_span, meta/tgt_span); harvest the translation source")
    layers = _pattern_layers(group, store)
    heads = _pattern_heads(group, layers)
    text_path = Path(text) if text is not None else store
    repeated_path = Path(repeated) if repeated is not None else store
    controls: dict[Path, dict[int, str]] = {}
    for path in (text_path, repeated_path):
        if path == store or path in controls:
            continue
        control = open_store(path)
        have = _pattern_layers(control, path)
        their_heads = _pattern_heads(control, have)
        if not np.array_equal(their_heads, heads):
            raise AnalysisError(f"control store {path} holds heads {their_heads.tolist()}, the translation store "
                                f"{heads.tolist()}; harvest both with the same capture.heads")
        controls[path] = have
    n_prompts, words = meta["src_span"].shape[:2]
    return TranslationPlan(store, layers, heads, int(n_prompts), int(words), text_path, repeated_path, controls)


@names_damage  # a bad checksum anywhere inside is named in one line
def analyze(store: str | Path, *, text: str | Path | None = None, repeated: str | Path | None = None,
            write: bool = True, plot: bool = True, scheduler: Any = None, num_workers: int | None = None,
            role_thresholds: dict[str, float] | None = None) -> TranslationHeads:
    """Score every harvested head of a translation store; write the results under ``analysis/translation_heads/``.

    ``text``: a store of attention patterns on natural text for the previous-token control (default:
    the translation prompts themselves). ``repeated``: a store harvested with the ``repeated_tokens``
    source for the prefix-matching control (default: the translation prompts, where few tokens
    repeat, so the score may be NaN). ``scheduler``: see :func:`analysis.runtime.dask_scheduler`
    (default: threads).
    """
    job = plan(store, text=text, repeated=repeated)
    store, layers, heads = job.store, job.layers, job.heads
    group = open_store(store)
    src, tgt = read(group, "meta/src_span").astype(np.int64), read(group, "meta/tgt_span").astype(np.int64)
    thresholds = {**ROLE_THRESHOLDS, **(role_thresholds or {})}

    with dask_scheduler(scheduler, num_workers):
        nonfinite: dict[int, dict[str, int]] = {}
        per_layer = _per_sequence(group, layers, translation_block, [src, tgt], nonfinite)
        text_path, repeated_path = job.text, job.repeated
        prev = _controls(text_path, layers, job.controls.get(text_path, layers))
        prefix = prev if repeated_path == text_path else _controls(repeated_path, layers,
                                                                   job.controls.get(repeated_path, layers))

    scores: dict[str, np.ndarray] = {}
    per_prompt: dict[str, np.ndarray] = {}
    for m, name in enumerate(TRANSLATION_SCORES):
        stacked = np.stack([per_layer[layer][:, :, m, :] for layer in layers], axis=1)  # (seq, layer, head, 2)
        for suffix, value in _summary(stacked).items():
            scores[name + suffix] = value
        per_prompt[name + "_delta"] = stacked[..., 0] - stacked[..., 1]
    scores["prev_token"] = np.stack([_nanmean0(prev[layer][..., 0]) for layer in layers])
    scores["prefix_matching"] = np.stack([_nanmean0(prefix[layer][..., 1]) for layer in layers])

    params = {
        "store": str(store), "text_store": str(text_path), "repeated_store": str(repeated_path),
        "n_prompts": int(src.shape[0]), "words_per_prompt": int(src.shape[1]),
        "layers": list(layers), "heads": heads.tolist(),
        "baseline": "expected score under a uniformly random derangement of the alignment within each prompt "
                    "(mean attention onto the other source words of the prompt)",
        "z": "mean(score - baseline) / (sd / sqrt(n_prompts))",
        "prefix_matching_offset": "+1: query i scores keys k with 1 <= k < i and ids[k-1] == ids[i]",
        "prev_token": "mean over queries i >= 1 of attention from i to i-1",
        "role_thresholds": thresholds,
        "harvest_fingerprint": provenance(group).get("fingerprint"),
        "nonfinite": {str(layer): nf for layer, nf in nonfinite.items()},
        "nonfinite_rule": "a prompt whose attention pattern holds NaN/inf scores NaN and is left out of every mean",
    }
    result = TranslationHeads(store, np.asarray(list(layers)), heads, scores, per_prompt, params)
    if write:
        _write(result)
        consolidate(result.store)  # the store is finished again: xarray opens it in one read
    if plot:
        result.figure = heatmap(result, figure_path(store, RESULT_GROUP))
    return result


def _nanmean0(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        n = np.sum(np.isfinite(x), axis=0)
        return np.where(n > 0, np.nansum(x, axis=0) / np.maximum(n, 1), np.nan)


def _write(result: TranslationHeads) -> None:
    out = result_group(result.store, RESULT_GROUP, {"params": result.params})
    write_array(out, "layer", result.layers.astype(np.int64), ("layer",))
    write_array(out, "head", result.heads.astype(np.int64), ("head",))
    for name, value in result.scores.items():
        write_array(out, name, value.astype(np.float64), ("layer", "head"))
    for name, value in result.per_prompt.items():
        write_array(out, f"per_prompt/{name}", value.astype(np.float32), ("sequence", "layer", "head"))


def heatmap(result: TranslationHeads, path: Path) -> Path:
    """Layer × head heatmaps: Δ for TS_next and TS_cur, and the two controls."""
    plt = pyplot()
    panels = [("ts_next_delta", "TS_next − baseline"), ("ts_cur_delta", "TS_cur − baseline"),
              ("prev_token", "previous-token (control)"), ("prefix_matching", "prefix matching (control)")]
    n_l, n_h = len(result.layers), len(result.heads)
    fig, axes = plt.subplots(1, 4, figsize=(4 * max(3.0, 0.35 * n_h + 1.5), max(2.5, 0.3 * n_l + 1.5)),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        data = result.scores[key]
        vmax = max(0.05, float(np.nanmax(np.abs(data)))) if np.isfinite(data).any() else 1.0
        cmap, vmin = ("RdBu_r", -vmax) if key.endswith("delta") else ("viridis", 0.0)
        im = ax.imshow(np.nan_to_num(data, nan=0.0), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                       origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_h), [str(h) for h in result.heads], fontsize=6)
        ax.set_yticks(range(n_l), [str(layer) for layer in result.layers], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"translation heads: {result.store.name} ({result.params['n_prompts']} prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
