"""Stage `measures`: progress measures per checkpoint, stored as trajectories.

Storage (:meth:`polca.store.RunDir.require_measures`): one array ``measures``
``[checkpoint, measure]`` (float64), with the column names (e.g. ``loss``,
``accuracy_out00``, ``repetition``, ``cosine``, ``attention_progress``,
``weight_norm/<tensor>``), the steps and ``reference`` (repetition and entropy of the true
outputs). One row is written per checkpoint and marked done, so a killed stage resumes at the
first missing checkpoint; :meth:`polca.store.RunDir.read_measures` returns the table. The
report draws them.

It runs for runs polca trained (the built-in decoder): the measures of greedy outputs
(accuracy, repetition, entropy, cosine) need probe rows that share their scored positions
(the plateau tasks, addition, text windows); a probe that does not (a jsonl task) gets the loss
and weight norms only, and the attention progress measure needs a task with
``attention_targets()``. Its cost is one greedy generation of the probe outputs per checkpoint.

Example:
    >>> ctx = open_run("runs/plateau-mws")                          # doctest: +SKIP
    >>> run_measures(ctx)[["loss", "repetition"]].head()            # doctest: +SKIP
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from polca import progress as P
from polca.config import ConfigError
from polca.measures import checkpoint_measures, reference_measures, task_measure_inputs
from polca.stages.common import RunContext
from polca.store import MEASURES, StoreError


def run_measures(ctx: RunContext, progress: bool = True, layer: int = -1,
                 batch_size: int | None = None) -> pd.DataFrame:
    """Compute the measures of every checkpoint not yet done (float32, on ``ctx.device``)
    and return them (:meth:`polca.store.RunDir.read_measures`).

    ``layer`` is the block whose attention the attention progress measure reads;
    ``batch_size`` (probe sequences per forward pass) defaults to ``trajectories.batch_size``.
    """
    if not ctx.cfg.trains:
        raise ConfigError(f"{ctx.run.root} analyses outside checkpoints: progress measures "
                          "need the built-in decoder (greedy generation, hidden states, "
                          "attention)")
    run = ctx.run
    steps = ctx.checkpoints.steps
    arrays = run.arrays()
    run.refresh("measures", ctx.inputs("source", "checkpoints", "probe", layer=layer),
                discard=lambda: arrays.discard(MEASURES), exists=MEASURES in arrays)
    todo = [i for i in range(len(steps)) if not arrays.is_done(MEASURES, i)]
    with P.bar(progress, len(steps), len(steps) - len(todo), "measures", "checkpoint") as bar:
        if todo:
            _compute(ctx, steps, todo, bar, layer, batch_size)
    return run.read_measures()


def _compute(ctx, steps, todo, bar, layer, batch_size) -> None:
    model = copy.deepcopy(ctx.model).to(device=ctx.device, dtype=torch.float32)
    probe = ctx.probe
    targets, early = task_measure_inputs(ctx.task)
    batch_size = batch_size or ctx.cfg.trajectories.batch_size
    arrays = ctx.run.arrays()
    names = None
    for i in todo:
        model.load_state_dict(ctx.checkpoints.load(steps[i]))
        row = checkpoint_measures(model, probe, targets, early, layer, batch_size)
        if names is None:
            names = list(row)
            ctx.run.require_measures(len(steps), names, steps, reference_measures(probe))
        if list(row) != names:
            raise StoreError(f"measures at step {steps[i]} are {list(row)}, not {names}")
        values = np.array([row[n] for n in names], dtype=np.float64)
        arrays.write_block(MEASURES, (i, slice(None)), values, key=i)
        bar.update()
