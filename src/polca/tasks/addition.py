"""Addition of two n-digit numbers (METHOD §9), with per-token skill labels.

Sequence (n = 3): ``a₂ a₁ a₀ + b₂ b₁ b₀ = s₃ s₂ s₁ s₀``, one token per digit, operands zero-
padded and written most significant digit first, the sum as n + 1 output tokens in normal order.
Only the output tokens are scored. Labels per output token: ``place`` (1000, 100, 10, 1),
``carry`` (a carry enters this place: the sum of the lower places of a and b is ≥ its place
value; never for the units) and ``digit`` (the correct output digit).

Probe problems are a seeded sample of all (a, b) pairs; training problems are drawn fresh each
step from the other pairs, so train and probe are disjoint.

Example:
    >>> task = Addition(digits=3, n_probe=4, seed=0)
    >>> sequences, tokens = task.probe_set()
    >>> task.decode(sequences.input_ids[0])  # doctest: +SKIP
    '483+051=0534'
    >>> list(tokens.columns[:4])
    ['token', 'sequence', 'position', 'target']
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polca.functional import ProbeBatch

PLUS, EQUALS = 10, 11
SYMBOLS = "0123456789+="


class Addition:
    name = "addition"
    vocab_size = 12
    label_columns = ("place", "carry", "digit")

    def __init__(self, digits: int = 3, n_probe: int = 1250, seed: int = 0):
        self.digits = digits
        self.n_numbers = 10**digits
        n_pairs = self.n_numbers**2
        if not 0 < n_probe < n_pairs // 2:
            raise ValueError(f"n_probe={n_probe} must be between 1 and {n_pairs // 2 - 1}")
        self.seed = seed
        self.sequence_length = 2 * digits + 2 + digits + 1
        rng = np.random.default_rng([seed, 0])
        self.probe_pairs = np.sort(rng.choice(n_pairs, size=n_probe, replace=False))
        self._probe_lookup = set(self.probe_pairs.tolist())

    @classmethod
    def from_config(cls, cfg, root=None) -> Addition:
        return cls(digits=cfg.task.digits, n_probe=cfg.task.n_probe, seed=cfg.seed)

    # -- encoding -----------------------------------------------------------------------------
    def _digits(self, values: np.ndarray, width: int) -> np.ndarray:
        powers = 10 ** np.arange(width - 1, -1, -1)
        return (values[:, None] // powers) % 10

    def encode(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``[n, sequence_length]`` token ids of the problems ``a + b``."""
        n, d = len(a), self.digits
        return np.concatenate(
            [self._digits(a, d), np.full((n, 1), PLUS), self._digits(b, d),
             np.full((n, 1), EQUALS), self._digits(a + b, d + 1)], axis=1,
        )

    def decode(self, ids) -> str:
        return "".join(SYMBOLS[int(i)] for i in ids)

    @property
    def output_positions(self) -> np.ndarray:
        """Positions whose next-token prediction is an output digit (the '=' and after)."""
        first = 2 * self.digits + 1
        return np.arange(first, first + self.digits + 1)

    def _batch(self, a: np.ndarray, b: np.ndarray) -> ProbeBatch:
        ids = torch.as_tensor(self.encode(a, b), dtype=torch.long)
        targets = torch.roll(ids, -1, dims=1)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, self.output_positions] = True
        return ProbeBatch(ids, targets, scored)

    def _sample_pairs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pairs = np.empty(0, dtype=np.int64)
        while len(pairs) < n:
            draw = rng.integers(0, self.n_numbers**2, size=2 * (n - len(pairs)) + 8)
            keep = draw[~np.isin(draw, self.probe_pairs)]
            pairs = np.concatenate([pairs, keep])
        return pairs[:n]

    # -- Task protocol -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        pairs = self._sample_pairs(np.random.default_rng([self.seed, 1, step]), batch_size)
        return self._batch(pairs // self.n_numbers, pairs % self.n_numbers)

    def basis_sample(self, n: int) -> ProbeBatch:
        pairs = self._sample_pairs(np.random.default_rng([self.seed, 2]), n)
        return self._batch(pairs // self.n_numbers, pairs % self.n_numbers)

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        a, b = self.probe_pairs // self.n_numbers, self.probe_pairs % self.n_numbers
        ids = self.encode(a, b)
        sequences = pd.DataFrame({
            "sequence": np.arange(len(a)), "input_ids": list(ids),
            "a": a, "b": b, "text": [self.decode(row) for row in ids],
        })
        n_out = self.digits + 1
        seq = np.repeat(np.arange(len(a)), n_out)
        positions = np.tile(self.output_positions, len(a))
        place = np.tile(10 ** np.arange(self.digits, -1, -1), len(a))
        lower_a, lower_b = np.repeat(a, n_out) % place, np.repeat(b, n_out) % place
        targets = ids[seq, positions + 1]
        tokens = pd.DataFrame({
            "token": np.arange(len(seq)), "sequence": seq, "position": positions,
            "target": targets, "text": [SYMBOLS[t] for t in targets],
            "context": [self.decode(ids[s, : p + 1]) for s, p in zip(seq, positions)],
            "place": place, "carry": (lower_a + lower_b) >= place, "digit": targets,
        })
        return sequences, tokens
