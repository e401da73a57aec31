"""Tasks: data with ground-truth skill labels. ``make_task`` builds one from a run config."""

from __future__ import annotations

import importlib

from polca.config import RunConfig
from polca.tasks.base import Task, TrainingTask

# kind -> "module:Class"; each class has ``from_config(cfg: RunConfig, root) -> Task``
# (``root`` is the run directory, for tasks that keep files such as a tokenizer there).
REGISTRY = {
    "addition": "polca.tasks.addition:Addition",
    "moving_window_sum": "polca.tasks.plateau:MovingWindowSum",
    "prefix_sum": "polca.tasks.plateau:PrefixSum",
    "reversed_addition": "polca.tasks.plateau:ReversedAddition",
    "text": "polca.tasks.text:TextTask",
    "jsonl": "polca.tasks.files:FileTask",
    "probe-file": "polca.tasks.probe_file:ProbeFileTask",
}


def make_task(cfg: RunConfig, root=None, hints: dict | None = None) -> Task:
    """The task of ``cfg.task``; ``hints`` are a run source's defaults (probe-file tasks)."""
    module_name, class_name = REGISTRY[cfg.task.kind].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RuntimeError(f"task kind {cfg.task.kind!r} needs {module_name}: {err}") from None
    extra = {"hints": hints} if hints is not None else {}
    return getattr(module, class_name).from_config(cfg, root, **extra)


__all__ = ["REGISTRY", "Task", "TrainingTask", "make_task"]
