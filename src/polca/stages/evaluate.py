"""Stage `evaluate`: every clustering in the run against the probe set's known labels.

Writes through the contract (:meth:`polca.store.RunDir.write_evaluation`) the tables

* ``scores``: per clustering, vector and label column: n_clustered, n_clusters,
  weighted_purity, max_purity, chance, ari, v_measure (noise and filtered tokens excluded);
* ``clusters``: per cluster: size, break_step, hidden, and per label column its majority
  value and purity;
* ``carry`` (token tables with ``carry`` and ``place``): the paper's table rows, ours beside
  the paper's (``paper_*``; see :mod:`polca.evaluate` for the metric);
* ``hidden``: per clustering the fraction of clusters with a hidden breakthrough, with τ, Δ
  and the paper's fraction;

and, for token tables with POS columns (the text task), every cluster's POS label, top
targets and contexts nearest its medoid (:func:`pos_cluster_table`). The evaluation is kept
while the clusterings and labels it was made from are unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polca import cluster as C
from polca import evaluate as E
from polca import progress as P
from polca.label import POS_COLUMNS, cluster_labels, has_pos
from polca.store import LOSS, TRAJECTORY_KINDS, StoreError

POS_TABLE_COLUMNS = ["name", "kind", "basis", "vector", "cluster", "size", "break_step",
                     "hidden", "label", "simple", "pattern", "top_targets", "top_target_counts",
                     "medoid", "examples", "example_contexts", "example_targets"]


def run_evaluate(ctx, labels=None, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Evaluate all clusterings of the run; returns and writes the tables (see module doc).

    ``labels``: the token-table columns to score; default the run's label columns
    (:meth:`polca.store.RunDir.label_columns`).
    """
    run = ctx.run
    tokens = run.read_tokens()
    columns = _label_columns(run, tokens, labels)
    names = run.clustering_names()
    if not names:
        raise StoreError(f"no clusterings in {run.clusters}: run `polca cluster` first")
    top = ctx.cfg.cluster.top_clusters
    examples = ctx.cfg.report.examples_per_cluster
    addition = ctx.cfg.task.kind == "addition"
    inputs = {"clusterings": {n: run.version(f"cluster/{n}") for n in names},
              "probe": run.probe_sha256(), "labels": columns, "top": top,
              "examples": examples if has_pos(tokens) else None, "addition": addition}
    if run.is_current("evaluate", inputs) and run.has_evaluation():
        P.bar(progress, len(names), len(names), "evaluate", "clustering").close()
        return run.read_evaluation()
    run.refresh("evaluate", inputs, discard=run.discard_evaluation,
                exists=run.has_evaluation() or bool(run.evaluation_names()))
    scores, clusters, carry, hidden = [], [], [], []
    bar = P.bar(progress, len(names), 0, "evaluate", "clustering")
    for name in names:
        clustering = run.read_clustering(name)
        # the paper's numbers are for its addition task only: other tasks get no paper column
        params = dict(clustering.params, addition=addition)
        per_vector = "vector" in clustering.frame.columns
        by_vector = clustering.labels_by_vector(len(tokens))
        head = {"name": name, "kind": params["kind"], "basis": params["basis"]}
        for vector, lab in by_vector.items():
            for column in columns:
                scores.append(dict(head, vector=vector, label=column,
                                   **E.label_scores(lab, tokens[column].to_numpy())))
            clusters.append(_cluster_rows(head, vector, lab, clustering.breaks, tokens,
                                          columns))
        meta = clustering.info
        hidden.append(dict(head, n_clusters=meta["n_clusters"], n_hidden=meta["n_hidden"],
                           hidden_fraction=meta["hidden_fraction"], tau=params["tau"],
                           delta=params["delta"],
                           paper=_paper(params, "hidden_fraction")))
        if {"carry", "place"} <= set(tokens.columns):
            table = E.carry_table(by_vector, tokens["carry"].to_numpy(),
                                  tokens["place"].to_numpy(), top=top, per_vector=per_vector)
            carry.append(_with_paper(table, head, params))
        bar.update()
    bar.close()
    tables = {
        "scores": pd.DataFrame(scores),
        "clusters": pd.concat(clusters, ignore_index=True) if clusters else pd.DataFrame(),
        "hidden": pd.DataFrame(hidden),
    }
    if carry:  # the paper's carry table: only for tokens labelled with carry and place
        tables["carry"] = pd.concat(carry, ignore_index=True)
    run.write_evaluation(tables, pos_cluster_table(run, examples) if has_pos(tokens) else None)
    return tables


def pos_cluster_table(run, examples: int = 10) -> pd.DataFrame:
    """One row per cluster of every clustering of ``run`` (a :class:`~polca.store.RunDir`;
    per vector for kinds with a basis), with the clustering's ``name``, ``kind``, ``basis``,
    ``vector`` (-1 for kinds without one), the cluster's ``size``, mean ``break_step`` and
    ``hidden`` flag from the cluster stage, and the columns of
    :func:`polca.label.cluster_labels` (``label``, ``simple``, ``pattern`` as "|"-joined tag
    sets, ``top_targets``, ``examples``, ...), computed on the trajectories that were clustered.

    Raises ValueError when the probe tokens have no POS columns.
    """
    tokens = run.read_tokens()
    if not has_pos(tokens):
        raise ValueError(f"the probe tokens of {run.root} have no POS columns {POS_COLUMNS}: "
                         "they come from the text task with task.options.pos_tags = true")
    loss = run.arrays().read(LOSS)
    frames = []
    for clustering in run.read_clusterings()[0]:
        kind = clustering.kind
        for vector in clustering.vectors():
            labels = clustering.labels(vector, len(tokens))
            if not (labels >= 0).any():
                continue
            if TRAJECTORY_KINDS[kind].source == "loss":
                trajectories = C.exact_trajectories(loss, kind)
            else:
                trajectories = run.projected(kind, clustering.basis, slice(vector, vector + 1))[0].T
            table = cluster_labels(tokens, labels, trajectories, n_examples=examples)
            table = table.assign(pattern=[" ".join("|".join(s) for s in p)
                                          for p in table["pattern"]])
            table = _with_breaks(table, clustering.breaks_of(vector))
            frames.append(table.assign(name=clustering.name, kind=kind, basis=clustering.basis,
                                       vector=-1 if vector is None else int(vector)))
    if not frames:
        return pd.DataFrame(columns=POS_TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[POS_TABLE_COLUMNS]


def _with_breaks(table: pd.DataFrame, breaks: pd.DataFrame | None) -> pd.DataFrame:
    if breaks is None:
        return table.assign(break_step=np.nan, hidden=False)
    return table.assign(break_step=table["cluster"].map(breaks["break_step"]),
                        hidden=table["cluster"].map(breaks["hidden"]).fillna(False)
                        .astype(bool))



def _label_columns(run, tokens: pd.DataFrame, labels) -> list[str]:
    if labels is None:
        return run.label_columns(tokens)
    missing = [c for c in labels if c not in tokens.columns]
    if missing:
        raise StoreError(f"label columns {missing} are not in the probe tokens (has "
                         f"{list(tokens.columns)})")
    return list(labels)


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
