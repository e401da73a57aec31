"""The run report: one self-contained HTML page (``report/index.html``) with its figures.

The page inlines its CSS and its figures (base64 PNG), loads nothing from the network and runs
no script, so it can be mailed or archived as one file; each figure is also saved beside it as
a PNG. It reads whatever stages have written: a section whose inputs are absent is replaced by
a note saying which stage writes them, so a report can be made at any point of a run.

Example:
    >>> write_report("runs/demo-addition")  # doctest: +SKIP
    PosixPath('runs/demo-addition/report/index.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import tomllib
from matplotlib.figure import Figure

from polca.cluster import EXACT_KINDS, LCA_ARRAY, PROJECTED_TERMS, cumulate
from polca.evaluate import label_scores
from polca.report import figures
from polca.report.plateau import breaks_section, plateau_figure
from polca.report.text import add_text_section
from polca.stages.measures import ARRAY as MEASURES_ARRAY
from polca.stages.measures import read_measures
from polca.store import RunDir, atomic_write_bytes

# Columns of tokens.parquet that are not ground-truth labels.
TOKEN_FIELDS = ("token", "sequence", "position", "target", "text", "context")
MAX_TABLE_ROWS = 500
LONG_TABLE = 30  # evaluation tables with more rows start folded
EVALUATION_ORDER = ("carry", "hidden", "scores", "clusters")
# A label with more distinct values is not drawn as groups of curves (digit: 10 is fine).
MAX_GROUPS = 12

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
"""


@dataclass
class Page:
    """Sections of the page and the figures they show, collected before writing."""

    title: str
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
        toc = "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t, _ in self.sections)
        body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{b}</section>'
                       for a, t, b in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
                f"<h1>{esc(self.title)}</h1><nav><ul>{toc}</ul></nav>{body}</body></html>\n")


def write_report(run_dir, max_vectors: int = 6, examples: int | None = None) -> Path:
    """Write ``report/index.html`` (and its figures as PNG beside it) for the run ``run_dir``.

    ``max_vectors``: per clustering, how many basis vectors get figures (the first kept ones;
    every vector still gets its cluster table). ``examples``: example tokens per cluster
    (default: the config's ``report.examples_per_cluster``, else 10). Returns the page path.
    """
    run = RunDir(run_dir)
    data = RunData(run)
    if examples is None:
        examples = data.config_value(("report", "examples_per_cluster"), 10)
    page = Page(f"polca report: {data.config_value(('name',), run.root.name)}")
    page.add("Configuration", config_section(data))
    page.add("Training", training_section(data, page))
    page.add("Progress measures", measures_section(data, page) + breaks_section(
        run, page.figure, data.config_value(("cluster", "top_clusters"), 3)))
    page.add("Basis provenance", basis_section(data))
    page.add("Decomposition diagnostics", diagnostics_section(data, page))
    page.add("Evaluation", evaluation_section(data))
    page.add("Clusters", clusters_section(data, page, max_vectors, examples))
    add_text_section(page, run.root, examples)
    run.report.mkdir(parents=True, exist_ok=True)
    for name, png in page.figures.items():
        atomic_write_bytes(run.report / name, png)
    path = run.report / "index.html"
    atomic_write_bytes(path, page.render().encode("utf-8"))
    return path


# -- reading the run directory ------------------------------------------------------------------
class RunData:
    """Lazy, tolerant reader of what the stages wrote: every getter returns None if absent."""

    def __init__(self, run: RunDir):
        self.run = run
        self._arrays = None

    @cached_property
    def config_text(self) -> str | None:
        path = self.run.config_path
        return path.read_text() if path.is_file() else None

    def config_value(self, keys: tuple[str, ...], default):
        text = self.config_text
        if text is None:
            return default
        value = tomllib.loads(text)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    @cached_property
    def manifest(self) -> list[dict] | None:
        path = self.run.checkpoints / "manifest.json"
        return read_json(path).get("checkpoints") if path.is_file() else None

    @cached_property
    def tokens(self) -> pd.DataFrame | None:
        path = self.run.probe / "tokens.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    @cached_property
    def sequences(self) -> pd.DataFrame | None:
        path = self.run.probe / "sequences.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    def label_columns(self) -> list[str]:
        tokens = self.tokens
        return [] if tokens is None else [c for c in tokens.columns if c not in TOKEN_FIELDS]

    def arrays(self):
        if self._arrays is None and (self.run.root / "arrays.zarr").is_dir():
            self._arrays = self.run.arrays()
        return self._arrays

    def array(self, name: str) -> np.ndarray | None:
        arrays = self.arrays()
        return arrays.read(name) if arrays is not None and name in arrays else None

    def array_attrs(self, name: str) -> dict:
        arrays = self.arrays()
        return arrays.attrs(name) if arrays is not None and name in arrays else {}

    def steps(self) -> np.ndarray | None:
        """Training step of each checkpoint column of ``loss``."""
        steps = self.array_attrs("loss").get("steps")
        if steps is None and self.manifest:
            steps = [e["step"] for e in self.manifest]
        return None if steps is None else np.asarray(steps)

    def projected(self, kind: str, basis: str | None, vector: int) -> np.ndarray | None:
        """``[tokens, checkpoints]`` projected trajectory of one vector for a projected kind,
        cumulated from the interval terms as the cluster stage does; None if not computed."""
        if kind == "lca":
            names = (LCA_ARRAY,)
        elif kind in PROJECTED_TERMS and basis is not None:
            names = tuple(f"polca/{basis}/{term}" for term in PROJECTED_TERMS[kind])
        else:
            return None
        arrays = self.arrays()
        if arrays is None or not all(n in arrays for n in names):
            return None
        terms = sum(np.asarray(arrays.group[n][vector], dtype=np.float64) for n in names)
        return cumulate(terms[None])[0].T

    def explained_per_interval(self, basis: str, loss: np.ndarray) -> dict[str, np.ndarray]:
        """Per estimator the fraction of |ΔL| explained in each interval, ``[intervals]``:
        ``1 − Σ_x |ΔL[x, t] − Σ_b terms[b, t, x]| / Σ_x |ΔL[x, t]|``, read one interval at a
        time so that large runs fit in memory. Empty if the terms are absent or misaligned."""
        arrays = self.arrays()
        delta_loss = np.diff(loss, axis=1)  # [tokens, intervals]
        out = {}
        for estimator in ("first_order", "polca", "polca_paper", "integrated"):
            names = [f"polca/{basis}/{term}" for term in PROJECTED_TERMS[estimator]]
            if arrays is None or not all(n in arrays for n in names):
                continue
            shape = arrays.group[names[0]].shape
            if shape[1:] != delta_loss.shape[::-1]:
                continue
            explained = np.empty(shape[1])
            for t in range(shape[1]):
                allocated = sum(np.asarray(arrays.group[n][:, t, :], dtype=np.float64).sum(0)
                                for n in names)
                total = np.abs(delta_loss[:, t]).sum()
                residual = np.abs(delta_loss[:, t] - allocated).sum()
                explained[t] = 1.0 - residual / total if total > 0 else np.nan
            out[estimator] = explained
        return out

    def tau(self) -> float | None:
        """τ, the step after which the exact loss is flat, as the cluster stage recorded it."""
        for info in self.jsons(self.run.clusters).values():
            tau = (info.get("params") or {}).get("tau") if isinstance(info, dict) else None
            if tau is not None:
                return float(tau)
        return None

    def jsons(self, folder: Path) -> dict[str, dict]:
        return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() \
            else {}


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"error": f"could not read {path.name}: {err}"}


# -- sections -----------------------------------------------------------------------------------
def config_section(data: RunData) -> str:
    text = data.config_text
    if text is None:
        return note("no config.toml in the run directory")
    return f"<p>The resolved config of this run (<code>config.toml</code>):</p><pre>{esc(text)}</pre>"


def training_section(data: RunData, page: Page) -> str:
    parts = []
    manifest = data.manifest
    if manifest:
        last = manifest[-1]
        rows = [("checkpoints", len(manifest)), ("first step", manifest[0]["step"]),
                ("final step", last["step"]), ("final train loss", last.get("train_loss"))]
        parts.append(table(pd.DataFrame(rows, columns=["quantity", "value"]), "Training run"))
    else:
        parts.append(note("no checkpoints/manifest.json: run `polca train`"))
    tokens, loss, steps = data.tokens, data.array("loss"), data.steps()
    if tokens is None or loss is None or steps is None or loss.shape[1] != len(steps):
        parts.append(note("no exact token losses: run `polca trajectories`"))
        return "".join(parts)
    labels = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_GROUPS]
    group = labels[0] if labels else None
    groups = tokens[group].to_numpy() if group else None
    correct = data.array("correct")
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


def measures_section(data: RunData, page: Page) -> str:
    """The progress measures per checkpoint (METHOD §8), as the measures stage draws them."""
    arrays = data.arrays()
    if arrays is None or MEASURES_ARRAY not in arrays:
        return note("no progress measures: run `polca measures`")
    table_ = read_measures(data.run)
    return page.figure("progress_measures", plateau_figure(table_), "progress measures") + details(
        f"progress measures at {len(table_)} checkpoints",
        table(table_.reset_index(), "Progress measures per checkpoint"))


def basis_section(data: RunData) -> str:
    provenance = data.jsons(data.run.basis)
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
    interval, recomputed here from the stored terms and the exact losses."""
    diagnostics = data.jsons(data.run.root / "diagnostics")
    if not diagnostics:
        return note("no diagnostics/*.json: run `polca decompose`")
    rows = []
    for name, info in diagnostics.items():
        row = {"basis": name}
        for key, value in flatten(info).items():
            if key.startswith("estimators.") and key.endswith(".explained_fraction"):
                row[f"explained: {key.split('.')[1]}"] = value
            elif not isinstance(value, list) and key not in ("basis", "steps"):
                row[key] = value
            elif key == "zero_step_intervals":
                row[key] = len(value)
        rows.append(row)
    summary = pd.DataFrame(rows).set_index("basis").T.reset_index(names="quantity")
    parts = [table(summary, "Decomposition diagnostics per basis (explained: 1 − Σ|residual| / "
                            "Σ|ΔL| over tokens and intervals)")]
    loss, steps = data.array("loss"), data.steps()
    series = {}
    for name in diagnostics:
        if loss is not None:
            for estimator, values in data.explained_per_interval(name, loss).items():
                series[f"{name}: {estimator}"] = values
    if series and steps is not None:
        parts.append(page.figure("diagnostics_explained", figures.interval_series(
            steps[1:], series, ylabel="fraction of |ΔL| explained",
            title="Fraction of the exact loss change explained, per interval"),
            "fraction of |ΔL| explained per interval"))
    return "".join(parts)


def evaluation_section(data: RunData) -> str:
    folder = data.run.root / "evaluation"
    # the reproduction tables first, then any other table the evaluate stage wrote
    first = {name: i for i, name in enumerate(EVALUATION_ORDER)}
    csvs = sorted(folder.glob("*.csv") if folder.is_dir() else [],
                  key=lambda p: (first.get(p.stem, len(first)), p.stem))
    if not csvs:
        return note("no evaluation/*.csv: run `polca evaluate`")
    parts = []
    for path in csvs:
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            parts.append(note(f"{path.name}: unreadable ({err})"))
            continue
        rendered = table(frame, path.stem.replace("_", " ").replace("-", " "))
        parts.append(rendered if len(frame) <= LONG_TABLE else details(
            f"evaluation/{path.name}: {len(frame)} rows", rendered))
    return "".join(parts)


# -- clusters -----------------------------------------------------------------------------------
@dataclass
class Clustering:
    """One clustering: ``clusters/NAME.parquet`` ([vector,] token, label[, break_step]), the
    per-cluster ``NAME.breaks.parquet`` ([vector,] cluster, size, break_step, hidden) and the
    ``NAME.json`` of its parameters, as the cluster stage writes them."""

    name: str
    frame: pd.DataFrame
    info: dict
    cluster_breaks: pd.DataFrame | None

    @property
    def params(self) -> dict:
        return self.info.get("params") or {}

    @property
    def kind(self) -> str:
        return str(self.params.get("kind") or self.name)

    @property
    def basis(self) -> str | None:
        return self.params.get("basis")

    def vectors(self) -> list:
        return sorted(self.frame["vector"].unique()) if "vector" in self.frame else [None]

    def labels(self, vector, n_tokens: int) -> np.ndarray:
        """Cluster id per probe token (``[tokens]``; tokens absent from the file are -2)."""
        rows = self.frame if vector is None else self.frame[self.frame["vector"] == vector]
        out = np.full(n_tokens, -2, dtype=np.int64)
        out[rows["token"].to_numpy()] = rows["label"].to_numpy()
        return out

    def breaks(self, vector) -> pd.DataFrame | None:
        """Per cluster (index) size, break_step and hidden, or None if not recorded."""
        frame = self.cluster_breaks
        if frame is None or "cluster" not in frame:
            return None
        if vector is not None and "vector" in frame:
            frame = frame[frame["vector"] == vector]
        return frame.set_index("cluster")


def read_clusterings(run: RunDir) -> tuple[list[Clustering], list[str]]:
    """The clusterings in ``clusters/`` and notes on files that could not be used."""
    out, problems = [], []
    paths = sorted(run.clusters.glob("*.parquet")) if run.clusters.is_dir() else []
    for path in paths:
        if path.name.endswith(".breaks.parquet"):
            continue
        frame = pd.read_parquet(path)
        if not {"token", "label"} <= set(frame.columns):
            problems.append(f"{path.name} lacks the columns token and label "
                            f"(has {list(frame.columns)}); re-run `polca cluster`")
            continue
        side, breaks = path.with_suffix(".json"), path.with_suffix(".breaks.parquet")
        out.append(Clustering(path.stem, frame, read_json(side) if side.is_file() else {},
                              pd.read_parquet(breaks) if breaks.is_file() else None))
    return out, problems


def clusters_section(data: RunData, page: Page, max_vectors: int, examples: int) -> str:
    clusterings, problems = read_clusterings(data.run)
    tokens = data.tokens
    if not clusterings or tokens is None:
        return note("no clusters/*.parquet: run `polca cluster`") + "".join(map(note, problems))
    labels_cols = [c for c in data.label_columns() if tokens[c].nunique() <= MAX_GROUPS]
    parts = [*map(note, problems), homogeneity_overview(clusterings, tokens, labels_cols, page)]
    sequences = data.sequences
    problems = None
    if sequences is not None and "text" in sequences:
        problems = tokens["sequence"].map(dict(zip(sequences["sequence"], sequences["text"])))
    loss, steps = data.array("loss"), data.steps()
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


def homogeneity_overview(clusterings: list[Clustering], tokens: pd.DataFrame,
                         label_cols: list[str], page: Page) -> str:
    """Size-weighted purity per label for each clustering (its vectors pooled, each token
    counted once per vector it was clustered on), with the chance level beside it."""
    if not label_cols:
        return note("the probe tokens carry no labels: no homogeneity to show")
    rows, chance = {}, {}
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
    frame = pd.DataFrame.from_dict(rows, orient="index")
    img = page.figure("homogeneity", figures.homogeneity_bars(frame, chance),
                      "cluster homogeneity by label")
    return img + table(frame.reset_index(names="clustering"),
                       "Size-weighted homogeneity (purity) of clusters, by label; "
                       f"chance: {', '.join(f'{k} {v:.3f}' for k, v in chance.items())}")


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
    breaks = clustering.breaks(vector)
    break_steps = {} if breaks is None or "break_step" not in breaks else breaks["break_step"]
    title = clustering.name + ("" if vector is None else f", vector {vector}")
    parts = []
    if draw and loss is not None and steps is not None and loss.shape[1] == len(steps):
        name = f"clusters_{clustering.name}" + ("" if vector is None else f"_v{vector}")
        projected = (None if vector is None or clustering.kind in EXACT_KINDS
                     else data.projected(clustering.kind, clustering.basis, int(vector)))
        if projected is not None and projected.shape == loss.shape:
            parts.append(page.figure(name, figures.cluster_trajectories(
                steps, projected, loss, labels, breaks=dict(break_steps), title=title), title))
        else:
            top = [c for c in pd.Series(labels[labels >= 0]).value_counts().index[:3]]
            groups = np.where(np.isin(labels, top), labels, -1).astype(object)
            groups[groups == -1] = None
            parts.append(page.figure(name, figures.loss_curves(
                steps, loss, groups, "cluster",
                breaks={c: s for c, s in dict(break_steps).items() if c in top},
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
    names = {-1: "noise", -2: "filtered", -3: "vector dropped"}
    counts = pd.Series(labels[labels < 0]).value_counts().sort_index(ascending=False)
    return ", ".join(f"{names.get(int(k), k)}: {v}" for k, v in counts.items()) or "no noise"


# -- small HTML helpers ---------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple, np.ndarray)):
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value,
                          default=str)
    return str(value)


def table(frame: pd.DataFrame, caption: str, text_columns=(), nowrap_columns=()) -> str:
    """``frame`` as an escaped HTML table in a horizontally scrolling box; tables longer than
    ``MAX_TABLE_ROWS`` are cut with a note. ``nowrap_columns`` keep each line unbroken."""
    shown = frame.head(MAX_TABLE_ROWS)
    columns = list(shown.columns)
    texts = {c for c in columns if c in text_columns or c in nowrap_columns
             or not pd.api.types.is_numeric_dtype(shown[c])}
    head = "".join(f'<th class="{"text" if c in texts else ""}">{esc(c)}</th>' for c in columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for c, v in zip(columns, row):
            inner = esc(fmt(v)).replace("\n", "<br>")
            css = "nowrap" if c in nowrap_columns else "text" if c in texts else ""
            cells.append(f'<td class="{css}">{inner}</td>' if css else f"<td>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (f"<p class=\"note\">{len(frame) - len(shown)} more rows not shown</p>"
            if len(frame) > len(shown) else "")
    return (f'<div class="scroll"><table><caption>{esc(caption)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>{more}")


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys (lists and scalars are leaves)."""
    if not isinstance(obj, dict):
        return {prefix or "value": obj}
    out = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out
