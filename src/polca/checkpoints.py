"""Checkpoint store: safetensors files and a manifest of (step, file, sha256, train loss).

A checkpoint is written to a temporary file, renamed into place, and only then entered in the
manifest (itself replaced atomically), so the manifest never names a half-written file. Every
load checks the file's sha256 against the manifest.

Example:
    >>> store = CheckpointStore("/tmp/polca-doc-ckpts")
    >>> store.save(0, {"w": torch.zeros(2)}, train_loss=1.0)
    >>> store.steps, store.load(0)["w"].shape
    ([0], torch.Size([2]))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from polca.atomic import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or does not match its manifest."""


def checkpoint_schedule(
    total_steps: int,
    every: int | None = None,
    steps: Iterable[int] | None = None,
    log_spaced: int | None = None,
    start: int = 0,
) -> list[int]:
    """Sorted training steps at which to checkpoint, from ``start`` to ``total_steps`` (both
    always included).

    ``start`` > 0 analyses a window of training: the steps before it are trained but not
    stored, so the first interval is ``start → start + every``, not ``0 → start``.

    >>> checkpoint_schedule(100, every=40)
    [0, 40, 80, 100]
    >>> checkpoint_schedule(1000, log_spaced=5)
    [0, 1, 6, 32, 178, 1000]
    >>> checkpoint_schedule(100, every=20, start=50)
    [50, 70, 90, 100]
    """
    if not 0 <= start < total_steps:
        raise ValueError(f"checkpoint start {start} must lie in 0..{total_steps - 1} "
                         "(the training steps)")
    if steps is not None:
        chosen = {int(s) for s in steps}
        bad = [s for s in chosen if not start <= s <= total_steps]
        if bad:
            raise ValueError(f"checkpoint steps {sorted(bad)} lie outside {start}..{total_steps}")
    elif log_spaced is not None:
        chosen = {int(s) for s in np.rint(np.geomspace(max(start, 1), total_steps, log_spaced))}
    else:
        chosen = set(range(start, total_steps + 1, every or max(1, (total_steps - start) // 50)))
    return sorted(chosen | {start, total_steps})


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """Ordered series of parameter checkpoints in one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries = self._read_manifest()

    def _read_manifest(self) -> list[dict]:
        path = self.folder / MANIFEST
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text())["checkpoints"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path} is not a valid checkpoint manifest ({err}); restore it or retrain "
                "into a new run"
            ) from None
        return sorted(entries, key=lambda e: e["step"])

    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self._entries]

    @property
    def entries(self) -> list[dict]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, step: int) -> bool:
        return step in self.steps

    def save(self, step: int, state: Mapping[str, torch.Tensor], train_loss: float | None = None,
             metadata: Mapping[str, str] | None = None) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        data = save_safetensors(tensors, metadata=dict(metadata or {}, step=str(step)))
        name = f"step_{step:06d}.safetensors"
        atomic_write_bytes(self.folder / name, data)
        entries = [e for e in self._entries if e["step"] != step]
        entries.append({"step": int(step), "file": name, "sha256": sha256_of(data),
                        "train_loss": None if train_loss is None else float(train_loss)})
        self._entries = sorted(entries, key=lambda e: e["step"])
        atomic_write_json(self.folder / MANIFEST, {"format": 1, "checkpoints": self._entries})

    def entry(self, step: int) -> dict:
        for e in self._entries:
            if e["step"] == step:
                return e
        raise CheckpointError(
            f"no checkpoint for step {step} in {self.folder / MANIFEST} (has {self.steps[:10]}…)"
        )

    def load(self, step: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """State dict of the checkpoint at ``step``, its sha256 checked against the manifest."""
        entry = self.entry(step)
        path = self.folder / entry["file"]
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file {path} (step {step}) is missing; restore it, or delete the "
                f"run's checkpoints and run `polca train` again"
            )
        data = path.read_bytes()
        if verify and sha256_of(data) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} does not match the sha256 in {self.folder / MANIFEST} "
                "(truncated or modified); restore the original file, or delete it and its "
                "manifest entry and run `polca train` to recreate it"
            )
        try:
            state = load_safetensors(data)
        except SafetensorError as err:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: "
                                  f"{err}") from None
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"checkpoint {path} holds NaN or inf in {bad[:5]}; training "
                                  "diverged before this step — lower the learning rate")
        return state
