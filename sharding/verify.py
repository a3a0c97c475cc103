"""Compare two stores file by file and array by array (a sharded or resumed run against a plain one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from harvest.store import BOOKKEEPING

#: ``analysis/`` is derived data: the harvest-time statistics are written per stage and unit before they
#: are folded into one prefix, so their files follow the partition; their identity across stages,
#: replicas and resumes has its own tests (tests/test_harvest_statistics.py)
EXCLUDED = BOOKKEEPING + ("analysis",)


def store_differences(a: str | Path, b: str | Path, exclude: tuple[str, ...] = EXCLUDED) -> list[str]:
    """What differs between two stores: files present in one only, files whose bytes differ, and
    arrays whose decoded values differ. Empty when the stores hold the same bytes."""
    a, b = Path(a), Path(b)

    def files(root: Path) -> dict[str, Path]:
        out = {}
        for f in root.rglob("*"):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and rel not in exclude and rel.split("/")[0] not in exclude:
                out[rel] = f
        return out

    fa, fb = files(a), files(b)
    problems = [f"only in {a}: {k}" for k in sorted(fa.keys() - fb.keys())]
    problems += [f"only in {b}: {k}" for k in sorted(fb.keys() - fa.keys())]
    problems += [f"bytes differ: {k}" for k in sorted(fa.keys() & fb.keys()) if fa[k].read_bytes() != fb[k].read_bytes()]
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in sorted(set(ga.array_keys()) & set(gb.array_keys())):
        x, y = ga[name][...], gb[name][...]
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            problems.append(f"values differ: {name}")
    return problems
