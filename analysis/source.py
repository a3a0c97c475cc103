"""What the analyses need to know about a store, read from its metadata: no model, no harvest run.

- :class:`StoreFacts`: the token-axis arrays and their hook names, the model's shape, LayerNorm eps
  and weights, the number of rows and sequences;
- :func:`sequence_starts`: where each sequence's rows begin (streamed from the ``seq`` row map);
- :func:`plan_sources`: which stored arrays give the hidden states that feed the linear layers
  (Dettmers' "hidden states"), and how: stored as ``ln{1,2}.hook_normalized``, or a stored raw
  residual with the layer's stored LayerNorm applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import StoreError
from harvest.hookpoints import block_name, compact_layers, split_name
from harvest.store import open_group, read_provenance


@dataclass(frozen=True)
class ArrayInfo:
    name: str
    template: str  #: ``hook_resid_post``, ``ln1.hook_normalized`` ... or the model-level name
    layer: int | None
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int

    @property
    def trail(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def width(self) -> int:
        return int(np.prod(self.trail, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize


@dataclass
class StoreFacts:
    path: Path
    info: dict[str, Any]
    arrays: dict[str, ArrayInfo]  #: token-axis activation arrays by name
    model_type: str
    n_layers: int
    d_model: int | None
    eps: float
    parallel: bool  #: NeoX parallel residual: ln2 reads the same residual as ln1
    n_rows: int
    n_sequences: int
    ln: dict[str, np.ndarray] = field(default_factory=dict)  #: ``ln1.w`` -> (layer, d_model)

    @classmethod
    def load(cls, path: str | Path) -> "StoreFacts":
        path = Path(path)
        group = open_group(path)
        info = read_provenance(group)
        model = info.get("model", {}) or {}
        config = model.get("config", {}) or {}
        model_type = model.get("model_type") or config.get("model_type") or "unknown"
        arrays: dict[str, ArrayInfo] = {}
        for name in info.get("hooks", []):
            if name not in group:
                continue
            arr = group[name]
            dims = tuple(arr.metadata.dimension_names or ())
            if not dims or dims[0] != "token":
                continue
            template, layer = split_name(name)
            attrs = arr.attrs
            template = attrs.get("hook", template)
            layer = attrs.get("layer", layer)
            arrays[name] = ArrayInfo(name, template, layer, dims, tuple(arr.shape), str(arr.dtype), int(arr.chunks[0]))
        n_layers = config.get("num_hidden_layers", config.get("n_layer"))
        if n_layers is None:
            n_layers = 1 + max((a.layer for a in arrays.values() if a.layer is not None), default=-1)
        d_model = config.get("hidden_size", config.get("n_embd"))
        eps = config.get("layer_norm_eps", config.get("layer_norm_epsilon", 1e-5))
        ln = {}
        if "model" in group:
            for key in ("ln1.w", "ln1.b", "ln2.w", "ln2.b"):
                if key in group["model"]:
                    ln[key] = np.asarray(group["model"][key][...], dtype=np.float32)
        n_rows = int(group["seq"].shape[0]) if "seq" in group else int(info.get("layout", {}).get("n_rows", 0))
        layout = info.get("layout", {}) or {}
        n_seq = int(group["seq_length"].shape[0]) if "seq_length" in group else int(layout.get("n_sequences", 0))
        return cls(path, info, arrays, model_type, int(n_layers), d_model, float(eps),
                   bool(config.get("use_parallel_residual", True)) and model_type == "gpt_neox", n_rows, n_seq, ln)

    def group(self, mode: str = "r"):
        return open_group(self.path, mode=mode)

    def by_template(self) -> dict[str, list[ArrayInfo]]:
        out: dict[str, list[ArrayInfo]] = {}
        for a in sorted(self.arrays.values(), key=lambda a: (-1 if a.layer is None else a.layer)):
            out.setdefault(a.template, []).append(a)
        return out

    def lns(self) -> tuple[str, ...]:
        """LayerNorms whose outputs feed linear layers: GPT-J one (ln_1), GPT-NeoX two."""
        return ("ln1", "ln2") if self.model_type == "gpt_neox" else ("ln1",)




def sequence_starts(group, n_rows: int, step: int = 1 << 22) -> np.ndarray:
    """Row index where each sequence begins, plus ``n_rows`` at the end; streamed from ``seq``.

    Rows of one sequence are contiguous in a harvest store (the layout writes them in order).
    """
    if "seq" not in group:
        raise StoreError(f"{group.store} has no 'seq' row map; it is not a complete harvest store")
    seq = group["seq"]
    starts = [np.zeros(1, np.int64)] if n_rows else []
    last = None
    for lo in range(0, n_rows, step):
        part = np.asarray(seq[lo:lo + step], dtype=np.int64)
        if part.size == 0:
            continue
        prev = part[0] if last is None else last
        change = np.flatnonzero(np.diff(np.concatenate([[prev], part])) != 0)
        if (np.diff(np.concatenate([[prev], part])) < 0).any():
            raise StoreError("rows of the store are not grouped by sequence ('seq' decreases); "
                             "the per-sequence statistics need a store written by `harvest run`")
        starts.append(change.astype(np.int64) + lo)
        last = part[-1]
    return np.concatenate(starts + [np.array([n_rows], np.int64)]) if n_rows else np.zeros(1, np.int64)


@dataclass(frozen=True)
class Source:
    """One hidden state feeding linear layers: LayerNorm ``ln`` of layer ``layer``."""

    layer: int
    ln: str  #: "ln1" | "ln2"
    array: str  #: the store array it is read from
    how: str  #: "stored" | "resid" (LayerNorm applied to a raw residual) | "ln1" (ln1 output re-weighted)

    def describe(self) -> str:
        return {"stored": f"{self.array}",
                "resid": f"LayerNorm {self.ln} applied to {self.array}",
                "ln1": f"{self.array} re-weighted to {self.ln} (same residual, parallel block)"}[self.how]


def _resid_for(facts: StoreFacts, layer: int) -> str | None:
    """The stored raw residual entering block ``layer``."""
    before = block_name(layer - 1, "hook_resid_post") if layer else "hook_embed"
    for name in (block_name(layer, "hook_resid_pre"), before):
        if name in facts.arrays:
            return name
    return None


def plan_sources(facts: StoreFacts, derive: bool = True) -> tuple[list[Source], list[str]]:
    """The hidden states to analyse, per layer, and notes that say how each was obtained."""
    sources: list[Source] = []
    notes: list[str] = []
    for layer in range(facts.n_layers):
        for ln in facts.lns():
            stored = block_name(layer, f"{ln}.hook_normalized")
            if stored in facts.arrays:
                sources.append(Source(layer, ln, stored, "stored"))
                continue
            if not derive:
                continue
            if ln == "ln2" and not facts.parallel:
                continue  # sequential NeoX: ln2 reads x + attn(ln1(x)), which is not stored
            resid = _resid_for(facts, layer)
            if resid and f"{ln}.w" in facts.ln and f"{ln}.b" in facts.ln:
                sources.append(Source(layer, ln, resid, "resid"))
            elif (ln == "ln2" and block_name(layer, "ln1.hook_normalized") in facts.arrays
                  and {"ln1.w", "ln1.b", "ln2.w", "ln2.b"} <= set(facts.ln)):
                sources.append(Source(layer, ln, block_name(layer, "ln1.hook_normalized"), "ln1"))
    derived = [s for s in sources if s.how != "stored"]
    if derived:
        for how in ("resid", "ln1"):
            group = [s for s in derived if s.how == how]
            if not group:
                continue
            for ln in facts.lns():
                part = [s for s in group if s.ln == ln]
                if not part:
                    continue
                layers = layers_label([s.layer for s in part])
                if how == "resid":
                    notes.append(
                        f"{ln} inputs of {layers}: computed by applying each layer's stored LayerNorm "
                        f"(model/{ln}.w, model/{ln}.b, eps {facts.eps:g}) in float32 to the stored raw residual "
                        f"({', '.join(sorted({_template_of(s.array) for s in part}))}); "
                        f"blocks.*.{ln}.hook_normalized was not harvested")
                else:
                    notes.append(f"{ln} inputs of {layers}: the stored ln1.hook_normalized re-weighted with "
                                 "ln2's weights (a parallel block's ln1 and ln2 normalise the same residual)")
    if facts.model_type == "gpt_neox" and not facts.parallel:
        notes.append("sequential GPT-NeoX: ln2 reads x + attn(ln1(x)); only a stored ln2.hook_normalized is analysed")
    return sources, notes


def _template_of(name: str) -> str:
    template, layer = split_name(name)
    return f"blocks.{{l-1}}.{template}" if template == "hook_resid_post" else (
        f"blocks.{{l}}.{template}" if layer is not None else template)


def layers_label(layers: list[int]) -> str:
    """``"layer 3"`` or ``"layers 0-2, 5"``."""
    return f"layer{'s' if len(set(layers)) > 1 else ''} {compact_layers(layers)}"


def residual_arrays(facts: StoreFacts) -> tuple[dict[int, str], str | None]:
    """Per layer, the residual stream leaving it (for massive activations and kurtosis)."""
    post = {a.layer: a.name for a in facts.arrays.values() if a.template == "hook_resid_post" and a.layer is not None}
    if post:
        return post, "hook_resid_post"
    pre = {a.layer: a.name for a in facts.arrays.values() if a.template == "hook_resid_pre" and a.layer is not None}
    if pre:
        return pre, "hook_resid_pre"
    return {}, None


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * w + b`` per row, float32, as torch's LayerNorm (biased var)."""
    mu = x.mean(axis=1, dtype=np.float64).astype(np.float32)[:, None]
    xc = x - mu
    var = np.einsum("ij,ij->i", xc, xc, dtype=np.float64) / max(x.shape[1], 1)
    xc *= (1.0 / np.sqrt(var + eps)).astype(np.float32)[:, None]
    xc *= w[None, :]
    xc += b[None, :]
    return xc


def reweight_ln(y1: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """ln2(x) from ln1(x) for the same x: undo ln1's affine, apply ln2's (dims where w1 = 0 give b2)."""
    scale = np.divide(w2, w1, out=np.zeros_like(w2), where=w1 != 0)
    return (y1 - b1[None, :]) * scale[None, :] + b2[None, :]
