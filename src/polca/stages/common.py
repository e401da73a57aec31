"""Open a run directory as the objects every stage needs (model, seam, checkpoints, probe)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
import torch
from torch import nn

from polca.checkpoints import CheckpointStore
from polca.config import RunConfig, dump_config, load_config
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig
from polca.store import RunDir, StoreError, atomic_write_bytes
from polca.tasks import Task, make_task


def build_model(cfg: RunConfig, task: Task) -> Decoder:
    """The built-in decoder for ``task``, initialised from the run seed."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return Decoder(DecoderConfig(
        vocab_size=task.vocab_size, context_length=m.context_length or task.sequence_length,
        n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, d_mlp=m.d_mlp,
        tied_head=m.tied_head, attention=m.attention,
    ))


@dataclass
class RunContext:
    """A run opened for analysis. Tensors for derivatives are float64 unless ``dtype`` says."""

    run: RunDir
    cfg: RunConfig
    task: Task
    model: nn.Module
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @cached_property
    def checkpoints(self) -> CheckpointStore:
        store = CheckpointStore(self.run.checkpoints)
        if not len(store):
            raise StoreError(f"no checkpoints in {self.run.checkpoints}: run `polca train` first")
        return store

    @cached_property
    def loss(self) -> ModuleTokenLoss:
        self.model.to(device=self.device, dtype=self.dtype)
        return ModuleTokenLoss(self.model)

    @cached_property
    def _probe(self) -> tuple[ProbeBatch, pd.DataFrame]:
        batch, tokens = self.run.read_probe()
        return batch.to(self.device), tokens

    @property
    def probe(self) -> ProbeBatch:
        return self._probe[0]

    @property
    def tokens(self) -> pd.DataFrame:
        return self._probe[1]

    def theta(self, step: int) -> torch.Tensor:
        """``[d]`` parameters of the checkpoint at ``step`` in this context's dtype."""
        state = self.checkpoints.load(step)
        return self.loss.space.flatten(state).to(device=self.device, dtype=self.dtype)

    def thetas(self) -> Iterator[tuple[int, torch.Tensor]]:
        for step in self.checkpoints.steps:
            yield step, self.theta(step)

    def basis_sample(self, n: int) -> ProbeBatch:
        return self.task.basis_sample(n).to(self.device)


def open_run(root, cfg: RunConfig | None = None, dtype=torch.float64, device=None) -> RunContext:
    """Open ``root``; with ``cfg`` the run is created (config written) if it is new, and a
    differing config in an existing run is an error (results would mix two settings).
    Analysis runs on ``device`` (default: the training device of the config)."""
    run = RunDir(root)
    if cfg is None:
        cfg = load_config(run.config_path)
    else:
        write_config(run, cfg)
    task = make_task(cfg, run.root)
    return RunContext(run, cfg, task, build_model(cfg, task), dtype=dtype,
                      device=torch.device(device or cfg.train.device))


def write_config(run: RunDir, cfg: RunConfig) -> None:
    text = dump_config(cfg)
    if run.config_path.is_file():
        existing = load_config(run.config_path)
        if existing != cfg:
            raise StoreError(
                f"{run.config_path} holds a different config than the one given; results would "
                "mix two settings. Use a new run name, or delete the run directory to start over."
            )
        return
    atomic_write_bytes(run.config_path, text.encode())
