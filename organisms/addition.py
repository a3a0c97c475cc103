"""A model organism for the Fourier analysis: a small GPT-NeoX that adds two-digit numbers.

Every number 0..199 is one token (a word-level tokenizer), so ``a + b =`` with a, b in 0..99 is
five tokens after BOS and the answer a + b is one token, predicted at ``=``. The model trains on
a seeded 80 % of the 100 × 100 pairs (weight decay on) and is evaluated on the other 20 %, so it
has to generalise, not memorise. Whether it represents numbers periodically is then the Fourier
analysis's question, asked against an untrained model of the same shape
(``build(..., trained=False)``).

The prompts are exactly what the ``addition`` source renders with ``template: "{a} + {b} ="`` and
``bos: true``; bare numbers for the spectrum come from the ``numbers`` source.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .common import TrainConfig, fresh_dir, neox_model, save, torch_threads, train, word_tokenizer

TEMPLATE = "{a} + {b} ="
MAX_OPERAND = 99
N_NUMBERS = 200
TRAIN_SHARE = 0.8
SEED = 0
MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=16, rotary_pct=0.5, tie_word_embeddings=True)
#: measured (1 thread, 2-core machine, 2026-11-28), held-out accuracy / helix − poly3 R² at the last layer:
#: lr 1e-2 for 2000 steps 0.815 (~75 ms a step: 150 s); lr 2e-2 for 1200 steps 0.808 / 0.53 (90 s);
#: lr 2e-2 for 1500 steps 0.83 / 0.40; weight decay 0.5 (lr 1.5e-2) 0.85 / 0.39, 0.1 (lr 1e-2) 0.87 / 0.22
#: (less decay, less clean a helix); hidden size 64 (30 ms a step) 0.73 after 2000 steps; one layer
#: 0.46 after 1500. The cosine decay's last steps bring much of the accuracy, so no early stop.
#: Tied embeddings: inputs share the readout's structure.
TRAIN = TrainConfig(steps=1200, batch_size=256, lr=2e-2, weight_decay=1.0, warmup=100, eval_every=100,
                    seed=SEED, stop_at=None)


class Task:
    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        self.bos, self.plus, self.eq = tokenizer.bos_token_id, vocab["+"], vocab["="]
        self.number = [vocab[str(n)] for n in range(N_NUMBERS)]
        pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
        random.Random(SEED).shuffle(pairs)
        cut = int(TRAIN_SHARE * len(pairs))
        self.train_pairs, self.test_pairs = pairs[:cut], pairs[cut:]

    def tensors(self, pairs: list[tuple[int, int]]):
        import torch

        ids = torch.tensor([[self.bos, self.number[a], self.plus, self.number[b], self.eq, self.number[a + b]]
                            for a, b in pairs])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 4] = True  # '=' predicts the answer
        return ids, torch.roll(ids, -1, dims=1), mask

    def batch(self, gen, size: int):
        import torch

        picks = torch.randint(0, len(self.train_pairs), (size,), generator=gen).tolist()
        return self.tensors([self.train_pairs[i] for i in picks])


def accuracy(model, task: Task, pairs: list[tuple[int, int]]) -> float:
    import torch

    ids, targets, mask = task.tensors(pairs)
    with torch.no_grad():
        pred = model(input_ids=ids, use_cache=False).logits.argmax(-1)
    return float((pred[mask] == targets[mask]).float().mean())


def metrics(model, task: Task) -> dict[str, float]:
    return {"train_accuracy": accuracy(model, task, task.train_pairs[:2000]),
            "test_accuracy": accuracy(model, task, task.test_pairs)}


def build(out_dir: Path, *, trained: bool = True, log=print) -> Path:
    """Train (or, with ``trained=False``, only initialise) the organism and save it to ``out_dir``."""
    with torch_threads(TRAIN.threads):
        return _build(Path(out_dir), trained, log)


def _build(out_dir: Path, trained: bool, log) -> Path:
    out_dir = fresh_dir(out_dir)
    tokenizer = word_tokenizer(["+", "=", *(str(n) for n in range(N_NUMBERS))], out_dir)
    task = Task(tokenizer)
    model = neox_model(len(tokenizer), SEED, **MODEL)
    record: dict[str, Any] = {"organism": "addition", "trained": trained, "seed": SEED, "model": MODEL,
                              "task": {"template": TEMPLATE, "operands": [0, MAX_OPERAND], "train_share": TRAIN_SHARE}}
    if trained:
        cfg = TRAIN
        curve = train(model, lambda gen: task.batch(gen, cfg.batch_size), lambda m: metrics(m, task), cfg, log)
        record["train"] = {"config": vars(cfg), "curve": curve.as_dict()}
    record["accuracy"] = metrics(model, task)
    return save(model, out_dir, record)


def specs(model_dir: Path, stores: Path, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Job specs: every a + b prompt (residual stream at a, b and '=', top-5 predictions) and bare numbers."""
    model_dir = Path(model_dir).absolute()
    common = {"model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
              "run": {"batch_size": 500, "threads": 1}}
    store = {"root": str(Path(stores).absolute())}
    hooks = ["hook_embed", "blocks.*.hook_resid_post"]
    return {
        "addition": {**common, "name": f"{prefix}addition",
                     "prompts": {"source": "addition", "a": [0, MAX_OPERAND], "b": [0, MAX_OPERAND],
                                 "template": TEMPLATE, "bos": True},
                     "capture": {"hooks": hooks, "positions": "source", "top_k": 5},
                     "store": {**store, "path": f"{prefix}addition.zarr"}},
        "numbers": {**common, "name": f"{prefix}numbers",
                    "prompts": {"source": "numbers", "range": [0, MAX_OPERAND], "template": " {n}", "bos": True},
                    "capture": {"hooks": hooks, "positions": "source"},
                    "store": {**store, "path": f"{prefix}numbers.zarr"}},
    }
