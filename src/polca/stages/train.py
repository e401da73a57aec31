"""Stage `train`: the probe set and the checkpoint series of a run."""

from __future__ import annotations

from polca.checkpoints import CheckpointStore, checkpoint_schedule
from polca.stages.common import RunContext
from polca.store import StoreError
from polca.train import train


def run_train(ctx: RunContext, progress: bool = True) -> None:
    if ctx.cfg.task.kind == "external":
        raise StoreError("this run analyses checkpoints brought in from outside polca; there is "
                         "nothing to train (run the analysis stages, e.g. `polca run`)")
    if not ctx.run.has_probe():
        ctx.run.write_probe(*ctx.task.probe_set())
    cfg = ctx.cfg
    schedule = checkpoint_schedule(cfg.train.steps, cfg.checkpoints.every, cfg.checkpoints.steps,
                                   cfg.checkpoints.log_spaced)
    store = CheckpointStore(ctx.run.checkpoints)
    if store.steps == schedule:
        return
    ctx.model.float()  # training runs in float32; analysis stages use ctx.dtype
    train(ctx.model, ctx.task, cfg.train, schedule, store, progress=progress)
