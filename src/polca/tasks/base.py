"""What a task gives polca: training batches, a probe set with labels, and a basis sample.

A task is deterministic in its seed: ``train_batch(step, n)`` returns the same batch for the same
``(seed, step)``, so an interrupted training resumes exactly.
"""

from __future__ import annotations

from typing import Protocol

import pandas as pd

from polca.functional import ProbeBatch


class Task(Protocol):
    name: str
    vocab_size: int
    sequence_length: int
    label_columns: tuple[str, ...]

    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        """Training sequences for one optimiser step; the training loss is the mean scored loss."""

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(sequences, tokens)`` tables: sequences (sequence, input_ids, …) and one row per
        scored token (token, sequence, position, target, text, labels…)."""

    def basis_sample(self, n: int) -> ProbeBatch:
        """``n`` training sequences (never probe sequences) for the Hessian of Algorithm 1."""

    def decode(self, ids) -> str:
        """Readable text of token ids."""
