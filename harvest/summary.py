"""``harvest inspect``: what a store holds, how big it is, how far the job got, and where from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .objstore import is_url, normalize, object_sizes
from .store import batches_done, open_group, read_provenance


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary: arrays (shape, chunks, bytes, ratio), progress and provenance."""
    path = normalize(path)
    group = open_group(path)
    info = read_provenance(group)
    arrays = []
    for name in info.get("hooks", []):
        arr = group[name]
        raw = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
        if is_url(path):  # objects under the array's prefix: (size, key) each
            sizes = [size for size, key in object_sizes(f"{path}/{name}") if not key.endswith("zarr.json")]
            stored, files = sum(sizes), len(sizes)
        else:
            stored = disk_bytes(path / name)
            files = sum(1 for f in (path / name).rglob("*") if f.is_file() and f.name != "zarr.json")
        arrays.append({
            "name": name, "dims": list(arr.metadata.dimension_names or ()), "shape": list(arr.shape),
            "dtype": str(arr.dtype), "chunks": list(arr.chunks), "shards": list(arr.shards or arr.chunks),
            "raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored if stored else None,
            "files": files,
            "nonfinite_values": arr.attrs.get("nonfinite_values", 0),
        })
    done = batches_done(group)
    raw_total = sum(a["raw_bytes"] for a in arrays)
    stored_total = sum(a["stored_bytes"] for a in arrays)
    return {
        "path": str(path),
        "status": info.get("status"),
        "stopped": info.get("stopped"),  #: why and when a run ended before completing (failed, interrupted)
        "progress": {"batches_done": int(done.sum()), "batches": int(done.size)},
        "layout": info.get("layout"),
        "model": {k: info["model"].get(k) for k in ("name", "model_type", "dtype", "quantization", "revision")},
        "store_dtype": info.get("store_dtype"),
        "selection": info.get("selection"),
        "stages": info.get("stages"),
        "fingerprint": info.get("fingerprint"),
        "software": info.get("software"),
        "created": info.get("created"),
        "last_run": info.get("last_run"),
        "arrays": arrays,
        "totals": {"raw_bytes": raw_total, "stored_bytes": stored_total,
                   "disk_bytes": sum(size for size, _ in object_sizes(path)) if is_url(path) else disk_bytes(path),
                   "ratio": raw_total / stored_total if stored_total else None,
                   "files": sum(a["files"] for a in arrays)},
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(s: dict[str, Any], max_arrays: int = 40) -> str:
    lay, prog, tot = s["layout"] or {}, s["progress"], s["totals"]
    lines = [
        f"store     {s['path']}",
        f"status    {s['status']}  ({prog['batches_done']}/{prog['batches']} batches written)"
        + (f" at {s['stopped']['time']}: {s['stopped']['reason']}" if s.get("stopped") else ""),
        f"model     {s['model']['name']} ({s['model']['model_type']}, {s['model']['dtype']}"
        f"{', ' + s['model']['quantization'] if s['model']['quantization'] else ''}) -> stored as {s['store_dtype']}",
        f"rows      {lay.get('n_rows')} tokens captured from {lay.get('n_sequences')} sequences "
        f"(positions: {s['selection']['positions']})",
        f"size      {human(tot['raw_bytes'])} of activations in {human(tot['stored_bytes'])} on disk "
        f"(ratio {tot['ratio']:.2f}x, {tot['files']} shard files; whole store {human(tot['disk_bytes'])})"
        if tot["ratio"] else f"size      {human(tot['disk_bytes'])}",
    ]
    check = s.get("verify")  # "complete" says nothing about the bytes; say whether they were checked
    lines.append(f"integrity not checked: `harvest verify {s['path']}` reads every chunk's checksum" if check is None
                 else f"integrity {'intact' if check['ok'] else 'DAMAGED'} ({len(check['damages'])} damaged chunk(s))")
    if s.get("last_run"):
        run = s["last_run"]
        rate = run["tokens"] / run["seconds"] if run["seconds"] else float("nan")
        lines.append(f"last run  {run['tokens']} tokens in {run['seconds']:.1f} s ({rate:,.0f} tokens/s)")
    lines.append(f"created   {s['created']} with {', '.join(f'{k} {v}' for k, v in (s['software'] or {}).items())}")
    lines.append("")
    width = max((len(a["name"]) for a in s["arrays"]), default=10)
    lines.append(f"{'array':<{width}}  {'dims':<28} {'shape':<22} {'dtype':<8} {'chunk rows':>10} {'stored':>10} {'ratio':>6}")
    for a in s["arrays"][:max_arrays]:
        flag = f"  {a['nonfinite_values']} non-finite" if a["nonfinite_values"] else ""
        lines.append(
            f"{a['name']:<{width}}  {','.join(a['dims']):<28} {str(tuple(a['shape'])):<22} {a['dtype']:<8} "
            f"{a['chunks'][0]:>10} {human(a['stored_bytes']):>10} {a['ratio'] or 0:>6.2f}{flag}"
        )
    if len(s["arrays"]) > max_arrays:
        lines.append(f"... and {len(s['arrays']) - max_arrays} more arrays (use --json for all)")
    return os.linesep.join(lines)
