"""The whole addition pipeline through the CLI: every stage, resumption, and float32."""

import numpy as np
import pytest
from typer.testing import CliRunner

from polca.cli import app
from polca.config import dump_config, parse_config
from polca.report import docs
from polca.report.reproduction import reproduction_markdown
from polca.store import RunDir

TINY = {
    "name": "tiny", "task": {"n_probe": 60, "digits": 2},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "train": {"steps": 120, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10},
    "checkpoints": {"every": 20},
    "basis": {"kinds": ["hessian", "random"], "every": 40, "sample_size": 32},
    "cluster": {"trajectories": ["loss", "delta_loss", "polca", "first_order"]},
}


def write_config(path, **changes):
    data = {**TINY, **changes}
    path.write_text(dump_config(parse_config(data)))
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_run_writes_every_stage_and_a_second_run_recomputes_nothing(tmp_path):
    config = write_config(tmp_path / "tiny.toml")
    doc = tmp_path / "reproduction.md"
    doc.write_text("prose before\n<!-- reproduction table: begin -->\nold table\n"
                   "<!-- reproduction table: end -->\nprose after\n")
    output = invoke("reproduce", config, "--runs", tmp_path / "runs", "--out", doc, "-q")
    root = tmp_path / "runs" / "tiny"
    # the finding in sentences on the terminal; the markdown table in the file only
    assert "exact loss:" in output and "report:" in output and "| exact loss L |" not in output
    # what the demo does not settle, and where it is settled: terminal, report, README
    assert "polca reproduce configs/repro-addition.toml" in " ".join(output.split())
    text = doc.read_text()
    assert text.startswith("prose before\n") and text.endswith("prose after\n")
    assert "old table" not in text and f"polca reproduce {config}" in text
    assert "| exact loss L |" in text
    run = RunDir(root)
    for path in ("report/index.html", "evaluation/carry.csv", "evaluation/hidden.csv",
                 "basis/hessian.json", "diagnostics/hessian.json", "clusters/polca-hessian.json"):
        assert (root / path).is_file(), path
    arrays = run.arrays()
    m = len(arrays.read("polca/hessian/delta"))
    assert m == 3  # one eigenvector per basis checkpoint: steps 40, 80, 120
    assert arrays.read("polca/hessian/first").shape == (m, 6, 180)

    # the documentation's numbers are rendered from this fresh run's summary
    summary = run.read_summary()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{docs.README_BEGIN}\nold\n{docs.README_END}\nafter\n")
    docs.update(summary, readme, doc, copy=tmp_path / "summary.json")
    block = docs.between(readme.read_text(), docs.README_BEGIN, docs.README_END)
    accuracy = arrays.read("correct")[:, -1].mean()
    assert f"**{100 * accuracy:.1f} %** accuracy" in block and summary["overview"] in block
    table = docs.between(doc.read_text(), docs.TABLE_BEGIN, docs.TABLE_END)
    assert table.startswith(reproduction_markdown(root, command=docs.COMMAND))
    assert all(sentence in table for sentence in summary["sentences"].values())
    assert "repro-addition.toml --seeds 0,1,2" in block
    assert "repro-addition.toml --seeds 0,1,2" in (root / "report/index.html").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in (root / "arrays.zarr").rglob("*") if p.is_file()}
    invoke("run", config, "--runs", tmp_path / "runs", "-q")
    after = {p: p.stat().st_mtime_ns for p in (root / "arrays.zarr").rglob("*") if p.is_file()}
    assert after == stamps  # every block was already done: nothing rewritten


@pytest.mark.slow
def test_float32_decomposition_agrees_with_float64(tmp_path):
    results = {}
    for dtype in ("float64", "float32"):
        config = write_config(tmp_path / f"{dtype}.toml", name=dtype,
                              decompose={"dtype": dtype, "lca": False})
        for stage in ("train", "trajectories", "basis", "decompose"):
            invoke(stage, config, "--runs", tmp_path / "runs", "-q")
        results[dtype] = RunDir(tmp_path / "runs" / dtype).arrays()
    for name in ("polca/hessian/first", "polca/hessian/second_exact", "polca/hessian/integrated"):
        exact, single = results["float64"].read(name), results["float32"].read(name)
        scale = np.abs(exact).max()
        assert np.abs(single - exact).max() <= 1e-4 * scale, name


def test_analysis_of_an_incompletely_trained_run_is_refused(tmp_path):
    config = write_config(tmp_path / "tiny.toml", train={**TINY["train"], "steps": 40})
    invoke("train", config, "--runs", tmp_path / "runs", "-q")
    manifest = tmp_path / "runs" / "tiny" / "checkpoints" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"step": 40', '"step": 39'))  # as if killed before the end
    result = CliRunner().invoke(app, ["basis", str(config), "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "incomplete" in result.output and "polca train" in result.output


def test_checkpoints_start_analyses_a_window_without_step_zero(tmp_path):
    """``checkpoints.start``: training runs from step 0, the series and every array start at
    the window (no 0 → start interval)."""
    config = write_config(tmp_path / "tiny.toml", name="window",
                          train={**TINY["train"], "steps": 60},
                          checkpoints={"every": 20, "start": 20})
    for stage in ("train", "trajectories"):
        invoke(stage, config, "--runs", tmp_path / "runs", "-q")
    run = RunDir(tmp_path / "runs" / "window")
    assert [e["step"] for e in run.checkpoint_manifest()] == [20, 40, 60]
    assert run.array_steps() == [20, 40, 60] and run.arrays().read("loss").shape[1] == 3
