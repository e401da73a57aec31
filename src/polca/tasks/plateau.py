"""The loss-plateau tasks of Gopalani & Hu (NeurIPS 2025), with per-token labels (METHOD §8).

Each sequence is ``prompt, outputs``; only the outputs are scored. Sequences (defaults):

* ``MovingWindowSum``: 16 integers in [1, 16], the separator 17, then y₁ = x₁ and
  yᵢ = (xᵢ₋₁ + xᵢ) mod 17 (window ``k``: the first k − 1 outputs copy their input).
* ``PrefixSum``: 16 integers in [1, 16], the separator 17, then yᵢ = (x₁ + … + xᵢ) mod 17.
* ``ReversedAddition``: two n-digit operands in [1, 10ⁿ − 1] (zero-padded, most significant
  digit first) ``a + b =``, then the n + 1 digits of the sum, units first.

Training data is drawn fresh for every step (the paper's online setting) or, with
``options.train_size``, from a fixed training set; either way it never contains a probe
sequence's prompt. Every task also says what the progress measures need: the scored output
positions, the key positions an optimal attention head reads for each output
(``attention_targets``) and the outputs learned first (``early_outputs``, left out of the
representation-collapse mean as the paper does).

Labels per scored token: ``out_position`` (index of the output, 0-based) and the inputs the
output depends on (see each class).

Example:
    >>> task = MovingWindowSum(n_probe=2, seed=0)
    >>> sequences, tokens = task.probe_set()
    >>> task.decode(sequences.input_ids[0])  # doctest: +SKIP
    '9 4 ... 2 | 9 13 ...'
    >>> tokens.out_position.tolist()[:3]
    [0, 1, 2]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polca.functional import ProbeBatch

KNOWN_OPTIONS = {
    "moving_window_sum": {"n_inputs", "max_value", "modulus", "window", "train_size"},
    "prefix_sum": {"n_inputs", "max_value", "modulus", "train_size"},
    "reversed_addition": {"train_size"},
}


def _check_options(kind: str, options: dict) -> dict:
    unknown = set(options) - KNOWN_OPTIONS[kind]
    if unknown:
        raise ValueError(f"task.options {sorted(unknown)} are not known to {kind}; it takes "
                         f"{sorted(KNOWN_OPTIONS[kind])}")
    return options


class SequenceTask:
    """Prompt-then-outputs tasks: sampling, train/probe separation and the probe tables.

    Subclasses set ``name``, ``vocab_size``, ``prompt_length``, ``n_outputs`` and implement
    ``_sample(rng, n) -> ids [n, sequence_length]``, ``_labels(ids) -> dict of [n, n_outputs]``,
    ``attention_targets()``, ``decode`` and ``_token_text``.
    """

    name: str
    vocab_size: int
    prompt_length: int
    n_outputs: int
    early_outputs: tuple[int, ...] = (0,)
    label_columns: tuple[str, ...] = ("out_position",)

    def _setup(self, n_probe: int, seed: int, train_size: int | None) -> None:
        if n_probe <= 0:
            raise ValueError(f"n_probe={n_probe} must be positive")
        if train_size is not None and train_size <= 0:
            raise ValueError(f"train_size={train_size} must be positive (omit it for fresh "
                             "samples every step)")
        self.seed = seed
        self.n_probe = n_probe
        self.train_size = train_size
        self.probe_ids = self._distinct(np.random.default_rng([seed, 0]), n_probe, exclude=set())
        self._probe_prompts = {self._key(r) for r in self.probe_ids}
        self.train_ids = (None if train_size is None else self._distinct(
            np.random.default_rng([seed, 1]), train_size, exclude=self._probe_prompts))

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.n_outputs

    @property
    def output_positions(self) -> np.ndarray:
        """``[n_outputs]`` positions whose next-token prediction is an output."""
        return np.arange(self.prompt_length - 1, self.prompt_length - 1 + self.n_outputs)

    def _key(self, row: np.ndarray) -> bytes:
        return np.ascontiguousarray(row[: self.prompt_length], dtype=np.int64).tobytes()

    def _distinct(self, rng: np.random.Generator, n: int, exclude: set) -> np.ndarray:
        """``n`` sequences with distinct prompts, none of whose prompt is in ``exclude``."""
        rows, seen = [], set(exclude)
        for _ in range(1000):
            for row in self._sample(rng, 2 * (n - len(rows)) + 8):
                key = self._key(row)
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
                    if len(rows) == n:
                        return np.stack(rows)
        raise ValueError(f"cannot draw {n} distinct sequences for {self.name}; the task has "
                         "too few possible prompts for this probe/train size")

    def _fresh(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = self._sample(rng, n)
        keep = np.array([self._key(r) not in self._probe_prompts for r in ids])
        while not keep.all():  # rare: redraw the rows that hit a probe prompt
            ids[~keep] = self._sample(rng, int((~keep).sum()))
            keep = np.array([self._key(r) not in self._probe_prompts for r in ids])
        return ids

    def _batch(self, ids: np.ndarray) -> ProbeBatch:
        ids = torch.as_tensor(ids, dtype=torch.long)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, self.output_positions] = True
        return ProbeBatch(ids, torch.roll(ids, -1, dims=1), scored)

    # -- Task protocol -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        rng = np.random.default_rng([self.seed, 1, step])
        if self.train_ids is None:
            return self._batch(self._fresh(rng, batch_size))
        rows = rng.choice(len(self.train_ids), size=batch_size,
                          replace=batch_size > len(self.train_ids))
        return self._batch(self.train_ids[rows])

    def basis_sample(self, n: int) -> ProbeBatch:
        if self.train_ids is not None:
            return self._batch(self.train_ids[:n])
        return self._batch(self._fresh(np.random.default_rng([self.seed, 2]), n))

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        ids = self.probe_ids
        n, outs = len(ids), self.n_outputs
        sequences = pd.DataFrame({"sequence": np.arange(n), "input_ids": list(ids),
                                  "text": [self.decode(r) for r in ids]})
        seq = np.repeat(np.arange(n), outs)
        positions = np.tile(self.output_positions, n)
        targets = ids[seq, positions + 1]
        tokens = pd.DataFrame({
            "token": np.arange(n * outs), "sequence": seq, "position": positions,
            "target": targets, "text": [self._token_text(t) for t in targets],
            "context": [self.decode(ids[s, : p + 1]) for s, p in zip(seq, positions)],
            "out_position": np.tile(np.arange(outs), n),
        })
        for column, values in self._labels(ids).items():
            tokens[column] = np.asarray(values).reshape(-1)
        return sequences, tokens

    def attention_targets(self) -> np.ndarray:
        """``[n_outputs, sequence_length]`` bool: the keys an optimal head reads per output."""
        raise NotImplementedError


class _IntegerSequenceTask(SequenceTask):
    """Integers in [1, max_value], a separator, then ``n_inputs`` outputs modulo ``modulus``."""

    @classmethod
    def from_config(cls, cfg, root=None) -> _IntegerSequenceTask:
        return cls(**_check_options(cls.name, cfg.task.options), n_probe=cfg.task.n_probe,
                   seed=cfg.seed)

    def __init__(self, n_inputs: int, max_value: int, modulus: int):
        if n_inputs < 2 or max_value < 1:
            raise ValueError(f"need n_inputs ≥ 2 and max_value ≥ 1, got {n_inputs}, {max_value}")
        if modulus <= max_value:
            raise ValueError(f"modulus={modulus} must exceed max_value={max_value} (the paper "
                             "uses 17 and 16)")
        self.n_inputs, self.max_value, self.modulus = n_inputs, max_value, modulus
        self.separator = max(modulus, max_value + 1)
        self.vocab_size = self.separator + 1
        self.prompt_length = n_inputs + 1
        self.n_outputs = n_inputs

    def _inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(1, self.max_value + 1, size=(n, self.n_inputs))

    def _with_outputs(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        sep = np.full((len(x), 1), self.separator)
        return np.concatenate([x, sep, y], axis=1)

    def decode(self, ids) -> str:
        return " ".join(self._token_text(int(i)) for i in ids)

    def _token_text(self, token: int) -> str:
        return "|" if int(token) == self.separator else str(int(token))


class MovingWindowSum(_IntegerSequenceTask):
    """yᵢ = xᵢ for i < k, else (xᵢ₋ₖ₊₁ + … + xᵢ) mod p (paper: k = 2, n = 16, p = 17).

    Labels: ``out_position``, ``x_prev`` (xᵢ₋₁, −1 for the first output), ``x_curr`` (xᵢ) and
    ``wraps`` (the window sum reached the modulus).
    """

    name = "moving_window_sum"
    label_columns = ("out_position", "x_prev", "x_curr", "wraps")

    def __init__(self, n_inputs: int = 16, max_value: int = 16, modulus: int = 17,
                 window: int = 2, n_probe: int = 256, seed: int = 0,
                 train_size: int | None = None):
        super().__init__(n_inputs, max_value, modulus)
        if not 1 <= window <= n_inputs:
            raise ValueError(f"window={window} must lie in 1..n_inputs={n_inputs}")
        self.window = window
        self.early_outputs = tuple(range(window - 1))
        self._setup(n_probe, seed, train_size)

    def _sample(self, rng, n):
        x = self._inputs(rng, n)
        sums = np.lib.stride_tricks.sliding_window_view(x, self.window, axis=1).sum(-1)
        y = np.concatenate([x[:, : self.window - 1], sums], axis=1) % self.modulus
        return self._with_outputs(x, y)

    def _labels(self, ids):
        x = ids[:, : self.n_inputs]
        prev = np.concatenate([np.full((len(x), 1), -1), x[:, :-1]], axis=1)
        window_sum = np.stack([x[:, max(0, i - self.window + 1): i + 1].sum(1)
                               if i >= self.window - 1 else x[:, i]
                               for i in range(self.n_inputs)], axis=1)
        return {"x_prev": prev, "x_curr": x, "wraps": window_sum >= self.modulus}

    def attention_targets(self) -> np.ndarray:
        mask = np.zeros((self.n_outputs, self.sequence_length), dtype=bool)
        for i in range(self.n_outputs):
            lo = i if i < self.window - 1 else i - self.window + 1
            mask[i, lo: i + 1] = True
        return mask


class PrefixSum(_IntegerSequenceTask):
    """yᵢ = (x₁ + … + xᵢ) mod p (paper: n = 16, p = 17).

    Labels: ``out_position``, ``x_curr`` (xᵢ), ``prev_sum`` (yᵢ₋₁, −1 for the first output) and
    ``wraps`` (yᵢ₋₁ + xᵢ reached the modulus).
    """

    name = "prefix_sum"
    label_columns = ("out_position", "x_curr", "prev_sum", "wraps")

    def __init__(self, n_inputs: int = 16, max_value: int = 16, modulus: int = 17,
                 n_probe: int = 256, seed: int = 0, train_size: int | None = None):
        super().__init__(n_inputs, max_value, modulus)
        self._setup(n_probe, seed, train_size)

    def _sample(self, rng, n):
        x = self._inputs(rng, n)
        return self._with_outputs(x, np.cumsum(x, axis=1) % self.modulus)

    def _labels(self, ids):
        x, y = ids[:, : self.n_inputs], ids[:, self.prompt_length:]
        prev = np.concatenate([np.full((len(x), 1), -1), y[:, :-1]], axis=1)
        return {"x_curr": x, "prev_sum": prev, "wraps": np.maximum(prev, 0) + x >= self.modulus}

    def attention_targets(self) -> np.ndarray:
        # output i reads xᵢ and, from the second output on, yᵢ₋₁: the token at its own query
        # position (the paper's mask)
        mask = np.zeros((self.n_outputs, self.sequence_length), dtype=bool)
        for i, query in enumerate(self.output_positions):
            mask[i, i] = True
            if i > 0:
                mask[i, query] = True
        return mask


PLUS, EQUALS = 10, 11
SYMBOLS = "0123456789+="


class ReversedAddition(SequenceTask):
    """``a + b =`` then the n + 1 sum digits units first (paper: n = 4, operands in [1, 10ⁿ−1]).

    Labels: ``out_position``, ``place`` (1, 10, …, 10ⁿ), ``carry`` (a carry enters this place),
    ``digit`` (the correct output digit), ``a_digit`` and ``b_digit`` (the operands' digits of
    this place, −1 for the final carry place).
    """

    name = "reversed_addition"
    vocab_size = 12
    label_columns = ("out_position", "place", "carry", "digit", "a_digit", "b_digit")

    def __init__(self, digits: int = 4, n_probe: int = 256, seed: int = 0,
                 train_size: int | None = None):
        if digits < 1:
            raise ValueError(f"digits={digits} must be at least 1")
        self.digits = digits
        self.prompt_length = 2 * digits + 2
        self.n_outputs = digits + 1
        # the final carry only copies (a carry or not): learned first, like y₁ of the sums
        self.early_outputs = (digits,)
        self._setup(n_probe, seed, train_size)

    @classmethod
    def from_config(cls, cfg, root=None) -> ReversedAddition:
        return cls(digits=cfg.task.digits, **_check_options(cls.name, cfg.task.options),
                   n_probe=cfg.task.n_probe, seed=cfg.seed)

    def _place_digits(self, values: np.ndarray, width: int) -> np.ndarray:
        """``[n, width]`` digits, units first."""
        return (values[:, None] // 10 ** np.arange(width)) % 10

    def _sample(self, rng, n):
        a = rng.integers(1, 10**self.digits, size=n)
        b = rng.integers(1, 10**self.digits, size=n)
        d = self.digits
        return np.concatenate([
            self._place_digits(a, d)[:, ::-1], np.full((n, 1), PLUS),
            self._place_digits(b, d)[:, ::-1], np.full((n, 1), EQUALS),
            self._place_digits(a + b, d + 1)], axis=1)

    def _operands(self, ids):
        d = self.digits
        powers = 10 ** np.arange(d - 1, -1, -1)
        return ids[:, :d] @ powers, ids[:, d + 1: 2 * d + 1] @ powers

    def _labels(self, ids):
        a, b = self._operands(ids)
        place = 10 ** np.arange(self.n_outputs)
        a_digits = np.concatenate([self._place_digits(a, self.digits),
                                   np.full((len(a), 1), -1)], axis=1)
        b_digits = np.concatenate([self._place_digits(b, self.digits),
                                   np.full((len(b), 1), -1)], axis=1)
        return {"place": np.broadcast_to(place, (len(a), self.n_outputs)),
                "carry": (a[:, None] % place) + (b[:, None] % place) >= place,
                "digit": ids[:, self.prompt_length:], "a_digit": a_digits, "b_digit": b_digits}

    def attention_targets(self) -> np.ndarray:
        # output k reads the digits of places k and k − 1 of both operands (the paper's mask);
        # a's place j sits at position d − 1 − j, b's at 2d − j
        d = self.digits
        mask = np.zeros((self.n_outputs, self.sequence_length), dtype=bool)
        for k in range(self.n_outputs):
            for j in (k, k - 1):
                if 0 <= j < d:
                    mask[k, d - 1 - j] = mask[k, 2 * d - j] = True
        return mask

    def decode(self, ids) -> str:
        return "".join(SYMBOLS[int(i)] for i in ids)

    def _token_text(self, token: int) -> str:
        return SYMBOLS[int(token)]
