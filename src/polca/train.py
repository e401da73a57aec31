"""Training loop with a checkpoint schedule, deterministic on CPU and exactly resumable.

Each step's batch depends only on ``(task seed, step)``, the model's initialisation only on the
run seed, and the optimiser state is saved beside every checkpoint, so a run killed at any point
resumes from its last complete checkpoint and writes the same checkpoints an uninterrupted run
would have written.

Example:
    >>> from polca.tasks.addition import Addition
    >>> from polca.models.decoder import Decoder, DecoderConfig
    >>> task = Addition(n_probe=8)
    >>> model = Decoder(DecoderConfig(task.vocab_size, task.sequence_length, 1, 16, 2))
    >>> store = CheckpointStore("/tmp/polca-doc-train")
    >>> train(model, task, TrainConfig(steps=4, batch_size=8), [0, 2, 4], store, progress=False)
    >>> store.steps
    [0, 2, 4]
"""

from __future__ import annotations

import io
import math

import torch
from torch import nn

from polca import progress as P
from polca.checkpoints import CheckpointStore
from polca.config import TrainConfig
from polca.functional import ProbeBatch, next_token_losses
from polca.store import atomic_write_bytes
from polca.tasks.base import Task

RESUME_PATTERN = "resume_step_{:06d}.pt"


def learning_rate_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # decay matrices only (nanoGPT): biases, norms and embeddings-as-vectors stay undecayed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def batch_loss(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    return next_token_losses(model(batch.input_ids), batch).mean()


def train(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    schedule: list[int],
    store: CheckpointStore,
    progress: bool = True,
) -> None:
    """Train ``model`` on ``task`` for ``cfg.steps`` steps, saving a checkpoint at each step of
    ``schedule`` (resuming from ``store`` when it already holds some)."""
    device = torch.device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, cfg))
    start = _resume(model, optimizer, scheduler, store, schedule)
    pending = [s for s in schedule if s >= start and s not in store]
    running, count = 0.0, 0
    # counted in checkpoints: what is on disk, and what a resumed run starts from
    bar = P.bar(progress, len(schedule), len(schedule) - len(pending), "train", "checkpoint")
    if start == 0 and 0 in pending:
        with torch.no_grad():
            first = batch_loss(model, task.train_batch(0, cfg.batch_size).to(device)).item()
        _save(store, 0, model, optimizer, scheduler, first)
        bar.update()
    for step in range(start, cfg.steps):
        batch = task.train_batch(step, cfg.batch_size).to(device)
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        running, count = running + loss.item(), count + 1
        if step + 1 in schedule:
            _save(store, step + 1, model, optimizer, scheduler, running / count)
            bar.update()
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
    bar.close()


def _save(store, step, model, optimizer, scheduler, train_loss) -> None:
    # Order matters for resumability: the optimiser state of `step` is on disk before the
    # checkpoint enters the manifest, and older optimiser states are removed only after it has.
    buffer = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    atomic_write_bytes(store.folder / RESUME_PATTERN.format(step), buffer.getvalue())
    store.save(step, model.state_dict(), train_loss=train_loss)
    for old in store.folder.glob("resume_step_*.pt"):
        if old.name != RESUME_PATTERN.format(step):
            old.unlink()


def _resume(model, optimizer, scheduler, store: CheckpointStore, schedule: list[int]) -> int:
    """Restore the last complete checkpoint; returns the step to continue from."""
    if not len(store):
        return 0
    last = store.steps[-1]
    model.load_state_dict(store.load(last))
    if last == schedule[-1]:
        return last
    resume_path = store.folder / RESUME_PATTERN.format(last)
    if not resume_path.is_file():
        raise RuntimeError(
            f"{store.folder} has checkpoints up to step {last} but not {resume_path.name}, "
            "so training cannot resume exactly. Delete the checkpoints folder to retrain."
        )
    # saved from any device; load_state_dict moves the state to the parameters' device
    state = torch.load(resume_path, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return last
