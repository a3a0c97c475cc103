"""Pipeline stages: the partition, per-stage loading, and 1/2/3-stage runs giving byte-identical stores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from harvest.errors import ModelError, SpecError
from harvest.runner import prepare, run
from sharding.plan import plan_job
from sharding.verify import store_differences

HOOKS = ["hook_embed", "resid_post", "ln1", "z", "result", "pattern", "post", "attn_out", "ln_final"]


def stage_spec(make_spec, ckpt, stages: int, path: str, hooks=HOOKS, **run):
    return make_spec(ckpt, hooks=hooks, run={"stages": stages, "threads": 1, **run},
                     store={"path": path, "chunks_per_shard": 4},
                     prompts={"max_sequences": 14})


# --- the partition (no Ray) -------------------------------------------------------------------------

@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_partition_covers_needed_blocks_once(neox_ckpt, make_spec, stages):
    spec = stage_spec(make_spec, neox_ckpt, stages, "p.zarr")
    plan = plan_job(spec)
    runs = [(s.plan.start, s.plan.stop) for s in plan.stages]
    assert runs[0][0] == 0 and runs[-1][1] == 4
    assert all(a < b for a, b in runs) and all(runs[i][1] == runs[i + 1][0] for i in range(stages - 1))
    assert plan.stages[0].plan.embed and not any(s.plan.embed for s in plan.stages[1:])
    assert plan.stages[-1].plan.final_norm and not any(s.plan.final_norm for s in plan.stages[:-1])
    owned = [p.name for s in plan.stages for p in s.plan.hooks]
    assert sorted(owned) == sorted(p.name for p in plan.hooks), "every hook point belongs to exactly one stage"
    for s in plan.stages:
        assert all(p.layer is None or p.layer < 0 or s.plan.start <= p.layer < s.plan.stop
                   for p in s.plan.hooks if p.template not in ("hook_embed", "ln_final.hook_normalized"))


def test_partition_balances_blocks(make_checkpoint, make_spec):
    ckpt = make_checkpoint("gpt_neox", num_hidden_layers=8)
    plan = plan_job(stage_spec(make_spec, ckpt, 4, "p.zarr", hooks=["resid_post"]))
    assert [s.plan.stop - s.plan.start for s in plan.stages] == [2, 2, 2, 2]


def test_blocks_after_the_last_hook_are_not_partitioned(make_checkpoint, make_spec):
    ckpt = make_checkpoint("gpt_neox", num_hidden_layers=8)
    plan = plan_job(stage_spec(make_spec, ckpt, 2, "p.zarr", hooks=["blocks.{0..3}.hook_resid_post"]))
    assert plan.stages[-1].plan.stop == 4 and not plan.stages[-1].plan.final_norm


def test_more_stages_than_blocks_is_refused(neox_ckpt, make_spec):
    with pytest.raises(SpecError, match=r"run.stages is 5, but only 4 block\(s\) run.*run.stages <= 4"):
        prepare(stage_spec(make_spec, neox_ckpt, 5, "p.zarr"))
    with pytest.raises(SpecError, match=r"run.stages is 3, but only 2 block\(s\) run \(the last hooked block is 1"):
        prepare(stage_spec(make_spec, neox_ckpt, 3, "p.zarr", hooks=["blocks.{0..1}.hook_resid_post"]))


def test_checkpoint_missing_a_stage_tensor_is_refused_before_the_store(neox_ckpt, make_spec, tmp_path):
    from harvest.toy import edited_checkpoint

    broken = edited_checkpoint(neox_ckpt, tmp_path / "broken",
                               lambda tensors: tensors.pop("gpt_neox.layers.3.mlp.dense_4h_to_h.weight"))
    spec = stage_spec(make_spec, broken, 2, "p.zarr")
    with pytest.raises(ModelError, match=r"lacks 1 tensor\(s\) that stage 1 \(blocks 2\.\.3 \+ ln_final\) needs, "
                                         r"e\.g\. gpt_neox\.layers\.3\.mlp\.dense_4h_to_h\.weight"):
        prepare(spec)
    assert not spec.store_path().exists()


def test_sharded_checkpoint_stages_load_only_their_tensors(make_checkpoint, make_spec, monkeypatch):
    """Stages of a multi-file checkpoint read only their own tensors and compute what one model does."""
    from harvest.checkpoint import Checkpoint, resolve_checkpoint
    from harvest.stage import Stage

    single = make_checkpoint("gpt_neox")
    sharded = make_checkpoint("gpt_neox", max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    spec = stage_spec(make_spec, sharded, 2, "p.zarr", hooks=["resid_post"])
    job = prepare(spec)
    assert len({f.name for f in job.ckpt.weight_files}) > 2
    read: list[str] = []
    original = Checkpoint.load_tensors

    def spy(self, names):
        names = list(names)
        read.extend(names)
        return original(self, names)

    monkeypatch.setattr(Checkpoint, "load_tensors", spy)
    batch = job.layout.batch(0)
    hidden = None
    for plan in job.stages:
        read.clear()
        stage = Stage(job.ckpt, plan, compute_dtype="float32", store_dtype=torch.float32, device=torch.device("cpu"),
                      heads=None, neurons=None)
        layers = {int(k.split(".")[2]) for k in read if ".layers." in k}
        assert layers == set(range(plan.start, plan.stop))
        assert any("embed_in" in k for k in read) == plan.embed
        hidden, _ = stage.run(batch, hidden)
    whole = dataclasses.replace(job.stages[0], index=0, n_stages=1, stop=4, final_norm=False)
    ref_ckpt = resolve_checkpoint(dataclasses.replace(spec.model, path=str(single)), spec.base_dir)
    reference = Stage(ref_ckpt, whole, compute_dtype="float32", store_dtype=torch.float32,
                      device=torch.device("cpu"), heads=None, neurons=None)
    expected, _ = reference.run(batch, None)
    assert torch.equal(hidden, expected)


def test_pipeline_stage_resumes_at_its_durable_frontier(neox_ckpt, make_spec):
    """The actor class, in-process: a restarted stage starts its writer where its manifest stops,
    and a batch its writer already has is only forwarded (nothing written twice)."""
    from harvest.runner import claim_store
    from sharding.pipeline import PipelineStage

    # statistics off: this test marks the manifest by hand, without the snapshot a stage writes first
    job = prepare(make_spec(neox_ckpt, hooks=["resid_post"], run={"stages": 2, "threads": 1},
                            capture={"statistics": False}, store={"path": "p.zarr", "chunks_per_shard": 4},
                            prompts={"max_sequences": 14}))
    claim_store(job, resume=False, overwrite=False)
    import zarr

    group = zarr.open_group(str(job.path), mode="r+")
    group["_progress/stage_1"][:3] = 1
    stage = job.stages[1]
    worker = PipelineStage(job.ckpt, stage, job.stage_options(), job.stage_info(stage), 0)
    assert worker.position()["next"] == 3 and worker.durable_batches() == 3
    first = PipelineStage(job.ckpt, job.stages[0], job.stage_options(), job.stage_info(job.stages[0]), 0)
    status, hidden = first.run(job.layout.batch(0), None)
    assert status == {"batch": 0, "durable": 0} and hidden[0].shape[0] == 3  # (array, dtype) on the wire
    status, out = worker.run(job.layout.batch(0), hidden)  # below its frontier: forward only
    assert out is None and worker.position()["next"] == 3
    first.abort()
    worker.abort()


def test_stage_failure_to_start_is_kept_for_the_driver(neox_ckpt, make_spec, tmp_path):
    from sharding.pipeline import PipelineStage

    job = prepare(stage_spec(make_spec, neox_ckpt, 2, "p.zarr", hooks=["resid_post"]))
    stage = job.stages[0]
    bad = dataclasses.replace(job.stage_info(stage), path=str(tmp_path / "nowhere.zarr"))
    worker = PipelineStage(job.ckpt, stage, job.stage_options(), bad, 0)
    with pytest.raises(Exception, match="nowhere.zarr"):
        worker.ready()


# --- Ray pipelines -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "gptj"])
def test_one_two_three_stages_write_identical_stores(arch, make_checkpoint, make_spec, ray_session):
    ckpt = make_checkpoint(arch)
    hooks = HOOKS + (["ln2"] if arch == "gpt_neox" else [])
    results = {n: run(stage_spec(make_spec, ckpt, n, f"s{n}.zarr", hooks=hooks), progress=False) for n in (1, 2, 3)}
    one = results[1].path
    for n in (2, 3):
        assert store_differences(one, results[n].path) == []
        info = json.loads((results[n].path / "zarr.json").read_text())["attributes"]["harvest"]
        assert len(info["stages"]) == n and info["status"] == "complete"
    g = __import__("zarr").open_group(str(one), mode="r")
    assert np.abs(g["blocks.3.hook_resid_post"][...]).sum() > 0
    assert results[3].tokens == results[1].tokens


@pytest.mark.slow
def test_each_stage_holds_about_its_share_of_the_weights(make_checkpoint, make_spec, ray_session):
    from harvest.runner import claim_store
    from sharding.pipeline import run_pipeline

    ckpt = make_checkpoint("gpt_neox", hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,
                           intermediate_size=4096)
    weights = (ckpt / "model.safetensors").stat().st_size
    spec = stage_spec(make_spec, ckpt, 3, "rss.zarr", hooks=["resid_post"])
    job = prepare(spec)
    start = claim_store(job, resume=False, overwrite=False)
    seen = []
    run_pipeline(job, start, False, on_batch=lambda k, p: seen.append(p.memory()) if k == job.layout.n_batches - 1 else None)
    estimates = plan_job(spec).stages
    for i, (mem, est) in enumerate(zip(seen[0], estimates)):
        grown = mem["peak"] - mem["before_load"]
        share = est.weights
        print(f"stage {i}: {mem['before_load'] / 2**20:.0f} MiB before loading, +{grown / 2**20:.0f} MiB for "
              f"{share / 2**20:.0f} MiB of weights (whole model {weights / 2**20:.0f} MiB); plan: peak "
              f"{est.peak / 2**20:.0f} MiB, measured {mem['peak'] / 2**20:.0f} MiB")
        assert 0.9 * share < grown < share + 200 * 2**20, "a stage holds its own weights, plus activations"
        assert grown < 0.7 * weights, "a stage must not hold the whole model"
        assert abs(est.peak - mem["peak"]) < 0.15 * mem["peak"], "the plan's estimate of a stage actor's peak"


def test_permanent_failures_keep_their_message():
    """What the driver raises for a stage's own exception (no Ray needed)."""
    from harvest.errors import NonFiniteActivationError, StageError
    from harvest.shape import StagePlan
    from sharding.pipeline import _permanent

    plan = StagePlan(index=1, n_stages=2, start=2, stop=4, embed=False, final_norm=True, hooks=())
    ours = NonFiniteActivationError("3 NaN/inf value(s) in blocks.3.hook_resid_post, batch 7. Nothing ...")
    assert _permanent(ours, 1, plan) is ours  # a harvest error reaches the user as it was raised
    oom = _permanent(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, plan)
    assert isinstance(oom, StageError)
    assert str(oom).startswith("stage 1 (blocks 2..3 + ln_final) ran out of memory: CUDA out of memory. Tried to "
                               "allocate 2.00 GiB. Lower run.batch_size")
    other = _permanent(RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x64 and 32x64)"), 1, plan)
    assert str(other) == ("stage 1 (blocks 2..3 + ln_final) failed: RuntimeError: mat1 and mat2 shapes cannot be "
                          "multiplied (3x64 and 32x64)")
    dump = _permanent(OSError("Generic S3 error: GET failed after 8 retries\n\nDebug source:\nGeneric {\n  store: S3"), 1, plan)
    assert str(dump) == "stage 1 (blocks 2..3 + ln_final) failed: OSError: Generic S3 error: GET failed after 8 retries"
