"""A researcher's own task from JSONL files: batches, probe labels, and a short end-to-end run."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from polca.config import parse_config
from polca.probes import ProbeFileError
from polca.stages.common import open_run
from polca.stages.train import run_train
from polca.stages.trajectories import run_trajectories
from polca.tasks import make_task

VOCAB = ["a", "b", "c", "d", "e", "|"]
SEP = 5


def copy_examples(rng: np.random.Generator, n: int) -> list[dict]:
    """``x1 x2 x3 | x1 x2 x3``: the copied tokens are scored, labelled by slot and repeat."""
    examples = []
    for _ in range(n):
        word = rng.integers(0, 5, 3).tolist()
        examples.append({
            "input_ids": word + [SEP] + word, "mask": [0, 0, 0, 0, 1, 1, 1],
            "slot": [None] * 4 + ["first", "second", "third"],
            "kind": "repeat" if len(set(word)) < 3 else "distinct",
        })
    return examples


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, n in (("train", 64), ("probe", 12)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("\n".join(json.dumps(e) for e in copy_examples(rng, n)))
    return paths


def config(files, **train):
    return parse_config({
        "name": "copy", "seed": 3,
        "task": {"kind": "jsonl", "options": {"train": str(files["train"]),
                                              "probe": str(files["probe"]), "vocab": VOCAB}},
        "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
        "train": {"steps": 40, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, **train},
        "checkpoints": {"steps": [0, 20, 40]},
    })


def test_task_reads_the_files(files):
    task = make_task(config(files))
    assert (task.vocab_size, task.sequence_length) == (6, 7)
    assert set(task.label_columns) == {"slot", "kind"}
    train = [json.loads(line) for line in files["train"].read_text().splitlines()]
    batch = task.train_batch(7, 10)
    assert torch.equal(batch.input_ids, task.train_batch(7, 10).input_ids)  # same (seed, step)
    for ids, scored, targets in zip(batch.input_ids, batch.scored, batch.targets):
        matches = [e for e in train if e["input_ids"] == ids.tolist()]
        assert matches, "every training row is a line of the train file"
        # the mask marks scored tokens; the batch scores the positions that predict them
        assert scored.tolist() == matches[0]["mask"][1:] + [0]
        assert targets[scored].tolist() == ids[1:][scored[:-1]].tolist()


def test_probe_set_carries_the_labels(files):
    task = make_task(config(files))
    sequences, tokens = task.probe_set()
    probe = [json.loads(line) for line in files["probe"].read_text().splitlines()]
    expected = [(s, i - 1, e["input_ids"][i], e["slot"][i], e["kind"])
                for s, e in enumerate(probe) for i in range(len(e["mask"])) if e["mask"][i]]
    got = [tuple(r) for r in tokens[["sequence", "position", "target", "slot", "kind"]]
           .itertuples(index=False)]
    assert got == expected
    assert tokens["context"].iloc[0] == "".join(VOCAB[i] for i in probe[0]["input_ids"][:4])
    assert sequences["text"].iloc[0] == "".join(VOCAB[i] for i in probe[0]["input_ids"])


def test_train_and_exact_loss_trajectories(files, tmp_path):
    ctx = open_run(tmp_path / "run", config(files))
    run_train(ctx, progress=False)
    run_trajectories(ctx, progress=False)
    loss = ctx.run.arrays().read("loss")  # [token, checkpoint]
    assert loss.shape == (36, 3)
    # oracle: the last checkpoint's loss of each probe token, from the model run on the prefix
    ctx.model.load_state_dict(ctx.checkpoints.load(40))
    ctx.model.double()
    tokens, ids = ctx.tokens, ctx.probe.input_ids
    expected = [F.cross_entropy(ctx.model(ids[s : s + 1, : p + 1])[0, -1], torch.tensor(t)).item()
                for s, p, t in zip(tokens["sequence"], tokens["position"], tokens["target"])]
    np.testing.assert_allclose(loss[:, 2], expected, rtol=1e-6)
    assert loss[:, 2].mean() < loss[:, 0].mean() - 0.2  # copying is learnable in 40 steps


@pytest.mark.parametrize("options, message", [
    ({"train": "x.jsonl"}, r"needs task.options \['probe'\]"),
    ({"vocab_size": 3}, "token id 5 is outside the vocabulary of 3"),
    ({"colour": 1}, "unknown task.options"),
])
def test_bad_options_stop_with_a_clear_message(files, tmp_path, options, message):
    base = {"train": str(files["train"]), "probe": str(files["probe"])}
    if "train" in options:
        base = options
    else:
        base.update(options)
    cfg = parse_config({"name": "x", "task": {"kind": "jsonl", "options": base}})
    with pytest.raises(ProbeFileError, match=message):
        make_task(cfg, tmp_path)


def word_files(tmp_path):
    """The copy task written as words (needs a tokenizer) and a word-level tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate([*VOCAB, "[UNK]"])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    paths = {"tokenizer": tmp_path / "tokenizer.json"}
    rng = np.random.default_rng(1)
    for name, n in (("train", 16), ("probe", 4)):
        rows = [{"text": " ".join(VOCAB[i] for i in e["input_ids"]), "kind": e["kind"]}
                for e in copy_examples(rng, n)]
        paths[name] = tmp_path / f"{name}-words.jsonl"
        paths[name].write_text("\n".join(json.dumps(r) for r in rows))
    return paths


def test_text_lines_need_the_tokenizer_option(tmp_path):
    paths = word_files(tmp_path)
    options = {"train": str(paths["train"]), "probe": str(paths["probe"])}
    cfg = parse_config({"name": "x", "task": {"kind": "jsonl", "options": options}})
    with pytest.raises(ProbeFileError, match=r"'text' needs a tokenizer; set task.options."
                                             r"tokenizer = \"tokenizer.json\""):
        make_task(cfg, tmp_path)
    cfg = parse_config({"name": "x", "task": {"kind": "jsonl", "options": {
        **options, "tokenizer": str(paths["tokenizer"])}}})
    task = make_task(cfg, tmp_path)
    sequences, tokens = task.probe_set()
    probe = [json.loads(line) for line in paths["probe"].read_text().splitlines()]
    # oracle: the words' own positions in the tokenizer's vocabulary
    assert [list(ids) for ids in sequences["input_ids"]] == [
        [VOCAB.index(w) for w in row["text"].split()] for row in probe]
    assert task.vocab_size == len(VOCAB) + 1  # the tokenizer's, [UNK] included
    assert tokens["text"].iloc[0] == probe[0]["text"].split()[1]  # decoded by the tokenizer
