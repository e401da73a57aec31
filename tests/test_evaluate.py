"""Skill metrics against hand-computed values; the evaluate stage on a planted addition run."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, v_measure_score

from polca import evaluate as E
from polca.config import RunConfig
from polca.stages.cluster import run_cluster
from polca.stages.evaluate import run_evaluate
from polca.store import RunDir
from polca.tasks.addition import Addition

# clusters 0 (a a b) and 1 (b b); one noise (-1) and one filtered (-2) token
LABELS = np.array([0, 0, 0, 1, 1, -1, -2])
VALUES = np.array(["a", "a", "b", "b", "b", "a", "a"])


def test_purity_table_hand_case():
    table = E.purity_table(LABELS, VALUES)
    assert table["cluster"].tolist() == [0, 1]
    assert table["size"].tolist() == [3, 2]
    assert table["majority"].tolist() == ["a", "b"]
    assert table["purity"].tolist() == [2 / 3, 1.0]


def test_label_scores_hand_case():
    s = E.label_scores(LABELS, VALUES)
    assert s["n_clustered"] == 5 and s["n_clusters"] == 2
    assert s["weighted_purity"] == pytest.approx((3 * 2 / 3 + 2 * 1) / 5)  # 0.8
    assert s["max_purity"] == 1.0
    assert s["chance"] == pytest.approx(3 / 5)  # b is 3 of the 5 clustered tokens
    # ARI by hand: Σ C(n_ij,2) = 1 + 0 + 1 = 2; rows C(3,2)+C(2,2) = 4; columns C(2,2)+C(3,2)
    # = 4; expected 4·4/C(5,2) = 1.6; max (4+4)/2 = 4 → (2 − 1.6)/(4 − 1.6) = 1/6
    assert s["ari"] == pytest.approx(1 / 6)
    # V-measure: H(class) = H(cluster) = H(2/5); H(class|cluster) = H(cluster|class) = 3/5·H(1/3)
    h = lambda *p: -sum(q * math.log(q) for q in p if q)
    homogeneity = 1 - (3 / 5) * h(1 / 3, 2 / 3) / h(2 / 5, 3 / 5)
    assert s["v_measure"] == pytest.approx(homogeneity)
    # wiring cross-check against sklearn on the clustered tokens only
    keep = LABELS >= 0
    assert s["ari"] == pytest.approx(adjusted_rand_score(VALUES[keep], LABELS[keep]))
    assert s["v_measure"] == pytest.approx(v_measure_score(VALUES[keep], LABELS[keep]))


def test_label_scores_without_clustered_tokens_are_nan():
    s = E.label_scores(np.array([-1, -2]), np.array([1, 2]))
    assert s["n_clustered"] == 0 and math.isnan(s["ari"]) and math.isnan(s["chance"])


# cluster 0: carries into 10, 100, 10 and a non-carry 1000  → homogeneity 3/4, all skill carries
# cluster 1: carries into 1000, 1000, 10                     → homogeneity 1, skill share 1/3
# cluster 2: two units (never carry)                         → no carries, not eligible
# noise: two carries into 100; filtered: one carry into 10   → outside every denominator
CARRY_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, -1, -1, -2])
PLACE = np.array([10, 100, 10, 1000, 1000, 1000, 10, 1, 1, 100, 100, 10])
CARRY = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=bool)


def test_carry_clusters_hand_case():
    t = E.carry_clusters(CARRY_LABELS, CARRY, PLACE).set_index("cluster")
    assert t["size"].tolist() == [4, 3, 2]
    assert t["n_positive"].tolist() == [3, 3, 0]
    assert t["homogeneity"].tolist() == [0.75, 1.0, 0.0]
    assert t.loc[0, "skill_share"] == 1.0 and t.loc[1, "skill_share"] == pytest.approx(1 / 3)
    assert math.isnan(t.loc[2, "skill_share"])
    assert t["eligible"].tolist() == [True, False, False]
    # skill carries among clustered tokens: 3 (cluster 0) + 1 (cluster 1) = 4
    assert t["recall"].tolist() == [3 / 4, 1 / 4, 0.0]
    assert t.loc[0, "f1"] == pytest.approx(0.75)  # 2·0.75·0.75 / 1.5
    assert t.loc[1, "f1"] == pytest.approx(2 * 1 * 0.25 / 1.25)


def test_concentration_rule_is_strictly_more_than_85_percent():
    # 20 carries: 17 in the tens place, 3 in the thousands place → share exactly 0.85
    place = np.array([10] * 17 + [1000] * 3)
    labels, carry = np.zeros(20, dtype=int), np.ones(20, dtype=bool)
    assert not E.carry_clusters(labels, carry, place)["eligible"].item()
    place[-1] = 100  # 18 of 20 = 0.9
    assert E.carry_clusters(labels, carry, place)["eligible"].item()


def test_carry_table_best_cluster_per_vector_then_top_vectors():
    # vector 0: the hand case (best eligible: cluster 0, 0.75)
    # vector 1: cluster 0 = 9 skill carries + 1 non-carry (0.9), cluster 1 = 4 of 5 (0.8)
    place1 = np.array([10] * 10 + [100] * 5 + [1])
    carry1 = np.array([1] * 9 + [0] + [1] * 4 + [0] + [0], dtype=bool)
    labels1 = np.array([0] * 10 + [1] * 5 + [-1])
    n0 = len(CARRY_LABELS)
    place = np.concatenate([PLACE, place1])
    carry = np.concatenate([CARRY, carry1])
    by_vector = {0: np.concatenate([CARRY_LABELS, np.full(len(place1), -2)]),
                 1: np.concatenate([np.full(n0, -2), labels1])}
    t = E.carry_table(by_vector, carry, place, top=3)
    assert t["vector"].tolist() == [1, 0]           # one row per vector
    assert t["homogeneity"].tolist() == [0.9, 0.75]
    assert t["recall"].tolist() == [9 / 13, 3 / 4]  # vector 1: 13 clustered skill carries
    assert t["rank"].tolist() == [1, 2]
    t_all = E.carry_table(by_vector, carry, place, top=3, per_vector=False)
    assert t_all["homogeneity"].tolist() == [0.9, 0.8, 0.75]
    assert E.carry_table({None: np.full(len(PLACE), -1)}, CARRY, PLACE).empty


def brute_force_label_clusters(labels, positive, group, skill_groups, concentration):
    """Token-by-token counts per cluster, written from the definitions in the module doc."""
    rows = {}
    n_skill_total = 0
    for lab, pos, grp in zip(labels, positive, group):
        if lab < 0 or math.isnan(pos):  # noise, filtered, or no label
            continue
        is_skill = pos == 1 and (skill_groups is None or grp in skill_groups)
        n_skill_total += is_skill
        size, n_pos, n_skill = rows.get(lab, (0, 0, 0))
        rows[lab] = (size + 1, n_pos + (pos == 1), n_skill + is_skill)
    out = {}
    for lab, (size, n_pos, n_skill) in sorted(rows.items()):
        h = n_pos / size
        share = n_skill / n_pos if n_pos else math.nan
        r = n_skill / n_skill_total if n_skill_total else 0.0
        f1 = 2 * h * r / (h + r) if h + r else 0.0
        out[lab] = (size, n_pos, h, share, bool(n_pos) and share > concentration, r, f1)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_group", [False, True])
def test_label_clusters_matches_brute_force(seed, with_group):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.integers(-2, 6, n)
    positive = rng.random(n) < rng.random()
    positive = np.where(rng.random(n) < 0.1, np.nan, positive.astype(float))  # some unlabelled
    group = rng.choice([1, 10, 100, 1000], n) if with_group else None
    skill_groups = (10, 100) if with_group else None
    concentration = rng.choice([0.5, 0.85])
    table = E.label_clusters(labels, positive, group, skill_groups, concentration)
    expected = brute_force_label_clusters(labels, positive, group if with_group else [0] * n,
                                          skill_groups, concentration)
    assert table["cluster"].tolist() == list(expected)
    for row in table.itertuples():
        size, n_pos, h, share, eligible, r, f1 = expected[row.cluster]
        assert (row.size, row.n_positive, row.eligible) == (size, n_pos, eligible)
        assert row.homogeneity == pytest.approx(h) and row.recall == pytest.approx(r)
        assert row.f1 == pytest.approx(f1)
        assert (math.isnan(share) and math.isnan(row.skill_share)) or row.skill_share == (
            pytest.approx(share))


@pytest.mark.parametrize("seed", range(3))
def test_label_table_picks_the_best_eligible_cluster_per_vector(seed):
    rng = np.random.default_rng(seed)
    n = 200
    positive = rng.random(n) < 0.3
    group = rng.choice(["head", "tail"], n)
    by_vector = {v: rng.integers(-1, 5, n) for v in range(6)}
    table = E.label_table(by_vector, positive, group, skill_groups=["head"], top=3)
    best = []  # brute force: each vector's eligible clusters, most homogeneous, then recall
    for v, labels in by_vector.items():
        stats = brute_force_label_clusters(labels, positive.astype(float), group, ["head"], 0.85)
        eligible = [(s[2], s[5], -c, c) for c, s in stats.items() if s[4]]
        if eligible:
            h, r, _, c = max(eligible)
            best.append((h, r, -v, v, c))
    best = sorted(best, reverse=True)[:3]
    assert table["vector"].tolist() == [b[3] for b in best]
    assert table["cluster"].tolist() == [b[4] for b in best]
    assert table["homogeneity"].tolist() == pytest.approx([b[0] for b in best])
    assert table["rank"].tolist() == list(range(1, len(best) + 1))


def test_carry_table_is_the_label_table_of_carry_by_place():
    by_vector = {0: CARRY_LABELS, None: np.array([0, 0, 1, 1, 1, 1, 0, 2, 2, 0, 1, -1])}
    pd.testing.assert_frame_equal(
        E.carry_table(by_vector, CARRY, PLACE, top=5),
        E.label_table(by_vector, CARRY, PLACE, skill_groups=(10, 100), top=5))


def test_binary_label_values_and_errors():
    assert E.binary_label(np.array([True, False, True])).tolist() == [1.0, 0.0, 1.0]
    assert E.binary_label([0, 1, 1, None]).tolist()[:3] == [0.0, 1.0, 1.0]
    assert math.isnan(E.binary_label([0, 1, 1, None])[3])
    assert E.binary_label(["copy", "sep", "copy"], positive="copy").tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no obvious positive value"):
        E.binary_label(["copy", "sep"])
    with pytest.raises(ValueError, match="not binary"):
        E.binary_label(["a", "b", "c"])
    # a named positive value makes any label binary: that value against all the others
    assert E.binary_label(["a", "b", "c"], positive="a").tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'x' does not occur"):
        E.binary_label(["a", "b"], positive="x")


def test_paper_f1_is_the_harmonic_mean_of_homogeneity_and_recall():
    # the paper's numbers are rounded to 3 decimals; the harmonic mean reproduces them to that
    for row in E.PAPER_ADDITION.values():
        if row["recall"] is not None:
            h, r = row["homogeneity"][0], row["recall"]
            assert 2 * h * r / (h + r) == pytest.approx(row["f1"], abs=1e-3)
    assert E.paper_row("polca", "hessian") is E.paper_row("polca_paper", "hessian")
    assert E.paper_row("polca", "trajectory-pca") is None


# -- stage --------------------------------------------------------------------------------------

def planted_addition_run(tmp_path):
    """Addition probe tokens whose loss curves are planted by skill: skill carries (tens or
    hundreds), thousands place, and the rest drop at different steps."""
    task = Addition(digits=3, n_probe=75, seed=0)
    sequences, tokens = task.probe_set()
    run = RunDir(tmp_path / "run")
    run.write_probe(sequences, tokens)
    skill = tokens["carry"] & tokens["place"].isin([10, 100])
    group = np.where(skill, 0, np.where(tokens["place"] == 1000, 1, 2))
    steps = np.arange(0, 501, 25)
    rng = np.random.default_rng(0)
    centre = np.array([350, 100, 200])[group]
    curves = 2 - 2 / (1 + np.exp(-(steps[None] - centre[:, None]) / 20))
    curves = curves + rng.normal(0, 0.005, curves.shape)
    arrays = run.arrays()
    arrays.require("loss", curves.shape, (len(curves), 1), ("token", "checkpoint"),
                   attrs={"steps": steps.tolist()})
    arrays.write_block("loss", slice(None), curves, key="all")
    return SimpleNamespace(run=run, cfg=RunConfig(name="t"), task=task), tokens, group


def test_run_evaluate_on_planted_skills(tmp_path):
    ctx, tokens, group = planted_addition_run(tmp_path)
    run_cluster(ctx, kinds=["loss"], progress=False)
    tables = run_evaluate(ctx, progress=False)
    labels = pd.read_parquet(ctx.run.clusters / "loss.parquet")["label"].to_numpy()
    assert (labels >= 0).all() and adjusted_rand_score(group, labels) == 1.0

    carry = tables["carry"]
    # exactly one eligible cluster: all skill carries and nothing else
    assert len(carry) == 1
    row = carry.iloc[0]
    assert (row["homogeneity"], row["recall"], row["f1"]) == (1.0, 1.0, 1.0)
    assert row["size"] == int((group == 0).sum())
    assert (row["paper_homogeneity"], row["paper_recall"], row["paper_f1"]) == (
        0.514, 0.771, 0.617)

    scores = tables["scores"].set_index("label")
    # place: the thousands cluster is pure; the others mix tens/hundreds (and units)
    place_counts = pd.crosstab(group, tokens["place"])
    assert scores.loc["place", "weighted_purity"] == pytest.approx(
        place_counts.max(axis=1).sum() / len(tokens))
    assert scores.loc["place", "chance"] == 0.25  # 4 places, equally many tokens
    assert scores.loc["carry", "chance"] == pytest.approx(
        tokens["carry"].value_counts().max() / len(tokens))

    hidden = tables["hidden"].iloc[0]
    assert hidden["paper"] == 0.0 and hidden["n_clusters"] == 3
    clusters = tables["clusters"]
    assert set(clusters.columns) >= {"purity_place", "majority_carry", "break_step", "hidden"}
    for name in ("scores", "clusters", "carry", "hidden"):
        assert (ctx.run.root / "evaluation" / f"{name}.csv").is_file()
    assert (ctx.run.root / "evaluation" / "summary.json").is_file()


def test_run_evaluate_without_clusterings_says_what_to_run(tmp_path):
    ctx, _, _ = planted_addition_run(tmp_path)
    with pytest.raises(Exception, match="polca cluster"):
        run_evaluate(ctx, progress=False)


def test_skill_signal_is_high_where_planted_and_chance_where_absent(tmp_path):
    """evaluation/skill_signal.csv: carry within the tens and hundreds is planted in the exact
    losses and in vector 0's gradient projections, absent from vector 1's (noise), and a
    binary label drawn independently of everything is visible nowhere."""
    from polca.report.summary import read_findings

    ctx, tokens, _ = planted_addition_run(tmp_path)
    rng = np.random.default_rng(1)
    n, steps = len(tokens), ctx.run.array_steps()
    carry = tokens["carry"].to_numpy().astype(float)
    grad = rng.normal(size=(2, len(steps), n))
    grad[0] += 3 * carry[None]  # every checkpoint: carry tokens shifted
    arrays = ctx.run.arrays()
    arrays.require("polca/hessian/grad", grad.shape, (1, len(steps), n),
                   ("vector", "checkpoint", "token"))
    arrays.write_block("polca/hessian/grad", slice(None), grad, key="all")
    ctx.run.write_probe(ctx.run.read_sequences(),
                        tokens.assign(coin=rng.random(n) < 0.5))  # a label with no signal
    ctx.cfg = RunConfig(name="t", evaluate={"labels": [{"column": "coin", "group": "place"}]})
    run_cluster(ctx, kinds=["loss", "gradient"], progress=False)
    table = run_evaluate(ctx, progress=False)["skill_signal"]
    assert (ctx.run.root / "evaluation" / "skill_signal.csv").is_file()
    assert set(table["name"]) == {"loss", "delta_loss", "abs_delta_loss", "gradient-hessian"}
    ok = table[table["status"] == "ok"].set_index(["name", "label", "group"])
    for place in (10, 100):
        assert ok.loc[("loss", "carry", place), "balanced_accuracy"] > 0.95
        vectors = ok.loc[("gradient-hessian", "carry", place)].set_index("vector")
        assert vectors.loc[0, "balanced_accuracy"] > 0.9 and vectors.loc[0, "above_chance"]
        assert vectors.loc[1, "ci_low"] <= 0.5 <= vectors.loc[1, "ci_high"]
        assert vectors["confidence"].eq(1 - 0.05 / 2).all()  # widened for the 2 vectors
    coin = ok.xs("coin", level="label")  # 20 rows: 4 places × (3 exact kinds + 2 vectors)
    assert len(coin) == 20 and abs(coin["balanced_accuracy"].mean() - 0.5) < 0.05
    # each 95 % (97.5 % per vector) interval misses chance with probability ≤ 0.05: about one
    # row in 20 is "above chance" by luck; more than two would be a broken interval
    assert coin["above_chance"].sum() <= 2
    # units tokens never receive a carry: their row says why they are not scored
    assert table.query("label == 'carry' and group == 1")["status"].str.startswith(
        "skipped").all()
    # the report's findings say it beside the clusters
    finding = next(f for f in read_findings(ctx.run) if f.name == "gradient-hessian")
    assert "carry within group 10 is visible to a probe" in finding.sentence
    assert finding.numbers["signal_cell"].startswith("carry in 10 ")
