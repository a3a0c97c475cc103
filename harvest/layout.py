"""Where every captured row lands, decided before the first forward pass.

The layout maps each sequence to its stored rows (its selected positions, in order) and groups
sequences into batches. It is a pure function of the prompts and the position selection, so
batch ``k`` always lands in the same rows: writes are idempotent and a resumed job ends
byte-identical to one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import SpecError
from .prompts.base import Prompt
from .spec import Positions


def select_positions(positions: Positions, length: int, seq_index: int, prompt: Prompt) -> np.ndarray:
    """The positions of one sequence that become rows, sorted and unique."""
    kind = positions.kind
    if kind == "all":
        return np.arange(length)
    if kind == "last":
        return np.array([length - 1])
    if kind == "every":
        return np.arange(positions.offset, length, positions.every)
    if kind == "sample":
        # seeded per sequence, so a sequence's sample does not depend on batch composition
        rng = np.random.default_rng([positions.seed, seq_index])
        return np.sort(rng.choice(length, size=min(positions.sample, length), replace=False))
    if kind == "source":
        return np.asarray(sorted(set(prompt.positions)), dtype=np.int64)
    picked = []
    for p in positions.explicit:
        q = p if p >= 0 else length + p
        if not 0 <= q < length:
            raise SpecError(
                f"capture.positions: position {p} does not exist in sequence {seq_index}, which has "
                f"{length} tokens; use positions valid for every sequence, or negative ones from the end"
            )
        picked.append(q)
    return np.asarray(sorted(set(picked)), dtype=np.int64)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: everything a stage needs besides weights and hidden states.

    Sequences are right-padded to the batch's longest one. Under a causal mask a real token never
    attends to the padding after it, so no padding mask is needed and padded positions are simply
    never selected as rows.
    """

    index: int
    input_ids: np.ndarray  #: (batch, pos) int64, padded with 0
    lengths: np.ndarray  #: (batch,)
    flat_rows: np.ndarray  #: (rows,) indices into the flattened (batch * pos) axis
    rows: tuple[int, int]  #: [start, end) on the token axis of the store
    sequences: tuple[int, int]  #: [start, end) on the sequence axis

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


class Layout:
    """Rows, sequences and batches of one job."""

    def __init__(self, prompts: list[Prompt], positions: Positions, batch_size: int):
        if not prompts:
            raise SpecError("the prompt source produced no prompts; check its paths and ranges")
        self.prompts = prompts
        self.batch_size = batch_size
        self.lengths = np.array([len(p.input_ids) for p in prompts], dtype=np.int64)
        if (self.lengths == 0).any():
            raise SpecError(f"prompt {int(np.argmin(self.lengths))} is empty; every prompt needs at least one token")
        picks = [select_positions(positions, int(n), i, p) for i, (n, p) in enumerate(zip(self.lengths, prompts))]
        self.row_offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        self.row_offsets[1:] = np.cumsum([len(x) for x in picks])
        self.pos = np.concatenate(picks).astype(np.int32) if picks else np.zeros(0, np.int32)
        self.seq = np.repeat(np.arange(len(prompts), dtype=np.int64), np.diff(self.row_offsets))
        self.tokens = np.array(
            [prompts[s].input_ids[p] for s, p in zip(self.seq, self.pos)], dtype=np.int32
        ).reshape(-1)

    @property
    def n_sequences(self) -> int:
        return len(self.prompts)

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    @property
    def n_batches(self) -> int:
        return -(-self.n_sequences // self.batch_size)

    @cached_property
    def input_ids(self) -> np.ndarray:
        """(sequence, position) token ids, -1 beyond each sequence's length."""
        out = np.full((self.n_sequences, self.max_len), -1, dtype=np.int32)
        for i, p in enumerate(self.prompts):
            out[i, : len(p.input_ids)] = p.input_ids
        return out

    def batch_sequences(self, k: int) -> tuple[int, int]:
        return k * self.batch_size, min((k + 1) * self.batch_size, self.n_sequences)

    def batch_rows(self, k: int) -> tuple[int, int]:
        s0, s1 = self.batch_sequences(k)
        return int(self.row_offsets[s0]), int(self.row_offsets[s1])

    def batch(self, k: int) -> Batch:
        s0, s1 = self.batch_sequences(k)
        lengths = self.lengths[s0:s1]
        width = int(lengths.max())
        ids = np.zeros((s1 - s0, width), dtype=np.int64)
        for i, p in enumerate(self.prompts[s0:s1]):
            ids[i, : len(p.input_ids)] = p.input_ids
        r0, r1 = self.batch_rows(k)
        flat = (self.seq[r0:r1] - s0) * width + self.pos[r0:r1]
        return Batch(k, ids, lengths, flat.astype(np.int64), (r0, r1), (s0, s1))

    def token_starts(self) -> np.ndarray:
        """(sequences + 1,) first token of each sequence counting every position (the harvest-time
        statistics' row numbering: a store harvested with ``positions: all`` has these rows)."""
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def tokens_before(self, k: int) -> int:
        """Tokens (every position of every sequence) in batches [0, k)."""
        return int(batch_tokens(self.lengths, self.batch_size)[:k].sum())

    def batch_ends(self, axis: str) -> np.ndarray:
        """End offset of every batch along ``token`` rows or ``sequence``s."""
        ends = np.minimum((np.arange(self.n_batches) + 1) * self.batch_size, self.n_sequences)
        return self.row_offsets[ends] if axis == "token" else ends


def batch_tokens(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Tokens in each batch: batch k holds sequences [k * batch_size, (k + 1) * batch_size)."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(np.asarray(lengths, dtype=np.int64), np.arange(0, len(lengths), batch_size))
