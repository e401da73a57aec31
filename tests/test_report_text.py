"""The POS-labelled cluster section of a text run's report, on a planted run directory.

Planted: 3 groups of 40 probe tokens, each with its own POS 4-gram and its own exact-loss
curve (drop early, drop late, flat), and one basis vector whose first-order terms lower the
first two groups' loss (early, late) and raise the third's (so the token filter removes it).
The cluster stage itself clusters them; the labels, sizes and escaping are checked against the
planted groups.
"""

import html
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from polca.config import parse_config
from polca.label import has_pos
from polca.report.text import label_summary, labels_found, text_section
from polca.stages.cluster import run_cluster
from polca.stages.evaluate import pos_cluster_table
from polca.store import RunDir

STEPS = [0, 100, 200, 300, 400, 500]
PER_GROUP = 40
GRAMS = ["DET ADJ NOUN PUNCT", "PRON AUX VERB ADP", "PAD PAD NOUN VERB"]
TARGETS = [",", " to", " is"]
# contexts with markup in them: the page must show them as text
CONTEXTS = ["a <b>bold</b> & brave", "x < y > z", '"quoted" <script>alert(1)</script>']


def planted_run(root) -> RunDir:
    rng = np.random.default_rng(0)
    n = 3 * PER_GROUP
    group = np.repeat(np.arange(3), PER_GROUP)
    tokens = pd.DataFrame({
        "token": np.arange(n), "sequence": np.arange(n), "position": 0,
        "target": group, "text": [TARGETS[g] for g in group],
        "context": [f"{CONTEXTS[g]} #{i}" for i, g in enumerate(group)],
        "pos": [GRAMS[g].split()[-1] for g in group],
        "pos_4gram": [GRAMS[g] for g in group],
    })
    sequences = pd.DataFrame({"sequence": np.arange(n), "input_ids": [[1]] * n})
    run = RunDir(root)
    run.write_probe(sequences, tokens)
    # exact loss: group 0 drops at step 100, group 1 at step 400, group 2 stays
    curves = np.array([[5, 1, 1, 1, 1, 1], [5, 5, 5, 5, 1, 1], [5, 5, 5, 5, 5, 5]], float)
    loss = curves[group] + rng.normal(0, 0.01, (n, len(STEPS)))
    arrays = run.arrays()
    arrays.require("loss", loss.shape, loss.shape, ("token", "checkpoint"),
                   attrs={"steps": STEPS})
    arrays.write_block("loss", (slice(None), slice(None)), loss, key="all")
    # one vector: interval terms [1, intervals, tokens]
    terms = np.zeros((1, len(STEPS) - 1, n))
    terms[0, 0, group == 0] = -2.0
    terms[0, 3, group == 1] = -2.0
    terms[0, 2, group == 2] = 0.5
    terms += rng.normal(0, 0.01, terms.shape)
    for name, value in (("first", terms), ("second_exact", np.zeros_like(terms))):
        arrays.require(f"polca/hessian/{name}", value.shape, value.shape,
                       ("vector", "interval", "token"))
        arrays.write_block(f"polca/hessian/{name}", (slice(None),) * 3, value, key="all")
    cfg = parse_config({"name": "planted", "task": {"kind": "text"},
                        "cluster": {"trajectories": ["loss", "polca"]}})
    run_cluster(SimpleNamespace(run=run, cfg=cfg), progress=False)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return planted_run(tmp_path_factory.mktemp("text-run"))


def test_pos_cluster_table_labels_the_planted_groups(run):
    table = pos_cluster_table(run, examples=5)
    assert set(table["name"]) == {"loss", "polca-hessian"}
    for name, groups in (("loss", [0, 1, 2]), ("polca-hessian", [0, 1])):
        rows = table[table["name"] == name]
        # each planted group is one cluster, labelled by its own 4-gram, all members its own
        assert sorted(rows["label"]) == sorted(
            " ".join(f"[{t}]" for t in GRAMS[g].split()) for g in groups)
        assert (rows["size"] == PER_GROUP).all() and rows["simple"].all()
        for row in rows.itertuples():
            g = GRAMS.index(row.pattern)
            assert list(row.top_targets) == [TARGETS[g]]
            assert len(row.example_contexts) == 5
            assert all(c.startswith(CONTEXTS[g]) for c in row.example_contexts)
    polca = table[table["name"] == "polca-hessian"].set_index("pattern")
    assert polca.loc[GRAMS[0], "break_step"] < polca.loc[GRAMS[1], "break_step"]
    assert (polca["vector"] == 0).all()
    summary = label_summary(table).set_index("name")
    assert summary.loc["loss", "clusters"] == 3 and summary.loc["loss", "simple_fraction"] == 1
    found = labels_found(table).set_index("label")
    assert found.loc["[DET] [ADJ] [NOUN] [PUNCT]", "tokens"] == 2 * PER_GROUP
    assert found["coverage"].sum() == pytest.approx(1.0)


def test_text_section_shows_labels_and_escaped_contexts(run):
    assert "run `polca evaluate`" in text_section(run.root)  # no table saved yet
    page = text_section(run.root, pos_cluster_table(run, examples=5))
    assert "polca-hessian, vector 0" in page and "exact loss clusters" in page
    assert "[DET] [ADJ] [NOUN] [PUNCT]" in page and "[PRON] [AUX] [VERB] [ADP]" in page
    for context in CONTEXTS:
        assert html.escape(context, quote=True) in page
    assert "<script>" not in page and "<b>bold</b>" not in page
    # the section reads the table the evaluate stage saves
    table = pos_cluster_table(run, examples=5)
    table.loc[0, "label"] = "[SAVED] <&>"
    run.write_evaluation({}, table)
    try:
        assert "[SAVED] &lt;&amp;&gt;" in text_section(run.root)
    finally:
        shutil.rmtree(run.evaluation)


def test_text_section_is_empty_without_pos_columns(tmp_path, run):
    tokens = run.read_tokens().drop(columns=["pos", "pos_4gram"])
    plain = RunDir(tmp_path)
    plain.write_probe(run.read_sequences(), tokens)
    assert not has_pos(tokens)
    assert text_section(plain.root) == ""
    with pytest.raises(ValueError, match="pos_tags = true"):
        pos_cluster_table(plain)


@pytest.mark.slow
def test_text_pipeline_end_to_end_labels_clusters_in_the_report(tmp_path):
    """Every stage on a tiny corpus: the report has the POS section, the evaluation its table."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("spacy")
    from polca.api import run_stage
    from polca.stages.common import open_run

    sentences = ["The farmer sold the cows, and the village grew.",
                 "A council met in 1901 to discuss the river.",
                 "She wrote to her brother from Paris every week."]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(sentences[(i + k) % 3] for k in range(4))
                                  for i in range(60)), encoding="utf-8")
    cfg = parse_config({
        "name": "tiny-text",
        "task": {"kind": "text", "options": {
            "corpus": "files", "paths": [str(corpus)], "vocab_size": 300,
            "context_length": 16, "probe_tokens": 240, "held_out": 0.2}},
        "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32},
        "train": {"steps": 60, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0},
        "checkpoints": {"every": 10},
        "basis": {"kinds": ["hessian"], "every": 30, "sample_size": 8},
        "decompose": {"lca": False, "integrated": False, "fisher": False},
        "cluster": {"trajectories": ["loss", "polca"], "min_cluster_size": 8,
                    "min_samples": 3},
    })
    ctx = open_run(tmp_path / "run", cfg)
    for stage in ("train", "trajectories", "basis", "decompose", "cluster", "evaluate",
                  "report"):
        run_stage(ctx, stage, progress=False)
    table = ctx.run.read_pos_clusters()
    assert len(table) and set(table["name"]) <= {"loss", "polca-hessian"}
    tokens = ctx.run.read_tokens()
    for row in table.itertuples():  # the examples are members of the cluster they illustrate
        clustering = ctx.run.read_clustering(row.name)
        label = clustering.labels(None if row.vector < 0 else row.vector, len(tokens))
        assert (label[list(row.examples)] == row.cluster).all()
        assert list(row.example_contexts) == tokens["context"].iloc[row.examples].tolist()
    page = ctx.run.report_path().read_text()
    assert "POS-labelled clusters" in page
    # the skill-signal diagnostic of the target's part of speech and its 4-gram pattern, on
    # every stored kind, shown in the findings
    signal = ctx.run.read_evaluation_table("skill_signal")
    assert set(signal["label"]) == {"pos", "pos_4gram"}
    assert {"loss", "delta_loss", "first_order-hessian", "gradient-hessian"} <= set(
        signal["name"])
    scored = signal[signal["status"] == "ok"]
    assert len(scored) and (scored["chance"] == 1 / scored["class_counts"].str.split().str.len()
                            ).all()
    assert "probe sees (balanced accuracy)" in page and "pos " in page
    assert html.escape(table["label"].iloc[0], quote=True) in page
