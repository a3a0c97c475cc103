"""The store: readable without this project, checksummed, with provenance; inspect and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from harvest.summary import summarize
from harvest.runner import run

HOOKS = ["hook_embed", "blocks.*.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern",
         "blocks.1.mlp.hook_post"]


@pytest.fixture
def store(neox_ckpt, make_spec):
    return run(make_spec(neox_ckpt, hooks=HOOKS), progress=False).path


def test_opens_with_plain_zarr_and_xarray_without_this_project(store):
    script = f"""
import sys, json
sys.path = [p for p in sys.path if p not in ('', '.')]
import numpy as np, zarr, xarray as xr
g = zarr.open_group({str(store)!r}, mode='r')
ds = xr.open_zarr({str(store)!r}, consolidated=False)
out = {{
  'harvest_imported': any(m == 'harvest' or m.startswith('harvest.') for m in sys.modules),
  'dims': {{k: list(ds[k].dims) for k in ['blocks.0.hook_resid_post', 'blocks.0.attn.hook_z',
           'blocks.0.attn.hook_pattern', 'blocks.1.mlp.hook_post', 'tokens']}},
  'equal': bool(np.array_equal(ds['blocks.2.hook_resid_post'].values, g['blocks.2.hook_resid_post'][...])),
  'provenance': sorted(g.attrs['harvest']),
}}
print(json.dumps(out))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    cwd="/").stdout)
    assert not out["harvest_imported"]
    assert out["dims"] == {
        "blocks.0.hook_resid_post": ["token", "d_model"],
        "blocks.0.attn.hook_z": ["token", "head", "d_head"],
        "blocks.0.attn.hook_pattern": ["sequence", "head", "query", "key"],
        "blocks.1.mlp.hook_post": ["token", "neuron"],
        "tokens": ["token"],
    }
    assert out["equal"]
    for key in ("spec", "model", "fingerprint", "fingerprint_fields", "software", "created", "store_dtype"):
        assert key in out["provenance"]


def test_open_store_gives_coordinates(store):
    import harvest

    ds = harvest.open_store(store)
    assert {"seq", "pos", "tokens"} <= set(ds.coords)
    assert ds["blocks.0.hook_resid_post"].dims == ("token", "d_model")
    assert ds.attrs["harvest"]["status"] == "complete"


def test_sharded_checksummed_and_chunked(store):
    g = zarr.open_group(str(store), mode="r")
    arr = g["blocks.0.hook_resid_post"]
    codecs = arr.metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
    assert "crc32c" in inner and "crc32c" in [c["name"] for c in codecs[0]["configuration"]["index_codecs"]]
    assert arr.shards[0] % arr.chunks[0] == 0 and arr.shards[0] > arr.chunks[0]


def test_corrupted_chunk_is_detected_not_read(store):
    g = zarr.open_group(str(store), mode="r")
    shard_files = sorted((store / "blocks.1.hook_resid_post" / "c").rglob("*"))
    shard = next(f for f in shard_files if f.is_file())
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        g["blocks.1.hook_resid_post"][...]


def test_provenance_records_what_determines_the_bytes(store, neox_ckpt):
    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    assert info["model"]["model_type"] == "gpt_neox"
    assert info["model"]["config"]["hidden_size"] == 64
    assert set(info["model"]["weights"]["files"]) == {"model.safetensors"}
    assert info["spec"]["capture"]["hooks"] == HOOKS
    assert {"model weights", "prompts", "capture", "tokenizer", "batch size"} <= set(info["fingerprint_fields"])
    assert {"torch", "transformers", "zarr"} <= set(info["software"])
    assert info["layout"]["n_rows"] == zarr.open_group(str(store))["tokens"].shape[0]


def test_tokenizer_is_in_the_store(store, tmp_path):
    from transformers import AutoTokenizer

    from harvest.store import open_group, read_files

    tok = AutoTokenizer.from_pretrained(read_files(open_group(store)["tokenizer"], tmp_path / "tok"))
    g = zarr.open_group(str(store), mode="r")
    ids = g["input_ids"][0, : g["seq_length"][0]]
    assert tok.decode(ids)


def test_inspect_summary(store):
    s = summarize(store)
    assert s["status"] == "complete"
    assert s["progress"]["batches_done"] == s["progress"]["batches"] > 1
    names = {a["name"] for a in s["arrays"]}
    assert "blocks.3.hook_resid_post" in names
    assert all(a["stored_bytes"] > 0 for a in s["arrays"])


def test_cli_run_and_inspect(neox_ckpt, make_spec, tmp_path):
    import yaml

    spec = make_spec(neox_ckpt, raw=True)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "harvest"]
    done = subprocess.run(cli + ["run", str(path), "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout
    again = subprocess.run(cli + ["run", str(path), "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.startswith("error: a store already exists") and "Traceback" not in again.stderr
    shown = subprocess.run(cli + ["inspect", str(tmp_path / "stores" / "job.zarr"), "--json"],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["status"] == "complete"
    helped = subprocess.run(cli + ["run", "--help"], capture_output=True, text=True, check=True)
    assert "--resume" in helped.stdout and "Examples" in helped.stdout


def test_undone_units_are_every_unit_some_stage_has_not_finished(tmp_path):
    """Replicas finish units out of order: a resume redoes the holes before the first finished unit and
    skips the units done after it (the run then counts only those as harvested)."""
    from harvest.store import create_manifest, first_incomplete, mark_written, undone_units

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    create_manifest(group, 2, 10)
    units = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    for stage in (0, 1):
        mark_written(group, stage, 4, start=2)   # unit 1 whole
    mark_written(group, 0, 8, start=6)           # unit 3 only on stage 0
    mark_written(group, 1, 7, start=6)
    mark_written(group, 1, 8, start=7)
    mark_written(group, 0, 9, start=8)           # unit 4 half done
    mark_written(group, 1, 9, start=8)
    assert first_incomplete(group) == 0
    assert undone_units(group, units) == [(0, 2), (4, 6), (8, 10)]
