"""Figures of progress measures (a ``[checkpoint × measure]`` table, index ``step``; see
:mod:`polca.measures`): the loss-plateau panel figure, and the measures beside POLCA's cluster
break times. Functions return a matplotlib Figure (no I/O).

Example:
    >>> table = pd.DataFrame({"loss": [2.8, 2.7, 0.1], "repetition": [0.2, 0.8, 0.05]},
    ...                      index=pd.Index([0, 10, 20], name="step"))
    >>> fig = measures_with_breaks(table, {"cluster 0": 12, "cluster 1": 18})
    >>> [ax.get_title() for ax in fig.axes]
    ['loss', 'repetition']
    >>> len(fig.axes[0].lines)                    # the curve and two break lines
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from polca.measures import plateau_summary
from polca.report.figures import _color, _figure, _mark_breaks

PROGRESS_MEASURES = ("loss", "accuracy", "repetition", "entropy", "cosine",
                     "attention_progress", "weight_norm")
TITLES = {"loss": "probe loss", "accuracy": "greedy accuracy", "repetition": "repetition frequency",
          "entropy": "output sequence entropy (nats)", "cosine": "representation collapse (cos)",
          "attention_progress": "attention progress measure", "weight_norm": "weight norm ‖θ‖"}


def plateau_figure(table: pd.DataFrame) -> Figure:
    """Eight panels: loss, per-output accuracy (first output coloured), repetition, entropy
    (dashed: the true outputs' values from ``table.attrs["reference"]``), cosine, attention
    progress, total weight norm and the change of the per-tensor norms since the first
    checkpoint (the six that moved most). A dotted line marks
    the drop (:func:`polca.measures.plateau_summary`)."""
    steps = table.index.to_numpy()
    reference = table.attrs.get("reference", {})
    drop = plateau_summary(table)["drop_step"] if "accuracy_out01" in table else None
    fig, axes = _figure(ncols=4, nrows=2, width=3.6, height=2.8)
    axes = axes.ravel()
    ax = axes[0]
    ax.plot(steps, table["loss"], color=_color(0))
    ax.set_title(TITLES["loss"])
    ax = axes[1]
    outputs = sorted(c for c in table.columns if c.startswith("accuracy_out"))
    for column in outputs[1:]:
        ax.plot(steps, table[column], color="0.75", linewidth=0.7)
    if outputs:
        ax.plot(steps, table[outputs[1:]].mean(axis=1), color=_color(0), label="outputs 2…n")
        ax.plot(steps, table[outputs[0]], color=_color(1), label="output 1")
        ax.legend(fontsize=7)
    ax.set_title("accuracy per output position")
    panels = ["repetition", "entropy", "cosine", "attention_progress", "weight_norm"]
    for ax, name in zip(axes[2:7], panels):
        if name in table:
            ax.plot(steps, table[name], color=_color(0))
            if name in reference:
                ax.axhline(reference[name], color="0.4", linestyle="--", linewidth=0.8)
        ax.set_title(TITLES[name])
    ax = axes[7]
    tensors = table[[c for c in table.columns if c.startswith("weight_norm/")]]
    change = tensors - tensors.iloc[0]
    moved = change.iloc[-1].abs().sort_values(ascending=False).index[:6]
    for i, column in enumerate(moved):
        ax.plot(steps, change[column], color=_color(i), linewidth=0.9,
                label=column.removeprefix("weight_norm/"))
    ax.set_title("norm change (top 6 tensors)")
    if len(moved):
        ax.legend(fontsize=5)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        if drop is not None:
            ax.axvline(drop, color="0.2", linestyle=":", linewidth=1.0)
    return fig


def measures_with_breaks(table: pd.DataFrame, breaks: Mapping | Sequence | None,
                         measures: Sequence[str] | None = None) -> Figure:
    """One panel per progress measure with cluster break times as vertical dashed lines.

    ``breaks`` is a list of steps or ``{cluster name: step}`` (one colour per name, named in a
    legend on the first panel); ``measures`` defaults to those of :data:`PROGRESS_MEASURES` in
    the table.
    """
    names = list(measures) if measures is not None else [
        m for m in PROGRESS_MEASURES if m in table]
    missing = [m for m in names if m not in table]
    if missing:
        raise KeyError(f"measures {missing} are not in the table (has {list(table.columns)})")
    fig, axes = _figure(ncols=min(4, len(names)), nrows=-(-len(names) // 4), width=3.6,
                        height=2.8)
    axes = axes.ravel()
    steps = table.index.to_numpy()
    keys = list(breaks) if isinstance(breaks, Mapping) else []
    colors = {k: _color(i + 1) for i, k in enumerate(keys)}
    for ax, name in zip(axes, names):
        ax.plot(steps, table[name], color=_color(0))
        ax.set_title(name)
        ax.set_xlabel("step", fontsize=8)
        _mark_breaks(ax, breaks, colors)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if keys:
        handles = [Line2D([], [], color=colors[k], linestyle="--", label=str(k)) for k in keys]
        axes[0].legend(handles=handles, fontsize=6)
    return fig
