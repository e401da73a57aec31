"""Breakthrough clustering (METHOD §2, §5): trajectories, POLCA filters, HDBSCAN, break times.

Every trajectory kind is clustered by one function, :func:`cluster_trajectories`, on a
``[tokens, time]`` matrix. Exact kinds come from ``loss [token, checkpoint]``; projected kinds
(POLCA, first order, integrated, Fisher, LCA) from interval terms ``[vector, interval, token]``
cumulated by :func:`cumulate` into ``[vector, checkpoint, token]`` with ``PL[:, 0] = 0``.

Labels: ``>= 0`` cluster (0 is the largest), ``NOISE`` (-1) HDBSCAN outlier, ``FILTERED`` (-2)
token removed by the token filter, ``DROPPED`` (-3) every token of a vector removed by the mean
filter. Only labels ``>= 0`` enter cluster statistics; all are kept in the output.

Default HDBSCAN parameters scale the paper's addition setting (5000 tokens, min_cluster_size
150, min_samples 333 = tokens / 15) by one rule (docs/reproduction.md, "HDBSCAN defaults"):

* ``min_cluster_size = max(2, round(0.03 * n_tokens))`` with ``n_tokens`` the probe tokens
  *before* filtering. The paper kept 150 for every kind on its 5000 tokens, filtered or not, so
  the smallest skill worth reporting is a fixed share of the probe set. (Text: 12,600 tokens
  give 378 where the paper used 300.)
* ``min_samples = max(1, round(0.00375 * n))``, an eighth of the paper-scaled min_cluster_size,
  with ``n`` the tokens actually clustered, i.e. *after* the token filter. min_samples is a
  density (neighbourhood) size of the point set HDBSCAN sees, and counted before the filter it
  can exceed the tokens left. The paper's n / 15 made every exact-loss clustering of 2400
  tokens noise (measured, without labels); an eighth of min_cluster_size is the largest of
  n / 15, 1, ½, ¼, ⅛ of it that did not. The paper configs set the paper's 150 and 333 themselves.

Example:
    >>> rng = np.random.default_rng(0)
    >>> curves = np.concatenate([rng.normal(0, .01, (40, 8)), rng.normal(1, .01, (20, 8))])
    >>> labels = cluster_trajectories(curves, min_cluster_size=5, min_samples=3)
    >>> np.bincount(labels[labels >= 0]).tolist()
    [40, 20]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.cluster import HDBSCAN

NOISE, FILTERED, DROPPED = -1, -2, -3

EXACT_KINDS = ("loss", "delta_loss", "abs_delta_loss")
# Projected kinds: the interval terms (arrays under polca/<basis>/) summed, then cumulated.
PROJECTED_TERMS = {
    "first_order": ("first",),
    "polca": ("first", "second_exact"),
    "polca_paper": ("first", "second_paper"),
    "integrated": ("integrated",),
    "fisher": ("fisher",),
}
LCA_ARRAY = "lca/top/first"
TRAJECTORY_KINDS = EXACT_KINDS + tuple(PROJECTED_TERMS) + ("lca",)
# Kinds whose cumulated value is an allocated loss change, so the sign filters mean something.
# Fisher terms are squares (never negative): the mean filter would drop every vector.
LOSS_ALLOCATION_KINDS = ("first_order", "polca", "polca_paper", "integrated", "lca")


def exact_trajectories(loss: np.ndarray, kind: str) -> np.ndarray:
    """Trajectories of the exact loss for clustering.

    ``loss [tokens, checkpoints]`` → ``"loss"``: itself; ``"delta_loss"``:
    ``ΔL[x, t] = L[x, t+1] − L[x, t]`` ``[tokens, intervals]``; ``"abs_delta_loss"``: ``|ΔL|``.

    >>> exact_trajectories(np.array([[3., 1., 0.]]), "delta_loss").tolist()
    [[-2.0, -1.0]]
    """
    loss = _finite_2d(loss, "loss [tokens, checkpoints]")
    if kind == "loss":
        return loss
    if kind == "delta_loss":
        return np.diff(loss, axis=1)
    if kind == "abs_delta_loss":
        return np.abs(np.diff(loss, axis=1))
    raise ValueError(f"unknown exact trajectory kind {kind!r}; choose one of {EXACT_KINDS}")


def level_curves(loss: np.ndarray, kind: str) -> np.ndarray:
    """``[tokens, checkpoints]`` curve whose break times an exact kind is judged by.

    A break time is a point of maximum acceleration of a level (cumulative) curve, as the
    projected loss ``PL`` is. For ``loss`` and ``delta_loss`` that is ``L`` itself (``ΔL``
    cumulated is ``L − L[:, 0]``, same accelerations); for ``abs_delta_loss`` it is the
    cumulated ``|ΔL|`` (zero at the first checkpoint). Taking accelerations of the rate
    ``ΔL`` directly would measure its third difference, not a breakthrough.
    """
    loss = _finite_2d(loss, "loss [tokens, checkpoints]")
    if kind in ("loss", "delta_loss"):
        return loss
    if kind == "abs_delta_loss":
        steps = np.abs(np.diff(loss, axis=1))
        return np.concatenate([np.zeros((len(loss), 1)), np.cumsum(steps, axis=1)], axis=1)
    raise ValueError(f"unknown exact trajectory kind {kind!r}; choose one of {EXACT_KINDS}")


def cumulate(terms: np.ndarray) -> np.ndarray:
    """Projected trajectories ``PL[v, t, x] = Σ_{t' < t} terms[v, t', x]``, ``PL[:, 0] = 0``.

    ``terms [vectors, intervals, tokens]`` → ``[vectors, checkpoints, tokens]`` (one more along
    time), accumulated in float64.

    >>> cumulate(np.array([[[1.], [2.]]]))[0, :, 0].tolist()
    [0.0, 1.0, 3.0]
    """
    terms = np.asarray(terms, dtype=np.float64)
    if terms.ndim != 3:
        raise ValueError(f"interval terms must be [vectors, intervals, tokens], got shape "
                         f"{terms.shape}")
    zero = np.zeros((terms.shape[0], 1, terms.shape[2]))
    return np.concatenate([zero, np.cumsum(terms, axis=1)], axis=1)


def default_min_cluster_size(n_tokens: int) -> int:
    """``max(2, round(150 · n_tokens / 5000))`` with ``n_tokens`` counted before filtering."""
    return max(2, round(150 * n_tokens / 5000))


def default_min_samples(n_clustered: int) -> int:
    """``max(1, round(0.00375 · n_clustered))`` (⅛ of the paper-scaled min_cluster_size) with
    ``n_clustered`` counted after filtering.

    >>> default_min_samples(2400), default_min_samples(5000)
    (9, 19)
    """
    return max(1, round(3 * n_clustered / 800))


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters ``0..K−1`` by decreasing size (ties: by old label); negatives kept.

    >>> relabel_by_size(np.array([5, 2, 2, -1, 5, 5])).tolist()
    [0, 1, 1, -1, 0, 0]
    """
    labels = np.asarray(labels)
    out = labels.copy()
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    order = ids[np.lexsort((ids, -sizes))]
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def cluster_trajectories(trajectories: np.ndarray, min_cluster_size: int,
                         min_samples: int) -> np.ndarray:
    """HDBSCAN labels ``[tokens]`` of ``trajectories [tokens, time]``.

    Euclidean distance between raw trajectories (as the paper), sklearn's HDBSCAN with the
    brute-force core distances (as fast as the ``hdbscan`` package at 5000 × 100). Noise is
    ``-1``; clusters are ``0..K−1``, largest first. Fewer tokens than ``min_cluster_size`` are
    all noise; ``min_samples`` is capped at the number of tokens.
    """
    x = _finite_2d(trajectories, "trajectories [tokens, time]")
    if min_cluster_size < 2:
        raise ValueError(f"min_cluster_size must be at least 2, got {min_cluster_size}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, got {min_samples}")
    n = len(x)
    if n < max(2, min_cluster_size):
        return np.full(n, NOISE, dtype=np.int64)
    model = HDBSCAN(min_cluster_size=int(min_cluster_size), min_samples=int(min(min_samples, n)),
                    algorithm="brute", copy=True)
    return relabel_by_size(model.fit_predict(x).astype(np.int64))


def polca_filters(final: np.ndarray, mean_filter: bool = True,
                  token_filter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Which vectors and tokens the POLCA filters keep (paper §4.1).

    ``final [vectors, tokens]`` is ``PL[x, b, T]``, the allocated loss change over the run.
    Returns ``keep_vector [vectors]`` (mean over tokens < 0, or all if ``mean_filter`` is off)
    and ``keep_token [vectors, tokens]`` (own value < 0, or all if ``token_filter`` is off;
    all False for a dropped vector).

    >>> kv, kt = polca_filters(np.array([[-1., 2., -3.], [1., 1., -1.]]))
    >>> kv.tolist(), kt.astype(int).tolist()
    ([True, False], [[1, 0, 1], [0, 0, 0]])
    """
    final = _finite_2d(final, "final projected loss [vectors, tokens]")
    keep_vector = final.mean(axis=1) < 0 if mean_filter else np.ones(len(final), dtype=bool)
    keep_token = final < 0 if token_filter else np.ones(final.shape, dtype=bool)
    return keep_vector, keep_token & keep_vector[:, None]


def cluster_projected(projected: np.ndarray, min_cluster_size: int | None = None,
                      min_samples: int | None = None, mean_filter: bool = True,
                      token_filter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each vector's projected trajectories after the POLCA filters.

    ``projected [vectors, checkpoints, tokens]`` → ``(labels [vectors, tokens],
    min_samples_used [vectors])``. Labels as in the module docstring (FILTERED, DROPPED for
    tokens the filters removed); ``min_samples_used`` is 0 for dropped vectors. ``None``
    parameters take the defaults (before/after filtering as documented above).
    """
    projected = np.asarray(projected, dtype=np.float64)
    if projected.ndim != 3:
        raise ValueError(f"projected trajectories must be [vectors, checkpoints, tokens], got "
                         f"shape {projected.shape}")
    n_vectors, _, n_tokens = projected.shape
    size = min_cluster_size or default_min_cluster_size(n_tokens)
    keep_vector, keep_token = polca_filters(projected[:, -1, :], mean_filter, token_filter)
    labels = np.full((n_vectors, n_tokens), DROPPED, dtype=np.int64)
    used = np.zeros(n_vectors, dtype=np.int64)
    for v in np.flatnonzero(keep_vector):
        kept = keep_token[v]
        used[v] = min_samples or default_min_samples(int(kept.sum()))
        labels[v] = FILTERED
        labels[v, kept] = cluster_trajectories(projected[v][:, kept].T, size, used[v])
    return labels, used


def default_break_delta(steps) -> int:
    """Δ in steps: one hundredth of the run (the paper's 100 of 10,000 steps), at least the
    median checkpoint spacing (finer differences are only interpolation), at most half the run
    (so some checkpoint has both neighbours)."""
    steps = _steps(steps)
    span = steps[-1] - steps[0]
    return int(max(1, min(max(round(span / 100), np.median(np.diff(steps))), span // 2)))


def break_times(f: np.ndarray, steps, delta_steps: float) -> np.ndarray:
    """Break time of each token: the step of maximum acceleration (paper §3.4, Chen et al.).

    ``break = argmax_t ([f(s_t + Δ) − f(s_t)] − [f(s_t) − f(s_t − Δ)])`` for ``f [tokens,
    checkpoints]`` at training ``steps [checkpoints]``; ``Δ = delta_steps`` is in training
    steps. Candidates are the checkpoints with ``s_0 ≤ s_t − Δ`` and ``s_t + Δ ≤ s_T``, and
    ``f(s_t ± Δ)`` is linearly interpolated between checkpoints, so unevenly spaced checkpoints
    need no resampling; on an even grid with Δ a multiple of the spacing this is the index
    formula exactly. Ties go to the earliest step. Returns ``[tokens]`` steps.

    >>> f = np.array([[4., 3., 2., 1., 1., 1.]])  # slope −1, flat from step 30
    >>> break_times(f, [0, 10, 20, 30, 40, 50], 10).tolist()
    [30]
    """
    f = _finite_2d(f, "f [tokens, checkpoints]")
    s = _steps(steps)
    if f.shape[1] != len(s):
        raise ValueError(f"f has {f.shape[1]} checkpoints but {len(s)} steps were given")
    if not delta_steps > 0:
        raise ValueError(f"delta_steps must be positive, got {delta_steps}")
    candidates = np.flatnonzero((s - delta_steps >= s[0]) & (s + delta_steps <= s[-1]))
    if not len(candidates):
        raise ValueError(f"Δ = {delta_steps} steps leaves no checkpoint with both neighbours in "
                         f"the run {s[0]}..{s[-1]}; use Δ ≤ {(s[-1] - s[0]) / 2}")
    centre = f[:, candidates]
    after = _interpolate(f, s, s[candidates] + delta_steps)
    before = _interpolate(f, s, s[candidates] - delta_steps)
    acceleration = (after - centre) - (centre - before)
    return s[candidates][np.argmax(acceleration, axis=1)].astype(np.int64)


def flat_after(mean_loss: np.ndarray, steps, fraction: float = 0.9) -> int:
    """τ: the first checkpoint step where the mean loss has completed ``fraction`` of its total
    decrease ``L[0] − L[T]``, i.e. ``L[0] − L[t] ≥ fraction · (L[0] − L[T])``.

    A curve that does not decrease overall is flat from the start (τ = first step).

    >>> flat_after(np.array([10., 9., 2., 1.5, 1.]), [0, 10, 20, 30, 40])
    30
    """
    loss = np.asarray(mean_loss, dtype=np.float64)
    s = _steps(steps)
    if loss.shape != s.shape:
        raise ValueError(f"mean_loss has shape {loss.shape} but there are {len(s)} steps")
    if not np.isfinite(loss).all():
        raise ValueError("mean_loss holds NaN or inf; recompute the exact token losses")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    done = loss[0] - loss >= fraction * (loss[0] - loss[-1])
    return int(s[np.argmax(done)])


def cluster_breaks(labels: np.ndarray, breaks: np.ndarray, tau: float) -> pd.DataFrame:
    """Per cluster (labels ≥ 0): size, mean member break step, and whether it is a hidden
    breakthrough (mean break step > τ). Columns cluster, size, break_step, hidden."""
    labels, breaks = np.asarray(labels), np.asarray(breaks, dtype=np.float64)
    if labels.shape != breaks.shape:
        raise ValueError(f"labels {labels.shape} and breaks {breaks.shape} must match")
    ids = np.unique(labels[labels >= 0])
    sizes = [int((labels == c).sum()) for c in ids]
    means = [float(breaks[labels == c].mean()) for c in ids]
    # explicit dtypes: an empty table would default to float, and concatenated with the
    # tables of other vectors turn ``hidden`` into 0.0/1.0
    return pd.DataFrame({"cluster": ids.astype(np.int64),
                         "size": np.asarray(sizes, dtype=np.int64),
                         "break_step": np.asarray(means, dtype=np.float64),
                         "hidden": np.asarray([m > tau for m in means], dtype=bool)})


def _interpolate(f: np.ndarray, s: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``f [tokens, checkpoints]`` at steps ``query`` (inside ``s``), linear in the step."""
    i = np.clip(np.searchsorted(s, query, side="right") - 1, 0, len(s) - 2)
    w = (query - s[i]) / (s[i + 1] - s[i])
    return f[:, i] * (1 - w) + f[:, i + 1] * w


def _steps(steps) -> np.ndarray:
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"steps must be a list of at least 2 checkpoint steps, got {steps!r}")
    if not (np.diff(s) > 0).all():
        raise ValueError("steps must be strictly increasing")
    return s


def _finite_2d(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-d, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(x)).sum())} NaN/inf values; "
                         "recompute the stage that wrote it")
    return x
