"""Finding a checkpoint, reading its config, and loading only the tensors a stage needs.

Weights come from safetensors files (single file or sharded with an index) through
``safe_open``, tensor by tensor, so a stage that holds a quarter of the layers reads about a
quarter of the bytes. Pickle checkpoints (``*.bin``) are refused unless ``allow_pickle`` is set;
even then they load with ``weights_only=True``. ``trust_remote_code`` stays off unless asked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from .architectures import Architecture, architecture_for
from .errors import CheckpointNotFoundError, ModelError
from .spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


@dataclass
class Checkpoint:
    """A resolved checkpoint directory: its config, architecture and weight files."""

    directory: Path
    spec: ModelSpec

    @cached_property
    def config(self):
        return AutoConfig.from_pretrained(self.directory, trust_remote_code=self.spec.trust_remote_code)

    @cached_property
    def arch(self) -> Architecture:
        return architecture_for(self.config.model_type)

    @cached_property
    def weight_files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.directory / n for n in names]
        single = self.directory / "model.safetensors"
        if single.is_file():
            return [single]
        return []

    @cached_property
    def pickle_files(self) -> list[Path]:
        return sorted(self.directory.glob("pytorch_model*.bin"))

    @property
    def uses_pickle(self) -> bool:
        return not self.weight_files

    @cached_property
    def key_to_file(self) -> dict[str, Path]:
        """Tensor name -> file holding it, read from the safetensors headers only."""
        mapping: dict[str, Path] = {}
        for file in self.weight_files:
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        mapping[key] = file
            except Exception as exc:  # SafetensorError: a truncated or damaged file (headers, sizes)
                raise ModelError(f"{file} is not a readable safetensors file ({' '.join(str(exc).split())}); "
                                 "it may be truncated: download or copy it again") from None
        return mapping

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_ctx(self) -> int:
        return self.config.max_position_embeddings

    def identity(self) -> dict[str, Any]:
        """What identifies these weights in the fingerprint: file hashes (or sizes) and config."""
        files = self.weight_files or self.pickle_files
        hashes = {}
        for f in files:
            hashes[f.name] = _sha256(f) if self.spec.hash_weights else f"size:{f.stat().st_size}"
        return {
            "files": hashes,
            "config": _sha256_bytes((self.directory / "config.json").read_bytes()),
            "revision": self.spec.revision,
        }

    def resolve_key(self, key: str, available: set[str] | None = None) -> str | None:
        """The name ``key`` has in the files: as is, or without the base-model prefix."""
        available = self.available_keys() if available is None else available
        bare = key.split(".", 1)[1]  # checkpoints saved from the base model have no prefix
        return key if key in available else bare if bare in available else None

    def tokenizer_files(self) -> list[Path]:
        return [self.directory / n for n in TOKENIZER_FILES if (self.directory / n).is_file()]

    def load_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (file names) and nothing else."""
        names = list(names)
        if self.uses_pickle:
            state = {}
            for file in self.pickle_files:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                state.update({k: v for k, v in part.items() if k in names})
            return state
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.key_to_file[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out

    def available_keys(self) -> set[str]:
        if self.uses_pickle:
            keys: set[str] = set()
            for file in self.pickle_files:
                keys.update(torch.load(file, map_location="meta", weights_only=True, mmap=True).keys())
            return keys
        return set(self.key_to_file)


def resolve_checkpoint(spec: ModelSpec, base_dir: Path) -> Checkpoint:
    """Find the checkpoint and check it is one we can and may load, before anything is created."""
    local = Path(spec.path).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.is_dir():
        directory = local
    elif _looks_like_hub_name(spec.path):
        directory = _download(spec)
    else:
        raise CheckpointNotFoundError(
            f"no checkpoint at {local}: the directory does not exist. Give model.path as a local "
            "directory holding config.json and *.safetensors (or a hub name such as "
            "'EleutherAI/pythia-160m' on a machine with network)"
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    architecture_for(model_type or "<missing>")
    ckpt = Checkpoint(directory, spec)
    if ckpt.uses_pickle:
        if not ckpt.pickle_files:
            raise CheckpointNotFoundError(
                f"{directory} holds no weights: expected model.safetensors, "
                "model.safetensors.index.json or pytorch_model*.bin"
            )
        if not spec.allow_pickle:
            raise ModelError(
                f"{directory} has only pickle weights ({', '.join(p.name for p in ckpt.pickle_files)}); "
                "unpickling can run arbitrary code, so they are refused by default. Convert the "
                "checkpoint to safetensors, or set 'model.allow_pickle: true' if you trust its source"
            )
    return ckpt


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download(spec: ModelSpec) -> Path:
    """Fetch config, tokenizer and safetensors weights of a hub model (needs network)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.safetensors"] + (["*.bin"] if spec.allow_pickle else [])
        return Path(snapshot_download(spec.path, revision=spec.revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all need the same advice
        raise CheckpointNotFoundError(
            f"no local directory {spec.path!r}, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download the checkpoint on a machine with network and point model.path at the directory"
        ) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
