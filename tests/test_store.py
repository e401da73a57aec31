"""Run directory: probe tables, array blocks and their completion markers."""

import numpy as np
import pytest
import torch

from polca.config import parse_config
from polca.stages.common import open_run
from polca.store import RunDir, StoreError
from polca.tasks.addition import Addition


def test_probe_round_trip_rebuilds_the_task_batch(tmp_path):
    task = Addition(digits=2, n_probe=20)
    run = RunDir(tmp_path)
    run.write_probe(*task.probe_set())
    batch, tokens = run.read_probe()
    assert batch.n_tokens == len(tokens) == 60
    sequences, _ = task.probe_set()
    assert torch.equal(batch.input_ids, torch.as_tensor(np.stack(sequences.input_ids)))
    assert torch.equal(batch.targets[batch.scored], torch.as_tensor(tokens.target.to_numpy()))


def test_probe_with_wrong_columns_is_refused_and_nothing_is_overwritten(tmp_path):
    run = RunDir(tmp_path)
    sequences, tokens = Addition(digits=2, n_probe=5).probe_set()
    run.write_probe(sequences, tokens)
    before = (run.probe / "tokens.parquet").read_bytes()
    with pytest.raises(StoreError, match="lacks columns.*position"):
        run.write_probe(sequences, tokens.drop(columns=["position"]))
    assert (run.probe / "tokens.parquet").read_bytes() == before
    tokens.drop(columns=["target"]).to_parquet(run.probe / "tokens.parquet")
    with pytest.raises(StoreError, match="tokens.parquet lacks columns.*target"):
        run.read_probe()


def test_array_blocks_and_markers(tmp_path):
    arrays = RunDir(tmp_path).arrays()
    arrays.require("x", (4, 3), (4, 1), ("token", "checkpoint"))
    arrays.write_block("x", (slice(None), 1), np.ones(4), key=1)
    assert arrays.done("x") == {"1"}
    data = arrays.read("x")
    assert np.isnan(data[:, 0]).all() and (data[:, 1] == 1).all()
    with pytest.raises(StoreError, match="shape"):
        RunDir(tmp_path).arrays().require("x", (5, 3), (5, 1), ("token", "checkpoint"))
    assert RunDir(tmp_path).arrays().dims("x") == ("token", "checkpoint")


def test_a_run_refuses_a_different_config(tmp_path):
    open_run(tmp_path, parse_config({"name": "a", "task": {"n_probe": 10}}))
    open_run(tmp_path, parse_config({"name": "a", "task": {"n_probe": 10}}))  # same: fine
    with pytest.raises(StoreError, match="other settings .*task.n_probe: 10 → 11"):
        open_run(tmp_path, parse_config({"name": "a", "task": {"n_probe": 11}}))
