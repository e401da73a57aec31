"""The Python façade: open a run (built-in, Hugging Face, or any PyTorch model) and run stages.

Example:
    >>> run = Run.from_hf("ckpts/checkpoint-*", probe="probe.jsonl",      # doctest: +SKIP
    ...                   name="my-gpt2", config={"basis": {"kinds": ["hessian", "random"]}})
    >>> run.run_all()                                                     # doctest: +SKIP
    >>> run.evaluation_["scores"].head(), run.report_path_                # doctest: +SKIP

    >>> run = Run.from_module(make_model, "ckpts/step_*.safetensors",    # doctest: +SKIP
    ...                       probe="probe.jsonl", loss_fn=my_token_loss)
    >>> run.trajectories(); run.basis(); run.decompose()                  # doctest: +SKIP

Every stage skips what is already done, so calling ``run_all()`` again after an interruption
continues where it stopped. ``from_module`` accepts Python objects (a factory, a loss
function): they live in this session; the written ``config.toml`` names them as
``"module:function"`` when they are importable, and the CLI needs that form.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from polca.config import ConfigError, RunConfig, load_config, parse_config

ANALYSIS_STAGES = ("trajectories", "basis", "decompose", "cluster", "evaluate", "report")
# measures need the built-in decoder (hidden states, attention), so external runs skip them
STAGES = ("train", *ANALYSIS_STAGES[:-1], "measures", "report")


def stages_of(cfg: RunConfig) -> tuple[str, ...]:
    """The stages of a run in order: an external run is analysed, never trained."""
    return ANALYSIS_STAGES if cfg.task.kind == "external" else STAGES


def run_stage(ctx, name: str, progress: bool = True):
    """Run one stage (``polca.stages.<name>.run_<name>``) on an opened run; returns its result."""
    import importlib

    if name == "train" and ctx.cfg.task.kind == "external":
        raise ConfigError(f"{ctx.run.root} is an external run: polca analyses its checkpoints "
                          "and does not train it; start with `trajectories`")
    module = importlib.import_module(f"polca.stages.{name}")
    return getattr(module, f"run_{name}")(ctx, progress=progress)


class Run:
    """An opened run; each method runs one stage and keeps its result.

    Attributes set by the stages: ``bases_`` (name → :class:`~polca.bases.Basis`),
    ``decomposition_`` (basis → diagnostics summary), ``clusters_`` (clustering → status),
    ``evaluation_`` (table name → DataFrame: scores, clusters, carry, hidden),
    ``report_path_`` (the report's ``index.html``). ``ctx`` is the
    :class:`~polca.stages.common.RunContext` (model, seam, checkpoints, probe).
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.bases_ = self.decomposition_ = self.clusters_ = None
        self.evaluation_ = self.report_path_ = None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, task={self.ctx.cfg.task.kind!r})"

    @property
    def root(self) -> Path:
        return self.ctx.run.root

    def arrays(self):
        """The run's :class:`~polca.store.ArrayStore` (``loss``, ``polca/<basis>/first``, …)."""
        return self.ctx.run.arrays()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, path: str | os.PathLike, runs: str | os.PathLike = "runs",
                    device: str | None = None, dtype: torch.dtype = torch.float64) -> Run:
        """A config ``.toml`` (the run goes to ``runs/<name>``) or an existing run directory."""
        from polca.stages.common import open_run

        path = Path(path)
        if path.suffix == ".toml":
            cfg = load_config(path)
            return cls(open_run(Path(runs) / cfg.name, cfg, dtype=dtype, device=device))
        if not (path / "config.toml").is_file():
            raise ConfigError(f"{path} is neither a config .toml file nor a run directory with "
                              "a config.toml")
        return cls(open_run(path, dtype=dtype, device=device))

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Sequence[str | os.PathLike],
                probe: str | os.PathLike, *, name: str | None = None,
                runs: str | os.PathLike = "runs", revisions: Sequence[str] | None = None,
                steps: Sequence[int] | None = None, tokenizer: str | os.PathLike | None = None,
                config: dict | None = None, device: str | None = None,
                **probe_options) -> Run:
        """A series of Hugging Face causal-LM checkpoints (see
        :func:`polca.models.hf.hf_series` for ``source``), analysed into ``runs/<name>``.

        ``probe_options``: ``context_length``, ``max_tokens``, ``tokens_per_sequence``,
        ``basis_sample`` (training sequences for the Hessian; default: the probe set),
        ``include`` (parameter globs forming θ). ``config``: other config sections, e.g.
        ``{"basis": {"kinds": ["hessian", "random"]}, "decompose": {"batch_size": 16}}``.
        """
        options = {"hf": _absolute(source), "revisions": _list(revisions), "steps": _list(steps),
                   "probe": _absolute(probe), "tokenizer": _absolute(tokenizer),
                   **_probe_options(probe_options)}
        return cls._external(options, name or default_name(source), runs, config, device)

    @classmethod
    def from_module(cls, factory: Callable[..., torch.nn.Module] | str,
                    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
                    probe: str | os.PathLike,
                    loss_fn: Callable | str | None = None, *, name: str | None = None,
                    runs: str | os.PathLike = "runs", factory_kwargs: dict | None = None,
                    steps: Sequence[int] | None = None,
                    tokenizer: str | os.PathLike | None = None, config: dict | None = None,
                    device: str | None = None, **probe_options) -> Run:
        """Any PyTorch model: ``factory(**factory_kwargs)`` builds it (input_ids ``[batch, seq]``
        → logits ``[batch, seq, vocab]``), ``checkpoints`` are its state-dict files (a glob, a
        folder or a list; see :func:`polca.byo.state_series`), ``loss_fn(logits, ProbeBatch)
        -> [tokens]`` replaces next-token cross-entropy.

        ``factory``/``loss_fn`` may be Python objects (kept for this session) or
        ``"module:function"`` strings; ``probe_options`` as in :meth:`from_hf`.
        """
        from polca.tasks.external import ExternalTask, reference_of, resolve_callable

        kwargs = dict(factory_kwargs or {})
        factory, loss_fn = _absolute_reference(factory), _absolute_reference(loss_fn)
        build = resolve_callable(factory, "factory") if isinstance(factory, str) else factory
        loss = resolve_callable(loss_fn, "loss_fn") if isinstance(loss_fn, str) else loss_fn
        files, probe, tokenizer = _absolute(checkpoints), _absolute(probe), _absolute(tokenizer)
        extra = _probe_options(probe_options)
        options = {"checkpoints": files, "steps": _list(steps),
                   "factory": factory if isinstance(factory, str) else reference_of(factory),
                   "factory_kwargs": kwargs,
                   "loss_fn": loss_fn if isinstance(loss_fn, str) else reference_of(loss_fn),
                   "probe": probe, "tokenizer": tokenizer, **extra}

        def make_task(cfg: RunConfig) -> ExternalTask:  # the objects themselves, not their names
            return ExternalTask.from_files(files, partial(build, **kwargs), probe,
                                           steps=_list(steps), loss_fn=loss, tokenizer=tokenizer,
                                           seed=cfg.seed, **extra)

        return cls._external(options, name or default_name(checkpoints), runs, config, device,
                             make_task=make_task)

    @classmethod
    def _external(cls, options: dict, name: str, runs, config: dict | None, device,
                  make_task: Callable | None = None) -> Run:
        from polca.stages.common import open_run
        from polca.tasks import make_task as task_of_config

        options = {k: v for k, v in options.items() if v not in (None, {}, [])}
        data = {"name": name, **(config or {})}
        task_section = {**data.get("task", {}), "kind": "external", "options": options}
        cfg = parse_config({**data, "task": task_section}, source="polca.Run")
        task = (make_task or partial(task_of_config, root=None))(cfg)
        cfg = parse_config(with_basis_defaults({**data, "task": task_section}, task.series.steps),
                           source="polca.Run")
        return cls(open_run(Path(runs) / name, cfg, device=device, task=task))

    # -- stages ---------------------------------------------------------------------------------
    def train(self, progress: bool = True) -> None:
        """Train a built-in run (an external run is never trained: this is an error)."""
        run_stage(self.ctx, "train", progress)

    def trajectories(self, progress: bool = True) -> None:
        run_stage(self.ctx, "trajectories", progress)

    def basis(self, progress: bool = True) -> dict:
        self.bases_ = run_stage(self.ctx, "basis", progress)
        return self.bases_

    def decompose(self, progress: bool = True) -> dict:
        self.decomposition_ = run_stage(self.ctx, "decompose", progress)
        return self.decomposition_

    def cluster(self, progress: bool = True) -> dict:
        self.clusters_ = run_stage(self.ctx, "cluster", progress)
        return self.clusters_

    def evaluate(self, progress: bool = True) -> dict:
        self.evaluation_ = run_stage(self.ctx, "evaluate", progress)
        return self.evaluation_

    def report(self, progress: bool = True) -> Path:
        self.report_path_ = run_stage(self.ctx, "report", progress)
        return self.report_path_

    def run_all(self, progress: bool = True) -> Path:
        """Every stage of the run in order (done work is skipped); returns the report path."""
        for name in stages_of(self.ctx.cfg):
            getattr(self, name)(progress=progress)
        return self.report_path_


def with_basis_defaults(data: dict, steps: Sequence[int]) -> dict:
    """``data`` with ``basis.every`` defaulting to the smallest gap between checkpoint steps,
    so that (with one vector per basis checkpoint) every checkpoint after the first adds a
    Hessian eigenvector; an external run's steps are not on polca's training schedule."""
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


def _probe_options(options: dict) -> dict:
    known = {"context_length", "max_tokens", "tokens_per_sequence", "basis_sample", "include"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
    out = dict(options)
    if out.get("basis_sample") is not None:
        out["basis_sample"] = _absolute(out["basis_sample"])
    if out.get("include") is not None:
        out["include"] = list(out["include"])
    return out
