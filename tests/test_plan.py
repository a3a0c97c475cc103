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
