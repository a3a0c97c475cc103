"""Issue 16: each fault found by trying harvest as a new user would, reproduced, and its class closed.

Signals (item 1) are in test_signals.py (real processes); the table of bad inputs through the CLI
is test_bad_inputs.py.
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import sys
import typing
import warnings

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file, save_file

from harvest.errors import HookNameError, ModelError, NonFiniteActivationError, SpecError, StoreError
from harvest.runner import run
from harvest.spec import CaptureSpec, ModelSpec, RunSpec, StoreSpec, load_spec, parse_spec


# --- item 3: a model without tokenizer files; an empty corpus -------------------------------------

def test_missing_tokenizer_is_named_before_a_store_exists(neox_ckpt, make_spec, tmp_path):
    import shutil

    ckpt = tmp_path / "no-tokenizer"
    shutil.copytree(neox_ckpt, ckpt)
    for f in ckpt.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    spec = make_spec(ckpt)
    with pytest.raises(ModelError, match=f"no tokenizer in {ckpt}"):
        run(spec, progress=False)
    assert not spec.store_path().exists()


def test_an_empty_corpus_file_is_named(neox_ckpt, make_spec, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    spec = make_spec(neox_ckpt, prompts={"paths": [str(tmp_path / "empty.txt")]})
    with pytest.raises(SpecError, match="empty.txt is empty"):
        run(spec, progress=False)
    assert not spec.store_path().exists()


# --- item 4: every spec key checked for its type at the boundary ----------------------------------

def _wrong_values(hint) -> list:
    """Values of the wrong type for a field annotation."""
    args = set(typing.get_args(hint)) or {hint}
    wrong = []
    if int in args or float in args:
        wrong += [True, "3"]
        if float not in args:
            wrong.append(2.5)
    if str in args:
        wrong.append(5)
    if bool in args:
        wrong += ["yes", 1]
    return wrong


SECTIONS = {"model": ModelSpec, "capture": CaptureSpec, "run": RunSpec, "store": StoreSpec}
TYPED_KEYS = [(section, f.name, value)
              for section, cls in SECTIONS.items()
              for f in dataclasses.fields(cls)
              if f.name not in ("hooks", "layers", "heads", "neurons", "positions")  # parsed by their own rules
              for value in _wrong_values(typing.get_type_hints(cls)[f.name])]


@pytest.mark.parametrize("section,key,value", TYPED_KEYS, ids=[f"{s}.{k}={v!r}" for s, k, v in TYPED_KEYS])
def test_every_spec_key_rejects_a_wrong_type(neox_ckpt, make_spec, section, key, value):
    raw = make_spec(neox_ckpt, raw=True)
    raw[section][key] = value
    with pytest.raises(SpecError, match=rf"{section}\.{key}"):
        parse_spec(raw)


def test_the_issue_s_numbers(neox_ckpt, make_spec):
    for section, key, value, message in [("run", "batch_size", 2.5, "must be an integer >= 1"),
                                         ("run", "stages", 1.5, "must be an integer >= 1"),
                                         ("model", "device", 5, "must be a string")]:
        raw = make_spec(neox_ckpt, raw=True)
        raw[section][key] = value
        with pytest.raises(SpecError, match=f"{section}.{key} {message}, got {value}"):
            parse_spec(raw)


def test_a_list_where_a_number_goes_is_named(neox_ckpt, make_spec):
    raw = make_spec(neox_ckpt, raw=True)
    raw["run"]["memory_gib"] = ["a"]
    with pytest.raises(SpecError, match="run.memory_gib"):
        parse_spec(raw)


# --- item 5: failed runs say so, and resume once the cause is fixed --------------------------------

def test_a_failed_run_records_why_and_resumes_after_the_fix(neox_ckpt, make_spec, monkeypatch):
    from harvest import writer
    from harvest.summary import format_summary, summarize

    spec = make_spec(neox_ckpt)
    real, calls = writer.ArrayWriter.flush, {"n": 0}

    def full_after_three(self):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(writer.ArrayWriter, "flush", full_after_three)
    with pytest.raises(StoreError, match="is full"):
        run(spec, progress=False)
    summary = summarize(spec.store_path())
    assert summary["status"] == "failed"
    assert "is full" in summary["stopped"]["reason"] and summary["stopped"]["time"]
    assert "failed" in format_summary(summary) and "is full" in format_summary(summary)

    monkeypatch.setattr(writer.ArrayWriter, "flush", real)  # space freed
    result = run(spec, resume=True, progress=False)
    info = zarr.open_group(str(result.path), mode="r").attrs["harvest"]
    assert info["status"] == "complete" and "stopped" not in info


def test_a_missing_tensor_fails_before_the_store_is_created(neox_ckpt, make_spec, tmp_path):
    import shutil

    ckpt = tmp_path / "incomplete"
    shutil.copytree(neox_ckpt, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    del weights["gpt_neox.layers.1.attention.dense.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    spec = make_spec(ckpt)
    with pytest.raises(ModelError, match=r"lacks 1 tensor\(s\).*gpt_neox.layers.1.attention.dense.weight"):
        run(spec, progress=False)
    assert not spec.store_path().exists()


# --- item 6: submit checks the spec against the model before it submits ----------------------------

def test_submit_refuses_a_bad_hook_before_contacting_the_cluster(neox_ckpt, make_spec, tmp_path):
    import yaml

    from cluster import submit

    raw = make_spec(neox_ckpt, raw=True, hooks=["blocks.*.hook_resid_pots"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    # the address answers nothing: the error must come before any connection is tried
    with pytest.raises(HookNameError, match="did you mean 'hook_resid_post'"):
        submit(path, "http://127.0.0.1:9", base_dir=tmp_path)
    raw = make_spec(neox_ckpt, raw=True, run={"stages": 9})
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="run.stages is 9"):
        submit(path, "http://127.0.0.1:9", base_dir=tmp_path)


def test_submit_warns_when_the_model_is_only_on_the_cluster(neox_ckpt, make_spec, tmp_path):
    import yaml

    from cluster import submit

    raw = make_spec(neox_ckpt, raw=True)
    raw["model"]["path"] = "/cluster/only/model"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    job = submit(path, dry_run=True, base_dir=tmp_path)
    assert any("checked when the job starts on the cluster" in w for w in job.warnings)


# --- item 8: messages that say what applies --------------------------------------------------------

def test_a_tab_says_indent_with_spaces(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("model:\n  path: x\ncapture:\n\thooks: [a]\n")
    with pytest.raises(SpecError, match=r"line 4, column 1: a tab character; indent with spaces"):
        load_spec(path)


def test_a_refused_resume_names_the_changed_keys(neox_ckpt, make_spec):
    from harvest.errors import FingerprintMismatchError

    run(make_spec(neox_ckpt), progress=False)
    changed = make_spec(neox_ckpt, hooks=["blocks.*.hook_resid_pre"], capture={"on_nonfinite": "flag"},
                        run={"threads": 1})  # threads change no stored byte: not named
    with pytest.raises(FingerprintMismatchError, match=r"\(capture.hooks, capture.on_nonfinite differ\)"):
        run(changed, resume=True, progress=False)


@pytest.mark.parametrize("compute,store,advice,not_advice", [
    ("float16", "float16", "model.dtype: float32 or bfloat16", None),
    ("float32", "float16", "capture.dtype: float32", "model.dtype"),
    ("bfloat16", "float32", "check the weights", "model.dtype: float32"),
    ("float32", "float32", "check the weights", "model.dtype: float32"),
])
def test_nonfinite_advice_fits_the_dtypes(compute, store, advice, not_advice):
    from harvest.writer import nonfinite_advice

    text = nonfinite_advice(compute, store)
    assert advice in text
    assert not_advice is None or not_advice not in text


def test_nonfinite_in_float32_does_not_suggest_float32(neox_ckpt, make_spec, tmp_path):
    import shutil

    ckpt = tmp_path / "inf"
    shutil.copytree(neox_ckpt, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"][5] = float("inf")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteActivationError) as exc:
        run(make_spec(ckpt, hooks=["blocks.{0..2}.hook_resid_post"]), progress=False)
    assert "model.dtype: float32" not in str(exc.value) and "check the weights" in str(exc.value)


# --- item 9: a mistyped sub-command is a usage line, exit 2 ----------------------------------------

@pytest.mark.parametrize("argv,says", [(["runn"], "No such command 'runn'. Did you mean 'run'?"),
                                       (["inspect"], "Missing argument"),
                                       (["run", "x.yaml", "--resum"], "No such option: --resum")])
def test_usage_errors_are_one_line_with_exit_2(argv, says, capfd, monkeypatch):
    from harvest.cli import main

    monkeypatch.setattr(sys, "argv", ["harvest", *argv])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capfd.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and says in err and "--help" in err and "Traceback" not in err


# --- item 10: consolidated metadata: xarray opens quietly, zarr keeps seeing everything -------------

def _open_quietly(path):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(str(path))


def test_xarray_opens_a_finished_store_without_a_warning(neox_ckpt, make_spec):
    from analysis.index import build_index

    path = run(make_spec(neox_ckpt), progress=False).path
    ds = _open_quietly(path)
    assert "blocks.3.hook_resid_post" in ds
    np.testing.assert_array_equal(ds["blocks.3.hook_resid_post"].values,
                                  zarr.open_group(str(path), mode="r")["blocks.3.hook_resid_post"][...])

    build_index(path, scheduler="synchronous")  # an analysis adds arrays: readers must see them
    assert "analysis/index" in zarr.open_group(str(path), mode="r")
    _open_quietly(path)


def test_opening_to_write_drops_the_consolidated_copy(neox_ckpt, make_spec):
    """zarr trusts the consolidated copy over the files: a copy left while writing would hide new arrays."""
    from harvest.store import has_consolidated_metadata, open_group

    path = run(make_spec(neox_ckpt), progress=False).path
    assert has_consolidated_metadata(path)
    group = open_group(path, mode="r+")
    assert not has_consolidated_metadata(path)
    group.require_group("analysis").create_array("x", shape=(2,), dtype="f4")
    assert "analysis/x" in zarr.open_group(str(path), mode="r")
