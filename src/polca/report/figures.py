"""Figures of a run: functions that take arrays and return a matplotlib Figure (no I/O).

Every function draws on the Agg backend, so it works without a display. Token arrays are
``[tokens, checkpoints]`` with ``steps`` ``[checkpoints]`` the training step of each column;
group labels are ``[tokens]`` arrays (any dtype; one line per distinct value).

Legibility rules every figure here keeps (tested): axes name their quantity and unit (losses
in nats, x in training steps); legends sit outside the plotting area, so they cover nothing,
at no less than :data:`LEGEND_FONTSIZE` points; every vertical line (τ, a break step, a drop)
has a legend entry that says what it is; a panel with nothing to draw is replaced by a
one-line note instead of an empty frame.

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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from polca.findings import MIN_COVERAGE, percent

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
STEP = "training step"
NATS = "loss (nats)"
LEGEND_FONTSIZE = 8.0  # points; the smallest legend text any figure uses
TAU_STYLE = {"color": "0.25", "linestyle": ":", "linewidth": 1.4}
BREAK_STYLE = {"linestyle": "--", "linewidth": 1.0, "alpha": 0.8}


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


def legend(ax, handles=None, title: str | None = None, ncols: int = 1, below: bool = False):
    """A legend outside ``ax``, on its right (or ``below`` it), at :data:`LEGEND_FONTSIZE`;
    None when there is nothing to name."""
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if not handles:
        return None
    place = ({"loc": "upper center", "bbox_to_anchor": (0.5, -0.22)} if below
             else {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)})
    return ax.legend(handles=handles, **place, borderaxespad=0.0, fontsize=LEGEND_FONTSIZE,
                     title=title, title_fontsize=LEGEND_FONTSIZE, ncols=ncols)


def note_figure(text: str, width: float = 6.0) -> Figure:
    """A one-line figure saying why there is nothing to draw (instead of an empty frame)."""
    fig = Figure(figsize=(width, 0.9), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            fontsize=LEGEND_FONTSIZE + 1, color="0.35")
    return fig


def mark_tau(ax, tau: float | None) -> None:
    """τ as a dotted line, its legend entry saying what it means."""
    if tau is not None and np.isfinite(tau):
        ax.axvline(float(tau), **TAU_STYLE,
                   label=f"τ = step {tau:g}: mean loss flat after;\na later break is hidden")


def _mark_breaks(ax, breaks: Mapping | Sequence | None, colors: Mapping | None = None,
                 name: str = "group") -> None:
    """Vertical dashed lines at break steps; ``breaks`` maps a name to a step (or lists
    steps). The key ``"tau"`` is drawn as τ (:func:`mark_tau`)."""
    if breaks is None:
        return
    items = breaks.items() if isinstance(breaks, Mapping) else enumerate(breaks)
    for key, step in items:
        if step is None or not np.isfinite(step):
            continue
        if key == "tau":
            mark_tau(ax, step)
            continue
        color = (colors or {}).get(key, "0.3")
        ax.axvline(float(step), color=color, **BREAK_STYLE,
                   label=f"{name}={key}: mean break at step {step:.0f}"
                   if isinstance(breaks, Mapping) else None)


def _finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())


def loss_curves(steps, loss, groups=None, group_name: str = "group", breaks=None,
                ylabel: str = NATS, title: str = "Mean exact loss over probe tokens") -> Figure:
    """The mean of ``loss`` ``[tokens, checkpoints]`` over tokens against step, then one line
    per value of ``groups`` ``[tokens]`` (the mean over that group's tokens).

    The first line is the overall mean; ``breaks`` (name → step) are drawn as vertical lines,
    ``"tau"`` as τ. A group with no finite value draws no line.
    """
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    if not _finite(loss):
        return note_figure(f"{title}: no finite values to draw")
    fig, axes = _figure(width=8.5)
    ax = axes[0, 0]
    ax.plot(steps, np.nanmean(loss, axis=0), color="black", linewidth=2.2, label="all tokens")
    if groups is not None:
        groups = np.asarray(groups)
        for i, value in enumerate(_values(groups)):
            members = loss[groups == value]
            if _finite(members):
                ax.plot(steps, np.nanmean(members, axis=0), color=_color(i), linewidth=1.3,
                        label=f"{group_name}={value} ({len(members)} tokens)")
    _mark_breaks(ax, breaks, {k: _color(i) for i, k in enumerate(_values(groups))}
                 if groups is not None else None, group_name)
    ax.set(xlabel=STEP, ylabel=ylabel, title=title)
    legend(ax)
    return fig


def skill_curves(steps, loss, panels, lines, panel_name: str, line_name: str,
                 ylabel: str = NATS) -> Figure:
    """Ground-truth skill curves (paper Fig. 1c): one panel per value of ``panels`` ``[tokens]``
    (e.g. digit place), in it the mean ``loss`` of the tokens with each value of ``lines``
    (e.g. carry vs no carry), token counts in the legend. Panels share their y axis so the
    curves compare across panels; one legend for all, outside the last panel.
    """
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    panels, lines = np.asarray(panels), np.asarray(lines)
    panel_values, line_values = _values(panels), _values(lines)
    if not panel_values:
        return note_figure(f"no {panel_name} values to draw")
    fig, axes = _figure(ncols=len(panel_values), width=3.4, height=3.2, sharey=True)
    for ax, panel in zip(axes[0], panel_values):
        for i, value in enumerate(line_values):
            members = (panels == panel) & (lines == value)
            if members.any():
                ax.plot(steps, loss[members].mean(axis=0), color=_color(i),
                        label=f"{line_name}={value} ({int(members.sum())})")
        ax.set(title=f"{panel_name}={panel}", xlabel=STEP)
        legend(ax, title="(number of tokens)", below=True)
    axes[0, 0].set_ylabel(ylabel)
    return fig


def accuracy_curves(steps, correct, groups=None, group_name: str = "group") -> Figure:
    """Fraction of probe tokens predicted correctly (argmax) against step, overall and per
    value of ``groups``; ``correct`` is a boolean ``[tokens, checkpoints]`` array."""
    fig = loss_curves(steps, np.asarray(correct, dtype=float), groups, group_name,
                      ylabel="accuracy (fraction of tokens)", title="Accuracy (argmax = target)")
    if fig.axes[0].axison:  # not a note
        fig.axes[0].set_ylim(-0.02, 1.02)
    return fig


def cluster_trajectories(steps, projected, loss, labels, top: int = 3, breaks=None,
                         title: str = "", tau: float | None = None,
                         delta: float | None = None) -> Figure:
    """Paper Fig. 4: the mean projected-loss trajectory of each of the ``top`` largest clusters
    (left) and the mean exact loss of the same tokens (right).

    ``projected`` and ``loss`` are ``[tokens, checkpoints]``; ``labels`` ``[tokens]`` holds
    cluster ids (negative: noise or filtered out, not drawn). ``breaks`` maps a cluster id to
    its break step, drawn as a dashed line in the cluster's colour on both panels (``delta``,
    the Δ of the break times in steps, is named in its legend entry); ``tau`` as a dotted line.
    With no cluster the figure is a one-line note.
    """
    steps = np.asarray(steps)
    projected, loss = np.asarray(projected, dtype=float), np.asarray(loss, dtype=float)
    labels = np.asarray(labels)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    chosen = ids[np.argsort(-sizes, kind="stable")][:top]
    if not len(chosen):
        return note_figure(f"{title + ': ' if title else ''}no clusters ({len(labels)} tokens: "
                           "all noise or filtered)")
    fig, axes = _figure(ncols=2, width=5.0, height=3.4)
    left, right = axes[0]
    colors = {}
    for i, cluster in enumerate(chosen):
        members = labels == cluster
        colors[cluster] = _color(i)
        label = f"cluster {cluster} ({int(members.sum())} tokens)"
        left.plot(steps, projected[members].mean(axis=0), color=_color(i), label=label)
        right.plot(steps, loss[members].mean(axis=0), color=_color(i), label=label)
    shown = {c: s for c, s in dict(breaks or {}).items() if c in colors}
    for ax in (left, right):
        for c, s in shown.items():
            if s is not None and np.isfinite(s):
                ax.axvline(float(s), color=colors[c], **BREAK_STYLE)
        mark_tau(ax, tau)
    left.set(xlabel=STEP, ylabel="projected loss (nats)", title="projected loss (mean per cluster)")
    right.set(xlabel=STEP, ylabel=NATS, title="exact loss of the same tokens")
    handles = right.get_legend_handles_labels()[0]
    if shown:
        how = ("" if delta is None else
               f"\n(its tokens' largest loss acceleration,\nΔ = {delta:g} steps, averaged)")
        handles.append(Line2D([], [], color="0.3", **BREAK_STYLE,
                              label=f"dashed: the cluster's mean break step{how}"))
    legend(right, handles)
    if title:
        fig.suptitle(title)
    return fig


def _coverage_text(coverage) -> str:
    """``(clustered, total)`` as "clusters cover 157 of 1,200 tokens (13 %)"."""
    clustered, total = coverage
    share = clustered / total if total else float("nan")
    return f"clusters cover {clustered:,} of {total:,} tokens ({percent(share)})"


def composition_bars(labels, token_labels: pd.DataFrame, top: int | None = 8,
                     title: str = "", coverage: tuple[int, int] | None = None) -> Figure:
    """Label composition of clusters (paper Fig. 5): one panel per column of ``token_labels``
    (``[tokens]`` rows, e.g. place, carry), a stacked bar per cluster giving the fraction of
    its members with each label value; the number above a bar is its homogeneity (the
    fraction of the most common value). Noise (negative ids) is left out, and the share of
    tokens that are clustered is stated beside the title: ``coverage`` (clustered, total),
    default counted from ``labels``.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    ids, sizes = np.unique(labels[keep], return_counts=True)
    order = ids[np.argsort(-sizes, kind="stable")][:top]
    columns = list(token_labels.columns)
    coverage = _coverage_text(coverage or (int(keep.sum()), len(labels)))
    if not columns or not len(order):
        return note_figure(f"{title + ': ' if title else ''}"
                           f"{'no labels to compare with' if not columns else 'no clusters'} "
                           f"({coverage})")
    fig, axes = _figure(ncols=len(columns), width=3.8, height=3.2)
    fig.suptitle(f"{title}: {coverage}" if title else coverage)
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
            ax.text(x[j], 1.01, f"{purity:.2f}", ha="center", va="bottom",
                    fontsize=LEGEND_FONTSIZE)
        ax.set_xticks(x, [str(c) for c in order])
        ax.set(xlabel="cluster (largest first)", ylim=(0, 1.12),
               title=f"{column} (above a bar: its homogeneity)")
        legend(ax, title=column, ncols=2 if len(categories) > 6 else 1)
    axes[0, 0].set_ylabel("fraction of members")
    return fig


def homogeneity_bars(table: pd.DataFrame, chance: Mapping[str, float] | None = None,
                     title: str = "Size-weighted cluster homogeneity",
                     coverage: Mapping[str, float] | None = None) -> Figure:
    """Grouped bars: ``table`` has one row per clustering (index: its name) and one column per
    label, each a homogeneity in [0, 1]; ``chance`` (label → majority-class fraction) is drawn
    as a dotted line per label, since homogeneity at chance level means nothing was found.

    ``coverage`` (clustering → clustered / total tokens) is printed under each clustering's
    name, and the bars of a clustering that covers less than
    :data:`polca.findings.MIN_COVERAGE` are hatched and pale: a purity of a few tokens is not
    comparable with one of all of them.
    """
    if not len(table) or not len(table.columns):
        return note_figure("no clustering or no label to score")
    fig, axes = _figure(width=max(6.0, 0.9 * len(table) + 3.0), height=3.8)
    ax = axes[0, 0]
    coverage = dict(coverage or {})
    n = len(table.columns)
    width = 0.8 / n
    x = np.arange(len(table))
    low = np.array([coverage.get(name, 1.0) < MIN_COVERAGE for name in table.index])
    handles = []
    for i, column in enumerate(table.columns):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, table[column].to_numpy(float), width,
                      color=_color(i), label=str(column))
        for bar, pale in zip(bars, low):
            if pale:
                bar.set(alpha=0.35, hatch="//", edgecolor=_color(i))
        handles.append(bars)
        if chance and column in chance:
            ax.axhline(chance[column], color=_color(i), linestyle=":", linewidth=1.2)
    for j, name in enumerate(table.index):  # a clustering without clusters has no bar
        if not np.isfinite(table.loc[name].to_numpy(float)).any():
            ax.text(x[j], 0.02, "no clusters", rotation=90, ha="center", va="bottom",
                    fontsize=LEGEND_FONTSIZE, color="0.4")
    names = [str(name) if name not in coverage else f"{name}\n{percent(coverage[name])} covered"
             for name in table.index]
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="homogeneity (fraction)", title=title,
           xlabel="clustering, % of its tokens clustered")
    if chance:
        handles.append(Line2D([], [], color="0.3", linestyle=":", label="chance (dotted)"))
    if low.any():
        handles.append(Patch(facecolor="0.85", hatch="//", edgecolor="0.4",
                             label=f"hatched: under {100 * MIN_COVERAGE:.0f} % of tokens "
                                   "clustered"))
    legend(ax, handles, title="label")
    return fig


def interval_series(x, series: Mapping[str, Sequence[float]], ylabel: str, title: str,
                    xlabel: str = "interval end (training step)",
                    reference: tuple[float, str] | None = None,
                    floor: float | None = None) -> Figure:
    """Lines of per-interval diagnostics, e.g. the fraction of |ΔL| a basis explains, one line
    per entry of ``series`` (name → ``[intervals]`` values) against ``x`` ``[intervals]``.
    ``reference`` (value, meaning) is a horizontal line with its meaning in the legend, e.g.
    ``(0, "0: explains no more than nothing")``; series with no finite value are not drawn.
    ``floor``: the lowest value on the axis; values below it are drawn at it as ▼ and the
    series' legend entry gives its lowest value, so one extreme series does not flatten the
    others."""
    drawn = {name: np.asarray(values, dtype=float) for name, values in series.items()
             if _finite(values)}
    if not drawn:
        return note_figure(f"{title}: no finite values to draw")
    fig, axes = _figure(width=8.5)
    ax = axes[0, 0]
    x = np.asarray(x)
    lowest = min(float(np.nanmin(v)) for v in drawn.values())
    clipped = floor is not None and lowest < floor
    for i, (name, values) in enumerate(drawn.items()):
        below = clipped & (values < floor) if clipped else np.zeros(len(values), bool)
        label = name + (f" (lowest {np.nanmin(values):.3g}: ▼ off the scale)"
                        if below.any() else "")
        ax.plot(x, np.where(below, floor, values), color=_color(i), marker=".", label=label)
        if below.any():
            ax.plot(x[below], np.full(below.sum(), floor), linestyle="none", marker="v",
                    color=_color(i), markersize=7)
    if reference is not None:
        ax.axhline(reference[0], color="0.3", linestyle="-", linewidth=0.8, label=reference[1])
    if clipped:
        top = max(float(np.nanmax(v)) for v in drawn.values())
        ax.set_ylim(floor - 0.05 * (max(top, 0) - floor), None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    legend(ax)
    return fig
