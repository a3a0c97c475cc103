"""Ctrl-C and SIGTERM to a real ``harvest run``: exit 130 / 143, one line naming the resume command, and
what was computed made durable first, so ``--resume`` ends byte-identical to an uninterrupted run.

The store is laid out as one shard per array, so that without the flush on interrupt nothing at all
would be durable (the fault the issue found: 39% computed, 0 batches saved). The signal is sent
once the progress bar shows a share of the job done, and the resumed store is compared file by file
with a clean run's (with as many stages).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
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


def harvest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harvest", *args]


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_checkpoint):
    """A spec long enough to interrupt (one shard per array), and a clean run's store to compare with."""
    d = tmp_path_factory.mktemp("signals")
    ckpt = make_checkpoint("gpt_neox", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512)
    corpus = write_stdlib_corpus(d / "corpus", limit=80)
    raw = {
        "name": "sig",
        "model": {"path": str(ckpt), "device": "cpu"},
        "prompts": {"source": "text", "paths": [str(corpus / "*.txt")], "seq_len": 64, "mode": "packed",
                    "max_sequences": 160},
        "capture": {"hooks": ["hook_embed", "blocks.*.hook_resid_post", "blocks.1.attn.hook_z",
                              "blocks.3.attn.hook_pattern"]},
        "run": {"batch_size": 2, "threads": 1},
        # one shard holds the whole job: only the flush on interrupt makes anything durable
        "store": {"root": str(d / "stores"), "path": "clean.zarr", "chunk_mib": 64, "chunks_per_shard": 1},
    }
    cleans: dict[int, Path] = {}

    def clean(stages: int) -> Path:
        """An uninterrupted run with as many stages (a pipeline's floats may differ from one process's in the
        last bit: stage boundaries change how torch blocks its matmuls)."""
        if stages not in cleans:
            spec = d / f"clean-{stages}.yaml"
            spec.write_text(yaml.safe_dump(with_stages(raw, f"clean-{stages}.zarr", stages)))
            done = subprocess.run(harvest_cmd("run", str(spec), "-q"), cwd=d, env=ENV, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            cleans[stages] = d / "stores" / f"clean-{stages}.zarr"
        return cleans[stages]

    return d, raw, clean


def with_stages(raw: dict, path: str, stages: int) -> dict:
    return {**raw, "store": {**raw["store"], "path": path}, "run": {**raw["run"], "stages": stages}}


def interrupt_midway(cmd: list[str], cwd: Path, signum: int, group: bool = False) -> tuple[int, str]:
    """Start ``cmd``, send ``signum`` once its progress bar is between 20% and 70%; (exit code, stderr).

    ``group``: to the whole process group, as a terminal's Ctrl-C does (Ray's processes included).
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=group)
    chunks: list[bytes] = []
    midway = threading.Event()

    def read() -> None:
        while block := proc.stderr.read1(4096):
            chunks.append(block)
            shown = [int(p) for p in re.findall(rb"(\d+)%\|", b"".join(chunks)[-400:])]
            if shown and 20 <= shown[-1] <= 70:
                midway.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not midway.wait(0.05):  # a run that never shows progress hangs here: the test's timeout fails it
        assert proc.poll() is None, f"the run ended before it could be interrupted: {b''.join(chunks)[-2000:]!r}"
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("signum,stages,group", [(signal.SIGINT, 1, False), (signal.SIGTERM, 1, False),
                                                 (signal.SIGTERM, 2, False), (signal.SIGINT, 2, True)],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-2-stages", "Ctrl-C-to-the-group-2-stages"])
def test_interrupt_flushes_and_resume_is_byte_identical(job, signum, stages, group):
    d, raw, clean_for = job
    clean = clean_for(stages)
    name = f"{signal.Signals(signum).name.lower()}-{stages}{'-group' if group else ''}.zarr"
    spec = d / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(with_stages(raw, name, stages)))
    store = d / "stores" / name

    code, err = interrupt_midway(harvest_cmd("run", str(spec)), d, signum, group)

    assert code == 128 + signum, err[-3000:]
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted by {signal.Signals(signum).name}; "), last
    assert f"continue with: harvest run {spec} --resume" in last, last
    assert "Traceback" not in err
    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    n_batches = info["layout"]["n_batches"]
    assert info["status"] == "interrupted" and info["stopped"]["time"], info.get("stopped")
    progress = zarr.open_group(str(store), mode="r")["_progress"]
    saved = min(int(progress[k][...].sum()) for k in progress.array_keys())
    # the shard in progress was written and marked: without the flush nothing would be durable
    assert 0 < saved < n_batches, saved
    assert f"{saved}/{n_batches} batches are saved" in last, last

    resumed = subprocess.run(harvest_cmd("run", str(spec), "--resume", "-q"), cwd=d, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    assert info["status"] == "complete" and "stopped" not in info
    assert info["last_run"]["batches"] == n_batches - saved  # nothing saved was computed again
    progress = zarr.open_group(str(store), mode="r")["_progress"]
    assert all(progress[k][...].all() for k in progress.array_keys())
    a, b = store_files(store), store_files(clean)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, f"files differ after interrupt and resume: {differing[:5]}"


@pytest.mark.timeout(600)
def test_a_submitted_job_stopped_by_ray_flushes_and_exits_143(job):
    """What Ray runs for `harvest submit` (``python -m cluster.entrypoint``) gets SIGTERM from `harvest stop`."""
    d, raw, _ = job
    spec = d / "job-entry.yaml"
    spec.write_text(yaml.safe_dump({**raw, "store": {**raw["store"], "path": "entry.zarr", "chunk_mib": 0.05,
                                                     "chunks_per_shard": 2}}))
    store = d / "stores" / "entry.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.entrypoint", str(spec), "--base-dir", str(d),
                             "--progress-every", "0.2"], cwd=d, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def done() -> int:
        try:
            return int(zarr.open_group(str(store), mode="r")["_progress/stage_0"][...].sum())
        except Exception:  # noqa: BLE001 - not created yet
            return 0

    while (seen := done()) < 3:  # a job that never writes hangs here: the test's timeout fails it
        assert proc.poll() is None, f"the job ended before it could be stopped: {proc.communicate()[0][-2000:]}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)

    assert proc.returncode == 143, log[-3000:]
    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    saved = done()
    assert info["status"] == "interrupted" and seen <= saved < info["layout"]["n_batches"]
    assert f"[harvest] stopped: interrupted by SIGTERM; {saved}/{info['layout']['n_batches']} batches are saved" \
        in log, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.timeout(900)
@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-2-replicas", "Ctrl-C-to-the-group-2-replicas"])
def test_interrupted_replicas_stop_cleanly_and_resume_byte_identical(job, signum, group):
    """``run.replicas: 2``: the driver stops both replicas, keeps the units already marked, exits 130/143 with the
    one-line resume hint; ``--resume`` (again with 2 replicas) ends byte-identical to an uninterrupted R = 1 run.
    Shards of one batch here, so every batch is a unit the replicas pull."""
    d, raw, _ = job
    # statistics off: this test compares the rows; tests/test_harvest_statistics.py compares statistics across R
    small = {**raw, "store": {**raw["store"], "chunk_mib": 0.0625, "chunks_per_shard": 1},
             "capture": {**raw["capture"], "statistics": False}}
    clean_spec = d / "replicas-clean.yaml"
    clean_spec.write_text(yaml.safe_dump({**small, "store": {**small["store"], "path": "replicas-clean.zarr"}}))
    clean = d / "stores" / "replicas-clean.zarr"
    if not clean.exists():
        done = subprocess.run(harvest_cmd("run", str(clean_spec), "-q"), cwd=d, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    name = f"{signal.Signals(signum).name.lower()}-replicas.zarr"
    spec = d / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({**small, "store": {**small["store"], "path": name},
                                    "run": {**small["run"], "replicas": 2}}))
    store = d / "stores" / name

    code, err = interrupt_midway(harvest_cmd("run", str(spec)), d, signum, group)

    assert code == 128 + signum, err[-3000:]
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted by {signal.Signals(signum).name}; "), last
    assert f"continue with: harvest run {spec} --resume" in last and "Traceback" not in err, err[-3000:]
    group_ = zarr.open_group(str(store), mode="r")
    info = group_.attrs["harvest"]
    n_batches = info["layout"]["n_batches"]
    saved = int(group_["_progress/stage_0"][...].sum())
    assert info["status"] == "interrupted" and 0 < saved < n_batches, (info.get("stopped"), saved)

    resumed = subprocess.run(harvest_cmd("run", str(spec), "--resume", "-q"), cwd=d, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = zarr.open_group(str(store), mode="r").attrs["harvest"]
    assert info["status"] == "complete"
    assert not [p for p in store.rglob("*") if ".partial" in p.name], "a stopped replica's temporary file is left"
    a, b = store_files(store), store_files(clean)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, f"files differ after interrupt and resume: {differing[:5]}"
