"""Stage `trajectories`: exact token losses ``loss[token, checkpoint]`` (and correctness)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from polca.stages.common import RunContext
from polca.store import StoreError


@torch.no_grad()
def losses_and_correct(ctx: RunContext, theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token loss and whether the argmax prediction is right, ``[tokens]`` each."""
    losses, correct = [], []
    for chunk in ctx.probe.split(ctx.cfg.trajectories.batch_size):
        logits = ctx.loss.logits(theta, chunk.input_ids)
        losses.append(ctx.loss.loss_fn(logits, chunk))
        correct.append(logits[chunk.scored].argmax(-1) == chunk.targets[chunk.scored])
    return torch.cat(losses).cpu().numpy(), torch.cat(correct).cpu().numpy()


def run_trajectories(ctx: RunContext, progress: bool = True) -> None:
    steps = ctx.checkpoints.steps
    n_tokens = ctx.probe.n_tokens
    arrays = ctx.run.arrays()
    attrs = {"steps": steps}
    for name, dtype in (("loss", "float64"), ("correct", "bool")):
        arrays.require(name, (n_tokens, len(steps)), (n_tokens, 1), ("token", "checkpoint"),
                       dtype=dtype, attrs=attrs)
    todo = [i for i in range(len(steps)) if not arrays.is_done("correct", i)]
    for i in tqdm(todo, desc="token losses", disable=not progress, unit="ckpt"):
        loss, correct = losses_and_correct(ctx, ctx.theta(steps[i]))
        if not np.isfinite(loss).all():
            raise StoreError(f"non-finite token losses at step {steps[i]} "
                             f"({int((~np.isfinite(loss)).sum())} tokens); the checkpoint diverged")
        arrays.write_block("loss", (slice(None), i), loss, key=i)
        arrays.write_block("correct", (slice(None), i), correct, key=i)
