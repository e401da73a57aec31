"""Open a run directory as the objects every stage needs (model, seam, checkpoints, probe).

A run is either trained by polca (the built-in decoder, checkpoints in the run directory) or
brought in (task kind "external", :mod:`polca.tasks.external`): then the model, the seam and
the checkpoint series come from the task, and every analysis stage runs unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
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
    """A run opened for analysis. Tensors for derivatives are float64 unless ``dtype`` says.

    ``make_loss`` wraps ``model`` as the seam (an external run's own, e.g. a Hugging Face
    model's); ``source`` is an external run's checkpoint series (default: the run's store).
    """

    run: RunDir
    cfg: RunConfig
    task: Task
    model: nn.Module
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    make_loss: Callable[[nn.Module], ModuleTokenLoss] = ModuleTokenLoss
    source: CheckpointStore | None = None

    @cached_property
    def checkpoints(self) -> CheckpointStore:
        if self.source is not None:
            return self.source
        store = CheckpointStore(self.run.checkpoints)
        if not len(store) or store.steps[-1] < self.cfg.train.steps:
            # an analysis of a half-trained run would be silently different from the real one
            raise StoreError(
                f"training of {self.run.root} is incomplete (checkpoints up to step "
                f"{store.steps[-1] if len(store) else 'none'} of {self.cfg.train.steps}): "
                "run `polca train` first")
        return store

    @cached_property
    def loss(self) -> ModuleTokenLoss:
        self.model.to(device=self.device, dtype=self.dtype)
        return self._seam(self.model)

    def loss_in(self, dtype: torch.dtype) -> ModuleTokenLoss:
        """The seam in ``dtype`` (on a copy of the model unless it is the context's own)."""
        if dtype == self.dtype:
            return self.loss
        return self._seam(copy.deepcopy(self.model).to(device=self.device, dtype=dtype))

    def _seam(self, model: nn.Module) -> ModuleTokenLoss:
        loss = self.make_loss(model)
        if loss.fixed:  # parameters outside θ stay at the first checkpoint's values
            loss.set_fixed(self.checkpoints.load(self.checkpoints.steps[0]))
        return loss

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


def open_run(root, cfg: RunConfig | None = None, dtype=torch.float64, device=None,
             task: Task | None = None) -> RunContext:
    """Open ``root``; with ``cfg`` the run is created (config written) if it is new, and a
    differing config in an existing run is an error (results would mix two settings).
    Analysis runs on ``device`` (default: the training device of the config).

    ``task`` replaces the one the config describes (``polca.Run.from_module`` passes one
    holding Python objects). A new external run is checked in full (every checkpoint read, the
    probe scored) before its config and probe set are written, so a bad run leaves nothing.
    """
    run = RunDir(root)
    new = cfg is not None and not run.config_path.is_file()
    if cfg is None:
        cfg = load_config(run.config_path)
    elif not new:
        check_config(run, cfg)
    task = task if task is not None else make_task(cfg, run.root)
    device = torch.device(device or cfg.train.device)
    if cfg.task.kind == "external":
        ctx = RunContext(run, cfg, task, task.model(), dtype=dtype, device=device,
                         make_loss=task.token_loss, source=task.series)
        if new or not run.has_probe():
            task.check(ctx.loss)
            run.write_probe(*task.probe_set())
            if new:  # written last: a run directory with a config is a complete one
                atomic_write_bytes(run.config_path, dump_config(cfg).encode())
        return ctx
    if new:
        atomic_write_bytes(run.config_path, dump_config(cfg).encode())
    return RunContext(run, cfg, task, build_model(cfg, task), dtype=dtype, device=device)


def check_config(run: RunDir, cfg: RunConfig) -> None:
    """Stop unless the config stored in ``run`` equals ``cfg``."""
    if load_config(run.config_path) != cfg:
        raise StoreError(
            f"{run.config_path} holds a different config than the one given; results would "
            "mix two settings. Use a new run name, or delete the run directory to start over."
        )
