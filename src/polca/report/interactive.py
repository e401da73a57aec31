"""An interactive view of the exact-loss trajectories for the report (the ``[interactive]``
extra: Bokeh), offline: hover a curve to see its token, pan and zoom.

Bokeh's JavaScript is inlined into the page with the data (only the parts the view needs), so
the page stays one self-contained file that loads nothing from the network; without Bokeh the
report has no view and no script at all. Measured on the addition demo (1,200 tokens × 41
checkpoints, bokeh 3.9.0): 2.0 MB more page (docs/report.md).

Example:
    >>> head, body = trajectory_view(np.array([0, 10]), np.array([[2.0, 1.0], [2.0, 0.5]]),
    ...                              np.array([0, -1]), ["a → b", "c → d"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polca.report.figures import COLORS, NATS, STEP

NOISE_COLOR = "#bbbbbb"


def available() -> bool:
    """Whether Bokeh is installed (``pip install 'polca-breakthroughs[interactive]'``)."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def trajectory_view(steps, loss, labels, hover: Sequence[str],
                    title: str = "") -> tuple[str, str]:
    """``(head, body)`` HTML: ``head`` Bokeh's JavaScript (once per page), ``body`` one plot of
    the ``loss`` ``[tokens, checkpoints]`` trajectories against ``steps``, one line per token
    coloured by its cluster in ``labels`` ``[tokens]`` (negative: grey), ``hover[token]``
    shown when the pointer is on its line."""
    from bokeh.embed import components
    from bokeh.embed.bundle import bundle_for_objs_and_resources
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    steps = np.asarray(steps, dtype=float)
    loss = np.round(np.asarray(loss, dtype=float), 4)  # a hover readout needs no more
    labels = np.asarray(labels)
    colors = [COLORS[c % len(COLORS)] if c >= 0 else NOISE_COLOR for c in labels]
    source = ColumnDataSource({
        "xs": [steps.tolist()] * len(loss), "ys": loss.tolist(), "token": list(hover),
        "cluster": [str(c) if c >= 0 else "none" for c in labels], "color": colors})
    plot = figure(width=1100, height=480, title=title, x_axis_label=STEP, y_axis_label=NATS,
                  tools="pan,wheel_zoom,box_zoom,reset", sizing_mode="scale_width")
    lines = plot.multi_line("xs", "ys", source=source, line_color="color", line_alpha=0.35,
                            hover_line_color="black", hover_line_alpha=1.0)
    plot.add_tools(HoverTool(renderers=[lines], tooltips=[("token", "@token"),
                                                          ("cluster", "@cluster")]))
    script, div = components(plot)
    return bundle_for_objs_and_resources([plot], INLINE).scripts(), script + div
