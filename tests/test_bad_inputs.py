"""Every kind of bad input, through the real ``harvest`` command: one line on stderr, a non-zero exit,
no traceback, and nothing lost (no store left behind, or the store exactly as it was).

Each case builds its input in a fresh directory, runs ``harvest.cli.main`` in-process with the
arguments a user would type, and captures file descriptor 2 (so library warnings and logging count
too). Cases whose cause only shows once computing has begun (NaN, a full disk) leave a store that
says ``failed``, with the reason, and nothing marked written that is not on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from safetensors.torch import load_file, save_file

from harvest.cli import main

#: (case, exit code, stderr line) of every case run, written to $HARVEST_BAD_INPUT_TABLE when set
TABLE: list[tuple[str, int, str]] = []


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def harvest(args: list[str], capfd, monkeypatch) -> tuple[int, str, str]:
    """Run the ``harvest`` console script in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["harvest", *map(str, args)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def indexed_store(tmp_path_factory, neox_ckpt, corpus_dir) -> Path:
    """A complete store with its per-dimension index, for query cases."""
    from harvest.runner import run
    from harvest.spec import parse_spec
    from analysis.index import build_index

    d = tmp_path_factory.mktemp("indexed")
    spec = parse_spec({
        "model": {"path": str(neox_ckpt), "device": "cpu"},
        "prompts": {"source": "text", "paths": [str(corpus_dir / "*.txt")], "seq_len": 24, "mode": "windowed",
                    "max_sequences": 6},
        "capture": {"hooks": ["blocks.*.hook_resid_post"]},
        "run": {"batch_size": 3},
        "store": {"root": str(d), "path": "indexed.zarr", "chunk_mib": 0.01},
    }, base_dir=d)
    path = run(spec, progress=False).path
    build_index(path, scheduler="synchronous")
    return path


class Case:
    """A directory with a spec (``raw``), a checkpoint and a store root, and what to run against it."""

    def __init__(self, tmp_path: Path, raw: dict[str, Any], ckpt: Path):
        self.dir, self.raw, self.ckpt = tmp_path, raw, ckpt
        self.root = Path(raw["store"]["root"])
        self.spec_file = tmp_path / "job.yaml"

    def write(self, text: str | None = None) -> Path:
        self.spec_file.write_text(text if text is not None else yaml.safe_dump(self.raw))
        return self.spec_file

    @property
    def store(self) -> Path:
        return self.root / self.raw["store"]["path"]

    def copy_ckpt(self, name: str) -> Path:
        dst = self.dir / name
        shutil.copytree(self.ckpt, dst)
        self.raw["model"]["path"] = str(dst)
        return dst


def _set(raw: dict, dotted: str, value: Any) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[key] = value


def edit(**changes: Any) -> Callable[[Case], list[str]]:
    """A case that only changes spec keys (``run__batch_size=2.5`` sets run.batch_size)."""
    def setup(case: Case) -> list[str]:
        for key, value in changes.items():
            _set(case.raw, key.replace("__", "."), value)
        return ["run", case.write(), "--quiet"]
    return setup


def yaml_text(text: str) -> Callable[[Case], list[str]]:
    def setup(case: Case) -> list[str]:
        return ["run", case.write(text), "--quiet"]
    return setup


def missing_spec(case: Case) -> list[str]:
    return ["run", case.dir / "nope.yaml"]


def unsupported_model(case: Case) -> list[str]:
    ckpt = case.copy_ckpt("llama")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    return ["run", case.write(), "-q"]


def pickle_checkpoint(case: Case) -> list[str]:
    import torch

    ckpt = case.copy_ckpt("pickled")
    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(weights, ckpt / "pytorch_model.bin")
    return ["run", case.write(), "-q"]


def truncated_checkpoint(case: Case) -> list[str]:
    ckpt = case.copy_ckpt("truncated")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["run", case.write(), "-q"]


def missing_tensor(case: Case) -> list[str]:
    ckpt = case.copy_ckpt("incomplete")
    weights = load_file(ckpt / "model.safetensors")
    del weights["gpt_neox.layers.2.mlp.dense_4h_to_h.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ["run", case.write(), "-q"]


def missing_tokenizer(case: Case) -> list[str]:
    ckpt = case.copy_ckpt("no-tokenizer")
    for f in ckpt.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    return ["run", case.write(), "-q"]


def empty_corpus(case: Case) -> list[str]:
    (case.dir / "empty.txt").write_text("")
    case.raw["prompts"]["paths"] = [str(case.dir / "empty.txt")]
    return ["run", case.write(), "-q"]


def nonfinite(case: Case) -> list[str]:
    ckpt = case.copy_ckpt("inf")
    weights = load_file(ckpt / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"][5] = float("inf")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ["run", case.write(), "-q"]


def existing_store(*extra: str, **changes: Any) -> Callable[[Case], list[str]]:
    """A complete store first; then the same (or a changed) spec again with ``extra`` flags."""
    def setup(case: Case) -> list[str]:
        from harvest.runner import run
        from harvest.spec import load_spec

        run(load_spec(case.write()), progress=False)
        for key, value in changes.items():
            _set(case.raw, key.replace("__", "."), value)
        return ["run", case.write(), "-q", *extra]
    return setup


def full_disk(case: Case, monkeypatch) -> list[str]:
    import os

    real = os.pwritev
    calls = {"n": 0}

    def pwritev_until_full(*args):  # the shard writer's one write call
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "pwritev", pwritev_until_full)
    return ["run", case.write(), "-q"]


def query(*args: str) -> Callable[[Case, Path], list[str]]:
    def setup(case: Case, store: Path) -> list[str]:
        return ["query", "dim", store, *args]
    return setup


#: (case name, setup, what is left: "nothing" | "unchanged" | "failed")
CASES: list[tuple[str, Callable, str]] = [
    ("YAML syntax error", yaml_text("model:\n  path: x\n capture: [\n"), "nothing"),
    ("YAML indented with a tab", yaml_text("model:\n\tpath: x\n"), "nothing"),
    ("spec file missing", missing_spec, "nothing"),
    ("spec not a mapping", yaml_text("- just\n- a list\n"), "nothing"),
    ("unknown key in a section", edit(capture__hoks=["x"]), "nothing"),
    ("unknown section", edit(captures={}), "nothing"),
    ("model directory missing", edit(model__path="/nonexistent/model"), "nothing"),
    ("unsupported model type", unsupported_model, "nothing"),
    ("pickle checkpoint without allow_pickle", pickle_checkpoint, "nothing"),
    ("truncated checkpoint", truncated_checkpoint, "nothing"),
    ("checkpoint missing a tensor", missing_tensor, "nothing"),
    ("no tokenizer files", missing_tokenizer, "nothing"),
    ("unknown hook", edit(capture__hooks=["blocks.*.hook_resid_pots"]), "nothing"),
    ("hook layer out of range", edit(capture__hooks=["blocks.9.hook_resid_post"]), "nothing"),
    ("capture.layers out of range", edit(capture__layers=[0, 7]), "nothing"),
    ("capture.heads out of range", edit(capture__hooks=["blocks.0.attn.hook_z"], capture__heads=[99]), "nothing"),
    ("sequence longer than the context", edit(prompts__seq_len=300, prompts__mode="packed"), "nothing"),
    ("corpus glob matches nothing", edit(prompts__paths=["/nonexistent/*.txt"]), "nothing"),
    ("empty corpus file", empty_corpus, "nothing"),
    ("store path escapes the root", edit(store__path="../outside.zarr"), "nothing"),
    ("store path absolute elsewhere", edit(store__path="/etc/evil.zarr"), "nothing"),
    ("run.batch_size 2.5", edit(run__batch_size=2.5), "nothing"),
    ("run.batch_size 0", edit(run__batch_size=0), "nothing"),
    ("run.stages 1.5", edit(run__stages=1.5), "nothing"),
    ("run.stages a boolean", edit(run__stages=True), "nothing"),
    ("run.stages more than layers", edit(run__stages=9), "nothing"),
    ("model.device 5", edit(model__device=5), "nothing"),
    ("model.device unknown", edit(model__device="tpu"), "nothing"),
    ("model.allow_pickle a string", edit(model__allow_pickle="yes"), "nothing"),
    ("model.dtype unknown", edit(model__dtype="float8"), "nothing"),
    ("store.chunk_mib a string", edit(store__chunk_mib="big"), "nothing"),
    ("capture.top_k negative", edit(capture__top_k=-1), "nothing"),
    ("existing store, no --resume", existing_store(), "unchanged"),
    ("resume with a changed spec", existing_store("--resume", capture__hooks=["blocks.*.hook_resid_pre"]),
     "unchanged"),
    ("--resume with --overwrite", existing_store("--resume", "--overwrite"), "unchanged"),
    ("NaN with on_nonfinite: fail", nonfinite, "failed"),
    ("full disk", full_disk, "failed"),
    ("query: dimension out of range", query("99999"), "unchanged"),
    ("query: unknown hook", query("3", "--hook", "hook_nope"), "unchanged"),
    ("query: --top 0", query("3", "--top", "0"), "unchanged"),
    ("inspect: not a store", lambda case: ["inspect", case.dir], "nothing"),
    ("mistyped sub-command", lambda case: ["runn", case.write()], "nothing"),
    ("unknown option", lambda case: ["run", case.write(), "--resum"], "nothing"),
    ("submit: unreachable cluster", lambda case: ["submit", case.write(), "--address", "http://127.0.0.1:9"],
     "nothing"),
    ("submit: unknown hook, checked before submitting",
     lambda case: ["submit", (edit(capture__hooks=["blocks.*.hook_resid_pots"])(case))[1], "--address",
                   "http://127.0.0.1:9"], "nothing"),
    ("status: unreachable cluster", lambda case: ["status", "harvest-x", "--address", "http://127.0.0.1:9"],
     "nothing"),
]


@pytest.mark.parametrize("name,setup,left", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(name, setup, left, neox_ckpt, make_spec, tmp_path, capfd,
                                                monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = make_spec(neox_ckpt, raw=True, hooks=["blocks.{0..2}.hook_resid_post"])
    case = Case(tmp_path, raw, neox_ckpt)
    if setup is full_disk:
        args = full_disk(case, monkeypatch)
    elif name.startswith("query"):
        store = request.getfixturevalue("indexed_store")
        case.root = store.parent
        args = setup(case, store)
    else:
        args = setup(case)
    before = snapshot(case.root)
    capfd.readouterr()  # what the setup printed is not the case's output

    code, _, err = harvest(args, capfd, monkeypatch)

    lines = err.strip().splitlines()
    TABLE.append((name, code, err.strip()))
    assert code != 0, f"{name}: exit code 0"
    assert len(lines) == 1, f"{name}: {len(lines)} lines on stderr:\n{err}"
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    if left == "nothing":
        assert not case.store.exists(), f"{name}: a store was left at {case.store}"
        assert not (tmp_path / "outside.zarr").exists()
    elif left == "unchanged":
        assert snapshot(case.root) == before, f"{name}: the store changed"
    else:  # failed: the store says so and why, and claims nothing it lacks
        import zarr

        info = zarr.open_group(str(case.store), mode="r").attrs["harvest"]
        assert info["status"] == "failed" and info["stopped"]["reason"] and info["stopped"]["time"]
        assert "--resume" in err or "NaN" in err


def test_the_table_covers_at_least_25_kinds():
    assert len(CASES) >= 25


def pytest_sessionfinish_table(path: Path) -> None:
    """Write the table of cases run: ``HARVEST_BAD_INPUT_TABLE=out.md pytest tests/test_bad_inputs.py``."""
    rows = ["| case | exit | message |", "|---|---|---|"]
    tmp = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+")
    rows += [f"| {n} | {c} | `{tmp.sub('<tmp>', m).replace('|', '/')}` |" for n, c, m in TABLE]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    import os

    if os.environ.get("HARVEST_BAD_INPUT_TABLE") and TABLE:
        pytest_sessionfinish_table(Path(os.environ["HARVEST_BAD_INPUT_TABLE"]))
