"""The Python API: :class:`Run`, an estimator over one run directory.

Configured in ``__init__`` (nothing is computed or written there), work in :meth:`Run.run`
(every stage, skipping what is done) or one stage method at a time, results in attributes
ending in ``_``, read from the run directory through the contract. Reopening a finished run
and calling :meth:`Run.load` fills them without computing anything.

Example:
    >>> run = Run("configs/demo-addition.toml").run()                   # doctest: +SKIP
    >>> run.projected_loss_["hessian"]["polca"].sel(vector=0)          # doctest: +SKIP
    >>> run.labels_["polca-hessian"], run.evaluation_["carry"]          # doctest: +SKIP

    >>> run = Run.from_hf("ckpts/checkpoint-*", probe="probe.jsonl",     # doctest: +SKIP
    ...                   name="my-gpt2", config={"basis": {"kinds": ["hessian", "random"]}})

    >>> run = Run.from_module(make_model, "ckpts/step_*.safetensors",   # doctest: +SKIP
    ...                       probe="probe.jsonl", loss_fn=my_token_loss)
    >>> run.trajectories().basis().decompose()                          # doctest: +SKIP

``from_module`` accepts Python objects (a factory, a loss function): they live in this
session; the written ``config.toml`` names them as ``"module:function"`` when they are
importable, and the command line needs that form.
"""

from __future__ import annotations

import glob
import importlib
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polca.config import ConfigError, RunConfig, load_config, parse_config
from polca.stages import STAGES
from polca.store import LOSS, RunDir, StoreError

# an outside series is analysed, never trained, and has no progress measures
ANALYSIS_STAGES = tuple(s for s in STAGES if s not in ("train", "measures"))


def stages_of(cfg: RunConfig) -> tuple[str, ...]:
    """The stages of a run in order: an outside series is analysed, never trained, and has no
    progress measures (they need the built-in decoder)."""
    return STAGES if cfg.trains else ANALYSIS_STAGES


def run_stage(ctx, name: str, progress: bool = True):
    """Run one stage (``polca.stages.<name>.run_<name>``) on an opened run, holding the run's
    lock; returns the stage's result."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; the stages are {list(STAGES)}")
    if name not in stages_of(ctx.cfg):
        raise ConfigError(f"{ctx.run.root} analyses checkpoints made outside polca: it has no "
                          f"`{name}` stage (its stages: {', '.join(stages_of(ctx.cfg))})")
    from polca import progress as P

    started = time.monotonic()
    with ctx.run.lock(), P.journal() as log:
        if name == "report":  # the page is the face's: it reads the run through the contract
            from polca.report import write_report

            result = write_report(ctx.run, examples=ctx.cfg.report.examples_per_cluster)
        else:
            module = importlib.import_module(f"polca.stages.{name}")
            result = getattr(module, f"run_{name}")(ctx, progress=progress)
        if not log.skipped:
            ctx.run.record_time(name, time.monotonic() - started)
    return result


class Run:
    """One run directory as an estimator.

    Args:
        config: a config ``.toml`` file, a config dict, a :class:`~polca.config.RunConfig`
            (the run goes to ``runs/<name>``), or an existing run directory.
        runs: where runs named by a config are created.
        device: where the analysis runs (default: the config's ``compute.device``, else
            ``train.device``).
        dtype: arithmetic of the trajectories stage (default: ``compute.dtype``, else
            float64; the basis and decompose stages follow ``compute.dtype`` or their own
            ``dtype`` settings).
        progress: show progress bars.

    Results (None until the stage that makes them ran, or :meth:`load` found them):

    * ``steps_``: the checkpoint steps; ``tokens_``: the probe token table (one row per
      scored token: its sequence, position, target, text and labels);
    * ``loss_``: the exact token losses, an :class:`xarray.DataArray` ``[token, checkpoint]``
      (coordinates ``step``, and ``tokens_seen`` where the source knows the tokens per step);
    * ``terms_``: ``{basis: xarray.Dataset}`` of the decomposition arrays (``first``,
      ``second_exact``, ... ``[vector, interval, token]``, ``grad`` ``[vector, checkpoint,
      token]``), read lazily from the zarr store;
    * ``projected_loss_``: ``{basis: xarray.Dataset}`` of the projected-loss trajectories of
      every kind the basis has terms for (``polca``, ``polca_paper``, ``first_order``,
      ``integrated``, ``fisher``): ``PL[vector, interval, token]``, the allocated loss change
      cumulated up to the end of each interval (the trajectories that are clustered, without
      their zero start); coordinates ``step_start``/``step_end`` per interval and the token
      table's columns per token;
    * ``bases_``: ``{name: Basis}``; ``diagnostics_``: ``{basis: summary dict}``;
    * ``labels_``: ``{clustering: xarray.DataArray}`` of cluster labels, ``[vector, token]``
      for kinds with a basis and ``[token]`` for the others: ``>= 0`` a cluster (0 the
      largest), ``-1`` HDBSCAN noise, ``-2`` a token removed by the token filter, ``-3`` every
      token of a vector dropped by the mean filter;
    * ``evaluation_``: ``{table: DataFrame}`` (scores, clusters, carry, hidden);
    * ``measures_``: the progress measures ``[checkpoint × measure]`` (runs polca trained);
    * ``report_path_``: the report page.
    """

    def __init__(self, config, *, runs: str | os.PathLike = "runs", device: str | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True):
        self.config, self.runs, self.device, self.dtype = config, runs, device, dtype
        self.progress = progress
        self._objects: dict = {}  # a task or source holding Python objects (from_module)
        self._ctx = None
        for name in ("steps_", "tokens_", "loss_", "terms_", "projected_loss_", "bases_",
                     "diagnostics_", "labels_", "evaluation_", "measures_", "report_path_"):
            setattr(self, name, None)

    def __repr__(self) -> str:
        return f"Run({str(self.config) if not isinstance(self.config, dict) else '{...}'!r})"

    # -- opening --------------------------------------------------------------------------------
    @property
    def ctx(self):
        """The opened run (:class:`~polca.stages.common.RunContext`); opened on first use."""
        if self._ctx is None:
            from polca.stages.common import open_run

            root, cfg = self._resolve()
            self._ctx = open_run(root, cfg, dtype=self.dtype, device=self.device,
                                 **self._objects)
        return self._ctx

    @property
    def root(self) -> Path:
        return self.ctx.run.root

    def _resolve(self) -> tuple[Path, RunConfig | None]:
        config = self.config
        if isinstance(config, RunConfig):
            return Path(self.runs) / config.name, config
        if isinstance(config, dict):
            cfg = parse_config(config, source="polca.Run")
            return Path(self.runs) / cfg.name, cfg
        path = Path(config)
        if path.suffix == ".toml":
            cfg = load_config(path)
            return Path(self.runs) / cfg.name, cfg
        if not RunDir(path).exists():
            raise ConfigError(f"{path} is neither a config .toml file nor a run directory with "
                              "a config.toml")
        return path, None

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Sequence[str | os.PathLike],
                probe: str | os.PathLike, *, name: str | None = None,
                runs: str | os.PathLike = "runs", revisions: Sequence[str] | None = None,
                steps: Sequence[int] | None = None, tokenizer: str | os.PathLike | None = None,
                config: dict | None = None, device: str | None = None,
                include: Sequence[str] | None = None, tokens_per_step: int | None = None,
                **probe_options) -> Run:
        """A series of Hugging Face causal-LM checkpoints (see
        :func:`polca.models.hf.hf_series` for ``source``), analysed into ``runs/<name>``.
        ``tokens_per_step``: training tokens per step, so the results carry the tokens seen
        per checkpoint (``tokens_seen`` coordinates; Pythia's by default for its hub caches).

        ``probe_options``: ``context_length``, ``max_tokens``, ``tokens_per_sequence``,
        ``basis_sample`` (training sequences for the Hessian; default: the probe set),
        ``truncate`` (cut probe examples longer than the context, counted, instead of an
        error).
        ``include``: parameter globs forming θ. ``config``: other config sections, e.g.
        ``{"basis": {"kinds": ["hessian", "random"]}, "decompose": {"batch_size": 16}}``.
        """
        from polca.sources import HFSource

        revisions, steps = _list(revisions), _list(steps)
        section = {"kind": "hf", "path": _absolute(source), "revisions": revisions,
                   "steps": steps, "include": _list(include), "tokens_per_step": tokens_per_step}
        made = HFSource(section["path"], steps=steps, revisions=revisions,
                        include=section["include"], tokens_per_step=tokens_per_step)
        return cls._outside(section, probe, tokenizer, probe_options, name or default_name(
            source), runs, config, device, made)

    @classmethod
    def from_module(cls, factory: Callable[..., torch.nn.Module] | str,
                    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
                    probe: str | os.PathLike,
                    loss_fn: Callable | str | None = None, *, name: str | None = None,
                    runs: str | os.PathLike = "runs", factory_kwargs: dict | None = None,
                    steps: Sequence[int] | None = None,
                    tokenizer: str | os.PathLike | None = None, config: dict | None = None,
                    device: str | None = None, include: Sequence[str] | None = None,
                    **probe_options) -> Run:
        """Any PyTorch model: ``factory(**factory_kwargs)`` builds it (input_ids ``[batch, seq]``
        → logits ``[batch, seq, vocab]``), ``checkpoints`` are its state-dict files (a glob, a
        folder or a list; see :func:`polca.byo.state_series`), ``loss_fn(logits, ProbeBatch)
        -> [tokens]`` replaces next-token cross-entropy.

        ``factory``/``loss_fn`` may be Python objects (kept for this session) or
        ``"module:function"`` strings; ``probe_options`` as in :meth:`from_hf`.
        """
        from polca.sources import StateDictSource, reference_of, resolve_callable

        kwargs = dict(factory_kwargs or {})
        factory, loss_fn = _absolute_reference(factory), _absolute_reference(loss_fn)
        build = resolve_callable(factory, "factory") if isinstance(factory, str) else factory
        loss = resolve_callable(loss_fn, "loss_fn") if isinstance(loss_fn, str) else loss_fn
        references = {
            "factory": factory if isinstance(factory, str) else reference_of(factory),
            "factory_kwargs": kwargs,
            "loss_fn": loss_fn if isinstance(loss_fn, str) else reference_of(loss_fn)}
        section = {"kind": "state-dict", "path": _absolute(checkpoints), "steps": _list(steps),
                   "include": _list(include), **references}
        made = StateDictSource(section["path"], partial(build, **kwargs), steps=section["steps"],
                               loss_fn=loss, include=section["include"], references=references)
        return cls._outside(section, probe, tokenizer, probe_options,
                            name or default_name(checkpoints), runs, config, device, made)

    @classmethod
    def _outside(cls, source: dict, probe, tokenizer, probe_options: dict, name: str, runs,
                 config: dict | None, device, made) -> Run:
        known = {"context_length", "max_tokens", "tokens_per_sequence", "basis_sample",
                 "truncate"}
        unknown = set(probe_options) - known
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
        options = {"probe": _absolute(probe), "tokenizer": _absolute(tokenizer),
                   **probe_options, "basis_sample": _absolute(probe_options.get("basis_sample"))}
        data = {"name": name, **(config or {})}
        data["source"] = {k: v for k, v in source.items() if v not in (None, {}, [])}
        data["task"] = {**data.get("task", {}), "kind": "probe-file",
                        "options": {k: v for k, v in options.items() if v is not None}}
        run = cls(parse_config(with_basis_defaults(data, made.series.steps), source="polca.Run"),
                  runs=runs, device=device)
        run._objects = {"source": made}
        return run

    # -- stages ---------------------------------------------------------------------------------
    def _stage(self, name: str, **options):
        if options:
            module = importlib.import_module(f"polca.stages.{name}")
            with self.ctx.run.lock():
                return getattr(module, f"run_{name}")(self.ctx, progress=self.progress,
                                                      **options)
        return run_stage(self.ctx, name, self.progress)

    def train(self) -> Run:
        """Train the built-in model (runs of outside checkpoints have nothing to train)."""
        self._stage("train")
        return self

    def trajectories(self) -> Run:
        """Exact token losses at every checkpoint (``loss_``)."""
        self._stage("trajectories")
        self._read_loss()
        return self

    def basis(self) -> Run:
        """Every configured basis (``bases_``)."""
        self.bases_ = self._stage("basis")
        return self

    def decompose(self) -> Run:
        """POLCA and its baselines on every basis (``terms_``, ``projected_loss_``,
        ``diagnostics_``)."""
        self.diagnostics_ = self._stage("decompose")
        self._read_terms()
        return self

    def cluster(self, kinds: Sequence[str] | None = None) -> Run:
        """Cluster the trajectories of ``kinds`` (default: the config's) (``labels_``)."""
        if kinds is not None:
            self._stage("cluster", kinds=list(kinds))
        else:
            self._stage("cluster")
        self._read_labels()
        return self

    def evaluate(self) -> Run:
        """Score the clusters against the probe labels (``evaluation_``)."""
        self.evaluation_ = self._stage("evaluate")
        return self

    def measures(self) -> Run:
        """Progress measures per checkpoint (``measures_``; runs polca trained)."""
        self.measures_ = self._stage("measures")
        return self

    def report(self) -> Run:
        """The report page (``report_path_``)."""
        self.report_path_ = self._stage("report")
        return self

    def run(self) -> Run:
        """Every stage of the run in order (what is done is skipped), then :meth:`load`."""
        with self.ctx.run.lock():  # no other process between two stages
            for name in stages_of(self.ctx.cfg):
                getattr(self, name)()
        return self.load()

    fit = run

    # -- results --------------------------------------------------------------------------------
    def load(self) -> Run:
        """Fill every result attribute from what the run directory holds; computes nothing."""
        root, _ = self._resolve()
        if not RunDir(root).exists():
            raise StoreError(f"{root} does not exist yet: call run() first")
        run = self.ctx.run
        self._read_loss()
        self._read_terms()
        self.bases_ = {name: run.load_basis(name) for name in run.basis_names()} or None
        self.diagnostics_ = run.read_diagnostics() or None
        self._read_labels()
        self.evaluation_ = run.read_evaluation() or None
        self.measures_ = run.read_measures() if run.has_measures() else None
        self.report_path_ = run.report_path() if run.report_path().is_file() else None
        return self

    def _read_loss(self) -> None:
        import xarray as xr

        run = self.ctx.run
        self.tokens_ = run.read_tokens() if run.has_probe() else None
        steps = run.array_steps(LOSS)
        if steps is None:
            return
        self.steps_ = steps
        tokens_seen = run.tokens_seen(steps)
        extra = {} if tokens_seen is None else {"tokens_seen": ("checkpoint", tokens_seen)}
        self.loss_ = xr.DataArray(run.arrays().read(LOSS), dims=("token", "checkpoint"),
                                  coords={"step": ("checkpoint", steps), **extra,
                                          **self._token_coords()},
                                  name="loss")

    def _token_coords(self) -> dict:
        tokens = self.tokens_ if self.tokens_ is not None else self.ctx.run.read_tokens()
        return {column: ("token", tokens[column].to_numpy()) for column in tokens.columns
                if column != "token"}

    def _read_terms(self) -> None:
        run = self.ctx.run
        bases = run.decomposed_bases()
        if not bases:
            return
        coords = self._token_coords()
        self.terms_ = {b: run.dataset(f"polca/{b}").assign_coords(coords) for b in bases}
        self.projected_loss_ = _Projected(self.terms_)

    def _read_labels(self) -> None:
        import xarray as xr

        run = self.ctx.run
        clusterings, _ = run.read_clusterings()
        if not clusterings:
            return
        n_tokens = len(run.read_tokens())
        self.labels_ = {}
        for clustering in clusterings:
            by_vector = clustering.labels_by_vector(n_tokens)
            if list(by_vector) == [None]:
                self.labels_[clustering.name] = xr.DataArray(
                    by_vector[None], dims=("token",), name=clustering.name)
            else:
                self.labels_[clustering.name] = xr.DataArray(
                    np.stack(list(by_vector.values())), dims=("vector", "token"),
                    coords={"vector": list(by_vector)}, name=clustering.name)

    def clusters(self, name: str, vector: int | None = None) -> pd.DataFrame:
        """The token table with one clustering's ``cluster`` label per token (for one vector
        of a kind with a basis)."""
        labels = (self.labels_ or {}).get(name)
        if labels is None:
            raise KeyError(f"no clustering {name!r}; have {sorted(self.labels_ or {})}")
        if "vector" in labels.dims:
            if vector is None:
                raise ValueError(f"{name} has one clustering per basis vector: pass vector=")
            labels = labels.sel(vector=vector)
        return self.tokens_.assign(cluster=labels.to_numpy())


class _Projected(Mapping):
    """``{basis: xarray.Dataset}`` of projected-loss trajectories, each computed (read and
    cumulated) when first asked for."""

    def __init__(self, terms: Mapping):
        self.terms, self.cache = terms, {}

    def __getitem__(self, basis: str):
        if basis not in self.cache:
            from polca.store import TRAJECTORY_KINDS

            terms = self.terms[basis]
            kinds = {kind: sum(terms[t] for t in spec.terms).cumsum("interval")
                     for kind, spec in TRAJECTORY_KINDS.items()
                     if spec.source == "terms" and spec.cumulative
                     and all(t in terms for t in spec.terms)}
            dataset = terms[[]].assign(kinds)
            self.cache[basis] = dataset.drop_dims([d for d in ("checkpoint",)
                                                   if d in dataset.dims])
        return self.cache[basis]

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        return f"projected loss of bases {list(self.terms)}"


def with_basis_defaults(data: dict, steps: Sequence[int]) -> dict:
    """``data`` with ``basis.every`` defaulting to the smallest gap between checkpoint steps,
    so that (with one vector per basis checkpoint) every checkpoint after the first adds a
    Hessian eigenvector; an outside run's steps are not on polca's training schedule.

    >>> with_basis_defaults({"name": "x"}, [0, 10, 30])["basis"]
    {'every': 10}
    """
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    basis = dict(data.get("basis", {}))
    basis.setdefault("every", min(gaps) if gaps else 1)
    return {**data, "basis": basis}


GENERIC_FOLDERS = ("checkpoints", "checkpoint", "ckpts", "ckpt", "weights", "models", "snapshots")


def default_name(source) -> str:
    """A run name from a checkpoint source: the run's folder (``models--org--name`` → ``name``).

    >>> default_name("/data/my-run/checkpoints/step_*.safetensors")
    'my-run'
    >>> default_name("/hub/models--EleutherAI--pythia-14m")
    'pythia-14m'
    """
    first = source if isinstance(source, (str, os.PathLike)) else next(iter(source), "run")
    path = Path(os.path.abspath(first))
    while path.parent != path and (glob.has_magic(str(path)) or path.suffix in (
            ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")
            or path.name.lower() in GENERIC_FOLDERS):
        path = path.parent
    name = path.name
    return name.split("--")[-1] if name.startswith("models--") else name or "run"


def _absolute(value):
    # paths go into config.toml absolute, so the run reopens from any directory
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.path.abspath(value)
    return [os.path.abspath(v) for v in value]


def _absolute_reference(reference):
    """``"file.py:fn"`` with the file's absolute path; other values unchanged."""
    if isinstance(reference, str) and reference.partition(":")[0].endswith(".py"):
        file, _, attribute = reference.partition(":")
        return f"{os.path.abspath(file)}:{attribute}"
    return reference


def _list(values):
    return None if values is None else list(values)
