"""The command line says what it does: one line per stage, the finding at the end, one-line
errors, resumable interruptions, and config changes named key by key.

The commands run as subprocesses with their output in pipes (not a terminal), as in a log
file or CI; the oracle for "nothing recomputed" is the modification times of the run's files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from test_pipeline import TINY

from polca import __version__
from polca.cli import app
from polca.config import dump_config, parse_config
from polca.stages import STAGES

SRC = Path(__file__).resolve().parents[1] / "src"


def polca(*args, cwd: Path, env: dict | None = None, timeout: float = 600):
    """``polca ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "polca.cli", *map(str, args)], check=False, cwd=cwd,
        capture_output=True,
        text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})})
    return done.returncode, done.stdout, done.stderr


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "polca.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})


def write(folder: Path, **changes) -> Path:
    data = {**TINY, **changes}
    path = folder / f"{data['name']}.toml"
    path.write_text(dump_config(parse_config(data)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny addition run made by ``polca run`` (stdout and stderr kept)."""
    folder = tmp_path_factory.mktemp("cli")
    config = write(folder)
    code, out, err = polca("run", config, cwd=folder)
    assert code == 0, err
    return folder, config, out, err


def stamps(root: Path) -> dict:
    """Modification times of the run's results (not the report, the lock, the records)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()
            and not {"report", ".progress"} & set(p.parts) and not p.name.startswith(".lock")}


def test_a_run_in_a_log_has_one_line_per_stage_then_the_finding(finished):
    folder, _, out, err = finished
    assert "\r" not in err + out  # no progress-bar redraws in a file
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == list(STAGES)
    assert all(": done in " in line for line in lines)
    # the finding in plain sentences (no markdown), then the report's path
    words = " ".join(out.split())
    assert "POLCA on the Hessian basis (the paper's method) found" in words
    assert "exact loss:" in out and "|" not in out and "---" not in out
    assert out.rstrip().splitlines()[-1] == "report: runs/tiny/report/index.html"
    assert (folder / "runs" / "tiny" / "report" / "summary.json").is_file()


def test_a_second_run_skips_every_stage_and_says_so(finished, tmp_path):
    folder, config, _, _ = finished
    shutil.copytree(folder / "runs", tmp_path / "runs")
    before = stamps(tmp_path / "runs")
    code, _, err = polca("run", config, cwd=tmp_path)
    assert code == 0, err
    assert [line for line in err.splitlines() if "skipped" in line] == [
        f"{stage}: done (skipped)" for stage in STAGES if stage != "report"]
    assert stamps(tmp_path / "runs") == before


def test_a_cluster_setting_recomputes_clustering_onward_only(finished, tmp_path):
    folder, config, _, _ = finished
    shutil.copytree(folder / "runs", tmp_path / "runs")
    root = tmp_path / "runs" / "tiny"
    before = stamps(root)
    code, _, err = polca("run", config, "--set", "cluster.min_samples=3",
                         "--set", "decompose.batch_size=64", cwd=tmp_path)
    assert code == 0, err
    assert ("config: cluster.min_samples: unset → 3; can invalidate cluster, evaluate, report"
            in err)
    assert "config: decompose.batch_size: 512 → 64; changes only where or how fast" in err
    for stage in ("train", "trajectories", "basis", "decompose", "measures"):
        assert f"{stage}: done (skipped)" in err
    assert "cluster: done in" in err and "evaluate: done in" in err
    after = stamps(root)
    changed = {p.relative_to(root).parts[0] for p in after if after[p] != before.get(p)}
    assert changed == {"clusters", "evaluation", "config.toml"}
    assert "min_samples = 3" in (root / "config.toml").read_text()


def test_a_changed_training_setting_is_refused_naming_each_key(finished, tmp_path):
    folder, config, _, _ = finished
    shutil.copytree(folder / "runs", tmp_path / "runs")
    code, out, err = polca("run", config, "--set", "train.lr=0.01", "--set", "seed=3",
                           cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "seed: 0 → 3" in err and "train.lr: 0.003 → 0.01" in err


@pytest.mark.parametrize("args, message", [
    (["run", "missing.toml"], "config file missing.toml does not exist"),
    (["run", "runs/none"], "neither a config .toml file nor a run directory"),
    (["demo", "addition", "--set", "cluster.nope=1"], "cluster.nope: unknown key"),
    (["demo", "addition", "--set", "basis.every"], "write SECTION.KEY=VALUE"),
    (["demo", "text"], "make data"),  # the corpus is not in this directory's .cache
    (["evaluate", "runs/none"], "neither a config .toml file nor a run directory"),
])
def test_bad_input_is_one_error_line_with_exit_2(tmp_path, args, message):
    code, _, err = polca(*args, cwd=tmp_path, env={"POLCA_WHEELS": str(tmp_path)})
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_interrupted_training_says_how_far_and_resumes(tmp_path):
    config = write(tmp_path, name="long", train={**TINY["train"], "steps": 600},
                   checkpoints={"every": 20})
    manifest = tmp_path / "runs" / "long" / "checkpoints" / "manifest.json"
    done = None
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        process = start("train", config, cwd=tmp_path)
        deadline = time.monotonic() + 300
        size = manifest.stat().st_size if manifest.is_file() else 0
        while not (manifest.is_file() and manifest.stat().st_size > size + 200):
            assert process.poll() is None and time.monotonic() < deadline, \
                process.communicate()
            time.sleep(0.2)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == code, err
        *before, last = err.splitlines()
        assert last.startswith("interrupted (during train, ")
        assert last.endswith("/31 checkpoints on disk) — run the same command to resume")
        if signum == signal.SIGTERM:  # the second start resumed where the first stopped
            assert before == [f"train: resuming: {done}/31 checkpoints on disk"]
        done = int(last.split("during train, ")[1].split("/")[0])
    finished, _, err = polca("train", config, cwd=tmp_path)
    assert finished == 0, err
    assert err.splitlines()[0] == f"train: resuming: {done}/31 checkpoints on disk"


def test_every_command_that_takes_a_config_takes_set_and_there_is_a_version(tmp_path):
    for name, command in typer.main.get_command(app).commands.items():
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert "--set" in options, name
    code, out, _ = polca("--version", cwd=tmp_path)
    assert code == 0 and out == f"polca {__version__}\n"
