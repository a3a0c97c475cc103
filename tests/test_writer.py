"""The stage writer: parallel writing changes no byte, and captures reach the host intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harvest.errors import SpecError
from harvest.runner import run
from harvest.transfer import HostTransfer
from harvest.writer import MAX_AUTO_WRITE_THREADS, write_threads_for
from sharding.verify import store_differences

HOOKS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post", "blocks.*.attn.hook_pattern"]


def test_write_threads_write_the_same_bytes(neox_ckpt, make_spec):
    """Arrays written by a pool of threads are byte-identical to one thread's, shard by shard."""
    one = run(make_spec(neox_ckpt, hooks=HOOKS, store={"path": "one.zarr"}), progress=False)
    pool = run(make_spec(neox_ckpt, hooks=HOOKS, store={"path": "pool.zarr"}, run={"write_threads": 4}),
               progress=False)
    assert store_differences(one.path, pool.path) == []
    import zarr

    g = zarr.open_group(str(pool.path), mode="r")
    a = g["blocks.3.hook_resid_post"]
    assert a.shape[0] > a.shards[0]  # several flushes per array, interleaved across threads
    assert g["_progress/stage_0"][...].all()


def test_write_threads_default_to_one_on_cpu_and_several_on_a_gpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert write_threads_for(None, "cpu", 24) == 1  # CPU cores are the compute
    assert write_threads_for(None, "cuda", 24) == MAX_AUTO_WRITE_THREADS
    assert write_threads_for(None, "cuda", 3) == 3  # one thread per array at most
    assert write_threads_for(6, "cpu", 24) == 6  # as asked


@pytest.mark.parametrize("value", [0, 2.5, "four"])
def test_write_threads_must_be_a_positive_integer(neox_ckpt, make_spec, value):
    with pytest.raises(SpecError, match="run.write_threads must be an integer >= 1"):
        make_spec(neox_ckpt, run={"write_threads": value})


def test_host_transfer_on_cpu_hands_over_the_captures():
    captured = {"a": torch.ones(3, 4)}
    batch = HostTransfer(torch.device("cpu")).start(captured)
    assert batch.tensors["a"] is captured["a"] and batch.wait() is None  # the writer counts NaN/inf itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_transfer_copies_off_the_gpu_and_counts_nonfinite_on_it():
    device = torch.device("cuda")
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    x[3, 5], x[7, 1] = float("inf"), float("nan")
    ids = torch.arange(10, device=device, dtype=torch.int32)
    transfer = HostTransfer(device)
    batch = transfer.start({"x": x, "ids": ids})
    del x  # the side stream still reads it: the allocator must not reuse its memory
    y = torch.zeros(64, 128, device=device, dtype=torch.float16)  # noqa: F841
    counts = batch.wait()
    assert counts == {"x": 2}  # integer captures are not counted
    host = batch.tensors["x"]
    assert host.device.type == "cpu" and host.is_pinned()
    assert np.isinf(host.numpy()[3, 5]) and np.isnan(host.numpy()[7, 1])
    assert np.array_equal(batch.tensors["ids"].numpy(), np.arange(10))


def test_a_restarted_writer_removes_shard_writes_that_never_finished(neox_ckpt, make_spec):
    """A stage killed mid-write leaves zarr's ``<key>.<uuid>.partial``; its next writer deletes it."""
    from harvest.runner import prepare
    from harvest.writer import StageWriter

    spec = make_spec(neox_ckpt, store={"path": "killed.zarr"})
    result = run(spec, progress=False)
    reference = run(make_spec(neox_ckpt, store={"path": "clean.zarr"}), progress=False)
    stray = result.path / "blocks.1.hook_resid_post" / "c" / "0" / "0.54d5816595c4407081d907a3a42e4359.partial"
    stray.write_bytes(b"half a shard")
    job = prepare(spec)
    writer = StageWriter(job.stage_info(job.stages[0]), job.layout.n_batches)
    writer.close()
    assert not stray.exists()
    assert store_differences(reference.path, result.path) == []
