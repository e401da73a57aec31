"""Bring your own run: checkpoint series of any PyTorch model, read safely and in step order.

A run made outside polca is a model factory (a function returning the ``nn.Module``) and a
series of state-dict files. This module reads and validates that series; it writes nothing.

* Files are read as safetensors, or (``.pt``/``.pth``/``.bin``) only through
  ``torch.load(weights_only=True)``: a pickle that would run code is refused with a clear
  error, never executed.
* Steps come from an explicit list, else from the file (safetensors metadata ``step``), else
  from a number in the file name (``step_1000.safetensors``, ``checkpoint-1000.pt``, ``1000.pt``).
* Every checkpoint must hold the same tensor names and shapes as the first.

:class:`StateSeries` reads lazily and has the reader side of :class:`polca.checkpoints.
CheckpointStore` (``steps``, ``load(step)``, ``len``, ``in``), so stages can take either.

Example:
    >>> series = state_series(["run/step_0.safetensors", "run/step_100.safetensors"])  # doctest: +SKIP
    >>> series.steps                                                                   # doctest: +SKIP
    [0, 100]
    >>> loss = module_token_loss(lambda: MyModel(), loss_fn=None)                      # doctest: +SKIP
    >>> theta = loss.space.flatten(series.load(100))                                   # doctest: +SKIP

The run source of such a series is :class:`polca.sources.StateDictSource`.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from polca.functional import ModuleTokenLoss, ProbeBatch, next_token_losses

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# a step number in a name: "step_1000", "checkpoint-1000", "global_step1000", "iter_1000",
# else the last number in the name ("1000.pt", "run-7-1000")
_NAMED_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter|iteration)[-_=]?(\d+)", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"(\d+)")


class CheckpointSeriesError(ValueError):
    """A checkpoint series cannot be read as one ordered run; the message names the fix."""


def step_from_name(name: str) -> int | None:
    """The training step written in a file or directory name, or ``None``.

    >>> step_from_name("checkpoint-1000"), step_from_name("step_000120.safetensors")
    (1000, 120)
    >>> step_from_name("final") is None
    True
    """
    stem = Path(name).name
    for suffix in (".safetensors", *PICKLE_SUFFIXES):
        stem = stem.removesuffix(suffix)
    named = _NAMED_STEP.findall(stem)
    if named:
        return int(named[-1])
    numbers = _ANY_NUMBER.findall(stem)
    return int(numbers[-1]) if numbers else None


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of one state-dict file: safetensors, or a weights-only ``torch.load``.

    A ``.pt``/``.bin`` file whose pickle holds anything but tensors and plain containers
    (arbitrary classes, code) is refused with :class:`CheckpointSeriesError`; nothing in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointSeriesError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = handle.keys()
                return {k: handle.get_tensor(k) for k in names}
        except (SafetensorError, OSError) as err:
            raise CheckpointSeriesError(
                f"{path} is not a readable safetensors file ({err}); re-save it with "
                "safetensors.torch.save_file(state_dict, path)"
            ) from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointSeriesError(
            f"{path}: unknown checkpoint format {path.suffix!r}; give .safetensors (preferred) "
            f"or a weights-only PyTorch file ({', '.join(PICKLE_SUFFIXES)})"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointSeriesError(
            f"{path} is not a weights-only PyTorch file and was NOT loaded: unpickling it could "
            f"run arbitrary code ({first_line}). If you trust it, convert it yourself once: "
            "safetensors.torch.save_file(torch.load(path, weights_only=False), "
            "'model.safetensors'), and give the .safetensors file"
        ) from None
    return _state_dict_of(loaded, path)


def _state_dict_of(loaded, path: Path) -> dict[str, torch.Tensor]:
    # training scripts often save {"model": state_dict, "optimizer": ..., "step": ...}
    if isinstance(loaded, Mapping) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return dict(inner)
        raise CheckpointSeriesError(
            f"{path} holds a {type(loaded).__name__} with non-tensor entries "
            f"{[k for k, v in loaded.items() if not isinstance(v, torch.Tensor)][:5]} and no "
            "'model'/'state_dict' entry; save model.state_dict() itself"
        )
    if not isinstance(loaded, Mapping):
        raise CheckpointSeriesError(
            f"{path} holds a {type(loaded).__name__}, not a state dict; save model.state_dict()"
        )
    return dict(loaded)


def _step_in_metadata(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            step = (handle.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        return None  # read_state_file reports the unreadable file when it is loaded
    return int(step) if step is not None and str(step).isdigit() else None


def order_by_step(
    items: Sequence[str | os.PathLike],
    steps: Sequence[int] | None = None,
    step_of: Callable[[Path], int | None] = lambda p: None,
) -> list[tuple[int, Path]]:
    """``[(step, path)]`` sorted by step: ``steps`` if given, else ``step_of(path)``, else the
    number in the name. A path without a step, or two paths with one step, is an error."""
    paths = [Path(p) for p in items]
    if not paths:
        raise CheckpointSeriesError("the checkpoint series is empty: give at least one file")
    if steps is not None:
        if len(steps) != len(paths):
            raise CheckpointSeriesError(
                f"{len(steps)} steps given for {len(paths)} checkpoints; give one step each"
            )
        found = [int(s) for s in steps]
    else:
        found = []
        for p in paths:
            step = step_of(p)
            step = step if step is not None else step_from_name(p.name)
            if step is None:
                raise CheckpointSeriesError(
                    f"no training step for {p}: put it in the name (e.g. step_1000), or pass "
                    "steps=[...] in the order of the files"
                )
            found.append(step)
    by_step: dict[int, Path] = {}
    for step, p in zip(found, paths):
        if step < 0:
            raise CheckpointSeriesError(f"{p}: training step {step} is negative")
        if step in by_step:
            raise CheckpointSeriesError(
                f"{by_step[step]} and {p} both claim step {step}; remove one or pass steps=[...]"
            )
        by_step[step] = p
    return sorted(by_step.items())


class StateSeries:
    """An ordered, lazily read series of state dicts (the reader side of ``CheckpointStore``).

    Args:
        entries: ``[(step, path)]`` in step order.
        reader: ``path -> state dict``.
    """

    def __init__(self, entries: Sequence[tuple[int, Path]],
                 reader: Callable[[Path], dict[str, torch.Tensor]] = read_state_file):
        self._entries = list(entries)
        self._paths = dict(self._entries)
        self.reader = reader

    @property
    def steps(self) -> list[int]:
        return [s for s, _ in self._entries]

    @property
    def paths(self) -> list[Path]:
        return [p for _, p in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, step: int) -> bool:
        return step in self._paths

    def load(self, step: int) -> dict[str, torch.Tensor]:
        """State dict of the checkpoint at ``step``; non-finite values are an error."""
        if step not in self._paths:
            raise CheckpointSeriesError(f"no checkpoint for step {step}; steps are {self.steps}")
        path = self._paths[step]
        state = self.reader(path)
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointSeriesError(f"checkpoint {path} (step {step}) holds NaN or inf in "
                                        f"{bad[:5]}")
        return state

    def items(self) -> Iterable[tuple[int, dict[str, torch.Tensor]]]:
        for step in self.steps:
            yield step, self.load(step)

    def check_consistent(self) -> None:
        """Every checkpoint has the first one's tensor names and shapes (reads all files)."""
        reference, first = None, None
        for step, path in self._entries:
            shapes = {k: tuple(v.shape) for k, v in self.reader(path).items()}
            if reference is None:
                reference, first = shapes, path
                continue
            differ = _shape_difference(reference, shapes)
            if differ:
                raise CheckpointSeriesError(
                    f"{path} (step {step}) does not match {first}: {differ}; all checkpoints of "
                    "a run must come from one architecture"
                )


def _shape_difference(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> str | None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return f"tensors only in the first: {only_a[:5]}, only in this one: {only_b[:5]}"
    shapes = [f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]
    return f"shapes differ ({'; '.join(shapes[:5])})" if shapes else None


def expand_files(pattern: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a glob pattern, or of a directory (its safetensors/PyTorch files)."""
    return _expand(pattern, lambda p: p.is_file() and p.suffix in (".safetensors",
                                                                  *PICKLE_SUFFIXES))


def expand_dirs(source: str | os.PathLike | Sequence[str | os.PathLike],
                marker: str) -> list[Path]:
    """Checkpoint directories (those holding a file ``marker``) of a list, a glob pattern, a
    checkpoint directory, or a folder of them (e.g. a Trainer ``output_dir``)."""
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    if (Path(source) / marker).is_file():
        return [Path(source)]
    return _expand(source, lambda p: (p / marker).is_file())


def _expand(pattern: str | os.PathLike, accept: Callable[[Path], bool]) -> list[Path]:
    if Path(pattern).is_dir():
        found = [p for p in Path(pattern).iterdir() if accept(p)]
    else:
        found = [Path(p) for p in glob.glob(str(pattern)) if accept(Path(p))]
    if not found:
        raise CheckpointSeriesError(f"no checkpoint matches {str(pattern)!r}")
    return sorted(found)


def state_series(files: Sequence[str | os.PathLike] | str,
                 steps: Sequence[int] | None = None, check: bool = True) -> StateSeries:
    """A :class:`StateSeries` of state-dict files (a list, or a glob pattern string).

    Steps: ``steps`` if given, else safetensors metadata ``step``, else the number in the name.
    With ``check`` every file is read once to verify names and shapes agree.
    """
    if isinstance(files, (str, os.PathLike)):
        files = expand_files(files)
    series = StateSeries(order_by_step(files, steps, step_of=_step_in_metadata))
    if check:
        series.check_consistent()
    return series


def module_token_loss(
    factory: Callable[[], nn.Module] | nn.Module,
    loss_fn: Callable[[torch.Tensor, ProbeBatch], torch.Tensor] | None = None,
    include: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    reference_state: Mapping[str, torch.Tensor] | None = None,
) -> ModuleTokenLoss:
    """The seam for a user model: ``factory()`` (or a module) wrapped as a :class:`TokenLoss`.

    The module must map ``input_ids [batch, seq]`` to logits ``[batch, seq, vocab]``; give
    ``loss_fn(logits, batch) -> [tokens]`` for any other per-token loss. With
    ``reference_state`` (a checkpoint), its tensor names and shapes are checked against the
    model's parameters, so a factory that builds the wrong architecture stops here.
    """
    module = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"the model factory returned {type(module).__name__}, not an nn.Module")
    module = module.to(dtype).eval()
    loss = ModuleTokenLoss(module, include=include, loss_fn=loss_fn or next_token_losses)
    if reference_state is not None:
        check_state_matches(loss, reference_state)
    return loss


def check_state_matches(loss: ModuleTokenLoss, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointSeriesError` unless ``state`` has every parameter of the seam's
    model, each with the model's shape."""
    missing = [n for n in loss.space.names if n not in state]
    wrong = [f"{n}: checkpoint {tuple(state[n].shape)}, model {tuple(s)}"
             for n, s in zip(loss.space.names, loss.space.shapes)
             if n in state and tuple(state[n].shape) != tuple(s)]
    if missing or wrong:
        raise CheckpointSeriesError(
            "the checkpoints do not fit the model the factory builds: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"shape mismatch {wrong[:5]} " if wrong else "")
            + f"(checkpoint has {list(state)[:5]}…). Build the model of the run that saved them."
        )

