"""Directional derivatives of every scored token's loss: ⟨v, ∇ℓ_x(θ)⟩ and vᵀ∇²ℓ_x(θ)v.

Three engines compute the same numbers along different computational paths:

* ``jet`` (a module that offers one, :func:`jet_engine`: the built-in decoder): second-order
  Taylor-mode propagation of all m directions at once through the decoder's primitives
  (:mod:`polca.models.jet`); both orders cost about (1 + 4m) forward passes of arithmetic, the
  first alone (1 + 2m), in batched matrix products. Memory O(chunk × m), chunks sized by
  :func:`jet_chunks`.
* ``forward`` (any token loss): ``torch.func.jvp`` over all tokens of a chunk at once,
  ``vmap``-ped over a chunk of directions (a loop over them when the loss cannot be vmapped);
  second order by jvp-of-jvp, which gives both orders from one nested call (about 10 forward
  passes per direction). Memory O(chunk): chunks of at most :data:`FORWARD_CHUNK_DIRECTIONS`
  directions and about :data:`FORWARD_CHUNK_POSITIONS` positions × directions, never more
  sequences × directions than ``batch_size``.
* ``reverse`` (any token loss that ``vmap`` can batch over sequences): per-sample gradients
  (``vmap`` over sequences of ``jacrev`` of that sequence's token losses) projected onto all
  directions in one product; second order by forward-over-reverse. The first order's cost
  does not grow with the number of directions, so it wins for many directions (the
  50-parameter LCA baseline). Per-sample gradients ``[sequences, scored, d]`` exist only for a
  chunk small enough for ``memory_budget`` bytes.

``engine="auto"`` picks the cheapest by :func:`engine_costs`, a cost model whose constants are
measured by ``benchmarks/bench_decompose.py`` (docs/benchmarks.md): the jet for the built-in
decoder, forward mode for any other token loss, reverse mode for first order with many
directions per scored token. When reverse mode was picked and the model cannot be vmapped over
sequences, auto falls back to forward mode. Results are float64 whatever the engine.

Directions are either a dense matrix ``[m, d]`` or a 1-D integer tensor of ``m`` coordinate
indices, meaning the axis-aligned unit vectors e_i (LCA over single parameters), materialised
at most a chunk of rows at a time.

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

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch.func import jacrev, jvp, vmap

from polca.functional import ProbeBatch, TokenLoss

Engine = Literal["auto", "jet", "forward", "reverse"]

# Cost model per probe sequence, in units of one forward pass over that sequence, measured by
# `benchmarks/bench_decompose.py` (docs/benchmarks.md, "POLCA per interval", has the run):
# * jet: JET_COST[order] = (a, b) costs a + b·m for m directions (the fit's negative intercept
#   says the per-direction cost falls as chunks fill: 20 passes at m = 10, 123 at m = 50);
# * forward: FORWARD_COST[order] per direction (one jvp, or one jvp-of-jvp);
# * reverse: REVERSE_GRADIENT_COST per scored token for the per-sample gradients, plus
#   REVERSE_HVP_COST per scored token and direction for the second order (the paper shape's,
#   the larger: per-sample gradients are memory-bound and cost more per pass as d grows).
JET_COST = {1: (1.56, 1.01), 2: (-5.90, 2.58)}
FORWARD_COST = {1: 2.13, 2: 8.25}
REVERSE_GRADIENT_COST = 29.0
REVERSE_HVP_COST = 53.2
# Forward-mode chunks: at most this many directions per vmapped call, and sequences ×
# directions × positions near this many (the fastest settings measured with
# benchmarks/bench_decompose.py --hf; docs/benchmarks.md)
FORWARD_CHUNK_DIRECTIONS = 10
FORWARD_CHUNK_POSITIONS = 3072
# Jet chunks (see jet_chunks): the widest activation's jet near this many bytes, and at least
# this many positions per chunk; measured as the fastest setting on both benchmark shapes.
JET_CHUNK_BYTES = 2**20
JET_MIN_ROWS = 128
# activations of the widest size alive at once in a jet (for the memory budget)
_LIVE_ACTIVATIONS = 6


def engine_costs(n_directions: int, tokens_per_sequence: float, order: int,
                 jet: bool = False) -> dict[str, float]:
    """Modelled cost per probe sequence of every applicable engine, in forward passes.

    >>> {name: round(cost) for name, cost in engine_costs(10, 4, order=2, jet=True).items()}
    {'reverse': 2244, 'jet': 20}
    """
    m, k = n_directions, tokens_per_sequence
    costs = {"reverse": k * REVERSE_GRADIENT_COST + (k * REVERSE_HVP_COST * m if order == 2 else 0)}
    if jet:
        fixed, per_direction = JET_COST[order]
        costs["jet"] = max(1.0, fixed + per_direction * m)  # at least the forward pass
    else:
        costs["forward"] = FORWARD_COST[order] * m
    return costs


def choose_engine(n_directions: int, tokens_per_sequence: float, order: int,
                  jet: bool = False) -> str:
    """The engine with the lowest modelled cost (:func:`engine_costs`); ``jet`` says whether
    the token loss has a jet (:func:`jet_engine`: the built-in decoder).

    >>> choose_engine(10, 4, order=2, jet=True), choose_engine(10, 4, order=2)
    ('jet', 'forward')
    >>> choose_engine(100, 4, order=1)
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
        batch_size: the most sequences in one chunk (the jet and forward mode pick fewer when
            that is faster; forward mode counts sequences × directions).
        memory_budget: bytes allowed for one chunk's per-sample gradients (reverse mode), one
            chunk's jet, or one chunk of materialised coordinate directions.

    Returns:
        ``first [m, tokens]`` float64 with ⟨v, ∇ℓ_x(θ)⟩ and ``second [m, tokens]`` float64 with
        vᵀ∇²ℓ_x(θ)v (``None`` when ``order == 1``).
    """
    _check_inputs(loss, theta, directions, order, engine, batch_size)
    has_jet = jet_engine(loss) is not None
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


# engines: each maps (loss, θ, tangents, batch, order, batch_size, memory_budget) to the
# [m, tokens] results, by a chunk size and a function of one chunk of sequences and directions
def _over_chunks(run, theta, tangents, batch: ProbeBatch, order: int, sequences: int,
                 directions: int):
    """``run(tangent rows, chunk) -> (first, second)`` over chunks of ``sequences`` sequences
    and ``directions`` directions, written into ``[m, tokens]`` results."""
    m = len(tangents)
    first = theta.new_zeros(m, batch.n_tokens)
    second = theta.new_zeros(m, batch.n_tokens) if order == 2 else None
    column = 0
    for chunk in batch.split(sequences):
        columns = slice(column, column + chunk.n_tokens)
        column += chunk.n_tokens
        if chunk.n_tokens == 0:
            continue
        for start in range(0, m, directions):
            rows = slice(start, start + directions)
            chunk_first, chunk_second = run(tangents[rows], chunk)
            first[rows, columns] = chunk_first
            if second is not None:
                second[rows, columns] = chunk_second
    return first, second


def jet_engine(loss: TokenLoss):
    """The Taylor-mode pass ``(theta, tangents, batch, order) -> Jet`` that the token loss's
    module offers for it (``module.jet_engine(loss)``; the built-in decoder's is
    :mod:`polca.models.jet`), or None: the kernel never imports a model."""
    offer = getattr(getattr(loss, "module", None), "jet_engine", None)
    return offer(loss) if callable(offer) else None


def _jet(loss, theta, tangents, batch, order, batch_size, memory_budget):
    taylor = jet_engine(loss)

    def run(rows, chunk):
        out = taylor(theta, _dense(rows), chunk, order)
        return out.first, out.second

    sequences, directions = jet_chunks(loss.module.cfg, batch, len(tangents), order, theta,
                                       batch_size, memory_budget,
                                       materialised=isinstance(tangents, _OneHotRows))
    return _over_chunks(run, theta, tangents, batch, order, sequences, directions)


def jet_chunks(cfg, batch: ProbeBatch, m: int, order: int, theta: torch.Tensor,
               batch_size: int = 256, memory_budget: int = 2**28,
               materialised: bool = False) -> tuple[int, int]:
    """``(sequences, directions)`` per jet chunk for a decoder of config ``cfg``.

    The jet's cost is arithmetic (dense products) and memory traffic over its widest
    activation, ``[1 + order·m, sequences, length, width]`` (width: qkv, MLP, attention scores
    or logits). Chunks are as small as keeps that
    activation near :data:`JET_CHUNK_BYTES` (cache-resident), but with at least
    :data:`JET_MIN_ROWS` positions so the weight-tangent products stay efficient; directions are
    split only when one sequence's jet, or the ``[m, d]`` block of ``materialised`` coordinate
    tangents, would exceed ``memory_budget``.

    >>> from polca.models.decoder import DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=12, context_length=12, d_model=64, n_heads=4, d_mlp=256)
    >>> ids = torch.zeros(1000, 12, dtype=torch.long)
    >>> batch = ProbeBatch(ids, ids, torch.ones(1000, 12, dtype=torch.bool))
    >>> jet_chunks(cfg, batch, m=10, order=2, theta=torch.zeros(100_000))
    (11, 10)
    """
    used = batch.scored.any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    # the widest activation per position: qkv, the MLP, attention scores, or the logits
    width = max(3 * cfg.d_model, cfg.mlp_width, cfg.n_heads * length, cfg.vocab_size)
    position = length * width * theta.element_size()  # one component at one sequence
    directions = max(m, 1)  # m = 0 still chunks (over nothing)
    if position * _LIVE_ACTIVATIONS * (1 + order * m) > memory_budget:
        directions = max(1, (memory_budget // (position * _LIVE_ACTIVATIONS) - 1) // order)
    if materialised:
        directions = min(directions, _materialised_rows(theta, memory_budget))
    per_sequence = position * (1 + order * directions)
    sequences = max(JET_CHUNK_BYTES // per_sequence, -(-JET_MIN_ROWS // length), 1)
    sequences = min(sequences, batch_size,
                    max(1, memory_budget // (per_sequence * _LIVE_ACTIVATIONS)))
    return int(sequences), int(directions)


def _forward(loss, theta, tangents, batch, order, batch_size, memory_budget):
    """jvp (first order) or jvp-of-jvp (both orders; one nested call gives both), vmapped
    over a chunk of directions; a model that vmap cannot batch falls back to a loop over
    directions (the same numbers, slower)."""
    vmapped = True

    def run(rows, chunk):
        nonlocal vmapped
        if vmapped:
            try:
                return _forward_vmap(loss, theta, _dense(rows), chunk, order)
            except RuntimeError as err:
                vmapped = False
                warnings.warn(f"vmap over directions failed for this token loss ({err}); "
                              "using a loop over directions", RuntimeWarning, stacklevel=4)
        return _forward_loop(loss, theta, rows, chunk, order)

    length = batch.input_ids.shape[1]
    # sequences × directions × positions per call near FORWARD_CHUNK_POSITIONS, and never more
    # sequences × directions than batch_size (the memory of batch_size sequences' activations)
    # nor more materialised coordinate directions than memory_budget
    directions = max(1, min(len(tangents), FORWARD_CHUNK_DIRECTIONS, batch_size,
                            FORWARD_CHUNK_POSITIONS // length))
    if isinstance(tangents, _OneHotRows):
        directions = min(directions, _materialised_rows(theta, memory_budget))
    sequences = max(1, min(batch_size // directions,
                           FORWARD_CHUNK_POSITIONS // (length * directions)))
    return _over_chunks(run, theta, tangents, batch, order, sequences, directions)


def _along(loss, theta, chunk: ProbeBatch, order: int) -> Callable:
    """tangent ``[d]`` -> ``(first [tokens], second [tokens] | None)`` by jvp, or by
    jvp-of-jvp: the jvp of (ℓ, ⟨v,∇ℓ⟩) along v is (⟨v,∇ℓ⟩, vᵀ∇²ℓ v), both orders at once."""
    def token_losses(point):
        return loss(point, chunk)

    def derivatives(tangent):
        if order == 1:
            return jvp(token_losses, (theta,), (tangent,))[1], None
        return jvp(lambda point: jvp(token_losses, (point,), (tangent,)), (theta,),
                   (tangent,))[1]

    return derivatives


def _forward_vmap(loss, theta, tangents: torch.Tensor, chunk: ProbeBatch, order: int):
    derivatives = _along(loss, theta, chunk, order)
    return vmap(derivatives, out_dims=(0, None if order == 1 else 0))(tangents)


def _forward_loop(loss, theta, tangents, chunk: ProbeBatch, order: int):
    derivatives = _along(loss, theta, chunk, order)
    pairs = [derivatives(tangent) for tangent in tangents]
    first = torch.stack([f for f, _ in pairs])
    return first, (torch.stack([s for _, s in pairs]) if order == 2 else None)


def _reverse(loss, theta, tangents, batch, order, batch_size, memory_budget):
    """Per-sample gradients projected onto all directions at once, in chunks of sequences
    whose gradients ``[sequences, scored, d]`` (about 3 copies) fit ``memory_budget``."""
    if len(batch):
        per_sequence = int(batch.scored.sum(1).max()) * theta.numel() * theta.element_size()
        batch_size = max(1, min(batch_size, memory_budget // max(3 * per_sequence, 1)))

    def run(rows, chunk):
        return _reverse_chunk(loss, theta, rows, chunk, order)

    return _over_chunks(run, theta, tangents, batch, order, batch_size, max(len(tangents), 1))


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


_ENGINES = {"jet": _jet, "forward": _forward, "reverse": _reverse}


# helpers --------------------------------------------------------------------------------------
def _coordinate_tangents(indices: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One-hot tangents for coordinate indices, materialised a chunk of rows at a time."""
    if indices.dim() != 1:
        raise ValueError(f"coordinate directions must be a 1-D index tensor, got {tuple(indices.shape)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= theta.numel()):
        raise ValueError(f"coordinate index out of range [0, {theta.numel()})")
    return _OneHotRows(indices, theta)


class _VmapUnsupported(RuntimeError):
    """The token loss cannot be vmapped over sequences (reverse mode's per-sample gradients)."""


class _OneHotRows:
    """Rows e_i of the identity for the given indices, materialised a chunk of directions at a
    time, so an ``[m, d]`` one-hot matrix is never allocated (the jet and forward mode take
    dense chunks; reverse mode selects gradient columns in :func:`_project`)."""

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

    def __getitem__(self, rows: slice) -> _OneHotRows:
        return _OneHotRows(self.indices[rows], self.theta)

    def dense(self) -> torch.Tensor:
        """The ``[m, d]`` one-hot rows (for engines that take all directions of a chunk)."""
        rows = self.theta.new_zeros(len(self.indices), self.theta.numel())
        rows[torch.arange(len(self.indices)), self.indices] = 1.0
        return rows


def _materialised_rows(theta: torch.Tensor, memory_budget: int) -> int:
    """How many one-hot ``[d]`` rows fit ``memory_budget`` (at least one)."""
    return max(1, memory_budget // (theta.numel() * theta.element_size()))


def _dense(tangents) -> torch.Tensor:
    """``[m, d]`` dense contiguous tangents (coordinate rows materialised)."""
    return tangents.dense() if isinstance(tangents, _OneHotRows) else tangents.contiguous()


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
    # NaN or inf anywhere makes the sum non-finite: an O(1)-memory test (an elementwise
    # isfinite of an [m, d] basis would take several times its memory); a non-finite sum of
    # finite values (overflow) falls through to the exact count, which then finds nothing
    if bool(torch.isfinite(values.sum())):
        return
    bad = sum(int((~torch.isfinite(part)).sum()) for part in values.reshape(-1).split(2**20))
    if bad:
        raise ValueError(
            f"{what} contain {bad} non-finite values (NaN or inf) of {values.numel()}; "
            "check the checkpoint and the token losses (a diverged run or a bad probe token)"
        )
