"""The reproduction table over seeds: aggregation against a brute-force numpy computation, the
page block, and `polca reproduce --seeds` end to end on a tiny config."""

import math

import numpy as np
import pandas as pd
import pytest

from polca.report.seeds import MEASURES, SEEDS_BEGIN, SEEDS_END, aggregate, seeds_markdown

LABELS = ["exact loss L", "ΔL", "first-order POLCA", "POLCA, paper's curvature"]


def fabricated(rng, n_seeds):
    """Per-seed tables with random numbers, some cells missing (NaN) and one row absent from
    one seed, as runs differ."""
    frames = []
    for s in range(n_seeds):
        values = rng.normal(size=(len(LABELS), len(MEASURES)))
        values[rng.random(values.shape) < 0.2] = np.nan
        frame = pd.DataFrame(values, index=LABELS, columns=list(MEASURES))
        frames.append(frame.drop(index="ΔL") if s == 1 else frame)
    return frames


@pytest.mark.parametrize("n_seeds", [1, 2, 3, 5])
def test_aggregate_is_mean_and_sample_sd_of_the_values_present(n_seeds):
    frames = fabricated(np.random.default_rng(n_seeds), n_seeds)
    table = aggregate(frames)
    assert list(table.index) == LABELS
    for label in LABELS:
        for measure in MEASURES:
            values = [f.loc[label, measure] for f in frames if label in f.index]
            values = np.array([v for v in values if not math.isnan(v)])
            mean, sd, n = (table.loc[label, (measure, s)] for s in ("mean", "sd", "n"))
            assert n == len(values)
            if len(values):
                assert mean == pytest.approx(values.sum() / len(values), abs=1e-12)
            else:
                assert math.isnan(mean)
            if len(values) > 1:
                brute = math.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1))
                assert sd == pytest.approx(brute, abs=1e-12)
            else:
                assert math.isnan(sd)


def test_markdown_cells_show_mean_sd_counts_and_the_papers_value():
    one = pd.DataFrame({m: [0.5, math.nan] for m in MEASURES}, index=["exact loss L", "ΔL"])
    two = pd.DataFrame({m: [0.7, 0.2] for m in MEASURES}, index=["exact loss L", "ΔL"])
    text = seeds_markdown(aggregate([one, two]), [0, 1], "polca reproduce x.toml --seeds 0,1")
    assert "polca reproduce x.toml --seeds 0,1" in text
    row = next(line for line in text.splitlines() if line.startswith("| exact loss L |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    sd = np.std([0.5, 0.7], ddof=1)
    assert cells[1] == f"{60:.0f} ± {100 * sd:.0f}%"  # tokens clustered, in percent
    assert cells[2] == f"0.600 ± {sd:.3f}" and cells[3] == "0.514"  # the paper's exact loss
    delta = next(line for line in text.splitlines() if line.startswith("| ΔL |"))
    assert "0.200 (1 of 2)" in delta  # one seed only: no sd, the count said


@pytest.mark.slow
def test_reproduce_two_seeds_end_to_end(tmp_path):
    from test_pipeline import invoke, write_config

    from polca.store import RunDir

    # without exact curvature (as configs/repro-addition.toml): the report has no first- vs
    # second-order agreement to show
    config = write_config(tmp_path / "tiny.toml", name="tiny-seeds",
                          decompose={"curvature": ["paper"]},
                          cluster={"trajectories": ["loss", "first_order", "polca_paper",
                                                    "gradient"]})
    doc = tmp_path / "reproduction.md"
    doc.write_text(f"before\n{SEEDS_BEGIN}\nstale block\n{SEEDS_END}\nafter\n")
    output = invoke("reproduce", config, "--seeds", "0,1", "--runs", tmp_path / "runs",
                    "--out", doc, "-q")
    roots = [tmp_path / "runs" / f"tiny-seeds-s{s}" for s in (0, 1)]
    for root in roots:
        assert RunDir(root).read_summary() is not None
        assert (root / "evaluation" / "skill_signal.csv").is_file()
    # different seeds train different models
    first, second = (RunDir(r).arrays().read("loss") for r in roots)
    assert not np.array_equal(first, second)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "stale block" not in text
    assert f"polca reproduce {config} --seeds 0,1" in text
    assert "| exact loss L |" in text and "took" in text and "table:" in output
    assert "| ⟨b, ∇ℓ_x⟩, Hessian basis |" in text
    # a second call finds every stage done and writes the same table
    invoke("reproduce", config, "--seeds", "0,1", "--runs", tmp_path / "runs", "--out", doc,
           "-q")
    def table_lines(page):
        return [line for line in page.splitlines() if line.startswith("|")]

    assert table_lines(doc.read_text()) == table_lines(text)
