"""``make demo``: every part of the mission end to end on this machine, no network.

1. builds a corpus from the Python standard library's docstrings (every machine has them);
2. trains a byte-level BPE tokenizer on it and saves a random-init GPT-NeoX checkpoint
   (safetensors) — then forgets both, and loads them back the way a user's checkpoint loads;
3. harvests ``jobs/demo.yaml`` into a Zarr store and prints what landed, opens it with plain
   xarray, finds outlier dimensions and queries one;
4. harvests the same job again with two replicas of the pipeline into a bucket on a real S3 server
   (moto, on 127.0.0.1), checks every array equals the local store's, and analyses from the bucket;
5. trains the model organisms and shows their translation heads and Fourier features.
"""

from __future__ import annotations

import time
from pathlib import Path

import xarray as xr
import yaml

from analysis.outliers import analyze_outliers
from analysis.query import format_query, query_dim
from organisms.demo import show

from ..runner import run
from ..spec import parse_spec
from ..summary import format_summary, summarize
from ..toy import build_checkpoint, stdlib_docstrings

REPO = Path(__file__).resolve().parents[2]
DEMO_SPEC = REPO / "jobs" / "demo.yaml"
DEMO_MODEL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
                  max_position_embeddings=512, rotary_pct=0.25)


def build_assets(workdir: Path) -> tuple[Path, Path]:
    """Corpus files and checkpoint under ``workdir`` (reused when already there)."""
    corpus = workdir / "corpus"
    model = workdir / "model"
    if not (corpus / "done").is_file():
        docs = stdlib_docstrings()
        corpus.mkdir(parents=True, exist_ok=True)
        per_file = 100
        for i in range(0, len(docs), per_file):
            (corpus / f"stdlib_{i // per_file:03d}.txt").write_text("\n\n".join(docs[i:i + per_file]), encoding="utf-8")
        (corpus / "done").write_text(f"{len(docs)} docstrings\n")
    if not (model / "model.safetensors").is_file():
        texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
        build_checkpoint(model, "gpt_neox", texts=texts, vocab_size=4096, seed=0, **DEMO_MODEL)
    return corpus, model


def demo_spec(workdir: Path):
    """jobs/demo.yaml with its build/demo paths pointed at ``workdir``."""
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    raw["model"]["path"] = str(workdir / "model")
    raw["prompts"]["paths"] = [str(workdir / "corpus" / "*.txt")]
    raw["store"]["root"] = str(workdir / "stores")
    return parse_spec(raw, base_dir=Path.cwd())


#: (title, wall start, CPU start, wall seconds, CPU seconds) of each step, in order
_STEPS: list[list] = []


def _cpu_seconds() -> float:
    """CPU time of this process and of its child processes that have ended (not the Ray actors')."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _end_step() -> None:
    if _STEPS and _STEPS[-1][3] is None:
        step = _STEPS[-1]
        step[3], step[4] = time.perf_counter() - step[1], _cpu_seconds() - step[2]
        print(f"--- step {step[0].split('.')[0]}: {step[3]:.1f} s (CPU {step[4]:.1f} s)")


def section(title: str) -> None:
    """Start a step: the previous one ends, and its wall and CPU time are printed."""
    _end_step()
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))
    _STEPS.append([title, time.perf_counter(), _cpu_seconds(), None, None])


def timings() -> None:
    """End the last step and print every step's time (the demo's budget: about 3 minutes on 2 cores)."""
    _end_step()
    print("\ntime per step (wall; CPU of this process and its finished child processes)")
    for title, _, _, wall, cpu in _STEPS:
        print(f"  {wall:6.1f} s  CPU {cpu:6.1f} s  {title}")
    print(f"  {sum(s[3] for s in _STEPS):6.1f} s  CPU {sum(s[4] for s in _STEPS):6.1f} s  in all")


#: the object-storage step's replicas (each a full pipeline of the demo's stages)
REPLICAS = 2
#: moto's S3 server accepts any key; these are never real credentials, and the demo sets them only for itself
DEMO_S3_KEYS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}


def replicas_into_a_bucket(spec, local_path, local_outliers: list[int]) -> None:
    """Harvest ``spec`` again with REPLICAS data-parallel pipelines into s3:// on a loopback moto server,
    then show the bucket's store is the local one, element for element, and analyse it in place."""
    import logging
    import os

    import boto3
    import numpy as np
    from moto.server import ThreadedMotoServer

    from ..store import open_group

    os.environ.update(DEMO_S3_KEYS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="activations")
        print(f"S3 server {endpoint} (moto), bucket s3://activations")
        raw = spec.to_dict()
        raw["capture"].pop("statistics")  # the default again (on: replicas merge them unit by unit)
        raw["run"]["replicas"] = REPLICAS
        raw["store"].update(root="s3://activations/stores", storage_options={"endpoint": endpoint, "region": "us-east-1"})
        remote = parse_spec(raw, base_dir=spec.base_dir)
        result = run(remote, overwrite=True)
        print(f"harvested {result.tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s) "
              f"into {result.path}")
        local, bucket = open_group(local_path), open_group(result.path)
        names = sorted(local.array_keys())
        same = [n for n in names if np.array_equal(local[n][...], bucket[n][...], equal_nan=True)]
        print(f"{len(same)} of {len(names)} arrays equal the local {spec.run.stages}-stage store element for element"
              + ("" if len(same) == len(names) else f"; differ: {', '.join(sorted(set(names) - set(same)))}"))
        print(same_statistics(local, bucket))
        report = analyze_outliers(result.path, index=False, plots=False)
        verdict = "the same as" if report.outlier_dims == local_outliers else "DIFFERENT from"
        print(f"analysed in the bucket: outlier dimensions {report.outlier_dims}, {verdict} the local store's")
        options = {"endpoint_url": endpoint}
        print(f"plain xarray: xr.open_zarr('{result.path}', consolidated=False, storage_options={options})")
        ds = xr.open_zarr(str(result.path), consolidated=False, storage_options=options)
        print(f"              {len(ds.data_vars)} variables, dims {dict(ds.sizes)}")
    finally:
        server.stop()


def same_statistics(local, bucket) -> str:
    """Whether two stores' harvest-time statistics are equal bit for bit (replicas fold them unit by unit,
    in unit order, so they must be)."""
    import numpy as np

    from ..statistics import load_statistics

    a, b = load_statistics(local), load_statistics(bucket)
    if a is None or b is None:
        return "harvest-time statistics: missing from " + ("the local store" if a is None else "the bucket's")
    same = a.hooks.keys() == b.hooks.keys() and all(
        np.array_equal(value, b.hooks[hook][key], equal_nan=True)
        for hook, stats in a.hooks.items() for key, value in stats.items() if isinstance(value, np.ndarray))
    tokens = max(a.tokens(hook) for hook in a.hooks)
    return (f"harvest-time statistics of {len(a.hooks)} hook points over {tokens:,} tokens: "
            + ("bit for bit the local store's" if same else "DIFFERENT from the local store's"))


def main(workdir: Path = Path("build/demo")) -> None:
    workdir = Path(workdir)
    section("1. a GPT-NeoX checkpoint and a corpus, built on this machine")
    t0 = time.perf_counter()
    corpus, model = build_assets(workdir)
    print(f"corpus     {corpus} ({len(list(corpus.glob('*.txt')))} files of stdlib docstrings)")
    print(f"checkpoint {model} ({', '.join(sorted(p.name for p in model.iterdir()))})")
    print(f"           ready in {time.perf_counter() - t0:.1f} s")

    spec = demo_spec(workdir)
    stages = "one stage, in process" if spec.run.stages == 1 else f"{spec.run.stages} pipeline stages as Ray actors"
    section(f"2. harvest jobs/demo.yaml ({stages})")
    result = run(spec, overwrite=True)
    print(f"harvested {result.tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)")

    section("3. what landed in the store")
    print(format_summary(summarize(result.path), max_arrays=10))

    section("4. open it without this project: plain xarray")
    print(f"python -c \"import xarray as xr; print(xr.open_zarr('{result.path}'))\"")
    ds = xr.open_zarr(str(result.path), consolidated=False)
    var = "blocks.5.hook_resid_post"
    print(f"{var}: dims {ds[var].dims}, shape {ds[var].shape}, mean |x| = {float(abs(ds[var]).mean()):.4f}")

    section("5. outliers and a query (harvest analyze outliers / harvest query dim)")
    report = analyze_outliers(result.path)
    print(report.format())
    if report.outlier_dims:
        top = max(report.report["outlier_dims"], key=lambda o: o["max_abs"])
        dim, why = top["dim"], "the top outlier dimension (largest max |x|)"
    else:
        dim = int(report.arrays["max_abs"][0].max(axis=0).argmax())
        why = ("no dimension meets Dettmers' criterion in this random-init model, so the dimension with the "
               "largest max |x| instead")
    print(f"\nquery of {why}: harvest query dim {result.path} {dim}")
    print(format_query(query_dim(result.path, dim, top=5, context=6)))

    section(f"6. {REPLICAS} replicas x {spec.run.stages} stages into object storage (a local S3 server)")
    replicas_into_a_bucket(spec, result.path, report.outlier_dims)

    section("7. model organisms: translation heads and the Fourier features of addition")
    show(workdir.parent / "organisms")  # trained once (about a CPU-minute each), cached under build/organisms
    timings()
