"""The one seam: a function from a flat parameter vector and a probe batch to per-token losses.

Everything downstream of training (directional derivatives, curvature, POLCA, measures) sees a
model only through :class:`TokenLoss`. The built-in decoder, Hugging Face models and any user
``nn.Module`` plug in through :class:`ModuleTokenLoss` (or their own implementation of the
protocol). Parameter flattening (dict <-> flat vector, which tensors are included) lives here
and nowhere else.

Example:
    >>> from polca.models.decoder import Decoder, DecoderConfig
    >>> model = Decoder(DecoderConfig(vocab_size=14, context_length=12, d_model=16, n_heads=2))
    >>> loss = ModuleTokenLoss(model)
    >>> theta = loss.space.flatten(model.state_dict())            # [d]
    >>> ids = torch.randint(0, 14, (5, 12))
    >>> batch = ProbeBatch(ids, torch.roll(ids, -1, 1), torch.zeros(5, 12, dtype=torch.bool))
    >>> batch.scored[:, -4:] = True
    >>> loss(theta, batch).shape                                  # [tokens] = 5 * 4
    torch.Size([20])
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class ProbeBatch:
    """Probe sequences with the positions whose next-token loss is scored.

    ``input_ids [batch, seq]``, ``targets [batch, seq]`` (the token predicted at each position),
    ``scored [batch, seq]`` (bool). Token losses come out in row-major order of ``scored``.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor

    def __post_init__(self) -> None:
        if not (self.input_ids.shape == self.targets.shape == self.scored.shape):
            raise ValueError(
                "ProbeBatch tensors must share one shape [batch, seq]; got "
                f"{tuple(self.input_ids.shape)}, {tuple(self.targets.shape)}, "
                f"{tuple(self.scored.shape)}"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.scored.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> ProbeBatch:
        return ProbeBatch(self.input_ids[rows], self.targets[rows], self.scored[rows])

    def to(self, device: torch.device | str) -> ProbeBatch:
        return ProbeBatch(*(t.to(device) for t in (self.input_ids, self.targets, self.scored)))

    @classmethod
    def from_tables(cls, sequences, tokens) -> ProbeBatch:
        """The padded batch of probe tables: ``sequences`` (sequence, input_ids) and
        ``tokens`` (sequence, position, target; rows ordered by sequence, then position).

        >>> import pandas as pd
        >>> sequences = pd.DataFrame({"sequence": [7], "input_ids": [[3, 1, 4]]})
        >>> tokens = pd.DataFrame({"sequence": [7, 7], "position": [0, 1], "target": [1, 4]})
        >>> ProbeBatch.from_tables(sequences, tokens).scored.tolist()
        [[True, True, False]]
        """
        rows = {s: i for i, s in enumerate(sequences["sequence"].tolist())}
        width = max(len(ids) for ids in sequences["input_ids"])
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, ids in enumerate(sequences["input_ids"]):
            input_ids[i, : len(ids)] = torch.as_tensor([int(t) for t in ids], dtype=torch.long)
        targets = torch.zeros_like(input_ids)
        scored = torch.zeros_like(input_ids, dtype=torch.bool)
        r = torch.as_tensor(tokens["sequence"].map(rows).to_numpy().astype("int64"))
        p = torch.as_tensor(tokens["position"].to_numpy().astype("int64"))
        order = r * width + p
        if bool((order[1:] <= order[:-1]).any()):
            raise ValueError("probe token rows must be ordered by sequence, then position")
        targets[r, p] = torch.as_tensor(tokens["target"].to_numpy().astype("int64"))
        scored[r, p] = True
        return cls(input_ids, targets, scored)

    def split(self, batch_size: int) -> Iterator[ProbeBatch]:
        """Consecutive row chunks; their token losses concatenate to this batch's."""
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]


class ParameterSpace:
    """Which parameter tensors form θ, and the map between a parameter dict and a flat vector.

    Args:
        shapes: name -> shape of every parameter of the model, in a fixed order.
        include: glob patterns of the names that form θ (default: all).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], include: Sequence[str] | None = None):
        self.all_shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        patterns = list(include) if include else ["*"]
        self.names = [n for n in self.all_shapes if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not self.names:
            raise ValueError(
                f"no parameter matches include={patterns}; available: {list(self.all_shapes)[:8]}…"
            )
        self.shapes = [self.all_shapes[n] for n in self.names]
        self.sizes = [s.numel() for s in self.shapes]
        self.dim = sum(self.sizes)
        offsets = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        self.slices = {n: slice(a, b) for n, a, b in zip(self.names, offsets[:-1], offsets[1:])}

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[d]`` vector of the included tensors of ``params`` (a state dict or parameter dict)."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"parameters missing from the state dict: {missing[:5]}")
        for n, shape in zip(self.names, self.shapes):
            if params[n].shape != shape:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(params[n].shape)}, expected {tuple(shape)}"
                )
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta [d]`` shaped as the included parameters (differentiable)."""
        if theta.shape != (self.dim,):
            raise ValueError(f"θ has shape {tuple(theta.shape)}, this space has dimension {self.dim}")
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def tensor_of(self, index: int) -> str:
        """Name of the parameter tensor that holds flat coordinate ``index``."""
        for name, sl in self.slices.items():
            if sl.start <= index < sl.stop:
                return name
        raise IndexError(index)


@runtime_checkable
class TokenLoss(Protocol):
    """The seam, and all that stages may call on a model: ``loss(theta [d], batch) ->
    [tokens]``, the loss of every scored token, and the argmax prediction at each scored
    token. ``space`` maps parameter dicts to ``theta``. Parameters outside ``theta`` are fixed
    by whoever builds the loss (a run source sets them from the first checkpoint)."""

    space: ParameterSpace

    def __call__(self, theta: torch.Tensor, batch: ProbeBatch) -> torch.Tensor: ...

    def losses_and_predictions(self, theta: torch.Tensor, batch: ProbeBatch
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([tokens] losses, [tokens] argmax predicted token ids)`` in one forward pass."""
        ...


def next_token_losses(logits: torch.Tensor, batch: ProbeBatch) -> torch.Tensor:
    """Cross-entropy ``[tokens]`` of ``logits [batch, seq, vocab]`` at the scored positions."""
    selected = logits[batch.scored]
    return -torch.log_softmax(selected, dim=-1).gather(-1, batch.targets[batch.scored, None])[:, 0]


class ModuleTokenLoss:
    """Any ``nn.Module`` mapping ``input_ids [batch, seq]`` to logits, as a :class:`TokenLoss`.

    Parameters outside ``include`` stay fixed at the values of ``fixed`` (default: the module's
    own). ``loss_fn(logits, batch) -> [tokens]`` defaults to next-token cross-entropy.
    """

    def __init__(
        self,
        module: nn.Module,
        include: Sequence[str] | None = None,
        loss_fn: Callable[[torch.Tensor, ProbeBatch], torch.Tensor] = next_token_losses,
    ):
        self.module = module
        self.space = ParameterSpace(
            {n: p.shape for n, p in module.named_parameters()}, include=include
        )
        self.loss_fn = loss_fn
        self.fixed = {
            n: p.detach() for n, p in module.named_parameters() if n not in self.space.slices
        }
        self.buffers = dict(module.named_buffers())

    def set_fixed(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the values of the excluded parameters from a checkpoint's state dict."""
        for name in self.fixed:
            self.fixed[name] = state[name].to(self.fixed[name])

    def logits(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        params = {**self.fixed, **self.space.unflatten(theta), **self.buffers}
        return functional_call(self.module, params, (input_ids,))

    def __call__(self, theta: torch.Tensor, batch: ProbeBatch) -> torch.Tensor:
        return self.loss_fn(self.logits(theta, batch.input_ids), batch)

    def losses_and_predictions(self, theta: torch.Tensor, batch: ProbeBatch
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(theta, batch.input_ids)
        return self.loss_fn(logits, batch), logits[batch.scored].argmax(-1)


@torch.no_grad()
def token_losses(loss: TokenLoss, theta: torch.Tensor, batch: ProbeBatch, batch_size: int = 512):
    """``[tokens]`` losses of the whole probe set, evaluated ``batch_size`` sequences at a time."""
    return torch.cat([loss(theta, chunk) for chunk in batch.split(batch_size)])
