"""Small real checkpoints built on this machine: the demo model and the test models.

There is no model hub here, so the demo and the tests build GPT-J / GPT-NeoX models from their
transformers configs, train a byte-level BPE tokenizer on a local corpus, and save both with
``save_pretrained`` (safetensors). They are then loaded through exactly the path a user's
checkpoint takes.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTJConfig, GPTNeoXConfig, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and save it in transformers' format.

    Byte-level BPE covers every string (digits, accents), so the addition and translation
    prompt sources work with it too. Saved and loaded back: a tokenizer built only in memory
    lacks ``name_or_path`` and trips some downstream tools.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def toy_config(arch: str, vocab_size: int, **overrides: Any):
    """A small config of the given architecture (``gpt_neox`` or ``gptj``)."""
    if arch == "gpt_neox":
        params: dict[str, Any] = dict(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=256, rotary_pct=0.25,
            use_parallel_residual=True, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )
        params.update(overrides)
        return GPTNeoXConfig(**params)
    if arch == "gptj":
        params = dict(
            vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_inner=None, n_positions=256,
            rotary_dim=8, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )
        params.update(overrides)
        return GPTJConfig(**params)
    raise ValueError(f"unknown toy architecture {arch!r}; use 'gpt_neox' or 'gptj'")


def build_checkpoint(
    out_dir: str | Path,
    arch: str = "gpt_neox",
    *,
    tokenizer_dir: str | Path | None = None,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
    **config_overrides: Any,
) -> Path:
    """Random-init model + tokenizer saved as a real checkpoint directory.

    ``max_shard_size`` splits the weights into several files with an index (as large real
    checkpoints are); ``safe_serialization=False`` writes a pickle checkpoint, for testing that
    it is refused without ``allow_pickle``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(out_dir)
    else:
        tokenizer = build_tokenizer(texts or stdlib_docstrings(limit=400), out_dir, vocab_size=vocab_size)
    config = toy_config(arch, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    if safe_serialization:
        model.save_pretrained(out_dir, **kwargs)
    else:
        _save_pickle(model, out_dir)
    return out_dir


def _save_pickle(model, out_dir: Path) -> None:
    """Write ``pytorch_model.bin`` the way pre-safetensors checkpoints are laid out."""
    model.config.save_pretrained(out_dir)
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")


def stdlib_docstrings(limit: int | None = None) -> list[str]:
    """English prose every Python installation has: the standard library's docstrings.

    Deterministic for a given Python version (the corpus hash goes into the store fingerprint).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
        if limit is not None and len(docs) >= limit:
            return docs[:limit]
    return docs


def write_stdlib_corpus(directory: Path, limit: int) -> Path:
    """``directory`` filled with the first ``limit`` stdlib docstrings, one ``docNN.txt`` file each: a
    corpus long enough for a packed job of many batches (one file per document, as a user's corpus)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(stdlib_docstrings(limit=limit)):
        (directory / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return directory


if __name__ == "__main__":  # pragma: no cover - manual use
    print(build_checkpoint(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gpt_neox"))


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose tensors ``edit(tensors)`` changed in place (tests of bad weights)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
