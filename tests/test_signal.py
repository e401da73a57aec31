"""The skill-signal diagnostic on planted trajectories, against brute-force oracles."""

import doctest

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

import polca.signal
from polca.signal import skill_signal


def planted(n=300, steps=20, effect=2.0, seed=0):
    """Token trajectories ``[n, steps]``; carry tokens drop at step 12 (a planted breakthrough)
    by ``effect`` noise standard deviations, others at step 6."""
    rng = np.random.default_rng(seed)
    carry = rng.random(n) < 0.4
    t = np.arange(steps)
    drop = np.where(carry, 12, 6)[:, None]
    trajectories = 3.0 - effect * (t[None] >= drop) + rng.normal(size=(n, steps))
    return trajectories, carry


def test_doctest():
    assert doctest.testmod(polca.signal).failed == 0


def test_signal_present_is_found():
    X, carry = planted()
    row = skill_signal(X, carry, probes=("knn", "logistic")).set_index("probe")
    for probe in ("knn", "logistic"):
        assert row.loc[probe, "balanced_accuracy"] > 0.95
        assert row.loc[probe, "ci_low"] > 0.9 and row.loc[probe, "above_chance"]
        assert row.loc[probe, "chance"] == 0.5 and row.loc[probe, "status"] == "ok"


def test_signal_absent_scores_chance_within_the_interval():
    # labels independent of the trajectories: over 40 seeded data sets the 95% interval must
    # cover chance (0.5) about 38 times; binomial(40, 0.95) < 34 has probability 0.2%
    covered, scores = 0, []
    for seed in range(40):
        X, _ = planted(n=200, seed=seed)
        labels = np.random.default_rng(1000 + seed).random(200) < 0.4
        row = skill_signal(X, labels, seed=seed).iloc[0]
        covered += row.ci_low <= 0.5 <= row.ci_high
        scores.append(row.balanced_accuracy)
    assert covered >= 34
    assert abs(np.mean(scores) - 0.5) < 0.02  # unbiased: chance is exactly 1/K


def test_multiclass_chance_and_signal():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    X = rng.normal(size=(300, 8))
    absent = skill_signal(X, labels).iloc[0]
    assert absent.chance == pytest.approx(1 / 3)
    assert absent.ci_low <= 1 / 3 <= absent.ci_high
    X += 1.5 * labels[:, None]  # each class its own level over the whole trajectory
    present = skill_signal(X, labels).iloc[0]
    assert present.balanced_accuracy > 0.9 and present.above_chance


def brute_force_knn_balanced_accuracy(X, y, seed, k=10, n_splits=5):
    """Standardise on the training fold, vote among the k nearest (Euclidean), balanced accuracy
    of the pooled out-of-fold predictions — written out without scikit-learn estimators."""
    predicted = np.empty_like(y)
    for train, test in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, y):
        mean, sd = X[train].mean(0), X[train].std(0)
        sd[sd == 0] = 1
        A, B = (X[train] - mean) / sd, (X[test] - mean) / sd
        distances = ((B[:, None, :] - A[None, :, :]) ** 2).sum(-1)
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
        votes = y[train][nearest].mean(1)
        predicted[test] = votes > 0.5
    recalls = [(predicted[y == c] == c).mean() for c in (False, True)]
    return np.mean(recalls), recalls


def test_score_and_interval_match_brute_force():
    X, carry = planted(n=400, effect=0.6, seed=3)  # a weak signal: recalls well inside (0, 1)
    row = skill_signal(X, carry, seed=7, n_bootstrap=20000).iloc[0]
    expected, recalls = brute_force_knn_balanced_accuracy(X, carry, seed=7)
    assert row.balanced_accuracy == pytest.approx(expected, abs=1e-12)
    # the bootstrap interval has the normal-approximation width of a mean of two recalls
    n = [(~carry).sum(), carry.sum()]
    se = np.sqrt(sum(r * (1 - r) / m for r, m in zip(recalls, n))) / 2
    assert row.ci_high - row.ci_low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert row.ci_low < expected < row.ci_high


def test_groups_are_probed_separately_and_degenerate_ones_skipped():
    X, carry = planted(n=400)
    rng = np.random.default_rng(1)
    place = rng.choice([10, 100], size=400)
    labels = carry.copy()
    hundreds = place == 100
    labels[hundreds] = rng.random(hundreds.sum()) < 0.4  # no signal in the hundreds place
    units = np.arange(400) < 60  # a place where the label never varies
    place[units], labels[units] = 1, False
    table = skill_signal(X, labels, place).set_index("group")
    assert list(table.index) == [1, 10, 100]
    assert table.loc[1, "status"].startswith("skipped: the label does not vary")
    assert np.isnan(table.loc[1, "balanced_accuracy"]) and not table.loc[1, "above_chance"]
    assert table.loc[10, "balanced_accuracy"] > 0.9 and table.loc[10, "above_chance"]
    assert table.loc[100, "ci_low"] <= 0.5 <= table.loc[100, "ci_high"]
    assert table.loc[10, "n_tokens"] == (place == 10).sum()


def test_too_small_class_is_skipped_with_its_count():
    X, _ = planted(n=100)
    labels = np.zeros(100, bool)
    labels[:4] = True
    row = skill_signal(X, labels).iloc[0]
    assert row.status == "skipped: fewer than 10 tokens in class True (4)"
    assert row.class_counts == "False:96 True:4"


def test_per_vector_input_gives_a_row_per_vector():
    X, carry = planted(n=200)
    noise = np.random.default_rng(5).normal(size=X.shape)
    table = skill_signal(np.stack([noise, X]), carry)  # [vector, token, feature]
    assert table.vector.tolist() == [0, 1]
    assert not table.above_chance[0] and table.above_chance[1]
    assert pd.isna(skill_signal(X, carry).vector[0])


def test_deterministic_under_the_seed():
    X, carry = planted(n=200, effect=0.5)
    a = skill_signal(X, carry, probes=("knn", "logistic"), seed=4)
    b = skill_signal(X, carry, probes=("knn", "logistic"), seed=4)
    pd.testing.assert_frame_equal(a, b)
    c = skill_signal(X, carry, probes=("knn", "logistic"), seed=5)
    assert not np.allclose(a.balanced_accuracy, c.balanced_accuracy)  # other folds


@pytest.mark.parametrize("kwargs, message", [
    ({"probes": ("svm",)}, "unknown probe"),
    ({"n_splits": 1}, "n_splits"),
    ({"min_class_size": 2}, "min_class_size"),
])
def test_bad_options_are_named(kwargs, message):
    X, carry = planted(n=50)
    with pytest.raises(ValueError, match=message):
        skill_signal(X, carry, **kwargs)


def test_bad_shapes_and_values_are_named():
    X, carry = planted(n=50)
    with pytest.raises(ValueError, match="labels must be"):
        skill_signal(X, carry[:10])
    with pytest.raises(ValueError, match="groups must be"):
        skill_signal(X, carry, groups=carry[:10])
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        skill_signal(X, carry)
