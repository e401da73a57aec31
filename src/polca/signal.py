"""Skill-signal diagnostic (METHOD §6): is a label visible in the trajectories at all?

HDBSCAN finding no carry cluster has two explanations: the carry signal is absent from the
trajectories, or it is there and the clustering misses it. A supervised probe tells them apart.
For every group of tokens (e.g. each digit place) in which the label varies, a classifier on the
standardised trajectories (k-nearest neighbours and/or logistic regression, scikit-learn) is
cross-validated (``StratifiedKFold``, seeded) and scored by balanced accuracy, the mean over
classes of the recall, so a classifier that always answers the majority class scores chance.

**Chance** is ``1 / K`` for ``K`` classes, exactly: when the predictions are independent of the
labels, each class's recall is the probability of predicting that class, and these sum to 1.

**Interval**: a stratified bootstrap of the pooled out-of-fold predictions (per class, resample
its tokens with replacement and recompute the balanced accuracy; resampling n 0/1 outcomes with
k ones is exactly Binomial(n, k/n), so that is how it is drawn). Why this one: out-of-fold
predictions are cheap (one cross-validation per row, against ~100 for a permutation test with a
useful p-value), and under the null hypothesis (labels independent of trajectories) the
interval is nearly exact: given the fold models every token's correctness is an independent
Bernoulli draw and the expected balanced accuracy is ``1 / K`` whatever the models are, so the
model-to-model variability adds nothing to the variance the bootstrap measures (law of total
variance); stratified folds, which fix each fold's class totals, bias the score slightly below
chance, which makes the test a little conservative. When a signal is present the interval leaves out the variability of
the training folds (no unbiased estimator of it exists; Bengio & Grandvalet, 2004), so it is
somewhat narrow there, and it collapses to a point when a class is predicted perfectly. Read
``above_chance`` (the interval's lower end is above chance) as "the skill is visible".

Groups in which the label takes one value, or a class has fewer than ``min_class_size`` tokens
(at least one per fold is needed), are not scored: their row says why in ``status``.

Example:
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat([0, 1], 100)
    >>> trajectories = rng.normal(size=(200, 12)) + 1.5 * labels[:, None]   # [token, time]
    >>> table = skill_signal(trajectories, labels)
    >>> table[["probe", "balanced_accuracy", "chance", "above_chance"]].round(2).values.tolist()
    [['knn', 0.99, 0.5, True]]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# name -> a fresh estimator; logistic regression reweights classes because the score is
# balanced accuracy (k-NN has no class weights: its imbalance shows as a lower score)
PROBES = {
    "knn": lambda: KNeighborsClassifier(n_neighbors=10),
    "logistic": lambda: LogisticRegression(max_iter=2000, class_weight="balanced"),
}

COLUMNS = ["vector", "group", "probe", "n_tokens", "class_counts", "balanced_accuracy",
           "chance", "ci_low", "ci_high", "above_chance", "status"]


def skill_signal(
    trajectories,
    labels,
    groups=None,
    *,
    probes: tuple[str, ...] = ("knn",),
    n_splits: int = 5,
    seed: int = 0,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    min_class_size: int | None = None,
) -> pd.DataFrame:
    """Cross-validated balanced accuracy of predicting ``labels`` from ``trajectories``.

    Args:
        trajectories: ``[token, feature]`` (one trajectory per token, e.g. the exact loss over
            checkpoints) or ``[vector, token, feature]`` (one per basis vector, e.g. projected
            loss or ⟨b, ∇ℓ_x⟩ over checkpoints); finite numbers.
        labels: ``[token]`` any hashable values (bool carry, int place, …).
        groups: ``[token]`` or None; each distinct value is probed on its own (e.g. the place,
            so that carry is told apart only from tokens of the same place).
        probes: names in :data:`PROBES`.
        n_splits: folds of the stratified cross-validation (shuffled with ``seed``).
        seed: fixes the folds and the bootstrap; the same seed gives the same table.
        n_bootstrap, confidence: the interval (see the module docstring).
        min_class_size: fewest tokens a class needs in a group (default ``2 * n_splits``).

    Returns:
        One row per (vector, group, probe), columns :data:`COLUMNS`: ``vector`` (index, <NA>
        for a 2-d input), ``group`` (<NA> without ``groups``), ``n_tokens``, ``class_counts``
        ("value:count" per class), ``balanced_accuracy``, ``chance`` (1/K), ``ci_low``,
        ``ci_high``, ``above_chance`` (``ci_low > chance``) and ``status`` ("ok", or why the
        group was skipped; its numbers are then NaN).
    """
    X = np.asarray(trajectories, dtype=np.float64)
    y = np.asarray(labels)
    if X.ndim not in (2, 3):
        raise ValueError(f"trajectories must be [token, feature] or [vector, token, feature], "
                         f"got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("trajectories hold NaN or inf; drop or fill those tokens first")
    per_vector = X if X.ndim == 3 else X[None]
    if y.shape != (per_vector.shape[1],):
        raise ValueError(f"labels must be [token] = [{per_vector.shape[1]}], got {y.shape}")
    g = None if groups is None else np.asarray(groups)
    if g is not None and g.shape != y.shape:
        raise ValueError(f"groups must be [token] = [{len(y)}], got {g.shape}")
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {sorted(PROBES)}")
    if n_splits < 2:
        raise ValueError(f"n_splits={n_splits} must be at least 2")
    min_class_size = 2 * n_splits if min_class_size is None else min_class_size
    if min_class_size < n_splits:
        raise ValueError(f"min_class_size={min_class_size} must be at least n_splits={n_splits}")

    rows = []
    for group in [pd.NA] if g is None else sorted(pd.unique(g)):
        members = np.ones(len(y), bool) if g is None else g == group
        y_group = y[members]
        classes, counts = np.unique(y_group, return_counts=True)
        status = _skip_reason(classes, counts, min_class_size)
        for v, X_vector in enumerate(per_vector):
            for probe in probes:
                row = {"vector": v if X.ndim == 3 else pd.NA, "group": group, "probe": probe,
                       "n_tokens": int(members.sum()),
                       "class_counts": " ".join(f"{c}:{n}" for c, n in zip(classes, counts)),
                       "chance": 1 / len(classes) if len(classes) > 1 else np.nan,
                       "status": status or "ok"}
                if status is None:
                    row.update(_probe(X_vector[members], y_group, probe, n_splits, seed,
                                      n_bootstrap, confidence))
                rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    table["vector"] = table["vector"].astype("Int64")
    table["above_chance"] = table["ci_low"] > table["chance"]
    return table


def _skip_reason(classes: np.ndarray, counts: np.ndarray, min_class_size: int) -> str | None:
    if len(classes) < 2:
        return "skipped: the label does not vary in this group"
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if n < min_class_size]
    if small:
        return f"skipped: fewer than {min_class_size} tokens in class {', '.join(small)}"
    return None


def _probe(X, y, probe, n_splits, seed, n_bootstrap, confidence) -> dict:
    """Balanced accuracy of pooled out-of-fold predictions and its bootstrap interval."""
    model = make_pipeline(StandardScaler(), PROBES[probe]())
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    predicted = cross_val_predict(model, X, y, cv=folds)
    score = balanced_accuracy_score(y, predicted)
    rng = np.random.default_rng(seed)
    recalls = []
    for c in np.unique(y):
        in_class = y == c
        n, hits = int(in_class.sum()), int((predicted[in_class] == c).sum())
        recalls.append(rng.binomial(n, hits / n, size=n_bootstrap) / n)
    boot = np.mean(recalls, axis=0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return {"balanced_accuracy": score, "ci_low": low, "ci_high": high}
