"""A probe set from a file, for runs trained outside polca (registry kind "probe-file").

The task describes data and labels only: the probe file with its labels (:mod:`polca.probes`),
the tokenizer that encodes it, and optionally a file of training sequences for the Hessian.
The model and the checkpoints come from the run source (:mod:`polca.sources`), which also
supplies defaults for the tokenizer, the context length and the vocabulary size.

Config (paths relative to the current directory; ``polca analyze`` writes absolute ones)::

    [task]
    kind = "probe-file"

    [task.options]
    probe = "probe.jsonl"              # .txt, .jsonl or .parquet (see polca.probes)
    tokenizer = "tokenizer.json"       # default: the source's (an HF checkpoint's tokenizer.json)
    context_length = 128               # default: the source model's, else the longest example
    truncate = false                   # true: cut longer examples to the context, counted
    max_tokens = 5000                  # scored probe tokens (default: all)
    # tokens_per_sequence = 32         # scored tokens drawn per example (seeded)
    # basis_sample = "train.jsonl"     # training sequences for the Hessian (default: probe)

The Hessian sample. The paper builds the basis from the Hessian of the *training* loss (a
sample of training sequences), and the built-in tasks do so. A run trained elsewhere has no
training data polca knows of: give it with ``basis_sample`` (any probe-file format; its labels
are ignored). Without it the probe set itself is the sample (:attr:`ProbeFileTask.sample_source`
says which, and the basis stage records it) — the basis is then fitted to the very tokens it
decomposes, which is fine for exploring a run but not the paper's protocol.

Longer than the context. A probe example longer than ``context_length`` is an error naming it,
unless ``truncate = true``: then it keeps its first ``context_length`` tokens and
:attr:`ProbeFileTask.truncated_tokens` counts the scored tokens dropped (also per example in
the sequence table's ``truncated_tokens``). Basis-sample sequences are always cut to the
context (they only feed the Hessian; nothing is reported per token).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polca.config import ConfigError
from polca.functional import ProbeBatch
from polca.probes import ProbeFileError, probe_tables, read_examples, truncated_token_count
from polca.tasks.base import TOKEN_FIELDS


class ProbeFileOptions(BaseModel):
    """``task.options`` of kind "probe-file" (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    probe: str
    tokenizer: str | None = None
    context_length: int | None = Field(None, gt=1)
    max_tokens: int | None = Field(None, gt=0)
    truncate: bool = False
    tokens_per_sequence: int | None = Field(None, gt=0)
    basis_sample: str | None = None


def parse_options(options: dict) -> ProbeFileOptions:
    try:
        return ProbeFileOptions.model_validate(options)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"  task.options.{key}: unknown option; remove it or fix its spelling")
            else:
                lines.append(f"  task.options.{key}: {e['msg']}")
        raise ConfigError("task kind 'probe-file' has bad options:\n" + "\n".join(lines)) from None


class ProbeFileTask:
    """Probe set, labels and Hessian sample of a run trained elsewhere.

    Args:
        probe: probe file (``.txt``/``.jsonl``/``.parquet``).
        tokenizer: a tokenizer object, or a ``tokenizer.json`` path (None: ids in the file).
        basis_sample: a file of training sequences for the Hessian (None: the probe set).
        truncate: cut probe examples longer than ``context_length`` (counted in
            :attr:`truncated_tokens`) instead of stopping with an error.
        vocab_size: the model's vocabulary (default: the tokenizer's, else the largest id + 1).

    Example:
        >>> task = ProbeFileTask("probe.jsonl", tokenizer="tokenizer.json")   # doctest: +SKIP
        >>> sequences, tokens = task.probe_set()                              # doctest: +SKIP
    """

    name = "probe-file"

    def __init__(self, probe: str | os.PathLike, tokenizer=None, *,
                 context_length: int | None = None, max_tokens: int | None = None,
                 tokens_per_sequence: int | None = None,
                 basis_sample: str | os.PathLike | None = None,
                 vocab_size: int | None = None, seed: int = 0, truncate: bool = False):
        self.tokenizer, self.seed = load_tokenizer(tokenizer), seed
        self.sequences, self.tokens = probe_tables(
            read_examples(probe), self.tokenizer, context_length=context_length,
            max_tokens=max_tokens, tokens_per_sequence=tokens_per_sequence, seed=seed,
            where=str(probe), truncate=truncate)
        self.truncated_tokens = truncated_token_count(self.sequences)
        self.sample = None
        self.sample_source = "probe"
        if basis_sample is not None:
            self.sample = ProbeBatch.from_tables(*probe_tables(
                read_examples(basis_sample), self.tokenizer, context_length=context_length,
                where=str(basis_sample), truncate=True))
            self.sample_source = str(basis_sample)
        self.sequence_length = max(len(ids) for ids in self.sequences["input_ids"])
        largest = max(max(ids) for ids in self.sequences["input_ids"])
        self.vocab_size = vocab_size or tokenizer_size(self.tokenizer) or largest + 1
        if largest >= self.vocab_size:
            raise ProbeFileError(f"{probe}: token id {largest} is outside the model's vocabulary "
                                 f"of {self.vocab_size}; tokenise with the model's own tokenizer")
        self.label_columns = tuple(c for c in self.tokens.columns if c not in TOKEN_FIELDS)

    @classmethod
    def from_config(cls, cfg, root=None, hints: dict | None = None) -> ProbeFileTask:
        """From ``task.options``; ``hints`` (tokenizer, context_length, vocab_size) are the
        run source's defaults for what the options leave out."""
        o = parse_options(cfg.task.options)
        hints = hints or {}
        return cls(o.probe, o.tokenizer or hints.get("tokenizer"),
                   context_length=o.context_length or hints.get("context_length"),
                   max_tokens=o.max_tokens, tokens_per_sequence=o.tokens_per_sequence,
                   basis_sample=o.basis_sample, vocab_size=hints.get("vocab_size"),
                   seed=cfg.seed, truncate=o.truncate)

    # -- Task protocol -------------------------------------------------------------------------
    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.sequences.copy(), self.tokens.copy()

    @cached_property
    def probe(self) -> ProbeBatch:
        return ProbeBatch.from_tables(self.sequences, self.tokens)

    def basis_sample(self, n: int) -> ProbeBatch:
        """``n`` sequences of ``basis_sample`` (seeded; all of them if fewer), else of the
        probe set (see :attr:`sample_source`)."""
        pool = self.sample if self.sample is not None else self.probe
        if n >= len(pool):
            return pool
        rows = np.sort(np.random.default_rng([self.seed, 2]).choice(len(pool), n, replace=False))
        return pool[torch.as_tensor(rows)]

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


def load_tokenizer(tokenizer):
    """A tokenizer object from a ``tokenizer.json`` path (or a folder holding one); objects
    (``tokenizers.Tokenizer``, transformers tokenizers) pass through."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} does not exist; give the model's "
                          "tokenizer.json")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise ConfigError(f"{path} is not a tokenizers tokenizer.json ({err})") from None


def tokenizer_size(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "get_vocab_size"):
        return tokenizer.get_vocab_size()
    return len(tokenizer)
