"""A model given by hub name, without network: resolved from a Hugging Face cache in the hub's layout.

The cache is built here the way ``huggingface_hub`` leaves a download (``models--org--name/``
with ``blobs/`` named by hash, ``snapshots/<commit>/`` of symlinks into them, ``refs/main``
holding the commit), checked with the hub's own ``scan_cache_dir``, and read with
``HF_HUB_OFFLINE=1``: the by-name path must load the same weights through the same safetensors
code as a local directory, record the snapshot's commit, and fail in one line when a model is
not cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from harvest.errors import CheckpointNotFoundError
from harvest.runner import prepare, run
from harvest.store import ATTRS_KEY, open_group

REPO = Path(__file__).resolve().parent.parent
NAME = "toy-org/tiny-neox"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(hub_cache: Path, repo_id: str, checkpoint: Path, commit: str,
                       files: list[str] | None = None) -> Path:
    """Lay ``checkpoint``'s files out as ``huggingface_hub`` caches a download; returns the snapshot dir."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(checkpoint.iterdir()):
        if not f.is_file() or (files is not None and f.name not in files):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict[str, str]:
    """A fresh process's environment: no network for the hub library, its cache under ``hf_home``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}  # this checkout's harvest, whatever the environment has installed
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(var, None)
    return env


@pytest.fixture
def hf_home(tmp_path, neox_ckpt) -> Path:
    home = tmp_path / "hf"
    populate_hub_cache(home / "hub", NAME, neox_ckpt, COMMIT)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch) -> Path:
    """In this process: the hub library reads its cache path and offline flag from its constants."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def test_the_cache_is_in_the_hubs_own_layout(hf_home, neox_ckpt):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == NAME and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == {p.name for p in neox_ckpt.iterdir() if p.is_file()}


def test_run_by_name_offline_records_the_revision_and_matches_the_local_checkpoint(hf_home, neox_ckpt, make_spec,
                                                                                  tmp_path):
    """``harvest run`` in a fresh process with HF_HUB_OFFLINE=1 and HF_HOME: same bytes as the local path."""
    raw = make_spec(neox_ckpt, raw=True)
    local = run(make_spec(neox_ckpt), progress=False)
    raw["model"]["path"] = NAME
    raw["store"]["root"] = str(tmp_path / "hub-stores")
    spec_file = tmp_path / "hub.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    env = offline_env(hf_home)
    done = subprocess.run([sys.executable, "-m", "harvest", "run", str(spec_file), "--quiet"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    store = tmp_path / "hub-stores" / "job.zarr"
    model = open_group(store).attrs[ATTRS_KEY]["model"]
    assert model["name"] == NAME
    assert model["revision"] == COMMIT
    assert model["weights"]["revision"] == COMMIT
    assert Path(model["path"]) == hf_home / "hub" / "models--toy-org--tiny-neox" / "snapshots" / COMMIT
    # the weights are the local checkpoint's, loaded through the same code: identical activations
    assert model["weights"]["files"] == open_group(local.path).attrs[ATTRS_KEY]["model"]["weights"]["files"]
    by_name, by_path = zarr.open_group(str(store), mode="r"), zarr.open_group(str(local.path), mode="r")
    for name in ("blocks.0.hook_resid_post", "blocks.3.hook_resid_post"):
        np.testing.assert_array_equal(by_name[name][...], by_path[name][...])

    planned = subprocess.run([sys.executable, "-m", "harvest", "plan", str(spec_file)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    assert f"snapshots/{COMMIT}/config.json" in planned.stdout


def test_model_not_in_the_cache_is_a_one_line_error_that_says_what_to_do(hf_home, make_spec, neox_ckpt, tmp_path):
    raw = make_spec(neox_ckpt, raw=True)
    raw["model"]["path"] = "toy-org/not-downloaded"
    spec_file = tmp_path / "missing.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    env = offline_env(hf_home)
    for command in ("run", "plan"):
        done = subprocess.run([sys.executable, "-m", "harvest", command, str(spec_file)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "'toy-org/not-downloaded' is neither a local directory nor in the Hugging Face cache" in lines[0]
        assert str(hf_home / "hub") in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
        assert "hf download toy-org/not-downloaded" in lines[0] and "local checkpoint directory" in lines[0]
    assert not (tmp_path / "stores").exists()


def test_pinned_revision_resolves_and_an_unknown_one_is_named(offline_cache, make_spec, neox_ckpt):
    import dataclasses

    spec = make_spec(neox_ckpt)
    by_commit = dataclasses.replace(spec, model=dataclasses.replace(spec.model, path=NAME, revision=COMMIT))
    job = prepare(by_commit)
    assert job.ckpt.revision == COMMIT and job.ckpt.directory.name == COMMIT
    other = dataclasses.replace(spec, model=dataclasses.replace(spec.model, path=NAME, revision="v2"))
    with pytest.raises(CheckpointNotFoundError, match=r"revision 'v2'.*hf download toy-org/tiny-neox --revision v2"):
        prepare(other)


def test_a_cached_snapshot_without_weights_says_so(offline_cache, make_spec, neox_ckpt):
    """What ``harvest plan`` alone would leave in a cache: config and tokenizer, no weights."""
    import dataclasses

    populate_hub_cache(offline_cache, "toy-org/config-only", neox_ckpt, COMMIT,
                       files=["config.json", "tokenizer.json", "tokenizer_config.json"])
    spec = make_spec(neox_ckpt)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, path="toy-org/config-only"))
    with pytest.raises(CheckpointNotFoundError, match=r"cached snapshot of 'toy-org/config-only'.*holds no "
                                                      r"weights.*hf download toy-org/config-only"):
        prepare(spec)


def test_a_local_directory_wins_over_a_hub_name_of_the_same_spelling(offline_cache, make_spec, neox_ckpt, tmp_path):
    import dataclasses
    import shutil

    shutil.copytree(neox_ckpt, tmp_path / "toy-org" / "tiny-neox")
    spec = make_spec(neox_ckpt)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, path=NAME))
    job = prepare(spec)
    assert job.ckpt.revision is None and job.ckpt.directory == tmp_path / "toy-org" / "tiny-neox"
