"""`polca.Run`, the estimator: results as attributes, read through the contract, and README's
Python example run as written.

Oracles: the zarr arrays, parquet and CSV files read directly (zarr, pandas, numpy cumsum),
never through polca's readers.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import polca
from polca.cluster import DROPPED, FILTERED, NOISE

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "demo-addition", "task": {"n_probe": 40, "digits": 2},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "train": {"steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10},
    "checkpoints": {"every": 10},
    "basis": {"kinds": ["hessian", "random"], "every": 20, "sample_size": 16},
    "decompose": {"lca_top_parameters": 10},
    "cluster": {"trajectories": ["loss", "polca", "lca"], "min_cluster_size": 4},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny addition run named like the demo, finished by ``Run(...).run()``."""
    folder = tmp_path_factory.mktemp("api")
    run = polca.Run(TINY, runs=folder / "runs", progress=False).run()
    return folder, run


def zarr_array(root: Path, name: str) -> np.ndarray:
    return zarr.open_group(str(root / "arrays.zarr"), mode="r")[name][...]


def test_results_are_labelled_arrays_of_what_is_on_disk(finished):
    _, run = finished
    root = run.root
    steps = [e["step"] for e in json.loads(
        (root / "checkpoints" / "manifest.json").read_text())["checkpoints"]]
    tokens = pd.read_parquet(root / "probe" / "tokens.parquet")
    assert run.steps_ == steps
    pd.testing.assert_frame_equal(run.tokens_, tokens)

    assert run.loss_.dims == ("token", "checkpoint")
    assert run.loss_["step"].values.tolist() == steps
    assert (run.loss_["place"].values == tokens["place"].values).all()
    np.testing.assert_array_equal(run.loss_.values, zarr_array(root, "loss"))

    terms = run.terms_["hessian"]
    assert terms["first"].dims == ("vector", "interval", "token")
    assert terms["grad"].dims == ("vector", "checkpoint", "token")
    assert terms["step_end"].values.tolist() == steps[1:]
    first = zarr_array(root, "polca/hessian/first")
    np.testing.assert_array_equal(terms["first"].values, first)

    pl = run.projected_loss_["hessian"]
    assert set(pl.data_vars) == {"first_order", "polca", "polca_paper", "integrated", "fisher"}
    assert pl["polca"].dims == ("vector", "interval", "token")
    expected = np.cumsum(first + zarr_array(root, "polca/hessian/second_exact"), axis=1)
    np.testing.assert_allclose(pl["polca"].values, expected, rtol=0, atol=1e-15)
    assert (pl["polca"]["carry"].values == tokens["carry"].values).all()
    assert sorted(run.projected_loss_) == ["hessian", "random"]

    reserved = {NOISE, FILTERED, DROPPED}
    for name in ("loss", "polca-hessian", "polca-random", "lca"):
        frame = pd.read_parquet(root / "clusters" / f"{name}.parquet")
        labels = run.labels_[name]
        if "vector" in frame:
            assert labels.dims == ("vector", "token")
            for v, rows in frame.groupby("vector"):
                got = labels.sel(vector=v).values
                assert (got == rows.sort_values("token")["label"].values).all()
        else:
            assert labels.dims == ("token",)
            assert (labels.values == frame.sort_values("token")["label"].values).all()
        values = set(np.unique(labels.values).tolist())
        assert values - reserved == set(range(len(values - reserved))), name

    for name in ("scores", "clusters", "carry", "hidden"):
        pd.testing.assert_frame_equal(run.evaluation_[name],
                                      pd.read_csv(root / "evaluation" / f"{name}.csv"))
    assert run.report_path_ == root / "report" / "index.html" and run.report_path_.is_file()
    assert run.measures_ is not None and list(run.measures_.index) == steps
    assert set(run.bases_) == {"hessian", "random"} and set(run.diagnostics_) == set(run.bases_)
    table = run.clusters("polca-hessian", vector=0)
    assert (table["cluster"].values == run.labels_["polca-hessian"].sel(vector=0).values).all()


def test_a_finished_run_reopens_without_running_a_stage(finished, monkeypatch):
    _, run = finished
    import polca.api

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(polca.api, "run_stage", refuse)
    again = polca.Run(run.root).load()
    for name in ("steps_", "evaluation_", "diagnostics_"):
        assert repr(getattr(again, name)) == repr(getattr(run, name)), name
    assert again.loss_.identical(run.loss_)
    assert again.projected_loss_["random"].identical(run.projected_loss_["random"])
    for name, labels in run.labels_.items():
        assert again.labels_[name].identical(labels)
    with pytest.raises(polca.store.StoreError, match="does not exist yet"):
        polca.Run({**TINY, "name": "never-run"}, runs=run.root.parent).load()


def test_running_a_finished_run_again_recomputes_nothing(finished):
    folder, run = finished
    stamps = {p: p.stat().st_mtime_ns for p in (run.root / "arrays.zarr").rglob("*")
              if p.is_file()}
    polca.Run(TINY, runs=folder / "runs", progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in (run.root / "arrays.zarr").rglob("*")
            if p.is_file()} == stamps


def test_readme_python_example_runs_as_written(finished, monkeypatch, capsys):
    folder, _ = finished
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"## Python\n\n```python\n(.*?)```", readme, flags=re.DOTALL)
    monkeypatch.chdir(folder)  # where `make demo` leaves runs/demo-addition
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert "place" in printed and "homogeneity" in printed


@pytest.mark.slow
def test_example_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "walkthrough.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as the tests
    outputs = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                      for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "report: runs/walkthrough/report/index.html" in outputs
    assert "homogeneity" in outputs and "('vector', 'interval', 'token')" in outputs
    assert (tmp_path / "runs" / "walkthrough" / "report" / "index.html").is_file()
