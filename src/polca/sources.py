"""Run sources: where the model and its checkpoints come from (config section ``[source]``).

A run is a source (the model and an ordered checkpoint series) and a task (the data and its
labels, :mod:`polca.tasks`). Three sources:

* :class:`TrainingSource` (``kind = "train"``): the built-in decoder, trained by polca; its
  checkpoints are the run directory's own.
* :class:`HFSource` (``kind = "hf"``): a series of Hugging Face causal-LM checkpoints
  (:func:`polca.models.hf.hf_series`), the seam :class:`~polca.models.hf.HFTokenLoss`.
* :class:`StateDictSource` (``kind = "state-dict"``): state-dict files of any PyTorch model
  (:func:`polca.byo.state_series`) and a factory that builds it.

Every source gives the seam (:meth:`token_loss`, a :class:`~polca.functional.TokenLoss` on a
module in the analysis dtype and device, with the parameters outside θ fixed at the first
checkpoint), describes itself for the input fingerprints (:meth:`identity`) and, for outside
series, checks the whole series before a run is created (:meth:`check`).

Example:
    >>> from polca.config import parse_config
    >>> source = make_source(parse_config({"name": "demo", "model": {"d_model": 16}}))
    >>> source.trains, source.identity()["kind"]
    (True, 'train')
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from polca.byo import CheckpointSeriesError, check_state_matches, module_token_loss, state_series
from polca.config import ConfigError, RunConfig
from polca.functional import ModuleTokenLoss, ProbeBatch, TokenLoss
from polca.probes import ProbeFileError

# the config's stand-in for a Python object given to polca.Run.from_module in a session
IN_MEMORY = "<in-memory>"


def resolve_callable(reference: str, what: str) -> Callable:
    """The object a ``"module:function"`` or ``"path/file.py:function"`` string names; the
    current directory is searched for the module, as ``python -m`` would."""
    if reference.startswith(IN_MEMORY):
        raise ConfigError(
            f"this run's {what} was a Python object given to polca.Run.from_module in a session "
            f"({reference}); reopen the run the same way, or make it importable and write "
            f"{what} = \"module:function\" in the config"
        )
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{what} {reference!r} must be \"module:function\" (e.g. "
                          "\"mymodels:make_model\") or \"path/to/file.py:function\"")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            spec = importlib.util.spec_from_file_location(f"_polca_user_{path.stem}", path)
            if spec is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {what} {reference!r}: {err}") from None
    found = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        raise ConfigError(f"{what} {reference!r}: {module_name} has no callable {attribute!r}")
    return found


def reference_of(obj: Callable | None) -> str | None:
    """``"module:qualname"`` of an importable function or class, else an in-memory marker.

    >>> reference_of(os.path.join)
    'posixpath:join'
    """
    if obj is None:
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname:
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
            if found is obj:
                return f"{module}:{qualname}"
        except (ImportError, AttributeError):
            pass
    return f"{IN_MEMORY} {qualname or type(obj).__name__}"


def _with_fixed(loss: TokenLoss, first: Callable[[], Mapping[str, torch.Tensor]]) -> TokenLoss:
    # parameters outside θ stay at the first checkpoint's values
    if isinstance(loss, ModuleTokenLoss) and loss.fixed:
        loss.set_fixed(first())
    return loss


class TrainingSource:
    """The built-in decoder, trained by polca into the run directory (``kind = "train"``)."""

    trains = True
    series = None  # the run directory's own checkpoints

    def __init__(self, cfg: RunConfig, vocab_size: int, sequence_length: int):
        self.cfg, self.vocab_size, self.sequence_length = cfg, vocab_size, sequence_length

    def build_model(self) -> nn.Module:
        """The decoder, initialised from the run seed (float32, as training runs)."""
        from polca.models.decoder import Decoder, DecoderConfig

        torch.manual_seed(self.cfg.seed)
        m = self.cfg.model
        return Decoder(DecoderConfig(
            vocab_size=self.vocab_size, context_length=m.context_length or self.sequence_length,
            n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, d_mlp=m.d_mlp,
            tied_head=m.tied_head, attention=m.attention,
        ))

    def token_loss(self, module: nn.Module, first: Callable[[], Mapping]) -> TokenLoss:
        return ModuleTokenLoss(module)

    def identity(self) -> dict:
        return {"kind": "train", "model": self.cfg.model.model_dump(mode="json")}

    def task_hints(self) -> dict:
        return {}


class _SeriesSource:
    """Shared by the sources of outside checkpoint series."""

    trains = False
    series = None

    def checkpoint_files(self) -> list[Path]:
        """The files (or checkpoint folders) of the series, in step order."""
        return list(self.series.paths)

    def check(self, loss: TokenLoss, probe: ProbeBatch) -> None:
        """Read every checkpoint once (safely, finite, fitting the model) and score two probe
        sequences at the last one, so a bad run stops before anything is written."""
        steps = self.series.steps
        if len(steps) < 2:
            raise CheckpointSeriesError(
                f"the series has {len(steps)} checkpoint(s) (steps {steps}); POLCA decomposes "
                "the loss change between checkpoints and needs at least 2")
        for step in steps:
            check_state_matches(loss, self.series.load(step))
        theta = loss.space.flatten(self.series.load(steps[-1])).to(
            next(iter(loss.module.parameters())))
        chunk = probe[:2].to(theta.device)
        try:
            with torch.no_grad():
                got = loss(theta, chunk)
        except (IndexError, RuntimeError, ValueError, TypeError) as err:
            raise ProbeFileError(
                f"the model cannot score the probe set ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); check the tokenizer, the "
                "context length and the loss function") from None
        if got.shape != (chunk.n_tokens,):
            raise ConfigError(f"the loss function returned shape {tuple(got.shape)} for "
                              f"{chunk.n_tokens} scored tokens; it must return one loss per "
                              "scored token, [tokens]")
        if not torch.isfinite(got).all():
            raise CheckpointSeriesError(f"the last checkpoint (step {steps[-1]}) gives "
                                        "non-finite probe losses")


class HFSource(_SeriesSource):
    """A series of Hugging Face causal-LM checkpoints (``kind = "hf"``).

    ``path``: a list of checkpoint folders, a glob of them, their parent folder, a hub cache
    ``models--org--name`` (``revisions``: refs, default every ``step*`` ref) or a series
    manifest ``.json``; see :func:`polca.models.hf.hf_series`."""

    def __init__(self, path, steps: Sequence[int] | None = None,
                 revisions: Sequence[str] | None = None, include: Sequence[str] | None = None,
                 tokens_per_step: int | None = None):
        from polca.models.hf import hf_series

        self.include = include
        self.series = hf_series(path, steps=steps, revisions=revisions,
                                tokens_per_step=tokens_per_step)

    def build_model(self) -> nn.Module:
        """A model of the series' architecture (placeholder weights: every θ analysed comes
        from a checkpoint)."""
        return self.series.model(torch.float32)

    def token_loss(self, module: nn.Module, first: Callable[[], Mapping]) -> TokenLoss:
        from polca.models.hf import HFTokenLoss

        return _with_fixed(HFTokenLoss(module, include=self.include), first)

    def identity(self) -> dict:
        return {"kind": "hf", "config": self.series.config_dict, "include": self.include}

    def task_hints(self) -> dict:
        """The tokenizer.json of the last checkpoint holding one, the model's context length
        and vocabulary size."""
        config = self.series.config
        tokenizer = next((p / "tokenizer.json" for p in self.series.paths[::-1]
                          if (p / "tokenizer.json").is_file()), None)
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)
        return {"tokenizer": tokenizer, "context_length": positions,
                "vocab_size": config.vocab_size}


class StateDictSource(_SeriesSource):
    """State-dict files of any PyTorch model and its factory (``kind = "state-dict"``).

    ``factory()`` builds the model (``input_ids [batch, seq]`` → logits ``[batch, seq,
    vocab]``); ``loss_fn(logits, batch) -> [tokens]`` replaces next-token cross-entropy;
    ``include``: glob patterns of the parameters forming θ."""

    def __init__(self, path, factory: Callable[[], nn.Module], steps: Sequence[int] | None = None,
                 loss_fn: Callable | None = None, include: Sequence[str] | None = None,
                 references: Mapping | None = None):
        self.factory, self.loss_fn, self.include = factory, loss_fn, include
        self.references = dict(references or {})
        self.series = state_series(path, steps=steps, check=False)  # check() reads them all

    def build_model(self) -> nn.Module:
        module = self.factory()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the model factory returned {type(module).__name__}, not an "
                              "nn.Module")
        return module.eval()

    def token_loss(self, module: nn.Module, first: Callable[[], Mapping]) -> TokenLoss:
        dtype = next(iter(module.parameters())).dtype
        return _with_fixed(module_token_loss(module, loss_fn=self.loss_fn, include=self.include,
                                             dtype=dtype), first)

    def identity(self) -> dict:
        return {"kind": "state-dict", "include": self.include, **self.references}

    def task_hints(self) -> dict:
        return {}


def make_source(cfg: RunConfig, vocab_size: int | None = None,
                sequence_length: int | None = None):
    """The run source of ``cfg.source`` (the built-in one needs the task's vocabulary size and
    sequence length)."""
    s = cfg.source
    if s.kind == "train":
        return TrainingSource(cfg, vocab_size, sequence_length)
    if s.kind == "hf":
        return HFSource(s.path, steps=s.steps, revisions=s.revisions, include=s.include,
                        tokens_per_step=s.tokens_per_step)
    factory = resolve_callable(s.factory, "factory")
    if s.factory_kwargs:
        from functools import partial

        factory = partial(factory, **s.factory_kwargs)
    loss_fn = resolve_callable(s.loss_fn, "loss_fn") if s.loss_fn else None
    return StateDictSource(s.path, factory, steps=s.steps, loss_fn=loss_fn, include=s.include,
                           references={"factory": s.factory, "factory_kwargs": s.factory_kwargs,
                                       "loss_fn": s.loss_fn})


def open_source(cfg: RunConfig, root=None, source=None, task=None):
    """``(source, task)`` of a config: the task is built with the source's hints (an outside
    series names its tokenizer and context length); either may be given ready-made (Python
    objects that a config can only name)."""
    from polca.tasks import make_task

    if cfg.trains:
        task = task if task is not None else make_task(cfg, root)
        source = source if source is not None else make_source(
            cfg, task.vocab_size, task.sequence_length)
        return source, task
    source = source if source is not None else make_source(cfg)
    task = task if task is not None else make_task(cfg, root, hints=source.task_hints())
    return source, task


__all__ = ["HFSource", "StateDictSource", "TrainingSource", "make_source", "open_source",
           "reference_of", "resolve_callable"]
