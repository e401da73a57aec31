"""Checkpoint store: sha256 checks, truncation, missing files, NaN."""

import json

import pytest
import torch

from polca.checkpoints import CheckpointError, CheckpointStore


@pytest.fixture
def store(tmp_path):
    s = CheckpointStore(tmp_path)
    s.save(0, {"w": torch.arange(6.0).reshape(2, 3)}, train_loss=2.0)
    s.save(10, {"w": torch.ones(2, 3)}, train_loss=1.0)
    return s


def test_round_trip_and_manifest(store, tmp_path):
    assert CheckpointStore(tmp_path).steps == [0, 10]
    torch.testing.assert_close(store.load(0)["w"], torch.arange(6.0).reshape(2, 3))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["train_loss"] for e in manifest["checkpoints"]] == [2.0, 1.0]


def test_modified_file_fails_its_sha256(store, tmp_path):
    path = tmp_path / "step_000010.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256.*step_000010|step_000010.*sha256"):
        store.load(10)


def test_truncated_file_is_reported_even_without_hash_check(store, tmp_path):
    path = tmp_path / "step_000010.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="step_000010"):
        store.load(10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        store.load(10, verify=False)


def test_missing_file_and_step(store, tmp_path):
    (tmp_path / "step_000000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.load(0)
    with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
        store.load(5)


def test_nan_checkpoint_is_refused(tmp_path):
    s = CheckpointStore(tmp_path)
    s.save(0, {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match="NaN"):
        s.load(0)


def test_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        CheckpointStore(tmp_path)
