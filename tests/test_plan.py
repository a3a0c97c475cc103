"""`harvest plan`: partition, per-stage memory and store layout from a config alone; refusals that say by how much."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harvest.spec import load_spec, parse_spec
from harvest.errors import PlanDoesNotFitError
from sharding.plan import GIB, format_plan, plan_job

REPO = Path(__file__).resolve().parent.parent
GPTJ_JOB = REPO / "jobs" / "gptj-6b-resid.yaml"
NEOX_JOB = REPO / "jobs" / "neox-20b-resid.yaml"


def real_job(path: Path, tmp_path: Path, **changes):
    """A shipped job spec, with some keys changed (``run={'stages': 1}``), planned from the repo root."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["store"]["root"] = str(tmp_path / "stores")
    return parse_spec(raw, base_dir=REPO)


def test_gptj_6b_plan_from_config_only(tmp_path):
    spec = load_spec(GPTJ_JOB, base_dir=REPO, store_root=str(tmp_path))
    plan = plan_job(spec)
    assert not list((REPO / "jobs/configs/gpt-j-6b").glob("*.safetensors")), "planning needs no weights"
    assert abs(plan.shape.total_params - 6.05e9) < 0.01e9  # GPT-J-6B, lm_head included
    assert [(s.plan.start, s.plan.stop) for s in plan.stages] == [(0, 14), (14, 28)]
    assert plan.stages[0].plan.embed and plan.stages[1].plan.final_norm is False
    for s in plan.stages:  # fp16: ~0.4 GB per block
        assert 5.2 * GIB < s.weights < 5.8 * GIB and s.peak < 16 * GIB
    assert plan.fits and plan.work.estimated and "max_sequences" in plan.work.estimated
    assert plan.work.n_rows == 100000 * 1024
    assert plan.bytes_per_token == pytest.approx(29 * 4096 * 2 + 16)
    text = format_plan(plan)
    assert "ESTIMATE" in text and "embed + blocks 0..13" in text and "blocks 14..27" in text and "fits: yes" in text
    assert re.search(r"29 x token x 4096: chunks of 2048 rows \(16\.0 MiB\), shards of 16384 rows", text)
    assert "write bandwidth needed: 2.38 GB/s per 10k captured tokens/s" in text  # 237.6 KB per token


def test_neox_20b_plan_and_files(tmp_path):
    plan = plan_job(load_spec(NEOX_JOB, base_dir=REPO, store_root=str(tmp_path)))
    assert abs(plan.shape.total_params - 20.55e9) < 0.05e9
    assert [s.plan.stop - s.plan.start for s in plan.stages] == [11, 11, 11, 11]
    assert plan.shape.file_dtype == "float16"  # from config.json: there are no weight files
    by_name = {a.point.name: a for a in plan.arrays}
    post = by_name["blocks.10.mlp.hook_post"]
    assert post.shape == (20000 * 512, 24576) and post.itemsize == 2
    assert plan.n_files == sum(a.n_shards + 1 for a in plan.arrays) and post.n_shards == -(-post.shape[0] // post.shard_rows)
    assert sum(len(s.plan.hooks) for s in plan.stages) == len(plan.hooks) == 55


def test_plan_refuses_what_does_not_fit_and_says_by_how_much(tmp_path):
    plan = plan_job(real_job(NEOX_JOB, tmp_path, run={"stages": 1, "memory_gib": 24}))
    (stage,) = plan.stages
    short = stage.peak - 24 * GIB
    assert not plan.fits and short > 15 * GIB
    with pytest.raises(PlanDoesNotFitError) as info:
        plan.check()
    message = str(info.value)
    assert f"stage 0 (embed + blocks 0..43) needs {stage.peak / GIB:.2f} GiB but has 24.00 GiB (run.memory_gib): " \
           f"short by {short / GIB:.2f} GiB" in message
    assert "model.quantization" in message and "run.stages" in message


def test_uneven_device_list_moves_blocks_to_the_bigger_devices(tmp_path):
    plan = plan_job(real_job(NEOX_JOB, tmp_path, run={"stages": 4, "memory_gib": [24, 24, 9, 24]}))
    sizes = [s.plan.stop - s.plan.start for s in plan.stages]
    assert plan.fits and sizes[2] < min(sizes[0], sizes[1], sizes[3]) and sum(sizes) == 44
    assert plan.stages[2].peak <= 9 * GIB
    plan = plan_job(real_job(NEOX_JOB, tmp_path, run={"stages": 4, "memory_gib": [24, 24, 2, 24]}))
    assert not plan.fits and plan.stages[2].plan.stop - plan.stages[2].plan.start == 1
    assert any(p.startswith("stage 2 (blocks") and "but has 2.00 GiB" in p for p in plan.problems)


def test_quantization_makes_neox_fit_fewer_gpus(tmp_path):
    fp16 = plan_job(real_job(NEOX_JOB, tmp_path, run={"stages": 2, "memory_gib": 16}))
    int8 = plan_job(real_job(NEOX_JOB, tmp_path, model={"quantization": "int8"}, run={"stages": 2, "memory_gib": 16}))
    assert not fp16.fits and int8.fits
    assert int8.stages[0].weights < 0.6 * fp16.stages[0].weights


def test_cpu_stages_share_the_machine_memory(tmp_path):
    plan = plan_job(real_job(NEOX_JOB, tmp_path, model={"device": "cpu", "dtype": "float32"}, run={"memory_gib": None}))
    assert plan.shared_budget is not None and not plan.fits
    assert re.search(r"the 4 stages and the driver need [\d.]+ GiB together but this machine's available memory "
                     r"is [\d.]+ GiB: short by [\d.]+ GiB", plan.problems[0])


def test_gpu_memory_unknown_here_is_not_checked(tmp_path):
    plan = plan_job(real_job(GPTJ_JOB, tmp_path, run={"memory_gib": None}))
    assert plan.fits and plan.budget_source.startswith("not checked")


def test_exact_rows_when_the_tokenizer_is_there(neox_ckpt, make_spec):
    from harvest.runner import prepare

    spec = make_spec(neox_ckpt, hooks=["resid_post", "pattern"], run={"stages": 2})
    plan = plan_job(spec)
    job = prepare(spec)
    assert plan.work.estimated is None and plan.work.n_rows == job.layout.n_rows
    assert plan.arrays == job.arrays
    assert [s.plan for s in plan.stages] == job.stages


@pytest.mark.parametrize("config", ["gpt-j-6b", "gpt-neox-20b"])
def test_plan_accepts_every_prompt_source_against_the_real_configs(config, tmp_path):
    from harvest.prompts import SOURCES

    for source in SOURCES:
        prompts = {"source": source, **({"paths": ["README.md"]} if source == "text" else {})}
        spec = parse_spec({"name": f"every-{source}", "model": {"path": f"jobs/configs/{config}", "dtype": "float16"},
                           "prompts": prompts, "capture": {"hooks": ["resid_post"], "positions": "all" if source == "text" else "source"},
                           "run": {"stages": 2, "memory_gib": 80},
                           "store": {"root": str(tmp_path), "path": f"{source}.zarr"}}, base_dir=REPO)
        plan = plan_job(spec)
        assert plan.work.n_sequences > 0 and plan.work.estimated, source
        assert plan.fits, (source, plan.problems)


def test_plan_lays_out_the_store_that_run_writes(neox_ckpt, make_spec):
    """Shapes, dtypes, chunks, shards and bytes of every activation array: planned = written."""
    import numpy as np
    import zarr

    from harvest.runner import run

    spec = make_spec(neox_ckpt, hooks=["resid_post", "pattern", "blocks.1.mlp.hook_post"], capture={"top_k": 2},
                     store={"chunk_mib": 0.01, "chunks_per_shard": 2})
    plan = plan_job(spec)
    group = zarr.open_group(str(run(spec, progress=False).path), mode="r")
    written = {}
    for a in plan.arrays:
        arr = group[a.point.name]
        written[a.point.name] = (arr.shape, str(arr.dtype), arr.chunks[0], arr.shards[0],
                                 int(np.prod(arr.shape)) * arr.dtype.itemsize)
    assert written == {a.point.name: (a.shape, a.dtype, a.chunk_rows, a.shard_rows, a.nbytes) for a in plan.arrays}
    assert set(written) == set(group.array_keys()) - {"tokens", "seq", "pos", "input_ids", "seq_length"}


def test_top_k_puts_the_unembedding_on_the_last_stage(neox_ckpt, make_spec):
    plan = plan_job(make_spec(neox_ckpt, hooks=["blocks.{0..1}.hook_resid_post"], capture={"top_k": 3},
                              run={"stages": 2}))
    last = plan.stages[-1].plan
    assert last.unembed and last.final_norm and last.stop == 4
    assert {p.name for p in last.hooks} >= {"unembed.topk_ids", "unembed.topk_logits"}


def test_plan_cli_prints_and_exits_2_with_the_shortfall(tmp_path, monkeypatch, capsys):
    from harvest import cli

    monkeypatch.setattr(sys, "argv", ["harvest", "plan", str(GPTJ_JOB), "--store-root", str(tmp_path)])
    monkeypatch.chdir(REPO)
    cli.main()
    out = capsys.readouterr().out
    assert "2 stage(s); memory budget: run.memory_gib" in out and "fits: yes" in out
    small = tmp_path / "small.yaml"
    small.write_text(GPTJ_JOB.read_text().replace("memory_gib: 16", "memory_gib: 4"))
    monkeypatch.setattr(sys, "argv", ["harvest", "plan", str(small), "--store-root", str(tmp_path)])
    with pytest.raises(SystemExit) as code:
        cli.main()
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert re.match(r"error: stage 0 \(embed \+ blocks 0\.\.\d+\) needs [\d.]+ GiB but has 4\.00 GiB", err) and "short by" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_memory_estimate_is_within_15_percent_of_the_measured_peak(make_checkpoint, make_spec, tmp_path):
    """A GPT-J of ~300 MB, one stage in a fresh process: estimated peak vs the process's VmHWM.

    Not ``ru_maxrss``: Linux keeps in it the peak of the image ``exec`` replaced, so a subprocess of a
    pytest process that had grown past 1 GiB (late in the slow suite) reported pytest's peak, not its own.
    """
    ckpt = make_checkpoint("gptj", n_embd=1024, n_layer=6, n_head=8, n_positions=512)
    raw = make_spec(ckpt, raw=True, hooks=["hook_embed", "resid_post", "blocks.{1,4}.mlp.hook_post", "z"],
                    prompts={"seq_len": 64, "mode": "packed", "max_sequences": 48},
                    # a queue of one batch: how far the writer lags behind depends on the machine's load
                    run={"batch_size": 8, "threads": 2, "write_queue": 1},
                    store={"chunk_mib": 1, "chunks_per_shard": 4})
    estimate = plan_job(parse_spec(raw, base_dir=tmp_path)).stages[0]
    script = ("import json, sys\nfrom harvest.spec import parse_spec\nfrom harvest.runner import run\n"
              "run(parse_spec(json.loads(sys.argv[1]), base_dir=sys.argv[2]), progress=False)\n"
              "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) * 1024)\n")
    # a fresh interpreter with a clean environment: nothing an earlier test put in os.environ (Ray's
    # variables, thread counts) reaches the process measured
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"  # as `harvest run` sets it
    out = subprocess.run([sys.executable, "-c", script, json.dumps(raw), str(tmp_path)], capture_output=True,
                         text=True, check=True, timeout=300, env=env, cwd=tmp_path)
    measured = int(out.stdout.strip().splitlines()[-1])
    print(f"estimated {estimate.peak / 2**20:.0f} MiB (weights {estimate.weights / 2**20:.0f}, activations "
          f"{estimate.activations / 2**20:.0f}, capture {estimate.capture / 2**20:.0f}, process "
          f"{estimate.process / 2**20:.0f}); measured {measured / 2**20:.0f} MiB")
    assert abs(estimate.peak - measured) < 0.15 * measured


# --- expected speed and write bandwidth (sharding/speed.py) ---------------------------------------------

def test_plan_estimates_tokens_per_second_and_the_write_bandwidth_it_needs(neox_ckpt, make_spec, monkeypatch):
    import sharding.speed

    probed = []
    monkeypatch.setattr(sharding.speed, "probe_write", lambda where, mib=128: probed.append(where) or 50e9)
    spec = make_spec(neox_ckpt, run={"replicas": 2, "threads": 1})
    plan = plan_job(spec, probe=True)
    speed = plan.speed
    assert speed.replicas == 2 and speed.per_replica > 0 and speed.total == 2 * speed.per_replica
    assert speed.bytes_per_token == pytest.approx(plan.store_bytes / plan.work.n_tokens)
    assert speed.write_total == pytest.approx(speed.total * speed.bytes_per_token)
    assert speed.write_per_replica == pytest.approx(speed.per_replica * speed.bytes_per_token)
    # the rate is the probe's FLOP/s x the efficiency over the slowest stage's FLOPs per token
    flops = speed.per_replica * max(s.flops_per_token for s in plan.stages) / sharding.speed.EFFICIENCY["cpu"]
    assert 1e8 < flops < 1e14
    text = format_plan(plan)
    assert re.search(r"expected tokens/s: [\d,]+ per replica, [\d,]+ in all \(2 replica\(s\)\); source: matmul probe "
                     r"on this machine's cpu, 1 thread\(s\)", text)
    assert "write bandwidth that needs:" in text and "store target writes 50.00 GB/s (measured: 128 MiB" in text
    assert "WARNING" not in text and probed and str(probed[0]).startswith(str(spec.store_path().parent.parent))


def test_plan_warns_when_the_store_target_is_slower_than_needed(neox_ckpt, make_spec, monkeypatch):
    import sharding.speed

    monkeypatch.setattr(sharding.speed, "probe_write", lambda where, mib=128: 1e3)  # 1 KB/s: a very slow disk
    plan = plan_job(make_spec(neox_ckpt), probe=False, tokens_per_second=1000)
    assert plan.speed.target is None, "--no-probe writes nothing"
    plan = plan_job(make_spec(neox_ckpt), probe=True, tokens_per_second=1000)
    assert plan.speed.per_replica == 1000 and "--tokens-per-second (as given)" in plan.speed.rate_source
    (warning,) = plan.speed.warnings
    assert warning.startswith("the store's target writes 0.00 GB/s but 1 replica(s) at the expected rate need")
    assert "WARNING: the store's target writes" in format_plan(plan)
    assert plan.fits, "a slow disk slows the job; it does not make the plan fail"


def test_the_real_write_probe_writes_and_removes_its_file(tmp_path):
    from sharding.speed import probe_write

    assert probe_write(tmp_path, mib=8) > 0 and list(tmp_path.iterdir()) == []


def test_plan_cli_no_probe_measures_nothing(neox_ckpt, make_spec, tmp_path, monkeypatch, capsys):
    import yaml

    import sharding.speed
    from harvest import cli

    def refuse(*args, **kwargs):
        raise AssertionError("--no-probe must not probe")

    monkeypatch.setattr(sharding.speed, "probe_write", refuse)
    monkeypatch.setattr(sharding.speed, "probe_flops", refuse)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(neox_ckpt, raw=True)))
    monkeypatch.setattr(sys, "argv", ["harvest", "plan", str(spec_file), "--no-probe"])
    cli.main()
    out = capsys.readouterr().out
    assert "expected tokens/s: not estimated (--no-probe; pass --tokens-per-second" in out
    assert "store target: not probed (--no-probe)" in out
    monkeypatch.setattr(sys, "argv", ["harvest", "plan", str(spec_file), "--no-probe", "--tokens-per-second", "500"])
    cli.main()
    out = capsys.readouterr().out
    assert "expected tokens/s: 500 per replica, 500 in all (1 replica(s)); source: --tokens-per-second" in out


def test_plan_does_not_probe_an_object_store(neox_ckpt, make_spec, monkeypatch):
    import sharding.speed

    monkeypatch.setattr(sharding.speed, "probe_write", lambda *a, **k: pytest.fail("an object store is not probed"))
    plan = plan_job(make_spec(neox_ckpt, store={"root": "s3://bucket/stores"}), probe=True, tokens_per_second=100)
    assert plan.speed.target is None and "an object store: not probed" in format_plan(plan)


# --- placement on this machine ---------------------------------------------------------------------------

def test_plan_refuses_what_this_machine_cannot_place(neox_ckpt, make_spec, monkeypatch):
    import sharding.plan

    monkeypatch.setattr(sharding.plan, "local_gpus", lambda device: 2 if device == "cuda" else 0)
    cuda = {"device": "cuda"}
    plan = plan_job(make_spec(neox_ckpt, model=cuda, run={"replicas": 2, "stages": 2, "memory_gib": 8}))
    assert not plan.fits
    assert ("2 replica(s) x 2 stage(s) need 4 GPU(s) (1 per stage actor) but there are 2 on this machine (a local "
            "Ray); lower run.replicas or run.stages, or use a cluster (run.address)") in plan.problems
    assert plan_job(make_spec(neox_ckpt, model=cuda, run={"replicas": 1, "stages": 2, "memory_gib": 8})).fits
    auto = plan_job(make_spec(neox_ckpt, model=cuda, run={"replicas": "auto", "stages": 2, "memory_gib": 8}))
    assert auto.fits and auto.replicas == 1, "auto: as many whole pipelines as this machine's GPUs hold"
    monkeypatch.setattr(sharding.plan, "local_gpus", lambda device: 8 if device == "cuda" else 0)
    auto = plan_job(make_spec(neox_ckpt, model=cuda, run={"replicas": "auto", "stages": 2, "memory_gib": 8}))
    assert auto.replicas == 4 and "4 replica(s) x 2 stage(s) = 8 Ray stage actor(s)" in format_plan(auto)
    # on a cluster the plan does not check this machine: submit checks the cluster
    remote = plan_job(make_spec(neox_ckpt, model=cuda, run={"replicas": 4, "stages": 2, "memory_gib": 8,
                                                             "address": "ray://h:10001"}))
    assert remote.fits


def test_replicas_share_this_machines_memory(neox_ckpt, make_spec, monkeypatch):
    import sharding.plan

    one = plan_job(make_spec(neox_ckpt, run={"replicas": 1, "threads": 1}))
    available = int(one.total_memory * 1.5)
    monkeypatch.setattr(sharding.plan.psutil, "virtual_memory", lambda: type("M", (), {"available": available})())
    assert plan_job(make_spec(neox_ckpt, run={"replicas": 1, "threads": 1})).fits
    three = plan_job(make_spec(neox_ckpt, run={"replicas": 3, "threads": 1}))
    assert three.total_memory > 3 * sum(s.host for s in three.stages)
    assert not three.fits and three.problems[0].startswith("the 3 replicas x 1 stages and the driver need")
    assert "fewer run.replicas" in three.problems[0]
