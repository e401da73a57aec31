"""Stage `measures`: progress measures per checkpoint, stored as trajectories.

Storage: one array ``measures`` ``[checkpoint, measure]`` in ``arrays.zarr`` (float64), with
attrs ``steps``, ``measures`` (the column names, e.g. ``loss``, ``accuracy_out00``,
``repetition``, ``cosine``, ``attention_progress``, ``weight_norm/<tensor>``) and
``reference`` (repetition and entropy of the true outputs). One row is written per checkpoint
and marked done, so a killed stage resumes at the first missing checkpoint.
:func:`read_measures` returns it as a table indexed by step.

It runs for any task: the measures of greedy outputs (accuracy, repetition, entropy, cosine)
need probe rows that share their scored positions (the plateau tasks, addition, text windows);
a probe that does not (a jsonl task) gets the loss and weight norms only, and the attention
progress measure needs a task with ``attention_targets()``. Its cost is one greedy generation
of the probe outputs per checkpoint.

Example:
    >>> ctx = open_run("runs/plateau-mws")                          # doctest: +SKIP
    >>> run_measures(ctx)                                           # doctest: +SKIP
    >>> read_measures(ctx.run)[["loss", "repetition"]].head()       # doctest: +SKIP
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from polca.config import ConfigError
from polca.measures import checkpoint_measures, reference_measures, task_measure_inputs
from polca.stages.common import RunContext
from polca.store import RunDir, StoreError

ARRAY = "measures"


def run_measures(ctx: RunContext, progress: bool = True, layer: int = -1,
                 batch_size: int | None = None, figure: bool = True) -> pd.DataFrame:
    """Compute the measures of every checkpoint not yet done (float32, on ``ctx.device``),
    save ``report/measures.png`` (with ``figure``) and return :func:`read_measures`.

    ``layer`` is the block whose attention the attention progress measure reads;
    ``batch_size`` (probe sequences per forward pass) defaults to ``trajectories.batch_size``.
    """
    if ctx.cfg.task.kind == "external":
        raise ConfigError(f"{ctx.run.root} is an external run: progress measures need the "
                          "built-in decoder (greedy generation, hidden states, attention)")
    steps = ctx.checkpoints.steps
    arrays = ctx.run.arrays()
    todo = [i for i in range(len(steps)) if not arrays.is_done(ARRAY, i)]
    if todo:
        _compute(ctx, arrays, steps, todo, progress, layer, batch_size)
    if figure:
        write_measures_figures(ctx.run)
    return read_measures(ctx.run)


def _compute(ctx, arrays, steps, todo, progress, layer, batch_size) -> None:
    model = copy.deepcopy(ctx.model).to(device=ctx.device, dtype=torch.float32)
    probe = ctx.probe
    targets, early = task_measure_inputs(ctx.task)
    batch_size = batch_size or ctx.cfg.trajectories.batch_size
    names = None
    for i in tqdm(todo, desc="measures", disable=not progress, unit="ckpt"):
        model.load_state_dict(ctx.checkpoints.load(steps[i]))
        row = checkpoint_measures(model, probe, targets, early, layer, batch_size)
        if names is None:
            names = list(row)
            _require(arrays, len(steps), names, steps, reference_measures(probe))
        if list(row) != names:
            raise StoreError(f"measures at step {steps[i]} are {list(row)}, not {names}")
        values = np.array([row[n] for n in names], dtype=np.float64)
        arrays.write_block(ARRAY, (i, slice(None)), values, key=i)


def _require(arrays, n_checkpoints: int, names: list[str], steps: list[int], reference: dict):
    if ARRAY in arrays and arrays.attrs(ARRAY).get("measures") != names:
        raise StoreError(
            f"array {ARRAY!r} holds measures {arrays.attrs(ARRAY).get('measures')} but this run "
            f"computes {names}; delete {arrays.root / ARRAY} and {arrays.progress / ARRAY} to "
            "recompute")
    arrays.require(ARRAY, (n_checkpoints, len(names)), (1, len(names)),
                   ("checkpoint", "measure"),
                   attrs={"steps": steps, "measures": names, "reference": reference})


def read_measures(run: RunDir) -> pd.DataFrame:
    """``[checkpoint × measure]`` table indexed by ``step``; ``.attrs["reference"]`` holds the
    true outputs' repetition and entropy. Rows of checkpoints not yet computed are NaN."""
    arrays = run.arrays()
    values = arrays.read(ARRAY)
    attrs = arrays.attrs(ARRAY)
    table = pd.DataFrame(values, columns=attrs["measures"],
                         index=pd.Index(attrs["steps"], name="step"))
    table.attrs["reference"] = attrs.get("reference", {})
    return table


def write_measures_figures(run: RunDir, breaks=None, folder: Path | None = None) -> list[Path]:
    """Save ``measures.png`` (the plateau figure) and, with ``breaks`` (steps of cluster break
    times, a list or ``{name: step}``), ``measures_breaks.png`` into ``report/`` (or
    ``folder``); returns the paths written."""
    from polca.report.plateau import measures_with_breaks, plateau_figure

    table = read_measures(run)
    folder = Path(folder) if folder is not None else run.report
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"measures.png": plateau_figure(table)}
    if breaks is not None:
        figures["measures_breaks.png"] = measures_with_breaks(table, breaks)
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=120)
        paths.append(folder / name)
    return paths
