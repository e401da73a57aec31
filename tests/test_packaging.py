"""A non-editable install works from any directory, and its files follow the user's umask.

The wheel is built offline from a copy of the source tree and installed into a folder of its
own (``pip install --target``); the demo then runs from an empty directory with only that
folder ahead of the installed dependencies on the path, so neither the repository's
``configs/`` nor its source can be what it reads.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the shipped demo, shrunk to seconds
TINY = ["--set", "task.n_probe=20", "--set", "train.steps=40", "--set", "checkpoints.every=20",
        "--set", "basis.every=20", "--set", "basis.sample_size=8", "--set", "model.d_model=16",
        "--set", "model.d_mlp=32", "--set", "basis.kinds=['random']",
        "--set", "decompose.lca=false", "--set", "cluster.trajectories=['loss', 'polca']"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built as a wheel and installed (not editable) into a folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", work / "dist", source], check=True, capture_output=True)
    [wheel] = (work / "dist").glob("polca_breakthroughs-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target",
                    work / "site", wheel], check=True, capture_output=True)
    return work / "site"


def run_demo(site: Path, cwd: Path, umask: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polca.cli", "demo", "addition", "--runs", "runs", *TINY],
        check=False, cwd=cwd, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: os.umask(umask),
        env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_installed_demo_runs_anywhere_and_writes_with_the_umask(installed, tmp_path, umask):
    done = run_demo(installed, tmp_path, umask)
    assert done.returncode == 0, done.stderr
    where = subprocess.run([sys.executable, "-c", "import polca; print(polca.__file__)"],
                           check=True, cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(installed)}).stdout
    assert where.startswith(str(installed))  # the installed copy, not the repository's
    root = tmp_path / "runs" / "demo-addition"
    assert done.stdout.rstrip().endswith("report: runs/demo-addition/report/index.html")
    modes = {p.relative_to(root): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")
             if p.is_file()}
    assert any(p.suffix == ".parquet" for p in modes) and any(p.suffix == ".png" for p in modes)
    assert {p: m for p, m in modes.items() if m != 0o666 & ~umask} == {}


@pytest.mark.slow
def test_the_installed_package_has_its_version(installed, tmp_path):
    out = subprocess.run([sys.executable, "-m", "polca.cli", "--version"], check=True,
                         cwd=tmp_path,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(installed)}).stdout
    metadata = next(installed.glob("polca_breakthroughs-*.dist-info")).name
    assert out == f"polca {metadata.removesuffix('.dist-info').split('-')[1]}\n"
