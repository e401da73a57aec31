"""POS-labelled cluster tables of a text run, as the paper's Figure 6 (METHOD §7, paper §5.1).

For every clustering of a run whose probe tokens carry POS columns (``pos``, ``pos_4gram``:
the text task with ``pos_tags = true``), each cluster gets its POS pattern label, its most
common target tokens and the contexts of the members closest to its medoid
(:func:`polca.label.cluster_labels`, on the trajectories that were clustered).
:func:`pos_cluster_table` builds that table from a run directory (the evaluate stage saves it as
``evaluation/pos_clusters.parquet``); :func:`text_section` renders it as an HTML fragment: a
summary of the labels found, then one block per basis vector with its POLCA clusters and the
exact-loss clusters beside them for contrast.

Example:
    >>> table = pos_cluster_table("runs/demo-text")          # doctest: +SKIP
    >>> table.groupby("name")["simple"].mean()               # doctest: +SKIP
    >>> html_fragment = text_section("runs/demo-text")        # doctest: +SKIP
"""

from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd

from polca import cluster as C
from polca.label import cluster_labels
from polca.store import RunDir

POS_COLUMNS = ("pos", "pos_4gram")
LABELS_FILE = "pos_clusters.parquet"  # under evaluation/
# the projected kind shown per basis vector, first found; the table holds every kind
SHOWN_KINDS = ("polca", "polca_paper", "first_order", "integrated")
CONTEXT_CHARS = 60  # context characters shown before each example target
COLUMNS = ["name", "kind", "basis", "vector", "cluster", "size", "break_step", "hidden",
           "label", "simple", "pattern", "top_targets", "top_target_counts", "medoid",
           "examples", "example_contexts", "example_targets"]


def has_pos(tokens: pd.DataFrame | None) -> bool:
    """Whether a probe token table carries the POS columns the labels need."""
    return tokens is not None and all(c in tokens.columns for c in (*POS_COLUMNS, "context"))


def pos_cluster_table(run_dir, examples: int = 10) -> pd.DataFrame:
    """One row per cluster of every clustering in ``clusters/`` (per vector for projected
    kinds), with the clustering's ``name``, ``kind``, ``basis``, ``vector`` (-1 for exact
    kinds), the cluster's ``size``, mean ``break_step`` and ``hidden`` flag from the cluster
    stage, and the columns of :func:`polca.label.cluster_labels` (``label``, ``simple``,
    ``pattern`` as "|"-joined tag sets, ``top_targets``, ``examples``, ...).

    Raises ValueError when the probe tokens have no POS columns.
    """
    run = RunDir(run_dir)
    tokens = run.read_tokens()
    if not has_pos(tokens):
        raise ValueError(f"{run.probe / 'tokens.parquet'} has no POS columns {POS_COLUMNS}: "
                         "they come from the text task with task.options.pos_tags = true")
    arrays = run.arrays()
    loss = arrays.read("loss")
    frames = []
    for path in sorted(run.clusters.glob("*.json")):
        params = json.loads(path.read_text()).get("params", {})
        name, kind = params.get("name", path.stem), params.get("kind", path.stem)
        assigned = pd.read_parquet(path.with_suffix(".parquet"))
        breaks_path = path.with_name(f"{name}.breaks.parquet")
        breaks = pd.read_parquet(breaks_path) if breaks_path.is_file() else None
        vectors = sorted(assigned["vector"].unique()) if "vector" in assigned else [None]
        for vector in vectors:
            rows = assigned if vector is None else assigned[assigned["vector"] == vector]
            labels = np.full(len(tokens), C.NOISE, dtype=np.int64)
            labels[rows["token"].to_numpy()] = rows["label"].to_numpy()
            if not (labels >= 0).any():
                continue
            trajectories = _trajectories(arrays, loss, kind, params.get("sources"), vector)
            table = cluster_labels(tokens, labels, trajectories, n_examples=examples)
            table = table.assign(pattern=[" ".join("|".join(s) for s in p)
                                          for p in table["pattern"]])
            table = _with_breaks(table, breaks, vector)
            frames.append(table.assign(name=name, kind=kind, basis=params.get("basis"),
                                       vector=-1 if vector is None else int(vector)))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def _trajectories(arrays, loss: np.ndarray, kind: str, sources, vector) -> np.ndarray:
    """``[tokens, features]`` what the cluster stage clustered for ``kind`` (and ``vector``)."""
    if kind in C.EXACT_KINDS:
        return C.exact_trajectories(loss, kind)
    terms = sum(np.asarray(arrays.group[s][int(vector)], dtype=np.float64) for s in sources)
    return C.cumulate(terms[None])[0].T


def _with_breaks(table: pd.DataFrame, breaks: pd.DataFrame | None, vector) -> pd.DataFrame:
    if breaks is None:
        return table.assign(break_step=np.nan, hidden=False)
    if vector is not None and "vector" in breaks:
        breaks = breaks[breaks["vector"] == vector]
    by_cluster = breaks.set_index("cluster")
    return table.assign(break_step=table["cluster"].map(by_cluster["break_step"]),
                        hidden=table["cluster"].map(by_cluster["hidden"]).fillna(False)
                        .astype(bool))


def label_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per clustering: clusters, clusters with a simple label (count and fraction), hidden
    breakthroughs and hidden ones with a simple label."""
    if not len(table):
        return pd.DataFrame(columns=["name", "clusters", "simple", "simple_fraction", "hidden",
                                     "hidden_simple"])
    hidden = table["hidden"].astype(bool)
    grouped = table.assign(hidden=hidden, hidden_simple=hidden & table["simple"].astype(bool))
    out = grouped.groupby("name", sort=True).agg(
        clusters=("cluster", "size"), simple=("simple", "sum"), hidden=("hidden", "sum"),
        hidden_simple=("hidden_simple", "sum")).reset_index()
    out.insert(3, "simple_fraction", out["simple"] / out["clusters"])
    return out


def labels_found(table: pd.DataFrame) -> pd.DataFrame:
    """The simple labels found, with how many clusters carry each, their tokens in total and
    their share of the probe tokens clustered (coverage), over all clusterings."""
    simple = table[table["simple"].astype(bool)]
    out = simple.groupby("label").agg(clusters=("cluster", "size"), tokens=("size", "sum"),
                                      clusterings=("name", lambda s: ", ".join(sorted(set(s)))))
    out.insert(2, "coverage", out["tokens"] / table["size"].sum() if len(table) else np.nan)
    return out.sort_values(["tokens", "clusters"], ascending=False).reset_index()


# -- HTML ---------------------------------------------------------------------------------------
def text_section(run_dir, table: pd.DataFrame | None = None, examples: int = 10) -> str:
    """The HTML fragment of the POS-labelled clusters of ``run_dir`` ("" when the probe tokens
    have no POS columns). ``table``: a :func:`pos_cluster_table`; default
    ``evaluation/pos_clusters.parquet`` when the evaluate stage wrote it, else computed."""
    run = RunDir(run_dir)
    path = run.probe / "tokens.parquet"
    if not path.is_file() or not has_pos(pd.read_parquet(path, columns=None)):
        return ""
    if table is None:
        saved = run.evaluation / LABELS_FILE
        if saved.is_file():
            table = pd.read_parquet(saved)
        elif run.clusters.is_dir() and any(run.clusters.glob("*.json")):
            table = pos_cluster_table(run.root, examples)
        else:
            return _note("no clusters/*.json: run `polca cluster` for POS-labelled clusters")
    if not len(table):
        return _note("no clustering found any cluster: nothing to label")
    parts = [
        ("<p>Each cluster's label is its POS pattern: at each of the target's three preceding "
        "tokens and the target, the smallest set of tags covering 70% of the members; "
        "<b>simple</b> when every set has at most two tags (PAD not counted). Examples are the "
        "members closest to the cluster's medoid: context, then the target in bold. "
        f"Saved as <code>evaluation/{LABELS_FILE}</code> by <code>polca evaluate</code>.</p>"),
        _table(label_summary(table), "Clusters with a simple POS label, per clustering"),
        _table(labels_found(table), "Simple POS labels found, over all clusterings "
               "(coverage: their tokens / all clustered tokens)"),
    ]
    exact = _exact_name(table)
    exact_html = (_cluster_table(table[table["name"] == exact], f"exact {exact} clusters")
                  if exact else _note("no exact-loss clustering to compare with"))
    blocks = 0
    for basis in sorted(b for b in table["basis"].dropna().unique()):
        shown = _shown_name(table, basis)
        if shown is None:
            continue
        rows = table[table["name"] == shown]
        for vector in sorted(rows["vector"].unique()):
            polca_html = _cluster_table(rows[rows["vector"] == vector],
                                        f"{shown}, vector {vector}")
            parts.append(
                f"<details><summary>{_esc(shown)}, vector {int(vector)}: "
                f"{int((rows['vector'] == vector).sum())} clusters</summary>"
                '<div style="display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap">'
                f"<div>{polca_html}</div><div>{exact_html}</div></div></details>")
            blocks += 1
    if not blocks and exact:
        parts.append(_note("no POLCA clustering has clusters; the exact-loss clusters:")
                     + exact_html)
    return "".join(parts)


def add_text_section(page, run_dir, examples: int = 10) -> None:
    """Add :func:`text_section` to a report page (anything with ``add(title, html)``) when the
    run's probe tokens carry POS columns."""
    body = text_section(run_dir, examples=examples)
    if body:
        page.add("POS-labelled clusters", body)


def _exact_name(table: pd.DataFrame) -> str | None:
    names = set(table["name"])
    return next((k for k in C.EXACT_KINDS if k in names), None)


def _shown_name(table: pd.DataFrame, basis: str) -> str | None:
    names = set(table.loc[table["basis"] == basis, "name"])
    return next((f"{k}-{basis}" for k in SHOWN_KINDS if f"{k}-{basis}" in names), None)


def _cluster_table(rows: pd.DataFrame, caption: str) -> str:
    """Figure 6 style: label, size, break step, top tokens, contexts closest to the medoid."""
    body = []
    for row in rows.sort_values("cluster").itertuples(index=False):
        tops = ", ".join(f"{_show(t)} ({c})" for t, c in zip(row.top_targets,
                                                              row.top_target_counts))
        contexts = "<br>".join(
            f"{_esc(_tail(c))}<b>{_esc(_show(t))}</b>"
            for c, t in zip(row.example_contexts, row.example_targets))
        step = "—" if pd.isna(row.break_step) else f"{row.break_step:.0f}"
        flag = ' <span class="hidden">hidden</span>' if row.hidden else ""
        label = f"<b>{_esc(row.label)}</b>" if row.simple else _esc(row.label)
        body.append(f"<tr><td>{int(row.cluster)}</td><td>{int(row.size)}</td>"
                    f"<td>{step}{flag}</td><td class=\"text\">{label}</td>"
                    f"<td class=\"text\">{_esc(tops)}</td>"
                    f"<td class=\"nowrap\">{contexts}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("cluster", "size", "break step", "POS label",
                                            "top targets", "closest to the medoid"))
    return (f'<div class="scroll"><table><caption>{_esc(caption)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return (f'<div class="scroll"><table><caption>{_esc(caption)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div>")


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return str(value)


def _tail(context: str) -> str:
    """The last ``CONTEXT_CHARS`` characters of a context, "…" first when cut."""
    context = str(context)
    cut = len(context) > CONTEXT_CHARS
    return ("…" if cut else "") + _show(context[-CONTEXT_CHARS:])


def _show(text: str) -> str:
    """Whitespace made visible: a line break shows as ↵."""
    return str(text).replace("\r", "").replace("\n", "↵")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'
