"""Shared fixtures: small real checkpoints (built once per session) and a corpus.

Every model here is built from its transformers config, saved with ``save_pretrained`` as
safetensors and loaded back through the same code a user's checkpoint takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from harvest.spec import parse_spec  # noqa: E402
from harvest.toy import build_checkpoint, build_tokenizer, stdlib_docstrings  # noqa: E402


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A few text files of varied length (document ends exercise padding)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [doc for doc in stdlib_docstrings(limit=200) if 100 < len(doc) < 400]
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(docs[i], encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(stdlib_docstrings(limit=300), d, vocab_size=512)
    return d


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_dir):
    """Build (and cache) a checkpoint: ``make_checkpoint("gptj", rotary_dim=4)``."""
    cache: dict[str, Path] = {}

    def make(arch: str = "gpt_neox", **overrides: Any) -> Path:
        key = f"{arch}-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(arch)
            cache[key] = build_checkpoint(out, arch, tokenizer_dir=tokenizer_dir, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def neox_ckpt(make_checkpoint) -> Path:
    return make_checkpoint("gpt_neox")


@pytest.fixture(scope="session")
def gptj_ckpt(make_checkpoint) -> Path:
    return make_checkpoint("gptj")


@pytest.fixture
def make_spec(tmp_path, corpus_dir):
    """A valid spec dict for a checkpoint, with overrides per section, parsed into a JobSpec."""

    def make(ckpt: Path, *, hooks=("blocks.*.hook_resid_post",), raw: bool = False, **sections: dict):
        spec: dict[str, Any] = {
            "name": "test",
            "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
            "prompts": {"source": "text", "paths": [str(corpus_dir / "*.txt")], "seq_len": 24,
                        "mode": "windowed", "max_sequences": 10},
            "capture": {"hooks": list(hooks)},
            "run": {"batch_size": 3},
            "store": {"root": str(tmp_path / "stores"), "path": "job.zarr", "chunk_mib": 0.01,
                      "chunks_per_shard": 2},
        }
        for section, values in sections.items():
            spec[section] = {**spec.get(section, {}), **values}
        return spec if raw else parse_spec(spec, base_dir=tmp_path)

    return make


@pytest.fixture(scope="module")
def ray_session(request):
    """One local Ray for a test module (the pipeline and replica drivers reuse a running session).

    ``RAY_CPUS`` in the module sets its CPUs (default 4); the dashboard stays off.
    """
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 4), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
