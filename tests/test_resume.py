"""Crash and resume: a real SIGKILL mid-run, then --resume, ends byte-identical to a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zarr

from harvest.toy import write_stdlib_corpus

pytestmark = pytest.mark.slow


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of the store except the root metadata, which holds timestamps and run figures."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p != root / "zarr.json"}


def batches_done(store: Path) -> int:
    try:
        return int(zarr.open_group(str(store), mode="r")["_progress/stage_0"][...].sum())
    except Exception:  # the manifest is being created or rewritten right now
        return 0


def start_run(spec_path: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harvest", "run", str(spec_path), "--quiet", *extra], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("arch", ["gpt_neox", "gptj"])
def test_sigkill_then_resume_is_byte_identical(arch, make_checkpoint, make_spec, tmp_path):
    shape = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768) \
        if arch == "gpt_neox" else dict(n_embd=192, n_layer=4, n_head=4)
    ckpt = make_checkpoint(arch, **shape)
    hooks = ["hook_embed", "blocks.*.hook_resid_post", "blocks.{1..2}.attn.hook_z", "blocks.3.attn.hook_pattern",
             "blocks.2.mlp.hook_post"]
    corpus = write_stdlib_corpus(tmp_path / "corpus", limit=60)
    raw = make_spec(ckpt, hooks=hooks, raw=True, run={"batch_size": 2, "threads": 1},
                    prompts={"paths": [str(corpus / "*.txt")], "seq_len": 64, "mode": "packed", "max_sequences": 120},
                    store={"chunk_mib": 0.05, "chunks_per_shard": 2})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    clean_raw = {**raw, "store": {**raw["store"], "path": "clean.zarr"}}
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean_raw))
    store = Path(raw["store"]["root"]) / "job.zarr"

    proc = start_run(spec_path, tmp_path)
    while batches_done(store) < 3:  # a run that never writes hangs here: the test's timeout fails it
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = batches_done(store)
    n_batches = zarr.open_group(str(store), mode="r").attrs["harvest"]["layout"]["n_batches"]
    assert n_batches >= 30, "the job should be long enough to be killed midway"
    assert 3 <= killed_at < n_batches, killed_at
    assert zarr.open_group(str(store), mode="r").attrs["harvest"]["status"] == "running"

    resumed = start_run(spec_path, tmp_path, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    clean = start_run(tmp_path / "clean.yaml", tmp_path)
    assert clean.wait(timeout=300) == 0, clean.communicate()[1]

    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    assert info["status"] == "complete"
    assert info["last_run"]["batches"] == n_batches - killed_at  # nothing durable was computed twice
    a, b = store_files(store), store_files(Path(raw["store"]["root"]) / "clean.zarr")
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, f"files differ after resume: {differing[:5]}"
