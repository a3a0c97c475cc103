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
    #: the commit hash of a hub snapshot (``None`` for a local directory)
    revision: str | None = None

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
            "revision": self.revision or self.spec.revision,
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
    directory, revision = checkpoint_directory(spec, base_dir)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    architecture_for(model_type or "<missing>")
    ckpt = Checkpoint(directory, spec, revision)
    if ckpt.uses_pickle:
        if not ckpt.pickle_files:
            where = (f"the cached snapshot of {spec.path!r} ({directory})" if revision else str(directory))
            raise CheckpointNotFoundError(
                f"{where} holds no weights: expected model.safetensors, "
                "model.safetensors.index.json or pytorch_model*.bin"
                + (f"; download them where there is network (`hf download {spec.path}`)" if revision else "")
            )
        if not spec.allow_pickle:
            raise ModelError(
                f"{directory} has only pickle weights ({', '.join(p.name for p in ckpt.pickle_files)}); "
                "unpickling can run arbitrary code, so they are refused by default. Convert the "
                "checkpoint to safetensors, or set 'model.allow_pickle: true' if you trust its source"
            )
    return ckpt


def checkpoint_directory(spec: ModelSpec, base_dir: Path, *, weights: bool = True) -> tuple[Path, str | None]:
    """The checkpoint's directory and, for a hub model, the commit hash of its snapshot.

    A local directory wins over a hub name of the same spelling. ``weights=False`` (planning)
    asks the hub for config and tokenizer files only.
    """
    local = Path(spec.path).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.is_dir():
        return local, None
    if looks_like_hub_name(spec.path):
        snapshot = hub_snapshot(spec, weights=weights)
        return snapshot, snapshot.name  # the hub cache names each snapshot by its commit hash
    raise CheckpointNotFoundError(
        f"no checkpoint at {local}: the directory does not exist. Give model.path as a local "
        "directory holding config.json and *.safetensors, or a hub name such as 'EleutherAI/pythia-160m'"
    )


def looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def hub_snapshot(spec: ModelSpec, *, weights: bool = True) -> Path:
    """The model's snapshot directory in the Hugging Face cache, downloaded first where there is network.

    Goes through ``huggingface_hub.snapshot_download``, so the cache is the one every Hugging Face
    tool shares (``HF_HOME`` / ``HF_HUB_CACHE``) in its own layout, and ``HF_HUB_OFFLINE=1`` reads
    it without touching the network. The snapshot's files are symlinks into the cache's blobs;
    they load through the same safetensors code as a local checkpoint.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name, revision = spec.path, spec.revision or "main"
    patterns = ["*.json", "*.txt", "*.model"]
    if weights:
        patterns += ["*.safetensors"] + (["*.bin"] if spec.allow_pickle else [])
    offline = bool(constants.HF_HUB_OFFLINE)
    fix = (f"download it where there is network (`hf download {name}"
           + (f" --revision {spec.revision}" if spec.revision else "")
           + "`) into this cache, or give model.path as a local checkpoint directory")
    try:
        return Path(snapshot_download(name, revision=spec.revision, allow_patterns=patterns,
                                      local_files_only=offline))
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"the Hugging Face Hub has {name!r} but no revision {revision!r}; check model.revision") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        why = "is gated: accept its terms on the Hub" if isinstance(exc, GatedRepoError) else "was not found"
        raise CheckpointNotFoundError(
            f"no local directory {name!r}, and the Hugging Face Hub model {name!r} {why} "
            "(log in with `hf auth login` if it is private); check model.path") from None
    except IncompleteSnapshotError:
        raise CheckpointNotFoundError(
            f"the cached snapshot of {name!r} (revision {revision!r}) in {constants.HF_HUB_CACHE} is missing "
            f"files and the Hub cannot be reached to complete it: {fix}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointNotFoundError(
            f"model {name!r} is neither a local directory nor in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(revision {revision!r}), and {why}: {fix}") from None
    except Exception as exc:  # noqa: BLE001 - network, proxy, disk: all need the same advice
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointNotFoundError(
            f"fetching {name!r} from the Hugging Face Hub failed ({type(exc).__name__}: {first}): {fix}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
