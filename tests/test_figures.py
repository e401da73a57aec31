"""Every figure renders (non-empty PNG and SVG) and stays legible: axes named with units,
legends outside every plotting area at a readable size, every vertical line explained, and a
panel with nothing to draw replaced by a note rather than left as an empty frame."""

import io

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from polca.findings import MIN_COVERAGE
from polca.report import figures
from polca.report.figures import LEGEND_FONTSIZE
from polca.report.plateau import measures_with_breaks, plateau_figure

RNG = np.random.default_rng(0)
STEPS = np.arange(0, 200, 10)
LOSS = np.abs(RNG.normal(2, 0.3, (40, len(STEPS)))) * np.linspace(1, 0.1, len(STEPS))
PLACE = np.repeat([1, 10, 100, 1000], 10)
CARRY = RNG.random(40) < 0.4
LABELS = np.where(np.arange(40) < 30, np.arange(40) % 3, -1)


def measures_table(attention=True):
    n = len(STEPS)
    table = pd.DataFrame({
        "loss": np.linspace(3, 0.1, n), "accuracy_out00": np.linspace(0, 1, n),
        "accuracy_out01": np.r_[np.zeros(n // 2), np.ones(n - n // 2)],
        "accuracy_out02": np.r_[np.zeros(n // 2 + 1), np.ones(n - n // 2 - 1)],
        "repetition": RNG.random(n), "entropy": RNG.random(n), "cosine": RNG.random(n),
        "attention_progress": RNG.random(n) if attention else np.full(n, np.nan),
        "weight_norm": np.linspace(10, 12, n),
        **{f"weight_norm/blocks.{i}.mlp.weight": np.linspace(1, 1 + i, n) for i in range(8)},
    }, index=pd.Index(STEPS, name="step"))
    table.attrs["reference"] = {"repetition": 0.1, "entropy": 0.5}
    return table


FIGURES = {
    "loss_curves": lambda: figures.loss_curves(STEPS, LOSS, PLACE, "place",
                                               breaks={"tau": 120}),
    "accuracy_curves": lambda: figures.accuracy_curves(STEPS, LOSS < 1, PLACE, "place"),
    "skill_curves": lambda: figures.skill_curves(STEPS, LOSS, PLACE, CARRY, "place", "carry"),
    "cluster_trajectories": lambda: figures.cluster_trajectories(
        STEPS, -LOSS, LOSS, LABELS, breaks={0: 50, 1: 150}, tau=120, delta=20, title="v0"),
    "cluster_loss_curves": lambda: figures.loss_curves(
        STEPS, LOSS, np.where(LABELS >= 0, LABELS, 99), "cluster", breaks={0: 40.0, 1: 90.0}),
    "composition_bars": lambda: figures.composition_bars(
        LABELS, pd.DataFrame({"place": PLACE, "carry": CARRY}), title="v0"),
    "homogeneity_bars": lambda: figures.homogeneity_bars(
        pd.DataFrame({"place": [0.9, 0.4, 1.0], "carry": [0.6, 0.7, 0.96]},
                     index=["loss", "polca-hessian", "polca-random"]),
        chance={"carry": 0.55, "place": 0.25},
        coverage={"loss": 1.0, "polca-hessian": 0.4, "polca-random": 0.13}),
    "interval_series": lambda: figures.interval_series(
        STEPS[1:], {"hessian: polca": np.linspace(-0.5, 0.9, len(STEPS) - 1)},
        "fraction of |ΔL| explained", "explained", reference=(0, "0: explains nothing")),
    "plateau_figure": lambda: plateau_figure(measures_table()),
    "measures_with_breaks": lambda: measures_with_breaks(
        measures_table(), {"loss": [40, 120], "polca-hessian": [90]}),
}


def legends(fig):
    found = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return found + list(fig.legends)


def legend_texts(fig) -> str:
    return " ".join(t.get_text() for leg in legends(fig) for t in leg.get_texts())


def drawn_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison]


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_renders(fig):
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=60)
    fig.savefig(svg, format="svg")
    image = mpimg.imread(io.BytesIO(png.getvalue()), format="png")
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 2  # not blank
    assert b"<svg" in svg.getvalue() and b"<path" in svg.getvalue()


@pytest.mark.parametrize("name", FIGURES)
def test_figure_renders_and_is_legible(name):
    fig = FIGURES[name]()
    assert_renders(fig)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    panels = drawn_axes(fig)
    assert panels
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel() or ax in fig.axes[1:]  # shared y: first only
        assert ax.lines or ax.patches or ax.collections  # no empty frame
        if any(len(line.get_xdata()) > 2 for line in ax.lines) and ax.get_xlabel():
            assert "step" in ax.get_xlabel()  # a curve over training
        if "loss" in ax.get_ylabel() and "|ΔL|" not in ax.get_ylabel():
            assert "nats" in ax.get_ylabel()
    for leg in legends(fig):
        assert all(t.get_fontsize() >= LEGEND_FONTSIZE for t in leg.get_texts())
        box = leg.get_window_extent(renderer)
        for ax in panels:
            assert not overlaps(box, ax.get_window_extent(renderer)), (name, ax.get_title())
    # every vertical line is explained in a legend: τ dotted, break steps dashed, drop dotted
    text = legend_texts(fig)
    for ax in panels:
        for line in ax.lines:
            x = np.asarray(line.get_xdata(), dtype=float)
            if len(x) == 2 and x[0] == x[1]:
                if line.get_linestyle() == ":":
                    assert "τ" in text or "drop" in text
                else:
                    assert "break" in text


def test_loss_axes_say_nats_and_tau_is_explained():
    fig = FIGURES["loss_curves"]()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "loss (nats)" and ax.get_xlabel() == "training step"
    assert "τ = step 120: mean loss flat after;\na later break is hidden" in legend_texts(fig)


def test_cluster_breaks_and_tau_are_named_in_the_legend():
    text = legend_texts(FIGURES["cluster_trajectories"]())
    assert "dashed: the cluster's mean break step" in text and "τ = step 120" in text
    assert "Δ = 20 steps" in text  # what a break step is, with the Δ it was measured with
    text = legend_texts(FIGURES["cluster_loss_curves"]())
    assert "cluster=0: mean break at step 40" in text


def test_homogeneity_bars_show_coverage_and_pale_bars_under_the_threshold():
    fig = FIGURES["homogeneity_bars"]()
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["loss\n100% covered", "polca-hessian\n40% covered",
                     "polca-random\n13% covered"]
    # bars go label by label (place, then carry), one per clustering
    hatched = [bool(p.get_hatch()) for p in ax.patches[:6]]
    assert hatched == [False, False, True] * 2  # only polca-random is under MIN_COVERAGE
    assert 0.13 < MIN_COVERAGE < 0.4
    assert f"under {100 * MIN_COVERAGE:.0f} % of tokens clustered" in legend_texts(fig)


def test_composition_bars_state_coverage():
    fig = FIGURES["composition_bars"]()
    assert fig.get_suptitle() == "v0: clusters cover 30 of 40 tokens (75%)"
    fig = figures.composition_bars(LABELS, pd.DataFrame({"place": PLACE}), coverage=(30, 400))
    assert fig.get_suptitle() == "clusters cover 30 of 400 tokens (7%)"  # 7.5 %, not "8"


def test_plateau_figure_names_the_drop_and_keeps_legends_readable():
    fig = FIGURES["plateau_figure"]()
    text = legend_texts(fig)
    # the drop: mean accuracy of outputs 2…n is 0 up to step 90 and reaches 1 at step 100
    assert "dotted: step 100, the drop" in text
    assert "norm change: blocks.7.mlp.weight" in text
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 8


# -- nothing to draw ------------------------------------------------------------------------------
def notes(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [fig.get_suptitle()]


EMPTY = {
    "loss_curves": (lambda: figures.loss_curves(STEPS, np.full((3, len(STEPS)), np.nan)),
                    "no finite values"),
    "cluster_trajectories": (lambda: figures.cluster_trajectories(
        STEPS, LOSS, LOSS, np.full(40, -1)), "no clusters (40 tokens: all noise or filtered)"),
    "composition_bars": (lambda: figures.composition_bars(
        np.full(40, -2), pd.DataFrame({"place": PLACE})), "no clusters"),
    "homogeneity_bars": (lambda: figures.homogeneity_bars(pd.DataFrame()),
                         "no clustering or no label to score"),
    "interval_series": (lambda: figures.interval_series(
        STEPS[1:], {"a": [np.nan] * 19}, "y", "explained"), "no finite values"),
    "measures_with_breaks": (lambda: measures_with_breaks(
        pd.DataFrame({"loss": [np.nan] * 3}, index=[0, 1, 2]), [1]),
        "no progress measure has a value"),
}


@pytest.mark.parametrize("name", EMPTY)
def test_nothing_to_draw_is_a_one_line_note(name):
    make, expected = EMPTY[name]
    fig = make()
    assert_renders(fig)
    assert any(expected in note for note in notes(fig))
    assert not any(ax.lines or ax.patches for ax in drawn_axes(fig))
    assert fig.get_size_inches()[1] < 1  # one line, not a page of white


def test_a_measure_without_values_gets_no_panel_but_a_note():
    fig = plateau_figure(measures_table(attention=False))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "attention progress measure" not in titles and len(titles) == 7
    assert fig.get_suptitle() == "not drawn, no values: attention progress measure"
    table = measures_table(attention=False)
    fig = measures_with_breaks(table, [50])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
        "loss", "repetition", "entropy", "cosine", "weight_norm"]
    assert fig.get_suptitle() == "not drawn, no values: attention_progress"
