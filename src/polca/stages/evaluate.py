"""Stage `evaluate`: every clustering in the run against the probe set's known labels.

Writes through the contract (:meth:`polca.store.RunDir.write_evaluation`) the tables

* ``scores``: per clustering, vector and label column: n_clustered, n_clusters,
  weighted_purity, max_purity, chance, ari, v_measure (noise and filtered tokens excluded);
* ``clusters``: per cluster: size, break_step, hidden, and per label column its majority
  value and purity;
* ``carry`` (token tables with ``carry`` and ``place``): the paper's table rows, ours beside
  the paper's (``paper_*``; see :mod:`polca.evaluate` for the metric);
* ``label-<column>``: the same metric (homogeneity, recall, F1 of the top clusters,
  :func:`polca.evaluate.label_table`) for every binary label named in ``evaluate.labels``
  (with its positive value, grouping column and skill groups) and, with
  ``evaluate.auto_binary``, every other two-valued label column (positive: True / 1, else
  the rarer value; :func:`polca.evaluate.default_positive`);
* ``hidden``: per clustering the fraction of clusters with a hidden breakthrough, with τ, Δ
  and the paper's fraction;
* ``skill_signal``: for every stored trajectory kind (clustered or not; per basis vector for
  kinds with a basis) and every labelled probe set (:func:`signal_targets`: carry within
  place, each binary label within its group, a text run's POS and POS 4-gram), a supervised
  probe's cross-validated balanced accuracy with its chance level and interval
  (:func:`polca.signal.skill_signal`; over m vectors the interval's confidence is
  1 − 0.05/m, so the best vector is not favoured; there is no correction over places, labels
  or kinds): whether the label is visible in the trajectories at all, whatever HDBSCAN makes
  of them;

and, for token tables with POS columns (the text task), every cluster's POS label, top
targets and contexts nearest its medoid (:func:`pos_cluster_table`). The evaluation is kept
while the clusterings and labels it was made from are unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from polca import cluster as C
from polca import evaluate as E
from polca import progress as P
from polca.config import BinaryLabelConfig, ConfigError
from polca.label import POS_COLUMNS, cluster_labels, has_pos
from polca.signal import skill_signal
from polca.store import LOSS, TRAJECTORY_KINDS, StoreError, clustering_name, kind_arrays

SIGNAL_TABLE = "skill_signal"
# the diagnostic's settings (recorded with the evaluation's inputs: a change recomputes it)
SIGNAL = {"probe": "knn", "n_splits": 5, "seed": 0, "alpha": 0.05}

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
    paper_carry = {"carry", "place"} <= set(tokens.columns)
    binary = binary_labels(tokens, columns, ctx.cfg.evaluate, paper_carry)
    stored = list(stored_kinds(run))
    products = sorted({"trajectories", *(f"decompose/{basis or 'lca'}"
                                         for _, kind, basis in stored if kind not in C.EXACT_KINDS)})
    inputs = {"clusterings": {n: run.version(f"cluster/{n}") for n in names},
              "signal": dict(SIGNAL, arrays={p: run.version(p) for p in products}),
              "probe": run.probe_sha256(), "labels": columns, "top": top,
              "examples": examples if has_pos(tokens) else None, "addition": addition,
              **({"binary": [b.model_dump(mode="json") for b in binary]} if binary else {})}
    if run.is_current("evaluate", inputs) and run.has_evaluation():
        P.bar(progress, len(names), len(names), "evaluate", "clustering").close()
        return run.read_evaluation()
    run.refresh("evaluate", inputs, discard=run.discard_evaluation,
                exists=run.has_evaluation() or bool(run.evaluation_names()))
    scores, clusters, carry, hidden = [], [], [], []
    positives = {b.column: _positive(tokens, b) for b in binary}
    by_label: dict[str, list[pd.DataFrame]] = {b.column: [] for b in binary}
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
        if paper_carry:
            table = E.carry_table(by_vector, tokens["carry"].to_numpy(),
                                  tokens["place"].to_numpy(), top=top, per_vector=per_vector)
            carry.append(_with_paper(table, head, params))
        for b in binary:
            group = None if b.group is None else tokens[b.group].to_numpy()
            table = E.label_table(by_vector, positives[b.column], group,
                                  skill_groups=b.skill_groups, top=top, per_vector=per_vector)
            by_label[b.column].append(table.assign(
                **head, label=b.column, positive=str(b.positive), group=b.group))
        bar.update()
    bar.close()
    tables = {
        "scores": pd.DataFrame(scores),
        "clusters": pd.concat(clusters, ignore_index=True) if clusters else pd.DataFrame(),
        "hidden": pd.DataFrame(hidden),
    }
    if carry:  # the paper's carry table: only for tokens labelled with carry and place
        tables["carry"] = pd.concat(carry, ignore_index=True)
    for b in binary:
        tables[label_table_name(b.column)] = pd.concat(by_label[b.column], ignore_index=True)
    targets = signal_targets(tokens, binary, paper_carry, positives)
    if targets:
        tables[SIGNAL_TABLE] = signal_table(run, stored, targets, progress)
    run.write_evaluation(tables, pos_cluster_table(run, examples) if has_pos(tokens) else None)
    return tables


def stored_kinds(run):
    """(clustering name, kind, basis) of every trajectory kind whose arrays are stored."""
    arrays = run.arrays()
    for kind, spec in TRAJECTORY_KINDS.items():
        for basis in run.decomposed_bases() if spec.source == "terms" else [None]:
            if all(name in arrays for name in kind_arrays(kind, basis)):
                yield clustering_name(kind, basis), kind, basis


def signal_targets(tokens: pd.DataFrame, binary: list[BinaryLabelConfig], paper_carry: bool,
                   positives: dict[str, np.ndarray]) -> list[tuple]:
    """The labelled probe sets of the skill-signal diagnostic: ``(label, [token] values,
    group column or None, [token] groups or None)``: ``carry`` within ``place`` (the paper's
    task), each binary label of ``binary`` (1 / 0, NaN unlabelled) within its group, and a
    text run's ``pos`` and ``pos_4gram`` (the target token's part of speech and its 4-gram
    pattern, as the cluster labels name them)."""
    targets = []
    if paper_carry:
        targets.append(("carry", tokens["carry"].to_numpy(), "place", tokens["place"].to_numpy()))
    for b in binary:
        group = None if b.group is None else tokens[b.group].to_numpy()
        targets.append((b.column, positives[b.column], b.group, group))
    if has_pos(tokens):
        # object, not str: a token without a tag stays NaN (left out), not the class "nan"
        targets += [(c, tokens[c].to_numpy(dtype=object), None, None) for c in POS_COLUMNS]
    return targets


def signal_table(run, stored, targets, progress: bool = True) -> pd.DataFrame:
    """The ``skill_signal`` table: :func:`polca.signal.skill_signal` of every target of
    :func:`signal_targets` on every stored kind's trajectories (``[token, time]`` as clustered:
    L, ΔL, |ΔL|; ``[vector, token, time]`` for kinds with a basis), with ``name``, ``kind``,
    ``basis``, ``label``, ``group_column`` and ``confidence`` beside its columns. Tokens without
    a label value are left out, and so are the classes of a label of more than two values with
    fewer than two tokens per fold (a part-of-speech 4-gram seen three times cannot be
    cross-validated; chance is 1/K over the classes kept)."""
    loss = run.arrays().read(LOSS)
    least = 2 * SIGNAL["n_splits"]
    frames = []
    bar = P.bar(progress, len(stored), 0, "evaluate skill signal", "kind")
    for name, kind, basis in stored:
        if kind in C.EXACT_KINDS:
            trajectories = C.exact_trajectories(loss, kind)  # [token, time]
        else:
            trajectories = run.projected(kind, basis).transpose(0, 2, 1)  # [vector, token, time]
        m = trajectories.shape[0] if trajectories.ndim == 3 else 1
        confidence = 1 - SIGNAL["alpha"] / m
        for label, values, group_column, groups in targets:
            keep = ~pd.isna(values)
            if len(pd.unique(values[keep])) > 2:  # a binary label keeps both classes (its row
                # then says which class is too small)
                key = pd.Series(list(zip(values, values if groups is None else groups)))
                keep &= (key.map(key.value_counts()) >= least).to_numpy()
            if not keep.any():
                continue
            table = skill_signal(
                trajectories[..., keep, :], values[keep],
                None if groups is None else groups[keep], probes=(SIGNAL["probe"],),
                n_splits=SIGNAL["n_splits"], seed=SIGNAL["seed"], confidence=confidence)
            frames.append(table.assign(name=name, kind=kind, basis=basis, label=label,
                                       group_column=group_column, confidence=confidence))
        bar.update()
    bar.close()
    first = ["name", "kind", "basis", "label", "group_column"]
    if not frames:  # no token has a label value
        return pd.DataFrame(columns=first)
    table = pd.concat(frames, ignore_index=True)
    return table[first + [c for c in table.columns if c not in first]]


def label_table_name(column: str) -> str:
    """The evaluation table of a binary label: ``label-<column>`` (characters other than
    letters, digits, ``_``, ``-`` and ``.`` replaced by ``_``).

    >>> label_table_name("is copy")
    'label-is_copy'
    """
    return "label-" + re.sub(r"[^\w.-]", "_", column)


def binary_labels(tokens: pd.DataFrame, columns: list[str], cfg,
                  paper_carry: bool = False) -> list[BinaryLabelConfig]:
    """The binary labels to score: those of ``evaluate.labels`` (checked against the probe
    tokens: a :class:`ConfigError` names a missing column or a label without a clear positive
    value) and, with ``evaluate.auto_binary``, every other two-valued column of ``columns``
    with its :func:`~polca.evaluate.default_positive` (``carry`` is left to the paper's carry
    table when ``paper_carry``)."""
    named = []
    for spec in cfg.labels:
        missing = [c for c in (spec.column, spec.group) if c is not None and c not in tokens]
        if missing:
            raise ConfigError(f"evaluate.labels names columns {missing} that the probe tokens "
                              f"lack (label columns: {columns}); fix the name or the probe file")
        _positive(tokens, spec)
        named.append(spec)
    if cfg.auto_binary:
        taken = {spec.column for spec in named} | ({"carry"} if paper_carry else set())
        for column in columns:
            if column not in taken and E.is_binary(tokens[column]):
                named.append(BinaryLabelConfig(
                    column=column, positive=_plain(E.default_positive(tokens[column]))))
    return named


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _positive(tokens: pd.DataFrame, spec: BinaryLabelConfig) -> np.ndarray:
    """``[tokens]`` 1 / 0 / NaN of a binary label; a label that is not binary, or has no
    obvious positive value, is a :class:`ConfigError` naming the setting."""
    try:
        return E.binary_label(tokens[spec.column], positive=spec.positive)
    except ValueError as err:
        raise ConfigError(f"evaluate.labels: column {spec.column!r}: {err} (set positive = "
                          "the value that marks the skill)") from None


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
