"""benchmarks/gpu_check: its comparisons run on the CPU here (device=cpu against the float64
CPU reference, every arithmetic within its stated tolerance), its timing code runs at the tiny
shape, and the shell script stops cleanly where torch sees no CUDA device.

Oracle: the float64 CPU computation, which shares no arithmetic setting with the others.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_arithmetic_on_the_cpu_is_within_its_tolerance_of_float64():
    result = gpu_check().check("cpu")
    for name, entry in result["results"].items():
        assert entry["passed"], (name, entry)
    # float64 is the reference computed again; float32 and bfloat16 really differ from it
    assert max(result["results"]["float64"]["errors"].values()) < 1e-12
    assert result["results"]["float32"]["errors"]["grad"] > 0
    assert result["results"]["bfloat16"]["errors"]["second_exact"] > 1e-4


def test_the_tolerances_are_fixed_by_the_unit_roundoff():
    module = gpu_check()
    assert module.TOLERANCE == {"float64": 100 * 2.0**-53, "float32": 100 * 2.0**-24,
                                "tf32": 100 * 2.0**-11, "bfloat16": 100 * 2.0**-8}


def test_the_timing_runs_at_the_tiny_shape():
    out = gpu_check().timed("cpu", "float32", shape="tiny")
    assert out["tokens"] == 64 and out["vectors"] == 4
    for key in ("polca_interval_s", "lca_interval_s", "losses_checkpoint_s", "hvp_s"):
        assert out[key] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_the_script_says_there_is_no_cuda_and_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--reproduce"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device visible to torch" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing was run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_a_gpu_config_on_a_machine_without_one_stops_with_the_fix(tmp_path):
    from typer.testing import CliRunner

    from polca.cli import app

    result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / "paper-addition.toml"),
                                      "--runs", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: device 'cuda' was asked for, but torch sees no CUDA device" in result.output
    assert "--device cpu" in result.output
    assert not any(tmp_path.iterdir())
