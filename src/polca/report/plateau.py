"""Figures of progress measures (a ``[checkpoint × measure]`` table, index ``step``; see
:mod:`polca.measures`): the loss-plateau panel figure, and the measures beside POLCA's cluster
break times. Figure functions return a matplotlib Figure (no I/O); :func:`breaks_section`
reads a run's measures and cluster break times and returns the report's HTML for them.

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

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from polca.measures import plateau_summary
from polca.report.figures import LEGEND_FONTSIZE, STEP, _color, _figure, _finite, note_figure
from polca.report.markup import details, note, table

PROGRESS_MEASURES = ("loss", "accuracy", "repetition", "entropy", "cosine",
                     "attention_progress", "weight_norm")
TITLES = {"loss": "probe loss", "accuracy": "greedy accuracy", "repetition": "repetition frequency",
          "entropy": "output sequence entropy (nats)", "cosine": "representation collapse (cos)",
          "attention_progress": "attention progress measure", "weight_norm": "weight norm ‖θ‖"}


# the unit (or kind of number) on each measure's y axis
UNITS = {"loss": "nats", "accuracy": "fraction", "repetition": "fraction of pairs",
         "entropy": "nats", "cosine": "cosine", "attention_progress": "fraction of attention",
         "weight_norm": "L2 norm"}


def _measure_panel(ax, steps, values, name: str, reference: Mapping) -> None:
    ax.plot(steps, values, color=_color(0))
    if name in reference:
        ax.axhline(reference[name], color="0.4", linestyle="--", linewidth=0.8,
                   label="dashed: value of the true outputs")
    ax.set(title=TITLES.get(name, name), ylabel=UNITS.get(name, "value"))


def plateau_figure(table: pd.DataFrame) -> Figure:
    """Up to eight panels, one per measure that has a finite value: loss, per-output accuracy
    of greedy generation (each output fed back; first output coloured), repetition, entropy (dashed: the true outputs' values from
    ``table.attrs["reference"]``), cosine, attention progress, total weight norm and the
    change of the per-tensor norms since the first checkpoint (the six that moved most).
    A dotted line marks the drop (:func:`polca.measures.plateau_summary`); one legend below
    the panels names every line. Measures without values are named in a note, not drawn."""
    steps = table.index.to_numpy()
    reference = table.attrs.get("reference", {})
    outputs = sorted(c for c in table.columns if c.startswith("accuracy_out"))
    drop = (plateau_summary(table)["drop_step"]
            if "accuracy_out01" in table and _finite(table[outputs[1:]]) else None)
    tensors = table[[c for c in table.columns if c.startswith("weight_norm/")]]
    panels = [name for name in ("loss", "repetition", "entropy", "cosine",
                                "attention_progress", "weight_norm")
              if name in table and _finite(table[name])]
    if outputs and _finite(table[outputs]):
        panels.insert(1, "accuracy")
    if tensors.shape[1] and _finite(tensors):
        panels.append("norm_change")
    missing = [TITLES.get(n, n) for n in PROGRESS_MEASURES if n in table
               and not _finite(table[n])]
    if not panels:
        return note_figure("no progress measure has a value")
    fig, axes = _figure(ncols=min(4, len(panels)), nrows=-(-len(panels) // 4), width=3.6,
                        height=2.8)
    axes = axes.ravel()
    handles: dict[str, object] = {}
    for ax, name in zip(axes, panels):
        if name == "accuracy":
            for column in outputs[1:]:
                ax.plot(steps, table[column], color="0.75", linewidth=0.7,
                        label="grey: each output 2…n")
            if outputs[1:]:
                ax.plot(steps, table[outputs[1:]].mean(axis=1), color=_color(0),
                        label="generation accuracy: mean of outputs 2…n")
            ax.plot(steps, table[outputs[0]], color=_color(1),
                    label="generation accuracy: output 1")
            # generated from the prompt, each output fed back: not the teacher-forced accuracy
            ax.set(title="accuracy of greedy generation", ylabel="fraction of sequences")
        elif name == "norm_change":
            change = tensors - tensors.iloc[0]
            moved = change.iloc[-1].abs().sort_values(ascending=False).index[:6]
            for i, column in enumerate(moved):
                ax.plot(steps, change[column], color=_color(i + 2), linewidth=0.9,
                        label=f"norm change: {column.removeprefix('weight_norm/')}")
            ax.set(title="norm change since step 0 (top 6)", ylabel="Δ L2 norm")
        else:
            _measure_panel(ax, steps, table[name], name, reference)
        ax.set_xlabel(STEP)
        if drop is not None:
            ax.axvline(drop, color="0.2", linestyle=":", linewidth=1.0,
                       label=f"dotted: step {drop:g}, the drop (generation accuracy of "
                             "outputs 2…n halfway from its start to its maximum)")
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=2, fontsize=LEGEND_FONTSIZE)
    if missing:
        fig.suptitle(f"not drawn, no values: {', '.join(missing)}", fontsize=LEGEND_FONTSIZE + 1,
                     color="0.35")
    return fig


def measures_with_breaks(table: pd.DataFrame, breaks: Mapping | Sequence | None,
                         measures: Sequence[str] | None = None) -> Figure:
    """One panel per progress measure with cluster break times as vertical dashed lines.

    ``breaks`` is a list of steps or ``{name: step or list of steps}`` (one colour per name,
    e.g. per clustering, named in a legend beside the panels); ``measures`` defaults to those
    of :data:`PROGRESS_MEASURES` in the table. A measure with no finite value gets no panel;
    a note under the title names it.
    """
    names = list(measures) if measures is not None else [
        m for m in PROGRESS_MEASURES if m in table]
    missing = [m for m in names if m not in table]
    if missing:
        raise KeyError(f"measures {missing} are not in the table (has {list(table.columns)})")
    empty = [m for m in names if not _finite(table[m])]
    names = [m for m in names if m not in empty]
    if not names:
        return note_figure(f"no progress measure has a value ({', '.join(empty) or 'none'})")
    fig, axes = _figure(ncols=min(4, len(names)), nrows=-(-len(names) // 4), width=3.6,
                        height=2.8)
    axes = axes.ravel()
    steps = table.index.to_numpy()
    groups = ({k: np.atleast_1d(np.asarray(v, dtype=float)) for k, v in breaks.items()}
              if isinstance(breaks, Mapping) else {None: np.asarray(breaks or [], dtype=float)})
    colors = {k: "0.3" if k is None else _color(i + 1) for i, k in enumerate(groups)}
    for ax, name in zip(axes, names):
        ax.plot(steps, table[name], color=_color(0))
        ax.set_title(name)
        ax.set(xlabel=STEP, ylabel=UNITS.get(name, "value"))
        for key, values in groups.items():
            for step in values[np.isfinite(values)]:
                ax.axvline(float(step), color=colors[key], linestyle="--", linewidth=1.0,
                           alpha=0.8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[k], linestyle="--", label=f"break steps: {k}")
               for k in groups if k is not None]
    if None in groups and np.isfinite(groups[None]).any():
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="break steps"))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=LEGEND_FONTSIZE,
                   title="dashed: mean break step\nof a top cluster", title_fontsize=LEGEND_FONTSIZE)
    if empty:
        fig.suptitle(f"not drawn, no values: {', '.join(empty)}", fontsize=LEGEND_FONTSIZE + 1,
                     color="0.35")
    return fig


BREAK_COLUMNS = ["clustering", "vector", "cluster", "size", "break_step", "hidden"]


def top_cluster_breaks(breaks: Mapping[str, pd.DataFrame], top: int = 3) -> pd.DataFrame:
    """The ``top`` largest clusters of each clustering (over all its vectors), from the cluster
    stage's per-cluster tables (``{name: NAME.breaks.parquet}``: [vector,] cluster, size,
    break_step, hidden). Columns clustering, vector (NaN for exact kinds), cluster, size,
    break_step, hidden; largest first within a clustering.

    >>> frame = pd.DataFrame({"cluster": [0, 1], "size": [5, 9], "break_step": [40., 90.],
    ...                       "hidden": [False, True]})
    >>> top_cluster_breaks({"loss": frame}, top=1)[["cluster", "break_step"]].values.tolist()
    [[1.0, 90.0]]
    """
    rows = [frame.sort_values("size", ascending=False, kind="stable").head(top)
            .assign(clustering=name).reindex(columns=BREAK_COLUMNS)
            for name, frame in breaks.items() if len(frame)]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=BREAK_COLUMNS)


def measure_events(table: pd.DataFrame, measures: Sequence[str] | None = None) -> pd.DataFrame:
    """Per progress measure, the checkpoint ending its steepest rise and the one ending its
    steepest fall (the largest and smallest change between consecutive checkpoints).

    >>> table = pd.DataFrame({"cosine": [0.1, 0.9, 0.95, 0.2]}, index=[0, 10, 20, 30])
    >>> measure_events(table).set_index("measure").loc["cosine"].to_dict()
    {'steepest_rise_step': 10.0, 'rise': 0.8, 'steepest_fall_step': 30.0, 'fall': -0.75}
    """
    names = list(measures) if measures is not None else [
        m for m in PROGRESS_MEASURES if m in table]
    rows = []
    for name in names:
        change = table[name].diff().iloc[1:]
        rows.append([name, change.idxmax(), round(float(change.max()), 12),
                     change.idxmin(), round(float(change.min()), 12)])
    return pd.DataFrame(rows, columns=["measure", "steepest_rise_step", "rise",
                                       "steepest_fall_step", "fall"])


def measures_at(table: pd.DataFrame, steps: Sequence[float],
                measures: Sequence[str] | None = None) -> pd.DataFrame:
    """The measures at the checkpoint nearest each of ``steps`` (the earlier on a tie; NaN
    for a NaN step), one row per step.

    >>> table = pd.DataFrame({"cosine": [0.1, 0.9, 0.2]}, index=[0, 10, 20])
    >>> measures_at(table, [4, 5, 19, float("nan")])["cosine"].tolist()
    [0.1, 0.1, 0.2, nan]
    """
    names = list(measures) if measures is not None else [
        m for m in PROGRESS_MEASURES if m in table]
    index = table.index.to_numpy(dtype=float)
    steps = np.asarray(steps, dtype=float)
    nearest = np.argmin(np.abs(index[None] - np.nan_to_num(steps)[:, None]), axis=1)
    values = table[names].to_numpy(dtype=float)[nearest]
    values[np.isnan(steps)] = np.nan
    return pd.DataFrame(values, columns=names)


def breaks_section(run, figure: Callable[[str, Figure, str], str], top: int = 3) -> str:
    """HTML for the report: the progress measures with the break times of the ``top`` largest
    clusters of every clustering (one colour per clustering), a table of those clusters with
    the measures at their break steps, and each measure's steepest rise and fall.

    ``run`` is a :class:`~polca.store.RunDir`; ``figure(name, fig, alt) -> <img> HTML``
    renders a figure (the report's ``Page.figure``). Empty when the run has no measures; a
    note when it has no cluster break times yet.
    """
    if not run.has_measures():
        return ""
    breaks = run.read_breaks()
    if not breaks:
        return note("no clusters/*.breaks.parquet: run `polca cluster` to set POLCA's break "
                    "times beside the progress measures")
    measures = run.read_measures()
    clusters = top_cluster_breaks(breaks, top)
    lines = {name: group["break_step"].to_numpy()
             for name, group in clusters.groupby("clustering", sort=False)}
    img = figure("measures_breaks", measures_with_breaks(measures, lines),
                 "progress measures with cluster break times")
    at_break = measures_at(measures, clusters["break_step"]).add_prefix("at break: ")
    return (f"<p>POLCA beside the progress measures. Dashed lines: the mean break step of the "
            f"{top} largest clusters of each clustering (one colour per clustering).</p>" + img
            + table(pd.concat([clusters, at_break], axis=1),
                    f"The {top} largest clusters of each clustering, with the progress measures "
                    "at the checkpoint nearest their break step")
            + details("steepest rise and fall of each progress measure", table(
                measure_events(measures), "Per measure: the checkpoint ending its largest rise "
                                          "and its largest fall between consecutive checkpoints")))
