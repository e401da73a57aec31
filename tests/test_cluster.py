"""Breakthrough clustering: planted groups, filters, break times and τ against hand/brute oracles."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from polca import cluster as C
from polca.config import RunConfig
from polca.stages.cluster import run_cluster
from polca.store import RunDir

STEPS = np.arange(0, 1001, 20)


def planted_sigmoids(rng, sizes=(120, 80, 50), centres=(200, 500, 800), noise=0.02):
    """Loss curves 2 − 2·σ((s − c)/30) per group plus noise; returns [tokens, ckpts], groups."""
    curves, groups = [], []
    for g, (n, c) in enumerate(zip(sizes, centres)):
        base = 2 - 2 / (1 + np.exp(-(STEPS - c) / 30))
        curves.append(base + rng.normal(0, noise, (n, len(STEPS))))
        groups += [g] * n
    return np.concatenate(curves), np.array(groups)


def test_hdbscan_recovers_planted_groups_largest_first_and_outliers_are_noise():
    rng = np.random.default_rng(0)
    curves, groups = planted_sigmoids(rng)
    outliers = rng.uniform(5, 50, (4, 1)) + rng.normal(0, 1, (4, len(STEPS)))
    labels = C.cluster_trajectories(np.concatenate([curves, outliers]), 10, 5)
    assert (labels[len(curves):] == C.NOISE).all()
    assert adjusted_rand_score(groups, labels[: len(curves)]) > 0.95
    # relabelled by size: planted group g (sizes 120 > 80 > 50) is cluster g
    for g in range(3):
        assert np.bincount(labels[: len(curves)][groups == g] + 1).argmax() - 1 == g


def test_cluster_trajectories_edge_cases_and_errors():
    x = np.random.default_rng(1).normal(size=(3, 4))
    assert C.cluster_trajectories(x, 5, 2).tolist() == [-1, -1, -1]  # fewer than a cluster
    with pytest.raises(ValueError, match="NaN"):
        C.cluster_trajectories(np.array([[0.0, np.nan]] * 4), 2, 1)
    with pytest.raises(ValueError, match="min_cluster_size"):
        C.cluster_trajectories(x, 1, 1)


def test_relabel_by_size_hand_case():
    labels = np.array([3, 7, 7, -1, 3, 3, 9, -2, 7, 7])
    assert C.relabel_by_size(labels).tolist() == [1, 0, 0, -1, 1, 1, 2, -2, 0, 0]


def test_exact_trajectories_and_cumulate_against_loops():
    rng = np.random.default_rng(2)
    loss = rng.normal(size=(5, 6))
    delta = C.exact_trajectories(loss, "delta_loss")
    absd = C.exact_trajectories(loss, "abs_delta_loss")
    terms = rng.normal(size=(2, 5, 3))
    pl = C.cumulate(terms)
    for x in range(5):
        for t in range(5):
            assert delta[x, t] == loss[x, t + 1] - loss[x, t]
            assert absd[x, t] == abs(loss[x, t + 1] - loss[x, t])
    for v in range(2):
        for x in range(3):
            running = 0.0
            assert pl[v, 0, x] == 0.0
            for t in range(5):
                running += terms[v, t, x]
                assert pl[v, t + 1, x] == pytest.approx(running, abs=1e-14)
    level = C.level_curves(loss, "abs_delta_loss")
    assert level[:, 0].tolist() == [0.0] * 5
    np.testing.assert_allclose(np.diff(level, axis=1), absd, atol=1e-14)
    with pytest.raises(ValueError, match="unknown exact"):
        C.exact_trajectories(loss, "polca")


def test_filters_drop_exactly_the_vectors_and_tokens_they_should():
    # [vectors=3, checkpoints=2, tokens=4]; final values chosen by hand
    final = np.array([[-1.0, -2.0, 0.5, -0.5],    # mean −0.75: kept; token 2 filtered
                      [1.0, 2.0, -0.5, 0.0],      # mean +0.625: dropped
                      [-1.0, 0.0, -1.0, -1.0]])   # mean −0.75: kept; token 1 (PL = 0) filtered
    projected = np.stack([np.zeros_like(final), final], axis=1)
    labels, used = C.cluster_projected(projected, min_cluster_size=2, min_samples=1)
    assert (labels[1] == C.DROPPED).all() and used[1] == 0
    assert np.flatnonzero(labels[0] == C.FILTERED).tolist() == [2]
    assert np.flatnonzero(labels[2] == C.FILTERED).tolist() == [1]
    assert (labels[[0, 2]] >= C.NOISE).sum() == 6  # the kept tokens got HDBSCAN labels
    open_labels, _ = C.cluster_projected(projected, 2, 1, mean_filter=False, token_filter=False)
    assert (open_labels >= C.NOISE).all()
    mean_only, _ = C.cluster_projected(projected, 2, 1, mean_filter=True, token_filter=False)
    assert (mean_only[1] == C.DROPPED).all() and (mean_only[[0, 2]] >= C.NOISE).all()


def test_default_parameters_follow_the_documented_rule():
    assert C.default_min_cluster_size(5000) == 150      # the paper's addition setting
    assert C.default_min_cluster_size(12_600) == 378    # 150 · 12600 / 5000
    assert C.default_min_cluster_size(20) == 2
    assert C.default_min_samples(5000) == 19            # 150 / 8 (the paper config: 333)
    assert C.default_min_samples(2639) == 10            # after the paper's average filter
    assert C.default_min_samples(2400) == 9 and C.default_min_samples(50) == 1


def test_min_samples_default_counts_tokens_after_the_filter():
    rng = np.random.default_rng(3)
    final = np.concatenate([-rng.uniform(1, 2, 900), rng.uniform(1, 2, 300)])[None]
    projected = np.stack([np.zeros_like(final), final], axis=1)
    _, used = C.cluster_projected(projected, min_cluster_size=5)
    assert used.tolist() == [3]  # 0.00375 × the 900 kept tokens (of all 1200: 4)


def brute_break(f, steps, delta):
    """Loop over tokens and candidate checkpoints; np.interp for f(s ± Δ)."""
    out = []
    for row in f:
        best, best_step = -np.inf, None
        for t, s in enumerate(steps):
            if s - delta < steps[0] or s + delta > steps[-1]:
                continue
            acc = (np.interp(s + delta, steps, row) - row[t]) - (
                row[t] - np.interp(s - delta, steps, row))
            if acc > best:
                best, best_step = acc, s
        out.append(best_step)
    return np.array(out)


@pytest.mark.parametrize("delta", [10, 30, 45])
def test_break_times_match_brute_force_on_uneven_checkpoints(delta):
    rng = np.random.default_rng(4)
    steps = np.cumsum(rng.integers(5, 30, size=25)) - 5
    f = rng.normal(size=(40, len(steps))).cumsum(axis=1)
    np.testing.assert_array_equal(C.break_times(f, steps, delta), brute_break(f, steps, delta))


@pytest.mark.parametrize("steps", [np.arange(0, 201, 10), np.array(
    [0, 5, 10, 30, 60, 90, 100, 110, 115, 120, 150, 200])])
def test_break_time_of_a_kink_is_the_kink(steps):
    kink = 110  # slope −1 until the kink, then −0.1: the largest upward bend is at 110
    f = np.where(steps < kink, -steps, -kink - 0.1 * (steps - kink)).astype(float)[None]
    assert C.break_times(f, steps, 10).tolist() == [kink]
    assert C.break_times(f, steps, 40).tolist() == [kink]


def test_break_time_errors_name_the_fix():
    with pytest.raises(ValueError, match="no checkpoint"):
        C.break_times(np.zeros((1, 3)), [0, 10, 20], 11)
    with pytest.raises(ValueError, match="increasing"):
        C.break_times(np.zeros((1, 3)), [0, 20, 10], 5)


def test_default_break_delta():
    assert C.default_break_delta(np.arange(0, 10_001, 20)) == 100  # the paper's Δ
    assert C.default_break_delta(np.arange(0, 2001, 100)) == 100   # at least the spacing
    assert C.default_break_delta([0, 10, 1000]) == 500             # at most half the run


def test_flat_after_hand_made_curve():
    # total decrease 9, 90 % of it reached when L ≤ 1.9: first at step 40 (L = 1.5)
    loss = np.array([10, 8, 5, 2, 1.5, 1.2, 1.0])
    assert C.flat_after(loss, [0, 10, 20, 30, 40, 50, 60]) == 40
    assert C.flat_after(loss, [0, 10, 20, 30, 40, 50, 60], fraction=0.5) == 20  # L ≤ 5.5
    assert C.flat_after(np.array([1.0, 2.0, 3.0]), [0, 1, 2]) == 0  # never decreases


def test_planted_breaks_and_hidden_verdicts():
    rng = np.random.default_rng(5)
    curves, groups = planted_sigmoids(rng, noise=0.002)
    breaks = C.break_times(curves, STEPS, 60)
    table = C.cluster_breaks(groups, breaks, tau=600)
    # each group's drop ends after its centre and well before the next one starts
    assert table["break_step"].tolist() == sorted(table["break_step"])
    for c, mean in zip((200, 500, 800), table["break_step"]):
        assert c < mean < c + 150
    assert table["hidden"].tolist() == [False, False, True]
    assert table["size"].tolist() == [120, 80, 50]


def test_cluster_breaks_hand_case():
    table = C.cluster_breaks(np.array([0, 0, 1, -1, 1, 1]), np.array([10, 30, 50, 99, 70, 90]),
                             tau=60)
    assert table.to_dict("list") == {"cluster": [0, 1], "size": [2, 3],
                                     "break_step": [20.0, 70.0], "hidden": [False, True]}


# -- stage --------------------------------------------------------------------------------------

def fake_run(tmp_path, rng):
    """Run directory with a planted ``loss`` and POLCA arrays for basis "hessian" (3 vectors)."""
    run = RunDir(tmp_path / "run")
    curves, groups = planted_sigmoids(rng, sizes=(60, 40, 30), noise=0.01)
    arrays = run.arrays()
    arrays.require("loss", curves.shape, (len(curves), 1), ("token", "checkpoint"),
                   attrs={"steps": STEPS.tolist()})
    arrays.write_block("loss", slice(None), curves, key="all")
    n = len(curves)
    # vector 0: every token's allocated change rises (dropped by the mean filter)
    # vector 1: the planted drops, tokens 0..9 end positive (filtered)
    # vector 2: the planted drops for all
    first = np.zeros((3, len(STEPS) - 1, n))
    first[0] = 0.01
    first[1] = np.diff(curves, axis=1).T
    first[1, :, :10] = 0.02
    first[2] = np.diff(curves, axis=1).T
    second = rng.normal(0, 1e-4, first.shape)
    for name, data in (("first", first), ("second_exact", second)):
        arrays.require(f"polca/hessian/{name}", data.shape, (3, 1, n),
                       ("vector", "interval", "token"))
        arrays.write_block(f"polca/hessian/{name}", slice(None), data, key="all")
    return SimpleNamespace(run=run, cfg=RunConfig(name="t"), checkpoints=None), groups


def test_run_cluster_writes_labels_breaks_params_and_resumes(tmp_path):
    import pandas as pd

    ctx, groups = fake_run(tmp_path, np.random.default_rng(6))
    status = run_cluster(ctx, kinds=["loss", "delta_loss", "polca", "polca_paper", "lca"],
                         progress=False)
    assert status["loss"] == status["delta_loss"] == status["polca-hessian"] == "written"
    assert status["polca_paper"].startswith("missing") and status["lca"].startswith("missing")

    loss = pd.read_parquet(ctx.run.clusters / "loss.parquet")
    assert adjusted_rand_score(groups, loss["label"]) > 0.95
    polca = pd.read_parquet(ctx.run.clusters / "polca-hessian.parquet")
    by_vector = {v: f.sort_values("token")["label"].to_numpy() for v, f in polca.groupby("vector")}
    assert (by_vector[0] == C.DROPPED).all()
    assert np.flatnonzero(by_vector[1] == C.FILTERED).tolist() == list(range(10))
    assert (by_vector[2] >= C.NOISE).all()
    assert adjusted_rand_score(groups, by_vector[2]) > 0.95

    import json
    meta = json.loads((ctx.run.clusters / "polca-hessian.json").read_text())
    p = meta["params"]
    assert p["min_cluster_size"] == C.default_min_cluster_size(130) == 4
    assert p["mean_filter"] and p["token_filter"] and p["basis"] == "hessian"
    mean = ctx.run.arrays().read("loss").mean(0)
    # τ by a loop: the first step where 90 % of the total decrease of the mean loss is done
    tau = next(s for s, value in zip(STEPS, mean) if mean[0] - value >= 0.9 * (mean[0] - mean[-1]))
    assert p["tau"] == tau
    assert [v["min_samples_used"] for v in meta["vectors"]] == [
        0, C.default_min_samples(120), C.default_min_samples(130)]
    breaks = pd.read_parquet(ctx.run.clusters / "polca-hessian.breaks.parquet")
    assert set(breaks["vector"]) == {1, 2}
    assert meta["n_hidden"] == int(breaks["hidden"].sum())

    mtime = (ctx.run.clusters / "loss.parquet").stat().st_mtime_ns
    again = run_cluster(ctx, kinds=["loss", "polca"], progress=False)
    assert again == {"loss": "done", "polca-hessian": "done"}
    assert (ctx.run.clusters / "loss.parquet").stat().st_mtime_ns == mtime
    ctx.cfg.cluster.min_cluster_size = 6  # a changed parameter is recomputed
    assert run_cluster(ctx, kinds=["loss"], progress=False) == {"loss": "written"}


def test_run_cluster_rejects_unknown_kind(tmp_path):
    ctx, _ = fake_run(tmp_path, np.random.default_rng(7))
    with pytest.raises(ValueError, match="unknown trajectory kinds"):
        run_cluster(ctx, kinds=["polka"], progress=False)


def test_cluster_breaks_keep_their_dtypes_when_empty_and_concatenated():
    empty = C.cluster_breaks(np.array([-1, -2]), np.array([1.0, 2.0]), tau=5)
    full = C.cluster_breaks(np.array([0, 0, 1]), np.array([1.0, 3.0, 9.0]), tau=5)
    assert len(empty) == 0
    both = pd.concat([empty, full], ignore_index=True)
    assert both["hidden"].tolist() == [False, True] and both["hidden"].dtype == bool
    assert both["size"].tolist() == [2, 1] and both["size"].dtype == np.int64
