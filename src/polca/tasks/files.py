"""A task of your own design from two JSONL files of token sequences (registry kind "jsonl").

Each line is ``{"input_ids": [...], "mask": [0/1 per token], <labels>}``: ``mask`` marks the
tokens whose loss is scored (default: all but the first); any list-valued field of the same
length is a per-token label, any scalar field a per-example label (see :mod:`polca.probes`).
With ``tokenizer`` (a ``tokenizer.json``) lines may give ``text`` or ``words`` instead of
``input_ids``; the vocabulary is then the tokenizer's and tokens decode through it.
Training draws sequences from the train file; the probe set is the probe file, with its labels
carried into the token table, so clusters can be scored against your own skill labels.

Config::

    [task]
    kind = "jsonl"
    options = { train = "data/train.jsonl", probe = "data/probe.jsonl",
                vocab = ["0", "1", "+", "="] }   # optional: vocab_size, sequence_length,
                                                  # tokenizer = "tokenizer.json"

Relative paths are taken from the current directory. Training and probe files should not
share sequences (the probe set is held out); this is the researcher's responsibility.

Example:
    >>> task = FileTask("train.jsonl", "probe.jsonl")             # doctest: +SKIP
    >>> task.train_batch(0, 8).input_ids.shape                    # doctest: +SKIP
    torch.Size([8, 12])
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from polca.functional import ProbeBatch
from polca.probes import ProbeFileError, probe_tables, read_examples
from polca.tasks.base import TOKEN_FIELDS
from polca.tasks.probe_file import load_tokenizer, tokenizer_size

OPTIONS = ("train", "probe", "vocab_size", "sequence_length", "vocab", "tokenizer")


class FileTask:
    name = "jsonl"

    def __init__(
        self,
        train: str | os.PathLike,
        probe: str | os.PathLike,
        vocab_size: int | None = None,
        sequence_length: int | None = None,
        vocab: Sequence[str] | None = None,
        seed: int = 0,
        tokenizer=None,
    ):
        self.seed = seed
        self.vocab = list(vocab) if vocab is not None else None
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer is not None and self.vocab is not None:
            raise ProbeFileError("task kind 'jsonl': give options.vocab or options.tokenizer, "
                                 "not both (the tokenizer decodes the tokens)")
        self.train_sequences, self.train_tokens = self._tables(train)
        self.probe_sequences, self.probe_tokens = self._tables(probe)
        lengths = [len(ids) for frame in (self.train_sequences, self.probe_sequences)
                   for ids in frame["input_ids"]]
        largest = max(max(ids) for frame in (self.train_sequences, self.probe_sequences)
                      for ids in frame["input_ids"])
        self.sequence_length = sequence_length or max(lengths)
        if max(lengths) > self.sequence_length:
            raise ProbeFileError(f"a sequence has {max(lengths)} tokens, more than "
                                 f"sequence_length={self.sequence_length}")
        default_vocab = (len(self.vocab) if self.vocab is not None
                         else tokenizer_size(self.tokenizer) or largest + 1)
        self.vocab_size = vocab_size or default_vocab
        if largest >= self.vocab_size:
            raise ProbeFileError(f"token id {largest} is outside the vocabulary of "
                                 f"{self.vocab_size} (set options.vocab_size or options.vocab)")
        self.label_columns = tuple(c for c in self.probe_tokens.columns if c not in TOKEN_FIELDS)
        self.probe_tokens = self.probe_tokens.assign(
            text=[self.decode([t]) for t in self.probe_tokens["target"]],
            context=[self.decode(self.probe_sequences["input_ids"].iloc[s][: p + 1])
                     for s, p in zip(self.probe_tokens["sequence"], self.probe_tokens["position"])])
        self.probe_sequences = self.probe_sequences.assign(
            text=[self.decode(ids) for ids in self.probe_sequences["input_ids"]])
        self._train = ProbeBatch.from_tables(self.train_sequences, self.train_tokens)

    @classmethod
    def from_config(cls, cfg, root=None) -> FileTask:
        options = dict(cfg.task.options)
        missing = [k for k in ("train", "probe") if k not in options]
        if missing:
            raise ProbeFileError(f"task kind 'jsonl' needs task.options {missing}: paths of the "
                                 "training and probe JSONL files")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ProbeFileError(f"unknown task.options {sorted(unknown)} for kind 'jsonl' "
                                 f"(known: {list(OPTIONS)})")
        return cls(seed=cfg.seed, **options)

    def _tables(self, path):
        examples = read_examples(path)
        if self.tokenizer is None:
            for row, example in enumerate(examples):
                kind = next((k for k in ("text", "words") if k in example), None)
                if kind is not None:
                    raise ProbeFileError(
                        f"{path}, example {row}: {kind!r} needs a tokenizer; set task.options."
                        'tokenizer = "tokenizer.json" (the model\'s tokenizer), or write the '
                        'example as token ids: {"input_ids": [12, 7, 301], "mask": [0, 1, 1]}')
        return probe_tables(examples, self.tokenizer, where=str(path))

    # -- Task protocol -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        rows = np.random.default_rng([self.seed, 1, step]).integers(0, len(self._train),
                                                                     batch_size)
        return self._train[torch.as_tensor(rows)]

    def basis_sample(self, n: int) -> ProbeBatch:
        rng = np.random.default_rng([self.seed, 2])
        rows = rng.choice(len(self._train), size=n, replace=n > len(self._train))
        return self._train[torch.as_tensor(rows)]

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.probe_sequences.copy(), self.probe_tokens.copy()

    def decode(self, ids) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode([int(i) for i in ids])
        if self.vocab is None:
            return " ".join(str(int(i)) for i in ids)
        return "".join(self.vocab[int(i)] for i in ids)
