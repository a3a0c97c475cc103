"""What both organisms share: a word-level tokenizer, a small GPT-NeoX, a seeded training loop.

Every organism is saved the way a user's checkpoint is: ``save_pretrained`` (safetensors) for the
model and ``PreTrainedTokenizerFast.save_pretrained`` for the tokenizer, so the harvester loads
it through its ordinary path. ``organism.json`` is written last and holds the training curve and
the final accuracies; a directory without it is an unfinished build and is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOS = "<bos>"
UNK = "<unk>"
RECORD = "organism.json"


def word_tokenizer(words: Iterable[str], out_dir: Path):
    """A WordLevel tokenizer (one token per whitespace/punctuation-separated word), saved and reloaded.

    Token ids: ``<bos>`` = 0 (also eos), ``<unk>`` = 1, then ``words`` in order. The pre-tokenizer
    splits on whitespace and punctuation, so ``"Target: ab"`` is three tokens and the prompt
    sources' offset mapping locates every word exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {BOS: 0, UNK: 1}
    for w in words:
        if w in vocab:
            raise ValueError(f"word {w!r} is listed twice in the organism's vocabulary")
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=UNK)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def neox_model(vocab_size: int, seed: int, **overrides: Any):
    """A small GPT-NeoX (parallel residual, rotary), seeded."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    params: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(**params), dtype=torch.float32)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    eval_every: int = 100
    #: torch threads. 1, measured: these models are so small that every op is overhead-bound; on
    #: this 2-core machine shared with other jobs, 2 threads made a step ~10x slower (0.79 s vs 0.085 s)
    threads: int = 1
    seed: int = 0
    #: stop early once every evaluation metric has been at least this for two evaluations in a row;
    #: a dict gives each metric its own target (metrics it does not name do not hold training up)
    stop_at: float | dict[str, float] | None = None

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.stop_at is None:
            return False
        targets = self.stop_at if isinstance(self.stop_at, dict) else dict.fromkeys(metrics, self.stop_at)
        return all(metrics[k] >= v for k, v in targets.items())


@dataclass
class Curve:
    """Training loss and held-out metrics (accuracies) as training went."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, list]:
        return {"step": self.step, "loss": self.loss, "seconds": self.seconds, **self.metrics}


def train(model, batches: Callable[[Any], tuple[Any, Any, Any]], evaluate: Callable[[Any], dict[str, float]],
          cfg: TrainConfig, log: Callable[[str], None] | None = print) -> Curve:
    """AdamW with linear warm-up and cosine decay; ``batches(rng)`` gives (input_ids, targets, loss mask).

    The loss is cross-entropy on the masked positions only (the tokens the task asks for).
    ``evaluate(model)`` returns held-out metrics; training stops early once they have reached
    ``cfg.stop_at`` at two evaluations in a row, so a run takes the steps its task needs and no more.
    """
    import torch

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, t0, running, good = Curve(), time.perf_counter(), [], 0
    model.train()
    for step in range(cfg.steps):
        ids, targets, mask = batches(gen)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            model.train()
            curve.step.append(step + 1)
            curve.loss.append(round(sum(running) / len(running), 5))
            curve.seconds.append(round(time.perf_counter() - t0, 2))
            for k, v in metrics.items():
                curve.metrics.setdefault(k, []).append(round(v, 4))
            running = []
            if log:
                shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                log(f"  step {step + 1:5d}  loss {curve.loss[-1]:.4f}  {shown}  {curve.seconds[-1]:.0f} s")
            good = good + 1 if cfg.reached(metrics) else 0
            if good >= 2:
                break
    model.eval()
    return curve


def untie(model) -> None:
    """Give the unembedding its own copy of the (tied) embedding: same function, both tensors saved.

    Real GPT-J / GPT-NeoX checkpoints are untied; a tied checkpoint stores only the embedding,
    which the harvester's stage loader does not handle yet.
    """
    import torch

    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, then restore the process's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save(model, out_dir: Path, record: dict[str, Any]) -> Path:
    """Weights (safetensors, untied) then the record; the record marks the organism as complete."""
    untie(model)
    model.save_pretrained(out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out_dir


def is_complete(out_dir: Path) -> bool:
    return (out_dir / RECORD).is_file() and (out_dir / "model.safetensors").is_file()


def read_record(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / RECORD).read_text())


def fresh_dir(out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir
