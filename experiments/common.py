"""Helpers shared by the experiment scripts: one thread, configs from overrides, probe scoring.

The scripts use polca's own training loop, task and model (so a regime measured here trains
exactly as `polca run` would train it) and write only under ``experiments/results/`` and
``docs/``.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import torch

from polca.config import RunConfig, parse_config
from polca.store import probe_batch

torch.set_num_threads(1)  # results depend on the thread count (docs/reproduction.md)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied section by section (nested dicts merge)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config(base: dict, overrides: dict, name: str, seed: int) -> RunConfig:
    return parse_config(merged(base, {**overrides, "name": name, "seed": seed}), source=name)


def probe_of(task):
    """``(batch, tokens)``: the task's probe set as one ProbeBatch and its token table."""
    sequences, tokens = task.probe_set()
    return probe_batch(sequences, tokens), tokens


@torch.no_grad()
def score(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """``([token] loss, [token] correct)`` of the scored tokens (greedy prediction)."""
    logits = model(batch.input_ids)[batch.scored]
    targets = batch.targets[batch.scored]
    loss = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    return loss.numpy(), (logits.argmax(-1) == targets).numpy()
