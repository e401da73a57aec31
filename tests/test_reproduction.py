"""The reproduction table lays out the evaluation tables without changing a number."""

import pandas as pd

from polca.report.reproduction import reproduction_markdown
from polca.store import atomic_write_json, atomic_write_parquet


def test_rows_carry_our_and_the_papers_values(tmp_path):
    folder = tmp_path / "evaluation"
    folder.mkdir()
    pd.DataFrame({
        "name": ["loss", "polca-hessian", "polca-hessian"], "rank": [1, 1, 2],
        "homogeneity": [0.4567, 0.9, 0.8], "recall": [0.5, 0.6, 0.7], "f1": [0.48, 0.72, 0.75],
        "paper_homogeneity": [0.514, 0.973, 0.946], "paper_recall": [0.771, 0.736, None],
        "paper_f1": [0.617, 0.838, None],
    }).to_csv(folder / "carry.csv", index=False)
    pd.DataFrame({"name": ["loss", "polca-hessian", "delta_loss"], "kind": ["loss", "polca",
                  "delta_loss"], "basis": [None, "hessian", None], "n_clusters": [4, 9, 2],
                  "hidden_fraction": [0.0, 1 / 3, 0.5]}).to_csv(
        folder / "hidden.csv", index=False)
    pd.DataFrame({"name": ["loss", "loss"], "label": ["place", "carry"],
                  "v_measure": [0.81, 0.1]}).to_csv(folder / "scores.csv", index=False)
    # the exact-loss clustering left 20 of 100 tokens noise: 80 % coverage
    atomic_write_json(tmp_path / "clusters" / "loss.json", {"params": {"n_tokens": 100},
                                                            "n_noise": 20})
    atomic_write_parquet(tmp_path / "clusters" / "loss.parquet", pd.DataFrame(
        {"token": range(100), "label": [-1] * 20 + [0] * 80}))
    text = reproduction_markdown(tmp_path, command="polca run configs/x.toml")
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
             if line.startswith("| ")}
    assert lines["exact loss L"] == (
        "| exact loss L | 80% | 0.457 / – / – | 0.500 | 0.480 | 0.514 | 0.771 | 0.617 | 0.810 "
        "| 0.000 (4) | 0.000 |")
    assert "0.900 / 0.800 / –" in lines["POLCA, exact curvature"]
    assert "0.973 / 0.946 / 0.903" in lines["POLCA, exact curvature"]
    # a kind without an eligible cluster still shows the paper's values
    assert lines["ΔL"] == ("| ΔL | – | – / – / – | – | – | 0.524 | 0.958 | 0.678 | – | 0.500 (2) "
                           "| 0.000 |")
    assert "0.333 (9) | 0.355" in lines["POLCA, exact curvature"]
    assert "random basis" not in text  # rows absent from the run are left out
    assert "polca run configs/x.toml" in text
