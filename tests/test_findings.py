"""The findings kernel on hand-built tables: each red flag present and absent, the numbers in
the sentence against hand or brute-force values, the renderers, and the tables the evaluate
stage really writes."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from test_evaluate import planted_addition_run

from polca import findings as F
from polca.stages.cluster import run_cluster
from polca.stages.evaluate import run_evaluate


def projected(vectors, n_tokens=1000, kind="polca_paper", basis="hessian", n_clusters=None,
              n_hidden=0, tau=700):
    """``clusters/NAME.json`` of a projected kind; ``vectors`` as (kept, filtered, noise,
    clusters) per vector."""
    rows = [{"vector": i, "kept": k, "n_filtered": f, "n_noise": z, "n_clusters": c}
            for i, (k, f, z, c) in enumerate(vectors)]
    total = sum(r["n_clusters"] for r in rows) if n_clusters is None else n_clusters
    return {"params": {"name": f"{kind}-{basis}", "kind": kind, "basis": basis,
                       "n_tokens": n_tokens, "tau": tau, "delta": 100, "min_cluster_size": 30},
            "n_clusters": total, "n_hidden": n_hidden,
            "hidden_fraction": n_hidden / total if total else None, "vectors": rows}


def exact(n_noise, n_clusters, n_tokens=1000, kind="loss", n_hidden=0):
    return {"params": {"name": kind, "kind": kind, "basis": None, "n_tokens": n_tokens,
                       "tau": 700, "delta": 100, "min_cluster_size": 30},
            "n_clusters": n_clusters, "n_hidden": n_hidden, "n_noise": n_noise}


def only(meta, **tables):
    [finding] = F.find({meta["params"]["name"]: meta}, **tables)
    return finding


def codes(finding):
    return [flag.code for flag in finding.flags]


# -- coverage -------------------------------------------------------------------------------------
def test_coverage_counts_match_the_labels_they_summarise():
    """Brute force: the share of (vector, token) labels ≥ 0, against the counts the cluster
    stage records per vector (-1 noise, -2 filtered, -3 every token of a dropped vector)."""
    rng = np.random.default_rng(0)
    n = 50
    labels = []
    for v in range(6):
        if v % 3 == 2:
            labels.append(np.full(n, -3))
        else:
            labels.append(rng.choice([-2, -1, 0, 1, 2], n))
    meta = {"params": {"n_tokens": n}, "vectors": [
        {"vector": v, "kept": bool((l != -3).any()), "n_filtered": int((l == -2).sum()),
         "n_noise": int((l == -1).sum())} for v, l in enumerate(labels)]}
    cov = F.coverage(meta)
    everything = np.concatenate(labels)
    assert cov.total == everything.size
    assert cov.clustered == (everything >= 0).sum()
    assert cov.fraction == pytest.approx((everything >= 0).mean())
    assert (cov.noise, cov.filtered, cov.dropped) == tuple(
        int((everything == k).sum()) for k in (-1, -2, -3))
    assert (cov.vectors, cov.kept_vectors) == (6, 4)


# -- flags, each present and absent ----------------------------------------------------------------
def test_all_vectors_dropped_by_the_mean_filter():
    finding = only(projected([(False, 0, 0, 0)] * 10))
    assert codes(finding) == ["all_dropped"]
    assert "all 10 vectors" in finding.flags[0].message
    assert "no clusters: the mean filter dropped all 10 vectors" in finding.sentence


def test_all_vectors_dropped_or_emptied_by_the_token_filter():
    finding = only(projected([(False, 0, 0, 0), (True, 1000, 0, 0)]))
    assert codes(finding) == ["all_dropped"]
    assert "mean filter dropped 1 and the token filter emptied 1" in finding.flags[0].message
    assert "token filter removed every token" in finding.sentence


def test_one_kept_vector_with_clusters_is_not_all_dropped():
    finding = only(projected([(False, 0, 0, 0)] * 9 + [(True, 200, 100, 3)]))
    assert "all_dropped" not in codes(finding) and "all_noise" not in codes(finding)
    assert "3 clusters on 1 of 10 vectors" in finding.sentence


def test_every_token_noise():
    finding = only(exact(n_noise=1000, n_clusters=0))
    assert codes(finding) == ["all_noise"]
    assert "1,000 tokens" in finding.flags[0].message
    finding = only(projected([(True, 600, 400, 0), (False, 0, 0, 0)]))
    assert codes(finding) == ["all_noise"]  # 400 tokens reached HDBSCAN, all noise
    assert "400 tokens" in finding.flags[0].message
    assert "all_noise" not in codes(only(exact(n_noise=999, n_clusters=1)))  # 1 clustered


@pytest.mark.parametrize("explained, flagged, shown", [
    (-0.2, True, "-0.200"), (-1e-9, True, "-1e-09"), (0.0, False, "0.000"),
    (0.00023, False, "0.00023"), (0.8, False, "0.800")])
def test_negative_explained_fraction(explained, flagged, shown):
    diagnostics = {"hessian": {"estimators": {"polca": {"explained_fraction": explained}}}}
    meta = projected([(True, 0, 0, 2)], kind="polca")
    finding = only(meta, diagnostics=diagnostics)
    assert ("negative_explained" in codes(finding)) == flagged
    assert finding.numbers["explained"] == explained
    assert f"the terms explain {shown} of |ΔL|." in finding.sentence  # a tiny value is not 0
    # the estimator is matched by kind and basis: another basis or kind is not flagged
    other = projected([(True, 0, 0, 2)], kind="polca", basis="random")
    assert "negative_explained" not in codes(only(other, diagnostics=diagnostics))
    assert "negative_explained" not in codes(only(exact(0, 2), diagnostics=diagnostics))


@pytest.mark.parametrize("noise, flagged", [(401, True), (400, False), (300, False)])
def test_coverage_under_a_quarter(noise, flagged):
    # 2 vectors × 1000 tokens; each filters 350 and has `noise` noise: clustered 2·(650 − noise)
    finding = only(projected([(True, 350, noise, 2), (True, 350, noise, 1)]))
    clustered = 2 * (650 - noise)
    assert finding.numbers["coverage"] == clustered / 2000
    assert ("low_coverage" in codes(finding)) == flagged
    assert f"covering {clustered:,} of 2,000 token-vector pairs" in finding.sentence


def test_low_coverage_counts_dropped_vectors_as_not_covered():
    finding = only(projected([(True, 0, 0, 2)] + [(False, 0, 0, 0)] * 3))  # 1000 of 4000
    assert finding.numbers["coverage"] == 0.25 and "low_coverage" not in codes(finding)
    finding = only(projected([(True, 0, 1, 2)] + [(False, 0, 0, 0)] * 3))  # 999 of 4000
    assert "low_coverage" in codes(finding)
    assert "on dropped vectors 3,000" in finding.flags[0].message


@pytest.mark.parametrize("clustered, flagged", [(99, True), (100, False)])
def test_a_clustering_of_fewer_than_100_tokens(clustered, flagged):
    finding = only(exact(n_noise=1000 - clustered, n_clusters=2))
    assert ("few_tokens" in codes(finding)) == flagged
    vectors = [(True, 500, 500 - clustered, 2), (True, 0, 0, 2), (True, 0, 990, 0)]
    finding = only(projected(vectors))
    assert ("few_tokens" in codes(finding)) == flagged
    if flagged:  # vector 2 has no cluster: it describes nothing, so it is not counted
        assert "vector 0 clustered fewer than 100 tokens (99)" in finding.flags[-1].message


def paper_diagnostic(small=0, checks=100, rmse=0.01, sum_abs=40.0, intervals=4):
    return {"hessian": {"estimators": {"polca_paper": {"explained_fraction": 0.5}},
                        "paper_small_denominators": small, "paper_denominator_checks": checks,
                        "rmse_paper_vs_exact_second_order": rmse, "sum_abs_delta_loss": sum_abs,
                        "n_intervals": intervals}}


@pytest.mark.parametrize("small, flagged", [(11, True), (10, False), (0, False)])
def test_paper_curvature_small_denominators(small, flagged):
    finding = only(projected([(True, 0, 0, 2)]), diagnostics=paper_diagnostic(small=small))
    assert ("paper_curvature_unstable" in codes(finding)) == flagged
    assert finding.numbers["small_denominator_share"] == small / 100


@pytest.mark.parametrize("rmse, flagged", [(0.0101, True), (0.01, False), (0.001, False)])
def test_paper_curvature_rmse_against_the_mean_loss_change(rmse, flagged):
    # mean |ΔL| per token and interval: 40 / (4 intervals · 1000 tokens) = 0.01
    finding = only(projected([(True, 0, 0, 2)]), diagnostics=paper_diagnostic(rmse=rmse))
    assert finding.numbers["mean_abs_delta_loss"] == pytest.approx(0.01)
    assert ("paper_curvature_unstable" in codes(finding)) == flagged
    # only the paper's curvature is judged by it
    meta = projected([(True, 0, 0, 2)], kind="polca")
    diagnostics = paper_diagnostic(rmse=rmse, small=50)
    assert "paper_curvature_unstable" not in codes(only(meta, diagnostics=diagnostics))


def test_a_sound_clustering_has_no_flag():
    diagnostics = paper_diagnostic()
    finding = only(projected([(True, 300, 100, 3), (True, 200, 200, 2)]),
                   diagnostics=diagnostics)
    assert finding.flags == ()


# -- the sentence's numbers -------------------------------------------------------------------------
def sentence_tables():
    meta = projected([(True, 300, 100, 2), (True, 400, 200, 1), (False, 0, 0, 0)],
                     n_hidden=1, tau=700)
    name = "polca_paper-hessian"
    # per vector and label: clustered tokens, size-weighted purity, chance
    scores = pd.DataFrame({
        "name": name, "vector": [0, 0, 1, 1], "label": ["place", "carry", "place", "carry"],
        "n_clustered": [600, 600, 400, 400], "weighted_purity": [0.9, 0.7, 0.5, 0.75],
        "chance": [0.3, 0.6, 0.25, 0.55]})
    clusters = pd.DataFrame({
        "name": name, "vector": [0, 0, 1], "cluster": [0, 1, 0], "size": [350, 250, 400],
        "break_step": [300.0, 900.0, 500.0], "hidden": [False, True, False],
        "majority_place": [1, 10, 100], "purity_place": [0.98, 0.8, 0.5],
        "majority_carry": [False, True, False], "purity_carry": [0.6, 0.85, 0.75]})
    skill = pd.DataFrame({"name": name, "rank": [2, 1], "vector": [1, 0], "cluster": [0, 1],
                          "size": [400, 250], "homogeneity": [0.25, 0.85],
                          "recall": [0.1, 0.4], "f1": [0.14, 0.54],
                          "paper_homogeneity": [0.946, 0.973], "paper_recall": [None, 0.736]})
    hidden = pd.DataFrame({"name": [name], "n_clusters": [3], "n_hidden": [1],
                           "paper": [0.355]})
    return meta, {"scores": scores, "clusters": clusters, "skill": skill, "hidden": hidden}


def test_sentence_numbers_by_hand():
    meta, tables = sentence_tables()
    finding = only(meta, **tables)
    n = finding.numbers
    # pooled over vectors, weighted by clustered tokens: place (0.9·600 + 0.5·400) / 1000
    assert n["purity"] == pytest.approx(0.74) and n["chance"] == pytest.approx(0.28)
    # lift: place (0.74 − 0.28)/0.72 = 0.64 beats carry (0.72 − 0.58)/0.42 = 0.33
    assert n["label"] == "place"
    assert (n["largest_size"], n["largest_value"], n["largest_purity"]) == (400, 100, 0.5)
    assert (n["clustered"], n["total"], n["coverage"]) == (1000, 3000, 1000 / 3000)
    assert (n["skill_homogeneity"], n["paper_homogeneity"]) == (0.85, 0.973)
    assert (n["skill_recall"], n["paper_recall"], n["skill_break_step"]) == (0.4, 0.736, 900.0)
    assert (n["n_hidden"], n["hidden_fraction"], n["paper_hidden_fraction"]) == (1, 1 / 3, 0.355)
    assert finding.sentence == (
        "POLCA (paper's curvature), hessian basis: 3 clusters on 2 of 3 vectors covering 1,000 "
        "of 3,000 token-vector pairs (33%); they follow place best (size-weighted purity "
        "0.740 against 0.280 by chance), the largest cluster (400 tokens) being place = 100 at "
        "0.500; best carry cluster by the paper's metric (vector 0): 250 tokens, homogeneity "
        "0.850 (paper 0.973), recall 0.400 (paper 0.736), breaking at step 900; hidden "
        "breakthroughs (mean break step later than τ=700, where the loss is flat): 1 of 3 "
        "clusters, fraction 0.333 (paper 0.355).")


def test_headline_has_the_same_numbers_on_one_line():
    meta, tables = sentence_tables()
    finding = only(meta, **tables, diagnostics={"hessian": {"estimators": {
        "polca_paper": {"explained_fraction": -0.5}}}})
    assert finding.headline == (
        "POLCA (paper's curvature), hessian basis: 3 clusters, 33% of tokens; place 0.74 "
        "(chance 0.28); best carry cluster 0.85 (paper 0.97), breaks at 900; hidden 1/3 "
        "(paper 0.35)  !! explains less than nothing")
    dropped = only(projected([(False, 0, 0, 0)] * 3))
    assert dropped.headline == ("POLCA (paper's curvature), hessian basis: 0 clusters  !! all "
                                "vectors dropped")
    lines = F.to_text([finding, dropped], brief=True, width=400).splitlines()
    assert lines == [F.overview([finding, dropped]), "", finding.headline, dropped.headline]


def test_overview_names_what_stands_and_counts_the_flags():
    meta, tables = sentence_tables()
    sound = only(meta, **tables)
    dropped = only(projected([(False, 0, 0, 0)] * 3, kind="polca"))
    noise = only(exact(1000, 0, kind="delta_loss"))
    thin = only(exact(950, 2))  # 50 clustered: low coverage and few tokens
    text = F.overview([sound, dropped, noise, thin])
    assert text == (
        "1 of 4 clusterings found clusters with no red flag: POLCA (paper's curvature), "
        "hessian basis. POLCA on the Hessian basis (the paper's method) found clusters: POLCA "
        "(paper's curvature), hessian basis (no red flag); POLCA (exact curvature), hessian "
        "basis (all vectors dropped). 3 are flagged: all vectors dropped 1, every token noise "
        "1, under 25% of tokens clustered 1, under 100 tokens clustered 1.")
    assert F.overview([noise]) == ("0 of 1 clusterings found clusters with no red flag. 1 is "
                                   "flagged: every token noise 1.")
    thin_polca = F.Finding("polca-hessian", "polca", "hessian", "POLCA", "…",
                           thin.flags, thin.numbers)
    assert "the paper's method) found only flagged clusters: POLCA (under 25% of tokens " \
        "clustered; under 100 tokens clustered)." in F.overview([thin_polca])


def test_label_values_read_back_as_floats_are_written_as_integers():
    meta, tables = sentence_tables()
    clusters = tables["clusters"].astype({"majority_place": float})
    finding = only(meta, **dict(tables, clusters=clusters))
    assert "being place = 100 at" in finding.sentence and finding.numbers["largest_value"] == 100


def test_sentence_without_evaluation_tables_and_without_a_qualifying_cluster():
    meta, tables = sentence_tables()
    bare = only(meta)
    assert bare.sentence.startswith("POLCA (paper's curvature), hessian basis: 3 clusters")
    assert "purity" not in bare.sentence and "paper" not in bare.sentence.split(":", 1)[1]
    empty = only(meta, skill=tables["skill"].iloc[:0])
    assert "no cluster qualifies as a carry cluster by the paper's metric" in empty.sentence
    # a table without columns (an empty CSV read back) means the run has no such label
    assert "carry" not in only(meta, skill=pd.DataFrame()).sentence


def test_no_hidden_breakthrough_is_said_in_words():
    finding = only(exact(0, 4, n_hidden=0))
    assert "the loss is flat): none of 4 clusters, fraction 0.000." in finding.sentence


def test_skill_signal_visible_or_not_per_group():
    name = "loss"
    signal = pd.DataFrame({
        "name": name, "label": "carry", "group": [10, 10, 100, 1000],
        "vector": [0, 1, 0, 0], "balanced_accuracy": [0.8, 0.7, 0.52, math.nan],
        "chance": 0.5, "ci_low": [0.75, 0.66, 0.45, math.nan],
        "ci_high": [0.85, 0.74, 0.59, math.nan], "status": ["ok", "ok", "ok", "one class"]})
    finding = only(exact(0, 2), signal=signal.astype({"group": float}))  # as read from CSV
    assert finding.numbers["signal_visible"] == {("carry", 10): True, ("carry", 100): False}
    assert ("carry within group 10 is visible to a probe (balanced accuracy 0.80, interval "
            "0.75–0.85, chance 0.50)") in finding.sentence
    assert "carry within group 100 is not visible" in finding.sentence
    assert "1000" not in finding.sentence  # skipped groups say nothing
    assert "visible" not in only(exact(0, 2), signal=signal.assign(name="other")).sentence


def test_findings_come_in_a_fixed_order():
    metas = {"polca-random": projected([(True, 0, 0, 1)], kind="polca", basis="random"),
             "polca-hessian": projected([(True, 0, 0, 1)], kind="polca"),
             "lca": projected([(True, 0, 0, 1)], kind="lca", basis=None),
             "delta_loss": exact(0, 1, kind="delta_loss"), "loss": exact(0, 1)}
    assert [f.name for f in F.find(metas)] == ["loss", "delta_loss", "lca", "polca-hessian",
                                               "polca-random"]


# -- renderers ---------------------------------------------------------------------------------------
def test_text_is_plain_and_wrapped():
    meta, tables = sentence_tables()
    findings = [only(meta, **tables), only(projected([(False, 0, 0, 0)] * 10))]
    text = F.to_text(findings, width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "\\" not in text and "|" not in text.replace("|ΔL|", "") and "<" not in text
    assert "  ! all 10 vectors were dropped" in text
    assert F.to_text([]) == "No clustering yet: nothing to report.\n"


def test_html_is_escaped_self_contained_and_flags_every_problem():
    finding = F.Finding("x", "loss", None, "a <b>", "a <b>: found <script>.",
                        (F.Flag("low_coverage", "only 5 % & less"),))
    fragment = F.to_html([finding])
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment
    assert "only 5 % &amp; less" in fragment
    assert "http" not in fragment and "src=" not in fragment
    assert fragment.count("<li") == 2


def test_html_table_has_the_headline_numbers_and_problems():
    meta, tables = sentence_tables()
    findings = [only(meta, **tables), only(projected([(False, 0, 0, 0)] * 3))]
    fragment = F.to_html(findings)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row)
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", fragment)[1:]]
    assert rows == [
        ["POLCA (paper&#x27;s curvature), hessian basis", "3", "33%",
         "place 0.74 (chance 0.28)", "0.85 (paper 0.97), breaks at 900", "1/3 (paper 0.35)", ""],
        ["POLCA (paper&#x27;s curvature), hessian basis", "0", "", "", "", "",
         "all vectors dropped"]]
    assert '<tr class="meaningless">' in fragment and "<th>best carry cluster</th>" in fragment
    # a column no finding fills is left out
    bare = F.to_html([only(meta, **dict(tables, skill=None))])
    assert "best carry cluster</th>" not in bare and "<th>hidden</th>" in bare


def test_numbers_table_has_a_row_per_finding():
    meta, tables = sentence_tables()
    frame = F.to_frame([only(meta, **tables), only(exact(1000, 0))])
    assert frame.index.tolist() == ["polca_paper-hessian", "loss"]
    assert frame.loc["loss", "flags"] == "all_noise"
    assert frame.loc["polca_paper-hessian", "skill_homogeneity"] == 0.85


# -- on what the stages write ------------------------------------------------------------------------
def test_on_the_evaluate_stage_tables_of_a_planted_run(tmp_path):
    ctx, tokens, _ = planted_addition_run(tmp_path)
    run_cluster(ctx, kinds=["loss"], progress=False)
    tables = run_evaluate(ctx, progress=False)
    meta = json.loads((ctx.run.clusters / "loss.json").read_text())
    [finding] = F.find({"loss": meta}, scores=tables["scores"], clusters=tables["clusters"],
                       skill=tables["carry"], hidden=tables["hidden"])
    labels = pd.read_parquet(ctx.run.clusters / "loss.parquet")["label"].to_numpy()
    assert finding.numbers["coverage"] == (labels >= 0).mean() == 1.0
    assert finding.numbers["n_clusters"] == len(np.unique(labels)) == 3
    # the label with the largest lift over chance, computed here from the token table
    lifts = {}
    for label in ("place", "carry"):
        crosstab = pd.crosstab(labels, tokens[label])
        purity = crosstab.max(axis=1).sum() / len(labels)
        chance = tokens[label].value_counts().max() / len(labels)
        lifts[label] = (purity - chance) / (1 - chance)
    assert finding.numbers["label"] == max(lifts, key=lifts.get)
    assert finding.numbers["skill_homogeneity"] == 1.0
    assert finding.numbers["paper_homogeneity"] == 0.514
    assert finding.flags == ()
