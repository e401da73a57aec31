"""The run-directory contract: input fingerprints, the lock, config changes, executors.

Oracles: byte comparison with runs that only ever saw the new inputs, a second OS process
holding the lock, and a process-pool executor written here (not polca's) that must give the
same bytes as the in-process one.
"""

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from typer.testing import CliRunner

from polca.bases import Basis
from polca.cli import app
from polca.config import dump_config, parse_config
from polca.decompose import TermOptions, interval_terms
from polca.parallel import EXECUTORS, InProcess, make_executor
from polca.stages.common import open_run
from polca.stages.decompose import IntervalBlock, polca_block, run_decompose
from polca.store import RunDir, RunLocked, StoreError, frame_sha256, label_columns, sha256_json

TINY = {
    "name": "tiny", "task": {"n_probe": 30, "digits": 2},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "train": {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5},
    "checkpoints": {"every": 10},
    "basis": {"kinds": ["random"], "every": 20, "sample_size": 8},
    "decompose": {"lca": False},
    "cluster": {"trajectories": ["loss", "polca"]},
}


def stored(root) -> dict[str, bytes]:
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    return {name: node[...].tobytes() for name, node in sorted(group.members(max_depth=None))
            if isinstance(node, zarr.Array)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny addition run (checkpoints and probe only)."""
    root = tmp_path_factory.mktemp("contract") / "tiny"
    ctx = open_run(root, parse_config(TINY))
    from polca.stages.train import run_train

    run_train(ctx, progress=False)
    return root


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


# -- fingerprints ---------------------------------------------------------------------------------
def test_refresh_discards_and_says_which_inputs_changed(tmp_path):
    said, discarded = [], []
    run = RunDir(tmp_path, say=said.append)
    assert not run.refresh("p", {"a": 1, "b": [2]}, lambda: discarded.append(1), exists=False)
    assert not run.refresh("p", {"b": [2], "a": 1}, lambda: discarded.append(1))  # same inputs
    assert run.refresh("p", {"a": 1, "b": [3]}, lambda: discarded.append(1))
    assert discarded == [1] and said == ["p: inputs changed (b); recomputing it"]
    assert run.version("p") == sha256_json({"a": 1, "b": [3]})
    # a product on disk without a record of its inputs is not trusted
    assert run.refresh("q", {"a": 1}, lambda: discarded.append(2), exists=True)
    assert discarded == [1, 2] and "no record of its inputs" in said[-1]


def test_frame_hash_sees_every_value_and_only_values():
    frame = pd.DataFrame({"ids": [np.array([1, 2]), np.array([3])], "x": [0.5, 1.0],
                          "s": ["a", "b"]})
    same = pd.DataFrame({"ids": [[1, 2], [3]], "x": [0.5, 1.0], "s": ["a", "b"]})
    assert frame_sha256(frame) == frame_sha256(same)
    for changed in (frame.assign(x=[0.5, 1.5]), frame.assign(s=["a", "c"]),
                    frame.assign(ids=[np.array([1, 2]), np.array([4])]),
                    frame.rename(columns={"x": "y"})):
        assert frame_sha256(changed) != frame_sha256(frame)


def test_label_columns_have_one_definition():
    tokens = pd.DataFrame({"token": [0, 1, 2], "sequence": [0, 0, 1], "position": [1, 2, 1],
                           "target": [3, 4, 5], "text": list("abc"), "context": list("xyz"),
                           "document": [0, 0, 1], "place": [10, 1, 10], "constant": [7, 7, 7]})
    assert label_columns(tokens) == ["place"]
    assert label_columns(tokens, declared=["constant", "absent"]) == ["constant"]


def test_a_changed_basis_recomputes_exactly_what_depends_on_it(trained, tmp_path):
    """Stage by stage: an unchanged re-run writes nothing; a new user basis file recomputes the
    basis, its decomposition, clusterings and evaluation, and they equal a fresh run's."""
    d = None
    roots = {}
    for name in ("edited", "fresh"):
        roots[name] = copy_run(trained, tmp_path / name)
    vectors = {}
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        if d is None:
            d = open_run(roots["edited"]).loss.space.dim
        vectors[seed] = torch.linalg.qr(torch.randn(d, 2, generator=g,
                                                    dtype=torch.float64)).Q.T.contiguous()
    from safetensors.torch import save_file

    for seed in (0, 1):
        save_file({"vectors": vectors[seed]}, str(tmp_path / f"user{seed}.safetensors"))

    def config(root, seed):
        path = tmp_path / f"user{seed}.safetensors"
        return parse_config({**TINY, "basis": {**TINY["basis"], "kinds": ["user"],
                                               "user_path": str(path)}})

    said = []

    def stages(root, cfg):
        ctx = open_run(root, cfg)
        ctx.run.say = said.append
        for stage in ("trajectories", "basis", "decompose", "cluster", "evaluate"):
            module = __import__(f"polca.stages.{stage}", fromlist=["_"])
            getattr(module, f"run_{stage}")(ctx, progress=False)
        return ctx.run

    run = stages(roots["edited"], config(roots["edited"], 0))
    before = stored(run.root)
    said.clear()
    stages(roots["edited"], config(roots["edited"], 0))
    assert said == [] and stored(run.root) == before  # nothing changed, nothing recomputed
    said.clear()
    (tmp_path / "user0.safetensors").unlink()
    save_file({"vectors": vectors[1]}, str(tmp_path / "user0.safetensors"))  # edited in place
    run = stages(roots["edited"], config(roots["edited"], 0))
    products = [line.split(":")[0] for line in said]
    assert products == ["basis/user", "decompose/user", "cluster/polca-user", "evaluate"], said
    fresh = stages(roots["fresh"], config(roots["fresh"], 1))
    assert stored(run.root) == stored(fresh.root)
    pd.testing.assert_frame_equal(run.read_clustering("polca-user").frame,
                                  fresh.read_clustering("polca-user").frame)
    for name, table in fresh.read_evaluation().items():
        pd.testing.assert_frame_equal(run.read_evaluation()[name], table)


def test_config_changes_keep_training_settings_and_accept_the_rest(trained, tmp_path):
    root = copy_run(trained, tmp_path / "run")
    with pytest.raises(StoreError, match=r"other settings .*train\.lr: 0\.003 → 0\.01"):
        open_run(root, parse_config({**TINY, "train": {**TINY["train"], "lr": 1e-2}}))
    changed = parse_config({**TINY, "cluster": {**TINY["cluster"], "min_cluster_size": 4}})
    open_run(root, changed)
    assert RunDir(root).config_text() == dump_config(changed)


def test_probe_of_an_outside_run_edited_in_place_is_detected(tmp_path):
    """`polca analyze` twice under one name: the second time the probe file has other examples;
    the run is rebuilt from it (tokens, losses, clusters), never the old results kept."""
    pytest.importorskip("tokenizers")
    from test_analyze import PLAIN_MODEL, copy_examples, load_module_file, write_jsonl

    (tmp_path / "plain_model.py").write_text(PLAIN_MODEL)
    module = load_module_file(tmp_path / "plain_model.py")
    torch.manual_seed(0)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    from safetensors.torch import save_file

    model = module.make_model()
    for step in (0, 10, 20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        save_file({k: v.clone() for k, v in model.state_dict().items()},
                  str(folder / f"step_{step}.safetensors"))
    vocab = {**{c: i for i, c in enumerate("abcdefgh")}, "|": 8}
    probe = tmp_path / "probe.jsonl"

    def write_probe(seed, n):
        write_jsonl(probe, [{"input_ids": [vocab[w] for w in e["words"]], "role": e["role"]}
                            for e in copy_examples(seed, n)])

    def analyze():
        result = CliRunner().invoke(app, [
            "analyze", "--checkpoints", str(folder), "--factory",
            f"{tmp_path / 'plain_model.py'}:make_model", "--probe", str(probe), "--name", "p",
            "--runs", str(tmp_path / "runs"), "--quiet", "--basis", "random",
            "--set", "decompose.lca=false", "--set", "cluster.trajectories=['loss']"])
        assert result.exit_code == 0, result.output
        return result.output + (result.stderr if result.stderr_bytes else "")

    write_probe(2, 4)
    analyze()
    run = RunDir(tmp_path / "runs" / "p")
    first = run.arrays().read("loss")
    write_probe(5, 6)  # other examples, more tokens
    output = analyze()
    assert "probe set of" in output and "changed" in output
    assert "trajectories: inputs changed (probe)" in output
    loss = run.arrays().read("loss")
    assert loss.shape[0] == 6 * 8 != first.shape[0]
    clusters = run.read_clustering("loss").frame
    assert len(clusters) == loss.shape[0]
    assert int(run.read_evaluation()["scores"]["n_clustered"].max()) <= loss.shape[0]


# -- the lock -------------------------------------------------------------------------------------
HOLD = """
import sys, time
from polca.store import RunDir
with RunDir(sys.argv[1]).lock():
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_second_process_is_refused_while_one_holds_the_run(trained, tmp_path):
    root = copy_run(trained, tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunLocked, match=rf"another polca process \(pid {holder.pid}\)"), \
                RunDir(root).lock():
            pass
        result = CliRunner().invoke(app, ["trajectories", str(root), "-q"])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: another polca process")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(root).lock(), RunDir(root).lock():  # no stale lock; re-entrant in a process
        pass


# -- the kernel and executors -------------------------------------------------------------------
class ProcessPool:
    """An executor over worker processes (spawned, so nothing is shared but what is pickled),
    returning results in completion order: the drop-in contract of polca.parallel."""

    def map(self, fn, blocks):
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=context,
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(fn, block): block for block in blocks}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                yield futures[future], future.result()


def test_kernel_blocks_pickle_and_another_executor_gives_the_same_bytes(trained, tmp_path,
                                                                         monkeypatch):
    ctx = open_run(trained)
    basis = Basis("random", "random", torch.linalg.qr(torch.randn(
        ctx.loss.space.dim, 2, dtype=torch.float64)).Q.T, [{"eigenvalue": 1.0}] * 2)
    options = TermOptions(batch_size=8)
    block = IntervalBlock(0, 1)  # intervals 0 and 1: the task loads checkpoints 0, 10, 20
    task = partial(polca_block, ctx.reader(), ctx.loss, basis, ctx.probe, options)
    copy = pickle.loads(pickle.dumps(task))
    got = copy(pickle.loads(pickle.dumps(block)))
    for t, (start, end) in enumerate(((0, 10), (10, 20))):
        direct = interval_terms(ctx.loss, ctx.theta(start), ctx.theta(end), basis, ctx.probe,
                                options)
        for name, value in got[t].arrays().items():
            assert value.numpy().tobytes() == direct.arrays()[name].numpy().tobytes(), name

    roots = {}
    for name, executor in (("in-process", InProcess), ("pool", ProcessPool)):
        roots[name] = copy_run(trained, tmp_path / name)
        ctx = open_run(roots[name])
        ctx.run.save_basis(basis)
        monkeypatch.setitem(EXECUTORS, "in-process", executor)
        run_decompose(ctx, progress=False)
    assert stored(roots["pool"]) == stored(roots["in-process"])
    assert isinstance(make_executor("in-process"), ProcessPool)  # the pool really ran
    monkeypatch.undo()
    assert isinstance(make_executor(), InProcess)
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor("dask")
