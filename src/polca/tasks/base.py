"""What a task gives polca: data and labels — a probe set, a basis sample, training batches.

A task never says where the model or its checkpoints come from (that is the run source,
:mod:`polca.sources`). Every task has a probe set with labels and a basis sample; a task that
polca can train on (:class:`TrainingTask`) also draws training batches. A task is deterministic
in its seed: ``train_batch(step, n)`` returns the same batch for the same ``(seed, step)``, so an
interrupted training resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import pandas as pd

from polca.functional import ProbeBatch

# Token-table columns that describe a token and are never ground-truth labels.
TOKEN_FIELDS = ("token", "sequence", "position", "target", "text", "context", "example",
                "document", "char_start", "char_end")
MAX_LABEL_VALUES = 100  # a column with more distinct values is not a label (without a list)


def label_columns(tokens: pd.DataFrame, declared: Sequence[str] | None = None) -> list[str]:
    """The token-table columns that are ground-truth labels: ``declared`` (the task's list,
    recorded with the probe set) where present, else every column outside
    :data:`TOKEN_FIELDS` that is bool, integer or string with 2..100 distinct values.

    >>> tokens = pd.DataFrame({"token": [0, 1, 2], "text": ["a", "b", "c"],
    ...                        "carry": [True, False, True], "id": [7, 8, 9]})
    >>> label_columns(tokens), label_columns(tokens, declared=["carry"])
    (['carry', 'id'], ['carry'])
    """
    if declared is not None:
        return [c for c in declared if c in tokens.columns]
    return [c for c in tokens.columns if c not in TOKEN_FIELDS
            and (tokens[c].dtype == bool or pd.api.types.is_integer_dtype(tokens[c])
                 or pd.api.types.is_string_dtype(tokens[c]))
            and 2 <= tokens[c].nunique() <= MAX_LABEL_VALUES]


@runtime_checkable
class Task(Protocol):
    name: str
    vocab_size: int
    sequence_length: int
    label_columns: tuple[str, ...]

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(sequences, tokens)`` tables: sequences (sequence, input_ids, …) and one row per
        scored token (token, sequence, position, target, text, labels…)."""

    def basis_sample(self, n: int) -> ProbeBatch:
        """``n`` sequences for the Hessian of Algorithm 1: training sequences (never probe
        sequences) where the task has them; a probe-file task without a training sample uses
        its probe sequences and says so in ``sample_source``."""

    def decode(self, ids) -> str:
        """Readable text of token ids."""


@runtime_checkable
class TrainingTask(Task, Protocol):
    """A task polca trains the built-in model on."""

    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        """Training sequences for one optimiser step; the training loss is the mean scored loss."""
