"""Figures of a run: functions that take arrays and return a matplotlib Figure (no I/O).

Every function draws on the Agg backend, so it works without a display. Token arrays are
``[tokens, checkpoints]`` with ``steps`` ``[checkpoints]`` the training step of each column;
group labels are ``[tokens]`` arrays (any dtype; one line per distinct value).

Example:
    >>> steps = np.array([0, 10, 20])
    >>> loss = np.array([[2.0, 1.0, 0.5], [2.0, 1.5, 1.0]])
    >>> fig = loss_curves(steps, loss, groups=np.array([1, 10]), group_name="place")
    >>> fig.axes[0].lines[0].get_ydata().tolist()
    [2.0, 1.25, 0.75]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6,
            sharey: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    return fig, axes


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _values(groups) -> list:
    """Distinct group values in sorted order (as strings when types are mixed)."""
    values = pd.unique(pd.Series(np.asarray(groups)).dropna())
    try:
        return sorted(values.tolist())
    except TypeError:
        return sorted(values.tolist(), key=str)


def _mark_breaks(ax, breaks: Mapping | Sequence | None, colors: Mapping | None = None) -> None:
    """Vertical dashed lines at break steps; ``breaks`` maps a name to a step (or lists steps)."""
    if breaks is None:
        return
    items = breaks.items() if isinstance(breaks, Mapping) else enumerate(breaks)
    for key, step in items:
        if step is None or not np.isfinite(step):
            continue
        color = (colors or {}).get(key, "0.3")
        ax.axvline(float(step), color=color, linestyle="--", linewidth=1.0, alpha=0.8)


def loss_curves(steps, loss, groups=None, group_name: str = "group", breaks=None,
                ylabel: str = "loss", title: str = "Mean exact loss over probe tokens") -> Figure:
    """The mean of ``loss`` ``[tokens, checkpoints]`` over tokens against step, then one line
    per value of ``groups`` ``[tokens]`` (the mean over that group's tokens).

    The first line is the overall mean; ``breaks`` (name → step) are drawn as vertical lines.
    """
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(steps, np.nanmean(loss, axis=0), color="black", linewidth=2.2, label="all tokens")
    if groups is not None:
        groups = np.asarray(groups)
        for i, value in enumerate(_values(groups)):
            ax.plot(steps, np.nanmean(loss[groups == value], axis=0), color=_color(i),
                    linewidth=1.3, label=f"{group_name}={value}")
    _mark_breaks(ax, breaks)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    return fig


def skill_curves(steps, loss, panels, lines, panel_name: str, line_name: str,
                 ylabel: str = "loss") -> Figure:
    """Ground-truth skill curves (paper Fig. 1c): one panel per value of ``panels`` ``[tokens]``
    (e.g. digit place), in it the mean ``loss`` of the tokens with each value of ``lines``
    (e.g. carry vs no carry). Panels share their y axis so the curves compare across panels.
    """
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    panels, lines = np.asarray(panels), np.asarray(lines)
    panel_values, line_values = _values(panels), _values(lines)
    fig, axes = _figure(ncols=len(panel_values), width=3.4, height=3.2, sharey=True)
    for ax, panel in zip(axes[0], panel_values):
        for i, value in enumerate(line_values):
            members = (panels == panel) & (lines == value)
            if members.any():
                ax.plot(steps, loss[members].mean(axis=0), color=_color(i),
                        label=f"{line_name}={value} ({int(members.sum())})")
        ax.set(title=f"{panel_name}={panel}", xlabel="step")
        ax.legend(fontsize="x-small")
    axes[0, 0].set_ylabel(ylabel)
    return fig


def accuracy_curves(steps, correct, groups=None, group_name: str = "group") -> Figure:
    """Fraction of probe tokens predicted correctly (argmax) against step, overall and per
    value of ``groups``; ``correct`` is a boolean ``[tokens, checkpoints]`` array."""
    fig = loss_curves(steps, np.asarray(correct, dtype=float), groups, group_name,
                      ylabel="accuracy", title="Accuracy (argmax = target)")
    fig.axes[0].set_ylim(-0.02, 1.02)
    return fig


def cluster_trajectories(steps, projected, loss, labels, top: int = 3, breaks=None,
                         title: str = "") -> Figure:
    """Paper Fig. 4: the mean projected-loss trajectory of each of the ``top`` largest clusters
    (left) and the mean exact loss of the same tokens (right).

    ``projected`` and ``loss`` are ``[tokens, checkpoints]``; ``labels`` ``[tokens]`` holds
    cluster ids (negative: noise or filtered out, not drawn). ``breaks`` maps a cluster id to
    its break step, drawn as a dashed line in the cluster's colour on both panels.
    """
    steps = np.asarray(steps)
    projected, loss = np.asarray(projected, dtype=float), np.asarray(loss, dtype=float)
    labels = np.asarray(labels)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    chosen = ids[np.argsort(-sizes, kind="stable")][:top]
    fig, axes = _figure(ncols=2, width=5.0, height=3.4)
    left, right = axes[0]
    colors = {}
    for i, cluster in enumerate(chosen):
        members = labels == cluster
        colors[cluster] = _color(i)
        label = f"cluster {cluster} ({int(members.sum())})"
        left.plot(steps, projected[members].mean(axis=0), color=_color(i), label=label)
        right.plot(steps, loss[members].mean(axis=0), color=_color(i), label=label)
    if breaks is not None:
        shown = {c: s for c, s in dict(breaks).items() if c in colors}
        for ax in (left, right):
            _mark_breaks(ax, shown, colors)
    left.set(xlabel="step", ylabel="projected loss", title="projected loss (mean per cluster)")
    right.set(xlabel="step", ylabel="exact loss", title="exact loss of the same tokens")
    if len(chosen):
        left.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def composition_bars(labels, token_labels: pd.DataFrame, top: int | None = 8,
                     title: str = "") -> Figure:
    """Label composition of clusters (paper Fig. 5): one panel per column of ``token_labels``
    (``[tokens]`` rows, e.g. place, carry), a stacked bar per cluster giving the fraction of
    its members with each label value; the number above a bar is its homogeneity (the
    fraction of the most common value). Noise (negative ids) is left out.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    ids, sizes = np.unique(labels[keep], return_counts=True)
    order = ids[np.argsort(-sizes, kind="stable")][:top]
    columns = list(token_labels.columns)
    fig, axes = _figure(ncols=max(len(columns), 1), width=3.6, height=3.2)
    for ax, column in zip(axes[0], columns):
        values = np.asarray(token_labels[column])
        categories = _values(values)
        bottoms = np.zeros(len(order))
        fractions = np.array([[np.mean(values[labels == c] == v) for c in order]
                              for v in categories]).reshape(len(categories), len(order))
        x = np.arange(len(order))
        for i, (value, fraction) in enumerate(zip(categories, fractions)):
            ax.bar(x, fraction, bottom=bottoms, color=_color(i), label=str(value))
            bottoms += fraction
        for j, purity in enumerate(fractions.max(axis=0) if len(categories) else []):
            ax.text(x[j], 1.01, f"{purity:.2f}", ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(x, [str(c) for c in order])
        ax.set(xlabel="cluster (largest first)", ylim=(0, 1.12), title=column)
        ax.legend(fontsize="x-small", title=column, title_fontsize="x-small",
                  loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  ncols=2 if len(categories) > 6 else 1)
    axes[0, 0].set_ylabel("fraction of members")
    if title:
        fig.suptitle(title)
    return fig


def homogeneity_bars(table: pd.DataFrame, chance: Mapping[str, float] | None = None,
                     title: str = "Size-weighted cluster homogeneity") -> Figure:
    """Grouped bars: ``table`` has one row per clustering (index: its name) and one column per
    label, each a homogeneity in [0, 1]; ``chance`` (label → majority-class fraction) is drawn
    as a dotted line per label, since homogeneity at chance level means nothing was found.
    """
    fig, axes = _figure(width=max(6.0, 0.9 * len(table) + 2.0), height=3.6)
    ax = axes[0, 0]
    n = max(len(table.columns), 1)
    width = 0.8 / n
    x = np.arange(len(table))
    for i, column in enumerate(table.columns):
        ax.bar(x + (i - (n - 1) / 2) * width, table[column].to_numpy(float), width,
               color=_color(i), label=str(column))
        if chance and column in chance:
            ax.axhline(chance[column], color=_color(i), linestyle=":", linewidth=1.2)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="homogeneity", title=title)
    ax.legend(fontsize="small", title="label (dotted: chance)", title_fontsize="small")
    return fig


def interval_series(x, series: Mapping[str, Sequence[float]], ylabel: str, title: str,
                    xlabel: str = "interval end step") -> Figure:
    """Lines of per-interval diagnostics, e.g. the fraction of |ΔL| a basis explains, one line
    per entry of ``series`` (name → ``[intervals]`` values) against ``x`` ``[intervals]``."""
    fig, axes = _figure()
    ax = axes[0, 0]
    x = np.asarray(x)
    for i, (name, values) in enumerate(series.items()):
        ax.plot(x, np.asarray(values, dtype=float), color=_color(i), marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if series:
        ax.legend(fontsize="small")
    return fig
