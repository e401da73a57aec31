"""Clusters against known skills (METHOD §6): purity, chance, ARI, V-measure, the paper's table.

Only tokens with a cluster label ``>= 0`` count ("clustered tokens"): HDBSCAN noise (-1) and
tokens removed by the POLCA filters (-2, -3) are excluded everywhere here.

Any binary label of the probe tokens (``positive``: has the skill) gets the paper's statistics
(its Appendix G), optionally with a grouping column (``group``) and the groups whose positives
are the skill (``skill_groups``):

* homogeneity of a cluster = positive tokens in it / its size (positives of any group);
* a *skill positive* is a positive token whose group is in ``skill_groups`` (every positive
  when there is no group or no ``skill_groups``);
* a cluster is *eligible* when more than ``concentration`` (85 %) of its positives are skill
  positives, so a cluster of positives in the other groups does not count as the skill;
* recall = skill positives in the cluster / skill positives among the clustered tokens of the
  same clustering (for POLCA: the same vector, after its filters; noise excluded);
* F1 = harmonic mean of homogeneity and recall (the paper's F1 values are exactly that of its
  homogeneity and recall);
* per basis vector the score is its most homogeneous eligible cluster; the table reports the
  three best vectors. For the exact kinds (one clustering) it reports the three best clusters.

The paper's carry table is the case ``positive = carry`` (a carry enters this place),
``group = place`` (1000, 100, 10, 1), ``skill_groups = (10, 100)``: a carry into the thousands
place only means predicting 1, so those carries are left out of recall and make a cluster of
them ineligible. Tokens whose label is missing (None/NaN) are left out like noise.

Example:
    >>> labels = np.array([0, 0, 0, 1, 1, -1])
    >>> purity_table(labels, np.array(["a", "a", "b", "b", "b", "a"]))["purity"].round(3).tolist()
    [0.667, 1.0]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, v_measure_score

SKILL_PLACES = (10, 100)
CONCENTRATION = 0.85


def _paper_entry(row, homogeneity, recall, f1, hidden_fraction):
    return {"row": row, "homogeneity": homogeneity, "recall": recall, "f1": f1,
            "hidden_fraction": hidden_fraction}


# The paper's addition results (its Tables 1, 3, 4 and §5 hidden-breakthrough fractions).
# ``homogeneity``: top-three vectors (one value where the paper gives one); ``recall``/``f1``:
# of the best cluster, None where the paper gives none. Keys are this project's
# (trajectory kind, basis); the paper's POLCA used its approximate curvature (polca_paper), the
# exact-curvature kind (polca) estimates the same quantity and is compared with the same row.
PAPER_ADDITION = {
    ("loss", None): _paper_entry("exact loss", (0.514,), 0.771, 0.617, 0.0),
    ("delta_loss", None): _paper_entry("ΔL", (0.524,), 0.958, 0.678, 0.0),
    ("lca", None): _paper_entry("LCA top-50", (0.792,), 0.772, 0.782, 0.019),
    ("fisher", "hessian"): _paper_entry("Fisher", (0.664, 0.643, 0.637), None, None, 0.284),
    ("first_order", "hessian"): _paper_entry(
        "first-order POLCA", (0.948, 0.928, 0.887), 0.767, 0.848, 0.307),
    ("polca_paper", "hessian"): _paper_entry(
        "POLCA", (0.973, 0.946, 0.903), 0.736, 0.838, 0.355),
    ("polca_paper", "random"): _paper_entry(
        "POLCA, random basis", (0.902, 0.858, 0.838), 0.655, 0.759, 0.031),
    ("polca_paper", "shuffled-hessian"): _paper_entry(
        "POLCA, shuffled Hessian", (0.856, 0.852, 0.834), 0.699, 0.769, 0.304),
}


def paper_row(kind: str, basis: str | None) -> dict | None:
    """The paper's addition result for a trajectory kind on a basis, or None."""
    key = ("polca_paper" if kind == "polca" else kind, basis)
    return PAPER_ADDITION.get(key)


def purity_table(labels: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    """Per cluster (labels ≥ 0): size, most common value (majority), purity (its share).

    Columns cluster, size, majority, purity; ties for the majority go to the smallest value.
    """
    labels, values = _clustered(labels, values)
    rows = []
    for c in np.unique(labels):
        counts = pd.Series(values[labels == c]).value_counts(sort=False).sort_index()
        rows.append((int(c), int(counts.sum()), counts.idxmax(), counts.max() / counts.sum()))
    return pd.DataFrame(rows, columns=["cluster", "size", "majority", "purity"])


def label_scores(labels: np.ndarray, values: np.ndarray) -> dict:
    """Agreement of one clustering with one categorical label over the clustered tokens.

    Returns n_clustered, n_clusters, weighted_purity (purity averaged with cluster sizes as
    weights), max_purity, chance (share of the most common value among clustered tokens: the
    weighted purity of putting every token in one cluster), ari, v_measure. With no clustered
    tokens all scores are NaN.
    """
    labels, values = _clustered(labels, values)
    table = purity_table(labels, values)
    if not len(labels):
        nan = float("nan")
        return {"n_clustered": 0, "n_clusters": 0, "weighted_purity": nan, "max_purity": nan,
                "chance": nan, "ari": nan, "v_measure": nan}
    return {
        "n_clustered": len(labels),
        "n_clusters": len(table),
        "weighted_purity": float((table["purity"] * table["size"]).sum() / table["size"].sum()),
        "max_purity": float(table["purity"].max()),
        "chance": float(pd.Series(values).value_counts().max() / len(values)),
        "ari": float(adjusted_rand_score(values, labels)),
        "v_measure": float(v_measure_score(values, labels)),
    }


def binary_label(values, positive=None) -> np.ndarray:
    """``[tokens]`` float array of a label column: 1.0 where the value is ``positive``, 0.0
    for any other value, NaN where the label is missing.

    ``positive`` defaults to True for booleans and 1 for 0/1 labels; a label with other values
    needs it named (then every other value is the negative class, e.g. ``role = copy`` against
    ``first`` and ``sep``). Without it, a label with more than two values raises ValueError.

    >>> binary_label(np.array(["copy", "sep", None], dtype=object), positive="copy").tolist()
    [1.0, 0.0, nan]
    >>> binary_label(np.array(["copy", "sep", "first"], dtype=object), positive="copy").tolist()
    [1.0, 0.0, 0.0]
    """
    values = pd.Series(np.asarray(values, dtype=object))
    known = values[values.notna()]
    distinct = sorted(set(known.tolist()), key=str)
    if positive is None:
        if len(distinct) > 2:
            raise ValueError(f"label with values {distinct[:5]} is not binary (two values); "
                             "name the value that marks the skill")
        if not set(distinct) <= {0, 1}:  # True == 1 and False == 0, so booleans pass too
            raise ValueError(f"label with values {distinct} has no obvious positive value; name "
                             "the value that marks the skill")
        positive = 1
    elif distinct and positive not in distinct:
        raise ValueError(f"positive value {positive!r} does not occur in the label "
                         f"(values {distinct[:10]})")
    return np.where(values.isna(), np.nan, (values == positive).to_numpy(dtype=float))


def default_positive(values):
    """The positive value of a two-valued label when none is named: True / 1 for booleans and
    0/1 labels, else the rarer value (ties: the first in sorted order). A rule fixed before
    any clustering is scored: the rarer value is usually the skill (a carry, a copied token).

    >>> default_positive(np.array(["copy", "copy", "sep"], dtype=object))
    'sep'
    >>> default_positive(np.array([0, 1, 1]))
    1
    """
    known = pd.Series(np.asarray(values, dtype=object)).dropna()
    distinct = sorted(set(known.tolist()), key=str)
    if len(distinct) != 2:
        raise ValueError(f"label with values {distinct[:5]} is not binary (two values)")
    if set(distinct) <= {0, 1}:
        return 1 if not all(isinstance(v, (bool, np.bool_)) for v in distinct) else True
    counts = known.value_counts()
    return min(distinct, key=lambda v: (counts[v], distinct.index(v)))


def is_binary(values) -> bool:
    """Whether a label column has exactly two distinct values (missing ones aside)."""
    return pd.Series(np.asarray(values, dtype=object)).dropna().nunique() == 2


def label_clusters(labels: np.ndarray, positive: np.ndarray, group: np.ndarray | None = None,
                   skill_groups=None, concentration: float = CONCENTRATION) -> pd.DataFrame:
    """The paper's statistics of a binary label per cluster (labels ≥ 0), see the module
    docstring. ``positive [tokens]`` is bool, or float with NaN for a missing label
    (:func:`binary_label`); ``group [tokens]`` and ``skill_groups`` are optional.

    Columns cluster, size, n_positive, homogeneity, skill_share (share of the cluster's
    positives that are skill positives; NaN without positives), eligible
    (skill_share > concentration), recall, f1.

    >>> label_clusters(np.array([0, 0, 1, -1]), np.array([1, 1, 0, 1], dtype=bool))[
    ...     ["cluster", "homogeneity", "recall"]].values.tolist()
    [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    """
    labels, positive = np.asarray(labels), np.asarray(positive, dtype=float)
    group = np.zeros(len(labels)) if group is None else np.asarray(group)
    if not labels.shape == positive.shape == group.shape:
        raise ValueError(f"labels {labels.shape}, label {positive.shape} and group "
                         f"{group.shape} must have one entry per token")
    clustered = (labels >= 0) & ~np.isnan(positive)
    positive = positive == 1
    skill = positive if skill_groups is None else positive & np.isin(group, list(skill_groups))
    n_skill = int((skill & clustered).sum())
    rows = []
    for c in np.unique(labels[clustered]):
        member = clustered & (labels == c)
        size, n_positive = int(member.sum()), int((positive & member).sum())
        n_skill_in = int((skill & member).sum())
        homogeneity = n_positive / size
        share = n_skill_in / n_positive if n_positive else float("nan")
        recall = n_skill_in / n_skill if n_skill else 0.0
        f1 = 2 * homogeneity * recall / (homogeneity + recall) if homogeneity + recall else 0.0
        rows.append((int(c), size, n_positive, homogeneity, share,
                     bool(n_positive and share > concentration), recall, f1))
    return pd.DataFrame(rows, columns=["cluster", "size", "n_positive", "homogeneity",
                                       "skill_share", "eligible", "recall", "f1"])


def label_table(labels_by_vector: dict, positive: np.ndarray, group: np.ndarray | None = None,
                skill_groups=None, concentration: float = CONCENTRATION, top: int = 3,
                per_vector: bool = True) -> pd.DataFrame:
    """The paper's table rows for a binary label: the ``top`` most homogeneous eligible
    clusters (see :func:`label_clusters` for the label arguments).

    ``labels_by_vector`` maps a vector index (or None for an exact kind) to labels
    ``[tokens]``. With ``per_vector`` each vector contributes only its best eligible cluster
    (the paper's "top vector skill homogeneities"); otherwise every eligible cluster competes
    (exact loss, ΔL). Columns rank, vector, cluster, size, homogeneity, recall, f1. Ties in
    homogeneity go to the higher recall, then the lower vector and cluster.
    """
    frames = []
    for vector, labels in labels_by_vector.items():
        table = label_clusters(labels, positive, group, skill_groups, concentration)
        table = table[table["eligible"]]
        if per_vector and len(table):
            table = table.sort_values(["homogeneity", "recall", "cluster"],
                                      ascending=[False, False, True]).head(1)
        frames.append(table.assign(vector=vector))
    columns = ["rank", "vector", "cluster", "size", "homogeneity", "recall", "f1"]
    if not frames or not sum(len(f) for f in frames):
        return pd.DataFrame(columns=columns)
    best = pd.concat([f for f in frames if len(f)], ignore_index=True)
    order = best.assign(_v=best["vector"].fillna(-1)).sort_values(
        ["homogeneity", "recall", "_v", "cluster"], ascending=[False, False, True, True])
    best = order.head(top).reset_index(drop=True)
    best["rank"] = np.arange(1, len(best) + 1)
    return best[columns]


def carry_clusters(labels: np.ndarray, carry: np.ndarray, place: np.ndarray) -> pd.DataFrame:
    """The paper's carry statistics per cluster: :func:`label_clusters` of ``carry`` grouped by
    ``place``, the tens and hundreds places being the skill."""
    return label_clusters(labels, carry, place, skill_groups=SKILL_PLACES)


def carry_table(labels_by_vector: dict, carry: np.ndarray, place: np.ndarray, top: int = 3,
                per_vector: bool = True) -> pd.DataFrame:
    """The paper's carry table: :func:`label_table` of ``carry`` grouped by ``place``, the
    tens and hundreds places being the skill."""
    return label_table(labels_by_vector, carry, place, skill_groups=SKILL_PLACES, top=top,
                       per_vector=per_vector)


def _clustered(labels, values) -> tuple[np.ndarray, np.ndarray]:
    labels, values = np.asarray(labels), np.asarray(values)
    if labels.shape != values.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and values {values.shape} must be [tokens] each")
    keep = labels >= 0
    return labels[keep], values[keep]
