"""Model organisms: small GPT-NeoX models trained here, on this CPU, to have known structure.

The analyses are checked on structure a real model has, not only on planted arrays:

- ``translation``: translates lists of made-up words (``organisms.translation``); its translation
  heads must top the translation-head analysis;
- ``addition``: adds two-digit numbers, each number one token (``organisms.addition``); the Fourier
  analysis must find periodic structure in it;
- ``translation-untrained``, ``addition-untrained``: the same shapes and tokenizers, random
  weights — what the analyses find when there is nothing to find.

``ensure_organism(name, workdir)`` trains only when ``workdir/name`` holds no finished checkpoint
(``organism.json`` is written last), so the demo and the slow tests pay for training once.
``ensure_organisms(names, workdir)`` trains the missing ones side by side, one process each.
``harvest_organism(name, workdir)`` harvests its stores through ``harvest.runner.run`` — the
same path as ``harvest run SPEC`` — and returns their paths.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import addition, translation
from .common import is_complete, read_record

DEFAULT_WORKDIR = Path("build/organisms")
ORGANISMS = {
    "translation": (translation, True),
    "translation-untrained": (translation, False),
    "addition": (addition, True),
    "addition-untrained": (addition, False),
}


def _module(name: str):
    if name not in ORGANISMS:
        raise ValueError(f"unknown organism {name!r}; choose one of {', '.join(ORGANISMS)}")
    return ORGANISMS[name]


def ensure_organism(name: str, workdir: str | Path = DEFAULT_WORKDIR, log=print) -> Path:
    """The organism's checkpoint directory, trained (and saved) first if it is not there yet."""
    module, trained = _module(name)
    out = Path(workdir) / name
    if is_complete(out):
        return out
    if log:
        log(f"training organism {name!r} into {out} (once; cached afterwards)" if trained
            else f"initialising untrained organism {name!r} into {out}")
    t0 = time.perf_counter()
    module.build(out, trained=trained, log=log)
    record = read_record(out)
    record["build_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "organism.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def ensure_organisms(names: list[str], workdir: str | Path = DEFAULT_WORKDIR, log=print,
                     processes: int | None = None) -> dict[str, Path]:
    """``ensure_organism`` for several organisms, those still to train each in its own process at once.

    Training is single-threaded (``TrainConfig.threads``: these models are too small for more
    threads to help), so on a machine with two free cores two organisms train in the time of
    one. ``processes`` defaults to the cores this process may use; 1 trains them in turn here.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    workdir = Path(workdir)
    todo = [n for n in names if _module(n)[1] and not is_complete(workdir / n)]  # untrained ones are instant
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = min(len(todo), processes or cores)
    if processes > 1:
        # spawn, not fork: the parent may hold threads (Ray, Dask, torch) that a fork would copy half-made
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            done = [pool.submit(ensure_organism, n, workdir, partial(_tagged, n) if log else None) for n in todo]
            for future in done:
                future.result()
    return {n: ensure_organism(n, workdir, log=log) for n in names}


def _tagged(name: str, line: str) -> None:
    """A training process's log line, tagged with its organism and written at once (lines interleave)."""
    print(f"[{name}] {line.strip()}", flush=True)


def harvest_organism(name: str, workdir: str | Path = DEFAULT_WORKDIR, *, stores: str | Path | None = None,
                     overwrite: bool = False, progress: bool = False) -> dict[str, Path]:
    """Harvest the organism's stores with ``harvest.runner.run``.

    Stores go to ``stores`` (default ``workdir/stores/{name}``), each beside its spec as YAML. A
    complete store whose fingerprint matches the job (same weights, prompts, capture) is reused.
    """
    import yaml

    from harvest.runner import prepare, run
    from harvest.spec import parse_spec
    from harvest.store import provenance

    module, _ = _module(name)
    model_dir = ensure_organism(name, workdir)
    stores = Path(stores) if stores is not None else Path(workdir) / "stores" / name
    paths = {}
    stores.mkdir(parents=True, exist_ok=True)
    for key, raw in module.specs(model_dir, stores).items():
        # the spec as a file too: `harvest run {stores}/{key}.yaml --overwrite` redoes the same job
        (stores / f"{key}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        spec = parse_spec(raw, base_dir=Path.cwd())
        path = spec.store_path()
        if overwrite or not _up_to_date(path, prepare(spec).fingerprint, provenance):
            run(spec, overwrite=True, progress=progress)
        paths[key] = path
    return paths


def _up_to_date(path: Path, fingerprint: str, provenance) -> bool:
    if not path.exists():
        return False
    try:
        info = provenance(path)
    except Exception:  # noqa: BLE001 - anything unreadable is harvested again
        return False
    return info.get("status") == "complete" and info.get("fingerprint") == fingerprint


def record(name: str, workdir: str | Path = DEFAULT_WORKDIR) -> dict[str, Any]:
    """The organism's training record (curve, accuracies, ablations)."""
    return read_record(Path(workdir) / name)


__all__ = ["DEFAULT_WORKDIR", "ORGANISMS", "ensure_organism", "ensure_organisms", "harvest_organism", "record"]
