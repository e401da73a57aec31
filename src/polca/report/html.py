"""The run report: one self-contained HTML page (``report/index.html``) with its figures.

The first screen says what the run is (one line) and what it found (:mod:`polca.findings`:
an overview paragraph, a table of the headline numbers with every red flag, one sentence per
trajectory kind); then come the reproduction table (addition runs), the clusters, training,
the decomposition diagnostics, the progress measures, the evaluation tables and the basis;
the configuration last. The same findings are written as data to ``report/summary.json``.

The page inlines its CSS and its figures (base64 PNG) and loads nothing from the network, so
it can be mailed or archived as one file; each figure is also saved beside it as a PNG. It runs
no script, except the interactive trajectory view when Bokeh is installed (the
``[interactive]`` extra; ``report.interactive = false`` turns it off), whose library is inlined
too. It reads whatever stages have written: a section whose inputs are absent is one line
saying which stage writes them, so a report can be made at any point of a run.

Example:
    >>> write_report("runs/demo-addition")  # doctest: +SKIP
    PosixPath('runs/demo-addition/report/index.html')
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import tomllib
from matplotlib.figure import Figure

from polca.config import dump_config, parse_config
from polca.evaluate import label_scores
from polca.findings import coverage, display_order, percent, to_html
from polca.report import figures, interactive
from polca.report.markup import details, esc, flatten, fmt, note, table
from polca.report.plateau import breaks_section, plateau_figure
from polca.report.reproduction import BEYOND_THE_DEMO, DIAGNOSTICS_NOTE
from polca.report.summary import SKILL_LABEL, identity_line, read_findings, run_summary
from polca.report.text import add_text_section
from polca.store import (
    CORRECT,
    LABEL_VALUES,
    LOSS,
    TRAJECTORY_KINDS,
    Clustering,
    RunDir,
    StoreError,
)

LONG_TABLE = 30  # evaluation tables with more rows start folded
# A label with more distinct values is not drawn as groups of curves (digit: 10 is fine).
MAX_GROUPS = 12
# A label with more distinct values is not a category to score purity against (POS tags: 17
# are; POS 4-grams: thousands are not).
MAX_CATEGORIES = 50

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
nav ul { columns: 3; } .note { color: #666; font-style: italic; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
details { margin: 0.4em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-weight: 600; } .hidden { color: #b00; font-weight: 600; }
code { background: #f3f3f3; padding: 0 0.2em; } .scroll { overflow-x: auto; }
td.nowrap { white-space: nowrap; text-align: left; font-family: monospace; }
p.identity { font-size: 1.05em; margin: 0.3em 0 0.6em; }
nav.toc { font-size: 0.9em; color: #555; } nav.toc a { margin-right: 0.9em; }
"""


@dataclass
class Page:
    """Sections of the page and the figures they show, collected before writing; ``head`` is
    the HTML above the table of contents (the identity line and the findings)."""

    title: str
    head: str = ""
    scripts: str = ""  # inline scripts for the <head> (the interactive view's library)
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, html)
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG

    def add(self, title: str, body: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        self.sections.append((anchor, title, body))

    def figure(self, name: str, fig: Figure, alt: str) -> str:
        """Render ``fig`` to PNG, keep it for saving as ``name``.png, return its inline <img>."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        while f"{stem}.png" in self.figures:
            stem += "_"
        data = buffer.getvalue()
        self.figures[f"{stem}.png"] = data
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'

    def render(self) -> str:
        toc = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in self.sections)
        body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{b}</section>'
                       for a, t, b in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style>{self.scripts}"
                f"</head><body>"
                f"<h1>{esc(self.title)}</h1>{self.head}"
                f'<nav class="toc">Sections: {toc}</nav>{body}</body></html>\n')


def write_report(run_dir, max_vectors: int = 6, examples: int | None = None) -> Path:
    """Write ``report/index.html`` (its figures as PNG beside it) and ``report/summary.json``
    for the run ``run_dir`` (a path or a :class:`~polca.store.RunDir`).

    ``max_vectors``: per clustering, how many basis vectors get figures (the first kept ones;
    every vector still gets its cluster table). ``examples``: example tokens per cluster
    (default: the config's ``report.examples_per_cluster``, else 10). Returns the page path.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    data = RunData(run)
    if examples is None:
        examples = run.config_value(("report", "examples_per_cluster"), 10)
    found = read_findings(run)
    facts = run_summary(run, found)
    page = Page(f"polca report: {facts['run']['name']}")
    page.head = (f'<p class="identity">{esc(identity_line(facts["run"]))}</p>'
                 + to_html(found, skill_label=SKILL_LABEL))
    if facts["reproduction"] is not None:
        page.add("Reproduction of the paper's addition table",
                 reproduction_section(facts["reproduction"]))
    page.add("Clusters", clusters_section(data, page, max_vectors, examples))
    if run.config_value(("report", "interactive"), None) is not False and interactive.available():
        page.add("Trajectories, interactive", interactive_section(data, page))
    add_text_section(page, run, examples)
    page.add("Training", training_section(data, page))
    page.add("Decomposition diagnostics", diagnostics_section(data, page))
    page.add("Progress measures", measures_section(data, page) + breaks_section(
        run, page.figure, run.config_value(("cluster", "top_clusters"), 3)))
    page.add("Evaluation tables", evaluation_section(data))
    page.add("Basis provenance", basis_section(data))
    page.add("Configuration", config_section(data))
    path = run.write_report(page.render(), page.figures)
    run.write_summary(facts)
    return path


# -- reading the run directory ------------------------------------------------------------------
class RunData:
    """Tolerant reader of what the stages wrote, through the contract: every getter returns
    None (or an empty collection) when its part of the run is absent."""

    def __init__(self, run: RunDir):
        self.run = run

    @cached_property
    def outside(self) -> bool:
        """Whether the checkpoints were made outside polca (nothing to train, no measures)."""
        return self.run.config_value(("source", "kind"), "train") != "train"

    @cached_property
    def manifest(self) -> list[dict] | None:
        return self.run.checkpoint_manifest()

    @cached_property
    def tokens(self) -> pd.DataFrame | None:
        return self.run.read_tokens() if self.run.has_probe() else None

    @cached_property
    def sequences(self) -> pd.DataFrame | None:
        return self.run.read_sequences() if self.run.has_probe() else None

    @cached_property
    def problems(self) -> pd.Series | None:
        """Per token, the text of its whole probe sequence (when the sequences have one)."""
        tokens, sequences = self.tokens, self.sequences
        if tokens is None or sequences is None or "text" not in sequences:
            return None
        return tokens["sequence"].map(dict(zip(sequences["sequence"], sequences["text"])))

    def label_columns(self) -> list[str]:
        tokens = self.tokens
        return [] if tokens is None else self.run.label_columns(tokens)

    def array(self, name: str) -> np.ndarray | None:
        if not self.run.has_arrays():
            return None
        arrays = self.run.arrays()
        return arrays.read(name) if name in arrays else None

    def steps(self) -> np.ndarray | None:
        """Training step of each checkpoint column of ``loss``."""
        steps = self.run.array_steps(LOSS)
        if steps is None and self.manifest:
            steps = [e["step"] for e in self.manifest]
        return None if steps is None else np.asarray(steps)

    def projected(self, kind: str, basis: str | None, vector: int) -> np.ndarray | None:
        """``[tokens, checkpoints]`` projected trajectory of one vector, as the cluster stage
        clusters it; None if not computed."""
        try:
            return self.run.projected(kind, basis, slice(vector, vector + 1))[0].T
        except (StoreError, ValueError, KeyError):
            return None

    def tau(self) -> float | None:
        """τ, the step after which the exact loss is flat, as the cluster stage recorded it."""
        for clustering in self.run.read_clusterings()[0]:
            tau = clustering.params.get("tau")
            if tau is not None:
                return float(tau)
        return None


# -- sections -----------------------------------------------------------------------------------
def config_section(data: RunData) -> str:
    """The resolved config; an outside run's without the sections it does not use (model,
    training and checkpoints describe training by polca)."""
    text = data.run.config_text()
    if text is None:
        return note("no config.toml in the run directory")
    if not data.outside:
        return (f"<p>The resolved config of this run (<code>config.toml</code>):</p>"
                f"<pre>{esc(text)}</pre>")
    return ("<p>The config sections this run uses (<code>config.toml</code> also holds "
            "the defaults of the sections that describe training by polca):</p>"
            f"<pre>{esc(dump_config(parse_config(tomllib.loads(text)), used_only=True))}</pre>")


def training_section(data: RunData, page: Page) -> str:
    parts = []
    manifest = data.manifest
    if manifest:
        last = manifest[-1]
        rows = [("checkpoints", len(manifest)), ("first step", manifest[0]["step"]),
                ("final step", last["step"]), ("final train loss", last.get("train_loss"))]
        parts.append(table(pd.DataFrame(rows, columns=["quantity", "value"]), "Training run"))
    elif data.outside:
        parts.append(source_table(data))
    else:
        parts.append(note("no checkpoints/manifest.json: run `polca train`"))
    tokens, loss, steps = data.tokens, data.array(LOSS), data.steps()
    if tokens is None or loss is None or steps is None or loss.shape[1] != len(steps):
        parts.append(note("no exact token losses: run `polca trajectories`"))
        return "".join(parts)
    labels = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_GROUPS]
    group = labels[0] if labels else None
    groups = tokens[group].to_numpy() if group else None
    correct = data.array(CORRECT)
    if correct is not None:
        parts.append(final_accuracy(tokens, correct, group))
    tau = data.tau()
    if tau is not None:
        parts.append(f"<p>Dashed line: τ = {tau:g}, the step after which the mean exact loss "
                     "counts as flat; a cluster whose mean break time is later has a hidden "
                     "breakthrough.</p>")
    parts.append(page.figure("loss_curves", figures.loss_curves(
        steps, loss, groups, group or "group", breaks=None if tau is None else {"tau": tau}),
        "mean exact loss over training"))
    if correct is not None:
        parts.append(page.figure("accuracy", figures.accuracy_curves(
            steps, correct, groups, group or "group"), "accuracy over training"))
    if len(labels) >= 2:
        panel, line = labels[0], labels[1]
        parts.append(f"<p>Ground-truth skills: mean loss per <code>{esc(line)}</code> within "
                     f"each <code>{esc(panel)}</code>.</p>")
        parts.append(page.figure("skill_curves", figures.skill_curves(
            steps, loss, tokens[panel].to_numpy(), tokens[line].to_numpy(), panel, line),
            "skill curves"))
    return "".join(parts)


def final_accuracy(tokens: pd.DataFrame, correct: np.ndarray, group: str | None) -> str:
    final = np.asarray(correct[:, -1], dtype=bool)
    rows = [("all tokens", len(final), final.mean())]
    if group:
        for value in sorted(tokens[group].unique()):
            members = (tokens[group] == value).to_numpy()
            rows.append((f"{group}={value}", int(members.sum()), final[members].mean()))
    frame = pd.DataFrame(rows, columns=["tokens", "count", "accuracy"])
    return table(frame, "Accuracy at the final checkpoint")


def source_table(data: RunData) -> str:
    """The checkpoint series of an outside run, as its source described it (``source.json``)."""
    source = data.run.read_source() or {}
    checkpoints = source.get("checkpoints") or []
    if not checkpoints:
        return note("checkpoints made outside polca (no description recorded)")
    frame = pd.DataFrame([{k: v for k, v in c.items() if not isinstance(v, (dict, list))}
                          for c in checkpoints])
    return details(f"{len(frame)} checkpoints made outside polca (source.json)",
                   table(frame, "Checkpoints of the series"))


def measures_section(data: RunData, page: Page) -> str:
    """The progress measures per checkpoint (docs/method.md §8), as the measures stage draws
    them."""
    if data.outside:
        return note("progress measures need polca's own decoder (greedy generation, hidden "
                    "states, attention): none for checkpoints made outside polca")
    if not data.run.has_measures():
        return note("no progress measures: run `polca measures`")
    table_ = data.run.read_measures()
    return page.figure("progress_measures", plateau_figure(table_), "progress measures") + details(
        f"progress measures at {len(table_)} checkpoints",
        table(table_.reset_index(), "Progress measures per checkpoint"))


def basis_section(data: RunData) -> str:
    provenance = data.run.basis_documents()
    if not provenance:
        return note("no basis/*.json: run `polca basis`")
    parts = []
    for name, info in provenance.items():
        params = info.get("params") or {}
        head = {k: v for k, v in info.items() if k not in ("vectors", "params")}
        parts.append(table(pd.DataFrame(list({**head, **params}.items()),
                                        columns=["field", "value"]), f"Basis {name}"))
        vectors = info.get("vectors")
        if vectors:
            parts.append(details(f"{name}: {len(vectors)} vectors",
                                 table(pd.DataFrame(vectors), f"Vectors of basis {name}")))
    return "".join(parts)


def diagnostics_section(data: RunData, page: Page) -> str:
    """Per basis: the decompose stage's summary (fraction of |ΔL| explained per estimator,
    first- vs second-order agreement, paper-curvature checks) and the fraction explained per
    interval it recorded."""
    diagnostics = data.run.read_diagnostics()
    if not diagnostics:
        return note("no diagnostics/*.json: run `polca decompose`")
    rows = []
    for name, info in diagnostics.items():
        row = {"basis": name}
        for key, value in flatten(info).items():
            if key.startswith("estimators.") and key.endswith(".explained_fraction"):
                row[f"explained: {key.split('.')[1]}"] = value
            elif not isinstance(value, list) and key not in ("basis", "steps") \
                    and not key.startswith("explained_per_interval."):
                row[key] = value
            elif key == "zero_step_intervals":
                row[key] = len(value)
        rows.append(row)
    summary = pd.DataFrame(rows).set_index("basis").T.reset_index(names="quantity")
    parts = [table(summary, "Decomposition diagnostics per basis (explained: 1 − Σ|residual| / "
                            "Σ|ΔL| over tokens and intervals)")]
    steps = data.steps()
    series = {f"{name}: {estimator}": np.array(values, dtype=float)
              for name, info in diagnostics.items()
              for estimator, values in (info.get("explained_per_interval") or {}).items()}
    if series and steps is not None and all(len(v) == len(steps) - 1
                                            for v in series.values()):
        parts.append(page.figure("diagnostics_explained", figures.interval_series(
            steps[1:], series, ylabel="fraction of |ΔL| explained",
            title="Fraction of the exact loss change explained, per interval",
            reference=(0.0, "0: no better than allocating nothing"), floor=-1.0),
            "fraction of |ΔL| explained per interval"))
    return "".join(parts)


def evaluation_section(data: RunData) -> str:
    """Every evaluation table (the scores with the coverage of each clustering beside its
    purities); a table without rows is left out."""
    names = data.run.evaluation_names()  # the reproduction tables first
    if not names:
        return note("no evaluation/*.csv: run `polca evaluate`")
    parts = []
    n_tokens = len(data.tokens) if data.tokens is not None else None
    for name in names:
        try:
            frame = data.run.read_evaluation_table(name)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            parts.append(note(f"evaluation/{name}.csv cannot be read ({err}); run "
                              "`polca evaluate` again"))
            continue
        if frame is None or not len(frame):
            continue
        if name == "scores" and n_tokens and "n_clustered" in frame:
            frame.insert(list(frame.columns).index("n_clustered") + 1, "coverage",
                         frame["n_clustered"] / n_tokens)
        rendered = table(frame, name.replace("_", " ").replace("-", " "))
        parts.append(rendered if len(frame) <= LONG_TABLE else details(
            f"evaluation/{name}.csv: {len(frame)} rows", rendered))
    return "".join(parts) or note("every evaluation table is empty")


def reproduction_section(tables: dict) -> str:
    """The paper's addition table with ours beside it, and the decomposition diagnostics
    (:func:`polca.report.reproduction.reproduction_tables`)."""
    carry = tables["carry"]
    parts = [
        ("<p>The paper's carry metric (Appendix G): the share of carry tokens in the most "
         "homogeneous eligible cluster (top 3 for POLCA kinds: the best of each of the three "
         "best vectors), with its recall and F1; “–”: no eligible cluster. Read it with the "
         "coverage and flags of each row in <a href=\"#found\">What was found</a>.</p>"),
        table(pd.DataFrame(carry["rows"], columns=carry["header"]),
              "Ours beside the paper's numbers", text_columns=carry["header"])]
    if "diagnostics" in tables:
        diagnostics = tables["diagnostics"]
        parts.append(table(pd.DataFrame(diagnostics["rows"], columns=diagnostics["header"]),
                           DIAGNOSTICS_NOTE, text_columns=diagnostics["header"]))
    parts.append(f"<p>{esc(BEYOND_THE_DEMO)}</p>")
    return "".join(parts)


# -- clusters -----------------------------------------------------------------------------------
def clusters_section(data: RunData, page: Page, max_vectors: int, examples: int) -> str:
    clusterings, problems = data.run.read_clusterings()
    clusterings.sort(key=lambda c: display_order(c.info, c.name))  # as in What was found
    tokens = data.tokens
    if not clusterings or tokens is None:
        return note("no clusters/*.parquet: run `polca cluster`") + "".join(map(note, problems))
    labels_cols = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_GROUPS]
    categories = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_CATEGORIES]
    parts = [*map(note, problems), homogeneity_overview(clusterings, tokens, categories, page,
                                                       data.label_columns())]
    problems = data.problems
    loss, steps = data.array(LOSS), data.steps()
    for clustering in clusterings:
        blocks = [params_table(clustering)]
        shown = 0
        for vector in clustering.vectors():
            labels = clustering.labels(vector, len(tokens))
            if not (labels >= 0).any():
                blocks.append(f"<p>vector {esc(vector)}: no clusters (label counts "
                              f"{esc(label_counts(labels))})</p>")
                continue
            draw = shown < max_vectors
            shown += draw
            blocks.append(vector_block(data, clustering, vector, labels, tokens, problems,
                                       labels_cols, loss, steps, page, draw, examples))
        parts.append(details(f"{clustering.name} ({clustering.kind}"
                             f"{', basis ' + clustering.basis if clustering.basis else ''})",
                             "".join(blocks)))
    return "".join(parts)


def interactive_section(data: RunData, page: Page) -> str:
    """Every token's exact-loss trajectory, coloured by the exact-loss clustering, its token
    shown on hover (:mod:`polca.report.interactive`)."""
    tokens, loss, steps = data.tokens, data.array(LOSS), data.steps()
    if tokens is None or loss is None or steps is None or loss.shape[1] != len(steps):
        return note("no exact token losses: run `polca trajectories`")
    names = data.run.clustering_names()
    labels = (data.run.read_clustering("loss").labels(None, len(tokens)) if "loss" in names
              else np.full(len(tokens), -1))
    problems = data.problems
    label_cols = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_CATEGORIES]
    hover = [example_text(tokens, problems, i) + "".join(
        f", {c} {tokens[c].iloc[i]}" for c in label_cols) for i in range(len(tokens))]
    head, body = interactive.trajectory_view(
        steps, loss, labels, hover, title="Exact loss of every probe token, coloured by the "
                                          "exact-loss clusters (grey: noise)")
    page.scripts = head
    return ("<p>Hover a line to see its token (context → target [full problem]) and "
            "labels; drag to pan, scroll to zoom.</p>" + body)


def homogeneity_overview(clusterings: list[Clustering], tokens: pd.DataFrame,
                         label_cols: list[str], page: Page, all_labels=()) -> str:
    """Size-weighted purity per label for each clustering (its vectors pooled, each token
    counted once per vector it was clustered on), with the chance level and the coverage
    (clustered / all token-vector pairs, :func:`polca.findings.coverage`) beside it."""
    if not label_cols:
        many = [c for c in all_labels if c not in label_cols]
        return note("no label with at most "
                    f"{MAX_CATEGORIES} values to score the clusters' homogeneity against"
                    + (f" (the labels {', '.join(many)} have more; see the POS-labelled "
                       "clusters)" if many else " (the probe tokens carry no labels)"))
    rows, chance, covered = {}, {}, {}
    for clustering in clusterings:
        row = {}
        for column in label_cols:
            values = tokens[column].to_numpy()
            pooled = [(clustering.labels(v, len(tokens)), values) for v in clustering.vectors()]
            labels = np.concatenate([np.where(l >= 0, l + i * 1_000_000, -1)
                                     for i, (l, _) in enumerate(pooled)])
            scores = label_scores(labels, np.concatenate([x for _, x in pooled]))
            row[column] = scores["weighted_purity"]
            chance[column] = float(tokens[column].value_counts(normalize=True).max())
        rows[clustering.name] = row
        covered[clustering.name] = coverage(clustering.info).fraction
    frame = pd.DataFrame.from_dict(rows, orient="index")
    img = page.figure("homogeneity", figures.homogeneity_bars(frame, chance, coverage=covered),
                      "cluster homogeneity by label, with the coverage of each clustering")
    shown = frame.assign(coverage=[percent(covered[n]) for n in frame.index]).reset_index(
        names="clustering")
    return img + table(shown, "Size-weighted homogeneity (purity) of clusters, by label, and "
                       "coverage (clustered / all tokens, over every vector); chance: "
                       f"{', '.join(f'{k} {v:.3f}' for k, v in chance.items())}")


def params_table(clustering: Clustering) -> str:
    """Its parameters (long lists such as the steps are summarised) and per-vector counts."""
    info = clustering.info
    if not info:
        return note(f"no parameters recorded beside clusters/{clustering.name}.parquet")
    scalars = {}
    for key, value in flatten({k: v for k, v in info.items() if k != "vectors"}).items():
        if isinstance(value, list) and len(value) > 8:
            value = f"{len(value)} values: {fmt(value[:3])[:-1]}, …, {fmt(value[-1])}]"
        scalars[key] = value
    parts = [table(pd.DataFrame(list(scalars.items()), columns=["parameter", "value"]),
                   f"Parameters of {clustering.name}")]
    vectors = info.get("vectors")
    if isinstance(vectors, list) and vectors and all(isinstance(v, dict) for v in vectors):
        parts.append(table(pd.DataFrame(vectors), f"Per-vector filter and cluster counts of "
                                                  f"{clustering.name}"))
    return "".join(parts)


def vector_block(data: RunData, clustering: Clustering, vector, labels: np.ndarray,
                 tokens: pd.DataFrame, problems: pd.Series | None, label_cols: list[str],
                 loss, steps, page: Page, draw: bool, examples: int) -> str:
    breaks = clustering.breaks_of(vector)
    break_steps = {} if breaks is None or "break_step" not in breaks else breaks["break_step"]
    title = clustering.name + ("" if vector is None else f", vector {vector}")
    parts = []
    if draw and loss is not None and steps is not None and loss.shape[1] == len(steps):
        name = f"clusters_{clustering.name}" + ("" if vector is None else f"_v{vector}")
        projected = (None if vector is None
                     or TRAJECTORY_KINDS.get(clustering.kind, TRAJECTORY_KINDS["loss"]).source
                     == "loss" else data.projected(clustering.kind, clustering.basis,
                                                   int(vector)))
        tau, delta = clustering.params.get("tau"), clustering.params.get("delta")
        if projected is not None and projected.shape == loss.shape:
            parts.append(page.figure(name, figures.cluster_trajectories(
                steps, projected, loss, labels, breaks=dict(break_steps), title=title,
                tau=tau, delta=delta), title))
        else:
            top = [c for c in pd.Series(labels[labels >= 0]).value_counts().index[:3]]
            groups = np.where(np.isin(labels, top), labels, -1).astype(object)
            groups[groups == -1] = None
            parts.append(page.figure(name, figures.loss_curves(
                steps, loss, groups, "cluster",
                breaks={**{c: s for c, s in dict(break_steps).items() if c in top},
                        "tau": tau},
                title=f"{title}: exact loss of the top clusters"), title))
        if label_cols:
            parts.append(page.figure(name + "_composition", figures.composition_bars(
                labels, tokens[label_cols], title=title), f"{title} composition"))
    parts.append(cluster_table(labels, tokens, problems, label_cols, breaks, examples))
    n = int((labels >= 0).sum())
    summary = (f"{'all tokens' if vector is None else f'vector {vector}'}: "
               f"{len(np.unique(labels[labels >= 0]))} clusters, {n} clustered tokens "
               f"({label_counts(labels)})")
    if breaks is not None and "hidden" in breaks:
        summary += f", {int(breaks['hidden'].astype(bool).sum())} hidden breakthroughs"
    return details(summary, "".join(parts))


def cluster_table(labels: np.ndarray, tokens: pd.DataFrame, problems: pd.Series | None,
                  label_cols: list[str], breaks: pd.DataFrame | None, examples: int) -> str:
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    rows = []
    for cluster in ids[np.argsort(-sizes, kind="stable")]:
        members = np.flatnonzero(labels == cluster)
        row = {"cluster": int(cluster), "size": len(members)}
        for column in label_cols:
            counts = tokens[column].iloc[members].value_counts()
            row[column] = ", ".join(f"{v}: {c}" for v, c in counts.items())
        if breaks is not None and cluster in breaks.index:
            for key in ("break_step", "hidden"):
                if key in breaks:
                    row[key] = breaks.at[cluster, key]
        # evenly spaced members: deterministic and not biased to the first problems
        chosen = members[np.linspace(0, len(members) - 1, min(examples, len(members))).astype(int)]
        row["examples"] = "\n".join(example_text(tokens, problems, i) for i in chosen)
        rows.append(row)
    return table(pd.DataFrame(rows), "Clusters (largest first); examples: context → target "
                 "[full problem]", text_columns=label_cols, nowrap_columns=("examples",))


def example_text(tokens: pd.DataFrame, problems: pd.Series | None, i: int) -> str:
    row = tokens.iloc[i]
    context = row["context"] if "context" in tokens else ""
    target = row["text"] if "text" in tokens else row["target"]
    text = f"{context} → {target}"
    if problems is not None and isinstance(problems.iloc[i], str):
        text += f"  [{problems.iloc[i]}]"
    return text


def label_counts(labels: np.ndarray) -> str:
    names = LABEL_VALUES
    counts = pd.Series(labels[labels < 0]).value_counts().sort_index(ascending=False)
    return ", ".join(f"{names.get(int(k), k)}: {v}" for k, v in counts.items()) or "no noise"
