"""Synthetic stores in the harvest schema: planted ground truth for the analyses' tests and
benchmark-sized stores, with no model and no harvest run.

They are laid out by ``harvest.store.create_store``, the code that lays out every harvested store,
so a test built on them sees the real schema (row maps, ``input_ids`` -1 past each sequence's
end, LayerNorm weights under ``model/``, tokenizer files, the progress manifest, the provenance).
Only the activations are made up, and written straight into the arrays.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvest.hookpoints import HookPoint, split_name
from harvest.shape import ArrayPlan, chunk_layout
from harvest.store import RowMaps, create_store, mark_written



def write_store(
    path: str | Path,
    hooks: list[str],
    lengths: list[int] | np.ndarray,
    d_model: int,
    values: Callable[[str, int, int], np.ndarray],
    *,
    model_type: str = "gpt_neox",
    n_layers: int | None = None,
    ln: dict[str, np.ndarray] | None = None,
    input_ids: np.ndarray | None = None,
    vocab_size: int = 512,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    chunk_mib: float = 8.0,
    chunks_per_shard: int = 8,
    write_rows: int = 1 << 16,
    config: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a store; ``values(name, lo, hi)`` gives rows [lo, hi) of array ``name`` as (rows, d_model).

    ``lengths`` are the sequences' lengths (every position is a row). ``ln`` maps ``ln1.w`` ...
    to (layer, d_model) arrays. ``input_ids`` (sequence, max_len) defaults to random ids.
    """
    path = Path(path)
    lengths = np.asarray(lengths, dtype=np.int64)
    n_rows, n_seq, max_len = int(lengths.sum()), len(lengths), int(lengths.max())
    layers = [split_name(h)[1] for h in hooks]
    n_layers = n_layers if n_layers is not None else 1 + max((x for x in layers if x is not None), default=-1)
    rng = np.random.default_rng(seed)
    if input_ids is None:
        input_ids = rng.integers(1, vocab_size, size=(n_seq, max_len))
    input_ids = np.where(np.arange(max_len)[None, :] < lengths[:, None], input_ids, -1).astype(np.int32)
    seq = np.repeat(np.arange(n_seq), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    tokens = input_ids[seq, pos]
    cfg = {"model_type": model_type, "num_hidden_layers" if model_type == "gpt_neox" else "n_layer": n_layers,
           "hidden_size" if model_type == "gpt_neox" else "n_embd": d_model, **(config or {})}
    info = {
        "format_version": 1, "status": "complete", "hooks": list(hooks), "store_dtype": dtype,
        "model": {"name": "synthetic", "path": None, "model_type": model_type, "config": cfg, "dtype": dtype,
                  "quantization": None, "revision": None},
        "layout": {"n_rows": n_rows, "n_sequences": n_seq, "n_batches": 1, "batch_size": n_seq, "max_len": max_len},
        "selection": {"heads": None, "neurons": None, "positions": "all"},
        "spec": {"name": "synthetic"}, "software": {"zarr": zarr.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    row_bytes = d_model * np.dtype(dtype).itemsize
    rows, shard = chunk_layout(n_rows, row_bytes, chunk_mib, chunks_per_shard)
    if chunk_rows:
        rows, shard = chunk_rows, min(chunk_rows * chunks_per_shard, -(-n_rows // chunk_rows) * chunk_rows)
    arrays = []
    for name in hooks:
        template, layer = split_name(name)
        arrays.append(ArrayPlan(HookPoint(name, template, layer, ("token", "d_model")), (n_rows, d_model), dtype,
                                rows, shard))
    tokenizer_files = sorted(f for f in Path(tokenizer_dir).iterdir() if f.is_file()) if tokenizer_dir else []
    group = create_store(path, info, arrays, RowMaps(tokens.astype(np.int32), seq.astype(np.int64), pos, input_ids,
                                                     lengths.astype(np.int32)),
                         compressor="none", level=0, n_stages=1, n_batches=1,
                         layer_norms={k: np.asarray(w, dtype=np.float32) for k, w in (ln or {}).items()},
                         tokenizer_files=tokenizer_files)
    for name in hooks:
        arr = group[name]
        step = max(shard, (write_rows // shard) * shard)
        for lo in range(0, n_rows, step):
            hi = min(n_rows, lo + step)
            arr[lo:hi] = np.asarray(values(name, lo, hi), dtype=dtype)
    mark_written(group, 0, 1)
    return path


# --- the planted ground truth ----------------------------------------------------------------

PLANTED = {"A": 17, "B": 40, "C": 99, "D": 123, "massive_dim": 7, "massive_layer": 1, "small_dim": 9, "small_layer": 2}


def planted_store(path: str | Path, *, n_seq: int = 4, n_layers: int = 28, n_pos: int = 512, d: int = 256,
                  resid_layers: int = 4, tokenizer_dir: str | Path | None = None, vocab_size: int = 512,
                  chunk_rows: int = 384, seed: int = 0) -> dict:
    """Dettmers' near misses and Sun's massive activations planted in N(0, 0.5²) noise.

    ``blocks.{l}.ln1.hook_normalized`` (GPT-J layout, ``n_layers`` layers):
      A = -20 in every layer at 75% of positions (an outlier: one-sided, quartiles -20);
      B = 8 in 6 of 28 layers (21% < 25%) at every position  (rejected by the layer threshold);
      C = 8 in half the layers at 15 of 512 positions (2.9% < 6%) (rejected by the position threshold);
      D = 5.9 everywhere                                       (rejected by magnitude).
    ``blocks.{l}.hook_resid_post`` for the first ``resid_layers`` layers: 2000 at (position 0,
    dim 7) of layer 1 (massive: ~6000x the median |x| of 0.34) and 150 at (position 5, dim 9) of
    layer 2 (not massive: ~450x).
    Returns the ground truth (dims, positions, layers).
    """
    rng = np.random.default_rng(seed)
    A, B, C, D = (PLANTED[k] for k in "ABCD")
    pos_a = np.sort(rng.choice(n_pos, int(0.75 * n_pos), replace=False))
    pos_c = np.sort(rng.choice(n_pos, int(0.03 * n_pos), replace=False))
    layers_b = list(range(int(0.215 * n_layers)))  # 6 of 28
    layers_c = list(range(0, n_layers, 2))
    in_a, in_c = np.isin(np.arange(n_pos), pos_a), np.isin(np.arange(n_pos), pos_c)

    def values(name: str, lo: int, hi: int) -> np.ndarray:
        template, layer = split_name(name)
        x = np.random.default_rng([seed, layer, lo, template == "hook_resid_post"]).standard_normal(
            (hi - lo, d), dtype=np.float32) * 0.5
        pos = np.arange(lo, hi) % n_pos
        if template == "hook_resid_post":
            if layer == PLANTED["massive_layer"]:
                x[pos == 0, PLANTED["massive_dim"]] = 2000
            if layer == PLANTED["small_layer"]:
                x[pos == 5, PLANTED["small_dim"]] = 150
            return x
        x[in_a[pos], A] = -20
        if layer in layers_b:
            x[:, B] = 8
        if layer in layers_c:
            x[in_c[pos], C] = 8
        x[:, D] = 5.9
        return x

    hooks = [f"blocks.{l}.ln1.hook_normalized" for l in range(n_layers)]
    hooks += [f"blocks.{l}.hook_resid_post" for l in range(resid_layers)]
    ln = {"ln1.w": 1 + 0.01 * np.arange(n_layers)[:, None] * np.ones((1, d)), "ln1.b": np.zeros((n_layers, d))}
    write_store(path, hooks, [n_pos] * n_seq, d, values, model_type="gptj", n_layers=n_layers, ln=ln,
                tokenizer_dir=tokenizer_dir, vocab_size=vocab_size, chunk_rows=chunk_rows, seed=seed)
    return {**PLANTED, "pos_a": pos_a, "pos_c": pos_c, "layers_b": layers_b, "layers_c": layers_c,
            "n_seq": n_seq, "n_layers": n_layers, "n_pos": n_pos, "d": d}


def plant_residual_dim(src: str | Path, out: str | Path, arch: str, dim: int, bias: float = 1.0,
                       ln_weight: float = 2.0) -> Path:
    """A copy of a small GPT-NeoX / GPT-J checkpoint edited so residual ``dim`` carries an outlier.

    Block 0's MLP output bias writes ``+bias`` into ``dim`` at every token; the residual of a
    random-init model is ~0.02 elsewhere, so LayerNorm maps it to ~7.8 (sqrt(d - 1) at most), and
    LayerNorm weights of ``ln_weight`` at ``dim`` in blocks 1.. double that: a one-sided outlier in
    the hidden states of layers 1 to the last, at every position. Needs torch and transformers.
    """
    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        if arch == "gpt_neox":
            layers = model.gpt_neox.layers
            layers[0].mlp.dense_4h_to_h.bias[dim] = bias
            for layer in layers[1:]:
                layer.input_layernorm.weight[dim] = ln_weight
                layer.post_attention_layernorm.weight[dim] = ln_weight
        else:
            blocks = model.transformer.h
            blocks[0].mlp.fc_out.bias[dim] = bias
            for block in blocks[1:]:
                block.ln_1.weight[dim] = ln_weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out
