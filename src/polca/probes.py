"""Probe sets from files: plain text, JSONL or Parquet, with the researcher's own labels.

Every file becomes a list of *examples* (one per non-empty line of a ``.txt`` file, one per
JSONL line or Parquet row). An example has one of

* ``text``: a string, tokenised with the model's tokenizer;
* ``words``: a list of strings (pre-split words), tokenised word by word, so per-word labels
  follow every sub-word token of their word;
* ``input_ids``: a list of token ids, used as they are;

and optionally

* ``mask``: 0/1 per token (per word with ``words``): 1 marks a token whose loss is scored,
  i.e. predicted from the tokens before it. Default: every token but the first.
* per-token labels: any other list-valued field of the same length (tokens, or words);
* per-example labels: any scalar field (string, number, bool); copied to each of its tokens.

The result is the probe table pair of :meth:`polca.store.RunDir.write_probe`: ``sequences``
(sequence, input_ids, text, example, truncated_tokens, example labels) and ``tokens``, one row
per scored token in row-major order (token, sequence, position, target, text, context, labels).
``position`` is the position whose next-token prediction is scored: the scored token sits at
``position + 1``.

An example longer than the model's context (``context_length``) is an error unless
``truncate=True``; then it keeps its first ``context_length`` tokens and ``truncated_tokens``
counts the scored tokens it lost (:func:`truncated_token_count` sums them). Files must be
UTF-8; an undecodable byte is an error naming the file, line and byte offset.

Example:
    >>> examples = [{"input_ids": [5, 6, 7, 8], "mask": [0, 0, 1, 1], "kind": "copy",
    ...              "role": ["a", "b", "c", "d"]}]
    >>> sequences, tokens = probe_tables(examples)
    >>> tokens[["position", "target", "kind", "role"]].values.tolist()
    [[1, 7, 'copy', 'c'], [2, 8, 'copy', 'd']]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

RESERVED = ("text", "words", "input_ids", "mask")
# columns probe_tables writes into the sequences table itself (an example field may not use them)
SEQUENCE_FIELDS = ("sequence", "example", "truncated_tokens")
SCALARS = (str, int, float, bool, np.integer, np.floating, np.bool_)


class ProbeFileError(ValueError):
    """A probe file or example is malformed; the message names the file, line and fix."""


def read_examples(path: str | os.PathLike) -> list[dict]:
    """Examples of a ``.txt`` (one per non-empty line), ``.jsonl`` or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise ProbeFileError(f"probe file {path} does not exist")
    if path.suffix == ".txt":
        return [{"text": line} for line in _utf8_text(path).splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".ndjson"):
        examples = []
        for number, line in enumerate(_utf8_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProbeFileError(f"{path}:{number} is not JSON ({err.msg}); each line must "
                                     'be one object such as {"text": "..."}') from None
            if not isinstance(example, dict):
                raise ProbeFileError(f"{path}:{number} is a JSON {type(example).__name__}, not an "
                                     'object; write {"text": ...} or {"input_ids": [...]}')
            examples.append(example)
        return examples
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
    raise ProbeFileError(f"{path}: unknown probe file type {path.suffix!r}; use .txt (one text "
                         "per line), .jsonl or .parquet")


def _utf8_text(path: Path) -> str:
    """The file's text; a byte sequence that is not UTF-8 is a :class:`ProbeFileError` naming
    the line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ProbeFileError(
            f"{path}: not UTF-8 text at byte offset {err.start} (line {line}, byte "
            f"{data[err.start:err.start + 1].hex()!r}); re-save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8") from None


def _plain(value):
    # parquet list columns come back as numpy arrays
    return value.tolist() if isinstance(value, np.ndarray) else value


class _Encoder:
    """One interface over a ``tokenizers.Tokenizer`` and a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.raw = hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size")

    def text(self, text: str) -> list[int]:
        if self.raw:
            return list(self.tokenizer.encode(text).ids)
        return list(self.tokenizer(text)["input_ids"])

    def words(self, words: Sequence[str]) -> tuple[list[int], list[int | None]]:
        if self.raw:
            encoding = self.tokenizer.encode(list(words), is_pretokenized=True)
            return list(encoding.ids), list(encoding.word_ids)
        encoding = self.tokenizer(list(words), is_split_into_words=True)
        return list(encoding["input_ids"]), list(encoding.word_ids())

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


def _tokenise(example: dict, encoder: _Encoder, where: str) -> tuple[list[int], dict, list]:
    """``(ids, per-token lists, mask)`` of one example, labels aligned with ``ids``."""
    given = [k for k in ("text", "words", "input_ids") if k in example]
    if len(given) != 1:
        raise ProbeFileError(f"{where}: an example needs exactly one of 'text', 'words', "
                             f"'input_ids'; it has {given or list(example)}")
    kind = given[0]
    if kind != "input_ids" and encoder.tokenizer is None:
        raise ProbeFileError(
            f"{where}: {kind!r} needs the model's tokenizer and none was given. Write the "
            'example as token ids instead, {"input_ids": [12, 7, 301], "mask": [0, 1, 1]} '
            "(mask optional, per-token labels as lists of the same length), or give the "
            "tokenizer where the caller takes one (tokenizer=...)")
    if kind == "text":
        if not isinstance(example["text"], str):
            raise ProbeFileError(f"{where}: 'text' must be a string")
        ids, word_ids = encoder.text(example["text"]), None
    elif kind == "words":
        ids, word_ids = encoder.words(example["words"])
    else:
        ids = example["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ProbeFileError(f"{where}: 'input_ids' must be a list of non-negative integers")
        word_ids = None
    units = len(example["words"]) if kind == "words" else len(ids)
    per_unit = {k: v for k, v in example.items() if k not in RESERVED and isinstance(v, list)}
    if "mask" in example:
        per_unit["mask"] = example["mask"]
    if kind == "text" and per_unit:
        raise ProbeFileError(f"{where}: per-token fields {sorted(per_unit)} need 'words' or "
                             "'input_ids' (a label per token of a raw text is ambiguous)")
    for name, values in per_unit.items():
        if not isinstance(values, list) or len(values) != units:
            raise ProbeFileError(
                f"{where}: field {name!r} has {len(values) if isinstance(values, list) else 1} "
                f"values for {units} {'words' if kind == 'words' else 'tokens'}; per-token "
                "fields need one value each"
            )
    if word_ids is not None:  # each sub-word token takes its word's value; special tokens none
        per_unit = {k: [None if w is None else v[w] for w in word_ids] for k, v in per_unit.items()}
    mask = per_unit.pop("mask", None)
    mask = [True] * len(ids) if mask is None else [bool(m) for m in mask]
    if mask:
        mask[0] = False  # the first token has no context to predict it from
    return ids, per_unit, mask


def probe_tables(
    examples: Sequence[dict],
    tokenizer=None,
    context_length: int | None = None,
    max_tokens: int | None = None,
    tokens_per_sequence: int | None = None,
    seed: int = 0,
    where: str = "probe set",
    truncate: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(sequences, tokens)`` probe tables of ``examples`` (see the module docstring).

    Args:
        tokenizer: the model's own tokenizer (``tokenizers.Tokenizer`` or a transformers
            tokenizer); needed for ``text``/``words`` examples and used to decode.
        context_length: the model's context; a longer example is an error unless ``truncate``.
        truncate: keep the first ``context_length`` tokens of a longer example and count the
            scored tokens it loses in ``sequences["truncated_tokens"]``; an example that loses
            all of them keeps its row (no tokens), so the count is never lost.
        max_tokens: stop once this many tokens are scored (the last sequence is cut short).
        tokens_per_sequence: score a seeded random subset of this many tokens per sequence.

    Example:
        >>> sequences, tokens = probe_tables([{"input_ids": [1, 2, 3, 4, 5]}],
        ...                                  context_length=3, truncate=True)
        >>> len(tokens), truncated_token_count(sequences)
        (2, 2)
    """
    encoder = _Encoder(tokenizer)
    sequences, token_rows = [], []
    for row, example in enumerate(examples):
        if max_tokens is not None and len(token_rows) >= max_tokens:
            break
        label_where = f"{where}, example {row}"
        ids, per_token, mask = _tokenise(example, encoder, label_where)
        truncated = 0
        if context_length is not None and len(ids) > context_length:
            truncated = sum(mask[context_length:])
            if not truncate:
                raise ProbeFileError(
                    f"{label_where}: {len(ids)} tokens, longer than the context of "
                    f"{context_length} ({truncated} of its scored tokens lie beyond it). Shorten "
                    "the example, or allow truncation (truncate=True) to keep its first "
                    f"{context_length} tokens; the number of scored tokens dropped is recorded")
            ids, mask = ids[:context_length], mask[:context_length]
            per_token = {k: v[:context_length] for k, v in per_token.items()}
        scored = np.flatnonzero(mask)
        if tokens_per_sequence is not None and len(scored) > tokens_per_sequence:
            rng = np.random.default_rng([seed, row])
            scored = np.sort(rng.choice(scored, tokens_per_sequence, replace=False))
        if max_tokens is not None:
            scored = scored[: max_tokens - len(token_rows)]
        if len(scored) == 0 and not truncated:
            continue
        per_example = {k: v for k, v in example.items()
                       if k not in RESERVED and not isinstance(v, list)}
        bad = [k for k, v in per_example.items() if v is not None and not isinstance(v, SCALARS)]
        if bad:
            raise ProbeFileError(f"{label_where}: fields {bad} are neither scalars nor per-token "
                                 "lists; labels must be strings, numbers or booleans")
        clash = sorted(set(per_example) & set(SEQUENCE_FIELDS))
        if clash:
            raise ProbeFileError(f"{label_where}: field names {clash} are reserved for polca's "
                                 "sequence table; rename them")
        sequence = len(sequences)
        sequences.append({"sequence": sequence, "input_ids": list(ids),
                          "text": encoder.decode(ids), "example": row,
                          "truncated_tokens": truncated, **per_example})
        for index in scored.tolist():
            token_rows.append({
                "sequence": sequence, "position": index - 1, "target": ids[index],
                "text": encoder.decode([ids[index]]), "context": encoder.decode(ids[:index]),
                **per_example, **{k: v[index] for k, v in per_token.items()},
            })
    if not token_rows:
        raise ProbeFileError(f"{where}: no scored token (empty file, or every mask is 0)")
    tokens = pd.DataFrame(token_rows)
    tokens.insert(0, "token", np.arange(len(tokens)))
    return pd.DataFrame(sequences), tokens


def truncated_token_count(sequences: pd.DataFrame) -> int:
    """Scored tokens dropped by truncation to the context (0 for tables without the column)."""
    if "truncated_tokens" not in sequences.columns:
        return 0
    return int(sequences["truncated_tokens"].sum())


def probe_set_from_file(path: str | os.PathLike, tokenizer=None, **options):
    """:func:`probe_tables` of the examples in ``path`` (see :func:`read_examples`).

    Example:
        >>> sequences, tokens = probe_set_from_file("probe.jsonl", tokenizer,  # doctest: +SKIP
        ...                                         context_length=128, max_tokens=5000)
        >>> RunDir("runs/mine").write_probe(sequences, tokens)                # doctest: +SKIP
    """
    return probe_tables(read_examples(path), tokenizer, where=str(path), **options)
