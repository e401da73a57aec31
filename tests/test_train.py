"""Training is deterministic and an interrupted run resumes to the same bytes."""

import itertools

import pytest
import torch

from polca.checkpoints import CheckpointStore, checkpoint_schedule
from polca.config import TrainConfig
from polca.models.decoder import Decoder, DecoderConfig
from polca.tasks.addition import Addition
from polca.train import learning_rate_factor, train

CFG = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2)
SCHEDULE = [0, 2, 4, 6]


def fresh_model():
    torch.manual_seed(0)
    task = Addition(digits=2, n_probe=10)
    return Decoder(DecoderConfig(task.vocab_size, task.sequence_length, 1, 8, 2)), task


class Interrupted(Exception):
    pass


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("step_*.safetensors"))}


def test_uninterrupted_runs_are_identical(tmp_path):
    for name in ("a", "b"):
        model, task = fresh_model()
        train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / name), progress=False)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert CheckpointStore(tmp_path / "a").steps == SCHEDULE


def test_resume_after_a_kill_mid_interval_gives_the_same_checkpoints(tmp_path):
    model, task = fresh_model()
    train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "ref"), progress=False)

    model, task = fresh_model()
    real_batch = task.train_batch

    def dying_batch(step, n):
        if step == 5:
            raise Interrupted
        return real_batch(step, n)

    task.train_batch = dying_batch
    with pytest.raises(Interrupted):
        train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "run"), progress=False)
    assert CheckpointStore(tmp_path / "run").steps == [0, 2, 4]

    model, task = fresh_model()  # a new process: fresh model, state comes from disk
    train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "run"), progress=False)
    assert files(tmp_path / "run") == files(tmp_path / "ref")


def test_resume_after_a_kill_while_saving_a_checkpoint(tmp_path, monkeypatch):
    model, task = fresh_model()
    train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "ref"), progress=False)

    real_save = CheckpointStore.save

    def dying_save(self, step, *args, **kwargs):
        if step == 4:
            raise Interrupted
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", dying_save)
    model, task = fresh_model()
    with pytest.raises(Interrupted):
        train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "run"), progress=False)
    monkeypatch.setattr(CheckpointStore, "save", real_save)
    assert CheckpointStore(tmp_path / "run").steps == [0, 2]

    model, task = fresh_model()
    train(model, task, CFG, SCHEDULE, CheckpointStore(tmp_path / "run"), progress=False)
    assert files(tmp_path / "run") == files(tmp_path / "ref")


WINDOW = [3, 5, 6]  # checkpoint_schedule(6, every=2, start=3): no step 0


@pytest.mark.parametrize("kill_at", [2, 4])  # before the window's first checkpoint, and inside
def test_a_window_resumes_to_the_checkpoints_of_a_full_run(tmp_path, kill_at):
    model, task = fresh_model()
    train(model, task, CFG, [0, 1, 2, 3, 4, 5, 6], CheckpointStore(tmp_path / "full"),
          progress=False)
    model, task = fresh_model()
    real_batch = task.train_batch

    def dying_batch(step, n):
        if step == kill_at:
            raise Interrupted
        return real_batch(step, n)

    task.train_batch = dying_batch
    with pytest.raises(Interrupted):
        train(model, task, CFG, WINDOW, CheckpointStore(tmp_path / "window"), progress=False)
    assert CheckpointStore(tmp_path / "window").steps == [s for s in WINDOW if s <= kill_at]

    model, task = fresh_model()
    train(model, task, CFG, WINDOW, CheckpointStore(tmp_path / "window"), progress=False)
    assert CheckpointStore(tmp_path / "window").steps == WINDOW
    full, window = files(tmp_path / "full"), files(tmp_path / "window")
    assert window == {name: full[name] for name in window}


def test_training_lowers_the_loss(tmp_path):
    model, task = fresh_model()
    cfg = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5)
    store = CheckpointStore(tmp_path)
    train(model, task, cfg, [0, 50, 60], store, progress=False)
    first, _, last = (e["train_loss"] for e in store.entries)  # last: mean of steps 51..60
    assert last < 0.8 * first


def test_schedules():
    assert checkpoint_schedule(10, every=4) == [0, 4, 8, 10]
    assert checkpoint_schedule(10, steps=[3, 7]) == [0, 3, 7, 10]
    log = checkpoint_schedule(10_000, log_spaced=20)
    assert log[0] == 0 and log[-1] == 10_000 and log == sorted(set(log))
    gaps = [b - a for a, b in itertools.pairwise(log[1:])]
    assert gaps[-1] > 10 * gaps[0]  # log spacing: late gaps much wider than early ones
    with pytest.raises(ValueError, match="outside"):
        checkpoint_schedule(10, steps=[11])


def test_window_schedules_start_at_start_without_step_zero():
    assert checkpoint_schedule(10, every=4, start=3) == [3, 7, 10]
    assert checkpoint_schedule(10, steps=[5, 8], start=4) == [4, 5, 8, 10]
    log = checkpoint_schedule(10_000, log_spaced=5, start=1000)
    assert log[0] == 1000 and log[-1] == 10_000 and len(log) == 5
    assert checkpoint_schedule(100, start=50) == list(range(50, 101))  # default: ~50 intervals
    with pytest.raises(ValueError, match="outside 4..10"):
        checkpoint_schedule(10, steps=[2, 8], start=4)
    with pytest.raises(ValueError, match="start 10"):
        checkpoint_schedule(10, every=2, start=10)


def test_warmup_then_constant_or_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert [learning_rate_factor(s, cfg) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    cosine = TrainConfig(steps=110, warmup_steps=10, schedule="cosine")
    assert learning_rate_factor(10, cosine) == pytest.approx(1.0)
    assert learning_rate_factor(60, cosine) == pytest.approx(0.5)
    assert learning_rate_factor(110, cosine) == pytest.approx(0.0)
