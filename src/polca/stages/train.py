"""Stage `train`: the probe set and the checkpoint series of a run polca trains."""

from __future__ import annotations

from polca import progress as P
from polca.checkpoints import checkpoint_schedule
from polca.config import ConfigError
from polca.stages.common import RunContext
from polca.train import train


def run_train(ctx: RunContext, progress: bool = True) -> None:
    if not ctx.cfg.trains:
        raise ConfigError(f"{ctx.run.root} analyses checkpoints made outside polca (source.kind "
                          f"= {ctx.cfg.source.kind!r}); there is nothing to train: run the "
                          "analysis stages, e.g. `polca run`")
    if not ctx.run.has_probe():
        ctx.run.write_probe(*ctx.task.probe_set(), labels=ctx.task.label_columns)
    cfg = ctx.cfg
    schedule = checkpoint_schedule(cfg.train.steps, cfg.checkpoints.every, cfg.checkpoints.steps,
                                   cfg.checkpoints.log_spaced, start=cfg.checkpoints.start)
    store = ctx.run.checkpoint_store()
    if store.steps == schedule:
        P.bar(progress, len(schedule), len(schedule), "train", "checkpoint").close()
        return
    ctx.model.float()  # training runs in float32; analysis stages use ctx.dtype
    # on the run's device (compute.device, else train.device)
    settings = cfg.train.model_copy(update={"device": str(ctx.device)})
    train(ctx.model, ctx.task, settings, schedule, store, progress=progress)
