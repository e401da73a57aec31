"""POLCA beside the progress measures: the report section with cluster break times on a small
synthetic run directory (checked against brute-force selection and look-ups), and measures on a
probe whose rows score different positions (loss and norms only, against a hand loop)."""

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from polca.functional import ProbeBatch
from polca.measures import checkpoint_measures, reference_measures
from polca.models.decoder import Decoder, DecoderConfig
from polca.report.html import write_report
from polca.report.plateau import breaks_section, measures_with_breaks
from polca.store import RunDir

STEPS = [0, 10, 20, 30, 40, 50]
MEASURES = ["loss", "repetition", "cosine", "attention_progress", "weight_norm"]


def synthetic_run(root) -> tuple[RunDir, pd.DataFrame, dict[str, pd.DataFrame]]:
    """A run directory holding only a measures array and two clusterings' break tables."""
    run = RunDir(root)
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (len(STEPS), len(MEASURES)))
    arrays = run.arrays()
    arrays.require("measures", values.shape, (1, len(MEASURES)), ("checkpoint", "measure"),
                   attrs={"steps": STEPS, "measures": MEASURES, "reference": {}})
    for i, row in enumerate(values):
        arrays.write_block("measures", (i, slice(None)), row, key=i)
    breaks = {
        "loss": pd.DataFrame({"cluster": [0, 1, 2], "size": [5, 40, 12],
                              "break_step": [12.0, 33.0, 47.5], "hidden": [False, True, True]}),
        "polca-hessian": pd.DataFrame({"vector": [0, 0, 1, 1], "cluster": [0, 1, 0, 1],
                                       "size": [7, 3, 30, 9], "break_step": [21.0, 5.0, 38.0, 26.0],
                                       "hidden": [False, False, True, False]}),
    }
    run.clusters.mkdir(parents=True)
    for name, frame in breaks.items():
        frame.to_parquet(run.clusters / f"{name}.breaks.parquet")
    return run, pd.DataFrame(values, columns=MEASURES, index=STEPS), breaks


def largest_by_loop(frame: pd.DataFrame, top: int) -> list[float]:
    """Break steps of the ``top`` largest clusters, by repeatedly taking the biggest left."""
    rows, chosen = frame.to_dict("records"), []
    for _ in range(min(top, len(rows))):
        biggest = max(rows, key=lambda r: r["size"])
        chosen.append(biggest["break_step"])
        rows.remove(biggest)
    return chosen


def dashed_lines(ax) -> list[tuple[float, str]]:
    return [(float(line.get_xdata()[0]), mcolors.to_hex(line.get_color()))
            for line in ax.lines if line.get_linestyle() == "--"]


def test_section_marks_the_top_clusters_break_steps_and_reads_the_measures_there(tmp_path):
    run, values, breaks = synthetic_run(tmp_path / "run")
    drawn = {}

    def figure(name, fig, alt):
        drawn[name] = fig
        return f"<img alt='{alt}'>"

    html = breaks_section(run, figure, top=2)
    fig = drawn["measures_breaks"]
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == MEASURES
    expected = {name: largest_by_loop(frame, 2) for name, frame in breaks.items()}
    for ax in fig.axes[: len(MEASURES)]:
        lines = dashed_lines(ax)
        assert sorted(x for x, _ in lines) == sorted(s for steps in expected.values() for s in steps)
        colours = {name: {c for x, c in lines if x in steps} for name, steps in expected.items()}
        assert all(len(c) == 1 for c in colours.values())  # one colour per clustering
        assert colours["loss"] != colours["polca-hessian"]
    # the table gives each break's measures at the nearest checkpoint: 33 -> 30, 47.5 -> 50
    for step, nearest in [(33.0, 30), (47.5, 50), (38.0, 40), (26.0, 30)]:
        assert f"<td>{step:.4g}</td>" in html
        assert f"<td>{values.loc[nearest, 'cosine']:.4g}</td>" in html
    assert "at break: cosine" in html and html.count("<tr>") >= 4 + 1


def test_report_page_shows_the_section_and_saves_its_figure(tmp_path):
    run, _, _ = synthetic_run(tmp_path / "run")
    page = write_report(run.root).read_text()
    assert "POLCA beside the progress measures" in page
    assert (run.report / "measures_breaks.png").read_bytes()[:4] == b"\x89PNG"


def test_section_is_empty_without_measures_and_a_note_without_clusters(tmp_path):
    empty = RunDir(tmp_path / "empty")
    assert breaks_section(empty, lambda *a: "<img>") == ""
    run, _, _ = synthetic_run(tmp_path / "run")
    for path in run.clusters.glob("*"):
        path.unlink()
    assert "run `polca cluster`" in breaks_section(run, lambda *a: "<img>")


def test_break_lists_per_name_draw_one_line_per_step():
    table = pd.DataFrame({"loss": [3.0, 2.0, 1.0]}, index=[0, 10, 20])
    fig = measures_with_breaks(table, {"a": [3, 7], "b": 15, "c": [np.nan]})
    assert sorted(x for x, _ in dashed_lines(fig.axes[0])) == [3, 7, 15]


def test_probe_without_shared_output_positions_gets_loss_and_weight_norms():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=7, context_length=5, n_layers=1, d_model=8,
                                  n_heads=2)).double()
    ids = torch.randint(0, 7, (3, 5))
    targets = torch.randint(0, 7, (3, 5))
    scored = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    row = checkpoint_measures(model, ProbeBatch(ids, targets, scored), batch_size=2)
    params = dict(model.named_parameters())
    assert set(row) == {"loss", "weight_norm", *(f"weight_norm/{n}" for n in params)}
    losses = [F.cross_entropy(model(ids[b:b + 1])[0, p], targets[b, p]).item()
              for b in range(3) for p in range(5) if scored[b, p]]
    assert np.isclose(row["loss"], np.mean(losses), rtol=1e-12)
    total = sum(float((p.detach() ** 2).sum()) for p in params.values()) ** 0.5
    assert np.isclose(row["weight_norm"], total, rtol=1e-12)
    assert reference_measures(ProbeBatch(ids, targets, scored)) == {}
