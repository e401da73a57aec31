"""A run trained outside polca (registry kind "external"): its checkpoints, model and probe file.

polca does not train such a run; it analyses it. The task names where the checkpoints are
(a Hugging Face series, or state-dict files plus a model factory), the probe file with its
labels (:mod:`polca.probes`) and, optionally, a file of training sequences for the Hessian.
:func:`polca.stages.common.open_run` takes the model, the seam and the checkpoint series from
here instead of building the built-in decoder.

Config (paths relative to the current directory; ``polca analyze`` writes absolute ones)::

    [task]
    kind = "external"

    [task.options]
    hf = "runs/my-gpt2/checkpoint-*"   # a glob, a folder of checkpoints, a hub cache
    # revisions = ["step1000", ...]    #   models--org--name (hub cache only), or a .json manifest
    # checkpoints = "ckpt/step_*.safetensors"   # instead of hf: state-dict files ...
    # factory = "mymodels:make_model"           # ... and "module:function" (or "file.py:fn")
    # factory_kwargs = { width = 64 }           #     called with these keyword arguments
    # loss_fn = "mymodels:token_loss"           #     (logits, ProbeBatch) -> [tokens]
    probe = "probe.jsonl"              # .txt, .jsonl or .parquet (see polca.probes)
    tokenizer = "tokenizer.json"       # default: tokenizer.json of the last HF checkpoint
    context_length = 128               # default: the HF model's, else the longest example
    max_tokens = 5000                  # scored probe tokens (default: all)
    # basis_sample = "train.jsonl"     # training sequences for the Hessian (default: probe)
    # include = ["transformer.h.*"]    # parameters that form θ (default: all)

The Hessian sample. The paper builds the basis from the Hessian of the *training* loss (a
sample of training sequences), and the built-in tasks do so. An external run has no training
data polca knows of: give it with ``basis_sample`` (any probe-file format; its labels are
ignored). Without it the probe set itself is the sample — the basis is then fitted to the
very tokens it decomposes, which is fine for exploring a run but not the paper's protocol.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from polca.byo import CheckpointSeriesError, StateSeries, check_state_matches, state_series
from polca.config import ConfigError
from polca.functional import ModuleTokenLoss, ProbeBatch, next_token_losses
from polca.probes import ProbeFileError, probe_tables, read_examples
from polca.store import probe_batch

# token-table columns that are not labels
NOT_LABELS = ("token", "sequence", "position", "target", "text", "context", "example")
# the config's stand-in for a Python object given to polca.Run.from_module in a session
IN_MEMORY = "<in-memory>"


class ExternalOptions(BaseModel):
    """``task.options`` of kind "external" (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    hf: str | list[str] | None = None
    revisions: list[str] | None = None
    checkpoints: str | list[str] | None = None
    steps: list[int] | None = None
    factory: str | None = None
    factory_kwargs: dict = Field(default_factory=dict)
    loss_fn: str | None = None
    include: list[str] | None = None
    probe: str
    tokenizer: str | None = None
    context_length: int | None = Field(None, gt=1)
    max_tokens: int | None = Field(None, gt=0)
    tokens_per_sequence: int | None = Field(None, gt=0)
    basis_sample: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.hf is None) == (self.checkpoints is None):
            raise ValueError("give exactly one checkpoint source: 'hf' (Hugging Face checkpoint "
                             "folders) or 'checkpoints' (state-dict files, with 'factory')")
        if self.checkpoints is not None and self.factory is None:
            raise ValueError("'checkpoints' needs 'factory': the \"module:function\" that builds "
                             "the model the state dicts belong to")
        if self.hf is not None:
            given = [k for k in ("factory", "factory_kwargs", "loss_fn") if getattr(self, k)]
            if given:
                raise ValueError(f"{given} apply to 'checkpoints' only; a Hugging Face series "
                                 "builds its model from config.json")
        if self.revisions is not None and self.hf is None:
            raise ValueError("'revisions' picks refs of a Hugging Face hub cache ('hf')")
        return self


def parse_options(options: dict) -> ExternalOptions:
    try:
        return ExternalOptions.model_validate(options)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"  task.options.{key}: unknown option; remove it or fix its spelling")
            elif key:
                lines.append(f"  task.options.{key}: {e['msg']}")
            else:
                lines.append(f"  task.options: {e['msg'].removeprefix('Value error, ')}")
        raise ConfigError("task kind 'external' has bad options:\n" + "\n".join(lines)) from None


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
    """``"module:qualname"`` of an importable function or class, else an in-memory marker."""
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


class ExternalTask:
    """The task side of a run trained elsewhere: probe set, Hessian sample, model and series.

    Build it with :meth:`from_config` (strings), or directly with Python objects::

        task = ExternalTask(series, model=lambda: MyModel(), probe="probe.jsonl",
                            loss_fn=my_loss)                              # doctest: +SKIP

    Args:
        series: the checkpoints (``.steps``, ``.load(step)``), in step order.
        model: ``() -> nn.Module`` building the architecture; its initial weights are never
            analysed (every θ comes from ``series``).
        probe: probe file (``.txt``/``.jsonl``/``.parquet``).
        hf: the series is a Hugging Face one (the seam is :class:`~polca.models.hf.HFTokenLoss`).
        loss_fn: ``(logits, ProbeBatch) -> [tokens]`` (default next-token cross-entropy).
        include: glob patterns of the parameters that form θ; the others stay at the first
            checkpoint's values.
    """

    name = "external"
    label_columns: tuple[str, ...]

    def __init__(
        self,
        series: StateSeries,
        model: Callable[[], nn.Module],
        probe: str | os.PathLike,
        *,
        hf: bool = False,
        loss_fn: Callable[[torch.Tensor, ProbeBatch], torch.Tensor] | None = None,
        include: Sequence[str] | None = None,
        tokenizer=None,
        context_length: int | None = None,
        max_tokens: int | None = None,
        tokens_per_sequence: int | None = None,
        basis_sample: str | os.PathLike | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
    ):
        self.series, self.build, self.hf = series, model, hf
        self.loss_fn, self.include, self.tokenizer, self.seed = loss_fn, include, tokenizer, seed
        self.sequences, self.tokens = probe_tables(
            read_examples(probe), tokenizer, context_length=context_length,
            max_tokens=max_tokens, tokens_per_sequence=tokens_per_sequence, seed=seed,
            where=str(probe))
        self.sample = None
        if basis_sample is not None:
            sample_sequences, sample_tokens = probe_tables(
                read_examples(basis_sample), tokenizer, context_length=context_length,
                where=str(basis_sample))
            self.sample = probe_batch(sample_sequences, sample_tokens)
        self.sequence_length = max(len(ids) for ids in self.sequences["input_ids"])
        largest = max(max(ids) for ids in self.sequences["input_ids"])
        self.vocab_size = vocab_size or _tokenizer_size(tokenizer) or largest + 1
        if largest >= self.vocab_size:
            raise ProbeFileError(f"{probe}: token id {largest} is outside the model's vocabulary "
                                 f"of {self.vocab_size}; tokenise with the model's own tokenizer")
        self.label_columns = tuple(c for c in self.tokens.columns if c not in NOT_LABELS)

    @classmethod
    def from_config(cls, cfg, root=None) -> ExternalTask:
        o = parse_options(cfg.task.options)
        common = {"include": o.include, "context_length": o.context_length,
                  "max_tokens": o.max_tokens, "tokens_per_sequence": o.tokens_per_sequence,
                  "basis_sample": o.basis_sample, "seed": cfg.seed}
        if o.hf is not None:
            return cls.from_hf(o.hf, o.probe, revisions=o.revisions, steps=o.steps,
                               tokenizer=o.tokenizer, **common)
        factory = resolve_callable(o.factory, "factory")
        loss_fn = resolve_callable(o.loss_fn, "loss_fn") if o.loss_fn else None
        return cls.from_files(o.checkpoints, partial(factory, **o.factory_kwargs), o.probe,
                              steps=o.steps, loss_fn=loss_fn, tokenizer=o.tokenizer, **common)

    @classmethod
    def from_hf(cls, source, probe, revisions=None, steps=None, tokenizer=None,
                **options) -> ExternalTask:
        """A Hugging Face checkpoint series (see :func:`polca.models.hf.hf_series`)."""
        from polca.models.hf import hf_series

        series = hf_series(source, steps=steps, revisions=revisions)
        if tokenizer is None:
            tokenizer = _default_tokenizer(series.paths[::-1])
        config = series.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)
        options["context_length"] = options.get("context_length") or positions
        return cls(series, series.model, probe, hf=True, tokenizer=load_tokenizer(tokenizer),
                   vocab_size=config.vocab_size, **options)

    @classmethod
    def from_files(cls, checkpoints, factory: Callable[[], nn.Module], probe, steps=None,
                   tokenizer=None, **options) -> ExternalTask:
        """State-dict files (see :func:`polca.byo.state_series`) of the model ``factory()``."""
        series = state_series(checkpoints, steps=steps, check=False)  # check() reads them all
        return cls(series, factory, probe, tokenizer=load_tokenizer(tokenizer), **options)

    # -- what open_run takes from an external run ----------------------------------------------
    def model(self) -> nn.Module:
        """A fresh module of the run's architecture (placeholder weights), in eval mode."""
        module = self.build()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the model factory returned {type(module).__name__}, not an "
                              "nn.Module")
        return module.eval()

    def token_loss(self, module: nn.Module) -> ModuleTokenLoss:
        """The seam on ``module`` (already in the analysis dtype and device)."""
        if self.hf:
            from polca.models.hf import HFTokenLoss

            return HFTokenLoss(module, include=self.include)
        return ModuleTokenLoss(module, include=self.include,
                               loss_fn=self.loss_fn or next_token_losses)

    def check(self, loss: ModuleTokenLoss) -> None:
        """Read every checkpoint once (safely, finite, fitting the model) and score two probe
        sequences at the last one, so a bad run stops before anything is written."""
        if len(self.series.steps) < 2:
            raise CheckpointSeriesError(
                f"the series has {len(self.series.steps)} checkpoint(s) (steps "
                f"{self.series.steps}); POLCA decomposes the loss change between checkpoints "
                "and needs at least 2")
        for step in self.series.steps:
            check_state_matches(loss, self.series.load(step))
        theta = loss.space.flatten(self.series.load(self.series.steps[-1])).to(
            next(iter(loss.module.parameters())))
        chunk = self._probe[:2].to(theta.device)
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
            raise CheckpointSeriesError(f"the last checkpoint (step {self.series.steps[-1]}) "
                                        "gives non-finite probe losses")

    # -- Task protocol -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> ProbeBatch:
        raise ConfigError("an external run is analysed, not trained: its checkpoints come from "
                          "task.options; skip the train stage")

    def probe_set(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.sequences.copy(), self.tokens.copy()

    @cached_property
    def _probe(self) -> ProbeBatch:
        return probe_batch(self.sequences, self.tokens)

    def basis_sample(self, n: int) -> ProbeBatch:
        """``n`` sequences of ``basis_sample`` (seeded; all of them if fewer), else the probe's."""
        pool = self.sample if self.sample is not None else self._probe
        if n >= len(pool):
            return pool
        rows = np.sort(np.random.default_rng([self.seed, 2]).choice(len(pool), n, replace=False))
        return pool[torch.as_tensor(rows)]

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


def load_tokenizer(tokenizer):
    """A tokenizer object from a ``tokenizer.json`` path (or a folder holding one); objects
    (``tokenizers.Tokenizer``, transformers tokenizers) pass through."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} does not exist; give the model's "
                          "tokenizer.json")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise ConfigError(f"{path} is not a tokenizers tokenizer.json ({err})") from None


def _default_tokenizer(paths: Sequence[Path]) -> Path | None:
    return next((p / "tokenizer.json" for p in paths if (p / "tokenizer.json").is_file()), None)


def _tokenizer_size(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "get_vocab_size"):
        return tokenizer.get_vocab_size()
    return len(tokenizer)
