"""Stage `evaluate`: every clustering in ``clusters/`` against the probe set's known labels.

Writes under ``<run>/evaluation/``:

* ``scores.csv``: per clustering, vector and label column: n_clustered, n_clusters,
  weighted_purity, max_purity, chance, ari, v_measure (noise and filtered tokens excluded);
* ``clusters.csv``: per cluster: size, break_step, hidden, and per label column its majority
  value and purity;
* ``carry.csv`` (token tables with ``carry`` and ``place``): the paper's table rows, ours beside
  the paper's (``paper_*``; see :mod:`polca.evaluate` for the metric);
* ``hidden.csv``: per clustering the fraction of clusters with a hidden breakthrough, with τ, Δ
  and the paper's fraction;
* ``summary.json``: the same tables as records;
* ``pos_clusters.parquet`` (token tables with POS columns, the text task): every cluster's POS
  label, top targets and contexts nearest its medoid (:mod:`polca.report.text`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from polca import evaluate as E
from polca.report.text import LABELS_FILE, has_pos, pos_cluster_table
from polca.store import StoreError, atomic_write_bytes, atomic_write_json, atomic_write_parquet

NOT_LABELS = ("token", "sequence", "position", "target", "text", "context")
MAX_LABEL_VALUES = 100


def run_evaluate(ctx, labels=None, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Evaluate all clusterings of the run; returns and writes the tables (see module doc).

    ``labels``: the token-table columns to score; default the task's ``label_columns``, else
    every bool/int/string column with 2..100 distinct values.
    """
    tokens = ctx.run.read_tokens()
    columns = _label_columns(tokens, labels, getattr(getattr(ctx, "task", None),
                                                     "label_columns", None))
    results = sorted(p for p in ctx.run.clusters.glob("*.json"))
    if not results:
        raise StoreError(f"no clusterings in {ctx.run.clusters}: run `polca cluster` first")
    top = ctx.cfg.cluster.top_clusters
    scores, clusters, carry, hidden = [], [], [], []
    for path in tqdm(results, desc="evaluate", unit="clustering", disable=not progress):
        meta = json.loads(path.read_text())
        # the paper's numbers are for its addition task only: other tasks get no paper column
        params = dict(meta["params"], addition=ctx.cfg.task.kind == "addition")
        name = params["name"]
        assigned = pd.read_parquet(path.with_suffix(".parquet"))
        breaks = pd.read_parquet(path.with_name(f"{name}.breaks.parquet"))
        per_vector = "vector" in assigned.columns
        by_vector = _labels_by_vector(assigned, len(tokens), name)
        head = {"name": name, "kind": params["kind"], "basis": params["basis"]}
        for vector, lab in by_vector.items():
            for column in columns:
                scores.append(dict(head, vector=vector, label=column,
                                   **E.label_scores(lab, tokens[column].to_numpy())))
            clusters.append(_cluster_rows(head, vector, lab, breaks, tokens, columns))
        hidden.append(dict(head, n_clusters=meta["n_clusters"], n_hidden=meta["n_hidden"],
                           hidden_fraction=meta["hidden_fraction"], tau=params["tau"],
                           delta=params["delta"],
                           paper=_paper(params, "hidden_fraction")))
        if {"carry", "place"} <= set(tokens.columns):
            table = E.carry_table(by_vector, tokens["carry"].to_numpy(),
                                  tokens["place"].to_numpy(), top=top, per_vector=per_vector)
            carry.append(_with_paper(table, head, params))
    tables = {
        "scores": pd.DataFrame(scores),
        "clusters": pd.concat(clusters, ignore_index=True) if clusters else pd.DataFrame(),
        "carry": pd.concat(carry, ignore_index=True) if carry else pd.DataFrame(),
        "hidden": pd.DataFrame(hidden),
    }
    folder = ctx.run.evaluation
    for key, frame in tables.items():
        atomic_write_bytes(folder / f"{key}.csv", frame.to_csv(index=False).encode())
    atomic_write_json(folder / "summary.json", {
        key: json.loads(frame.to_json(orient="records")) for key, frame in tables.items()})
    if has_pos(tokens):
        atomic_write_parquet(folder / LABELS_FILE, pos_cluster_table(
            ctx.run.root, ctx.cfg.report.examples_per_cluster))
    return tables


def format_tables(tables: dict[str, pd.DataFrame]) -> str:
    """The evaluation as plain text for the CLI: paper table, hidden breakthroughs, and per
    clustering and label the scores averaged over its vectors."""
    parts = []
    carry = tables.get("carry")
    if carry is not None and len(carry):
        parts.append(E.format_table(
            carry[["name", "rank", "vector", "cluster", "size", "homogeneity", "paper_homogeneity",
                   "recall", "paper_recall", "f1", "paper_f1"]],
            "Carry clusters (paper Appendix G metric; paper_* = the paper's addition values)"))
    hidden = tables.get("hidden")
    if hidden is not None and len(hidden):
        parts.append(E.format_table(
            hidden[["name", "n_clusters", "n_hidden", "hidden_fraction", "paper", "tau",
                    "delta"]],
            "Hidden breakthroughs (cluster mean break step > tau)"))
    scores = tables.get("scores")
    if scores is not None and len(scores):
        summary = (scores.dropna(subset=["ari"])
                   .groupby(["name", "label"], sort=False)[
                       ["weighted_purity", "chance", "ari", "v_measure", "n_clusters"]]
                   .mean().reset_index())
        parts.append(E.format_table(summary, "Agreement with labels (mean over vectors; noise "
                                             "and filtered tokens excluded)"))
    return "\n".join(parts)


def _label_columns(tokens: pd.DataFrame, labels, task_labels) -> list[str]:
    if labels is not None:
        missing = [c for c in labels if c not in tokens.columns]
        if missing:
            raise StoreError(f"label columns {missing} are not in tokens.parquet (has "
                             f"{list(tokens.columns)})")
        return list(labels)
    if task_labels:
        return [c for c in task_labels if c in tokens.columns]
    return [c for c in tokens.columns if c not in NOT_LABELS
            and (tokens[c].dtype == bool or pd.api.types.is_integer_dtype(tokens[c])
                 or pd.api.types.is_string_dtype(tokens[c]))
            and 2 <= tokens[c].nunique() <= MAX_LABEL_VALUES]


def _labels_by_vector(assigned: pd.DataFrame, n_tokens: int, name: str) -> dict:
    groups = assigned.groupby("vector") if "vector" in assigned.columns else [(None, assigned)]
    out = {}
    for vector, frame in groups:
        frame = frame.sort_values("token")
        if not np.array_equal(frame["token"].to_numpy(), np.arange(n_tokens)):
            raise StoreError(f"clusters/{name}.parquet does not cover the {n_tokens} probe "
                             "tokens (probe set changed?); delete it and run `polca cluster`")
        out[None if vector is None else int(vector)] = frame["label"].to_numpy()
    return out


def _cluster_rows(head, vector, labels, breaks, tokens, columns) -> pd.DataFrame:
    if vector is not None:
        breaks = breaks[breaks["vector"] == vector]
    rows = breaks.drop(columns=[c for c in ("vector",) if c in breaks]).copy()
    for column in columns:
        table = E.purity_table(labels, tokens[column].to_numpy()).set_index("cluster")
        rows[f"majority_{column}"] = rows["cluster"].map(table["majority"])
        rows[f"purity_{column}"] = rows["cluster"].map(table["purity"])
    return rows.assign(**head, vector=vector)


def _paper(params, field, rank=1):
    row = E.paper_row(params["kind"], params["basis"]) if params.get("addition") else None
    if row is None:
        return None
    value = row[field]
    if isinstance(value, tuple):
        return value[rank - 1] if rank <= len(value) else None
    return value if rank == 1 else None


def _with_paper(table: pd.DataFrame, head: dict, params: dict) -> pd.DataFrame:
    table = table.assign(**head)
    row = E.paper_row(params["kind"], params["basis"]) if params.get("addition") else None
    table["paper_row"] = row["row"] if row else None
    for field in ("homogeneity", "recall", "f1"):
        table[f"paper_{field}"] = [_paper(params, field, int(r)) for r in table["rank"]]
    return table
