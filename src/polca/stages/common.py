"""Open a run directory as the objects every stage needs: source, task, seam, checkpoints, probe.

A run is a source (the model and its checkpoints, :mod:`polca.sources`) and a task (data and
labels, :mod:`polca.tasks`). :func:`open_run` builds both from the config, creates the run
directory when it is new, and keeps it consistent when it is reopened (see its docstring);
:class:`RunContext` hands the stages what they compute on and the fingerprints of it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
import torch
from torch import nn

from polca.config import (
    RUNTIME_KEYS,
    TRAINING_SECTIONS,
    ConfigError,
    RunConfig,
    config_changes,
    dump_config,
    load_config,
)
from polca.functional import ProbeBatch, TokenLoss
from polca.parallel import Executor, make_executor
from polca.precision import model_dtype, resolve_device
from polca.sources import open_source
from polca.stages import invalidated
from polca.store import RunDir, StoreError, batch_sha256, probe_sha256, sha256_json
from polca.tasks import Task
from polca.tasks.base import label_columns


@dataclass(frozen=True)
class CheckpointReader:
    """``reader(i)``: the float64 ``[d]`` parameters of checkpoint ``i`` of ``steps`` on
    ``device``, checked finite. Picklable, so a block task on another worker loads its own
    checkpoints (from the same paths) instead of receiving them from the driver."""

    series: object
    space: object
    steps: tuple[int, ...]
    device: torch.device

    def __call__(self, index: int) -> torch.Tensor:
        state = self.series.load(self.steps[index])
        theta = self.space.flatten(state).to(device=self.device, dtype=torch.float64)
        bad = int((~torch.isfinite(theta)).sum())
        if bad:
            raise StoreError(f"checkpoint at step {self.steps[index]} has {bad} non-finite "
                             "parameters (NaN or inf): the run diverged; drop that checkpoint "
                             "or retrain with a lower learning rate")
        return theta

    def stream(self, first: int, last: int) -> Iterator[torch.Tensor]:
        """Checkpoints ``first..last`` (inclusive), each loaded when it is asked for."""
        return (self(i) for i in range(first, last + 1))


@dataclass
class RunContext:
    """A run opened for analysis. Tensors for derivatives are float64 unless ``dtype`` says
    (the trajectories stage's arithmetic: ``compute.dtype``, else float64)."""

    run: RunDir
    cfg: RunConfig
    task: Task
    source: object
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _losses: dict = field(default_factory=dict, repr=False)

    @cached_property
    def executor(self) -> Executor:
        options = self.cfg.executor
        if options.kind == "in-process":
            return make_executor("in-process")
        return make_executor(options.kind, address=options.address,
                             gpus_per_task=1.0 if self.device.type == "cuda" else 0.0)

    def arithmetic(self, stage_default: str | None = None) -> str:
        """The model's arithmetic for a stage (:mod:`polca.precision`): ``compute.dtype`` when
        the config sets one, else the stage's own setting, else the context's ``dtype``."""
        return (self.cfg.compute.dtype or stage_default
                or str(self.dtype).removeprefix("torch."))

    def reader(self, dtype: torch.dtype | None = None) -> CheckpointReader:
        """A picklable :class:`CheckpointReader` of this run's checkpoints (flattened like the
        seam in ``dtype``, default the context's)."""
        return CheckpointReader(self.checkpoints, self.loss_in(dtype or self.dtype).space,
                                tuple(self.checkpoints.steps), self.device)

    @cached_property
    def model(self) -> nn.Module:
        """The source's module (the built-in decoder: initialised from the seed, trained in
        place by the train stage; the analysis takes every θ from a checkpoint)."""
        return self.source.build_model()

    @cached_property
    def checkpoints(self):
        """The checkpoint series (``steps``, ``load(step)``)."""
        if self.source.series is not None:
            return self.source.series
        store = self.run.checkpoint_store()
        if not len(store) or store.steps[-1] < self.cfg.train.steps:
            # an analysis of a half-trained run would be silently different from the real one
            raise StoreError(
                f"training of {self.run.root} is incomplete (checkpoints up to step "
                f"{store.steps[-1] if len(store) else 'none'} of {self.cfg.train.steps}): "
                "run `polca train` first")
        return store

    def loss_in(self, dtype: torch.dtype) -> TokenLoss:
        """The seam on a copy of the model in ``dtype`` on the context's device."""
        if dtype not in self._losses:
            module = copy.deepcopy(self.model).to(device=self.device, dtype=dtype)
            self._losses[dtype] = self.source.token_loss(
                module, lambda: self.checkpoints.load(self.checkpoints.steps[0]))
        return self._losses[dtype]

    @property
    def loss(self) -> TokenLoss:
        return self.loss_in(self.dtype)

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

    # -- fingerprints of what the stages compute on --------------------------------------------
    @cached_property
    def checkpoints_sha256(self) -> str:
        """Content hash of the checkpoint series: the manifest's hashes of polca's own
        checkpoints, the series' own weight fingerprints where it has them (a Hugging Face
        series: free in a hub cache), else the files' contents (hashed once, see
        :meth:`RunDir.files_sha256`)."""
        if self.source.series is None:
            return sha256_json([[e["step"], e["sha256"]] for e in self.checkpoints.entries])
        fingerprints = getattr(self.source.series, "fingerprints", None)
        if fingerprints is not None:
            return sha256_json([self.checkpoints.steps, list(fingerprints)])
        return sha256_json([self.checkpoints.steps,
                            self.run.files_sha256(self.source.checkpoint_files())])

    def inputs(self, *names: str, **values) -> dict:
        """Fingerprints of the named inputs (``source``, ``checkpoints``, ``probe``,
        ``dtype``), plus ``values`` as given (config values, versions of other products)."""
        known = {
            "source": lambda: self.source.identity(),
            "checkpoints": lambda: self.checkpoints_sha256,
            "probe": self.run.probe_sha256,
            "dtype": self.arithmetic,
        }
        return {**{name: known[name]() for name in names}, **values}

    def sample_sha256(self, sample: ProbeBatch) -> str:
        return batch_sha256(sample)


def open_run(root, cfg: RunConfig | None = None, dtype=None, device=None,
             task: Task | None = None, source=None) -> RunContext:
    """Open ``root``: with ``cfg`` the run is created if it is new (config written last).

    Reopened with a ``cfg`` that differs from the stored one: a run trained by polca keeps
    its training settings (sections :data:`polca.config.TRAINING_SECTIONS`; a change is an
    error, since its checkpoints would not match), any other change replaces the stored config
    and the stages that depend on it recompute (they compare their input fingerprints). A run
    of an outside series also rebuilds its probe set from the probe file, and replaces the
    stored one when it changed. A new outside run is checked in full (every checkpoint read,
    the probe scored) before anything is written, so a bad run leaves nothing.

    ``task`` and ``source`` replace those the config describes (``polca.Run.from_module``
    passes ones holding Python objects). Analysis runs on ``device`` (default: the config's
    ``compute.device``, else its training device) and the trajectories stage in ``dtype``
    (default: ``compute.dtype``, else float64).
    """
    run = RunDir(root)
    stored = load_config(run.config_path) if run.exists() else None
    if cfg is None:
        if stored is None:
            raise ConfigError(f"{run.root} is not a run directory (no config.toml); pass a "
                              "config to create it")
        cfg = stored
    source, task = open_source(cfg, run.root, source=source, task=task)
    try:
        device = resolve_device(device or cfg.compute.device or cfg.train.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    dtype = dtype or model_dtype(cfg.compute.dtype or "float64")
    ctx = RunContext(run, cfg, task, source, dtype=dtype, device=device)
    outside = not cfg.trains
    if stored is None and outside:
        sequences, tokens = task.probe_set()
        source.check(ctx.loss, ProbeBatch.from_tables(sequences, tokens))
    if cfg.evaluate.labels:  # a misnamed label stops before anything is computed or written
        from polca.stages.evaluate import binary_labels

        if outside or run.has_probe():
            tokens = task.probe_set()[1] if outside else run.read_tokens()
            binary_labels(tokens, label_columns(tokens, task.label_columns), cfg.evaluate)
    with run.lock():
        if stored is not None and stored != cfg:
            _accept_changed_config(run, stored, cfg)
        if outside:
            sequences, tokens = task.probe_set()
            if not run.has_probe() or run.probe_sha256() != probe_sha256(sequences, tokens):
                if run.has_probe():
                    run.say(f"probe: the probe set of {run.root} changed; the stages that read "
                            "it recompute")
                run.write_probe(sequences, tokens, labels=task.label_columns)
                dropped = getattr(task, "truncated_tokens", 0)
                if dropped:
                    run.say(f"probe: {dropped} scored tokens lay beyond the model's context and "
                            "were dropped (task.options.truncate); sequences.parquet counts "
                            "them per example (truncated_tokens)")
        if stored is None and getattr(source.series, "metadata", None) is not None:
            run.write_source(source.series.metadata)
        if hasattr(task, "run_files"):
            run.write_task_files(task.run_files())
        if stored is None or stored != cfg:  # written last: a run with a config is complete
            run.write_config(dump_config(cfg))
    return ctx


def _accept_changed_config(run: RunDir, stored: RunConfig, cfg: RunConfig) -> None:
    """Refuse a change of a trained run's training settings, naming every key that differs;
    say which stages any other change can make recompute."""
    changes = config_changes(stored, cfg)
    fixed = [c for c in changes if c[0].split(".")[0] in TRAINING_SECTIONS
             and c[0] not in RUNTIME_KEYS]
    if cfg.trains and fixed:
        raise StoreError(
            f"{run.config_path} was trained with other settings than the config given "
            f"({_listed(fixed)}); a trained run keeps its training settings (they made its "
            "checkpoints). Use a new run name, or delete the run directory to start over.")
    for key, before, after in changes:
        effect = ("changes only where or how fast it computes: nothing recomputes"
                  if key in RUNTIME_KEYS else f"can invalidate {', '.join(invalidated(key))} "
                  "(each recomputes only if its inputs changed)")
        run.say(f"config: {key}: {_value(before)} → {_value(after)}; {effect}")


def _value(value) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


def _listed(changes) -> str:
    return "; ".join(f"{key}: {_value(a)} → {_value(b)}" for key, a, b in changes)
