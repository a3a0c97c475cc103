"""Bad input gets a clear error and loses nothing: no store is left half-claimed."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file, save_file

from harvest.errors import (CheckpointNotFoundError, FingerprintMismatchError, HookNameError, ModelError,
                            NonFiniteActivationError, SpecError, StoreError, StoreExistsError)
from harvest.runner import run
from harvest.spec import load_spec, parse_spec


def no_store(spec) -> bool:
    return not spec.store_path().exists()


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: x\n capture: [\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+"):
        load_spec(path)


@pytest.mark.parametrize("section,key,suggestion", [
    ("capture", "hoks", "hooks"), ("model", "dtpye", "dtype"), ("store", "chunk_mb", "chunk_mib"),
])
def test_unknown_keys_suggest_the_right_one(neox_ckpt, make_spec, section, key, suggestion):
    raw = make_spec(neox_ckpt, raw=True)
    raw[section][key] = 1
    with pytest.raises(SpecError, match=f"unknown key '{key}' in {section} \\(did you mean '{suggestion}'\\?\\)"):
        parse_spec(raw)


def test_unknown_top_level_section(neox_ckpt, make_spec):
    raw = make_spec(neox_ckpt, raw=True)
    raw["captures"] = {}
    with pytest.raises(SpecError, match="did you mean 'capture'"):
        parse_spec(raw)


def test_unknown_model_type(neox_ckpt, make_spec, tmp_path):
    ckpt = copy_checkpoint(neox_ckpt, tmp_path / "llama")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    spec = make_spec(ckpt)
    with pytest.raises(ModelError, match="unsupported model type 'llama'.*gpt_neox, gptj"):
        run(spec, progress=False)
    assert no_store(spec)


def test_missing_checkpoint(make_spec, tmp_path):
    spec = make_spec(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*nowhere"):
        run(spec, progress=False)
    assert no_store(spec)


def test_pickle_checkpoint_needs_the_flag(make_checkpoint, neox_ckpt, make_spec):
    ckpt = make_checkpoint("gpt_neox", safe_serialization=False)
    assert not list(ckpt.glob("*.safetensors"))
    spec = make_spec(ckpt)
    with pytest.raises(ModelError, match="allow_pickle: true"):
        run(spec, progress=False)
    assert no_store(spec)
    allowed = run(make_spec(ckpt, model={"allow_pickle": True}, store={"path": "pickle.zarr"}), progress=False)
    safe = run(make_spec(neox_ckpt, store={"path": "safe.zarr"}), progress=False)
    a, b = (zarr.open_group(str(p.path), mode="r")["blocks.3.hook_resid_post"][...] for p in (allowed, safe))
    np.testing.assert_array_equal(a, b)  # same seed, same weights, same bytes


def test_unknown_hook_lists_valid_ones(neox_ckpt, make_spec):
    spec = make_spec(neox_ckpt, hooks=["blocks.*.hook_resid_pots"])
    with pytest.raises(HookNameError, match=r"did you mean 'hook_resid_post'.*Valid: hook_embed"):
        run(spec, progress=False)
    assert no_store(spec)
    with pytest.raises(HookNameError, match="layer 9 does not exist; this model has 4 layers"):
        run(make_spec(neox_ckpt, hooks=["blocks.9.hook_resid_post"]), progress=False)


def test_gptj_has_no_ln2(gptj_ckpt, make_spec):
    with pytest.raises(HookNameError, match="unknown hook point 'ln2' for gptj"):
        run(make_spec(gptj_ckpt, hooks=["ln2"]), progress=False)


def test_sequence_longer_than_context(neox_ckpt, make_spec):
    spec = make_spec(neox_ckpt, prompts={"seq_len": 300, "mode": "packed"})
    with pytest.raises(SpecError, match="longer than the model's context of 256"):
        run(spec, progress=False)
    assert no_store(spec)


def test_existing_store_needs_resume_or_overwrite(neox_ckpt, make_spec):
    spec = make_spec(neox_ckpt)
    run(spec, progress=False)
    with pytest.raises(StoreExistsError, match="--resume .* --overwrite"):
        run(spec, progress=False)
    assert run(spec, overwrite=True, progress=False).batches > 0


def test_resume_refuses_a_different_job(neox_ckpt, make_spec):
    run(make_spec(neox_ckpt), progress=False)
    other = make_spec(neox_ckpt, hooks=["blocks.*.hook_resid_pre"], run={"batch_size": 2})
    with pytest.raises(FingerprintMismatchError, match=r"\(capture.hooks, run.batch_size differ\)"):
        run(other, resume=True, progress=False)


def test_store_path_cannot_escape_its_root(neox_ckpt, make_spec, tmp_path):
    for path in ("../outside.zarr", "/etc/evil.zarr", "a/../../b.zarr"):
        with pytest.raises(SpecError, match="outside the store root"):
            make_spec(neox_ckpt, store={"path": path})
    assert not (tmp_path / "outside.zarr").exists()


@pytest.fixture
def inf_checkpoint(neox_ckpt, tmp_path):
    """Layer 1's MLP output bias holds an inf: resid_post of layer 1 is inf, later layers NaN."""
    ckpt = copy_checkpoint(neox_ckpt, tmp_path / "inf")
    weights = load_file(ckpt / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"][5] = float("inf")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("write_threads", [1, 3])
def test_nonfinite_fails_by_default_and_marks_nothing(inf_checkpoint, make_spec, write_threads):
    spec = make_spec(inf_checkpoint, hooks=["blocks.{0..2}.hook_resid_post"], run={"write_threads": write_threads})
    with pytest.raises(NonFiniteActivationError, match=r"NaN/inf value\(s\) in blocks.1.hook_resid_post, batch 0"):
        run(spec, progress=False)
    g = zarr.open_group(str(spec.store_path()), mode="r")
    assert g["_progress/stage_0"][...].sum() == 0  # resumable, nothing claimed as written
    assert g.attrs["harvest"]["status"] == "failed"
    assert "NaN/inf" in g.attrs["harvest"]["stopped"]["reason"] and g.attrs["harvest"]["stopped"]["time"]


@pytest.mark.parametrize("write_threads", [1, 3])
def test_nonfinite_flag_stores_and_records(inf_checkpoint, make_spec, write_threads):
    spec = make_spec(inf_checkpoint, hooks=["blocks.{0..2}.hook_resid_post"], capture={"on_nonfinite": "flag"},
                     run={"write_threads": write_threads})
    result = run(spec, progress=False)
    assert result.nonfinite["blocks.1.hook_resid_post"] > 0 and "blocks.0.hook_resid_post" not in result.nonfinite
    g = zarr.open_group(str(result.path), mode="r")
    assert g["blocks.1.hook_resid_post"].attrs["nonfinite_values"] == result.nonfinite["blocks.1.hook_resid_post"]
    assert g.attrs["harvest"]["nonfinite"] == result.nonfinite
    assert np.isinf(g["blocks.1.hook_resid_post"][...][:, 5]).all()


def test_full_disk_keeps_the_store_resumable(neox_ckpt, make_spec, monkeypatch):
    import os

    spec = make_spec(neox_ckpt, hooks=["blocks.*.hook_resid_post"])
    real_pwritev, calls = os.pwritev, {"n": 0}

    def pwritev_until_full(*args):  # the shard writer's one write call: the disk fills after a few
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(*args)

    monkeypatch.setattr(os, "pwritev", pwritev_until_full)
    with pytest.raises(StoreError, match="disk holding .* is full .* --resume"):
        run(spec, progress=False)
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    resumed = run(spec, resume=True, progress=False)
    fresh = run(make_spec(neox_ckpt, hooks=["blocks.*.hook_resid_post"], store={"path": "fresh.zarr"}), progress=False)
    for layer in range(4):
        name = f"blocks.{layer}.hook_resid_post"
        a, b = (zarr.open_group(str(p.path), mode="r")[name][...] for p in (resumed, fresh))
        np.testing.assert_array_equal(a, b)
