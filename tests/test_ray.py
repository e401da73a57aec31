"""The Ray executor on a local cluster (``ray.init(num_cpus=2)``): the same bytes as in-process,
retried blocks and restarted actors after a worker is SIGKILLed, and a run killed in-process
that Ray finishes.

Oracles: the in-process executor's bytes (a run that never saw Ray), and results computed in
the test process without any executor.
"""

import os
import shutil
import signal
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import zarr

ray = pytest.importorskip("ray")

# a local cluster starts in ~10 s and the module takes ~70 s on 2 shared cores
pytestmark = pytest.mark.slow

from polca.config import parse_config
from polca.parallel import ShardedHessian, make_executor
from polca.stages.basis import run_basis
from polca.stages.common import open_run
from polca.stages.decompose import run_decompose
from polca.stages.train import run_train
from polca.stages.trajectories import run_trajectories
from polca.store import RunDir

TINY = {
    "name": "tiny", "task": {"n_probe": 20, "digits": 2},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "train": {"steps": 50, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5},
    "checkpoints": {"every": 10},
    "basis": {"kinds": ["hessian", "random"], "every": 25, "sample_size": 12},
    "decompose": {"lca_top_parameters": 6, "batch_size": 16},
    "executor": {"block_intervals": 2, "hvp_shards": 2},
}


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster whose workers import what this process imports; this
    module's functions travel by value (the workers cannot import a test module)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path),
                                           "OMP_NUM_THREADS": "1"}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "tiny"
    run_train(open_run(root, parse_config(TINY)), progress=False)
    return root


def config(kind: str) -> dict:
    return {**TINY, "executor": {**TINY["executor"], "kind": kind}}


def analyse(root, kind: str) -> None:
    ctx = open_run(root, parse_config(config(kind)))
    for stage in (run_trajectories, run_basis, run_decompose):
        stage(ctx, progress=False)


def stored(root) -> dict[str, bytes]:
    """Every array and basis of a run as bytes."""
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    out = {name: np.ascontiguousarray(node[...]).tobytes()
           for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    run = RunDir(root)
    for name in run.basis_names():
        basis = run.load_basis(name)
        out[f"basis/{name}"] = basis.vectors.numpy().tobytes()
        out[f"basis/{name}/eigenvalues"] = repr([e["eigenvalue"] for e in basis.provenance])
    return out


def copy_trained(trained, target):
    shutil.copytree(trained, target)
    return target


@pytest.fixture(scope="module")
def in_process(trained, tmp_path_factory):
    root = copy_trained(trained, tmp_path_factory.mktemp("in-process") / "tiny")
    analyse(root, "in-process")
    return stored(root)


def test_ray_gives_the_in_process_bytes(cluster, trained, in_process, tmp_path):
    root = copy_trained(trained, tmp_path / "tiny")
    analyse(root, "ray")
    got = stored(root)
    assert got.keys() == in_process.keys()
    assert "lca/top/first" in got and "polca/hessian/first" in got and "basis/hessian" in got
    assert [k for k in got if got[k] != in_process[k]] == []


def test_a_run_killed_in_process_is_finished_by_ray(cluster, trained, in_process, tmp_path):
    root = copy_trained(trained, tmp_path / "tiny")
    analyse_stages = ("from polca.stages.trajectories import run_trajectories\n"
                      "from polca.stages.basis import run_basis\n"
                      "from polca.stages.decompose import run_decompose\n")
    script = (
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from polca.config import parse_config\nfrom polca.stages.common import open_run\n"
        + analyse_stages +
        f"ctx = open_run(sys.argv[1], parse_config({config('in-process')!r}))\n"
        "run_trajectories(ctx, progress=False); run_basis(ctx, progress=False)\n"
        "done = []\n"
        "def hook(group, t):\n"
        "    done.append(t)\n"
        "    if len(done) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_decompose(ctx, progress=False, on_interval=hook)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script, str(root)], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    markers = RunDir(root).arrays().done("polca/hessian/first")
    assert len(markers) == 3, markers  # the kill left a half-done decomposition
    analyse(root, "ray")
    got = stored(root)
    assert [k for k in got if got[k] != in_process[k]] == []


def kill_once(marker, block):
    """``2 × block``; the worker running block 1 the first time is SIGKILLed."""
    if block == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * block


def test_a_killed_workers_block_is_retried(cluster, tmp_path):
    marker = tmp_path / "killed"
    results = dict(make_executor("ray").map(partial(kill_once, str(marker)), range(4)))
    assert marker.exists()  # a worker really died
    assert results == {0: 0, 1: 2, 2: 4, 3: 6}


class Scaled:
    """A shard worker: multiplies by its shard; dies the first time shard 2 is asked."""

    def __init__(self, marker, shard):
        self.marker, self.shard = marker, shard

    def times(self, x):
        if self.shard == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.shard * x


def test_a_killed_shard_actor_is_restarted(cluster, tmp_path):
    marker = tmp_path / "killed"
    group = make_executor("ray").hold(partial(Scaled, str(marker)), [1, 2, 3])
    assert group.call("times", 10) == [10, 20, 30]
    assert marker.exists()


def test_sharded_hessian_equals_the_dense_hessian(cluster):
    from polca.functional import ModuleTokenLoss, ProbeBatch
    from polca.models.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=5, context_length=4, n_layers=1, d_model=4,
                                  n_heads=1, d_mlp=8)).double()
    loss = ModuleTokenLoss(model)
    ids = torch.randint(0, 5, (5, 4))
    sample = ProbeBatch(ids, torch.roll(ids, -1, 1), torch.rand(5, 4) > 0.3)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    dense = torch.autograd.functional.hessian(lambda t: loss(t, sample).mean(), theta)
    vectors = torch.randn(theta.numel(), 3, dtype=torch.float64)
    products = {}
    for kind in ("in-process", "ray"):
        hessian = ShardedHessian(make_executor(kind), loss, theta, sample, shards=3)
        products[kind] = hessian @ vectors
    torch.testing.assert_close(products["in-process"], dense @ vectors, rtol=1e-10, atol=1e-12)
    assert torch.equal(products["ray"], products["in-process"])


def gpt2_series(folder) -> None:
    """Three GPT-2 checkpoints (transformers' save_pretrained), weights moved at random."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=11, n_positions=12, n_embd=8, n_layer=1, n_head=2))
    for step in (0, 10, 20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(folder / f"checkpoint-{step}")


def test_polca_analyze_with_ray_gives_the_in_process_arrays(cluster, tmp_path):
    from typer.testing import CliRunner

    from polca.cli import app

    gpt2_series(tmp_path / "gpt2")
    generator = torch.Generator().manual_seed(1)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(
        f'{{"input_ids": {torch.randint(0, 11, (9,), generator=generator).tolist()}}}\n'
        for _ in range(6)))
    roots = {}
    for kind in ("in-process", "ray"):
        result = CliRunner().invoke(app, [
            "analyze", "--hf", str(tmp_path / "gpt2" / "checkpoint-*"), "--probe", str(probe),
            "--basis", "hessian,random", "--name", kind, "--runs", str(tmp_path / "runs"),
            "--executor", kind, "--quiet", "--set", "executor.hvp_shards=2",
            "--set", "executor.block_intervals=1", "--set", "cluster.trajectories=['loss']"])
        assert result.exit_code == 0, result.output
        roots[kind] = tmp_path / "runs" / kind
    got, expected = stored(roots["ray"]), stored(roots["in-process"])
    assert got.keys() == expected.keys() and "polca/hessian/second_exact" in got
    assert [k for k in got if got[k] != expected[k]] == []
