"""The report: figures carry the numbers they claim, and the page is complete and self-contained.

Oracles: means and counts recomputed here with plain loops over tokens, the evaluation csv read
back with the csv module, and the page parsed with the standard library's HTML parser.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from polca.api import run_stage
from polca.config import dump_config, parse_config
from polca.report import figures, interactive, write_report
from polca.store import RunDir, atomic_write_json, atomic_write_parquet
from polca.tasks.addition import Addition

STEPS = [0, 10, 20, 30, 40, 50]
CSV_TEXT = "<b>bold</b> & co"


def make_run(root, with_results: bool = True) -> RunDir:
    """A small run directory written by hand: config, manifest, probe set, and (optionally)
    losses, correctness, a basis, decomposition terms, diagnostics, a clustering, an evaluation
    table. Losses fall at a rate that depends on the digit place."""
    run = RunDir(root)
    cfg = parse_config({"name": "report-test", "task": {"kind": "addition", "n_probe": 50},
                        "report": {"examples_per_cluster": 3}})
    run.root.mkdir(parents=True, exist_ok=True)
    run.config_path.write_text(dump_config(cfg))
    atomic_write_json(run.checkpoints / "manifest.json", {"format": 1, "checkpoints": [
        {"step": s, "file": f"step_{s:06d}.safetensors", "sha256": "0" * 64,
         "train_loss": 2.5 / (1 + s)} for s in STEPS]})
    sequences, tokens = Addition(n_probe=50).probe_set()
    run.write_probe(sequences, tokens)
    if not with_results:
        return run
    n, steps = len(tokens), np.array(STEPS)
    rate = {1: 0.01, 10: 0.02, 100: 0.05, 1000: 0.2}
    loss = np.stack([2.4 * np.exp(-rate[p] * steps) + 0.01 * (t % 7)
                     for t, p in enumerate(tokens["place"])])
    arrays = run.arrays()
    for name, data, dtype in (("loss", loss, "float64"), ("correct", loss < 1.0, "bool")):
        arrays.require(name, data.shape, data.shape, ("token", "checkpoint"), dtype=dtype,
                       attrs={"steps": STEPS})
        arrays.write_block(name, slice(None), data, key="all")
    m, intervals = 2, len(STEPS) - 1
    first = np.diff(loss, axis=1).T[None] * np.array([0.5, 0.3])[:, None, None]
    for name, data in (("first", first), ("second_exact", 0.1 * first)):
        arrays.require(f"polca/hessian/{name}", (m, intervals, n), (1, intervals, n),
                       ("vector", "interval", "token"))
        arrays.write_block(f"polca/hessian/{name}", slice(None), data, key="all")
    atomic_write_json(run.basis / "hessian.json", {
        "name": "hessian", "kind": "hessian", "dim": 321, "params": {"every": 20},
        "vectors": [{"index": i, "kind": "hessian", "checkpoint": i, "step": 10 * i,
                     "eigenvalue": 4.5 - i, "eigenvalue_source": "lanczos", "residual": 1e-6}
                    for i in range(m)]})
    run.write_diagnostics("hessian", {
        "basis": "hessian", "steps": STEPS, "n_vectors": m, "estimators": {
            "first_order": {"explained_fraction": 0.8}, "polca": {"explained_fraction": 0.88}},
        "explained_per_interval": {"first_order": [0.8] * intervals,
                                   "polca": [0.88, None] + [0.88] * (intervals - 2)},
        "first_vs_second_order": {"cosine_similarity": 1.0, "relative_l2_difference": 0.1},
        "rmse_paper_vs_exact_second_order": None, "zero_step_intervals": []})
    measures = np.column_stack([loss.mean(0), np.linspace(0, 1, len(STEPS)),
                                np.linspace(1, 2, len(STEPS))])
    arrays.require("measures", measures.shape, measures.shape, ("checkpoint", "measure"),
                   attrs={"steps": STEPS, "measures": ["loss", "accuracy_out00", "weight_norm"],
                          "reference": {}})
    arrays.write_block("measures", slice(None), measures, key="all")
    # clustering of the polca kind: vector 0 by place (1000s apart), vector 1 by carry
    place, carry = tokens["place"].to_numpy(), tokens["carry"].to_numpy()
    labels = {0: np.where(place == 1000, 0, np.where(place == 100, 1, -1)),
              1: np.where(carry, 0, -2)}
    frame = pd.concat([pd.DataFrame({"vector": v, "token": np.arange(n), "label": lab,
                                     "break_step": 20}) for v, lab in labels.items()])
    atomic_write_parquet(run.clusters / "polca-hessian.parquet", frame)
    atomic_write_parquet(run.clusters / "polca-hessian.breaks.parquet", pd.DataFrame({
        "vector": [0, 0, 1], "cluster": [0, 1, 0], "size": [50, 50, int(carry.sum())],
        "break_step": [20.0, 30.0, 40.0], "hidden": [False, True, True]}))
    atomic_write_json(run.clusters / "polca-hessian.json", {
        "params": {"name": "polca-hessian", "kind": "polca", "basis": "hessian", "tau": 25,
                   "steps": STEPS, "min_cluster_size": 5},
        "n_clusters": 3, "n_hidden": 2, "vectors": [{"vector": 0, "kept": True},
                                                    {"vector": 1, "kept": True}]})
    (run.root / "evaluation").mkdir()
    pd.DataFrame({"name": ["polca-hessian", CSV_TEXT], "rank": [1, 1], "vector": [1, None],
                  "cluster": [0, 0], "size": [int(carry.sum()), 3], "homogeneity": [0.973, 0.5],
                  "recall": [0.5, 0.1], "f1": [0.66, 0.2], "paper_homogeneity": [0.973, None],
                  "paper_recall": [0.736, None], "paper_f1": [0.838, None]}).to_csv(
        run.root / "evaluation" / "carry.csv", index=False)
    pd.DataFrame({"name": ["polca-hessian"], "kind": ["polca"], "basis": ["hessian"],
                  "n_clusters": [3], "n_hidden": [2], "hidden_fraction": [2 / 3], "tau": [25],
                  "delta": [10], "paper": [0.355]}).to_csv(
        run.root / "evaluation" / "hidden.csv", index=False)
    return run


class PageParser(HTMLParser):
    """Tables (caption, rows of cell text), image sources, and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.tags, self.pre = [], [], [], set(), []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th", "caption", "pre"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "caption":
            self.tables[-1]["caption"] = "".join(self._cell)
            self._cell = None
        elif tag == "pre":
            self.pre.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def table_with(page: PageParser, caption_start: str) -> list[dict]:
    found = [t for t in page.tables if t["caption"].startswith(caption_start)]
    assert found, f"no table captioned {caption_start!r}: {[t['caption'] for t in page.tables]}"
    header, *rows = found[0]["rows"]
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The page written by the report stage; its context asks for 2 examples per cluster
    (the run's config.toml says 3: the stage must use the context's config)."""
    run = make_run(tmp_path_factory.mktemp("run") / "r")
    ctx = SimpleNamespace(run=run, cfg=parse_config({"name": "report-test", "report": {
        "examples_per_cluster": 2}}))
    return run, run_stage(ctx, "report", progress=False)


def test_page_is_self_contained_with_inline_images(report):
    run, path = report
    text = path.read_text(encoding="utf-8")
    page = parse(path)
    assert path == run.report / "index.html"
    outside_scripts = re.sub(r"<script>.*?</script>", "", text, flags=re.DOTALL)
    assert "http://" not in outside_scripts and "https://" not in outside_scripts
    assert not {"link", "iframe"} & page.tags
    # a script only with the interactive view, and inline (no src: nothing to load)
    assert ("script" in page.tags) == interactive.available()
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    inline = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    saved = sorted(p.read_bytes() for p in run.report.glob("*.png"))
    assert len(inline) >= 6 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in inline)
    assert sorted(inline) == saved  # each figure is inlined once and saved once


def test_tables_match_their_sources(report):
    run, path = report
    page = parse(path)
    with open(run.root / "evaluation" / "carry.csv", newline="") as handle:
        expected = list(csv.DictReader(handle))
    rows = table_with(page, "carry")
    assert [r["name"] for r in rows] == [e["name"] for e in expected]  # escaped, round-trips
    assert [float(r["homogeneity"]) for r in rows] == [float(e["homogeneity"]) for e in expected]
    assert CSV_TEXT not in path.read_text()  # the raw markup never reaches the page
    vectors = table_with(page, "Vectors of basis hessian")
    assert [float(r["eigenvalue"]) for r in vectors] == [4.5, 3.5]
    steps = table_with(page, "Training run")
    assert {r["quantity"]: r["value"] for r in steps}["final step"] == str(STEPS[-1])
    assert page.pre == [run.config_path.read_text()]


def test_final_accuracy_per_place(report):
    run, path = report
    tokens = run.read_tokens()
    correct = run.arrays().read("correct")[:, -1]
    rows = {r["tokens"]: r for r in table_with(parse(path), "Accuracy at the final")}
    for place in (1, 10, 100, 1000):
        hits = [bool(c) for c, p in zip(correct, tokens["place"]) if p == place]
        assert float(rows[f"place={place}"]["accuracy"]) == pytest.approx(
            sum(hits) / len(hits), abs=5e-4)
        assert int(rows[f"place={place}"]["count"]) == len(hits)


def test_cluster_browser_counts_breaks_and_examples(report):
    run, path = report
    tokens, sequences = run.read_tokens(), pd.read_parquet(run.probe / "sequences.parquet")
    clusters = [t for t in parse(path).tables if t["caption"].startswith("Clusters")]
    assert len(clusters) == 2  # one per basis vector
    header, *rows = clusters[0]["rows"]
    rows = [dict(zip(header, r)) for r in rows]
    assert [r["cluster"] for r in rows] == ["0", "1"]
    assert [r["break_step"] for r in rows] == ["20", "30"]
    assert [r["hidden"] for r in rows] == ["no", "yes"]
    for row, place in zip(rows, (1000, 100)):
        carries = {}
        for p, c in zip(tokens["place"], tokens["carry"]):
            if p == place:
                carries[c] = carries.get(c, 0) + 1
        assert int(row["size"]) == sum(carries.values())
        for value, count in carries.items():
            assert f"{value}: {count}" in row["carry"]
        assert row["place"] == f"{place}: {sum(carries.values())}"
        examples = row["examples"].split("\n")
        assert len(examples) == 2
        problems = set(sequences["text"])
        for example in examples:
            context, rest = example.split(" → ")
            problem = re.search(r"\[(.+)\]$", rest).group(1)
            assert problem in problems and problem.startswith(context)


def test_diagnostics_per_interval_and_summary(report):
    run, path = report
    rows = {r["quantity"]: r["hessian"] for r in table_with(parse(path), "Decomposition diagnostics per")}
    assert rows["explained: polca"] == "0.88" and rows["zero_step_intervals"] == "0"
    assert (run.report / "diagnostics_explained.png").is_file()
    assert (run.report / "progress_measures.png").is_file()


def test_the_interactive_view_can_be_turned_off(tmp_path):
    run = make_run(tmp_path / "run")
    text = run.config_path.read_text()
    run.config_path.write_text(text.replace("[report]\n", "[report]\ninteractive = false\n"))
    page = write_report(run.root).read_text()
    assert "<script" not in page and "Trajectories, interactive" not in page


@pytest.mark.skipif(not interactive.available(), reason="needs the [interactive] extra")
def test_the_interactive_view_shows_every_token_with_its_text(report):
    run, path = report
    text = path.read_text(encoding="utf-8")
    tokens = run.read_tokens()
    assert "Trajectories, interactive" in text and "<script src" not in text
    # the data behind the hover: each token's full problem and labels
    problems = run.read_sequences().set_index("sequence")["text"]
    for i in (0, len(tokens) - 1):
        row = tokens.iloc[i]
        assert f"[{problems[row['sequence']]}], place {row['place']}, carry" in text


def test_missing_stages_degrade_to_notes(tmp_path):
    run = make_run(tmp_path / "bare", with_results=False)
    text = write_report(run.root).read_text()
    for stage in ("trajectories", "basis", "decompose", "evaluate", "cluster", "measures"):
        assert f"run `polca {stage}`" in text
    assert "<img" not in text


# -- figures on hand-made arrays -------------------------------------------------------------------
def test_loss_curves_lines_are_group_means():
    rng = np.random.default_rng(0)
    steps, loss = np.array([0, 5, 10, 20]), rng.random((9, 4))
    groups = np.array(["a", "b", "c"] * 3)
    fig = figures.loss_curves(steps, loss, groups, "g", breaks={"tau": 10})
    ax = fig.axes[0]
    overall = [sum(loss[i, t] for i in range(9)) / 9 for t in range(4)]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), overall)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), steps)
    for line, value in zip(ax.lines[1:4], "abc"):
        members = [i for i in range(9) if groups[i] == value]
        mean = [sum(loss[i, t] for i in members) / len(members) for t in range(4)]
        np.testing.assert_allclose(line.get_ydata(), mean)
        assert line.get_label() == f"g={value} (3 tokens)"
    assert list(ax.lines[4].get_xdata()) == [10, 10]  # the break marker


def test_accuracy_curves_are_fractions_correct():
    correct = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)
    fig = figures.accuracy_curves([0, 1, 2], correct, np.array([1, 1, 2, 2]), "place")
    ys = [line.get_ydata().tolist() for line in fig.axes[0].lines]
    assert ys == [[0.25, 0.5, 0.75], [0.0, 0.5, 1.0], [0.5, 0.5, 0.5]]


def test_cluster_trajectories_top_clusters_and_breaks():
    rng = np.random.default_rng(1)
    labels = np.array([2] * 5 + [0] * 3 + [1] * 4 + [3] * 2 + [-1] * 3)
    projected, loss = rng.normal(size=(17, 5)), rng.random((17, 5))
    fig = figures.cluster_trajectories(np.arange(5) * 10, projected, loss, labels, top=3,
                                       breaks={2: 30, 3: 40})
    left, right = fig.axes
    curves = [line for line in left.lines if len(line.get_xdata()) == 5]
    assert [line.get_label() for line in curves] == [
        "cluster 2 (5 tokens)", "cluster 1 (4 tokens)", "cluster 0 (3 tokens)"]
    for line_p, line_l, cluster in zip(curves, right.lines, (2, 1, 0)):
        members = [i for i in range(17) if labels[i] == cluster]
        for t in range(5):
            assert line_p.get_ydata()[t] == pytest.approx(
                sum(projected[i, t] for i in members) / len(members))
            assert line_l.get_ydata()[t] == pytest.approx(
                sum(loss[i, t] for i in members) / len(members))
    markers = [line.get_xdata()[0] for line in left.lines if len(line.get_xdata()) == 2]
    assert markers == [30]  # cluster 3 is not among the top three


def test_composition_bars_are_label_fractions():
    labels = np.array([0, 0, 0, 0, 1, 1, -1])
    carry = pd.DataFrame({"carry": [True, True, False, True, False, False, True]})
    ax = figures.composition_bars(labels, carry).axes[0]
    heights = {(p.get_x() + p.get_width() / 2, p.get_facecolor()): p.get_height()
               for p in ax.patches}
    by_cluster = {}
    for (x, _), h in heights.items():
        by_cluster.setdefault(round(x), []).append(h)
    assert sorted(by_cluster[0]) == [0.25, 0.75] and sorted(by_cluster[1]) == [0.0, 1.0]
    assert [t.get_text() for t in ax.texts] == ["0.75", "1.00"]


def test_homogeneity_bars_and_interval_series():
    table = pd.DataFrame({"place": [0.9, 0.4], "carry": [0.6, 0.7]}, index=["loss", "polca"])
    ax = figures.homogeneity_bars(table, chance={"carry": 0.55}).axes[0]
    assert [p.get_height() for p in ax.patches] == [0.9, 0.4, 0.6, 0.7]
    assert [line.get_ydata()[0] for line in ax.lines] == [0.55]
    ax = figures.interval_series([10, 20], {"hessian": [0.5, 0.25]}, "fraction", "t").axes[0]
    assert ax.lines[0].get_ydata().tolist() == [0.5, 0.25]


def test_skill_curves_panel_per_value():
    loss = np.arange(12, dtype=float).reshape(4, 3)
    fig = figures.skill_curves([0, 1, 2], loss, np.array([1, 1, 10, 10]),
                               np.array([True, False, True, True]), "place", "carry")
    assert [ax.get_title() for ax in fig.axes] == ["place=1", "place=10"]
    assert [line.get_ydata().tolist() for line in fig.axes[1].lines] == [[7.5, 8.5, 9.5]]
    assert json.dumps([line.get_label() for line in fig.axes[0].lines]) == \
        '["carry=False (1)", "carry=True (1)"]'
