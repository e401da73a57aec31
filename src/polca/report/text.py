"""POS-labelled cluster tables of a text run, as the paper's Figure 6 (METHOD §7, paper §5.1).

The evaluate stage labels every cluster of a run whose probe tokens carry POS columns
(:func:`polca.stages.evaluate.pos_cluster_table`, saved with the evaluation);
:func:`text_section` renders that table as an HTML fragment: a summary of the labels found,
then one block per basis vector with its POLCA clusters and the exact-loss clusters beside
them for contrast.

Example:
    >>> html_fragment = text_section(RunDir("runs/demo-text"))        # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polca.label import has_pos
from polca.report.markup import esc, note, table
from polca.store import TRAJECTORY_KINDS, RunDir

# the projected kind shown per basis vector, first found; the table holds every kind
SHOWN_KINDS = ("polca", "polca_paper", "first_order", "integrated")
CONTEXT_CHARS = 60  # context characters shown before each example target
EXACT_KINDS = tuple(k for k, spec in TRAJECTORY_KINDS.items() if spec.source == "loss")


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
def text_section(run, table_: pd.DataFrame | None = None, examples: int = 10) -> str:
    """The HTML fragment of the POS-labelled clusters of ``run`` (a :class:`RunDir` or its
    path; "" when the probe tokens have no POS columns). ``table_``: the POS cluster table;
    default the one the evaluate stage saved."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.has_probe() or not has_pos(run.read_tokens()):
        return ""
    if table_ is None:
        table_ = run.read_pos_clusters()
        if table_ is None:
            return note("no POS cluster table: run `polca evaluate` for POS-labelled clusters")
    if not len(table_):
        return note("no clustering found any cluster: nothing to label")
    parts = [
        ("<p>Each cluster's label is its POS pattern: at each of the target's three preceding "
        "tokens and the target, the smallest set of tags covering 70% of the members; "
        "<b>simple</b> when every set has at most two tags (PAD not counted). Examples are the "
        "members closest to the cluster's medoid: context, then the target in bold. "
        "Saved as <code>evaluation/pos_clusters.parquet</code> by <code>polca evaluate</code>."
        "</p>"),
        table(label_summary(table_), "Clusters with a simple POS label, per clustering",
              digits=3),
    ]
    found = labels_found(table_)
    parts.append(table(found, "Simple POS labels found, over all clusterings (coverage: their "
                              "tokens / all clustered tokens)", digits=3) if len(found) else
                 note("no cluster has a simple POS label (at most two tags at each of the "
                      "four positions)"))
    exact = _exact_name(table_)
    exact_html = (_cluster_table(table_[table_["name"] == exact], f"exact {exact} clusters")
                  if exact else note("no exact-loss clustering to compare with"))
    blocks = 0
    for basis in sorted(b for b in table_["basis"].dropna().unique()):
        shown = _shown_name(table_, basis)
        if shown is None:
            continue
        rows = table_[table_["name"] == shown]
        for vector in sorted(rows["vector"].unique()):
            polca_html = _cluster_table(rows[rows["vector"] == vector],
                                        f"{shown}, vector {vector}")
            parts.append(
                f"<details><summary>{esc(shown)}, vector {int(vector)}: "
                f"{int((rows['vector'] == vector).sum())} clusters</summary>"
                '<div style="display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap">'
                f"<div>{polca_html}</div><div>{exact_html}</div></div></details>")
            blocks += 1
    if not blocks and exact:
        parts.append(note("no POLCA clustering has clusters; the exact-loss clusters:")
                     + exact_html)
    return "".join(parts)


def add_text_section(page, run, examples: int = 10) -> None:
    """Add :func:`text_section` to a report page (anything with ``add(title, html)``) when the
    run's probe tokens carry POS columns."""
    body = text_section(run, examples=examples)
    if body:
        page.add("POS-labelled clusters", body)


def _exact_name(table: pd.DataFrame) -> str | None:
    names = set(table["name"])
    return next((k for k in EXACT_KINDS if k in names), None)


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
            f"{esc(_tail(c))}<b>{esc(_show(t))}</b>"
            for c, t in zip(row.example_contexts, row.example_targets))
        step = "—" if pd.isna(row.break_step) else f"{row.break_step:.0f}"
        flag = ' <span class="hidden">hidden</span>' if row.hidden else ""
        label = f"<b>{esc(row.label)}</b>" if row.simple else esc(row.label)
        body.append(f"<tr><td>{int(row.cluster)}</td><td>{int(row.size)}</td>"
                    f"<td>{step}{flag}</td><td class=\"text\">{label}</td>"
                    f"<td class=\"text\">{esc(tops)}</td>"
                    f"<td class=\"nowrap\">{contexts}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("cluster", "size", "break step", "POS label",
                                            "top targets", "closest to the medoid"))
    return (f'<div class="scroll"><table><caption>{esc(caption)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _tail(context: str) -> str:
    """The last ``CONTEXT_CHARS`` characters of a context, "…" first when cut."""
    context = str(context)
    cut = len(context) > CONTEXT_CHARS
    return ("…" if cut else "") + _show(context[-CONTEXT_CHARS:])


def _show(text: str) -> str:
    """Whitespace made visible: a line break shows as ↵."""
    return str(text).replace("\r", "").replace("\n", "↵")
