"""Fault injection: every stage SIGKILLed at seeded random moments, then resumed, must end with
arrays, clusterings and evaluation bit-identical to an uninterrupted run; an edited input must
then be detected and recomputed.

Each stage runs in a forked child process (so no start-up cost hides the kill moments). The
kill moments of a stage are drawn uniformly (seeded) from its duration in the uninterrupted
reference run and sorted; the child of attempt i is killed with SIGKILL after the time from
moment i−1 to moment i plus the stage's restart overhead (measured as the time of re-running
the finished stage), so the kills spread over the stage's work however much a resumed attempt
skips. After the kills the stage runs to the end. The short version kills each stage twice;
the slow one 20 times.
"""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch
import zarr

from polca.api import run_stage
from polca.config import parse_config
from polca.stages.common import open_run
from polca.store import RunDir

TINY = {
    "name": "faults", "task": {"n_probe": 30, "digits": 2},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "train": {"steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10},
    "checkpoints": {"every": 10},
    "basis": {"kinds": ["hessian", "random"], "every": 20, "sample_size": 16},
    "decompose": {"lca_top_parameters": 10},
    "cluster": {"trajectories": ["loss", "delta_loss", "polca", "polca_paper", "integrated",
                                 "lca"], "min_cluster_size": 4},
}
STAGES = ("train", "trajectories", "basis", "decompose", "cluster", "evaluate", "measures")


def stage_child(root, data, stage) -> None:
    torch.set_num_threads(1)
    try:
        run_stage(open_run(root, parse_config(data)), stage, progress=False)
    except BaseException:  # noqa: BLE001 - report any failure through the exit code
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_stage_in_child(root, stage, kill_after: float | None = None) -> tuple[str, float]:
    """Run one stage in a forked child; kill it after ``kill_after`` seconds if it is still
    running. Returns ("killed" | "finished", seconds)."""
    process = multiprocessing.get_context("fork").Process(target=stage_child,
                                                          args=(root, TINY, stage))
    start = time.perf_counter()
    process.start()
    process.join(kill_after)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        return "killed", time.perf_counter() - start
    assert process.exitcode == 0, f"stage {stage} failed (exit code {process.exitcode})"
    return "finished", time.perf_counter() - start


def results(root) -> dict[str, bytes]:
    """Every array, clustering and evaluation table of a run, as bytes."""
    out = {}
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            out[f"arrays/{name}"] = np.ascontiguousarray(node[...]).tobytes()
    run = RunDir(root)
    for name in run.clustering_names():
        clustering = run.read_clustering(name)
        out[f"clusters/{name}"] = clustering.frame.to_csv().encode()
        out[f"clusters/{name}.breaks"] = clustering.breaks.to_csv().encode()
    for path in sorted((root / "evaluation").glob("*.csv")):
        out[f"evaluation/{path.name}"] = path.read_bytes()
    for name in run.basis_names():
        out[f"basis/{name}"] = run.load_basis(name).vectors.numpy().tobytes()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, each stage timed: (its duration, the time of re-running it
    once done)."""
    root = tmp_path_factory.mktemp("faults") / "reference"
    durations = {stage: (run_stage_in_child(root, stage)[1], run_stage_in_child(root, stage)[1])
                 for stage in STAGES}
    return root, durations, results(root)


def killed_run(root, durations, kills_per_stage: int, seed: int) -> dict[str, int]:
    """Every stage killed ``kills_per_stage`` times, then finished; returns how many kills hit
    a running stage."""
    rng = np.random.default_rng(seed)
    landed = {}
    for stage in STAGES:
        duration, overhead = durations[stage]
        moments = np.sort(rng.uniform(0, duration, kills_per_stage))
        landed[stage] = 0
        for gap in np.diff(moments, prepend=0.0):
            outcome, _ = run_stage_in_child(root, stage, kill_after=float(overhead + gap))
            landed[stage] += outcome == "killed"
        run_stage_in_child(root, stage)
    return landed


def check_identical(reference_results, root) -> None:
    got = results(root)
    assert got.keys() == reference_results.keys()
    different = [name for name in got if got[name] != reference_results[name]]
    assert not different, f"differ from the uninterrupted run: {different}"


def check_edited_input_is_detected(root) -> None:
    said = []
    changed = parse_config({**TINY, "cluster": {**TINY["cluster"], "min_cluster_size": 6}})
    ctx = open_run(root, changed)
    ctx.run.say = said.append
    for stage in ("cluster", "evaluate"):
        run_stage(ctx, stage, progress=False)
    recomputed = {line.split(":")[0] for line in said if "inputs changed" in line}
    assert {"cluster/loss", "cluster/polca-hessian", "evaluate"} <= recomputed
    assert ctx.run.read_clustering("loss").params["min_cluster_size"] == 6


def test_stages_killed_twice_each_resume_bit_identical(reference, tmp_path):
    _, durations, expected = reference
    root = tmp_path / "killed"
    landed = killed_run(root, durations, kills_per_stage=2, seed=0)
    print(f"kills that hit a running stage: {landed}")
    assert sum(landed.values()) >= len(STAGES), landed  # most kills hit a running stage
    check_identical(expected, root)
    check_edited_input_is_detected(root)


@pytest.mark.slow
def test_stages_killed_twenty_times_each_resume_bit_identical(reference, tmp_path):
    _, durations, expected = reference
    root = tmp_path / "killed"
    landed = killed_run(root, durations, kills_per_stage=20, seed=1)
    print(f"kills that hit a running stage: {landed}")
    assert sum(landed.values()) >= 10 * len(STAGES), landed
    check_identical(expected, root)
