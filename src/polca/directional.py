"""Directional derivatives of every scored token's loss: ⟨v, ∇ℓ_x(θ)⟩ and vᵀ∇²ℓ_x(θ)v.

Two engines compute the same numbers along different computational paths:

* ``forward``: ``torch.func.jvp`` over all tokens of a chunk at once, one direction at a time
  (a Python loop over directions is faster than ``vmap`` over them on CPU). Second order by
  jvp-of-jvp: one nested jvp gives both the first and the second directional derivative.
  Cost ∝ directions; memory O(tokens × directions).
* ``reverse``: per-sample gradients (``vmap`` over sequences of ``jacrev`` of that sequence's
  token losses) projected onto all directions at once; second order by forward-over-reverse
  (jvp of the per-token gradients along v). Cost of first order is independent of the number
  of directions, so it wins when directions are many and scored tokens per sequence few.
  Per-sample gradients ``[sequences, scored, d]`` exist only for a chunk small enough for
  ``memory_budget`` bytes.

``engine="auto"`` picks by :func:`choose_engine`, a cost model measured on CPU (see
``benchmarks/bench_decompose.py``): forward mode unless directions are many per scored token
(first order, m ≳ 6 k for k scored tokens per sequence). Results are float64.

Directions are either a dense matrix ``[m, d]`` or a 1-D integer tensor of ``m`` coordinate
indices, meaning the axis-aligned unit vectors e_i (LCA over single parameters) without ever
materialising an ``[m, d]`` one-hot matrix.

Example:
    >>> from polca.models.decoder import Decoder, DecoderConfig
    >>> from polca.functional import ModuleTokenLoss, ProbeBatch
    >>> model = Decoder(DecoderConfig(vocab_size=12, context_length=12, d_model=8, n_heads=2))
    >>> loss = ModuleTokenLoss(model.double())
    >>> theta = loss.space.flatten(dict(model.named_parameters())).detach()
    >>> ids = torch.randint(0, 12, (3, 12))
    >>> scored = torch.zeros(3, 12, dtype=torch.bool); scored[:, -4:] = True
    >>> batch = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)
    >>> V = torch.linalg.qr(torch.randn(loss.space.dim, 2, dtype=torch.float64))[0].T
    >>> first, second = directional_derivatives(loss, theta, V, batch, order=2)
    >>> first.shape, second.shape                               # [m, tokens]
    (torch.Size([2, 12]), torch.Size([2, 12]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.func import jacrev, jvp, vmap

from polca.functional import ProbeBatch, TokenLoss

Engine = Literal["auto", "forward", "reverse"]

# Cost model per probe sequence, in units of one forward-mode jvp over that sequence (measured
# with benchmarks/bench_decompose.py on 2 idle CPU cores, torch 2.13; docs/benchmarks.md):
# forward mode costs FORWARD_COST[order] per direction (jvp-of-jvp: 2.4–3.6 jvps); reverse mode
# costs REVERSE_GRADIENT_COST per scored token for the per-sample gradients (measured 4.9 on
# the demo shape, 7.6 on the paper's) plus REVERSE_HVP_COST per scored token and direction for
# second order (measured 10–11). So reverse mode wins only for first order with more than about
# 6 directions per scored token (addition, k = 4: m > 24, e.g. the 50-parameter LCA baseline).
FORWARD_COST = {1: 1.0, 2: 3.0}
REVERSE_GRADIENT_COST = 6.0
REVERSE_HVP_COST = 10.0


def choose_engine(n_directions: int, tokens_per_sequence: float, order: int) -> str:
    """The engine with the lower modelled cost: ``"forward"`` or ``"reverse"``.

    >>> choose_engine(8, 4, order=2), choose_engine(50, 4, order=1)
    ('forward', 'reverse')
    """
    forward = n_directions * FORWARD_COST[order]
    reverse = tokens_per_sequence * REVERSE_GRADIENT_COST
    if order == 2:
        reverse += tokens_per_sequence * REVERSE_HVP_COST * n_directions
    return "forward" if forward <= reverse else "reverse"


def directional_derivatives(
    loss: TokenLoss,
    theta: torch.Tensor,
    directions: torch.Tensor,
    batch: ProbeBatch,
    order: int = 2,
    engine: Engine = "auto",
    batch_size: int = 256,
    memory_budget: int = 2**28,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First (and second) directional derivatives of each scored token's loss.

    Args:
        loss: the token-loss function (the seam).
        theta: ``[d]`` parameters; derivatives are taken in its dtype.
        directions: ``[m, d]`` dense directions, or ``[m]`` integer coordinate indices
            (the unit vectors e_i).
        batch: probe sequences; tokens come out in the row-major order of ``batch.scored``.
        order: 1 (first only) or 2 (first and second).
        engine: ``"forward"``, ``"reverse"`` or ``"auto"`` (cost model).
        batch_size: sequences per forward-mode chunk (and an upper bound for reverse mode).
        memory_budget: bytes allowed for one chunk's per-sample gradients (reverse mode).

    Returns:
        ``first [m, tokens]`` float64 with ⟨v, ∇ℓ_x(θ)⟩ and ``second [m, tokens]`` float64 with
        vᵀ∇²ℓ_x(θ)v (``None`` when ``order == 1``).
    """
    _check_inputs(loss, theta, directions, order, engine, batch_size)
    if engine == "auto":
        per_sequence = batch.n_tokens / max(len(batch), 1)
        engine = choose_engine(len(directions), per_sequence, order)
    if not directions.dtype.is_floating_point:
        tangents = _coordinate_tangents(directions, theta)
    else:
        tangents = directions.to(device=theta.device, dtype=theta.dtype)
    run = _forward_chunk if engine == "forward" else _reverse_chunk
    firsts, seconds = [], []
    for chunk in _chunks(batch, engine, batch_size, memory_budget, theta):
        first, second = run(loss, theta.detach(), tangents, chunk, order)
        firsts.append(first)
        seconds.append(second)
    first = torch.cat(firsts, dim=1) if firsts else theta.new_zeros(len(directions), 0)
    first = first.to(torch.float64)
    second = torch.cat(seconds, dim=1).to(torch.float64) if order == 2 and seconds else (
        first.new_zeros(first.shape) if order == 2 else None)
    _check_finite(first, "first directional derivatives")
    if second is not None:
        _check_finite(second, "second directional derivatives")
    return first, second


def mean_loss_gradient(
    loss: TokenLoss, theta: torch.Tensor, batch: ProbeBatch, batch_size: int = 256
) -> torch.Tensor:
    """``[d]`` float64 gradient of the mean token loss over ``batch`` (reverse mode, chunked).

    >>> # g = mean_loss_gradient(loss, theta, batch)   # ∇ (1/N) Σ_x ℓ_x(θ)
    """
    n = batch.n_tokens
    if n == 0:
        raise ValueError("the probe batch has no scored tokens")
    total = torch.zeros(theta.shape, dtype=torch.float64, device=theta.device)
    for chunk in batch.split(batch_size):
        if chunk.n_tokens == 0:
            continue
        point = theta.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(point, chunk).sum(), point)
        total += gradient.to(torch.float64)
    _check_finite(total, "mean-loss gradient")
    return total / n


# forward mode ---------------------------------------------------------------------------------
def _forward_chunk(loss, theta, tangents, chunk: ProbeBatch, order: int):
    def token_losses(point):
        return loss(point, chunk)

    firsts, seconds = [], []
    for tangent in tangents:
        if order == 1:
            _, first = jvp(token_losses, (theta,), (tangent,))
            firsts.append(first)
            continue

        def along(point, tangent=tangent):
            return jvp(token_losses, (point,), (tangent,))

        # jvp of (ℓ, ⟨v,∇ℓ⟩) along v gives (⟨v,∇ℓ⟩, vᵀ∇²ℓ v): both orders from one nested call
        _, (first, second) = jvp(along, (theta,), (tangent,))
        firsts.append(first)
        seconds.append(second)
    return torch.stack(firsts), (torch.stack(seconds) if order == 2 else None)


# reverse mode ---------------------------------------------------------------------------------
def _reverse_chunk(loss, theta, tangents, chunk: ProbeBatch, order: int):
    m = len(tangents)
    counts = chunk.scored.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    first = theta.new_zeros(m, int(counts.sum()))
    second = theta.new_zeros(m, int(counts.sum())) if order == 2 else None
    # vmap needs one scored pattern per call; sequences sharing it are batched together
    patterns, group = torch.unique(chunk.scored, dim=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        k = int(pattern.sum())
        if k == 0:
            continue
        rows = torch.nonzero(group == index)[:, 0]
        columns = (offsets[rows, None] + torch.arange(k, device=rows.device)).reshape(-1)
        gradients_of = _per_token_gradients(loss, chunk[rows], pattern)
        if order == 1:
            gradients = gradients_of(theta)  # [n, k, d]
            first[:, columns] = _project(gradients, tangents).reshape(-1, m).T
            continue
        for i, tangent in enumerate(tangents):
            gradients, hvp = jvp(gradients_of, (theta,), (tangent,))  # [n, k, d] each
            if i == 0:
                first[:, columns] = _project(gradients, tangents).reshape(-1, m).T
            second[i, columns] = (hvp.reshape(-1, hvp.shape[-1]) @ tangent)
    return first, second


def _per_token_gradients(loss, rows: ProbeBatch, pattern: torch.Tensor) -> Callable:
    """θ -> ``[sequences, scored, d]`` gradients of each scored token's loss."""
    mask = pattern[None]

    def sequence_losses(point, input_ids, targets):
        return loss(point, ProbeBatch(input_ids[None], targets[None], mask))

    per_sequence = vmap(jacrev(sequence_losses), in_dims=(None, 0, 0))

    def gradients(point):
        try:
            return per_sequence(point, rows.input_ids, rows.targets)
        except RuntimeError as err:
            raise RuntimeError(
                f"reverse-mode per-sample gradients failed ({err}); this token loss may not "
                "support torch.func.vmap over sequences: use engine='forward'"
            ) from err

    return gradients


def _project(gradients: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[n, k, d]`` gradients -> ``[n, k, m]`` projections onto the directions."""
    if isinstance(tangents, _OneHotRows):
        return gradients[..., tangents.indices]
    return gradients @ tangents.T


# helpers --------------------------------------------------------------------------------------
def _coordinate_tangents(indices: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One-hot tangents for coordinate indices; a sparse-friendly [m, d] built row by row."""
    if indices.dim() != 1:
        raise ValueError(f"coordinate directions must be a 1-D index tensor, got {tuple(indices.shape)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= theta.numel()):
        raise ValueError(f"coordinate index out of range [0, {theta.numel()})")
    return _OneHotRows(indices, theta)


class _OneHotRows:
    """Rows e_i of the identity for the given indices, materialised one at a time, so an
    ``[m, d]`` one-hot matrix is never allocated (forward mode iterates over them; reverse
    mode selects gradient columns in :func:`_project`)."""

    def __init__(self, indices: torch.Tensor, theta: torch.Tensor):
        self.indices = indices.to(theta.device)
        self.theta = theta

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices.tolist():
            row = torch.zeros_like(self.theta)
            row[i] = 1.0
            yield row


def _chunks(batch: ProbeBatch, engine: str, batch_size: int, memory_budget: int, theta):
    if engine == "reverse" and len(batch):
        per_sequence = int(batch.scored.sum(1).max()) * theta.numel() * theta.element_size()
        # gradients and their tangents (second order) plus jacrev's workspace: about 3 copies
        batch_size = max(1, min(batch_size, memory_budget // max(3 * per_sequence, 1)))
    return batch.split(batch_size)


def _check_inputs(loss, theta, directions, order, engine, batch_size) -> None:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if engine not in ("auto", "forward", "reverse"):
        raise ValueError(f"engine must be 'auto', 'forward' or 'reverse', got {engine!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    d = loss.space.dim
    if theta.shape != (d,):
        raise ValueError(f"θ has shape {tuple(theta.shape)} but the token loss has {d} parameters")
    if directions.dtype.is_floating_point and (directions.dim() != 2 or directions.shape[1] != d):
        raise ValueError(
            f"directions have shape {tuple(directions.shape)}, expected [m, {d}] "
            "(a basis of this model's parameter space)"
        )
    _check_finite(theta, "θ")
    if directions.dtype.is_floating_point:
        _check_finite(directions, "directions")


def _check_finite(values: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"{what} contain {int(bad.sum())} non-finite values (NaN or inf) of {values.numel()}; "
            "check the checkpoint and the token losses (a diverged run or a bad probe token)"
        )
