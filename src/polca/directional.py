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

from polca import jet
from polca.functional import ProbeBatch, TokenLoss

Engine = Literal["auto", "jet", "forward", "reverse"]

# Cost model per probe sequence, in units of one forward pass over that sequence (the constants
# are measured by benchmarks/bench_decompose.py; docs/benchmarks.md has the run):
# * jet: JET_COST[order] = (a, b) costs a + b·m for m directions;
# * forward: FORWARD_COST[order] per direction (one jvp, or one jvp-of-jvp);
# * reverse: REVERSE_GRADIENT_COST per scored token for the per-sample gradients, plus
#   REVERSE_HVP_COST per scored token and direction for the second order.
JET_COST = {1: (1.0, 1.5), 2: (1.0, 2.5)}
FORWARD_COST = {1: 3.0, 2: 10.0}
REVERSE_GRADIENT_COST = 15.0
REVERSE_HVP_COST = 30.0
# Jet chunks (see jet_chunks): the widest activation's jet near this many bytes, and at least
# this many positions per chunk; measured as the fastest setting on both benchmark shapes.
JET_CHUNK_BYTES = 2**20
JET_MIN_ROWS = 128
# activations of the widest size alive at once in a jet (for the memory budget)
_LIVE_ACTIVATIONS = 6


def engine_costs(n_directions: int, tokens_per_sequence: float, order: int,
                 jet: bool = False) -> dict[str, float]:
    """Modelled cost per probe sequence of every applicable engine, in forward passes.

    >>> engine_costs(10, 4, order=2, jet=True)  # doctest: +SKIP
    """
    m, k = n_directions, tokens_per_sequence
    costs = {"reverse": k * REVERSE_GRADIENT_COST + (k * REVERSE_HVP_COST * m if order == 2 else 0)}
    if jet:
        fixed, per_direction = JET_COST[order]
        costs["jet"] = fixed + per_direction * m
    else:
        costs["forward"] = FORWARD_COST[order] * m
    return costs


def choose_engine(n_directions: int, tokens_per_sequence: float, order: int,
                  jet: bool = False) -> str:
    """The engine with the lowest modelled cost (:func:`engine_costs`); ``jet`` says whether
    the token loss is the built-in decoder (:func:`polca.jet.supports`).

    >>> choose_engine(10, 4, order=2, jet=True), choose_engine(10, 4, order=2)
    ('jet', 'forward')
    >>> choose_engine(50, 4, order=1)
    'reverse'
    """
    costs = engine_costs(n_directions, tokens_per_sequence, order, jet)
    return min(costs, key=costs.get)


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
        engine: ``"jet"`` (built-in decoder only), ``"forward"``, ``"reverse"`` or ``"auto"``
            (the cheapest by the cost model of :func:`choose_engine`).
        batch_size: the most sequences in one chunk (the jet picks fewer when that is faster).
        memory_budget: bytes allowed for one chunk's per-sample gradients (reverse mode) or
            one chunk's jet (jet).

    Returns:
        ``first [m, tokens]`` float64 with ⟨v, ∇ℓ_x(θ)⟩ and ``second [m, tokens]`` float64 with
        vᵀ∇²ℓ_x(θ)v (``None`` when ``order == 1``).
    """
    _check_inputs(loss, theta, directions, order, engine, batch_size)
    has_jet = jet.supports(loss)
    if engine == "jet" and not has_jet:
        raise ValueError(
            f"engine='jet' needs the built-in Decoder with next-token cross-entropy "
            f"(ModuleTokenLoss(Decoder)); this loss is {type(loss).__name__}: use engine='auto'")
    automatic = engine == "auto"
    if automatic:
        per_sequence = batch.n_tokens / max(len(batch), 1)
        engine = choose_engine(len(directions), per_sequence, order, jet=has_jet)
    if not directions.dtype.is_floating_point:
        tangents = _coordinate_tangents(directions, theta)
    else:
        tangents = directions.to(device=theta.device, dtype=theta.dtype)
    args = (loss, theta.detach(), tangents, batch, order, batch_size, memory_budget)
    try:
        first, second = _ENGINES[engine](*args)
    except _VmapUnsupported:
        if not automatic:
            raise
        # a model whose forward pass cannot be vmapped over sequences (e.g. Hugging Face's
        # padding check on input ids): the generic forward engine needs no vmap
        first, second = _forward(*args)
    first = first.to(torch.float64)
    _check_finite(first, "first directional derivatives")
    if second is not None:
        second = second.to(torch.float64)
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


# jet (built-in decoder) ------------------------------------------------------------------------
def _jet(loss, theta, tangents, batch: ProbeBatch, order: int, batch_size: int,
         memory_budget: int):
    """Both orders for all directions by :func:`polca.jet.token_loss_jet`, chunked over
    sequences (and, when m is large, directions) by :func:`jet_chunks`."""
    m = len(tangents)
    first = theta.new_zeros(m, batch.n_tokens)
    second = theta.new_zeros(m, batch.n_tokens) if order == 2 else None
    sequences, directions = jet_chunks(loss.module.cfg, batch, m, order, theta,
                                       batch_size, memory_budget)
    column = 0
    for chunk in batch.split(sequences):
        columns = slice(column, column + chunk.n_tokens)
        column += chunk.n_tokens
        if chunk.n_tokens == 0:
            continue
        for start in range(0, m, directions):
            rows = slice(start, start + directions)
            out = jet.token_loss_jet(loss, theta, _dense_rows(tangents, rows), chunk, order)
            first[rows, columns] = out.first
            if second is not None:
                second[rows, columns] = out.second
    return first, second


def jet_chunks(cfg, batch: ProbeBatch, m: int, order: int, theta: torch.Tensor,
               batch_size: int = 256, memory_budget: int = 2**28) -> tuple[int, int]:
    """``(sequences, directions)`` per jet chunk.

    The jet's cost is arithmetic (dense products) and memory traffic over its widest
    activation, ``[1 + order·m, sequences, length, width]``. Chunks are as small as keeps that
    activation near :data:`JET_CHUNK_BYTES` (cache-resident), but with at least
    :data:`JET_MIN_ROWS` positions so the weight-tangent products stay efficient; directions are
    split only when one sequence's jet, or an ``[m, d]`` block of coordinate tangents, would
    exceed ``memory_budget``.

    >>> from polca.models.decoder import DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=12, context_length=12, d_model=64, n_heads=4, d_mlp=256)
    >>> ids = torch.zeros(1000, 12, dtype=torch.long)
    >>> batch = ProbeBatch(ids, ids, torch.ones(1000, 12, dtype=torch.bool))
    >>> jet_chunks(cfg, batch, m=10, order=2, theta=torch.zeros(1))  # doctest: +SKIP
    """
    used = batch.scored.any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    width = max(3 * cfg.d_model, cfg.mlp_width, cfg.n_heads * length)
    position = length * width * theta.element_size()  # one component at one sequence
    directions = m
    if position * _LIVE_ACTIVATIONS * (1 + order * m) > memory_budget:
        directions = max(1, (memory_budget // (position * _LIVE_ACTIVATIONS) - 1) // order)
    directions = min(directions, max(1, memory_budget // (theta.numel() * theta.element_size())))
    per_sequence = position * (1 + order * directions)
    sequences = max(JET_CHUNK_BYTES // per_sequence, -(-JET_MIN_ROWS // length), 1)
    sequences = min(sequences, batch_size,
                    max(1, memory_budget // (per_sequence * _LIVE_ACTIVATIONS)))
    return int(sequences), int(directions)


def _dense_rows(tangents, rows: slice) -> torch.Tensor:
    """``[m', d]`` dense tangents for a slice of directions (coordinate rows materialised)."""
    if isinstance(tangents, _OneHotRows):
        indices = tangents.indices[rows]
        dense = tangents.theta.new_zeros(len(indices), tangents.theta.numel())
        dense[torch.arange(len(indices)), indices] = 1.0
        return dense
    return tangents[rows].contiguous()


def _chunked(run):
    """A generic engine over the chunks of :func:`_chunks`: ``run`` maps one chunk to
    ``(first [m, tokens], second [m, tokens] | None)``."""
    engine = "forward" if run is _forward_chunk else "reverse"

    def over_chunks(loss, theta, tangents, batch, order, batch_size, memory_budget):
        firsts, seconds = [], []
        for chunk in _chunks(batch, engine, batch_size, memory_budget, theta):
            first, second = run(loss, theta, tangents, chunk, order)
            firsts.append(first)
            seconds.append(second)
        first = torch.cat(firsts, dim=1) if firsts else theta.new_zeros(len(tangents), 0)
        if order == 1:
            return first, None
        return first, (torch.cat(seconds, dim=1) if seconds else torch.zeros_like(first))

    return over_chunks


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
            raise _VmapUnsupported(
                f"reverse-mode per-sample gradients failed ({err}); this token loss may not "
                "support torch.func.vmap over sequences: use engine='forward'"
            ) from err

    return gradients


def _project(gradients: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[n, k, d]`` gradients -> ``[n, k, m]`` projections onto the directions."""
    if isinstance(tangents, _OneHotRows):
        return gradients[..., tangents.indices]
    return gradients @ tangents.T


_forward = _chunked(_forward_chunk)
_ENGINES = {"jet": _jet, "forward": _forward, "reverse": _chunked(_reverse_chunk)}


# helpers --------------------------------------------------------------------------------------
def _coordinate_tangents(indices: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One-hot tangents for coordinate indices; a sparse-friendly [m, d] built row by row."""
    if indices.dim() != 1:
        raise ValueError(f"coordinate directions must be a 1-D index tensor, got {tuple(indices.shape)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= theta.numel()):
        raise ValueError(f"coordinate index out of range [0, {theta.numel()})")
    return _OneHotRows(indices, theta)


class _VmapUnsupported(RuntimeError):
    """The token loss cannot be vmapped over sequences (reverse mode's per-sample gradients)."""


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
    if engine not in ("auto", "jet", "forward", "reverse"):
        raise ValueError(f"engine must be 'auto', 'jet', 'forward' or 'reverse', got {engine!r}")
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
