"""Probe sets from text, JSONL and Parquet files, checked against hand-built tables."""

import json

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from polca.functional import ModuleTokenLoss
from polca.models.decoder import Decoder, DecoderConfig
from polca.probes import (
    ProbeFileError,
    probe_set_from_file,
    probe_tables,
    read_examples,
    truncated_token_count,
)
from polca.store import RunDir

tokenizers = pytest.importorskip("tokenizers")
Tokenizer, models, pre_tokenizers = tokenizers.Tokenizer, tokenizers.models, tokenizers.pre_tokenizers

WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def word_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_text_file_scores_every_next_token(tmp_path):
    lines = ["the cat sat on the mat", "a dog ran"]
    (tmp_path / "probe.txt").write_text("\n".join(lines) + "\n\n")
    sequences, tokens = probe_set_from_file(tmp_path / "probe.txt", word_tokenizer())

    expected = []
    for s, line in enumerate(lines):
        words = line.split()
        for i in range(1, len(words)):
            expected.append((s, i - 1, WORDS.index(words[i]), words[i], " ".join(words[:i])))
    got = tokens[["sequence", "position", "target", "text", "context"]]
    assert [tuple(r) for r in got.itertuples(index=False)] == expected
    assert tokens["token"].tolist() == list(range(len(expected)))
    assert sequences["input_ids"].tolist() == [[WORDS.index(w) for w in ln.split()] for ln in lines]


def test_jsonl_masks_and_labels_reach_the_probe_batch(tmp_path):
    examples = [
        {"input_ids": [1, 2, 3, 4, 5], "mask": [0, 0, 1, 0, 1], "role": list("abcde"),
         "skill": "copy"},
        {"input_ids": [6, 7, 8], "role": list("xyz"), "skill": "count", "hard": True},
    ]
    path = tmp_path / "probe.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in examples))
    sequences, tokens = probe_set_from_file(path)
    run = RunDir(tmp_path / "run")
    run.write_probe(sequences, tokens)
    batch, stored = run.read_probe()

    # oracle: walk the examples and list every scored (row, token index)
    expected = []
    for s, example in enumerate(examples):
        mask = example.get("mask", [0] + [1] * (len(example["input_ids"]) - 1))
        for i, keep in enumerate(mask):
            if keep and i > 0:
                expected.append((s, i - 1, example["input_ids"][i], example["role"][i],
                                 example["skill"], example.get("hard")))
    got = [(r.sequence, r.position, r.target, r.role, r.skill,
            None if pd.isna(r.hard) else r.hard) for r in stored.itertuples()]
    assert got == expected
    rows, cols = batch.scored.nonzero(as_tuple=True)
    assert list(zip(rows.tolist(), cols.tolist())) == [(s, p) for s, p, *_ in expected]
    assert batch.targets[batch.scored].tolist() == [t for _, _, t, *_ in expected]


def test_parquet_gives_the_same_tables_as_jsonl(tmp_path):
    examples = [{"input_ids": [1, 2, 3], "mask": [0, 1, 1], "kind": "a"},
                {"input_ids": [4, 5, 6, 7], "mask": [0, 1, 0, 1], "kind": "b"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(e) for e in examples))
    pd.DataFrame(examples).to_parquet(tmp_path / "p.parquet")
    from_jsonl = probe_set_from_file(tmp_path / "p.jsonl")
    from_parquet = probe_set_from_file(tmp_path / "p.parquet")
    for a, b in zip(from_jsonl, from_parquet):
        pd.testing.assert_frame_equal(a, b)


def test_word_labels_follow_every_sub_word_token():
    vocab = {"[UNK]": 0, "un": 1, "##happy": 2, "cat": 3, "sat": 4}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    examples = [{"words": ["cat", "unhappy", "sat"], "pos": ["NOUN", "ADJ", "VERB"]}]
    _, tokens = probe_tables(examples, tokenizer)
    # ids: cat un ##happy sat; every token but the first is scored
    assert tokens["target"].tolist() == [1, 2, 4]
    assert tokens["pos"].tolist() == ["ADJ", "ADJ", "VERB"]


def test_context_length_budget_and_sampling():
    examples = [{"input_ids": list(range(1, 11))} for _ in range(4)]
    sequences, tokens = probe_tables(examples, context_length=6, truncate=True)
    assert tokens["position"].max() == 4 and len(tokens) == 4 * 5
    assert sequences["truncated_tokens"].tolist() == [4] * 4
    _, tokens = probe_tables(examples, max_tokens=12)
    assert len(tokens) == 12 and tokens["sequence"].tolist() == [0] * 9 + [1] * 3
    _, tokens = probe_tables(examples, tokens_per_sequence=3, seed=5)
    assert tokens.groupby("sequence").size().tolist() == [3, 3, 3, 3]
    assert tokens.groupby("sequence")["position"].apply(lambda p: p.is_monotonic_increasing).all()


def test_probe_losses_score_the_token_after_position(tmp_path):
    """Each scored token's loss is −log p(target | input_ids[:position + 1]), computed here
    by running the model on that prefix alone."""
    (tmp_path / "probe.txt").write_text("the cat sat on the mat\na dog ran on a mat\n")
    sequences, tokens = probe_set_from_file(tmp_path / "probe.txt", word_tokenizer())
    run = RunDir(tmp_path / "run")
    run.write_probe(sequences, tokens)
    batch, stored = run.read_probe()
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=len(WORDS), context_length=8, d_model=8,
                                  n_heads=2)).double()
    loss = ModuleTokenLoss(model)
    got = loss(loss.space.flatten(dict(model.named_parameters())), batch)
    expected = []
    for row in stored.itertuples():
        prefix = torch.tensor([sequences["input_ids"][row.sequence][: row.position + 1]])
        expected.append(F.cross_entropy(model(prefix)[0, -1], torch.tensor(row.target)))
    torch.testing.assert_close(got, torch.stack(expected))


def test_longer_than_context_is_an_error_or_a_counted_truncation():
    examples = [
        {"input_ids": list(range(1, 5))},                                # fits: 3 scored
        {"input_ids": list(range(1, 10)), "mask": [0, 1, 0, 1, 1, 0, 1, 1, 1]},
        {"input_ids": list(range(1, 8)), "mask": [0, 0, 0, 0, 0, 1, 1]},  # all scored cut
    ]
    with pytest.raises(ProbeFileError, match=r"example 1: 9 tokens, longer than the context of 5 "
                                             r"\(3 of its scored tokens lie beyond it\)"):
        probe_tables(examples, context_length=5)
    sequences, tokens = probe_tables(examples, context_length=5, truncate=True)
    # brute force: the scored (mask 1, not first) tokens at index >= 5 of each example
    def scored(e):
        mask = e.get("mask", [1] * len(e["input_ids"]))
        return [i for i, m in enumerate(mask) if m and i > 0]
    expected_cut = [sum(i >= 5 for i in scored(e)) for e in examples]
    assert expected_cut == [0, 3, 2]
    assert sequences["truncated_tokens"].tolist() == expected_cut
    assert truncated_token_count(sequences) == 5
    assert len(tokens) == sum(len(scored(e)) for e in examples) - 5
    assert sequences["input_ids"].map(len).tolist() == [4, 5, 5]
    assert tokens["sequence"].tolist() == [0, 0, 0, 1, 1, 1]  # sequence 2 kept, no tokens
    assert truncated_token_count(pd.DataFrame({"sequence": [0]})) == 0


@pytest.mark.parametrize("suffix, lines", [
    (".txt", [b"the cat sat", b"a dog \xe9 ran"]),
    (".jsonl", [b'{"input_ids": [1, 2]}', b'{"input_ids": [1, 2], "who": "Andr\xe9"}']),
])
def test_non_utf8_file_names_the_byte_offset(tmp_path, suffix, lines):
    path = tmp_path / f"probe{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = len(lines[0]) + 1 + lines[1].index(b"\xe9")
    with pytest.raises(ProbeFileError, match=rf"probe\{suffix}: not UTF-8 text at byte offset "
                                             rf"{offset} \(line 2, byte 'e9'\)"):
        read_examples(path)


def test_text_without_tokenizer_says_how_to_give_input_ids():
    with pytest.raises(ProbeFileError, match=r'needs the model.s tokenizer.*\{"input_ids": '):
        probe_tables([{"text": "the cat"}])


def test_field_named_like_a_sequence_column_is_refused():
    with pytest.raises(ProbeFileError, match=r"\['truncated_tokens'\] are reserved"):
        probe_tables([{"input_ids": [1, 2, 3], "truncated_tokens": 5}])


@pytest.mark.parametrize("content, message", [
    ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n', r"p\.jsonl:2 is not JSON"),
    ('[1, 2, 3]\n', "not an object"),
    ('{"input_ids": [1, 2, 3], "role": ["a", "b"]}\n', "'role' has 2 values for 3 tokens"),
    ('{"input_ids": [1, -2]}\n', "non-negative integers"),
    ('{"input_ids": [1, 2], "mask": [0, 0]}\n', "no scored token"),
    ('{"input_ids": [1, 2], "meta": {"a": 1}}\n', "neither scalars nor per-token"),
])
def test_malformed_files_stop_with_a_clear_message(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ProbeFileError, match=message):
        probe_set_from_file(tmp_path / "p.jsonl")


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "probe.csv").write_text("text\nthe cat\n")
    with pytest.raises(ProbeFileError, match="unknown probe file type '.csv'"):
        read_examples(tmp_path / "probe.csv")
