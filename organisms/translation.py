"""A model organism for translation heads: a small GPT-NeoX that translates lists of made-up words.

Task: ``Source: s_1 … s_W\\nTarget: t_1 … t_W`` where ``t_j = MAP[s_j]`` for a fixed random
bijection between two made-up vocabularies, ``W`` drawn from 2..6, the source words distinct and
random. The loss is on the target words only, so to predict ``t_j`` from position ``p_j − 1`` the
model has to find the aligned source word ``s_j``, whose index varies with ``W`` (no fixed
offset does it), and map it. That is the job of a translation head.

The prompts are exactly what the ``translation`` prompt source renders with its default template
from the word list saved beside the checkpoint (``word_lists/src-tgt.tsv``, one ``s<TAB>t`` pair
per line), so the harvest goes through ``harvest run`` with an ordinary spec.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .common import TrainConfig, fresh_dir, neox_model, save, torch_threads, train, word_tokenizer

PAIR = "src-tgt"
LANGUAGE_NAMES = {"src": "Source", "tgt": "Target"}
N_WORDS = 32
MIN_WORDS, MAX_WORDS = 2, 6
HARVEST_WORDS = 4
#: a share of training sequences are random words repeated, which grows an induction head beside
#: the translation head(s): the analysis must tell them apart
REPEAT_SHARE = 0.5
MIN_REPEAT, MAX_REPEAT = 4, 10
SEED = 0
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=32, rotary_pct=0.5)
#: translation is learnt by step ~300, induction later; measured (1 thread, 2026-11-28): both ≥ 0.99 at
#: step 1100 (~45 s), where the tests' circuits are already clean (at step 300 the previous-token
#: heads still carried translation score); stopping at 0.995 took 1700 steps (73 s) for no gain
TRAIN = TrainConfig(steps=2500, batch_size=128, lr=3e-3, weight_decay=0.05, warmup=100, eval_every=100,
                    seed=SEED, stop_at={"translation": 0.99, "induction": 0.99})


def made_up_words(n: int, rng: random.Random, syllables: int) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def word_pairs(seed: int = SEED) -> list[tuple[str, str]]:
    """The organism's dictionary: source word -> target word (a random bijection), as tsv lines."""
    rng = random.Random(seed)
    src = made_up_words(N_WORDS, rng, 2)
    tgt = made_up_words(N_WORDS, rng, 3)
    rng.shuffle(tgt)
    return list(zip(src, tgt))


class Task:
    """Token-level prompts of the task, built from the tokenizer's vocabulary."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]]):
        vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.head_src = [vocab[LANGUAGE_NAMES["src"]], vocab[":"]]
        self.head_tgt = [vocab[LANGUAGE_NAMES["tgt"]], vocab[":"]]
        self.src = [vocab[s] for s, _ in pairs]
        self.tgt = [vocab[t] for _, t in pairs]

    def prompt(self, word_ids: list[int]) -> tuple[list[int], list[int]]:
        """Token ids and the positions p_j − 1 that predict each target word."""
        ids = [self.bos, *self.head_src, *(self.src[i] for i in word_ids), *self.head_tgt]
        predict = []
        for i in word_ids:
            predict.append(len(ids) - 1)
            ids.append(self.tgt[i])
        return ids, predict

    def repeated(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """Random words (either language) written twice; the loss is on the second copy."""
        period = rng.randint(MIN_REPEAT, MAX_REPEAT)
        block = [rng.choice(self.src + self.tgt) for _ in range(period)]
        ids = [self.bos, *block, *block]
        return ids, list(range(period + 1, len(ids) - 1))  # the first token of a copy is unpredictable

    def batch(self, gen, size: int, n_words: int | None = None, repeat_share: float = 0.0):
        import torch

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        rng = random.Random(seed)
        rows = []
        for _ in range(size):
            if rng.random() < repeat_share:
                rows.append(self.repeated(rng))
                continue
            w = n_words or rng.randint(MIN_WORDS, MAX_WORDS)
            rows.append(self.prompt(rng.sample(range(len(self.src)), w)))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((size, width), self.bos, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.bool)
        for r, (seq, predict) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, predict] = True
        targets = torch.roll(ids, -1, dims=1)
        return ids, targets, mask


def accuracy(model, task: Task, n: int = 512, n_words: int = HARVEST_WORDS, seed: int = 1234,
             ablate: list[tuple[int, int]] = (), repeat_share: float = 0.0) -> float:
    """Share of asked-for tokens predicted right (argmax) on fresh prompts.

    ``repeat_share = 0``: target words of translation prompts; ``1``: the second copy of repeated
    words. ``ablate = [(layer, head), ...]`` zeroes those heads' outputs (their slices of the input
    to the attention output projection) — the ground truth for which heads do the work.
    """
    import torch

    ids, targets, mask = task.batch(torch.Generator().manual_seed(seed), n, n_words, repeat_share)
    d_head = model.config.hidden_size // model.config.num_attention_heads
    handles = []
    for layer in sorted({layer for layer, _ in ablate}):
        heads = [h for l_, h in ablate if l_ == layer]

        def zero_heads(_module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d_head:(h + 1) * d_head] = 0
            return (x,)

        handles.append(model.gpt_neox.layers[layer].attention.dense.register_forward_pre_hook(zero_heads))
    try:
        with torch.no_grad():
            pred = model(input_ids=ids, use_cache=False).logits.argmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    return float((pred[mask] == targets[mask]).float().mean())


def metrics(model, task: Task, ablate: list[tuple[int, int]] = ()) -> dict[str, float]:
    return {"translation": accuracy(model, task, ablate=ablate),
            "induction": accuracy(model, task, ablate=ablate, repeat_share=1.0)}


def write_assets(out_dir: Path, pairs: list[tuple[str, str]]) -> None:
    """The word list the ``translation`` source reads, and a text corpus for the previous-token control."""
    lists = out_dir / "word_lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{PAIR}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    rng = random.Random(SEED + 1)
    words = [w for pair in pairs for w in pair]
    corpus = out_dir / "corpus"
    corpus.mkdir(exist_ok=True)
    for d in range(4):
        (corpus / f"words{d}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + "\n", encoding="utf-8")


def build(out_dir: Path, *, trained: bool = True, log=print) -> Path:
    """Train (or, with ``trained=False``, only initialise) the organism and save it to ``out_dir``."""
    with torch_threads(TRAIN.threads):
        return _build(Path(out_dir), trained, log)


def _build(out_dir: Path, trained: bool, log) -> Path:
    out_dir = fresh_dir(out_dir)
    pairs = word_pairs()
    words = [LANGUAGE_NAMES["src"], LANGUAGE_NAMES["tgt"], ":", *(s for s, _ in pairs), *(t for _, t in pairs)]
    tokenizer = word_tokenizer(words, out_dir)
    write_assets(out_dir, pairs)
    task = Task(tokenizer, pairs)
    model = neox_model(len(tokenizer), SEED, **MODEL)
    record: dict[str, Any] = {"organism": "translation", "trained": trained, "seed": SEED, "model": MODEL,
                              "task": {"pair": PAIR, "n_words": N_WORDS, "words_per_prompt": [MIN_WORDS, MAX_WORDS]}}
    if trained:
        cfg = TRAIN
        curve = train(model, lambda gen: task.batch(gen, cfg.batch_size, repeat_share=REPEAT_SHARE),
                      lambda m: metrics(m, task), cfg, log)
        record["train"] = {"config": vars(cfg), "curve": curve.as_dict()}
    record["accuracy"] = metrics(model, task)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    record["ablation"] = {f"{layer}.{head}": metrics(model, task, [(layer, head)])
                          for layer in range(n_layers) for head in range(n_heads)}
    return save(model, out_dir, record)


# --- harvest specs (the ordinary ``harvest run`` path) ---------------------------------------------

def specs(model_dir: Path, stores: Path, n_prompts: int = 200) -> dict[str, dict[str, Any]]:
    """Job specs for the organism: translation prompts, natural(ish) text, repeated random tokens."""
    model_dir = Path(model_dir).absolute()
    common = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "capture": {"hooks": ["blocks.*.attn.hook_pattern"], "positions": "last"},
        "run": {"batch_size": 64, "threads": 1},
    }
    store = {"root": str(Path(stores).absolute())}
    return {
        "translation": {**common, "name": "translation",
                        "prompts": {"source": "translation", "pairs": [PAIR], "word_lists": str(model_dir / "word_lists"),
                                    "language_names": LANGUAGE_NAMES, "words_per_prompt": HARVEST_WORDS,
                                    "n_prompts": n_prompts, "bos": True, "seed": 0},
                        "store": {**store, "path": "translation.zarr"}},
        "text": {**common, "name": "text",
                 "prompts": {"source": "text", "paths": [str(model_dir / "corpus" / "*.txt")], "seq_len": 24,
                             "mode": "packed", "bos": True, "max_sequences": 64},
                 "store": {**store, "path": "text.zarr"}},
        "repeated": {**common, "name": "repeated",
                     "prompts": {"source": "repeated_tokens", "length": 10, "n_prompts": 64, "bos": True,
                                 "vocab": [5, 5 + 2 * N_WORDS], "seed": 0},
                     "store": {**store, "path": "repeated.zarr"}},
    }
