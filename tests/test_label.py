"""POS labels: alignment of model tokens to spaCy tokens, 4-grams, cluster patterns, medoids."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from polca.label import (
    PAD,
    SEPARATOR_TAG,
    SPACE,
    align_tags,
    cluster_labels,
    context_ngrams,
    cover_set,
    is_simple,
    pos_pattern,
)

HAS_SPACY = importlib.util.find_spec("spacy") is not None
needs_spacy = pytest.mark.skipif(not HAS_SPACY, reason="spaCy is not installed")


def spacy_table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["document", "start", "end", "pos"])


# -- alignment rule on hand-made spans --------------------------------------------------------
def test_alignment_takes_the_spacy_token_of_the_first_non_space_character():
    text = "Zoë's café,  ok.\n\nNew"
    # what spaCy makes of it (hand-written): the second space of "  " is its own SPACE token
    tagged = spacy_table([
        (0, 0, 3, "PROPN"), (0, 3, 5, "PART"), (0, 6, 10, "NOUN"), (0, 10, 11, "PUNCT"),
        (0, 12, 13, "SPACE"), (0, 13, 15, "INTJ"), (0, 15, 16, "PUNCT"), (0, 16, 18, "SPACE"),
        (0, 18, 21, "PROPN"), (1, 0, 2, "INTJ"),
    ])
    spans = [  # (document, start, end, expected tag, why)
        (0, 0, 2, "PROPN", "'Zo' is a piece of 'Zoë'"),
        (0, 2, 3, "PROPN", "first byte of 'ë'"),
        (0, 2, 3, "PROPN", "second byte of 'ë'"),
        (0, 3, 5, "PART", "\"'s\""),
        (0, 5, 9, "NOUN", "' caf': leading space skipped"),
        (0, 9, 11, "NOUN", "'é,' spans two spaCy tokens: the first wins"),
        (0, 11, 12, "SPACE", "whitespace only"),
        (0, 12, 15, "INTJ", "' ok' over spaCy's SPACE token: first non-space is 'o'"),
        (0, 15, 16, "PUNCT", "'.'"),
        (0, 16, 17, "SPACE", "newline"),
        (0, 17, 18, "SPACE", "newline"),
        (0, 18, 21, "PROPN", "'New'"),
        (-1, -1, -1, SEPARATOR_TAG, "document separator"),
        (1, 0, 2, "INTJ", "other document"),
    ]
    document, start, end, expected, _ = map(list, zip(*spans))
    tags = align_tags(np.array(document), np.array(start), np.array(end),
                      {0: text, 1: "Hi"}, tagged)
    assert tags.tolist() == expected


def test_alignment_with_tags_of_another_text_is_an_error():
    tagged = spacy_table([(0, 0, 2, "INTJ")])
    with pytest.raises(ValueError, match="different text"):
        align_tags(np.array([0]), np.array([3]), np.array([5]), {0: "Hi there"}, tagged)


def gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable characters map (byte-level BPE tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@needs_spacy
def test_alignment_of_real_bpe_tokens_matches_a_byte_level_oracle():
    pytest.importorskip("tokenizers")
    from polca.label import load_pipeline, tag_documents
    from polca.tasks.text import train_tokenizer

    texts = [("Zoë's café, in Tōkyō — opened (1901); “quoted” text...\n\nNew  paragraph: "
              "naïve!"),
             "Prices rose 3.5% in São Paulo, 日本 said.\tTabs and   spaces end here."]
    tokenizer = train_tokenizer(["The café opened in 1901, in the city. " * 4, *texts[:1]], 290)
    nlp = load_pipeline()
    tagged = tag_documents(texts, nlp)
    docs = list(nlp.pipe(texts))
    for d, doc in enumerate(docs):
        assert all(texts[d][t.idx : t.idx + len(t.text)] == t.text for t in doc)
    decoder = gpt2_byte_decoder()
    for d, text in enumerate(texts):
        encoding = tokenizer.encode(text, add_special_tokens=False)
        start, end = np.array(encoding.offsets).T
        tags = align_tags(np.full(len(start), d), start, end, dict(enumerate(texts)), tagged)
        # oracle: byte ranges of the tokens from their vocabulary strings, never the offsets
        char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
        position = 0
        for token, tag in zip(encoding.tokens, tags):
            n_bytes = len(token)  # one printable character per byte
            assert all(ch in decoder for ch in token)
            chars = sorted({char_of_byte[b] for b in range(position, position + n_bytes)})
            position += n_bytes
            visible = [c for c in chars if not text[c].isspace()]
            if not visible:
                assert tag == SPACE
                continue
            holder = [t for t in docs[d] if t.idx <= visible[0] < t.idx + len(t.text)]
            assert tag == holder[0].pos_
        assert position == len(text.encode("utf-8"))


# -- 4-grams and cover sets --------------------------------------------------------------------
def test_context_ngrams_match_a_loop():
    rng = np.random.default_rng(0)
    tags = rng.choice(["DET", "NOUN", "VERB", "ADP"], size=(3, 7)).astype(object)
    grams = context_ngrams(tags, n=4)
    for s in range(3):
        for j in range(7):
            expected = [tags[s, k] if k >= 0 else PAD for k in range(j - 3, j + 1)]
            assert grams[s, j].tolist() == expected


def test_cover_set_is_the_smallest_set_reaching_the_coverage():
    # 10 members: 5 DET, 2 PRON, 2 ADJ, 1 NOUN; 7 needed: DET, then ADJ (ties in name order)
    assert cover_set(["DET"] * 5 + ["PRON"] * 2 + ["ADJ"] * 2 + ["NOUN"]) == ["DET", "ADJ"]
    # exactly the coverage is enough
    assert cover_set(["A"] * 7 + ["B"] * 3) == ["A"]
    # ... also where coverage * members is inexact (0.28 * 25 is 7.000000000000001)
    assert cover_set(["A"] * 7 + ["B"] * 18, coverage=0.28) == ["B"]
    assert cover_set(["A"] * 7 + ["B"] * 6 + ["C"] * 6 + ["D"] * 6, coverage=0.28) == ["A"]
    # 3 members need ceil(2.1) = 3
    assert cover_set(["A", "B", "C"]) == ["A", "B", "C"]
    assert is_simple([[PAD, "DET", "NOUN"], ["DET"]]) and not is_simple([["A", "B", "C"]])


# -- planted clusters --------------------------------------------------------------------------
# positions on a line: the medoid of 11 points is their median, 15; by distance to it the
# members are 15, 10, 21, 6, 3, 28, 1, 0, 36, 45, 55 (distances 0 5 6 9 12 13 14 15 21 30 40)
LINE = [0, 1, 3, 6, 10, 15, 21, 28, 36, 45, 55]
BY_DISTANCE = [15, 10, 21, 6, 3, 28, 1, 0, 36, 45]


def planted_tokens():
    grams = {
        0: ["DET ADJ NOUN PUNCT"] * 9 + ["PRON AUX VERB PUNCT"] * 2,
        # position 0: DET 4, PRON 3, ADP 2, NUM 2; position 3: NOUN 5, ADJ 3, VERB 3
        1: [f"{a} ADJ NOUN {b}" for a, b in zip(
            ["DET"] * 4 + ["PRON"] * 3 + ["ADP"] * 2 + ["NUM"] * 2,
            ["NOUN"] * 5 + ["ADJ"] * 3 + ["VERB"] * 3)],
        # position 0: PAD 5, DET 2, NOUN 2, PRON 2; position 1: PAD 3, DET 8
        2: [f"{a} {b} NOUN VERB" for a, b in zip(
            [PAD] * 5 + ["DET"] * 2 + ["NOUN"] * 2 + ["PRON"] * 2, [PAD] * 3 + ["DET"] * 8)],
    }
    targets = {0: [","] * 6 + ["."] * 3 + [";"] * 2, 1: [" the"] * 11,
               2: [" is"] * 7 + [" was"] * 4}
    rows = []
    for cluster in (0, 1, 2):
        for k in range(11):
            rows.append((cluster, grams[cluster][k], targets[cluster][k],
                         [LINE[k] + 1000.0 * cluster, 7.0 * cluster]))
    rows += [(-1, "X X X X", "?", [500.0, 500.0])] * 3
    order = np.random.default_rng(1).permutation(len(rows))  # interleave the clusters
    rows = [rows[i] for i in order]
    labels, grams, texts, points = map(list, zip(*rows))
    tokens = pd.DataFrame({"token": range(len(rows)), "text": texts, "pos_4gram": grams,
                           "context": [f"context of token {i}" for i in range(len(rows))]})
    return tokens, np.array(labels), np.array(points)


def test_cluster_labels_recover_the_planted_patterns_and_medoids():
    tokens, labels, points = planted_tokens()
    table = cluster_labels(tokens, labels, points).set_index("cluster")
    assert table.index.tolist() == [0, 1, 2]
    assert table.loc[0, "pattern"] == [["DET"], ["ADJ"], ["NOUN"], ["PUNCT"]]
    assert table.loc[0, "label"] == "[DET] [ADJ] [NOUN] [PUNCT]"
    assert table.loc[1, "pattern"] == [["DET", "PRON", "ADP"], ["ADJ"], ["NOUN"], ["NOUN", "ADJ"]]
    assert table.loc[2, "pattern"] == [[PAD, "DET", "NOUN"], ["DET"], ["NOUN"], ["VERB"]]
    assert table["simple"].tolist() == [True, False, True]
    assert table.loc[0, "top_targets"] == [",", ".", ";"]
    assert table.loc[0, "top_target_counts"] == [6, 3, 2]
    assert table.loc[2, "top_targets"] == [" is", " was"]
    assert (table["size"] == 11).all()
    for cluster in (0, 1, 2):
        examples = table.loc[cluster, "examples"]
        assert [points[i, 0] - 1000 * cluster for i in examples] == BY_DISTANCE
        assert table.loc[cluster, "medoid"] == examples[0]
        assert table.loc[cluster, "example_contexts"] == [f"context of token {i}"
                                                          for i in examples]
    assert pos_pattern(tokens["pos_4gram"][labels == 0].tolist()) == table.loc[0, "pattern"]


def test_cluster_labels_reject_mismatched_inputs():
    tokens, labels, points = planted_tokens()
    with pytest.raises(ValueError, match="pos_tags"):
        cluster_labels(tokens.drop(columns="pos_4gram"), labels, points)
    with pytest.raises(ValueError, match="same tokens"):
        cluster_labels(tokens, labels[:-1], points)


# -- the text task's POS columns -----------------------------------------------------------------
@needs_spacy
def test_probe_table_pos_grams_are_consistent_with_the_token_tags():
    pytest.importorskip("tokenizers")
    from polca.tasks.text import TextTask

    docs = [f"The {w} crossed the river, and Zoë's café opened in {1900 + i}. It rained."
            for i, w in enumerate(["farmer", "old man", "council", "child"] * 10)]
    task = TextTask(docs, vocab_size=300, context_length=12, probe_tokens=60, held_out=0.3)
    _, tokens = task.probe_set()
    grams = tokens["pos_4gram"].str.split(" ")
    assert (grams.str[-1] == tokens["pos"]).all()
    assert (tokens.loc[tokens["document"] < 0, "pos"] == SEPARATOR_TAG).all()
    first = tokens["position"] == 0
    assert (grams[first].str[0] == PAD).all() and (grams[first].str[1] == PAD).all()
    # within a window each gram is the previous one shifted; the first input of window s is
    # the last target of window s - 1 (windows are consecutive)
    previous = tokens["pos"].shift(1)
    assert (grams.str[-2][tokens.index > 0] == previous[tokens.index > 0]).all()
    later = tokens["position"] >= 3
    assert (grams.str[0][later] == tokens["pos"].shift(3)[later]).all()
    assert set(tokens["pos"]) <= {"DET", "NOUN", "PROPN", "VERB", "PUNCT", "CCONJ", "PART",
                                  "ADP", "NUM", "PRON", "ADJ", "ADV", "AUX", "X", "SPACE",
                                  SEPARATOR_TAG}
