"""Stage `trajectories`: exact token losses ``loss[token, checkpoint]`` (and correctness).

One block per checkpoint, computed by :func:`checkpoint_losses` (a pure function that loads
its own checkpoint) through the run's executor and written as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from polca import progress as P
from polca.functional import ProbeBatch, TokenLoss
from polca.precision import arithmetic, model_dtype
from polca.store import CORRECT, LOSS, StoreError


@dataclass(frozen=True)
class CheckpointBlock:
    """One checkpoint's work: its position in the run and its step."""

    index: int
    step: int


@torch.no_grad()
def checkpoint_losses(reader: Callable[[int], torch.Tensor], loss: TokenLoss, probe: ProbeBatch,
                      batch_size: int, arithmetic_name: str,
                      block: CheckpointBlock) -> tuple[np.ndarray, np.ndarray]:
    """``[tokens]`` loss (float64) and whether the argmax prediction is the target, at one
    checkpoint (``reader(index)``: its float64 ``[d]`` parameters), the model in
    ``arithmetic_name`` (:mod:`polca.precision`)."""
    theta = reader(block.index).to(model_dtype(arithmetic_name))
    losses, correct = [], []
    with arithmetic(arithmetic_name):
        for chunk in probe.split(batch_size):
            values, predicted = loss.losses_and_predictions(theta, chunk)
            losses.append(values)
            correct.append(predicted == chunk.targets[chunk.scored])
    return (torch.cat(losses).to(torch.float64).cpu().numpy(),
            torch.cat(correct).cpu().numpy())


def run_trajectories(ctx, progress: bool = True) -> None:
    steps = ctx.checkpoints.steps
    n_tokens = ctx.probe.n_tokens
    run = ctx.run
    arrays = run.arrays()
    run.refresh("trajectories", ctx.inputs("source", "checkpoints", "probe", "dtype"),
                discard=lambda: [arrays.discard(name) for name in (LOSS, CORRECT)],
                exists=LOSS in arrays)
    for name, dtype in ((LOSS, "float64"), (CORRECT, "bool")):
        arrays.require(name, (n_tokens, len(steps)), (n_tokens, 1), ("token", "checkpoint"),
                       dtype=dtype, attrs={"steps": steps})
    todo = [i for i in range(len(steps))
            if not (arrays.is_done(LOSS, i) and arrays.is_done(CORRECT, i))]
    blocks = [CheckpointBlock(i, steps[i]) for i in todo]
    compute = partial(checkpoint_losses, ctx.reader(), ctx.loss, ctx.probe,
                      ctx.cfg.trajectories.batch_size, ctx.arithmetic())
    bar = P.bar(progress, len(steps), len(steps) - len(todo), "token losses", "checkpoint")
    for block, (loss, correct) in ctx.executor.map(compute, blocks):
        if not np.isfinite(loss).all():
            raise StoreError(f"non-finite token losses at step {block.step} "
                             f"({int((~np.isfinite(loss)).sum())} tokens); the checkpoint diverged")
        arrays.write_block(LOSS, (slice(None), block.index), loss, key=block.index)
        arrays.write_block(CORRECT, (slice(None), block.index), correct, key=block.index)
        bar.update()
    bar.close()
