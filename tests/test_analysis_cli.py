"""The analysis boundary: one hook-name language for `harvest run` and every analysis, one Dask
runtime (an unreachable --scheduler is a one-line error everywhere), one meaning of --dry-run
(compute nothing, write nothing), one error class for every analysis.

Stores here are written by `harvest run` on the tiny test checkpoint: a `numbers` store (for
fourier, outliers, index and query) and a `translation` store (for translation-heads).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import fourier, runtime, scan, translation_heads
from harvest.architectures import GPT_NEOX, GPTJ
from harvest.errors import AnalysisError, HarvestError, HookNotInStoreError
from harvest.hookpoints import BLOCK_DIMS, MODEL_DIMS, expand, resolve
from harvest.spec import parse_spec

NUMBERS_HOOKS = ["embed", "resid_post", "blocks.{0..1}.ln1"]


def harvest(ckpt: Path, root: Path, name: str, hooks: list[str], prompts: dict) -> Path:
    from harvest.runner import run

    spec = parse_spec({
        "name": name, "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "prompts": prompts, "capture": {"hooks": hooks}, "run": {"batch_size": 8},
        "store": {"root": str(root), "path": f"{name}.zarr"},
    }, base_dir=root)
    return Path(run(spec, progress=False).path)


@pytest.fixture(scope="module")
def stores(make_checkpoint, tmp_path_factory) -> dict[str, Path]:
    ckpt = make_checkpoint("gpt_neox")
    root = tmp_path_factory.mktemp("analysis-cli")
    return {
        "ckpt": ckpt,
        "numbers": harvest(ckpt, root, "numbers", NUMBERS_HOOKS, {"source": "numbers", "range": [0, 40]}),
        "translation": harvest(ckpt, root, "translation", ["pattern"],
                               {"source": "translation", "n_prompts": 12, "words_per_prompt": 2}),
    }


def cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `harvest ARGV` as a user would (through ``main``): exit code, stdout, stderr."""
    from harvest.cli import main

    monkeypatch.setattr(sys, "argv", ["harvest", *argv])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (a store and what lies beside it) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(stores) -> dict[str, list[str]]:
    """Every analyze command that runs a Dask graph, with arguments that make it valid on these stores."""
    numbers, translation = str(stores["numbers"]), str(stores["translation"])
    return {
        "outliers": ["analyze", "outliers", numbers],
        "index": ["index", numbers],
        "fourier": ["analyze", "fourier", numbers, "--shuffles", "2"],
        "translation-heads": ["analyze", "translation-heads", translation],
    }


COMMANDS = ["outliers", "index", "fourier", "translation-heads"]


# --- one hook-name language ---------------------------------------------------------------------------

PATTERNS = ["resid_post", "hook_resid_post", "blocks.*.hook_resid_post", "blocks.*.resid_post",
            "blocks.{0..2}.resid_post", "blocks.{1,3}.ln1", "blocks.2.attn.hook_z", "z", "pattern", "post",
            "blocks.{0..1}.mlp.hook_post", "embed", "hook_embed", "ln_final", "normalized", "ln2"]


@pytest.mark.parametrize("arch", [GPT_NEOX, GPTJ], ids=lambda a: a.model_type)
def test_store_names_resolve_exactly_as_run_expands_them(arch):
    """`resolve` against a store holding every hook point selects what `expand` captures for a model."""
    n_layers = 4
    everything = [h.name for h in expand(list(MODEL_DIMS) + [t for t in BLOCK_DIMS if t in arch.hooks], arch, n_layers)]
    for pattern in PATTERNS:
        try:
            captured = [h.name for h in expand([pattern], arch, n_layers)]
        except HarvestError:  # a hook point this architecture does not have (GPT-J has no ln2)
            with pytest.raises(HookNotInStoreError):
                resolve(pattern, everything)
            continue
        assert resolve(pattern, everything) == captured, pattern


def test_resolve_errors_name_what_the_store_holds():
    names = ["hook_embed", *(f"blocks.{i}.hook_resid_post" for i in range(4))]
    with pytest.raises(HookNotInStoreError, match=r"unknown hook point 'resid_pots' \(did you mean 'resid_post'\?\); "
                                                  r"s.zarr holds: hook_embed, hook_resid_post \(layers 0-3\)"):
        resolve("resid_pots", names, where="s.zarr")
    with pytest.raises(HookNotInStoreError, match=r"hook 'ln1' \(ln1.hook_normalized\) was not harvested into s.zarr"):
        resolve("ln1", names, where="s.zarr")
    with pytest.raises(HookNotInStoreError, match=r"layers 4-7 not harvested into s.zarr; harvested layers of "
                                                  r"hook_resid_post: 0-3"):
        resolve("blocks.{2..7}.resid_post", names, where="s.zarr")
    with pytest.raises(HookNotInStoreError, match="model-level hook point"):
        resolve("blocks.0.embed", names)
    with pytest.raises(HookNotInStoreError, match="range {3..1} is empty"):
        resolve("blocks.{3..1}.resid_post", names)
    assert issubclass(HookNotInStoreError, AnalysisError)


def test_a_run_store_lists_the_hooks_its_spec_expanded_to(stores):
    from analysis.reading import open_store, store_hooks

    held = store_hooks(open_store(stores["numbers"]))
    assert held == [h.name for h in expand(NUMBERS_HOOKS, GPT_NEOX, len([n for n in held if "resid_post" in n]))]
    assert resolve(NUMBERS_HOOKS, held) == held


def test_fourier_takes_every_spelling_of_a_hook(stores, capsys, monkeypatch):
    before = snapshot(stores["numbers"].parent)
    layers = {}
    for hook in ("resid_post", "hook_resid_post", "blocks.*.resid_post", "blocks.{0..1}.hook_resid_post"):
        code, out, err = cli(["analyze", "fourier", str(stores["numbers"]), "--hook", hook, "--shuffles", "2",
                              "--json", "--no-write", "--no-plots"], capsys, monkeypatch)
        assert code == 0, err
        result = json.loads(out)
        assert result["params"]["hook"] == "hook_resid_post"
        layers[hook] = [entry["layer"] for entry in result["layers"]]
    assert layers["resid_post"] == layers["hook_resid_post"] == layers["blocks.*.resid_post"]
    assert len(layers["resid_post"]) > 3 and layers["blocks.{0..1}.hook_resid_post"] == [-1, 0, 1]
    code, out, err = cli(["analyze", "fourier", str(stores["numbers"]), "--hook", "ln1", "--dry-run"], capsys,
                         monkeypatch)
    assert code == 0 and "hook_normalized" not in err and "ln1.hook_normalized at layers 0-1" in out
    code, _, err = cli(["analyze", "fourier", str(stores["numbers"]), "--hook", "post"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: hook 'post' (mlp.hook_post) was not harvested into ")
    assert snapshot(stores["numbers"].parent) == before  # --no-write --no-plots: nothing written anywhere


def test_query_takes_every_spelling_of_a_hook(stores, tmp_path):
    import shutil

    from analysis.index import build_index
    from analysis.query import query_dim

    path = tmp_path / "numbers.zarr"
    shutil.copytree(stores["numbers"], path)
    build_index(path, top_k=4)
    same = [query_dim(path, 3, hook=h, top=2) for h in ("resid_post", "hook_resid_post", "blocks.*.resid_post")]
    assert same[0]["layers"] == same[1]["layers"] == same[2]["layers"]
    one = query_dim(path, 3, hook="blocks.1.resid_post", top=2)
    assert one["layers"] == query_dim(path, 3, hook="resid_post", layer=1, top=2)["layers"]
    assert [r["layer"] for r in one["layers"]] == [1]
    with pytest.raises(AnalysisError, match="names layers 0-1; the query shows one layer"):
        query_dim(path, 3, hook="blocks.{0..1}.resid_post")


# --- one Dask runtime -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_scheduler_is_a_one_line_error(command, stores, capsys, monkeypatch):
    address = f"tcp://127.0.0.1:{closed_port()}"
    for extra in ([], ["--dry-run"]):
        code, out, err = cli([*commands(stores)[command], "--scheduler", address, *extra], capsys, monkeypatch)
        assert code == 2, (out, err)
        assert err.startswith(f"error: cannot reach the dask scheduler at '{address}'"), err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_circuit_analyses_run_on_a_distributed_scheduler_too(stores):
    from distributed import LocalCluster

    threads = translation_heads.analyze(stores["translation"], write=False, plot=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        remote = translation_heads.analyze(stores["translation"], write=False, plot=False,
                                           scheduler=cluster.scheduler_address)
        numbers = fourier.analyze(stores["numbers"], n_shuffles=2, write=False, plot=False,
                                  scheduler=cluster.scheduler_address)
    for name, value in threads.scores.items():
        np.testing.assert_allclose(remote.scores[name], value, equal_nan=True)
    local = fourier.analyze(stores["numbers"], n_shuffles=2, write=False, plot=False, scheduler="sync")
    np.testing.assert_allclose(numbers.power, local.power)


def test_runtime_runs_graphs_where_it_is_told():
    import dask

    graph = dask.delayed(sum)([1, 2, 3])
    for spec in (None, "threads", "sync", dask.get):
        with runtime.dask_scheduler(spec, num_workers=1):
            assert dask.compute(graph)[0] == 6
    for bad in ("udp://127.0.0.1:1", 3.5):
        with pytest.raises(AnalysisError, match="--scheduler|unknown scheme"):
            with runtime.dask_scheduler(bad):
                pass
    assert runtime.describe("sync") == "one thread in this process (sync)"


# --- one --dry-run ----------------------------------------------------------------------------------------

def forbid_computing(monkeypatch) -> None:
    """Any Dask computation, scheduler set-up or plot in the dry run fails the test."""
    import dask
    import dask.base

    import analysis.plots

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run computed something")

    for module in (scan, fourier, translation_heads):
        monkeypatch.setattr(module, "dask_scheduler", refuse)
    monkeypatch.setattr(dask, "compute", refuse)
    monkeypatch.setattr(dask.base, "compute", refuse)
    monkeypatch.setattr(analysis.plots, "pyplot", refuse)
    monkeypatch.setattr(fourier, "pyplot", refuse)
    monkeypatch.setattr(translation_heads, "pyplot", refuse)


@pytest.mark.parametrize("command", COMMANDS)
def test_dry_run_computes_and_writes_nothing(command, stores, capsys, monkeypatch):
    folder = stores["numbers"].parent
    before = snapshot(folder)
    forbid_computing(monkeypatch)
    code, out, err = cli([*commands(stores)[command], "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    assert "would read" in out and "would run on: threads in this process" in out
    written = out.split("would write: ")[1]
    assert written.startswith(str(stores["translation" if command == "translation-heads" else "numbers"]))
    assert snapshot(folder) == before


def test_dry_run_says_what_no_write_leaves_out(stores, capsys, monkeypatch):
    forbid_computing(monkeypatch)
    code, out, _ = cli(["analyze", "fourier", str(stores["numbers"]), "--dry-run", "--no-write"], capsys, monkeypatch)
    assert code == 0 and "analysis/fourier" not in out and "numbers.fourier_spectrum.png" in out
    code, out, _ = cli(["analyze", "translation-heads", str(stores["translation"]), "--dry-run", "--no-write",
                        "--no-plots"], capsys, monkeypatch)
    assert code == 0 and out.rstrip().endswith("would write: nothing")


def test_dry_run_checks_the_store(stores, capsys, monkeypatch):
    code, _, err = cli(["analyze", "translation-heads", str(stores["numbers"]), "--dry-run"], capsys, monkeypatch)
    assert code == 2 and "stores no word alignment" in err and err.count("\n") == 1


# --- one error class ----------------------------------------------------------------------------------------

def test_every_analysis_raises_harvest_errors_analysis_error(stores):
    with pytest.raises(AnalysisError):
        fourier.analyze(stores["translation"], write=False, plot=False)
    with pytest.raises(AnalysisError):
        translation_heads.analyze(stores["numbers"], write=False, plot=False)
    with pytest.raises(AnalysisError):
        fourier.analyze(stores["numbers"], periods="sometimes", write=False, plot=False)
    assert np.issubdtype(np.asarray(translation_heads.analyze(stores["translation"], write=False,
                                                              plot=False).heads).dtype, np.integer)
