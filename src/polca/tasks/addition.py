"""Addition of two n-digit numbers (METHOD §9), with per-token skill labels.

Sequence (n = 3): ``a₂ a₁ a₀ + b₂ b₁ b₀ = s₃ s₂ s₁ s₀``, one token per digit, operands zero-
padded and written most significant digit first, the sum as n + 1 output tokens in normal order.
Only the output tokens are scored. Labels per output token: ``place`` (1000, 100, 10, 1),
``carry`` (a carry enters this place: the sum of the lower places of a and b is ≥ its place
value; never for the units) and ``digit`` (the correct output digit).

Probe problems are a seeded sample of all (a, b) pairs; training problems are drawn fresh each
step from the other pairs, so train and probe are disjoint. ``task.options`` change the training
data (never the probe set):

* ``train_size = N``: a fixed training set of N distinct problems (seeded, disjoint from the
  probe set); each step's batch is a seeded draw from it, and the basis sample is its first
  problems (all N when fewer are asked for).
* ``carry_onset = S`` (a *planted* breakthrough, whose true time is known): before step S no
  training problem has a carry into any place of ``carry_places`` (default ``[10, 100]``), or
  only the fraction ``early_carry_fraction`` of each batch (rounded; default 0) has one; from
  step S on problems follow the natural distribution again. The basis sample follows the
  natural distribution.

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

from polca.config import ConfigError
from polca.functional import ProbeBatch

PLUS, EQUALS = 10, 11
SYMBOLS = "0123456789+="
OPTIONS = ("train_size", "carry_onset", "carry_places", "early_carry_fraction")


class Addition:
    name = "addition"
    vocab_size = 12
    label_columns = ("place", "carry", "digit")

    def __init__(self, digits: int = 3, n_probe: int = 1250, seed: int = 0,
                 train_size: int | None = None, carry_onset: int | None = None,
                 carry_places=None, early_carry_fraction: float | None = None):
        self.digits = digits
        self.n_numbers = 10**digits
        n_pairs = self.n_numbers**2
        if not 0 < n_probe < n_pairs // 2:
            raise ValueError(f"n_probe={n_probe} must be between 1 and {n_pairs // 2 - 1}")
        self.seed = seed
        self.sequence_length = 2 * digits + 2 + digits + 1
        rng = np.random.default_rng([seed, 0])
        self.probe_pairs = np.sort(rng.choice(n_pairs, size=n_probe, replace=False))
        self._check_schedule(carry_onset, carry_places, early_carry_fraction)
        self.carry_onset = carry_onset
        self.carry_places = tuple(carry_places or (10, 100))
        self.early_carry_fraction = early_carry_fraction or 0.0
        self.train_pairs = None
        if train_size is not None:
            if not isinstance(train_size, int) or not 0 < train_size <= n_pairs - n_probe:
                raise ConfigError(f"task.options.train_size = {train_size!r} must be an integer "
                                  f"in 1..{n_pairs - n_probe} (the problems outside the probe "
                                  "set); omit it for fresh problems every step")
            draw = np.random.default_rng([seed, 3]).choice(
                n_pairs, size=train_size + n_probe, replace=False)
            self.train_pairs = draw[~np.isin(draw, self.probe_pairs)][:train_size]

    def _check_schedule(self, onset, places, fraction) -> None:
        if onset is None:
            if places is not None or fraction is not None:
                raise ConfigError("task.options.carry_places and early_carry_fraction shape a "
                                  "carry schedule: give task.options.carry_onset too")
            return
        if not isinstance(onset, int) or onset < 0:
            raise ConfigError(f"task.options.carry_onset = {onset!r} must be a step ≥ 0")
        valid = [10**k for k in range(1, self.digits + 1)]
        if places is not None and (not isinstance(places, (list, tuple)) or not places
                                   or any(p not in valid for p in places)):
            raise ConfigError(f"task.options.carry_places = {places!r} must be a non-empty "
                              f"list of places from {valid}")
        if fraction is not None and not (isinstance(fraction, (int, float))
                                         and 0 <= fraction < 1):
            raise ConfigError(f"task.options.early_carry_fraction = {fraction!r} must be a "
                              "number in [0, 1)")

    @classmethod
    def from_config(cls, cfg, root=None) -> Addition:
        unknown = sorted(set(cfg.task.options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"task.options {unknown} are not known to addition; it takes "
                              f"{list(OPTIONS)}")
        return cls(digits=cfg.task.digits, n_probe=cfg.task.n_probe, seed=cfg.seed,
                   **cfg.task.options)

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

    def _sample_pairs(self, rng: np.random.Generator, n: int, carry: bool | None = None
                      ) -> np.ndarray:
        """``n`` training pairs ``a * 10ⁿ + b``: fresh, or from the fixed training set; with
        ``carry`` only those that do (True) or do not (False) carry into a ``carry_places``."""
        if self.train_pairs is not None:
            pool = self.train_pairs
            if carry is not None:
                pool = pool[self._carries(pool) == carry]
                if not len(pool):
                    raise ConfigError(f"the fixed training set (task.options.train_size) has "
                                      f"no problem {'with' if carry else 'without'} a carry "
                                      "into carry_places; enlarge it")
            return pool[rng.choice(len(pool), size=n, replace=n > len(pool))]
        pairs = np.empty(0, dtype=np.int64)
        while len(pairs) < n:
            draw = rng.integers(0, self.n_numbers**2, size=2 * (n - len(pairs)) + 8)
            keep = ~np.isin(draw, self.probe_pairs)
            if carry is not None:
                keep &= self._carries(draw) == carry
            pairs = np.concatenate([pairs, draw[keep]])
        return pairs[:n]

    def _carries(self, pairs: np.ndarray) -> np.ndarray:
        """``[n]`` bool: the problem carries into at least one of ``carry_places``."""
        a, b = pairs // self.n_numbers, pairs % self.n_numbers
        return np.any([(a % p) + (b % p) >= p for p in self.carry_places], axis=0)

    # -- Task protocol -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        rng = np.random.default_rng([self.seed, 1, step])
        if self.carry_onset is None or step >= self.carry_onset:
            pairs = self._sample_pairs(rng, batch_size)
        else:
            n_carry = round(self.early_carry_fraction * batch_size)
            pairs = np.concatenate([self._sample_pairs(rng, batch_size - n_carry, carry=False),
                                    self._sample_pairs(rng, n_carry, carry=True)])
        return self._batch(pairs // self.n_numbers, pairs % self.n_numbers)

    def basis_sample(self, n: int) -> ProbeBatch:
        if self.train_pairs is not None:
            pairs = self.train_pairs[:n]
        else:
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
